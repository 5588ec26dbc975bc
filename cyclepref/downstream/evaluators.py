"""Evaluators of downstream outcomes behind one call, `score(input_ids, images, texts) -> float64[B]`, for aligned
(input, image, text) outcomes; higher is better.

ground_truth  the sandbox's known scenes (cyclepref.world.truth). I2T: attribute F1 of the caption against the true
              scene of its input image. T2I: attribute F1 of the objects parsed from the image against the true scene
              of its input, which its prompt describes.
model         a verifier (cyclepref.downstream.verifiers) of the (image, text) pair; input ids are not used. It is
              model-judged: the reward model favours what was trained on its own preferences.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

from cyclepref.tables import PATHS
from cyclepref.world.parse import Parsed
from cyclepref.world.truth import caption_quality, image_quality, load_truth

GROUND_TRUTH = "ground_truth"
BOOTSTRAP_SEED = 0


class Evaluator(Protocol):
    name: str

    def score(self, input_ids: Sequence[str], images: Sequence[Image.Image], texts: Sequence[str]) -> np.ndarray: ...


class GroundTruth:
    name = GROUND_TRUTH

    def __init__(self, truth: Mapping[str, Parsed], task: str):
        if task not in ("i2t", "t2i"):
            raise ValueError(f"unknown task {task!r}")
        self.truth, self.task = truth, task

    def scenes(self, input_ids: Sequence[str]) -> list[Parsed]:
        missing = sorted({i for i in input_ids if i not in self.truth})
        if missing:
            raise ValueError(
                f"{len(missing)} evaluated inputs have no true scene (first: {missing[:3]}); ground truth covers "
                f"{len(self.truth)} inputs: point `truth` at the sandbox input folder these inputs were prepared from"
            )
        return [self.truth[i] for i in input_ids]

    def score(self, input_ids: Sequence[str], images: Sequence[Image.Image], texts: Sequence[str]) -> np.ndarray:
        scenes = self.scenes(input_ids)
        if self.task == "i2t":
            return np.array([caption_quality(t, s) for t, s in zip(texts, scenes, strict=True)], dtype=np.float64)
        return np.array([image_quality(im, s) for im, s in zip(images, scenes, strict=True)], dtype=np.float64)


class ModelEvaluator:
    def __init__(self, verifier):
        self.verifier, self.name = verifier, verifier.name

    def score(self, input_ids: Sequence[str], images: Sequence[Image.Image], texts: Sequence[str]) -> np.ndarray:
        return self.verifier.score(list(images), list(texts)).double().numpy()


def interval_method(section) -> dict:
    """How a report's intervals are computed (`section`: params best_of_n or evaluate_downstream)."""
    return {"method": "percentile bootstrap over inputs", "confidence": section.confidence,
            "samples": section.bootstrap_samples, "seed": BOOTSTRAP_SEED}


def judged_by(kind: str) -> str:
    return "ground truth" if kind == GROUND_TRUTH else "model"


def ground_truth(root: Path, folder: str, pool: str | None = None) -> dict[str, Parsed]:
    """input_id -> true objects, for the prepared inputs made from the sandbox input `folder` and from the arrivals in
    the input `pool` (both relative to root)."""
    return load_truth(Path(root) / folder, Path(root) / PATHS["inputs"], None if pool is None else Path(root) / pool)


def make_evaluator(kind: str, task: str, verifiers, truth: Mapping[str, Parsed] | None) -> Evaluator:
    """`verifiers`: a cyclepref.downstream.verifiers.Verifiers (loads each model once); `truth` for ground_truth."""
    if kind == GROUND_TRUTH:
        if truth is None:
            raise ValueError("evaluator ground_truth needs the true scenes (params: truth)")
        return GroundTruth(truth, task)
    return ModelEvaluator(verifiers.get(kind, task))
