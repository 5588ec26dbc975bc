"""Sharing with a team: DVC outputs through a DVC remote (a fresh clone pulls instead of recomputing) and MLflow runs
and registered models through a tracking server with proxied artifacts (readable from another checkout)."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from flow_projects import GIT, ROOT, command_project
from PIL import Image
from servers import free_port, stop, wait_until_up

DVC = [sys.executable, "-m", "dvc"]
STAGES = {
    "make": {"cmd": "python -c \"open('data.txt', 'w').write('expensive result')\"", "outs": ["data.txt"]},
    "count": {"cmd": "python -c \"import json, os; os.makedirs('reports', exist_ok=True); "
                     "json.dump({'chars': len(open('data.txt').read())}, open('reports/count.json', 'w'))\"",
              "deps": ["data.txt"], "metrics": [{"reports/count.json": {"cache": False}}]},
}


def run(args: list[str], cwd: Path) -> str:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, check=True).stdout


def readme_dvc_sharing() -> tuple[list[str], list[str]]:
    """The commands of the README's DVC sharing block: (the owner's, the teammate's), one per `&&` part, comments
    removed."""
    text = (ROOT / "README.md").read_text()
    block = text.split("## Sharing with a team", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    owner: list[str] = []
    teammate: list[str] = []
    target = owner
    for line in block.splitlines():
        if line.strip().startswith("# a teammate"):
            target = teammate
        command = line.split("  #", 1)[0].strip()
        if command and not command.startswith("#"):
            target += [part.strip() for part in command.split("&&")]
    return owner, teammate


def play(commands: list[str], cwd: Path, remote: Path) -> str:
    """Run README commands in a project: the remote is a local directory, `make run` is the project's `dvc repro`,
    `make install` and `git push` (the clone reads the project directly) have nothing to do here."""
    out = ""
    for command in commands:
        if command in ("make install", "git push"):
            continue
        command = "dvc repro" if command == "make run" else command
        words = shlex.split(command.replace("/mnt/team/cyclepref-dvc", str(remote)))
        args = [*DVC, *words[1:]] if words[0] == "dvc" else [*GIT, *words[1:]] if words[0] == "git" else words
        out += run(args, cwd)
    return out


def test_the_readme_sharing_commands_let_a_fresh_clone_pull_and_run_nothing(tmp_path):
    owner, teammate = readme_dvc_sharing()
    assert any(c.startswith("dvc remote add") for c in owner) and "dvc push" in owner
    assert teammate[-2:] == ["dvc pull", "dvc status"]
    project = command_project(tmp_path / "project", STAGES)
    play(owner, project, tmp_path / "dvc-remote")
    assert (tmp_path / "dvc-remote").is_dir()

    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(project), str(clone)], tmp_path)
    assert not (clone / "data.txt").exists()
    status = play(teammate, clone, tmp_path / "dvc-remote")
    assert (clone / "data.txt").read_text() == "expensive result"
    assert "Data and pipelines are up to date." in status
    assert "Running stage" not in run([*DVC, "repro"], clone)


@pytest.fixture
def server(tmp_path):
    """`mlflow server` with proxied artifacts, as the README starts it for a team."""
    home = tmp_path / "server"
    home.mkdir()
    port = free_port()
    env = os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    log = open(home / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{home / 'mlflow.db'}", "--artifacts-destination",
         str(home / "mlartifacts")],
        cwd=home, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(proc, f"{url}/health", home / "server.log")
        yield url
    finally:
        stop(proc)
        log.close()


@pytest.mark.slow
def test_runs_and_the_registered_model_are_readable_from_another_checkout(server, tmp_path, monkeypatch):
    import mlflow
    from mlflow import MlflowClient

    from cyclepref import tracking
    from cyclepref.models import zoo
    from cyclepref.reward.model import RewardModel
    from cyclepref.reward.pyfunc import load_reward_model, log_reward_model

    monkeypatch.setenv("CYCLEPREF_MLFLOW_URI", server)
    mine, theirs = tmp_path / "mine", tmp_path / "theirs"
    mine.mkdir()
    theirs.mkdir()
    monkeypatch.chdir(mine)
    backbone = zoo.build("blip_itm", mine / "zoo", seed=0, image_size=32)
    RewardModel.from_backbone(str(backbone), seed=0, max_length=16).save_pretrained(mine / "reward")
    with tracking.stage_run("train_reward", None, "test") as run_:
        mlflow.log_text("hello", "notes/hello.txt")
        info = log_reward_model(mine / "reward")
    version = mlflow.register_model(info.model_uri, "cyclereward")
    MlflowClient(server).set_registered_model_alias("cyclereward", "champion", version.version)
    image = Image.new("RGB", (32, 32), "red")
    mine_score = load_reward_model("models:/cyclereward@champion").score([image], ["a red square"]).tolist()

    monkeypatch.chdir(theirs)
    client = MlflowClient(tracking.use_store())
    assert client.get_run(run_.info.run_id).info.artifact_uri.startswith("mlflow-artifacts:/")
    assert Path(client.download_artifacts(run_.info.run_id, "notes/hello.txt")).read_text() == "hello"
    their_score = load_reward_model("models:/cyclereward@champion").score([image], ["a red square"]).tolist()
    assert their_score == pytest.approx(mine_score)
    assert not (theirs / "mlruns").exists() and not (mine / "mlruns").exists()
