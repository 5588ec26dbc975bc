"""Benchmark: build_pairs at paper scale (PAPER.md §2: 7,600 inputs x 11 captions, x 12 images) against a naive
per-pair Python loop that applies the same rule, on synthetic score tables.

    .venv/bin/python bench/bench_pairs.py [--inputs 1000] [--repeats 5] [--out FILE]

Each side gets its natural input: build_pairs an Arrow table (as the stage reads it from parquet), the loop a pandas
frame. Timing by bench/harness.py (interleaved arms, repeats, ratio per round); peak memory of one more run
(Python/numpy allocations via tracemalloc, Arrow allocations via a proxy memory pool); checks that both give the same
pairs. 1,000 inputs keep the loop near 1 s per call; both arms scale linearly in the inputs.
"""

from __future__ import annotations

import argparse
import json
import sys
import tracemalloc
from itertools import combinations
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
import harness  # noqa: E402

from cyclepref.config import BuildPairs  # noqa: E402
from cyclepref.pairs import PairRule, build_pairs  # noqa: E402

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


def _peak_memory(fn) -> tuple[int, int]:
    """Peak bytes of one run of fn: Python/numpy allocations seen by tracemalloc, and Arrow allocations seen by a
    proxy of Arrow's memory pool."""
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
    return peak, pool.max_memory()


def run(n_inputs: int = 1000, repeats: int = 5, min_s: float = 1.0, echo=print) -> dict:
    cfg = BuildPairs()
    results = {}
    for task, (k, metric, direction) in CASES.items():
        scores = synthetic_scores(task, n_inputs)
        arrow_scores = pa.Table.from_pandas(scores, preserve_index=False)
        rule = PairRule.for_metric(metric, direction, cfg)
        task_cfg = cfg.model_copy(update={"tasks": [task]})
        fast_fn, naive_fn = (lambda: build_pairs(arrow_scores, task_cfg)), (lambda: naive_pairs(scores, rule))
        table, counts = fast_fn()
        naive = naive_fn()
        key = ["input_id", "preferred_id", "rejected_id"]
        fast = table.select(key).to_pandas()
        same = fast.sort_values(key).reset_index(drop=True).equals(naive[key].sort_values(key).reset_index(drop=True))
        r = harness.compare({"vectorised": fast_fn, "naive_loop": naive_fn}, ("naive_loop", "vectorised"), repeats,
                            min_s)
        mib = {name: [round(b / 2**20, 1) for b in _peak_memory(fn)] for name, fn in
               (("vectorised", fast_fn), ("naive_loop", naive_fn))}
        results[task] = {
            "inputs": n_inputs,
            "candidates_per_input": k,
            "candidate_rows": len(scores),
            "candidate_pairs": counts[task]["considered"],
            "pairs": table.num_rows,
            "same_pairs": bool(same),
            "peak_mib_python_numpy_and_arrow": mib,
            **r,
        }
        echo(f"pairs {task} x{r['ratio']['median']:6.2f} [{r['ratio']['min']:.2f}, {r['ratio']['max']:.2f}] "
             f"load {r['load_average_before'][0]}")
    if not all(r["same_pairs"] for r in results.values()):
        raise SystemExit("vectorised and naive pairs differ")
    return {"what": "build_pairs (Arrow, vectorised) vs the obvious per-pair loop; ratio = loop s / vectorised s",
            "tasks": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--inputs", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    report = {"machine": harness.machine(), **run(args.inputs, args.repeats)}
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
