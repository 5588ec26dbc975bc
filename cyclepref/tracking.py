"""MLflow tracking for stages: one run per stage execution.

Under plain `dvc repro` a stage logs a top-level run; when the Prefect pipeline sets CYCLEPREF_PARENT_RUN_ID the
stage's run becomes a child of the pipeline run. Registry writes never happen here (only in flows/retrain.py).
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pydantic import BaseModel

EXPERIMENT = "cyclepref"


def tracking_uri(root: Path | None = None) -> str:
    uri = os.environ.get("CYCLEPREF_MLFLOW_URI") or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    root = root or Path.cwd()
    return f"sqlite:///{(root / 'mlflow.db').resolve()}"


def flatten(obj: object, prefix: str = "") -> dict[str, str]:
    """Nested params as dotted keys (MLflow params are flat strings of at most 6000 characters)."""
    if isinstance(obj, BaseModel):
        obj = obj.model_dump(mode="json")
    out: dict[str, str] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(obj, list) and any(isinstance(v, dict | BaseModel) for v in obj):
        for i, v in enumerate(obj):
            out.update(flatten(v, f"{prefix}{i}."))
    else:
        out[prefix.rstrip(".")] = str(obj)[:6000]
    return out


def git_state(root: Path | None = None) -> dict[str, str]:
    root = root or Path.cwd()
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {"git.commit": "unknown", "git.dirty": "unknown"}
    return {"git.commit": commit, "git.dirty": str(bool(dirty.strip())).lower()}


@contextmanager
def stage_run(stage: str, section: BaseModel | None, profile: str, extra_tags: dict | None = None) -> Iterator:
    """Start the stage's MLflow run (child of CYCLEPREF_PARENT_RUN_ID when set) and log its params section."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri())
    mlflow.set_experiment(os.environ.get("CYCLEPREF_EXPERIMENT", EXPERIMENT))
    tags = {"cyclepref.stage": stage, "cyclepref.profile": profile, **git_state(), **(extra_tags or {})}
    parent = os.environ.get("CYCLEPREF_PARENT_RUN_ID") or None
    started = time.perf_counter()
    with mlflow.start_run(run_name=stage, tags=tags, parent_run_id=parent) as run:
        if section is not None:
            mlflow.log_params(flatten(section))
        yield run
        mlflow.log_metric("stage_seconds", time.perf_counter() - started)


def log_examples(name: str, items: list[tuple[object | None, str]], thumb: int = 96) -> None:
    """Log a grid of (image or None, caption) examples as `examples/<name>.png` plus the texts as JSON.
    Does nothing outside an active MLflow run (stages called directly from tests)."""
    import json
    import tempfile
    import textwrap

    import mlflow
    from PIL import Image, ImageDraw

    if mlflow.active_run() is None or not items:
        return
    cols, text_h = 4, 60
    rows = -(-len(items) // cols)
    grid = Image.new("RGB", (cols * thumb, rows * (thumb + text_h)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (img, text) in enumerate(items):
        x, y = (i % cols) * thumb, (i // cols) * (thumb + text_h)
        if img is not None:
            grid.paste(img.convert("RGB").resize((thumb, thumb)), (x, y))
        lines = textwrap.wrap(text, width=thumb // 6)[:5]
        draw.multiline_text((x + 2, y + thumb + 2), "\n".join(lines), fill="black", spacing=1)
    with tempfile.TemporaryDirectory() as tmp:
        grid.save(f"{tmp}/{name}.png")
        with open(f"{tmp}/{name}.json", "w") as f:
            json.dump([t for _, t in items], f, indent=1)
        mlflow.log_artifacts(tmp, artifact_path="examples")
