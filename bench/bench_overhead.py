"""Benchmark: what orchestration and tracking cost around the stages' own compute.

- process start: a bare interpreter, the stage frame's imports (cyclepref.stage + MLflow), the model libraries
  (torch, transformers, diffusers), the DVC CLI; in-process loads of the tiny models.
- a toy project of real stages (tests/flow_projects.inputs_project: prepare_inputs, gate@inputs, summarise, each
  through cyclepref.stage with an MLflow run): `cyclepref repro` wall time against the sum of the stages' own
  `seconds` (logged by cyclepref.stage: MLflow run start + the stage's work), each stage command run alone (its wall
  time and peak RSS, from wait4), `dvc repro` with nothing to do, and the Prefect pipeline flow with nothing to do
  (on a temporary Prefect server, whose start is reported apart).
- a no-op `cyclepref pipeline` (the CLI process: one `dvc status`, then the run that recorded this state is
  reported) against a no-op `dvc repro` on a toy project of the default pipeline's stage count (target: within 3x),
  and the same with `--record` (a Prefect flow run and an MLflow child run per stage).
Each timing is repeated (median, min, max); the default pipeline's overhead is estimated from the per-stage overhead
times its stage count.
    python bench/bench_overhead.py [--repeats 3] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench"), str(ROOT / "tests")]
import harness  # noqa: E402

IMPORTS = {
    "python": "pass",
    "stage frame (cyclepref.stage, MLflow)": "import cyclepref.stage, cyclepref.tracking, mlflow",
    "model libraries (torch, transformers, diffusers)": "import torch, transformers, diffusers",
    "DVC": "import dvc.repo, dvc.cli",
}


MEASURE = """import json, resource, subprocess, sys, time
started = time.perf_counter()
code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE).returncode
seconds = time.perf_counter() - started
print(json.dumps({"code": code, "seconds": seconds,
                  "maxrss_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""


def run_process(cmd: list[str], cwd: Path, env: dict) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB of the process and its descendants) of one command. It runs under a small
    launcher, because a child forked from this (large) process would report this process's RSS as its peak."""
    done = subprocess.run([sys.executable, "-c", MEASURE, *cmd], cwd=cwd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"launcher failed: {done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result["code"] != 0:
        rerun = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{rerun.stderr[-3000:]}")
    return result["seconds"], round(result["maxrss_kib"] / 1024, 1)


def repeat(fn, repeats: int) -> dict:
    values = [fn() for _ in range(repeats)]
    return harness.summary(values, 3)


def process_start(env: dict, repeats: int) -> dict:
    out = {}
    for name, code in IMPORTS.items():
        out[name] = repeat(lambda code=code: run_process([sys.executable, "-c", code], ROOT, env)[0], repeats)
    return out


def model_loads(tmp: Path) -> dict:
    """Seconds to load each tiny model in a process that has imported the libraries already."""
    from cyclepref.config import CaptionerSpec, T2ISpec
    from cyclepref.models import zoo
    from cyclepref.models.captioner import Captioner
    from cyclepref.models.t2i import TextToImage
    from cyclepref.reward.model import RewardModel

    for name in ("llava", "sd", "blip_itm"):
        zoo.build(name, tmp, seed=0, image_size=32)
    loads = {
        "captioner (tiny llava)": lambda: Captioner(CaptionerSpec(name="c", path=str(tmp / "tiny-llava"),
                                                                  family="llava")),
        "text-to-image (tiny sd)": lambda: TextToImage(T2ISpec(name="g", path=str(tmp / "tiny-sd"), family="sd",
                                                               steps=2, guidance=7.5, height=32, width=32)),
        "reward model (tiny blip itm)": lambda: RewardModel.from_backbone(str(tmp / "tiny-blip-itm")),
    }
    out = {}
    for name, load in loads.items():
        load()
        out[name] = repeat(lambda load=load: _time(load), 3)
    return out


def _time(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def stage_metrics(uri: str, parent_run_id: str, name: str) -> dict[str, float]:
    """stage -> one metric its MLflow run logged (cyclepref.stage logs `seconds` and `peak_rss_mib`)."""
    from mlflow import MlflowClient

    from flows import lineage

    client = MlflowClient(uri)
    return {k.info.run_name: k.data.metrics.get(name, 0.0) for k in lineage.children(client, parent_run_id)}


def toy_pipeline(tmp: Path, env: dict, repeats: int, echo) -> dict:
    from flow_projects import inputs_project
    from mlflow import MlflowClient

    project = inputs_project(tmp / "toy")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    os.environ.update(CYCLEPREF_MLFLOW_URI=uri, PYTHONPATH=str(ROOT))
    env = {**env, "CYCLEPREF_MLFLOW_URI": uri, "PYTHONPATH": str(ROOT)}
    MlflowClient(uri).search_experiments()

    from flows.pipeline import stage_plan
    from flows.repro import repro

    stages, _ = stage_plan(project)
    started = time.perf_counter()
    first = repro(project, trigger="bench", echo=lambda line: None)
    wall = time.perf_counter() - started
    own = stage_metrics(uri, first.parent_run_id, "seconds")
    logged_rss = stage_metrics(uri, first.parent_run_id, "peak_rss_mib")
    echo(f"toy pipeline: {len(stages)} stages in {wall:.1f} s, stages' own seconds {sum(own.values()):.1f}")
    per_stage = {}
    for stage in stages:
        cmd = _stage_cmd(project, stage)
        spans = [run_process(["bash", "-c", cmd], project, env) for _ in range(repeats)]
        per_stage[stage] = {"process_seconds": harness.summary([s for s, _ in spans], 3),
                            "peak_rss_mib": max(m for _, m in spans), "own_seconds": own.get(stage),
                        "peak_rss_mib_logged": logged_rss.get(stage)}
    dvc_noop = repeat(lambda: run_process([sys.executable, "-m", "dvc", "repro"], project, env)[0], repeats)
    echo(f"dvc repro no-op {dvc_noop['median']} s")
    return {
        "project": "tests/flow_projects.inputs_project (prepare_inputs, gate@inputs, summarise; real stages)",
        "stages": len(stages),
        "first_run": {"cyclepref_repro_wall_s": round(wall, 2), "stages_own_seconds": own,
                      "overhead_s": round(wall - sum(own.values()), 2),
                      "overhead_per_stage_s": round((wall - sum(own.values())) / len(stages), 2)},
        "stage_processes": per_stage,
        "dvc_repro_noop_s": dvc_noop,
        "prefect_pipeline_noop": prefect_noop(project, repeats, echo),
    }


def _stage_cmd(project: Path, stage: str) -> str:
    import yaml

    spec = yaml.safe_load((project / "dvc.yaml").read_text())["stages"]
    name, _, item = stage.partition("@")
    cmd = spec[name]["do"]["cmd"].replace("${item}", item) if item else spec[name]["cmd"]
    return cmd.replace("python ", f"{sys.executable} ", 1)


def prefect_noop(project: Path, repeats: int, echo) -> dict:
    os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="cyclepref-bench-prefect-"))
    os.environ["PREFECT_LOGGING_LEVEL"] = "WARNING"
    from prefect.testing.utilities import prefect_test_harness

    started = time.perf_counter()
    with prefect_test_harness(server_startup_timeout=180):
        server_s = time.perf_counter() - started
        from flows.pipeline import pipeline

        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            result = pipeline(root=str(project), trigger="bench", stage_retries=0)
            times.append(time.perf_counter() - t)
            assert all(o.status == "skipped" for o in result.outcomes), "the toy project was not up to date"
    echo(f"prefect pipeline no-op {statistics.median(times):.1f} s (server start {server_s:.1f} s)")
    return {"seconds": harness.summary(times, 3), "server_start_s": round(server_s, 1)}


WIDE_STAGES = 31
COPY = "python -c \"import shutil, sys; shutil.copy(sys.argv[1], sys.argv[2])\" {src} {dst}"


def wide_project(path: Path, n: int = WIDE_STAGES) -> Path:
    """A toy project with the default pipeline's stage count: two chains of copy stages from one input."""
    from flow_projects import command_project

    stages = {}
    for i in range(n):
        src = "in.txt" if i < 2 else f"out{i - 2:02d}.txt"
        stages[f"s{i:02d}"] = {"cmd": COPY.format(src=src, dst=f"out{i:02d}.txt"), "deps": [src],
                               "outs": [f"out{i:02d}.txt"]}
    return command_project(path, stages, files={"in.txt": "0\n"})


def wide_noop(tmp: Path, env: dict, repeats: int, echo) -> dict:
    """A no-op `cyclepref pipeline` (the CLI process, on a running Prefect server) against a no-op `dvc repro`, on a
    project of the default pipeline's stage count whose stages were run by `cyclepref repro` (so every skipped
    stage's MLflow child points to its producer, as after `make run`). Target: within 3x."""
    os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="cyclepref-bench-prefect-"))
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    from flows.repro import repro

    env = {**env, **{k: os.environ[k] for k in ("CYCLEPREF_MLFLOW_URI", "PYTHONPATH") if k in os.environ}}
    project = wide_project(tmp / "wide")
    first = repro(project, trigger="bench", echo=lambda line: None)
    assert first.returncode == 0 and len(first.statuses) == WIDE_STAGES, first
    dvc = repeat(lambda: run_process([sys.executable, "-m", "dvc", "repro"], project, env)[0], repeats)
    with prefect_test_harness(server_startup_timeout=180):
        cli_env = {**env, "PREFECT_API_URL": PREFECT_API_URL.value(), "PREFECT_LOGGING_LEVEL": "WARNING"}
        cli = [str(Path(sys.executable).parent / "cyclepref"), "pipeline", "--root", str(project)]
        pipe = repeat(lambda: run_process(cli, project, cli_env)[0], repeats)
        recorded = repeat(lambda: run_process([*cli, "--record"], project, cli_env)[0], repeats)
    ratio = round(pipe["median"] / dvc["median"], 2)
    echo(f"no-op on {WIDE_STAGES} stages: cyclepref pipeline {pipe['median']} s, dvc repro {dvc['median']} s, "
         f"x{ratio} (target <= 3); with --record (a flow run) {recorded['median']} s")
    return {"stages": WIDE_STAGES, "dvc_repro_noop_s": dvc, "cyclepref_pipeline_noop_s": pipe, "ratio": ratio,
            "target_ratio": 3, "within_target": ratio <= 3, "cyclepref_pipeline_record_s": recorded}


def default_pipeline_stages() -> int:
    from flows.pipeline import stage_plan

    return len(stage_plan(ROOT)[0])


def run(repeats: int = 3, echo=print) -> dict:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    report = {"process_start_s": process_start(env, repeats)}
    echo("process start: " + ", ".join(f"{k} {v['median']} s" for k, v in report["process_start_s"].items()))
    with tempfile.TemporaryDirectory(prefix="cyclepref-bench-") as tmp:
        report["model_load_s"] = model_loads(Path(tmp))
        report["toy_pipeline"] = toy_pipeline(Path(tmp), env, repeats, echo)
        report["noop_pipeline"] = wide_noop(Path(tmp), env, repeats, echo)
    n = default_pipeline_stages()
    per_stage = report["toy_pipeline"]["first_run"]["overhead_per_stage_s"]
    report["default_pipeline_estimate"] = {
        "stages": n,
        "overhead_s": round(n * per_stage, 1),
        "how": "toy per-stage overhead (cyclepref repro wall - stages' own seconds) x the default dvc.yaml's stage "
               "count; compare with the README's measured `make run` (its timings paragraph)",
    }
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    report = {"machine": harness.machine(), **run(args.repeats)}
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
