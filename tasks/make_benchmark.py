"""Stage make_benchmark: the frozen ground-truth benchmark of the sandbox (cyclepref.world.benchmark).

Held-out scenes (never in the world models' training data nor in the pipeline's inputs), candidates from every
world model, labels from ground truth, raw cycle scores from the best model of each ladder (the backward models of
the default profile). It depends on the `world` section alone, so every profile shares it. Written to data/benchmarks/sandbox/ (pairs.jsonl + images/), committed to git, digest in
reports/world/benchmark.json.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from cyclepref import runtime, stage
from cyclepref.config import Params, require
from cyclepref.models import local_spec
from cyclepref.store import atomic_dir
from cyclepref.world import benchmark as bm
from cyclepref.world.data import scenes

OUT = Path("data/benchmarks/sandbox")
REPORT = Path("reports/world/benchmark.json")


def run(params: Params, root: Path) -> dict:
    from cyclepref.config import ImageMetricSpec, TextMetricSpec
    from cyclepref.models.captioner import make_captioner
    from cyclepref.models.similarity import ImageSimilarity, TextSimilarity
    from cyclepref.models.t2i import TextToImage

    world = require(params.world, "world")
    b, device, bs = world.benchmark, runtime.device(), 32
    cap_specs, t2i_specs = bm.world_models(world)
    images, prompts, truths = bm.scene_inputs(scenes("benchmark", b.n, b.seed), b.seed)
    captioners = [make_captioner(local_spec(root, c), device) for c in cap_specs]
    t2i_models = [TextToImage(local_spec(root, m), device) for m in t2i_specs]
    caps = bm.caption_candidates(captioners, images, truths, bs)
    imgs = bm.image_candidates(t2i_models, prompts, truths, b.seeds, bs)
    clip = ImageSimilarity(ImageMetricSpec(kind="open_clip", path=f"{bm.MODELS_DIR}/clip"), device)
    bm.i2t_cycle(caps, images, t2i_models[-1], clip, bs)
    bm.t2i_cycle(imgs, prompts, captioners[-1], TextSimilarity(TextMetricSpec(path=b.sbert), device), bs)
    i2t_pairs, t2i_pairs = bm.labelled_pairs(caps, bm.MIN_GAP), bm.labelled_pairs(imgs, bm.MIN_GAP)
    with atomic_dir(root / OUT) as tmp:
        counts = bm.write_records(tmp, i2t_pairs, t2i_pairs, images, prompts)
    digest = hashlib.sha256((root / OUT / "pairs.jsonl").read_bytes()).hexdigest()
    (root / REPORT).parent.mkdir(parents=True, exist_ok=True)
    (root / REPORT).write_text(json.dumps({**counts, "pairs_sha256": digest}, indent=2) + "\n")
    return counts


def main() -> None:
    stage.main("make_benchmark", run)


if __name__ == "__main__":
    main()
