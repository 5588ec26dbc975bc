"""Best-of-N (PAPER.md §6): sample max(N) candidates per input once, with per-item seeds; the pick for N and a
verifier is the best of the first N candidates (ties: the earliest), so N = 1 is plain sampling.

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
from cyclepref.workstore import WorkStore, each, key_of, run_batches, seed_of


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


@dataclass
class BestOfNResult:
    """Scores [input, j] per verifier (and the evaluator), picks [input] per verifier and N, quality curves."""

    candidates: Candidates
    ns: list[int]
    evaluator: str
    scores: dict[str, np.ndarray]
    picks: dict[str, dict[int, np.ndarray]] = field(default_factory=dict)
    curves: dict[str, list[float]] = field(default_factory=dict)

    def picked(self, verifier: str, n: int) -> list[tuple[Image.Image, str]]:
        c = self.candidates
        return [(c.images[i][j], c.texts[i][j]) for i, j in enumerate(self.picks[verifier][n])]


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


def pick(scores: np.ndarray, n: int) -> np.ndarray:
    """Per input, the index of the best of the first n candidates (the earliest among equals)."""
    if not 1 <= n <= scores.shape[1]:
        raise ValueError(f"n = {n} but {scores.shape[1]} candidates per input")
    return np.argmax(scores[:, :n], axis=1)


def best_of_n(
    candidates: Candidates, scores: dict[str, np.ndarray], verifiers: Sequence[str], evaluator: str, ns: Sequence[int]
) -> BestOfNResult:
    """Picks of every verifier for every N and the evaluator's mean score of those picks."""
    result = BestOfNResult(candidates, list(ns), evaluator, scores)
    quality = scores[evaluator]
    rows = np.arange(candidates.shape[0])
    for name in verifiers:
        result.picks[name] = {n: pick(scores[name], n) for n in ns}
        result.curves[name] = [float(quality[rows, result.picks[name][n]].mean()) for n in ns]
    return result


# ---------------------------------------------------------------- stage


def run_task(
    task: str, cfg: BestOfN, root: Path, device: str, verifiers, work: WorkStore | None = None
) -> tuple[BestOfNResult, str]:
    """Sample the held-out inputs of one task and evaluate best-of-N; returns the result and the held-out source."""
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
    kinds = list(dict.fromkeys([*cfg.verifiers, cfg.evaluator]))
    scores = score_candidates(cands, verifiers.for_task(kinds, task))
    return best_of_n(cands, scores, list(cfg.verifiers), cfg.evaluator, cfg.n), held.source


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
    """The DVC plot data: one row per N, one column per verifier (evaluator's mean score of the picks)."""
    names = list(result.curves)
    lines = [",".join(["n", *names])]
    for k, n in enumerate(result.ns):
        lines.append(",".join([str(n), *(f"{result.curves[v][k]:.6f}" for v in names)]))
    with store.atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return path


def plot_curves(result: BestOfNResult, path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for name, values in result.curves.items():
        ax.plot(result.ns, values, marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xticks(result.ns, [str(n) for n in result.ns])
    ax.set_xlabel("N (candidates per input)")
    ax.set_ylabel(f"{result.evaluator} score of the pick")
    ax.set_title(title)
    ax.legend(title="verifier")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with store.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return Path(path)


def summarize(result: BestOfNResult, source: str) -> dict:
    """The task's section of the metrics report."""
    return {
        "inputs": result.candidates.shape[0],
        "heldout": source,
        "evaluator": result.evaluator,
        "n": result.ns,
        "quality": {v: dict(zip(map(str, result.ns), vals, strict=True)) for v, vals in result.curves.items()},
        "gain": {v: vals[-1] - vals[0] for v, vals in result.curves.items()},
    }
