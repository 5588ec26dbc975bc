"""A synthetic, learnable preference set: solid-colour images against captions naming a colour.

I2T: an image of colour c; chosen = "a photo of a <c> square", rejected names another colour.
T2I: the prompt "a <c> square"; chosen = an image of colour c, rejected = an image of another colour.
Every image is jittered and noised per item, so held-out sets (another seed) contain unseen images.
"""

from __future__ import annotations

import random

import numpy as np
from PIL import Image

from cyclepref.reward import Task
from cyclepref.reward.data import ListPairSet, PairExample

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (230, 210, 40),
    "black": (15, 15, 15),
    "white": (240, 240, 240),
}


def colour_image(rgb: tuple[int, int, int], rng: random.Random, size: int = 32) -> Image.Image:
    base = np.array(rgb, dtype=np.float32) + np.array([rng.uniform(-20, 20) for _ in range(3)], dtype=np.float32)
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0.0, 8.0, size=(size, size, 3)).astype(np.float32)
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8), "RGB")


def colour_pairs(task: Task, n: int, seed: int, size: int = 32) -> ListPairSet:
    """n pairs of one task; the oriented cycle scores are set so the raw-cycle baseline agrees with the labels."""
    rng = random.Random(f"{task}/{seed}")
    names = sorted(COLOURS)
    examples = []
    for i in range(n):
        good, bad = rng.sample(names, 2)
        pid = f"{task}-{seed}-{i}"
        if task == "i2t":
            image = colour_image(COLOURS[good], rng, size)
            examples.append(
                PairExample(pid, task, pid, image, None, f"a photo of a {good} square", f"a photo of a {bad} square")
            )
        else:
            chosen, rejected = colour_image(COLOURS[good], rng, size), colour_image(COLOURS[bad], rng, size)
            examples.append(PairExample(pid, task, pid, None, f"a {good} square", chosen, rejected))
    return ListPairSet(task, examples, (np.ones(n), np.zeros(n)))


class SyntheticPairSource:
    """A PairSource over colour_pairs: train/valid/test are independent draws (different seeds)."""

    def __init__(self, sizes: dict[str, int], seed: int = 0, image_size: int = 32):
        self.sizes, self.seed, self.image_size = sizes, seed, image_size
        self._cache: dict[tuple[str, str], ListPairSet] = {}

    def pairs(self, task: Task, split: str) -> ListPairSet:
        key = (task, split)
        if key not in self._cache:
            offset = {"train": 0, "valid": 1, "test": 2}[split]
            self._cache[key] = colour_pairs(task, self.sizes[split], self.seed * 10 + offset, self.image_size)
        return self._cache[key]

    def digest(self) -> str:
        return f"synthetic:{sorted(self.sizes.items())}:{self.seed}:{self.image_size}"
