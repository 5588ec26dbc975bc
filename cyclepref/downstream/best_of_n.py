"""Best-of-N (PAPER.md §6): sample max(N) candidates per input once, with per-item seeds; the pick for N and a
verifier is the best of the first N candidates (ties: the earliest), so N = 1 is plain sampling.

Every candidate is scored by every verifier and evaluator ([input, j] arrays): model verifiers in one batched call
each, `random` by a number seeded from the candidate key, `ground_truth` by attribute F1 against the input's true
scene (cyclepref.downstream.evaluators). A curve point is the evaluator's mean score of the picks, with a percentile
bootstrap interval over inputs (cyclepref.stats.mean_interval).

Candidate j of input i has the key key_of(input_id, model hash, decoding settings, j) and the generator seed
seed_of(key): a candidate never depends on the order of inputs, on batching or on max(N). Finished candidates live
in a work store (data/work/best_of_n_<task>/) so an interrupted stage resumes where it stopped.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

from cyclepref import store
from cyclepref.config import BestOfN, CaptionerSpec, T2ISpec
from cyclepref.downstream.evaluators import BOOTSTRAP_SEED, GROUND_TRUTH, Evaluator, GroundTruth, judged_by
from cyclepref.stats import mean_interval, paired_bootstrap
from cyclepref.workstore import WorkStore, each, key_of, run_batches, seed_of

RANDOM = "random"


@dataclass
class Candidates:
    """N candidates per input as (image, text) pairs: I2T = (input image, sampled caption), T2I = (sampled image,
    prompt). Lists are [input][j]."""

    task: str
    input_ids: list[str]
    keys: list[list[str]]
    images: list[list[Image.Image]]
    texts: list[list[str]]

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.input_ids), len(self.keys[0]) if self.keys else 0

    def flat(self) -> tuple[list[Image.Image], list[str]]:
        return [im for row in self.images for im in row], [t for row in self.texts for t in row]

    def flat_input_ids(self) -> list[str]:
        return [i for i, row in zip(self.input_ids, self.keys, strict=True) for _ in row]


@dataclass
class BestOfNResult:
    """Scores [input, j] per verifier and evaluator, picks [input] per verifier and N; per verifier and N the
    evaluator's mean score of the picks and its interval, the gain from the first to the last N (paired interval)
    and the second evaluator's mean score of the same picks."""

    candidates: Candidates
    ns: list[int]
    evaluator: str
    scores: dict[str, np.ndarray]
    second_evaluator: str | None = None
    confidence: float = 0.95
    picks: dict[str, dict[int, np.ndarray]] = field(default_factory=dict)
    curves: dict[str, list[float]] = field(default_factory=dict)
    intervals: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    gains: dict[str, tuple[float, float, float]] = field(default_factory=dict)
    second_curves: dict[str, list[float]] = field(default_factory=dict)

    def picked(self, verifier: str, n: int) -> list[tuple[Image.Image, str]]:
        c = self.candidates
        return [(c.images[i][j], c.texts[i][j]) for i, j in enumerate(self.picks[verifier][n])]

    def picked_scores(self, verifier: str, n: int, judge: str | None = None) -> np.ndarray:
        """Per input, the judge's (default: the evaluator's) score of the verifier's pick among the first n."""
        scores = self.scores[judge or self.evaluator]
        return scores[np.arange(scores.shape[0]), self.picks[verifier][n]]


def decoding(temperature: float, top_p: float = 1.0) -> dict | None:
    """generate() kwargs for sampling, or None for greedy decoding (temperature 0)."""
    if temperature == 0:
        return None
    return {"temperature": float(temperature), "top_p": float(top_p)}


def candidate_keys(input_ids: Sequence[str], gen_hash: str, settings: object, n_max: int) -> list[list[str]]:
    return [[key_of(i, gen_hash, settings, "best_of_n", j) for j in range(n_max)] for i in input_ids]


def _run(keys: list[str], work: WorkStore | None, batch_size: int, compute, desc: str) -> pa.Table:
    if work is None:
        return compute(keys)
    run_batches(keys, work, batch_size, each(compute), desc)
    return work.rows(keys)


