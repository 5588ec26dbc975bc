"""The policies' frozen ground-truth benchmark: the scenes of the sandbox benchmark (data/benchmarks/sandbox,
tasks/make_benchmark.py), held out of every training set.

Each scene (a pair `group`) gives an input of each policy: the rendered scene image (I2T pairs' `image`) for the
captioner, its prompt (T2I pairs' `prompt`) for the text-to-image model. The truth of a scene is its rendered image
parsed back into objects (cyclepref.world.parse.parse_image, exact on the renderer's clean images: the test suite
checks it against the scenes the benchmark was drawn from). A policy's outcome on a scene is the attribute F1 of its
greedy caption of the image, or of its rendered image of the prompt (one seed per scene, the same for every model),
against that truth: one per-input outcome vector, so the retraining flow's paired test applies unchanged.
Scoring loads the base model once and applies each adapter in turn (cyclepref.downstream.evaluate).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from cyclepref.workstore import key_of, seed_of
from cyclepref.world.parse import Parsed, parse_image
from cyclepref.world.truth import caption_quality, image_quality

TASKS = {"dpo_vlm": "i2t", "diffusion_dpo": "t2i"}


@dataclass(frozen=True)
class PolicyBenchmark:
    """The benchmark's scenes in scene order; `inputs(task)` the scenes one task scores."""

    scenes: list[str]
    images: list[Image.Image]
    prompts: dict[str, str]
    truths: list[Parsed]

    def prompt_scenes(self) -> list[int]:
        return [k for k, s in enumerate(self.scenes) if s in self.prompts]

    def size(self, task: str) -> int:
        return len(self.scenes) if task == "i2t" else len(self.prompt_scenes())


def scene_number(group: str) -> tuple[int, str]:
    tail = group.rsplit("-", 1)[-1]
    return (int(tail), group) if tail.isdigit() else (-1, group)


def load_policy_benchmark(path: Path) -> PolicyBenchmark:
    """Scenes of a sandbox pairs.jsonl: every group with a scene image; prompts of the groups that have one."""
    path = Path(path)
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    image_of = {r["group"]: r["image"] for r in rows if r.get("task") == "i2t"}
    prompts = {r["group"]: r["prompt"] for r in rows if r.get("task") == "t2i"}
    lost = sorted(set(prompts) - set(image_of))
    if not image_of or lost:
        raise ValueError(f"{path}: every scene needs its image (an i2t pair); without: {lost[:3] or 'all'}")
    scenes = sorted(image_of, key=scene_number)
    images = [Image.open(path.parent / image_of[s]).convert("RGB") for s in scenes]
    return PolicyBenchmark(scenes, images, prompts, [parse_image(im) for im in images])


def scene_seeds(scenes: Sequence[str]) -> list[int]:
    """One generator seed per scene, the same for every model compared (paired noise)."""
    return [seed_of(key_of(s, "policy_benchmark")) for s in scenes]


def captioner_outcomes(spec, adapters: Sequence[Path | None], bench: PolicyBenchmark, device: str,
                       batch_size: int) -> list[np.ndarray]:
    """Per-scene caption F1 of the base captioner (adapter None) and of each adapter, one model load."""
    from cyclepref.downstream.evaluate import captions_with_adapters

    texts = captions_with_adapters(spec, adapters, bench.images, device, batch_size)
    return [np.array([caption_quality(t, s) for t, s in zip(ts, bench.truths, strict=True)]) for ts in texts]


def t2i_outcomes(spec, adapters: Sequence[Path | None], bench: PolicyBenchmark, device: str,
                 batch_size: int) -> list[np.ndarray]:
    """Per-scene image F1 of the base text-to-image model (adapter None) and of each adapter, one model load."""
    from cyclepref.downstream.evaluate import images_with_adapters

    keep = bench.prompt_scenes()
    scenes = [bench.scenes[k] for k in keep]
    prompts = [bench.prompts[s] for s in scenes]
    images = images_with_adapters(spec, adapters, prompts, scene_seeds(scenes), device, batch_size)
    truths = [bench.truths[k] for k in keep]
    return [np.array([image_quality(im, t) for im, t in zip(ims, truths, strict=True)]) for ims in images]


def policy_outcomes(stage: str, spec, adapters: Sequence[Path | None], bench: PolicyBenchmark, device: str,
                    batch_size: int) -> list[np.ndarray]:
    """The outcomes of the policy that `stage` trains (dpo_vlm: captioner, diffusion_dpo: text-to-image)."""
    score = captioner_outcomes if TASKS[stage] == "i2t" else t2i_outcomes
    return score(spec, adapters, bench, device, batch_size)
