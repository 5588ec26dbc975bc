"""Stage train_world@<model>: train one of the sandbox's world models into data/world/models/<model>/.

model: captioner (LLaVA ladder), clip (open_clip), t2i (Stable Diffusion ladder), blip (BLIP ITM backbone).
The weights are small and committed as non-cached DVC outputs, so `make run` reuses them; the loss curve goes to
reports/world/train_<model>.json. The judges (clip, blip) are trained once per kind of text in `texts`: dense captions
into data/world/models/<model>/, web-like alt-text (cyclepref.world.alttext) into data/world/models/<model>/alt/.

The frame is deliberately small: params come from `world.train` alone (cyclepref/world/params.py) and the stage
logs no MLflow run of its own (lineage records it), so its DVC dependencies are exactly what decides the weights
and an edit to the pipeline's wiring never retrains the world models. The trainer is imported by name
(DYNAMIC_IMPORTS, which the dependency check reads), so each train_world@<model> depends on its own trainer only.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import shutil
import sys
from pathlib import Path

from cyclepref.atomic import atomic_dir
from cyclepref.world.params import load_training

MODELS = ("captioner", "clip", "t2i", "blip")
DYNAMIC_IMPORTS = "cyclepref.world.train_{item}"
OUT = Path("data/world/models")
ALT = "alt"
REPORT = Path("reports/world")
RESUME = Path(".dvc/tmp/cyclepref/train_world")
RESUMABLE = ("t2i",)


def resume_dir(root: Path, model: str, train) -> Path:
    """Where a resumable trainer keeps its state: keyed by the params and by the source of what decides the
    weights, so a changed config or trainer never continues another run's state."""
    digest = hashlib.sha256(json.dumps([train.seed, getattr(train, model).model_dump()], sort_keys=True).encode())
    package = Path(__file__).resolve().parents[1] / "cyclepref"
    for src in (f"world/train_{model}.py", "world/optimise.py", "world/data.py", "world/scene.py",
                "world/alttext.py", "models/tokenizers.py"):
        digest.update((package / src).read_bytes())
    return root / RESUME / f"{model}-{digest.hexdigest()[:16]}"


def _train(model: str, cfg, seed: int, out: Path, resume: Path | None) -> dict[str, list[float]]:
    """Train `model` into out/; a judge (clip, blip) trained on alt-text goes to out/alt/."""
    trainer = importlib.import_module(DYNAMIC_IMPORTS.format(item=model))
    kw = dict(seed=seed, n_scenes=cfg.scenes, batch_size=cfg.batch_size, lr=cfg.lr, steps=cfg.steps)
    if model == "t2i":
        return trainer.train(out, vae_steps=cfg.vae_steps, vae_lr=cfg.vae_lr, resume=resume, **kw)
    if model == "captioner":
        return {model: trainer.train(out, **kw)}
    curves = {}
    for texts in cfg.texts:
        name, where = (model, out) if texts == "dense" else (f"{model}-alt", out / ALT)
        curves[name] = trainer.train(where, texts=texts, **kw)
    return curves


def curve_summary(losses: list[float], window: int = 50) -> dict:
    head, tail = losses[:window], losses[-window:]
    return {"steps": len(losses), "first": sum(head) / len(head), "last": sum(tail) / len(tail),
            "every_50": [round(sum(losses[i : i + window]) / len(losses[i : i + window]), 5)
                         for i in range(0, len(losses), window)]}


def run(root: Path, model: str, params_file: str = "params.yaml") -> dict:
    import torch

    torch.use_deterministic_algorithms(True)
    train = load_training(root / params_file)
    resume = resume_dir(root, model, train) if model in RESUMABLE else None
    with atomic_dir(root / OUT / model) as tmp:
        curves = _train(model, getattr(train, model), train.seed, tmp, resume)
    if resume is not None:
        shutil.rmtree(resume, ignore_errors=True)
    report = {name: curve_summary(c) for name, c in curves.items()}
    (root / REPORT).mkdir(parents=True, exist_ok=True)
    (root / REPORT / f"train_{model}.json").write_text(json.dumps(report, indent=2) + "\n")
    return {f"{name}_loss_last": r["last"] for name, r in report.items()}


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0] not in MODELS:
        raise SystemExit(f"usage: python -m tasks.train_world <model>   (model in: {', '.join(MODELS)})")
    try:
        summary = run(Path.cwd(), args[0])
    except ValueError as err:
        print(f"train_world@{args[0]}: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"train_world@{args[0]}: " + ", ".join(f"{k}={v:.4f}" for k, v in summary.items()))


if __name__ == "__main__":
    main()
