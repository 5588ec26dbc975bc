"""The paper's data ablations on the sandbox: reward-model accuracy against the number of training pairs and against
the number of candidate captioners, scored on the frozen ground-truth benchmark (tasks/scale_ablation.py runs them).

Subsets are drawn by input, as the splits are: inputs are ordered by a seeded hash and a subset of n pairs takes the
pairs of the first inputs until it holds at least n, so every smaller subset is part of every larger one. The
captioner-count runs keep the I2T pairs whose two captions both come from the first k captioners of the configured
order. Every run validates (early stopping, best checkpoint) on the same capped valid set.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cyclepref.reward import Task
from cyclepref.reward.data import PairExample, PairSet, TablePairSet

TASKS: tuple[Task, ...] = ("i2t", "t2i")


@dataclass
class SubsetPairSet:
    """The pairs of `base` at `indices`, in that order."""

    base: PairSet
    indices: list[int]

    def __len__(self) -> int:
        return len(self.indices)

    def example(self, index: int) -> PairExample:
        return self.base.example(self.indices[index])

    def cycle_scores(self) -> tuple[np.ndarray, np.ndarray] | None:
        scores = self.base.cycle_scores()
        return None if scores is None else (scores[0][self.indices], scores[1][self.indices])


@dataclass
class SubsetSource:
    """A PairSource over loaded pipeline pair sets that keeps only the pair ids in `keep[split]`."""

    sets: dict[tuple[str, str], TablePairSet]
    keep: dict[str, frozenset[str]]
    base_digest: str
    _digest: str | None = field(default=None, repr=False)

    def pairs(self, task: Task, split: str) -> SubsetPairSet:
        base = self.sets[(task, split)]
        kept = self.keep[split]
        return SubsetPairSet(base, [i for i, pid in enumerate(base.pair_ids) if pid in kept])

    def digest(self) -> str:
        if self._digest is None:
            h = hashlib.sha256(self.base_digest.encode())
            for split in sorted(self.keep):
                h.update(f"\n{split}:".encode() + ",".join(sorted(self.keep[split])).encode())
            self._digest = h.hexdigest()
        return self._digest


def input_order(input_ids: Iterable[str], seed: int) -> list[str]:
    """Distinct input ids in a seeded order that does not depend on how they were listed."""
    return sorted(set(input_ids), key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).hexdigest())


def first_inputs(rows: list[dict], n: int, seed: int) -> frozenset[str]:
    """Pair ids of the first inputs (in `input_order`) whose pairs number at least n (all when there are fewer)."""
    by_input: dict[str, list[str]] = {}
    for r in rows:
        by_input.setdefault(r["input_id"], []).append(r["pair_id"])
    kept: list[str] = []
    for input_id in input_order(by_input, seed):
        if len(kept) >= n:
            break
        kept += by_input[input_id]
    return frozenset(kept)


def valid_keep(rows: list[dict], per_task: int, seed: int) -> frozenset[str]:
    """The capped valid set: for each task, the pairs of its first inputs until it holds at least `per_task`."""
    return frozenset().union(*(first_inputs([r for r in rows if r["task"] == t], per_task, seed) for t in TASKS))


def captioner_keep(rows: list[dict], captioners: list[str], k: int) -> frozenset[str]:
    """I2T pairs whose preferred and rejected captions both come from the first k captioners."""
    pool = set(captioners[:k])
    return frozenset(r["pair_id"] for r in rows
                     if r["task"] == "i2t" and r["preferred_model"] in pool and r["rejected_model"] in pool)


def epochs_for(pairs: int, budget: int, lowest: int, highest: int) -> int:
    """Epochs that show about `budget` pairs, clamped to [lowest, highest]."""
    return max(lowest, min(highest, math.ceil(budget / max(pairs, 1))))


@dataclass(frozen=True)
class Run:
    """One ablation point: `variant` trained on the train pairs in `keep`."""

    name: str
    axis: str
    value: int
    variant: str
    keep: frozenset[str]


def plan(rows: list[dict], cfg) -> list[Run]:
    """The ablation's runs from the train split's pair rows (dicts with pair_id, task, input_id, preferred_model,
    rejected_model) under the ScaleAblation section `cfg`; a size whose subset equals a smaller one's is dropped."""
    runs = []
    for n in sorted(set(cfg.pairs)):
        keep = first_inputs(rows, n, cfg.seed)
        if len(keep) < len(rows) and (not runs or keep != runs[-1].keep):
            runs.append(Run(f"pairs-{n}", "pairs", n, "combo", keep))
    if cfg.include_all or not runs:
        runs.append(Run(f"pairs-all-{len(rows)}", "pairs", len(rows), "combo", frozenset(r["pair_id"] for r in rows)))
    for k in sorted(set(cfg.captioner_counts)):
        runs.append(Run(f"captioners-{k}", "captioners", k, "i2t", captioner_keep(rows, list(cfg.captioners), k)))
    return runs


