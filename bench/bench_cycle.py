"""Benchmark: each cycle stage batched (as cyclepref runs it) vs a per-item loop written the way the authors'
release does it (one model call per image / caption / pair, the original re-embedded for every pair).

Runs in one process on the tiny offline models (built into a temporary directory) and writes
bench/results/cycle.json with seconds per variant and the speed-up ratio per stage.
    python bench/bench_cycle.py [--items 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/cycle.json")
    args = ap.parse_args()

    import torch
    from PIL import Image

    from cyclepref.config import CaptionerSpec, ImageMetricSpec, T2ISpec, TextMetricSpec
    from cyclepref.models import zoo
    from cyclepref.models.captioner import Captioner
    from cyclepref.models.similarity import ImageSimilarity, TextSimilarity
    from cyclepref.models.t2i import TextToImage

    tmp = Path(tempfile.mkdtemp(prefix="cyclepref-bench-"))
    for name in ("llava", "sd", "open_clip", "sbert"):
        zoo.build(name, tmp, seed=0, image_size=32)
    photos = sorted((ROOT / "data/inputs/images").glob("*.jpg"))
    images = [Image.open(photos[i % len(photos)]).convert("RGB") for i in range(args.items)]
    texts = [json.loads(line)["prompt"] for line in (ROOT / "data/inputs/texts.jsonl").read_text().splitlines()]
    prompts = [texts[i % len(texts)] + f" #{i}" for i in range(args.items)]
    seeds = list(range(args.items))
    bs = 16

    captioner = Captioner(CaptionerSpec(name="c", path=str(tmp / "tiny-llava"), family="llava", max_new_tokens=24))
    t2i = TextToImage(T2ISpec(name="g", path=str(tmp / "tiny-sd"), family="sd", steps=4, guidance=7.5, height=32,
                              width=32))
    image_sim = ImageSimilarity(ImageMetricSpec(kind="open_clip", path=str(tmp / "tiny-open-clip")))
    text_sim = TextSimilarity(TextMetricSpec(path=str(tmp / "all-MiniLM-L6-v2")))
    recons = t2i.generate(prompts, seeds, bs)
    originals = [images[i // 4] for i in range(args.items)]
    back = captioner.caption(recons, bs)

    def score_images_batched():
        emb = image_sim.embed(images[: args.items // 4 or 1], bs)
        orig = torch.stack([emb[i // 4] for i in range(args.items)])
        image_sim.compare(orig, image_sim.embed(recons, bs))

    def score_images_per_pair():
        for o, r in zip(originals, recons):
            image_sim.compare(image_sim.embed([o]), image_sim.embed([r]))

    def score_texts_batched():
        text_sim.compare(text_sim.embed(prompts, 64), text_sim.embed(back, 64))

    def score_texts_per_pair():
        for p, b in zip(prompts, back):
            text_sim.compare(text_sim.embed([p]), text_sim.embed([b]))

    stages = {
        "generate_i2t": (lambda: captioner.caption(images, bs), lambda: [captioner.caption([im]) for im in images]),
        "reconstruct_i2t": (
            lambda: t2i.generate(prompts, seeds, bs),
            lambda: [t2i.generate([p], [s]) for p, s in zip(prompts, seeds)],
        ),
        "score_i2t": (score_images_batched, score_images_per_pair),
        "generate_t2i": (
            lambda: t2i.generate(prompts, seeds, bs),
            lambda: [t2i.generate([p], [s]) for p, s in zip(prompts, seeds)],
        ),
        "reconstruct_t2i": (lambda: captioner.caption(recons, bs), lambda: [captioner.caption([im]) for im in recons]),
        "score_t2i": (score_texts_batched, score_texts_per_pair),
    }
    results = {}
    for stage, (batched, per_item) in stages.items():
        batched()
        per_item()
        tb, tp = best_of(batched, args.repeats), best_of(per_item, args.repeats)
        results[stage] = {"batched_s": round(tb, 4), "per_item_s": round(tp, 4), "speedup": round(tp / tb, 2)}
        print(f"{stage:16s} batched {tb:7.3f}s  per-item {tp:7.3f}s  x{tp / tb:5.2f}")
    report = {
        "items": args.items,
        "batch_size": bs,
        "torch_threads": torch.get_num_threads(),
        "device": "cpu",
        "models": "tiny offline zoo (llava, sd, open_clip, all-MiniLM-L6-v2)",
        "stages": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
