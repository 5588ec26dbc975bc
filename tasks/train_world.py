"""Stage train_world@<model>: train one of the sandbox's world models into data/world/models/<model>/.

model: captioner (LLaVA ladder), clip (open_clip), t2i (Stable Diffusion ladder), blip (BLIP ITM backbone).
The weights are small and committed as non-cached DVC outputs, so `make run` reuses them; the loss curve goes to
reports/world/train_<model>.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from cyclepref import stage
from cyclepref.config import Params, require
from cyclepref.store import atomic_dir

MODELS = ("captioner", "clip", "t2i", "blip")
OUT = Path("data/world/models")
REPORT = Path("reports/world")


def _train(model: str, cfg, seed: int, out: Path) -> dict[str, list[float]]:
    common = dict(seed=seed, n_scenes=cfg.scenes, batch_size=cfg.batch_size, lr=cfg.lr)
    if model == "captioner":
        from cyclepref.world.train_captioner import train

        return {"captioner": train(out, steps=cfg.steps, **common)}
    if model == "clip":
        from cyclepref.world.train_clip import train

        return {"clip": train(out, steps=cfg.steps, **common)}
    if model == "t2i":
        from cyclepref.world.train_t2i import train

        return train(out, vae_steps=cfg.vae_steps, steps=cfg.steps, vae_lr=cfg.vae_lr, **common)
    from cyclepref.world.train_blip import train

    return {"blip": train(out, steps=cfg.steps, **common)}


def curve_summary(losses: list[float], window: int = 50) -> dict:
    head, tail = losses[:window], losses[-window:]
    return {"steps": len(losses), "first": sum(head) / len(head), "last": sum(tail) / len(tail),
            "every_50": [round(sum(losses[i : i + window]) / len(losses[i : i + window]), 5)
                         for i in range(0, len(losses), window)]}


def run(params: Params, root: Path, model: str) -> dict:
    import torch

    torch.use_deterministic_algorithms(True)
    world = require(params.world, "world")
    with atomic_dir(root / OUT / model) as tmp:
        curves = _train(model, getattr(world.train, model), world.train.seed, tmp)
    report = {name: curve_summary(c) for name, c in curves.items()}
    (root / REPORT).mkdir(parents=True, exist_ok=True)
    (root / REPORT / f"train_{model}.json").write_text(json.dumps(report, indent=2) + "\n")
    return {f"{name}_loss_last": r["last"] for name, r in report.items()}


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0] not in MODELS:
        raise SystemExit(f"usage: python -m tasks.train_world <model>   (model in: {', '.join(MODELS)})")
    stage.main(f"train_world@{args[0]}", lambda params, root: run(params, root, args[0]))


if __name__ == "__main__":
    main()