def sample_captions(
    captioner,
    images: Sequence[Image.Image],
    input_ids: Sequence[str],
    gen_hash: str,
    sample: dict | None,
    n_max: int,
    batch_size: int,
    work: WorkStore | None = None,
) -> Candidates:
    """n_max cleaned captions per image; sampled captions are seeded per candidate key."""
    from cyclepref.cycle import TEXT_ROWS
    from cyclepref.models.captioner import clean_caption

    keys = candidate_keys(input_ids, gen_hash, sorted(sample.items()) if sample else "greedy", n_max)
    image_of = {k: images[i] for i, row in enumerate(keys) for k in row}

    def compute(ks: list[str]) -> pa.Table:
        seeds = [seed_of(k) for k in ks] if sample else None
        texts = captioner.caption([image_of[k] for k in ks], batch_size=batch_size, sample=sample, seeds=seeds)
        return pa.table({"key": ks, "raw_text": texts}, schema=TEXT_ROWS)

    flat = [k for row in keys for k in row]
    raw = dict(zip(flat, _run(flat, work, batch_size, compute, "best_of_n[i2t]").column("raw_text").to_pylist(),
                   strict=True))
    return Candidates(
        "i2t", list(input_ids), keys, [[images[i]] * n_max for i in range(len(keys))],
        [[clean_caption(raw[k]) for k in row] for row in keys],
    )


def sample_images(
    t2i,
    prompts: Sequence[str],
    input_ids: Sequence[str],
    gen_hash: str,
    n_max: int,
    batch_size: int,
    work: WorkStore | None = None,
) -> Candidates:
    """n_max images per prompt, one per candidate seed."""
    from cyclepref.cycle import IMAGE_ROWS
    from cyclepref.inputs import decode_image, png_bytes

    keys = candidate_keys(input_ids, gen_hash, "images", n_max)
    prompt_of = {k: prompts[i] for i, row in enumerate(keys) for k in row}

    def compute(ks: list[str]) -> pa.Table:
        images = t2i.generate([prompt_of[k] for k in ks], [seed_of(k) for k in ks], batch_size)
        return pa.table({"key": ks, "image": [png_bytes(im) for im in images]}, schema=IMAGE_ROWS)

    flat = [k for row in keys for k in row]
    png = dict(zip(flat, _run(flat, work, batch_size, compute, "best_of_n[t2i]").column("image").to_pylist(),
                   strict=True))
    return Candidates(
        "t2i", list(input_ids), keys, [[decode_image(png[k]) for k in row] for row in keys],
        [[prompts[i]] * n_max for i in range(len(keys))],
    )


def score_candidates(candidates: Candidates, verifiers: Mapping[str, object]) -> dict[str, np.ndarray]:
    """Every verifier's score of every candidate, as [input, j] arrays (one batched call per verifier)."""
    images, texts = candidates.flat()
    shape = candidates.shape
    return {name: v.score(images, texts).double().numpy().reshape(shape) for name, v in verifiers.items()}


def random_scores(candidates: Candidates) -> np.ndarray:
    """The random verifier: per candidate a uniform number seeded from its key (reproducible, order-free)."""
    return np.array(
        [[np.random.default_rng(seed_of(key_of(k, RANDOM))).random() for k in row] for row in candidates.keys],
        dtype=np.float64,
    ).reshape(candidates.shape)


def judge_candidates(candidates: Candidates, evaluator: Evaluator) -> np.ndarray:
    """An evaluator's score of every candidate against its input, as an [input, j] array."""
    images, texts = candidates.flat()
    return evaluator.score(candidates.flat_input_ids(), images, texts).reshape(candidates.shape)


