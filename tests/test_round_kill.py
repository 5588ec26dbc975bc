"""A retraining round killed with SIGKILL (the round and every process it started, as a container stop or the OOM
killer ends them) while a stage runs, or between registering its model and moving aliases, leaves the aliases and
the data pool as they were, loses no arrival, frees the locks, and the next round completes with every input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from flow_projects import ROOT
from mlflow import MlflowClient
from test_flows_rounds import WORLD_N, pool_images, prepared_sources, sandbox

from cyclepref.world.arrivals import render_arrivals

pytestmark = pytest.mark.slow

SLOW_TRAIN = '''
import os, pathlib, time
if os.environ.get("KILL_POINT") == "stage":
    pathlib.Path("stage-started").touch()
    time.sleep(300)
'''

ROUND = """
import os, pathlib, sys
import flows.retrain as fr
if os.environ.get("KILL_POINT") == "promote":
    def held(*args, **kwargs):
        pathlib.Path("promote-reached").touch()
        __import__("time").sleep(300)
    fr.apply_decision = held
fr.retrain(root=sys.argv[1], trigger="test", stage_retries=0)
"""


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, stage processes in their own sessions included (/proc ppid links)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def kill_round_at(project: Path, point: str, marker: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "KILL_POINT": point}
    proc = subprocess.Popen([sys.executable, "-c", ROUND, str(project)], cwd=project, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while not (project / marker).exists():
        assert proc.poll() is None, f"the round ended before {marker}"
        assert time.monotonic() < deadline, f"no {marker} in 240 s"
        time.sleep(0.2)
    tree = [proc.pid, *descendants(proc.pid)]
    for pid in tree:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=30)
    (project / marker).unlink()


def stage_processes(project: Path) -> list[str]:
    """The round's stage processes (`dvc repro` and the stage command) running in `project`."""
    out = []
    for cwd in Path("/proc").glob("[0-9]*/cwd"):
        try:
            cmd = (cwd.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            if cwd.resolve() == project and ("dvc" in cmd or "train.py" in cmd):
                out.append(f"{cwd.parent.name}: {cmd}")
        except OSError:
            continue
    return out


def test_cancelling_a_scheduled_round_in_prefect_ends_its_stages_and_frees_the_dvc_lock_in_seconds(
    prefect_api, mlflow_uri, tmp_path
):
    """The deployment served as `cyclepref serve-schedule` serves it; the run is cancelled as the UI cancels it (state
    Cancelling through the API): Prefect's runner sends SIGTERM, the round ends its stage processes at once and
    retries none, so the run is Cancelled within seconds (before, the stages ran on after their flow was killed)."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.states import Cancelling

    project = sandbox(tmp_path / "sandbox")
    (project / "train.py").write_text(SLOW_TRAIN + (project / "train.py").read_text())
    subprocess.run(["git", "commit", "-qam", "slow train"], cwd=project, check=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "KILL_POINT": "stage", "PREFECT_RUNNER_POLL_FREQUENCY": "1"}
    cli = str(Path(sys.executable).parent / "cyclepref")
    server = subprocess.Popen([cli, "serve-schedule", "--root", str(project), "--cron", "0 0 1 1 *"], cwd=project,
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        run = None
        while run is None:
            assert server.poll() is None and time.monotonic() < deadline, "the deployment was not served"
            try:
                run = run_deployment("cyclepref-retrain/retrain-schedule", timeout=0)
            except Exception:
                time.sleep(1)
        while not (project / "stage-started").exists():
            assert time.monotonic() < deadline + 120, "the round's stage never started"
            time.sleep(0.5)
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(run.id, Cancelling(message="cancelled in the UI"), force=True)
            sent = time.monotonic()
            while stage_processes(project):
                assert time.monotonic() - sent < 30, f"stage processes alive: {stage_processes(project)}"
                time.sleep(0.5)
            stopped = time.monotonic() - sent
            while not client.read_flow_run(run.id).state.is_final():
                assert time.monotonic() - sent < 60
                time.sleep(0.5)
            assert client.read_flow_run(run.id).state.is_cancelled()
            cancelled = time.monotonic() - sent
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
        for line in stage_processes(project):
            os.kill(int(line.split(":")[0]), signal.SIGKILL)
    assert stopped < 10 and cancelled < 20, (stopped, cancelled)
    status = subprocess.run([sys.executable, "-m", "dvc", "status"], cwd=project, capture_output=True, text=True,
                            timeout=60)
    assert status.returncode == 0, status.stderr
    assert not MlflowClient(mlflow_uri).search_registered_models()


def state(project: Path, client: MlflowClient) -> dict:
    model = client.get_registered_model("cyclereward")
    return {"aliases": dict(model.aliases),
            "pool": {p.relative_to(project).as_posix(): p.read_bytes() for p in pool_images(project)},
            "pool_dvc": sorted(p.name for p in (project / "data/pool").glob("*.dvc"))}


def test_a_round_killed_at_a_stage_or_before_its_aliases_changes_nothing_and_the_next_round_completes(
    prefect_api, mlflow_uri, tmp_path, monkeypatch
):
    from flows.retrain import retrain

    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    project = sandbox(tmp_path / "sandbox")
    train = project / "train.py"
    train.write_text(SLOW_TRAIN + train.read_text())
    subprocess.run(["git", "commit", "-qam", "slow train"], cwd=project, check=True)
    client = MlflowClient(mlflow_uri)
    client.create_registered_model("cyclereward")
    (tmp_path / "model").mkdir()
    champion = client.create_model_version("cyclereward", str(tmp_path / "model")).version
    client.set_registered_model_alias("cyclereward", "champion", champion)

    render_arrivals(project / "incoming", 4, WORLD_N, 0)
    before = state(project, client)
    kill_round_at(project, "stage", "stage-started")
    after = state(project, client)
    assert after["aliases"] == before["aliases"] == {"champion": int(champion)}
    assert len(client.search_model_versions("name = 'cyclereward'")) == 1
    assert before["pool"] == {} and len(after["pool"]) == 4
    kill_round_at(project, "promote", "promote-reached")
    assert state(project, client)["aliases"] == before["aliases"]
    assert state(project, client)["pool"] == after["pool"]

    render_arrivals(project / "incoming", 1, WORLD_N, 0)
    last = retrain(root=str(project), trigger="test", stage_retries=0)
    assert last.ingested["images"] == 1
    pooled = {f"pool/{p.relative_to(project / 'data/pool').as_posix()}" for p in pool_images(project)}
    assert len(pooled) == 5 and pooled <= set(prepared_sources(project))
    assert json.loads((project / "trained_on.json").read_text()) == prepared_sources(project)
    assert client.get_registered_model("cyclereward").aliases["champion"] == int(champion)
    status = subprocess.run([sys.executable, "-m", "dvc", "status"], cwd=project, capture_output=True, text=True)
    assert status.returncode == 0 and "changed" not in status.stdout
