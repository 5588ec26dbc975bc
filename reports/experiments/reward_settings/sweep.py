"""Reward-model settings on the default profile's pairs, chosen on the valid split's ground truth (2026-12-08).

Each run trains the Combo variant with train_reward's `train_variant` under the committed train_reward section plus
the run's changes, and scores it on the valid split twice: against the cycle labels and against ground truth (the
pair's candidate with the higher attribute F1 against the world's scene, cyclepref.world.report.candidate_f1; pairs
whose candidates tie on F1 are left out). The frozen benchmark is scored too, and only reported. `refs` scores the
references (backbone ITC / ITM, CLIPScore, random, raw cycle) the same way.

    python reports/experiments/reward_settings/sweep.py refs
    python reports/experiments/reward_settings/sweep.py gaps     # cycle-label agreement by near-tie gap, no training
    python reports/experiments/reward_settings/sweep.py NAME [head_init=itm] [lr=3e-4] [fix_rate=0.7] [epochs=20]
        [combo_ratio=2] [patience=10] [t2i_gap=0.04]

Run from the project root after `make run` (it reads data/pairs and the candidate tables); each run writes
OUT/NAME.json (OUT: $SWEEP_OUT, default data/work/reward_settings). `t2i_gap` drops T2I train and valid pairs whose
cycle-score margin is below the gap (the valid split the runs are judged on stays whole).
"""

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

root = Path.cwd()
sys.path.insert(0, str(root))

import tasks.sandbox_report as sr
from cyclepref import runtime, tables
from cyclepref.config import load_params
from cyclepref.reward.benchmarks import load_benchmark
from cyclepref.reward.data import TablePairSource
from cyclepref.reward.evaluate import RewardScorer, pairset_scores, reference_scorers
from cyclepref.reward.model import RewardModel
from cyclepref.reward.train import train_variant
from cyclepref.world import report as rp

OUT = Path(os.environ.get("SWEEP_OUT", root / "data/work/reward_settings"))
params = load_params(root / "params.yaml")
PAIRS = TablePairSource(root)


class Gap:
    """PAIRS with the T2I pairs whose cycle margin is below `gap` left out."""

    def __init__(self, base, gap: float):
        self.base, self.gap = base, gap

    def digest(self) -> str:
        return f"{self.base.digest()}-t2i-gap-{self.gap}"

    def pairs(self, task, split):
        ps = self.base.pairs(task, split)
        if task != "t2i":
            return ps
        ch, rj = ps.scores
        keep = np.flatnonzero(np.abs(ch - rj) >= self.gap)
        pick = lambda xs: [xs[i] for i in keep]
        return dataclasses.replace(ps, pair_ids=pick(ps.pair_ids), input_ids=pick(ps.input_ids),
                                   chosen_ids=pick(ps.chosen_ids), rejected_ids=pick(ps.rejected_ids),
                                   scores=(ch[keep], rj[keep]))


def ground_truth_f1() -> dict:
    truth = sr.load_truth(root / params.world.inputs_dir, root / tables.PATHS["inputs"],
                          root / params.prepare_inputs.pool)
    return {t: rp.candidate_f1(t, c, truth) for t, c in sr.candidate_tables(root).items()}


def truth_accuracy(ps, chosen, rejected, f1) -> tuple[float, int]:
    a = np.array([f1.get(c, np.nan) for c in ps.chosen_ids])
    b = np.array([f1.get(c, np.nan) for c in ps.rejected_ids])
    decided = np.isfinite(a) & np.isfinite(b) & (np.abs(a - b) > 1e-9)
    right = np.sign(chosen - rejected) == np.sign(a - b)
    return float(right[decided].mean()), int(decided.sum())


def score(scorers, f1, bench) -> dict:
    out: dict = {}
    for t in ("i2t", "t2i"):
        ps = PAIRS.pairs(t, "valid")
        for name, (ch, rj) in pairset_scores(ps, scorers, 64).items():
            out.setdefault(name, {})[f"valid_gt_{t}"] = truth_accuracy(ps, ch, rj, f1[t])
            out[name][f"valid_cycle_{t}"] = float((ch > rj).mean())
        for name, (ch, rj) in pairset_scores(bench[t], scorers, 64).items():
            out[name][f"bench_{t}"] = [float((ch > rj).mean()), len(ch)]
    return out


def references(f1, bench) -> dict:
    res = score(reference_scorers(params.evaluate_reward, root, runtime.device()), f1, bench)
    for t in ("i2t", "t2i"):
        ps = PAIRS.pairs(t, "valid")
        res.setdefault("cycle", {})[f"valid_gt_{t}"] = truth_accuracy(ps, *ps.cycle_scores(), f1[t])
    return res


def label_agreement_by_gap(f1, gaps=(0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.08)) -> dict:
    """Per task and gap: the share of all pipeline pairs (every split) with margin >= gap whose preferred candidate
    also has the higher ground-truth F1 (F1 ties left out), and how many pairs the gap keeps."""
    from cyclepref import store

    rows = store.read_table(root / tables.PATHS["pairs"], tables.PAIRS).to_pylist()
    out: dict = {}
    for task in ("i2t", "t2i"):
        mine = [r for r in rows if r["task"] == task]
        a = np.array([f1[task].get(r["preferred_id"], np.nan) for r in mine])
        b = np.array([f1[task].get(r["rejected_id"], np.nan) for r in mine])
        margin = np.array([r["margin"] for r in mine])
        decided = np.isfinite(a) & np.isfinite(b) & (np.abs(a - b) > 1e-9)
        for gap in gaps:
            keep = margin >= gap
            out.setdefault(task, {})[str(gap)] = {"agreement": float((a > b)[decided & keep].mean()),
                                                  "decided": int((decided & keep).sum()), "pairs": int(keep.sum())}
    return out


def train_and_score(name: str, kv: dict, f1, bench) -> dict:
    cfg = params.train_reward
    model = cfg.model.model_copy(update={k: float(v) if k == "fix_rate" else v
                                         for k, v in kv.items() if k in ("head_init", "fix_rate")})
    update: dict = {"model": model, "variants": ["combo"]}
    if "lr" in kv:
        update["lr"] = {**cfg.lr, "combo": float(kv["lr"])}
    if "epochs" in kv:
        update["epochs"] = int(kv["epochs"])
    if "combo_ratio" in kv:
        update["combo_ratio"] = float(kv["combo_ratio"])
    if "patience" in kv:
        update["patience"] = int(kv["patience"])
    source = Gap(PAIRS, float(kv["t2i_gap"])) if "t2i_gap" in kv else PAIRS
    start = time.time()
    trained = train_variant("combo", cfg.model_copy(update=update), source, OUT / name / "model", OUT / name / "work",
                            resume=None)
    res = score([RewardScorer("reward", RewardModel.from_pretrained(OUT / name / "model"))], f1, bench)["reward"]
    return res | {"settings": kv, "seconds": time.time() - start, "best_step": trained.best_step,
                  "steps": trained.steps, "best_loss": trained.best_loss}


def main() -> None:
    name, kv = sys.argv[1], dict(a.split("=", 1) for a in sys.argv[2:])
    f1, bench = ground_truth_f1(), load_benchmark(root / "data/benchmarks/sandbox/pairs.jsonl")
    if name == "gaps":
        res = label_agreement_by_gap(f1)
    else:
        res = references(f1, bench) if name == "refs" else train_and_score(name, kv, f1, bench)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{name}.json").write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
