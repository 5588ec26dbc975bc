"""Pairwise accuracy of reward models and baselines, with 95% Wilson intervals.

A pair counts as correct when the scorer gives the preferred item the higher score; exact ties count one half.
Baselines in the same report:
- cycle: the pair's raw cycle scores (direction-aware). On the pipeline's own splits the labels *are* the cycle
  comparison, so this is a label-agreement reference (100% by construction), not an accuracy against people; on
  an external benchmark it is available only when the file carries cycle scores.
- clipscore: cosine similarity of open_clip image and text embeddings (the order of CLIPScore = 2.5 max(cos, 0)
  wherever the cosine is positive); each distinct image / prompt of a pair set is embedded once.
- random: seeded uniform scores (expected accuracy 50%).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from cyclepref.reward.data import PairExample, PairSet

Z95 = 1.959963984540054


@dataclass(frozen=True)
class Accuracy:
    accuracy: float | None
    ci95_low: float | None
    ci95_high: float | None
    n: int
    ties: int

    def as_dict(self) -> dict:
        return {"accuracy": self.accuracy, "ci95_low": self.ci95_low, "ci95_high": self.ci95_high, "n": self.n,
                "ties": self.ties}


def wilson(p: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion p observed on n trials."""
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    low, high = max(0.0, centre - half), min(1.0, centre + half)
    return (0.0 if p == 0 else low), (1.0 if p == 1 else high)


def pair_outcomes(chosen: Sequence[float], rejected: Sequence[float]) -> np.ndarray:
    """Per pair: 1.0 when the chosen item scores higher, 0.0 when lower, 0.5 on an exact tie."""
    c, r = np.asarray(chosen, dtype=np.float64), np.asarray(rejected, dtype=np.float64)
    if c.shape != r.shape:
        raise ValueError(f"{c.shape} chosen scores but {r.shape} rejected scores")
    return (c > r) + 0.5 * (c == r)


def pairwise_accuracy(chosen: Sequence[float], rejected: Sequence[float]) -> Accuracy:
    return outcome_accuracy(pair_outcomes(chosen, rejected))


def outcome_accuracy(outcomes: np.ndarray) -> Accuracy:
    """The accuracy of per-pair outcomes (1 right, 0 wrong, 0.5 tie) with its Wilson interval."""
    n = int(outcomes.size)
    if n == 0:
        return Accuracy(None, None, None, 0, 0)
    ties = int((outcomes == 0.5).sum())
    p = float(outcomes.sum() / n)
    lo, hi = wilson(p, n)
    return Accuracy(p, lo, hi, n, ties)


class Scorer:
    """Scores chunks of pairs of one pair set; `reset` is called before each pair set."""

    name: str

    def reset(self, pairset: PairSet) -> None:
        pass

    def score(self, examples: Sequence[PairExample]) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError


def aligned(examples: Sequence[PairExample]) -> tuple[list, list[str]]:
    """(images, texts) of every pair's chosen and rejected item, interleaved (chosen at even positions)."""
    images, texts = [], []
    for e in examples:
        if e.task == "i2t":
            images += [e.image, e.image]
            texts += [e.chosen, e.rejected]
        else:
            images += [e.chosen, e.rejected]
            texts += [e.prompt, e.prompt]
    return images, texts


class RewardScorer(Scorer):
    def __init__(self, name: str, model):
        self.name, self.model = name, model

    def score(self, examples: Sequence[PairExample]) -> tuple[np.ndarray, np.ndarray]:
        images, texts = aligned(examples)
        s = self.model.score(images, texts, batch_size=max(2, len(texts))).numpy()
        return s[0::2], s[1::2]


class BackboneScorer(Scorer):
    """The reward model's starting backbone used zero-shot: a BLIP ITM checkpoint scoring each (image, text) by its
    image-text matching head (`itm`: logit of "match" minus logit of "no match") or by the cosine of its contrastive
    projections (`itc`). The baseline preference training has to beat."""

    def __init__(self, name: str, path: str, head: str, device: str = "cpu"):
        from transformers import AutoProcessor, BlipForImageTextRetrieval

        from cyclepref.models import load_failed, locate

        if head not in ("itm", "itc"):
            raise ValueError(f"backbone head must be 'itm' or 'itc', got {head!r}")
        try:
            self.processor = AutoProcessor.from_pretrained(locate(path))
            self.model = BlipForImageTextRetrieval.from_pretrained(locate(path), dtype=torch.float32).to(device).eval()
        except Exception as err:
            raise load_failed(path, err) from err
        self.name, self.head, self.device = name, head, device

    @torch.no_grad()
    def score(self, examples: Sequence[PairExample]) -> tuple[np.ndarray, np.ndarray]:
        images, texts = aligned(examples)
        batch = self.processor(images=[im.convert("RGB") for im in images], text=texts, padding=True,
                               truncation=True, return_tensors="pt").to(self.device)
        out = self.model(**batch, use_itm_head=self.head == "itm").itm_score
        s = (out[:, 1] - out[:, 0] if self.head == "itm" else out.diagonal()).float().cpu().numpy()
        return s[0::2], s[1::2]


