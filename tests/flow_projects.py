"""Tiny throwaway DVC projects for the flow and lineage tests (git + dvc init in a temp dir)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
GIT = ["git", "-c", "user.email=test@example.com", "-c", "user.name=test", "-c", "commit.gpgsign=false"]

SUMMARISE = '''"""A cheap stage with an MLflow run: count the prepared inputs."""
import json
from pathlib import Path

import pyarrow.parquet as pq

from cyclepref import stage


def run(params, root):
    rows = pq.read_metadata(root / "data/prepared/inputs.parquet").num_rows
    Path("reports").mkdir(exist_ok=True)
    Path("reports/summary.json").write_text(json.dumps({"rows": rows}))
    return {"rows": rows}


stage.main("summarise", run)
'''

INPUTS_DVC_YAML = """stages:
  summarise:
    cmd: python summarise.py
    deps: [summarise.py, data/prepared, reports/dq/inputs.json]
    outs: [reports/summary.json]
  gate:
    foreach: [inputs]
    do:
      cmd: python -m tasks.gate ${item}
      deps: [data/prepared]
      params:
        - gates.${item}
      metrics:
        - reports/dq/${item}.json:
            cache: false
  prepare_inputs:
    cmd: python -m tasks.prepare_inputs
    deps: [data/inputs]
    params: [prepare_inputs]
    outs: [data/prepared]
"""


def init_repo(path: Path) -> Path:
    """git init + dvc init + one commit of what is in `path`."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["git", "init", "-q"], cwd=path, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=path, check=True)
    subprocess.run([*GIT, "add", "-A"], cwd=path, check=True)
    subprocess.run([*GIT, "commit", "-qm", "init"], cwd=path, check=True)
    return path


def params(min_rows: int = 1, benchmark: str = "benchmark/pairs.jsonl") -> dict:
    return {
        "profile": "flowtest",
        "bootstrap_models": {"build": []},
        "prepare_inputs": {"source": "folder", "path": "data/inputs", "texts_file": "texts.jsonl"},
        "gates": {"inputs": {"min_rows": min_rows}},
        "retrain": {"registered_model": "cyclereward", "benchmark": benchmark, "margin": 0.02},
    }


def inputs_project(path: Path, min_rows: int = 1) -> Path:
    """Three real cheap stages: prepare_inputs (the real stage on the bundled inputs), gate@inputs (the real gate,
    thresholds from params) and summarise (a stage logging through cyclepref.stage, after the gate). dvc.yaml lists
    them out of order, so only DVC's graph gives prepare_inputs -> gate@inputs -> summarise."""
    path.mkdir(parents=True)
    shutil.copytree(ROOT / "data" / "inputs", path / "data" / "inputs")
    (path / "params.yaml").write_text(yaml.safe_dump(params(min_rows), sort_keys=False))
    (path / "summarise.py").write_text(SUMMARISE)
    (path / "dvc.yaml").write_text(INPUTS_DVC_YAML)
    return init_repo(path)


def command_project(
    path: Path, stages: dict[str, dict], files: dict[str, str] | None = None, settings: dict | None = None
) -> Path:
    """A project whose stages are shell commands ({name: {"cmd": ..., "deps": [...], "outs": [...]}}), plus `files`
    (relative path -> text) and params.yaml = `params()` updated with `settings`."""
    path.mkdir(parents=True)
    for name, text in (files or {}).items():
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        (path / name).write_text(text)
    (path / "params.yaml").write_text(yaml.safe_dump({**params(), **(settings or {})}, sort_keys=False))
    (path / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    return init_repo(path)


def repro_order(path: Path, *targets: str) -> list[str]:
    """The stages `dvc repro [TARGET...]` runs, in the order it runs them (all of them in a never-run project)."""
    out = subprocess.run(
        [sys.executable, "-m", "dvc", "repro", *targets], cwd=path, capture_output=True, text=True, check=True
    ).stdout
    return re.findall(r"^Running stage '(.+)':", out, flags=re.MULTILINE)
