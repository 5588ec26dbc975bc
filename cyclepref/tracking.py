"""MLflow tracking for stages: one run per stage execution.

Under plain `dvc repro` a stage logs a top-level run; when the Prefect pipeline sets CYCLEPREF_PARENT_RUN_ID the
stage's run becomes a child of the pipeline run. Registry writes never happen here (only in flows/).

The local store is portable: mlflow.db holds artifact locations relative to the project root ("mlruns/<id>/..."),
so a moved or copied project keeps every run, artifact and registered model. MLflow writes absolute locations when
it creates an experiment; `use_store` turns the ones under the project's mlruns/ into relative ones (also those of
a store made before, or of a moved one). MLflow resolves relative locations against the working directory, so its
clients (stages, flows, `mlflow ui`, `mlflow models serve`) run from the project root. A team shares a tracking
server with proxied artifacts instead (README).
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

from pydantic import BaseModel

EXPERIMENT = "cyclepref"
ARTIFACT_ROOT = "mlruns"
KIND_TAG, KIND = "mlflow.experimentKind", "custom_model_development"
LOCATION_COLUMNS = (
    ("experiments", "artifact_location"),
    ("runs", "artifact_uri"),
    ("logged_models", "artifact_location"),
    ("model_versions", "source"),
    ("model_versions", "storage_location"),
)


def tracking_uri(root: Path | None = None) -> str:
    uri = os.environ.get("CYCLEPREF_MLFLOW_URI") or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    root = root or Path.cwd()
    return f"sqlite:///{(root / 'mlflow.db').resolve()}"


def sqlite_file(uri: str) -> Path | None:
    return Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None


def project_prefix(location: str, root: Path) -> str | None:
    """The part of an absolute artifact location `<dir>/mlruns/<experiment id>` before "mlruns/", when it belongs to
    the project at `root`: <dir> is the root, or <dir>/mlruns/<id> is gone while root/mlruns/<id> exists (moved)."""
    path = PurePosixPath(location.removeprefix("file://"))
    if not path.is_absolute() or path.parent.name != ARTIFACT_ROOT:
        return None
    here = Path(path.parent.parent) == root.resolve()
    moved = not Path(path).exists() and (root / ARTIFACT_ROOT / path.name).exists()
    if not (here or moved):
        return None
    return location[: -len(f"{ARTIFACT_ROOT}/{path.name}")]


def make_relative(db: Path, root: Path) -> int:
    """Rewrite the absolute artifact locations of the project's experiments in the sqlite store `db` (experiments,
    runs, logged models, model versions) as paths relative to `root`; returns the number of rows changed."""
    if not db.exists():
        return 0
    changed = 0
    with sqlite3.connect(db, timeout=60) as con:
        tables = {r[0] for r in con.execute("select name from sqlite_master where type = 'table'")}
        if "experiments" not in tables:
            return 0
        for exp_id, location in con.execute("select experiment_id, artifact_location from experiments").fetchall():
            prefix = project_prefix(location or "", root)
            if prefix is None:
                continue
            old = f"{prefix}{ARTIFACT_ROOT}/{exp_id}"
            for table, column in LOCATION_COLUMNS:
                if table in tables:
                    changed += con.execute(
                        f"update {table} set {column} = substr({column}, ?) "
                        f"where {column} = ? or substr({column}, 1, ?) = ?",
                        (len(prefix) + 1, old, len(old) + 1, old + "/"),
                    ).rowcount
    return changed


def use_store(root: Path | None = None) -> str:
    """Point MLflow at the project's tracking store, keep a local store's locations relative; returns the URI."""
    import mlflow

    uri = tracking_uri(root)
    mlflow.set_tracking_uri(uri)
    db = sqlite_file(uri)
    if db is not None and (db, Path.cwd()) not in _RELATIVE:
        make_relative(db, Path.cwd())
        _RELATIVE.add((db, Path.cwd()))
    return uri


_RELATIVE: set[tuple[Path, Path]] = set()
"""(store, working directory) pairs made relative by this process (experiments it creates are made so at once)."""


def experiment_id(client, name: str | None = None) -> str:
    """The id of the experiment the stages log to (CYCLEPREF_EXPERIMENT, default cyclepref), created when absent with
    a relative artifact location; the MLflow UI opens it in its model-training view."""
    name = name or os.environ.get("CYCLEPREF_EXPERIMENT", EXPERIMENT)
    exp = client.get_experiment_by_name(name)
    if exp is None:
        exp_id = client.create_experiment(name, tags={KIND_TAG: KIND})
        db = sqlite_file(client.tracking_uri)
        if db is not None:
            make_relative(db, Path.cwd())
        return exp_id
    if exp.tags.get(KIND_TAG) != KIND:
        client.set_experiment_tag(exp.experiment_id, KIND_TAG, KIND)
    return exp.experiment_id


def source_name(root: Path | None = None) -> str:
    """The entry point as a path relative to the project root (MLflow records the absolute one)."""
    root = (root or Path.cwd()).resolve()
    entry = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] else root
    return str(entry.relative_to(root)) if entry.is_relative_to(root) else entry.name


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


def pipeline_outputs(root: Path) -> list[str]:
    """dvc.lock and every output, metric and plot path dvc.yaml declares (`${...}` as a glob `*`): the files the
    pipeline itself rewrites, some of them tracked in git (reports/, committed world models)."""
    import re

    import yaml

    paths = {"dvc.lock"}

    def collect(node: object, key: str | None = None) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                collect(v, k)
        elif isinstance(node, list) and key in ("outs", "metrics", "plots"):
            for item in node:
                paths.update(item if isinstance(item, dict) else [item])
        elif isinstance(node, list):
            for item in node:
                collect(item)

    try:
        collect(yaml.safe_load((root / "dvc.yaml").read_text()) or {})
    except (OSError, yaml.YAMLError):
        pass
    return sorted(re.sub(r"\$\{[^}]*\}", "*", str(p)).rstrip("/") for p in paths if isinstance(p, str))


def git_state(root: Path | None = None) -> dict[str, str]:
    """The commit and whether the source differs from it: a change to a file the pipeline writes (dvc.lock, an
    output, a metric) is a run's result, not a source change, so it does not make the checkout dirty."""
    root = root or Path.cwd()
    excluded = [f":(exclude,glob){p}{tail}" for p in pipeline_outputs(root) for tail in ("", "/**")]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", ".", *excluded], cwd=root,
                               capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {"git.commit": "unknown", "git.dirty": "unknown"}
    return {"git.commit": commit, "git.dirty": str(bool(dirty.strip())).lower()}


@contextmanager
def stage_run(stage: str, section: BaseModel | None, profile: str, extra_tags: dict | None = None) -> Iterator:
    """Start the stage's MLflow run (child of CYCLEPREF_PARENT_RUN_ID when set) and log its params section."""
    import mlflow

    uri = use_store()
    mlflow.set_experiment(experiment_id=experiment_id(mlflow.MlflowClient(uri)))
    tags = {
        "cyclepref.stage": stage,
        "cyclepref.profile": profile,
        "mlflow.source.name": source_name(),
        **git_state(),
        **(extra_tags or {}),
    }
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


def log_adapter_model(directory: Path, name: str, tags: dict[str, str] | None = None) -> str | None:
    """Log a LoRA adapter directory as an MLflow logged model of the active run (its files as they are: load it
    with peft / diffusers, not as a pyfunc); returns the model id, None outside a run."""
    import mlflow

    run = mlflow.active_run()
    if run is None:
        return None
    model = mlflow.initialize_logged_model(
        name=name, source_run_id=run.info.run_id, tags=tags, model_type="lora-adapter"
    )
    mlflow.MlflowClient().log_model_artifacts(model.model_id, str(directory))
    mlflow.finalize_logged_model(model.model_id, "READY")
    return model.model_id
