"""Stage bootstrap_models: build the offline tiny model zoo into data/zoo/<name>/ (see cyclepref.models.zoo)."""

from __future__ import annotations

from pathlib import Path

from cyclepref import stage
from cyclepref.config import Params
from cyclepref.models import zoo

OUT = Path("data/zoo")


def run(params: Params, root: Path) -> dict:
    cfg = params.bootstrap_models
    out = root / OUT
    out.mkdir(parents=True, exist_ok=True)
    built = [zoo.build(name, out, cfg.seed, cfg.image_size).name for name in cfg.build]
    (out / "README.txt").write_text(
        "Offline tiny model zoo written by `dvc repro bootstrap_models` (do not edit).\n"
        + "".join(f"{name}\n" for name in built)
    )
    return {"models": len(cfg.build)}


def main() -> None:
    stage.main("bootstrap_models", run)


if __name__ == "__main__":
    main()
