"""Benchmark: each cycle stage batched (as cyclepref runs it) vs a per-item loop written the way the authors'
release does it (one model call per image / caption / pair, the original re-embedded for every pair).

One process, the tiny offline models (built into a temporary directory), arms interleaved and sized by
bench/harness.py; peak RSS of each arm's warm-up call is recorded. The captioning workload is generate_i2t's and
reconstruct_t2i's, the rendering workload generate_t2i's and reconstruct_i2t's (the same model calls).
    python bench/bench_cycle.py [--items 16] [--repeats 5] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
import harness  # noqa: E402


def workloads(items: int, tmp: Path) -> dict:
    """stage(s) -> (batched, per-item) callables on `items` inputs."""
    import torch
    from PIL import Image

    from cyclepref.config import CaptionerSpec, ImageMetricSpec, T2ISpec, TextMetricSpec
    from cyclepref.models import zoo
    from cyclepref.models.captioner import Captioner
    from cyclepref.models.similarity import ImageSimilarity, TextSimilarity
    from cyclepref.models.t2i import TextToImage

    for name in ("llava", "sd", "open_clip", "sbert"):
        zoo.build(name, tmp, seed=0, image_size=32)
    photos = sorted((ROOT / "data/inputs/images").glob("*.jpg"))
    images = [Image.open(photos[i % len(photos)]).convert("RGB") for i in range(items)]
    texts = [json.loads(line)["prompt"] for line in (ROOT / "data/inputs/texts.jsonl").read_text().splitlines()]
    prompts = [texts[i % len(texts)] + f" #{i}" for i in range(items)]
    seeds = list(range(items))
    bs = 16
    captioner = Captioner(CaptionerSpec(name="c", path=str(tmp / "tiny-llava"), family="llava", max_new_tokens=24))
    t2i = TextToImage(T2ISpec(name="g", path=str(tmp / "tiny-sd"), family="sd", steps=4, guidance=7.5, height=32,
                              width=32))
    image_sim = ImageSimilarity(ImageMetricSpec(kind="open_clip", path=str(tmp / "tiny-open-clip")))
    text_sim = TextSimilarity(TextMetricSpec(path=str(tmp / "all-MiniLM-L6-v2")))
    recons = t2i.generate(prompts, seeds, bs)
    originals = [images[i // 4] for i in range(items)]
    back = captioner.caption(recons, bs)

    def score_images_batched():
        emb = image_sim.embed(images[: items // 4 or 1], bs)
        orig = torch.stack([emb[i // 4] for i in range(items)])
        image_sim.compare(orig, image_sim.embed(recons, bs))

    def score_images_per_pair():
        for o, r in zip(originals, recons, strict=True):
            image_sim.compare(image_sim.embed([o]), image_sim.embed([r]))

    def score_texts_batched():
        text_sim.compare(text_sim.embed(prompts, 64), text_sim.embed(back, 64))

    def score_texts_per_pair():
        for p, b in zip(prompts, back, strict=True):
            text_sim.compare(text_sim.embed([p]), text_sim.embed([b]))

    return {
        "generate_i2t+reconstruct_t2i (caption)": (
            lambda: captioner.caption(images, bs), lambda: [captioner.caption([im]) for im in images]),
        "generate_t2i+reconstruct_i2t (render)": (
            lambda: t2i.generate(prompts, seeds, bs),
            lambda: [t2i.generate([p], [s]) for p, s in zip(prompts, seeds, strict=True)]),
        "score_i2t": (score_images_batched, score_images_per_pair),
        "score_t2i": (score_texts_batched, score_texts_per_pair),
    }


def run(items: int = 16, repeats: int = 5, min_s: float = 1.0, echo=print) -> dict:
    with tempfile.TemporaryDirectory(prefix="cyclepref-bench-") as tmp:
        stages = {}
        for stage, (batched, per_item) in workloads(items, Path(tmp)).items():
            r = harness.compare({"batched": batched, "per_item": per_item}, ("per_item", "batched"), repeats, min_s,
                                memory=True)
            stages[stage] = r
            echo(f"{stage:40s} x{r['ratio']['median']:6.2f} [{r['ratio']['min']:.2f}, {r['ratio']['max']:.2f}] "
                 f"load {r['load_average_before'][0]}")
    return {
        "what": "batched stage vs the authors' per-item loop; ratio = per-item seconds / batched seconds",
        "items": items,
        "batch_size": 16,
        "models": "tiny offline zoo (llava, sd 32 px 4 steps, open_clip, all-MiniLM-L6-v2), CPU float32",
        "stages": stages,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    report = {"machine": harness.machine(), **run(args.items, args.repeats)}
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