class ClipScorer(Scorer):
    def __init__(self, embedder, name: str = "clipscore"):
        self.embedder, self.name = embedder, name
        self._cache: dict[str, torch.Tensor] = {}

    def reset(self, pairset: PairSet) -> None:
        self._cache = {}

    def _group(self, e: PairExample) -> torch.Tensor:
        if e.group not in self._cache:
            if e.task == "i2t":
                self._cache[e.group] = self.embedder.embed_images([e.image])[0]
            else:
                self._cache[e.group] = self.embedder.embed_texts([e.prompt])[0]
        return self._cache[e.group]

    def score(self, examples: Sequence[PairExample]) -> tuple[np.ndarray, np.ndarray]:
        shared = torch.stack([self._group(e) for e in examples])
        if examples[0].task == "i2t":
            ch = self.embedder.embed_texts([e.chosen for e in examples])
            rj = self.embedder.embed_texts([e.rejected for e in examples])
        else:
            ch = self.embedder.embed_images([e.chosen for e in examples])
            rj = self.embedder.embed_images([e.rejected for e in examples])
        return (shared * ch).sum(-1).numpy(), (shared * rj).sum(-1).numpy()


class RandomScorer(Scorer):
    name = "random"

    def __init__(self, seed: int):
        self.seed = seed

    def reset(self, pairset: PairSet) -> None:
        self.rng = np.random.default_rng([self.seed, len(pairset)])

    def score(self, examples: Sequence[PairExample]) -> tuple[np.ndarray, np.ndarray]:
        s = self.rng.random((2, len(examples)))
        return s[0], s[1]


def model_path(root, path: str) -> str:
    """A local model directory under the project root; a hub id (or an `hf-hub:` open_clip id) as it is."""
    return str(root / path) if (root / path).exists() else path


def reference_scorers(cfg, root, device: str) -> list[Scorer]:
    """The zero-shot scorers of an EvaluateReward section `cfg`: CLIPScore, its baselines, then random."""
    from cyclepref.models.similarity import ImageEmbedder

    scorers: list[Scorer] = []
    if cfg.clip is not None:
        scorers.append(ClipScorer(ImageEmbedder(model_path(root, cfg.clip), device)))
    for b in cfg.baselines:
        if b.kind == "clip":
            scorers.append(ClipScorer(ImageEmbedder(model_path(root, b.path), device), b.name))
        else:
            scorers.append(BackboneScorer(b.name, model_path(root, b.path), b.kind.removeprefix("blip_"), device))
    scorers.append(RandomScorer(cfg.seed))
    return scorers


