"""Web-like alt-text of world scenes: what the sandbox's judges (CLIP, the BLIP backbone) are pretrained on.

Real CLIP and BLIP learn from web alt-text, which is short, partial, order-free and sometimes wrong (PAPER.md 8);
contrastive training on such text makes them behave like bags of words. The world's alt-text mirrors that, at
stated rates (ALT_TEXT):
- each object is named with probability `mention` (at least one object is always named): alt-text names the salient
  things, not the whole scene;
- size is dropped with probability `drop_size`, position with probability `drop_position`: alt-text rarely says
  where or how big;
- the named objects are listed in random order, without the scene's reading order;
- with probability `wrong` one named object gets a wrong colour or shape: alt-text is sometimes simply wrong;
- with probability `off_topic` the text names no object at all ("a picture", "shapes"): unrelated alt-text.
Captioners and the text-to-image decoder keep the dense canonical captions and paraphrases (real captioners and
SD3 are trained on dense recaptioned data).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from cyclepref.world.scene import COLOURS, POSITION_SYNONYMS, SHAPES, SIZE_SYNONYMS, WorldObject


@dataclass(frozen=True)
class AltTextRates:
    mention: float = 0.6
    drop_size: float = 0.6
    drop_position: float = 0.7
    wrong: float = 0.1
    off_topic: float = 0.05


ALT_TEXT = AltTextRates()
OFF_TOPIC = ("a picture", "shapes", "image", "simple shapes on white", "a drawing")
LIST_TEMPLATES = ("{items}", "{items} on white", "shapes: {items}", "a picture of {items}", "there is {items}")
PLACES = ("at the {pos}", "in the {pos} corner")


def _phrase(o: WorldObject, rng: random.Random, rates: AltTextRates) -> str:
    colour, shape = o.colour, o.shape
    if rng.random() < rates.wrong:
        if rng.random() < 0.5:
            colour = rng.choice([c for c in COLOURS if c != colour])
        else:
            shape = rng.choice([s for s in SHAPES if s != shape])
    words = [colour, shape]
    if rng.random() >= rates.drop_size:
        words.insert(0, rng.choice(SIZE_SYNONYMS[o.size]))
    text = " ".join(words)
    if rng.random() >= rates.drop_position:
        text += " " + rng.choice(PLACES).format(pos=rng.choice(POSITION_SYNONYMS[o.position]))
    return text


def alt_text(scene: tuple[WorldObject, ...], rng: random.Random, rates: AltTextRates = ALT_TEXT) -> str:
    """One web-like description of `scene` (see the module docstring for what it keeps and what it loses)."""
    if rng.random() < rates.off_topic:
        return rng.choice(OFF_TOPIC)
    named = [o for o in scene if rng.random() < rates.mention] or [rng.choice(scene)]
    rng.shuffle(named)
    phrases = [_phrase(o, rng, rates) for o in named]
    items = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
    return rng.choice(LIST_TEMPLATES).format(items=items) + rng.choice(("", "."))

