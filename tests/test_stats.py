"""Bootstrap interval of a mean, paired bootstrap interval and exact McNemar test on hand-checkable arrays."""

from __future__ import annotations

import numpy as np
import pytest

from cyclepref.stats import mcnemar_p, mean_interval, paired_bootstrap


def _outcomes(correct: int, start: int = 0, n: int = 200) -> np.ndarray:
    out = np.zeros(n)
    out[start:start + correct] = 1.0
    return out


def test_identical_outcomes_give_zero_difference_and_a_zero_interval():
    a = _outcomes(120, start=30)
    assert paired_bootstrap(a, a.copy()) == (0.0, 0.0, 0.0)


def test_dominating_on_every_discordant_pair_puts_the_interval_above_zero():
    gain, low, high = paired_bootstrap(_outcomes(180), _outcomes(120))
    assert gain == pytest.approx(0.3)
    assert 0 < low < gain < high <= 0.4


def test_a_one_pair_edge_is_inside_the_noise():
    gain, low, high = paired_bootstrap(_outcomes(101, start=40), _outcomes(100))
    assert gain == pytest.approx(0.005)
    assert low < 0 < high


def test_ties_count_one_half_and_the_difference_is_a_over_b():
    a, b = np.array([0.5, 1.0, 0.0, 1.0]), np.array([0.0, 1.0, 0.5, 0.0])
    assert paired_bootstrap(a, b, n_boot=100)[0] == pytest.approx(0.25)
    assert paired_bootstrap(b, a, n_boot=100)[0] == pytest.approx(-0.25)


def test_same_seed_same_interval_and_confidence_widens_it():
    a, b = _outcomes(110, start=50), _outcomes(100)
    assert paired_bootstrap(a, b, seed=7) == paired_bootstrap(a, b, seed=7)
    assert paired_bootstrap(a, b, n_boot=50, seed=7) != paired_bootstrap(a, b, n_boot=50, seed=8)
    _, low90, high90 = paired_bootstrap(a, b, confidence=0.90)
    _, low99, high99 = paired_bootstrap(a, b, confidence=0.99)
    assert low99 < low90 and high90 < high99


def test_chunked_resampling_matches_the_requested_count(monkeypatch):
    import cyclepref.stats as stats

    a, b = _outcomes(110, start=50), _outcomes(100)
    whole = paired_bootstrap(a, b, n_boot=500)
    monkeypatch.setattr(stats, "DRAWS_PER_CHUNK", 200 * 7)
    assert paired_bootstrap(a, b, n_boot=500) == whole


@pytest.mark.parametrize(
    ("a", "b", "match"),
    [([1, 0, 1], [1, 0], "same length"), ([], [], "empty"), ([[1, 0]], [[1, 0]], "1-D")],
)
def test_bad_arrays_raise(a, b, match):
    with pytest.raises(ValueError, match=match):
        paired_bootstrap(a, b)
    with pytest.raises(ValueError, match=match):
        mcnemar_p(a, b)


def test_bad_settings_raise():
    with pytest.raises(ValueError, match="n_boot"):
        paired_bootstrap([1.0], [0.0], n_boot=0)
    with pytest.raises(ValueError, match="confidence"):
        paired_bootstrap([1.0], [0.0], confidence=1.0)


def test_mcnemar_p_by_hand():
    assert mcnemar_p(_outcomes(120), _outcomes(120)) == 1.0
    assert mcnemar_p([1, 1, 1, 0], [0, 0, 0, 0]) == pytest.approx(2 / 8)
    assert mcnemar_p([1, 0, 1, 1], [0, 1, 0, 0]) == pytest.approx(2 * 5 / 16)
    assert mcnemar_p([1, 0.5, 1, 1], [0, 0, 0.5, 0]) == pytest.approx(2 / 4)
    assert mcnemar_p(_outcomes(180), _outcomes(120)) < 1e-15


def test_mean_interval_of_a_constant_is_the_constant():
    assert mean_interval(np.full(30, 0.25)) == (0.25, 0.25, 0.25)


def test_mean_interval_contains_the_mean_and_matches_the_standard_error():
    for n in (20, 2000):
        x = np.tile([0.0, 1.0], n // 2)
        mean, low, high = mean_interval(x, seed=3)
        assert mean == 0.5 and low < mean < high
        assert high - low == pytest.approx(2 * 1.96 * 0.5 / np.sqrt(n), rel=0.15)


def test_mean_interval_shrinks_with_more_items_and_widens_with_confidence():
    rng = np.random.default_rng(0)
    few, many = rng.uniform(size=10), rng.uniform(size=1000)
    width = {len(x): mean_interval(x)[2] - mean_interval(x)[1] for x in (few, many)}
    assert width[1000] < width[10] / 5
    _, low90, high90 = mean_interval(few, confidence=0.90)
    _, low99, high99 = mean_interval(few, confidence=0.99)
    assert low99 < low90 and high90 < high99


def test_paired_bootstrap_is_the_interval_of_the_paired_differences():
    a, b = _outcomes(110, start=50), _outcomes(100)
    assert paired_bootstrap(a, b, n_boot=300, seed=5) == mean_interval(a - b, n_boot=300, seed=5)


@pytest.mark.parametrize(
    ("x", "kw", "match"),
    [([], {}, "non-empty"), ([[1.0]], {}, "1-D"), ([1.0], {"n_boot": 0}, "n_boot"),
     ([1.0], {"confidence": 0}, "confidence")],
)
def test_mean_interval_rejects_bad_input(x, kw, match):
    with pytest.raises(ValueError, match=match):
        mean_interval(x, **kw)