def pairset_scores(
    pairset: PairSet, scorers: Sequence[Scorer], batch_size: int
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every scorer's (chosen, rejected) scores of every pair, in pair order (examples decoded once per chunk)."""
    for s in scorers:
        s.reset(pairset)
    parts: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {s.name: [] for s in scorers}
    for start in range(0, len(pairset), batch_size):
        examples = [pairset.example(i) for i in range(start, min(start + batch_size, len(pairset)))]
        for s in scorers:
            parts[s.name].append(s.score(examples))
    return {
        name: (
            np.concatenate([c for c, _ in chunks]) if chunks else np.empty(0),
            np.concatenate([r for _, r in chunks]) if chunks else np.empty(0),
        )
        for name, chunks in parts.items()
    }


def pairset_outcomes(pairset: PairSet, scorer: Scorer, batch_size: int) -> np.ndarray:
    """One scorer's per-pair outcomes (see `pair_outcomes`), in pair order."""
    return pair_outcomes(*pairset_scores(pairset, [scorer], batch_size)[scorer.name])


def outcomes_by_scorer(pairset: PairSet, scorers: Sequence[Scorer], batch_size: int) -> dict[str, np.ndarray | None]:
    """Every scorer's per-pair outcomes in pair order, and the raw cycle score's as `cycle` (None when the set has
    no cycle scores)."""
    out: dict[str, np.ndarray | None] = {
        name: pair_outcomes(ch, rj) for name, (ch, rj) in pairset_scores(pairset, scorers, batch_size).items()
    }
    cycle = pairset.cycle_scores()
    out["cycle"] = pair_outcomes(*cycle) if cycle is not None else None
    return out


def evaluate_pairset(pairset: PairSet, scorers: Sequence[Scorer], batch_size: int) -> dict[str, Accuracy | None]:
    """Every scorer's pairwise accuracy on every pair; `cycle` is None when the set has no cycle scores."""
    return {name: None if o is None else outcome_accuracy(o)
            for name, o in outcomes_by_scorer(pairset, scorers, batch_size).items()}


def paired_gains(outcomes: dict[str, np.ndarray | None], models: Sequence[str], n_boot: int = 10000,
                 seed: int = 0) -> dict[str, dict[str, dict]]:
    """Each model against every other scorer on the same pairs: the accuracy gain (model minus other), its 95% paired
    bootstrap interval (the same resampled pairs for both) and the exact McNemar p-value."""
    from cyclepref.stats import mcnemar_p, paired_bootstrap

    out: dict[str, dict[str, dict]] = {}
    for model in models:
        own = outcomes[model]
        if own is None or own.size == 0:
            continue
        for other, theirs in outcomes.items():
            if other != model and theirs is not None:
                gain, low, high = paired_bootstrap(own, theirs, n_boot, seed)
                out.setdefault(model, {})[other] = {"gain": gain, "ci95_low": low, "ci95_high": high,
                                                    "mcnemar_p": mcnemar_p(own, theirs), "n": int(own.size)}
    return out


def pooled(by_task: dict[str, dict[str, np.ndarray | None]]) -> dict[str, np.ndarray | None]:
    """The outcomes of every task one after the other (tasks in the given order), per scorer; None for a scorer that
    lacks outcomes on any task. Retraining's floor compares a Combo model over both tasks this way."""
    names = set.intersection(*(set(o) for o in by_task.values()))
    return {n: None if any(o[n] is None for o in by_task.values()) else np.concatenate([o[n] for o in by_task.values()])
            for n in sorted(names)}


PAIRED_NOTE = ("Accuracy gain of the model over the other scorer on the same pairs (points), 95% paired bootstrap "
               "interval, exact McNemar p-value.")


def paired_markdown(paired: dict) -> str:
    """The paired comparisons as Markdown tables, one per benchmark and task."""
    lines = []
    for section, tasks in paired.items():
        for task, by_model in tasks.items():
            lines += [f"## {section} / {task}: paired comparisons", "",
                      PAIRED_NOTE, "",
                      "| model | against | gain | 95% CI | McNemar p |", "|---|---|---|---|---|"]
            for model, against in by_model.items():
                for other, g in against.items():
                    lines.append(f"| {model} | {other} | {100 * g['gain']:+.2f} | {100 * g['ci95_low']:+.2f} to "
                                 f"{100 * g['ci95_high']:+.2f} | {g['mcnemar_p']:.3g} |")
            lines.append("")
    return "\n".join(lines) + ("\n" if lines else "")


def report_markdown(report: dict) -> str:
    """The evaluation report as Markdown tables (one per section and task) followed by the notes."""
    lines = ["# Reward model evaluation", ""]
    for section, tasks in report["results"].items():
        for task, res in tasks.items():
            lines += [f"## {section} / {task} ({res['pairs']} pairs)", "", "| scorer | accuracy | 95% CI | ties |",
                      "|---|---|---|---|"]
            for name, acc in res["scores"].items():
                if acc is None or acc["accuracy"] is None:
                    lines.append(f"| {name} | n/a | | |")
                else:
                    lines.append(
                        f"| {name} | {100 * acc['accuracy']:.2f} | {100 * acc['ci95_low']:.2f}-"
                        f"{100 * acc['ci95_high']:.2f} | {acc['ties']} |"
                    )
            lines.append("")
    lines += ["## Notes", ""] + [f"- {k}: {v}" for k, v in report["notes"].items()]
    return "\n".join(lines) + "\n"


def flat_metrics(report: dict) -> dict[str, float]:
    """report -> {"<section>.<task>.<scorer>.accuracy": value, ...} for MLflow."""
    out = {}
    for section, tasks in report["results"].items():
        for task, res in tasks.items():
            for name, acc in res["scores"].items():
                if acc is not None and acc["accuracy"] is not None:
                    for key in ("accuracy", "ci95_low", "ci95_high"):
                        out[f"{section}.{task}.{name}.{key}"] = float(acc[key])
    return out
