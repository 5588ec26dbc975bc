"""Stage make_world: render the sandbox's pipeline inputs into world.inputs_dir.

Writes one PNG per scene, texts.jsonl (file, prompt = a paraphrase, caption = the canonical caption) for
prepare_inputs, and scenes.jsonl (file, objects): the ground truth that the sandbox report judges by.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from cyclepref import stage
from cyclepref.config import Params, require
from cyclepref.store import atomic_dir
from cyclepref.world.data import scenes
from cyclepref.world.scene import caption, paraphrase, render, scene_record
from cyclepref.world.truth import SCENES_FILE


def write_scenes(out: Path, drawn: list, seed: int) -> None:
    rng = random.Random(f"prompts:{seed}")
    texts, truth = [], []
    for i, s in enumerate(drawn):
        name = f"scene-{i:05d}.png"
        render(s).save(out / name, format="PNG", optimize=False)
        texts.append({"file": name, "prompt": paraphrase(s, rng), "caption": caption(s)})
        truth.append({"file": name, "objects": scene_record(s)})
    (out / "texts.jsonl").write_text("".join(json.dumps(t) + "\n" for t in texts))
    (out / SCENES_FILE).write_text("".join(json.dumps(t) + "\n" for t in truth))


def run(params: Params, root: Path) -> dict:
    world = require(params.world, "world")
    drawn = scenes("pipeline", world.inputs.n, world.inputs.seed)
    with atomic_dir(root / world.inputs_dir) as tmp:
        write_scenes(tmp, drawn, world.inputs.seed)
    return {"scenes": len(drawn), "objects": sum(len(s) for s in drawn)}


def main() -> None:
    stage.main("make_world", run)


if __name__ == "__main__":
    main()