def score_all(candidates: Candidates, kinds: Sequence[str], verifiers, truth: Mapping | None) -> dict[str, np.ndarray]:
    """Scores [input, j] of every kind (verifiers and evaluators). `verifiers`: a Verifiers (models loaded once);
    `truth`: input_id -> true objects, for ground_truth."""
    models = [k for k in kinds if k not in (RANDOM, GROUND_TRUTH)]
    scores = score_candidates(candidates, verifiers.for_task(models, candidates.task))
    if RANDOM in kinds:
        scores[RANDOM] = random_scores(candidates)
    if GROUND_TRUTH in kinds:
        if truth is None:
            raise ValueError("evaluator ground_truth needs the true scenes (params: best_of_n.truth)")
        scores[GROUND_TRUTH] = judge_candidates(candidates, GroundTruth(truth, candidates.task))
    return {k: scores[k] for k in kinds}


def pick(scores: np.ndarray, n: int) -> np.ndarray:
    """Per input, the index of the best of the first n candidates (the earliest among equals)."""
    if not 1 <= n <= scores.shape[1]:
        raise ValueError(f"n = {n} but {scores.shape[1]} candidates per input")
    return np.argmax(scores[:, :n], axis=1)


def best_of_n(
    candidates: Candidates,
    scores: dict[str, np.ndarray],
    verifiers: Sequence[str],
    evaluator: str,
    ns: Sequence[int],
    second_evaluator: str | None = None,
    confidence: float = 0.95,
    n_boot: int = 10000,
) -> BestOfNResult:
    """Picks of every verifier for every N, the evaluator's mean score of those picks with its bootstrap interval
    over inputs, and the second evaluator's mean score of the same picks."""
    result = BestOfNResult(candidates, list(ns), evaluator, scores, second_evaluator, confidence)
    for name in verifiers:
        result.picks[name] = {n: pick(scores[name], n) for n in ns}
        picked = [result.picked_scores(name, n) for n in ns]
        stats = [mean_interval(q, n_boot, BOOTSTRAP_SEED, confidence) for q in picked]
        result.curves[name] = [m for m, _, _ in stats]
        result.intervals[name] = [(low, high) for _, low, high in stats]
        result.gains[name] = paired_bootstrap(picked[-1], picked[0], n_boot, BOOTSTRAP_SEED, confidence)
        if second_evaluator is not None:
            result.second_curves[name] = [float(result.picked_scores(name, n, second_evaluator).mean()) for n in ns]
    return result


# ---------------------------------------------------------------- stage


def run_task(
    task: str, cfg: BestOfN, root: Path, device: str, verifiers, work: WorkStore | None = None,
    truth: Mapping | None = None,
) -> tuple[BestOfNResult, str]:
    """Sample the held-out inputs of one task and evaluate best-of-N; returns the result and the held-out source.
    `truth` (input_id -> true objects) is needed by evaluator ground_truth."""
    from cyclepref.cycle import Context, captioner_hash, t2i_hash
    from cyclepref.downstream.data import heldout_inputs
    from cyclepref.models import local_spec

    held = heldout_inputs(root, task, list(cfg.heldout_splits), cfg.max_inputs)
    ctx = Context(Path(root), device)
    n_max = max(cfg.n)
    if task == "i2t":
        from cyclepref.models.captioner import make_captioner, prompt_for

        spec: CaptionerSpec = cfg.captioner
        gen_hash = captioner_hash(ctx, spec, prompt_for(spec))
        model = make_captioner(local_spec(root, spec), device)
        cands = sample_captions(model, held.images, held.input_ids, gen_hash, decoding(cfg.temperature, cfg.top_p),
                                n_max, cfg.batch_size, work)
    else:
        from cyclepref.models.t2i import TextToImage

        spec_t: T2ISpec = cfg.t2i_model
        gen_hash = t2i_hash(ctx, spec_t)
        model = TextToImage(local_spec(root, spec_t), device)
        cands = sample_images(model, held.prompts, held.input_ids, gen_hash, n_max, cfg.batch_size, work)
    del model
    judges = [cfg.evaluator] + ([cfg.second_evaluator] if cfg.second_evaluator else [])
    scores = score_all(cands, list(dict.fromkeys([*cfg.verifiers, *judges])), verifiers, truth)
    result = best_of_n(cands, scores, list(cfg.verifiers), cfg.evaluator, cfg.n, cfg.second_evaluator,
                       cfg.confidence, cfg.bootstrap_samples)
    return result, held.source


