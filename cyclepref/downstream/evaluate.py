"""Before / after comparison of the DPO-trained models on held-out inputs, judged by the profile's evaluator.

I2T: the base captioner and the captioner with the dpo_vlm adapter caption every held-out image (greedy).
T2I: the base text-to-image model and the one with the diffusion_dpo adapter render every held-out prompt once per
seed of params `seeds`, with the same per-item seeds before and after (derived from the input, the model and the
seed). An evaluator (cyclepref.downstream.evaluators: ground truth or a model verifier) scores every outcome; an
input's score is its mean over seeds. Intervals are percentile bootstraps over inputs of the before and after means
and of the paired difference after - before.
The base model is loaded once; the adapter is applied to it after the "before" outputs exist.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from cyclepref.config import CaptionerSpec, EvaluateDownstream, T2ISpec
from cyclepref.downstream.evaluators import BOOTSTRAP_SEED, Evaluator, judged_by
from cyclepref.stats import mean_interval, paired_bootstrap
from cyclepref.workstore import key_of, seed_of


@dataclass
class Outcomes:
    """Before / after outcomes as aligned (input, image, text) lists, input-major, `per_input` per input:
    I2T (input image, caption), T2I (generated image, prompt)."""

    task: str
    input_ids: list[str]
    per_input: int
    images_before: list[Image.Image]
    texts_before: list[str]
    images_after: list[Image.Image]
    texts_after: list[str]
    images_sft: list[Image.Image] | None = None
    texts_sft: list[str] | None = None

    def changed(self) -> int:
        if self.task == "i2t":
            return sum(x != y for x, y in zip(self.texts_before, self.texts_after, strict=True))
        return sum(np.asarray(x).tobytes() != np.asarray(y).tobytes()
                   for x, y in zip(self.images_before, self.images_after, strict=True))


def compare(before: Sequence[float], after: Sequence[float]) -> dict:
    """Means, their difference and the after-vs-before win rate (ties count one half)."""
    b, a = np.asarray(before, dtype=np.float64), np.asarray(after, dtype=np.float64)
    if b.shape != a.shape or b.size == 0:
        raise ValueError(f"need equal, non-empty score arrays, got {b.shape} and {a.shape}")
    wins = float(((a > b).sum() + 0.5 * (a == b).sum()) / a.size)
    return {"n": int(a.size), "before": float(b.mean()), "after": float(a.mean()), "delta": float(a.mean() - b.mean()),
            "win_rate": wins}


def with_intervals(before: Sequence[float], after: Sequence[float], confidence: float = 0.95,
                   n_boot: int = 10000) -> dict:
    """compare() plus bootstrap intervals over inputs: before_low/high, after_low/high and delta_low/high (paired)."""
    report = compare(before, after)
    for name, x in (("before", before), ("after", after)):
        _, report[f"{name}_low"], report[f"{name}_high"] = mean_interval(x, n_boot, BOOTSTRAP_SEED, confidence)
    _, report["delta_low"], report["delta_high"] = paired_bootstrap(after, before, n_boot, BOOTSTRAP_SEED, confidence)
    return report


def judge(outcomes: Outcomes, evaluator: Evaluator, confidence: float = 0.95, n_boot: int = 10000) -> dict:
    """The evaluator's per-input scores (mean over an input's outcomes) before and after, compared with intervals;
    with SFT-baseline outcomes also `sft_baseline` (SFT vs before) and `dpo_vs_sft` (after vs SFT), paired."""
    o = outcomes

    def per_input(images, texts):
        return evaluator.score(o.input_ids, images, texts).reshape(-1, o.per_input).mean(axis=1)

    before, after = per_input(o.images_before, o.texts_before), per_input(o.images_after, o.texts_after)
    report = {"judged_by": judged_by(evaluator.name), **with_intervals(before, after, confidence, n_boot)}
    if o.texts_sft is not None:
        sft = per_input(o.images_sft, o.texts_sft)
        report["sft_baseline"] = with_intervals(before, sft, confidence, n_boot)
        report["dpo_vs_sft"] = with_intervals(sft, after, confidence, n_boot)
    return report


def captions_with_adapters(spec: CaptionerSpec, adapters: Sequence[Path | None], images: Sequence[Image.Image],
                           device: str, batch_size: int) -> list[list[str]]:
    """Greedy captions of `images` by the base captioner (adapter None) and with each adapter, one model load: an
    adapter is applied unmerged and unloaded after its captions."""
    from cyclepref.downstream.dpo_vlm import apply_adapter
    from cyclepref.models.captioner import Captioner, clean_caption

    captioner = Captioner(spec, device)
    out = []
    for adapter in adapters:
        if adapter is not None:
            apply_adapter(captioner, adapter, merge=False)
        out.append([clean_caption(t) for t in captioner.caption(list(images), batch_size=batch_size)])
        if adapter is not None:
            captioner.model = captioner.model.unload().eval()
    return out


def image_seeds(input_ids: Sequence[str], gen_hash: str, seeds: Sequence[int] = (0,)) -> list[int]:
    """Generator seeds of the T2I outcomes, input-major: one per (input, seed)."""
    return [seed_of(key_of(i, gen_hash, "evaluate_downstream", s)) for i in input_ids for s in seeds]


def images_with_adapters(spec: T2ISpec, adapters: Sequence[Path | None], prompts: Sequence[str], seeds: Sequence[int],
                         device: str, batch_size: int) -> list[list[Image.Image]]:
    """Images of `prompts` by the base model (adapter None) and with each adapter, same seeds, one model load."""
    from cyclepref.downstream.diffusion_dpo import apply_adapter
    from cyclepref.models.t2i import TextToImage

    t2i = TextToImage(spec, device)
    out = []
    for adapter in adapters:
        if adapter is not None:
            apply_adapter(t2i, adapter)
        out.append(t2i.generate(list(prompts), list(seeds), batch_size))
        if adapter is not None:
            t2i.pipe.unload_lora_weights()
    return out


def caption_outcomes(spec: CaptionerSpec, adapter: Path, held, device: str, batch_size: int,
                     baseline: Path | None = None) -> Outcomes:
    texts = captions_with_adapters(spec, [None, adapter, *([baseline] if baseline else [])], held.images, device,
                                   batch_size)
    images = list(held.images)
    return Outcomes("i2t", list(held.input_ids), 1, images, texts[0], images, texts[1],
                    images if baseline else None, texts[2] if baseline else None)


def image_outcomes(spec: T2ISpec, adapter: Path, held, seeds: Sequence[int], root: Path, device: str,
                   batch_size: int, baseline: Path | None = None) -> Outcomes:
    from cyclepref.cycle import Context, t2i_hash

    k = len(seeds)
    gen_seeds = image_seeds(held.input_ids, t2i_hash(Context(Path(root), device), spec), seeds)
    prompts = [p for p in held.prompts for _ in range(k)]
    images = images_with_adapters(spec, [None, adapter, *([baseline] if baseline else [])], prompts, gen_seeds,
                                  device, batch_size)
    return Outcomes("t2i", [i for i in held.input_ids for _ in range(k)], k, images[0], prompts, images[1], prompts,
                    images[2] if baseline else None, prompts if baseline else None)


def examples(o: Outcomes) -> list[tuple[Image.Image, str]]:
    """A few (image, "before | after") examples; T2I shows the first seed of each prompt."""
    if o.task == "i2t":
        return [(im, f"before: {x} | after: {y}")
                for im, x, y in zip(o.images_before, o.texts_before, o.texts_after, strict=True)][:8]
    step = o.per_input
    return [e for x, y, p in zip(o.images_before[::step], o.images_after[::step], o.texts_before[::step], strict=True)
            for e in ((x, f"before: {p}"), (y, f"after: {p}"))][:8]


def evaluate_task(task: str, spec, adapter: Path, held, evaluator: Evaluator, second: Evaluator | None, root: Path,
                  device: str, cfg: EvaluateDownstream,
                  baseline: Path | None = None) -> tuple[dict, list[tuple[Image.Image, str]]]:
    """The task's report section (the evaluator's numbers, the second evaluator's beside; with `baseline`, the
    SFT-only adapter's numbers too) and a few examples."""
    if task == "i2t":
        outcomes = caption_outcomes(spec, adapter, held, device, cfg.batch_size, baseline)
    else:
        outcomes = image_outcomes(spec, adapter, held, cfg.seeds, root, device, cfg.batch_size, baseline)
    report = judge(outcomes, evaluator, cfg.confidence, cfg.bootstrap_samples)
    report |= {"changed": outcomes.changed(), "heldout": held.source}
    if task == "t2i":
        report["seeds"] = list(cfg.seeds)
    if second is not None:
        report["second_evaluator"] = {"name": second.name,
                                      **judge(outcomes, second, cfg.confidence, cfg.bootstrap_samples)}
    return report, examples(outcomes)
