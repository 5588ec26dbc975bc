"""Which scenes each part of the sandbox may use, and batches of world data for training the world models.

Every scene belongs to one part by a hash of its canonical caption, so no scene is shared across parts however many
are drawn: `benchmark` (the frozen ground-truth benchmark), `pipeline` (the inputs of the default profile) and
`train` (the world models' training data).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator

from cyclepref.world.scene import WorldObject, caption, generate_scene, paraphrase, render

Scene = tuple[WorldObject, ...]
PARTS = {"benchmark": range(0, 2), "pipeline": range(2, 6), "train": range(6, 20)}


def part_of(scene: Scene) -> str:
    bucket = int(hashlib.sha256(caption(scene).encode()).hexdigest(), 16) % 20
    return next(name for name, buckets in PARTS.items() if bucket in buckets)


def scenes(part: str, n: int, seed: int) -> list[Scene]:
    """The first `n` distinct scenes of `part` drawn from the stream seeded by `seed`."""
    if part not in PARTS:
        raise ValueError(f"unknown part {part!r}; known: {sorted(PARTS)}")
    out: list[Scene] = []
    seen: set[str] = set()
    for i in range(1_000_000_000):
        s = generate_scene(random.Random(f"world:{part}:{seed}:{i}"))
        key = caption(s)
        if key not in seen and part_of(s) == part:
            seen.add(key)
            out.append(s)
            if len(out) == n:
                return out
    raise RuntimeError("unreachable")


def training_examples(n: int, seed: int) -> Iterator[tuple]:
    """(image, canonical caption, paraphrase) of `n` training scenes."""
    rng = random.Random(f"paraphrase:{seed}")
    for s in scenes("train", n, seed):
        yield render(s), caption(s), paraphrase(s, rng)


def alt_text_examples(n: int, seed: int) -> Iterator[tuple]:
    """(image, alt-text, another alt-text) of the same `n` training scenes (cyclepref.world.alttext): what the
    world's judges are pretrained on."""
    from cyclepref.world.alttext import alt_text

    rng = random.Random(f"alt-text:{seed}")
    for s in scenes("train", n, seed):
        yield render(s), alt_text(s, rng), alt_text(s, rng)


def zero_unused_rows(embedding, used_ids) -> None:
    """Zero the embedding rows of tokens that never occur in the training texts: they hold only their random
    initialisation, and zeros keep the committed weights small (git compresses them away)."""
    import torch

    keep = torch.zeros(embedding.weight.shape[0], dtype=torch.bool)
    keep[torch.as_tensor(sorted(set(int(i) for i in used_ids)))] = True
    with torch.no_grad():
        embedding.weight[~keep] = 0
