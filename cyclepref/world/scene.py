"""Scenes of 1-3 flat shapes on a 2x2 grid, rendered with PIL, and their captions.

An object is (shape, colour, size, position); a scene holds at most one object per grid cell. The canonical
caption lists the objects in reading order ("a large red circle at the top left, a small blue square at the bottom
right."); paraphrases reorder the objects and use other templates and synonyms, with the same meaning.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 30),
    "purple": (150, 60, 190),
    "orange": (245, 135, 30),
}
SIZES = ("small", "large")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
ATTRIBUTES = ("shape", "colour", "size", "position")
BACKGROUND = (255, 255, 255)
IMAGE_SIZE = 32
HALF_EXTENT = {"small": 3, "large": 6}
MAX_OBJECTS = 3


@dataclass(frozen=True)
class WorldObject:
    position: str
    shape: str
    colour: str
    size: str

    def phrase(self, size_word: str | None = None) -> str:
        return f"{size_word or self.size} {self.colour} {self.shape}"


def generate_scene(rng: random.Random) -> tuple[WorldObject, ...]:
    """1-3 objects in distinct cells, attributes uniform and independent; sorted in reading order."""
    n = rng.randint(1, MAX_OBJECTS)
    cells = rng.sample(POSITIONS, n)
    objs = [WorldObject(p, rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(SIZES)) for p in cells]
    return tuple(sorted(objs, key=lambda o: POSITIONS.index(o.position)))


def generate_scenes(n: int, seed: int) -> list[tuple[WorldObject, ...]]:
    """`n` scenes; scene i depends only on (seed, i)."""
    return [generate_scene(random.Random(f"world:{seed}:{i}")) for i in range(n)]


def cell_centre(position: str, size: int = IMAGE_SIZE) -> tuple[int, int]:
    i = POSITIONS.index(position)
    cell = size // 2
    return (i % 2) * cell + cell // 2, (i // 2) * cell + cell // 2


def render(scene: tuple[WorldObject, ...], size: int = IMAGE_SIZE) -> Image.Image:
    """Flat colours, no anti-aliasing, every object centred on a whole pixel of its cell."""
    img = Image.new("RGB", (size, size), BACKGROUND)
    draw = ImageDraw.Draw(img)
    scale = size / IMAGE_SIZE
    for o in scene:
        cx, cy = cell_centre(o.position, size)
        h = round(HALF_EXTENT[o.size] * scale)
        fill = COLOURS[o.colour]
        if o.shape == "circle":
            draw.ellipse([cx - h, cy - h, cx + h, cy + h], fill=fill)
        elif o.shape == "square":
            draw.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
        else:
            draw.polygon([(cx, cy - h), (cx - h, cy + h), (cx + h, cy + h)], fill=fill)
    return img


def caption(scene: tuple[WorldObject, ...]) -> str:
    """The canonical dense caption."""
    return _join([f"a {o.phrase()} at the {o.position}" for o in scene]) + "."


SIZE_SYNONYMS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
POSITION_SYNONYMS = {
    "top left": ("top left", "upper left"),
    "top right": ("top right", "upper right"),
    "bottom left": ("bottom left", "lower left"),
    "bottom right": ("bottom right", "lower right"),
}
TEMPLATES = (
    "a {obj} at the {pos}",
    "a {obj} in the {pos} corner",
    "{pos}: a {obj}",
    "there is a {obj} at the {pos}",
)


def paraphrase(scene: tuple[WorldObject, ...], rng: random.Random) -> str:
    """The same objects in random order, each with a random template and synonyms."""
    objs = list(scene)
    rng.shuffle(objs)
    parts = []
    for o in objs:
        template = rng.choice(TEMPLATES)
        obj = o.phrase(rng.choice(SIZE_SYNONYMS[o.size]))
        parts.append(template.format(obj=obj, pos=rng.choice(POSITION_SYNONYMS[o.position])))
    return _join(parts) + "."


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def scene_record(scene: tuple[WorldObject, ...]) -> list[dict]:
    return [asdict(o) for o in scene]


def scene_from_record(objects: list[dict]) -> tuple[WorldObject, ...]:
    return tuple(sorted((WorldObject(**o) for o in objects), key=lambda o: POSITIONS.index(o.position)))
