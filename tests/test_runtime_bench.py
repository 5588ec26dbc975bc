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
    assert len(r["rounds"]) == 4 and len(r["samples"]["fast"]) == 4
    assert r["ratio"]["median"] == round(harness.statistics.median(r["rounds"]), 3)


def test_agreement_needs_each_median_inside_the_other_range():
    a = {"median": 4.0, "min": 3.5, "max": 4.6}
    assert harness.agree(a, {"median": 4.4, "min": 3.9, "max": 5.0})
    assert not harness.agree(a, {"median": 4.8, "min": 4.5, "max": 5.0})
    assert not harness.agree(a, {"median": 4.2, "min": 4.15, "max": 4.3})
    tree = {"cycle": {"stages": {"x": {"ratio": a}}}, "pairs": {"ratio": a}}
    assert set(harness.ratios(tree)) == {"cycle.stages.x", "pairs"}


def test_pooling_processes_widens_the_interval_to_every_round_and_keeps_each_process_median():
    def block(slow, fast):
        rounds = [s / f for s, f in zip(slow, fast, strict=True)]
        return {"samples": {"slow": slow, "fast": fast}, "rounds": rounds, "repeats": len(rounds),
                "calls_per_sample": {"slow": 1, "fast": 4}, "ratio": {"of": "slow / fast", **harness.summary(rounds)},
                "load_average_before": [1.0, 1.0, 1.0], "load_average_after": [1.0, 1.0, 1.0]}

    first, second = block([4.0, 4.2, 4.1], [1.0, 1.0, 1.0]), block([5.0, 5.2, 5.1], [1.0, 1.0, 1.0])
    assert not harness.agree(first["ratio"], second["ratio"])
    tree = harness.pool_trees([{"what": "a", "stages": {"x": first}}, {"what": "b", "stages": {"x": second}}])
    assert tree["what"] == "a"
    pooled = tree["stages"]["x"]
    assert pooled["processes"] == 2 and pooled["repeats"] == 6
    assert pooled["ratio"]["process_medians"] == [4.1, 5.1]
    assert (pooled["ratio"]["min"], pooled["ratio"]["max"]) == (4.0, 5.2)
    assert pooled["ratio"]["median"] == 4.6
    assert pooled["seconds_per_call"]["slow"]["median"] == 4.6
    assert pooled["calls_per_sample"] == [{"slow": 1, "fast": 4}] * 2
    assert harness.agree(pooled["ratio"], first["ratio"]) is False
    assert harness.agree(pooled["ratio"], {"median": 4.5, "min": 4.0, "max": 5.0})


def test_stage_peak_memory_sees_a_large_allocation():
    from cyclepref.stage import peak_memory

    before = peak_memory()["peak_rss_mib"]
    block = bytearray(300 * 2**20)
    block[:: 4096] = b"x" * len(block[:: 4096])
    after = peak_memory()["peak_rss_mib"]
    assert after - before > 250, (before, after)


def test_each_cpu_benchmark_runs_small_and_its_processes_pool(tmp_path):
    import bench_pairs
    import bench_reward

    runs = [bench_reward.run(pairs=4, batch_size=2, repeats=2, min_s=0.01, echo=lambda _: None) for _ in range(2)]
    pooled = harness.pool_trees(runs)
    for kind in ("distinct", "shared"):
        block = pooled["workloads"][kind]
        assert block["processes"] == 2
        assert block["rounds"] == runs[0]["workloads"][kind]["rounds"] + runs[1]["workloads"][kind]["rounds"]
        assert block["ratio"]["process_medians"] == [r["workloads"][kind]["ratio"]["median"] for r in runs]
        assert block["max_abs_diff"] <= 1e-4 and block["ratio"]["median"] > 0
    pairs = bench_pairs.run(n_inputs=20, repeats=1, min_s=0.01, echo=lambda _: None)
    assert set(harness.ratios(pairs)) == {"tasks.i2t", "tasks.t2i"}