PLOTTED = ("cycle", "clipscore", "backbone-itc")


def _pct(acc: dict | None) -> str:
    if not acc or acc.get("accuracy") is None:
        return "n/a"
    return f"{100 * acc['accuracy']:.1f} [{100 * acc['ci95_low']:.1f}, {100 * acc['ci95_high']:.1f}]"


def report_markdown(report: dict) -> str:
    """The two ablation tables and the reference scorers, as Markdown."""
    runs = report["runs"]
    lines = ["| training pairs (I2T + T2I) | epochs | benchmark I2T % [95% CI] | benchmark T2I % [95% CI] |",
             "|---|---|---|---|"]
    for r in (r for r in runs if r["axis"] == "pairs"):
        n = r["train_pairs"]
        lines.append(f"| {sum(n.values())} ({n.get('i2t', 0)} + {n.get('t2i', 0)}) | {r['epochs']} | "
                     f"{_pct(r['benchmark'].get('i2t'))} | {_pct(r['benchmark'].get('t2i'))} |")
    refs = report["references"]
    for name in sorted(refs, key=lambda n: (n not in PLOTTED, PLOTTED.index(n) if n in PLOTTED else 0, n)):
        by_task = refs[name]
        lines.append(f"| reference: {name} | | {_pct(by_task.get('i2t'))} | {_pct(by_task.get('t2i'))} |")
    counts = [r for r in runs if r["axis"] == "captioners"]
    if counts:
        order = ", ".join(report["settings"]["captioners"])
        lines += ["", f"Candidate captioners (the first k of: {order}); I2T reward model, I2T benchmark pairs:", "",
                  "| captioners k | I2T training pairs | epochs | benchmark I2T % [95% CI] |", "|---|---|---|---|"]
        lines += [f"| {r['value']} | {r['train_pairs']['i2t']} | {r['epochs']} | {_pct(r['benchmark']['i2t'])} |"
                  for r in counts]
    return "\n".join(lines) + "\n"


def plot(report: dict, path) -> None:
    """ablation.svg: accuracy against training pairs (log axis) per task, and against captioner count, with 95%
    intervals and the references as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, refs = report["runs"], report["references"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [2, 1]})
    colours = {"i2t": "tab:blue", "t2i": "tab:orange"}
    sized = [r for r in runs if r["axis"] == "pairs"]
    for task, colour in colours.items():
        x = [sum(r["train_pairs"].values()) for r in sized]
        _series(axes[0], x, [r["benchmark"].get(task) for r in sized], colour, f"reward {task}")
        for style, name in zip(("--", ":", "-."), PLOTTED, strict=True):
            acc = refs.get(name, {}).get(task)
            if acc:
                axes[0].axhline(100 * acc["accuracy"], color=colour, ls=style, lw=1, label=f"{name} {task}")
    axes[0].set(xscale="log", xlabel="training pairs (I2T + T2I)", ylabel="benchmark accuracy %")
    axes[0].legend(fontsize=7, ncol=2)
    counted = [r for r in runs if r["axis"] == "captioners"]
    _series(axes[1], [r["value"] for r in counted], [r["benchmark"]["i2t"] for r in counted], colours["i2t"],
            "reward i2t")
    for style, name in zip(("--", ":", "-."), PLOTTED, strict=True):
        acc = refs.get(name, {}).get("i2t")
        if acc:
            axes[1].axhline(100 * acc["accuracy"], color=colours["i2t"], ls=style, lw=1, label=f"{name} i2t")
    axes[1].set(xlabel="candidate captioners", ylabel="benchmark I2T accuracy %",
                xticks=[r["value"] for r in counted])
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, format="svg", metadata={"Date": None})
    plt.close(fig)


def _series(ax, x: list, accs: list, colour: str, label: str) -> None:
    points = [(xi, a) for xi, a in zip(x, accs, strict=True) if a and a.get("accuracy") is not None]
    if not points:
        return
    xs = [p[0] for p in points]
    ys = [100 * p[1]["accuracy"] for p in points]
    err = [[y - 100 * p[1]["ci95_low"] for y, p in zip(ys, points, strict=True)],
           [100 * p[1]["ci95_high"] - y for y, p in zip(ys, points, strict=True)]]
    ax.errorbar(xs, ys, yerr=err, color=colour, marker="o", capsize=3, label=label)


def write_report(report: dict, out) -> list:
    """ablation.json, ablation.md and ablation.svg under `out`; their paths."""
    from cyclepref import store

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    store.write_json(report, out / "ablation.json")
    with store.atomic_path(out / "ablation.md") as tmp:
        tmp.write_text("# Scale run: data-scale and captioner-count ablations\n\n" + report_markdown(report))
    with store.atomic_path(out / "ablation.svg") as tmp:
        plot(report, tmp)
    return [out / "ablation.json", out / "ablation.md", out / "ablation.svg"]
