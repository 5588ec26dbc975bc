"""Score directions. Every metric records its raw value and direction; comparisons go through `oriented`."""

from __future__ import annotations

from typing import Literal

import numpy as np

Direction = Literal["higher", "lower"]
DIRECTIONS: dict[str, Direction] = {
    "open_clip": "higher",
    "dreamsim": "lower",
    "lpips": "lower",
    "sbert": "higher",
}


def oriented(values, direction: Direction) -> np.ndarray:
    """Values turned so that higher is always better (distances negated); the raw values stay in the tables."""
    v = np.asarray(values, dtype=np.float64)
    if direction == "higher":
        return v
    if direction == "lower":
        return -v
    raise ValueError(f"unknown score direction {direction!r} (expected 'higher' or 'lower')")


def better(a, b, direction: Direction) -> np.ndarray:
    """Elementwise: is score `a` strictly better than score `b`?"""
    return oriented(a, direction) > oriented(b, direction)
