"""Arrivals in the sandbox: new world scenes rendered into the retraining flow's watch folder (`cyclepref arrivals`).

Scenes come from the `pipeline` part of the world (cyclepref.world.data: disjoint by construction from the frozen
benchmark's and the world models' training scenes), drawn from a stream with a new seed, leaving out make_world's
scenes and every earlier arrival. Each call writes `arrivals-<seed>/scene-<i>.png`, appends their rows (file, prompt =
a paraphrase, caption = the canonical caption, objects = the true scene, which travels with the row into the pool for
the ground-truth evaluators: cyclepref.world.truth) to the watch folder's texts.jsonl, and records the ground truth in
`.arrivals/<seed>.jsonl` (which also tells the next call which seeds and scenes are taken).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from cyclepref.atomic import atomic_path
from cyclepref.world.data import scenes
from cyclepref.world.scene import caption, paraphrase, render, scene_from_record, scene_record

FIRST_SEED = 1000
LOG = ".arrivals"


def taken_scenes(watch: Path) -> tuple[set[int], set[str]]:
    """Seeds and canonical captions of the earlier arrivals recorded in watch/.arrivals/."""
    seeds, captions = set(), set()
    for path in (watch / LOG).glob("*.jsonl"):
        if path.stem.isdigit():
            seeds.add(int(path.stem))
            captions |= {caption(scene_from_record(json.loads(line)["objects"]))
                         for line in path.read_text().splitlines() if line.strip()}
    return seeds, captions


def render_arrivals(watch: Path, n: int, world_n: int, world_seed: int, seed: int | None = None) -> dict:
    """Render `n` new scenes into `watch` (see the module docstring); their count, seed and folder."""
    watch = Path(watch)
    used, taken = taken_scenes(watch)
    seed = max(used | {FIRST_SEED - 1}) + 1 if seed is None else seed
    if seed in used or seed == world_seed:
        raise ValueError(f"seed {seed} was used before (make_world or an earlier arrival); pick another")
    taken |= {caption(s) for s in scenes("pipeline", world_n, world_seed)}
    drawn = [s for s in scenes("pipeline", n + len(taken), seed) if caption(s) not in taken][:n]
    folder = f"arrivals-{seed}"
    (watch / folder).mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"prompts:arrivals:{seed}")
    rows, truth = [], []
    for i, s in enumerate(drawn):
        name = f"{folder}/scene-{i:05d}.png"
        render(s).save(watch / name, format="PNG", optimize=False)
        rows.append({"file": name, "prompt": paraphrase(s, rng), "caption": caption(s), "objects": scene_record(s)})
        truth.append({"file": name, "objects": scene_record(s)})
    texts = watch / "texts.jsonl"
    before = texts.read_text() if texts.is_file() and not texts.is_symlink() else ""
    with atomic_path(texts) as tmp:
        tmp.write_text(before + "".join(json.dumps(r) + "\n" for r in rows))
    with atomic_path(watch / LOG / f"{seed}.jsonl") as tmp:
        tmp.write_text("".join(json.dumps(t) + "\n" for t in truth))
    return {"scenes": len(drawn), "seed": seed, "folder": folder}