def candidates_table(result: BestOfNResult) -> pa.Table:
    """One row per candidate: input_id, j, key, seed, text (i2t) or image (t2i), score_<verifier>."""
    from cyclepref.inputs import png_bytes

    c = result.candidates
    n_in, n_max = c.shape
    cols: dict[str, list] = {
        "input_id": [i for i in c.input_ids for _ in range(n_max)],
        "j": [j for _ in range(n_in) for j in range(n_max)],
        "key": [k for row in c.keys for k in row],
        "seed": [seed_of(k) for row in c.keys for k in row],
    }
    if c.task == "i2t":
        cols["text"] = [t for row in c.texts for t in row]
    else:
        cols["image"] = [png_bytes(im) for row in c.images for im in row]
    for name, s in result.scores.items():
        cols[f"score_{name}"] = s.reshape(-1).tolist()
    return pa.table(cols)


def curve_csv(result: BestOfNResult, path: Path) -> Path:
    """The DVC plot data: one row per N; per verifier the evaluator's mean score of the picks, then per verifier the
    interval bounds <verifier>_low, <verifier>_high."""
    names = list(result.curves)
    header = ["n", *names, *(f"{v}_{side}" for v in names for side in ("low", "high"))]
    lines = [",".join(header)]
    for k, n in enumerate(result.ns):
        means = [result.curves[v][k] for v in names]
        bounds = [b for v in names for b in result.intervals[v][k]]
        lines.append(",".join([str(n), *(f"{x:.6f}" for x in [*means, *bounds])]))
    with store.atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return path


def y_label(evaluator: str) -> str:
    return "ground-truth F1 of the pick" if evaluator == GROUND_TRUTH else f"{evaluator} score of the pick (model)"


def plot_curves(result: BestOfNResult, path: Path, title: str) -> Path:
    """Mean score of the picks against N per verifier, with its interval as a band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, values in result.curves.items():
        (line,) = ax.plot(result.ns, values, marker="o", label=name)
        low, high = zip(*result.intervals[name], strict=True)
        ax.fill_between(result.ns, low, high, color=line.get_color(), alpha=0.15, linewidth=0)
    ax.set_xscale("log", base=2)
    ax.set_xticks(result.ns, [str(n) for n in result.ns])
    ax.set_xlabel("N (candidates per input)")
    ax.set_ylabel(y_label(result.evaluator))
    ax.set_title(title)
    ax.legend(title=f"verifier ({result.confidence:.0%} interval)")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with store.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return Path(path)


def _by_n(result: BestOfNResult, values: list[float]) -> dict[str, float]:
    return dict(zip(map(str, result.ns), values, strict=True))


def summarize(result: BestOfNResult, source: str) -> dict:
    """The task's section of the metrics report: per verifier and N the evaluator's mean score of the picks
    (`quality`) and its interval (`low`, `high`); the gain from the first to the last N with its paired interval;
    the second evaluator's means of the same picks, labelled model-judged."""
    section = {
        "inputs": result.candidates.shape[0],
        "heldout": source,
        "evaluator": result.evaluator,
        "judged_by": judged_by(result.evaluator),
        "n": result.ns,
        "quality": {v: _by_n(result, vals) for v, vals in result.curves.items()},
        "low": {v: _by_n(result, [lo for lo, _ in iv]) for v, iv in result.intervals.items()},
        "high": {v: _by_n(result, [hi for _, hi in iv]) for v, iv in result.intervals.items()},
        "gain": {v: g[0] for v, g in result.gains.items()},
        "gain_low": {v: g[1] for v, g in result.gains.items()},
        "gain_high": {v: g[2] for v, g in result.gains.items()},
    }
    if result.second_evaluator is not None:
        section["second_evaluator"] = {
            "name": result.second_evaluator,
            "judged_by": judged_by(result.second_evaluator),
            "quality": {v: _by_n(result, vals) for v, vals in result.second_curves.items()},
            "gain": {v: vals[-1] - vals[0] for v, vals in result.second_curves.items()},
        }
    return section
