"""Benchmark: reward-model scoring throughput (pairs/s), batched `score(images, texts)` against one pair per call,
in one process, on the same pairs.

    .venv/bin/python bench/bench_reward.py [--backbone data/zoo/tiny-blip-itm] [--pairs 128] [--batch-size 32]
                                            [--out bench/results/bench_reward.json]

Two workloads: `distinct` (every pair has its own image) and `shared` (8 captions per image, as in I2T best-of-N,
where the batched path encodes each image once). Without the backbone directory the tiny offline BLIP ITM is built
into a temporary directory. Checks that both paths give the same scores and writes the numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
from PIL import Image

from cyclepref import runtime
from cyclepref.reward.model import RewardModel
from cyclepref.reward.synthetic import COLOURS, colour_image


def workload(kind: str, n: int, size: int, seed: int = 0) -> tuple[list[Image.Image], list[str]]:
    rng = random.Random(seed)
    names = sorted(COLOURS)
    per_image = 1 if kind == "distinct" else 8
    images, texts = [], []
    for i in range(n):
        if i % per_image == 0:
            image = colour_image(COLOURS[rng.choice(names)], rng, size)
        images.append(image)
        texts.append(f"a photo of a {rng.choice(names)} square, number {i}")
    return images, texts


def one_per_call(model: RewardModel, images: list[Image.Image], texts: list[str]) -> torch.Tensor:
    return torch.cat([model.score([im], [t]) for im, t in zip(images, texts, strict=True)])


def rate(fn, n: int, repeats: int = 2) -> tuple[float, torch.Tensor]:
    """Best of `repeats` timed runs of fn() (which scores n pairs)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return n / best, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone", default="data/zoo/tiny-blip-itm")
    parser.add_argument("--pairs", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("bench/results/bench_reward.json"))
    args = parser.parse_args()

    device = runtime.device()
    with tempfile.TemporaryDirectory() as tmp:
        backbone = args.backbone
        if not Path(backbone).exists():
            from cyclepref.models import zoo

            backbone = str(zoo.build("blip_itm", Path(tmp), seed=0, image_size=32))
        model = RewardModel.from_backbone(backbone).to(device).eval()
    size = model.processor.image_processor.size["height"]
    report = {
        "backbone": args.backbone,
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "pairs": args.pairs,
        "batch_size": args.batch_size,
        "results": {},
    }
    warm_images, warm_texts = workload("distinct", 8, size, seed=1)
    model.score(warm_images, warm_texts)
    model.score(warm_images[:1], warm_texts[:1])
    for kind in ("distinct", "shared"):
        images, texts = workload(kind, args.pairs, size)
        batched_rate, batched = rate(partial(model.score, images, texts, batch_size=args.batch_size), args.pairs)
        single_rate, single = rate(partial(one_per_call, model, images, texts), args.pairs)
        max_diff = float((batched - single).abs().max())
        if max_diff > 1e-4:
            raise SystemExit(f"{kind}: batched and single scores differ by {max_diff}")
        report["results"][kind] = {
            "batched_pairs_per_s": round(batched_rate, 1),
            "single_pairs_per_s": round(single_rate, 1),
            "speedup": round(batched_rate / single_rate, 2),
            "max_abs_diff": max_diff,
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for kind, r in report["results"].items():
        print(
            f"{kind:8s}: batched {r['batched_pairs_per_s']:8.1f} pairs/s, one per call {r['single_pairs_per_s']:7.1f} "
            f"pairs/s, x{r['speedup']} (max |diff| {r['max_abs_diff']:.1e})"
        )
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
