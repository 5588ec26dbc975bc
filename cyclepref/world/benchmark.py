"""The frozen ground-truth benchmark of the sandbox: held-out scenes, candidates from the world models, labels from
ground truth.

I2T: every captioner of the profile captions every benchmark image (greedy); T2I: every text-to-image model renders
every benchmark prompt once per seed. Two candidates of one scene form a pair when their ground-truth F1 differs by at
least `min_gap`; the chosen one is the truly better one. Each pair also carries its raw cycle scores (the
profile's backward model and similarity), so raw cycle consistency is scored on exactly the same pairs.
The output follows the pair format of cyclepref.reward.benchmarks (pairs.jsonl + images/).
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from cyclepref.config import CaptionerSpec, T2ISpec
from cyclepref.models.captioner import clean_caption
from cyclepref.world.parse import Parsed, as_parsed
from cyclepref.world.scene import IMAGE_SIZE, paraphrase, render
from cyclepref.world.truth import caption_quality, image_quality
from cyclepref.workstore import key_of, seed_of

MIN_GAP = 0.05


MODELS_DIR = "data/world/models"


def world_models(world) -> tuple[list[CaptionerSpec], list[T2ISpec]]:
    """The world's captioner and text-to-image ladders as model specs, weakest first."""
    b = world.benchmark
    caps = [CaptionerSpec(name=f"world-cap-{s}", path=f"{MODELS_DIR}/captioner/step-{s}", family="llava",
                          max_new_tokens=b.max_new_tokens) for s in world.train.captioner.steps]
    t2i = [T2ISpec(name=f"world-sd-{s}", path=f"{MODELS_DIR}/t2i/step-{s}", family="sd", steps=b.steps,
                   guidance=b.guidance, height=IMAGE_SIZE, width=IMAGE_SIZE) for s in world.train.t2i.steps]
    return caps, t2i


@dataclass
class Candidate:
    scene: int
    model: str
    content: str | Image.Image
    truth_f1: float
    cycle: float | None = None


def save_png(image: Image.Image, images_dir: Path) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=False)
    name = hashlib.sha256(buf.getvalue()).hexdigest()[:16] + ".png"
    (images_dir / name).write_bytes(buf.getvalue())
    return f"images/{name}"


def caption_candidates(captioners, images: list[Image.Image], truths: list[Parsed], batch_size: int) -> list:
    out = []
    for cap in captioners:
        texts = [clean_caption(t) for t in cap.caption(images, batch_size=batch_size)]
        out += [Candidate(i, cap.spec.name, t, caption_quality(t, truths[i])) for i, t in enumerate(texts)]
    return out


def image_candidates(models, prompts: list[str], truths: list[Parsed], seeds: list[int], batch_size: int) -> list:
    out = []
    for model in models:
        for seed in seeds:
            keys = [key_of("benchmark", model.spec.name, p, seed) for p in prompts]
            images = model.generate(prompts, [seed_of(k) for k in keys], batch_size=batch_size)
            out += [Candidate(i, model.spec.name, im, image_quality(im, truths[i])) for i, im in enumerate(images)]
    return out


def i2t_cycle(cands: list, originals: list[Image.Image], backward, similarity, batch_size: int) -> None:
    """Reconstruct each caption with the backward text-to-image model; score it against the original image."""
    texts = [c.content for c in cands]
    seeds = [seed_of(key_of("benchmark-reconstruct", c.scene, c.content)) for c in cands]
    recons = backward.generate(texts, seeds, batch_size=batch_size)
    orig = similarity.embed(originals)
    scores = similarity.compare(orig[[c.scene for c in cands]], similarity.embed(recons))
    sign = 1.0 if similarity.direction == "higher" else -1.0
    for c, s in zip(cands, scores.tolist(), strict=True):
        c.cycle = sign * s


def t2i_cycle(cands: list, prompts: list[str], captioner, similarity, batch_size: int) -> None:
    """Back-caption each image with the backward captioner; score it against the prompt."""
    back = [clean_caption(t) for t in captioner.caption([c.content for c in cands], batch_size=batch_size)]
    scores = similarity.compare(similarity.embed([prompts[c.scene] for c in cands]), similarity.embed(back))
    for c, s in zip(cands, scores.tolist(), strict=True):
        c.cycle = s


def labelled_pairs(cands: list, min_gap: float) -> list[tuple[Candidate, Candidate]]:
    """(chosen, rejected) for every two candidates of a scene whose ground-truth F1 differs by >= min_gap."""
    by_scene: dict[int, list[Candidate]] = {}
    for c in cands:
        by_scene.setdefault(c.scene, []).append(c)
    pairs = []
    for group in by_scene.values():
        for a, b in itertools.combinations(group, 2):
            if isinstance(a.content, str) and a.content.strip().lower() == b.content.strip().lower():
                continue
            if abs(a.truth_f1 - b.truth_f1) >= min_gap:
                pairs.append((a, b) if a.truth_f1 > b.truth_f1 else (b, a))
    return pairs


def scene_inputs(scenes: list, seed: int) -> tuple[list[Image.Image], list[str], list[Parsed]]:
    rng = random.Random(f"benchmark-prompts:{seed}")
    return [render(s) for s in scenes], [paraphrase(s, rng) for s in scenes], [as_parsed(s) for s in scenes]


def write_records(out: Path, i2t: list, t2i: list, images: list[Image.Image], prompts: list[str]) -> dict:
    """pairs.jsonl in the benchmark pair format; images written once each under out/images/."""
    images_dir = out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    originals = [save_png(im, images_dir) for im in images]
    rows = []
    for n, (ch, rj) in enumerate(i2t):
        rows.append({"id": f"i2t-{n:05d}", "task": "i2t", "image": originals[ch.scene], "chosen": ch.content,
                     "rejected": rj.content, "group": f"scene-{ch.scene}", "chosen_cycle_score": ch.cycle,
                     "rejected_cycle_score": rj.cycle, "cycle_direction": "higher",
                     "meta": {"chosen_f1": ch.truth_f1, "rejected_f1": rj.truth_f1, "chosen_model": ch.model,
                              "rejected_model": rj.model}})
    for n, (ch, rj) in enumerate(t2i):
        rows.append({"id": f"t2i-{n:05d}", "task": "t2i", "prompt": prompts[ch.scene],
                     "chosen": save_png(ch.content, images_dir), "rejected": save_png(rj.content, images_dir),
                     "group": f"scene-{ch.scene}", "chosen_cycle_score": ch.cycle, "rejected_cycle_score": rj.cycle,
                     "cycle_direction": "higher",
                     "meta": {"chosen_f1": ch.truth_f1, "rejected_f1": rj.truth_f1, "chosen_model": ch.model,
                              "rejected_model": rj.model}})
    (out / "pairs.jsonl").write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    return {"i2t_pairs": len(i2t), "t2i_pairs": len(t2i), "scenes": len(images)}
