"""End to end: `dvc repro` of the real dvc.yaml on a shrunk copy of the tiny profile (configs/tiny.yaml), in a fresh
git repo that keeps the committed dvc.lock, so the committed world models (train_world) are reused, not retrained."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cyclepref import store
from cyclepref.atomic import follow_umask

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def shrink(params: dict) -> dict:
    """The tiny profile, smaller: 4 of 8 scenes (one train, one valid and two test inputs under the tiny profile's
    split), 2 seeds, short captions (the real config, shrunk; the world models and benchmark stay as committed)."""
    params["prepare_inputs"]["limit"] = 4
    params["world"]["inputs"]["n"] = 8
    params["generate_t2i"]["seeds"] = [0, 1]
    for c in params["generate_i2t"]["captioners"]:
        c["max_new_tokens"] = 8
    params["reconstruct_t2i"]["captioner"]["max_new_tokens"] = 8
    return params


def _run(cmd: list[str], cwd: Path, env: dict) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1500)
    assert res.returncode == 0, f"{' '.join(cmd)} failed:\n{res.stdout[-4000:]}\n{res.stderr[-4000:]}"
    return res


@pytest.fixture(scope="module")
def project(tmp_path_factory, _mlflow_template) -> tuple[Path, dict]:
    dest = tmp_path_factory.mktemp("e2e") / "proj"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for f in files:
        if f.startswith(("tests/", "bench/")) or not (ROOT / f).is_file():
            continue
        (dest / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, dest / f)
    follow_umask(dest)
    for generated in ("reports/sandbox.json", "reports/sandbox.md", "reports/reward/eval.json"):
        (dest / generated).unlink(missing_ok=True)
    params = shrink(yaml.safe_load((dest / "configs/tiny.yaml").read_text()))
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    shutil.copy(_mlflow_template, dest / "mlflow.db")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "CYCLEPREF_PROGRESS": "0",
           "CYCLEPREF_MLFLOW_URI": f"sqlite:///{dest / 'mlflow.db'}", "PYTHONPATH": str(dest)}
    env.pop("MLFLOW_TRACKING_URI", None)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"]):
        _run(cmd, dest, env)
    return dest, env


def test_dvc_repro_runs_every_stage_then_nothing(project):
    dest, env = project
    first = _run([sys.executable, "-m", "dvc", "repro"], dest, env)
    stages = yaml.safe_load((dest / "dvc.yaml").read_text())["stages"]
    ran = set(re.findall(r"Running stage '([^']+)'", first.stdout))
    expected = set()
    for name, spec in stages.items():
        if "foreach" in spec:
            expected |= {f"{name}@{item}" for item in spec["foreach"]}
        else:
            expected.add(name)
    committed = {f"train_world@{m}" for m in stages["train_world"]["foreach"]} | {"make_benchmark"}
    assert ran == expected - committed
    assert "generate_i2t: candidates=12, computed=12" in first.stdout
    assert "prepare_inputs: inputs=4" in first.stdout
    readable = 0o444 & ~store.umask()
    narrower = [p for top in ("data", "reports", "mlruns") for p in (dest / top).rglob("*")
                if p.exists() and p.stat().st_mode & readable != readable]
    assert narrower == []
    second = _run([sys.executable, "-m", "dvc", "repro"], dest, env)
    assert "Data and pipelines are up to date" in second.stdout
    assert "Running stage" not in second.stdout

    import mlflow

    mlflow.set_tracking_uri(env["CYCLEPREF_MLFLOW_URI"])
    runs = mlflow.search_runs(experiment_names=["cyclepref"], output_format="list")
    stage_runs = [r for r in runs if "cyclepref.stage" in r.data.tags]
    assert {r.data.tags["cyclepref.stage"] for r in stage_runs} >= {
        "prepare_inputs", "generate_i2t", "score_t2i", "build_pairs", "train_reward", "evaluate_downstream"}
    assert all(r.data.tags["cyclepref.profile"] == "tiny" for r in stage_runs)


def test_sandbox_report_comes_from_this_run(project):
    import hashlib
    import json

    dest, _ = project
    report = json.loads((dest / "reports/sandbox.json").read_text())
    pairs = hashlib.sha256((dest / "data/pairs/pairs.parquet").read_bytes()).hexdigest()
    assert report["provenance"]["pairs_sha256"] == pairs
    assert report["provenance"]["eval_report_sha256"] == hashlib.sha256(
        (dest / "reports/reward/eval.json").read_bytes()).hexdigest()
    assert report["inputs_with_truth"] == 4
    assert report["parser"]["clean_renders"]["exact"]["value"] >= 0.95
    assert set(report["agreement"]) == {"i2t", "t2i"}


def test_adding_a_captioner_reruns_only_what_depends_on_it(project):
    dest, env = project
    params = yaml.safe_load((dest / "params.yaml").read_text())
    params["generate_i2t"]["captioners"].append(
        {"name": "tiny-llava-short", "path": "data/zoo/tiny-llava", "family": "llava", "max_new_tokens": 8,
         "prompt": "What is in the picture?"}
    )
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    status = _run([sys.executable, "-m", "dvc", "status"], dest, env).stdout
    assert "generate_i2t" in status and "generate_t2i" not in status and "prepare_inputs" not in status
    out = _run([sys.executable, "-m", "dvc", "repro", "generate_i2t"], dest, env).stdout
    assert "generate_i2t: candidates=16, computed=4, reused=12" in out
