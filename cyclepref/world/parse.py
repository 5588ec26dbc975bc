"""Ground-truth judges of the sandbox world: captions and images parsed back into objects, scored by F1.

parse_caption reads the world's vocabulary clause by clause (every template and synonym of scene.py, in any order);
parse_image segments an image by nearest palette colour, cell by cell, and reads shape from how much of its
bounding box an object fills and size from its extent. `f1` compares two object lists attribute by attribute.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence

import numpy as np
from PIL import Image

from cyclepref.world.scene import (
    ATTRIBUTES,
    BACKGROUND,
    COLOURS,
    IMAGE_SIZE,
    POSITION_SYNONYMS,
    POSITIONS,
    SHAPES,
    SIZE_SYNONYMS,
    WorldObject,
)

Parsed = tuple[dict[str, str | None], ...]

_CLAUSE = re.compile(r",|;|\.|\band\b|\bthere is\b")
_WORDS = {
    "shape": {s: s for s in SHAPES},
    "colour": {c: c for c in COLOURS},
    "size": {w: s for s, ws in SIZE_SYNONYMS.items() for w in ws},
    "position": {w: p for p, ws in POSITION_SYNONYMS.items() for w in ws},
}


def _find(clause: str, attribute: str) -> str | None:
    best = None
    for word, value in _WORDS[attribute].items():
        m = re.search(rf"\b{word}\b", clause)
        if m and (best is None or m.start() < best[0]):
            best = (m.start(), value)
    return best[1] if best else None


def parse_caption(text: str) -> Parsed:
    """One object per clause that names a shape or a colour; attributes a clause does not name are None."""
    objects = []
    for clause in _CLAUSE.split(text.lower()):
        obj = {a: _find(clause, a) for a in ATTRIBUTES}
        if obj["shape"] or obj["colour"]:
            objects.append(obj)
    return tuple(objects)


def as_parsed(scene: Sequence[WorldObject]) -> Parsed:
    return tuple({a: getattr(o, a) for a in ATTRIBUTES} for o in scene)


def f1(predicted: Parsed, truth: Parsed) -> float:
    """Attribute-level F1: objects matched one to one to maximise equal attributes; precision = equal attributes /
    (4 x predicted objects), recall = equal attributes / (4 x true objects). Two empty lists score 1."""
    if not predicted and not truth:
        return 1.0
    if not predicted or not truth:
        return 0.0
    small, large = (predicted, truth) if len(predicted) <= len(truth) else (truth, predicted)
    best = max(
        sum(sum(a[k] is not None and a[k] == b[k] for k in ATTRIBUTES) for a, b in zip(small, perm, strict=False))
        for perm in itertools.permutations(large, len(small))
    )
    precision, recall = best / (4 * len(predicted)), best / (4 * len(truth))
    return 0.0 if best == 0 else 2 * precision * recall / (precision + recall)


_PALETTE = np.array([BACKGROUND, *COLOURS.values()], dtype=np.float32)
_NAMES = [None, *COLOURS]
MIN_PIXELS = 6
SQUARE_FILL, TRIANGLE_FILL = 0.9, 0.66
LARGE_EXTENT = 10


def parse_image(image: Image.Image) -> Parsed:
    """The objects of a world image: per grid cell, the most frequent non-background palette colour (nearest
    colour per pixel) if it covers at least MIN_PIXELS pixels; shape from its bounding-box fill ratio (square ~1,
    circle ~0.8, triangle ~0.5), size from its larger extent."""
    img = np.asarray(image.convert("RGB").resize((IMAGE_SIZE, IMAGE_SIZE), Image.NEAREST), dtype=np.float32)
    labels = ((img[:, :, None, :] - _PALETTE) ** 2).sum(-1).argmin(-1)
    cell = IMAGE_SIZE // 2
    objects = []
    for i, position in enumerate(POSITIONS):
        y0, x0 = (i // 2) * cell, (i % 2) * cell
        block = labels[y0 : y0 + cell, x0 : x0 + cell]
        counts = np.bincount(block.ravel(), minlength=len(_PALETTE))
        counts[0] = 0
        colour = int(counts.argmax())
        if counts[colour] < MIN_PIXELS:
            continue
        ys, xs = np.nonzero(block == colour)
        h, w = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
        fill = counts[colour] / (h * w)
        shape = "square" if fill >= SQUARE_FILL else "circle" if fill >= TRIANGLE_FILL else "triangle"
        size = "large" if max(h, w) >= LARGE_EXTENT else "small"
        objects.append({"position": position, "shape": shape, "colour": _NAMES[colour], "size": size})
    return tuple(objects)
