"""Intervals of means over items (percentile bootstrap) and paired comparisons of two scorers on the same items
(e.g. per-pair outcomes: 1 right, 0 wrong, 0.5 tie), aligned."""

from __future__ import annotations

import math

import numpy as np

DRAWS_PER_CHUNK = 1 << 22


def _paired(a, b) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape:
        raise ValueError(f"paired outcomes need two 1-D arrays of the same length, got {x.shape} and {y.shape}")
    if x.size == 0:
        raise ValueError("paired outcomes are empty")
    return x, y


def mean_interval(x, n_boot: int = 10000, seed: int = 0, confidence: float = 0.95) -> tuple[float, float, float]:
    """mean(x) and its percentile bootstrap interval at `confidence` (resampling the items with replacement)."""
    v = np.asarray(x, dtype=np.float64)
    if v.ndim != 1 or v.size == 0:
        raise ValueError(f"need a non-empty 1-D array, got shape {v.shape}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    rng = np.random.default_rng(seed)
    n = v.size
    chunk = max(1, DRAWS_PER_CHUNK // n)
    means = np.concatenate([
        v[rng.integers(0, n, size=(min(chunk, n_boot - start), n))].mean(axis=1)
        for start in range(0, n_boot, chunk)
    ])
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(v.mean()), float(low), float(high)


def paired_bootstrap(
    a, b, n_boot: int = 10000, seed: int = 0, confidence: float = 0.95
) -> tuple[float, float, float]:
    """mean(a) - mean(b) over the same pairs and its percentile bootstrap interval at `confidence`.

    Each resample draws pair indices with replacement and uses the same indices for both arrays."""
    x, y = _paired(a, b)
    return mean_interval(x - y, n_boot, seed, confidence)


def mcnemar_p(a, b) -> float:
    """Exact two-sided McNemar p-value: a binomial test on the pairs that one side gets right and the other wrong
    (a pair with a tie, 0.5, on either side counts as neither)."""
    x, y = _paired(a, b)
    wins, losses = int(((x == 1) & (y == 0)).sum()), int(((x == 0) & (y == 1)).sum())
    n = wins + losses
    tail = sum(math.comb(n, k) for k in range(min(wins, losses) + 1))
    return min(1.0, 2 * tail / 2**n)
