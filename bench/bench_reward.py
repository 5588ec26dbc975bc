"""Benchmark: reward-model scoring, batched `score(images, texts)` against one pair per call, in one process, on the
same pairs (arms interleaved and sized by bench/harness.py).

Two workloads: `distinct` (every pair has its own image) and `shared` (8 captions per image, as in I2T best-of-N,
where the batched path encodes each image once). The tiny offline BLIP ITM is built into a temporary directory
unless --backbone names one. Checks that both arms give the same scores.
    python bench/bench_reward.py [--backbone DIR] [--pairs 64] [--batch-size 32] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from functools import partial
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
import harness  # noqa: E402

from cyclepref import runtime  # noqa: E402
from cyclepref.reward.model import RewardModel  # noqa: E402
from cyclepref.reward.synthetic import COLOURS, colour_image  # noqa: E402


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


def run(backbone: str | None = None, pairs: int = 64, batch_size: int = 32, repeats: int = 5, min_s: float = 1.0,
        echo=print) -> dict:
    device = runtime.device()
    with tempfile.TemporaryDirectory() as tmp:
        if backbone is None or not Path(backbone).exists():
            from cyclepref.models import zoo

            backbone = str(zoo.build("blip_itm", Path(tmp), seed=0, image_size=32))
        model = runtime.place(RewardModel.from_backbone(backbone), "blip_itm", device, ("head",)).eval()
    processor = model.processor.image_processor
    size = (getattr(processor, "crop_size", None) or processor.size)["height"]
    results = {}
    for kind in ("distinct", "shared"):
        images, texts = workload(kind, pairs, size)
        batched, single = partial(model.score, images, texts, batch_size=batch_size), partial(
            one_per_call, model, images, texts)
        max_diff = float((batched() - single()).abs().max())
        if max_diff > 1e-4:
            raise SystemExit(f"{kind}: batched and single scores differ by {max_diff}")
        r = harness.compare({"batched": batched, "one_per_call": single}, ("one_per_call", "batched"), repeats,
                            min_s)
        r["pairs_per_s"] = {arm: round(pairs / v["median"], 1) for arm, v in r["seconds_per_call"].items()}
        r["max_abs_diff"] = max_diff
        results[kind] = r
        echo(f"reward {kind:8s} x{r['ratio']['median']:6.2f} [{r['ratio']['min']:.2f}, {r['ratio']['max']:.2f}] "
             f"{r['pairs_per_s']} load {r['load_average_before'][0]}")
    return {
        "what": "reward scoring pairs/s, batched vs one pair per call; ratio = one-per-call s / batched s",
        "backbone": "tiny offline BLIP ITM" if "tmp" in backbone else backbone,
        "device": device,
        "pairs": pairs,
        "batch_size": batch_size,
        "workloads": results,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbone")
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    report = {"machine": harness.machine(), **run(args.backbone, args.pairs, args.batch_size, args.repeats)}
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
