"""Benchmark: build_pairs at paper scale (PAPER.md §2: 7,600 inputs x 11 captions, x 12 images) against a naive
per-pair Python loop that applies the same rule, on synthetic score tables.

    .venv/bin/python bench/bench_pairs.py [--inputs 7600] [--out bench/results/bench_pairs.json]

Each side gets its natural input: build_pairs an Arrow table (as the stage reads it from parquet), the loop a pandas
frame. Reports the best wall time of a few runs, peak memory of one more run (Python/numpy allocations via
tracemalloc, Arrow allocations via a proxy memory pool) and the speed-up, checks that both give the same pairs, and
writes the numbers as JSON with the machine's load average (timings on a busy machine are noisy).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
import tracemalloc
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from cyclepref.config import BuildPairs
from cyclepref.pairs import PairRule, build_pairs

CASES = {"i2t": (11, "dreamsim", "lower"), "t2i": (12, "sbert", "higher")}


def synthetic_scores(task: str, n_inputs: int, seed: int = 0) -> pd.DataFrame:
    """SCORES rows: `n_inputs` inputs x the paper's candidate count, scores spread like DreamSim / SBERT values,
    and (i2t) a few repeated captions so that the duplicate-text rule has work to do."""
    k, metric, direction = CASES[task]
    rng = np.random.default_rng(seed)
    n = n_inputs * k
    low, high = (0.25, 0.85) if metric == "dreamsim" else (0.2, 0.9)
    text = None
    if task == "i2t":
        text = np.char.add("caption ", rng.integers(0, 4 * k, n).astype(str)).astype(object)
    return pd.DataFrame(
        {
            "task": task,
            "input_id": np.repeat(np.char.add("input-", np.arange(n_inputs).astype(str)), k).astype(object),
            "candidate_id": np.char.add("cand-", rng.permutation(n).astype(str)).astype(object),
            "model": np.tile(np.char.add(f"{task}-model-", np.arange(k).astype(str)), n_inputs).astype(object),
            "text": text,
            "score": np.round(rng.uniform(low, high, n), 4),
            "metric": metric,
            "direction": direction,
        }
    )


def naive_pairs(scores: pd.DataFrame, rule: PairRule) -> pd.DataFrame:
    """The §3 rule written as the obvious loop over inputs and candidate pairs (the reference, and the baseline)."""
    out = []
    for input_id, group in scores.groupby("input_id", sort=True):
        rows = sorted(group.to_dict("records"), key=lambda r: r["candidate_id"])
        if rule.dedupe_texts:
            seen, kept = set(), []
            for r in rows:
                norm = None if r["text"] is None else r["text"].strip().lower()
                if norm is None or norm not in seen:
                    kept.append(r)
                    seen.add(norm)
            rows = kept
        for a, b in combinations(rows, 2):
            norm_a = None if a["text"] is None else a["text"].strip().lower()
            if norm_a is not None and norm_a == (None if b["text"] is None else b["text"].strip().lower()):
                continue
            gap = abs(a["score"] - b["score"])
            if gap < rule.tie_gap or gap == 0:
                continue
            sign = 1.0 if rule.direction == "higher" else -1.0
            pref, rej = (a, b) if sign * a["score"] > sign * b["score"] else (b, a)
            if rule.quality_limit is not None and sign * pref["score"] < sign * rule.quality_limit:
                continue
            out.append((input_id, pref["candidate_id"], rej["candidate_id"], gap))
    return pd.DataFrame(out, columns=["input_id", "preferred_id", "rejected_id", "margin"])


def _measure(fn, repeat: int):
    """(result, best wall seconds of `repeat` runs, peak bytes of one more run: Python/numpy allocations seen by
    tracemalloc, and Arrow allocations seen by a proxy of Arrow's memory pool)."""
    seconds = math.inf
    for _ in range(repeat):
        started = time.perf_counter()
        result = fn()
        seconds = min(seconds, time.perf_counter() - started)
    default_pool = pa.default_memory_pool()
    pool = pa.proxy_memory_pool(default_pool)
    pa.set_memory_pool(pool)
    tracemalloc.start()
    try:
        fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        pa.set_memory_pool(default_pool)
    return result, seconds, (peak, pool.max_memory())


def bench(n_inputs: int, repeat: int = 3) -> dict:
    cfg = BuildPairs()
    build_pairs(synthetic_scores("i2t", 10), cfg.model_copy(update={"tasks": ["i2t"]}))
    results = {}
    for task, (k, metric, direction) in CASES.items():
        scores = synthetic_scores(task, n_inputs)
        arrow_scores = pa.Table.from_pandas(scores, preserve_index=False)
        rule = PairRule.for_metric(metric, direction, cfg)
        task_cfg = cfg.model_copy(update={"tasks": [task]})
        (table, counts), fast_s, fast_peak = _measure(lambda: build_pairs(arrow_scores, task_cfg), repeat)
        naive, naive_s, naive_peak = _measure(lambda: naive_pairs(scores, rule), max(1, repeat // 2))
        fast = table.select(["input_id", "preferred_id", "rejected_id"]).to_pandas()
        key = ["input_id", "preferred_id", "rejected_id"]
        same = fast.sort_values(key).reset_index(drop=True).equals(naive[key].sort_values(key).reset_index(drop=True))
        results[task] = {
            "inputs": n_inputs,
            "candidates_per_input": k,
            "candidate_rows": len(scores),
            "candidate_pairs": counts[task]["considered"],
            "pairs": table.num_rows,
            "vectorised_seconds": round(fast_s, 3),
            "vectorised_peak_mib": {"python_numpy": round(fast_peak[0] / 2**20, 1),
                                    "arrow": round(fast_peak[1] / 2**20, 1)},
            "naive_seconds": round(naive_s, 3),
            "naive_peak_mib": {"python_numpy": round(naive_peak[0] / 2**20, 1),
                               "arrow": round(naive_peak[1] / 2**20, 1)},
            "speedup": round(naive_s / fast_s, 1),
            "same_pairs": bool(same),
        }
    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.python_implementation()} "
        f"{platform.python_version()}",
        "load_average_1min": round(os.getloadavg()[0], 2),
        "repeat": repeat,
        "tasks": results,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", type=int, default=7600)
    parser.add_argument("--repeat", type=int, default=3, help="timed runs (best kept); the naive loop runs half")
    parser.add_argument("--out", type=Path, default=Path("bench/results/bench_pairs.json"))
    args = parser.parse_args()
    report = bench(args.inputs, args.repeat)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for task, r in report["tasks"].items():
        print(
            f"{task}: {r['inputs']} x {r['candidates_per_input']} -> {r['pairs']} pairs; "
            f"vectorised {r['vectorised_seconds']} s (peak MiB {r['vectorised_peak_mib']}), "
            f"naive loop {r['naive_seconds']} s (peak MiB {r['naive_peak_mib']}), x{r['speedup']}, "
            f"same={r['same_pairs']}"
        )
    print(f"written to {args.out}")
    if not all(r["same_pairs"] for r in report["tasks"].values()):
        raise SystemExit("vectorised and naive pairs differ")


if __name__ == "__main__":
    main()
