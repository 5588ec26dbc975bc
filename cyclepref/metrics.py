"""Headline metrics: a few numbers per stage in one shared vocabulary, so `dvc metrics show` is one narrow table.

A stage writes reports/metrics/<stage>[_<part>].json (its DVC metrics; a part is a task or a reward variant, written
for every part the stage can have, empty when the profile leaves it out, since dvc.yaml declares fixed files). The
stage's full report stays beside as a plain output (reports/dq/<gate>.json, reports/pairs.json, reports/reward/,
reports/downstream/). The keys:

    passed    1 when a gate passed, else 0          rows      rows a gate validated; pairs a task produced
    warnings  warning checks a gate failed          loss      best validation loss; last training loss
    accuracy  pairwise accuracy: the reward model on the test split; a DPO model's implicit reward accuracy
    baseline  the best baseline's accuracy on the same pairs; a DPO model's accuracy before training
    gain      Best-of-N: the reward verifier's quality at the largest N minus at N = 1; DPO: after minus before
    low/high  the interval of `accuracy` (evaluate_reward) or of `gain`

A value that is not a finite number (nothing to measure, e.g. an empty split) is left out of the headline; the full
report keeps it.
"""

from __future__ import annotations

import math
from pathlib import Path

from cyclepref import store

VOCABULARY = ("passed", "rows", "warnings", "accuracy", "baseline", "loss", "gain", "low", "high")
TASKS = ("i2t", "t2i")
VARIANTS = ("i2t", "t2i", "combo")
DIR = "reports/metrics"


def path(stage: str, part: str | None = None) -> str:
    return f"{DIR}/{stage.replace('@', '_')}{'_' + part if part else ''}.json"


def write(root: Path, stage: str, values: dict, part: str | None = None) -> Path:
    """Write one headline file; keys outside VOCABULARY and values that are not numbers are errors, NaN, infinite
    and None values are left out."""
    unknown = sorted(set(values) - set(VOCABULARY))
    if unknown:
        raise ValueError(f"{stage}: headline metrics {unknown} are not in {VOCABULARY}")
    bad = {k: v for k, v in values.items() if v is not None and not isinstance(v, int | float)}
    if bad:
        raise ValueError(f"{stage}: headline metrics must be numbers, got {bad}")
    kept = {k: values[k] for k in VOCABULARY if values.get(k) is not None and math.isfinite(values[k])}
    return store.write_json(kept, root / path(stage, part))


def write_parts(root: Path, stage: str, values: dict[str, dict], parts: tuple[str, ...]) -> list[Path]:
    """One file per part, every part of `parts` (empty when absent from `values`)."""
    extra = sorted(set(values) - set(parts))
    if extra:
        raise ValueError(f"{stage}: parts {extra} are not among {parts}")
    return [write(root, stage, values.get(part, {}), part) for part in parts]


def gate(report: dict) -> dict:
    return {"passed": int(report["success"]), "rows": report["rows"], "warnings": report["counts"]["failed_warning"]}


def pairs(stats: dict) -> dict[str, dict]:
    return {task: {"rows": s["pairs"]} for task, s in stats["tasks"].items()}


def train_reward(report: dict) -> dict[str, dict]:
    """Per variant: the best validation loss and the mean of its validation accuracies."""
    out = {}
    for variant, r in report.items():
        accs = [v for k, v in r.items() if k.startswith("val_acc_")]
        out[variant] = {"loss": r["best_val_loss"], **({"accuracy": sum(accs) / len(accs)} if accs else {})}
    return out


def evaluate_reward(section: dict, model: str, models: list[str]) -> dict[str, dict]:
    """Per task of one section (the test split): the first reward model's accuracy with its interval and the best
    accuracy among the baselines (the scorers that are not reward models)."""
    out = {}
    for task, res in section.items():
        scores = res["scores"]
        own = scores.get(model) or {}
        baselines = [a["accuracy"] for name, a in scores.items()
                     if name not in models and a is not None and a["accuracy"] is not None]
        values = {"rows": res["pairs"]}
        if own.get("accuracy") is not None:
            values |= {"accuracy": own["accuracy"], "low": own["ci95_low"], "high": own["ci95_high"]}
        if baselines:
            values["baseline"] = max(baselines)
        out[task] = values
    return out


def best_of_n(tasks: dict, verifier: str = "reward") -> dict[str, dict]:
    """Per task: the gain of `verifier` (from the first to the last N) with its paired interval."""
    out = {}
    for task, sec in tasks.items():
        if verifier in sec["gain"]:
            out[task] = {"gain": sec["gain"][verifier], "low": sec["gain_low"][verifier],
                         "high": sec["gain_high"][verifier]}
    return out


def dpo(report: dict, loss_key: str, accuracy_key: str) -> dict:
    """A DPO stage: its last training loss and the validation accuracy after (accuracy) and before (baseline)."""
    values = {"loss": report[loss_key]}
    if accuracy_key in report["valid_after"]:
        values |= {"accuracy": report["valid_after"][accuracy_key], "baseline": report["valid_before"][accuracy_key]}
    return values


def downstream(tasks: dict) -> dict[str, dict]:
    """Per task: the evaluator's after - before on held-out inputs with its paired interval."""
    return {task: {"gain": s["delta"], "low": s["delta_low"], "high": s["delta_high"]} for task, s in tasks.items()}
