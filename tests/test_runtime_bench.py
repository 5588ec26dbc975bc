"""bench/harness.py: arms interleaved in alternating order, a ratio per round, and the agreement rule that
`make bench` applies to two runs."""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import harness  # noqa: E402


def test_arms_alternate_and_each_sample_is_long_enough():
    order = []

    def arm(name, seconds):
        def call():
            order.append(name)
            time.sleep(seconds)
        return call

    r = harness.compare({"slow": arm("slow", 0.02), "fast": arm("fast", 0.005)}, ("slow", "fast"), repeats=4,
                        min_s=0.04)
    assert r["calls_per_sample"] == {"slow": 2, "fast": 8}
    rounds = order[2:]
    blocks = [rounds[i] for i in range(0, len(rounds), 1) if i == 0 or rounds[i] != rounds[i - 1]]
    assert blocks == ["slow", "fast", "slow", "fast", "slow"]
    assert 2.5 < r["ratio"]["median"] < 5.5
    assert r["ratio"]["min"] <= r["ratio"]["median"] <= r["ratio"]["max"]
    assert len(r["load_average_before"]) == 3


def test_agreement_needs_each_median_inside_the_other_range():
    a = {"median": 4.0, "min": 3.5, "max": 4.6}
    assert harness.agree(a, {"median": 4.4, "min": 3.9, "max": 5.0})
    assert not harness.agree(a, {"median": 4.8, "min": 4.5, "max": 5.0})
    assert not harness.agree(a, {"median": 4.2, "min": 4.15, "max": 4.3})
    tree = {"cycle": {"stages": {"x": {"ratio": a}}}, "pairs": {"ratio": a}}
    assert set(harness.ratios(tree)) == {"cycle.stages.x", "pairs"}


def test_stage_peak_memory_sees_a_large_allocation():
    from cyclepref.stage import peak_memory

    before = peak_memory()["peak_rss_mib"]
    block = bytearray(300 * 2**20)
    block[:: 4096] = b"x" * len(block[:: 4096])
    after = peak_memory()["peak_rss_mib"]
    assert after - before > 250, (before, after)
