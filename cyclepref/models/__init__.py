"""Model adapters (captioners, text-to-image pipelines, similarity metrics) and the offline tiny model zoo."""

from __future__ import annotations

import os
from pathlib import Path


class ModelLoadError(RuntimeError):
    """A model that could not be loaded; the message names the path and the cause."""


def locate(path: str) -> str:
    """A local directory as an absolute path; anything else is passed on as a hub id."""
    p = Path(path)
    if p.exists():
        if not p.is_dir():
            raise ModelLoadError(f"{path}: expected a model directory, found a file")
        return str(p.resolve())
    if path.startswith((".", "/")) or path.count("/") != 1:
        raise ModelLoadError(
            f"{path}: no such local model directory, and it is not a hub id (org/name); "
            "build the offline zoo with `dvc repro bootstrap_models` or fix the path in params"
        )
    return path


def load_failed(path: str, err: Exception) -> ModelLoadError:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    hint = " (HF_HUB_OFFLINE=1: hub ids must already be in the local cache)" if offline and not Path(path).exists() else ""
    return ModelLoadError(f"could not load model from {path}{hint}: {type(err).__name__}: {err}")
