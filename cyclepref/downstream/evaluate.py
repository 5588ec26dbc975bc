"""Before / after comparison of the DPO-trained models on held-out inputs, scored by the profile's evaluator.

I2T: the base captioner and the captioner with the dpo_vlm adapter caption every held-out image (greedy).
T2I: the base text-to-image model and the one with the diffusion_dpo adapter render every held-out prompt with the
same per-item seed. The evaluator (a verifier, cyclepref.downstream.verifiers) scores each (image, text) pair.
The base model is loaded once; the adapter is applied to it after the "before" outputs exist.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from cyclepref.config import CaptionerSpec, T2ISpec
from cyclepref.workstore import key_of, seed_of


def compare(before: Sequence[float], after: Sequence[float]) -> dict:
    """Means, their difference and the after-vs-before win rate (ties count one half)."""
    b, a = np.asarray(before, dtype=np.float64), np.asarray(after, dtype=np.float64)
    if b.shape != a.shape or b.size == 0:
        raise ValueError(f"need equal, non-empty score arrays, got {b.shape} and {a.shape}")
    wins = float(((a > b).sum() + 0.5 * (a == b).sum()) / a.size)
    return {"n": int(a.size), "before": float(b.mean()), "after": float(a.mean()), "delta": float(a.mean() - b.mean()),
            "win_rate": wins}


def captions_before_after(spec: CaptionerSpec, adapter: Path, images: Sequence[Image.Image], device: str,
                          batch_size: int) -> tuple[list[str], list[str]]:
    from cyclepref.downstream.dpo_vlm import apply_adapter
    from cyclepref.models.captioner import Captioner, clean_caption

    captioner = Captioner(spec, device)
    before = [clean_caption(t) for t in captioner.caption(list(images), batch_size=batch_size)]
    apply_adapter(captioner, adapter)
    after = [clean_caption(t) for t in captioner.caption(list(images), batch_size=batch_size)]
    return before, after


def image_seeds(input_ids: Sequence[str], gen_hash: str) -> list[int]:
    return [seed_of(key_of(i, gen_hash, "evaluate_downstream")) for i in input_ids]


def images_before_after(spec: T2ISpec, adapter: Path, prompts: Sequence[str], seeds: Sequence[int], device: str,
                        batch_size: int) -> tuple[list[Image.Image], list[Image.Image]]:
    from cyclepref.downstream.diffusion_dpo import apply_adapter
    from cyclepref.models.t2i import TextToImage

    t2i = TextToImage(spec, device)
    before = t2i.generate(list(prompts), list(seeds), batch_size)
    apply_adapter(t2i, adapter)
    after = t2i.generate(list(prompts), list(seeds), batch_size)
    return before, after


def evaluate_task(task: str, spec, adapter: Path, held, evaluator, root: Path, device: str,
                  batch_size: int) -> tuple[dict, list[tuple[Image.Image, str]]]:
    """The task's report section and a few (image, "before | after") examples."""
    from cyclepref.cycle import Context, t2i_hash

    if task == "i2t":
        before, after = captions_before_after(spec, adapter, held.images, device, batch_size)
        s_before = evaluator.score(held.images, before).numpy()
        s_after = evaluator.score(held.images, after).numpy()
        changed = sum(x != y for x, y in zip(before, after, strict=True))
        examples = [(im, f"before: {x} | after: {y}") for im, x, y in zip(held.images, before, after, strict=True)]
    else:
        seeds = image_seeds(held.input_ids, t2i_hash(Context(Path(root), device), spec))
        before, after = images_before_after(spec, adapter, held.prompts, seeds, device, batch_size)
        s_before = evaluator.score(before, held.prompts).numpy()
        s_after = evaluator.score(after, held.prompts).numpy()
        changed = sum(np.asarray(x).tobytes() != np.asarray(y).tobytes() for x, y in zip(before, after, strict=True))
        examples = [e for x, y, p in zip(before, after, held.prompts, strict=True)
                    for e in ((x, f"before: {p}"), (y, f"after: {p}"))]
    report = {**compare(s_before, s_after), "changed": int(changed), "heldout": held.source}
    return report, examples[:8]
