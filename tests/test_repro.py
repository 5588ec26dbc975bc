"""`make run` = `cyclepref repro` + `cyclepref register`: every stage of a `dvc repro` is in MLflow, executed or
skipped (found by the DVC lock hash, never by params; outputs from git carry the committed metrics), and the reward
model is registered once per DVC output, with its lineage and its DPO adapters linked."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from flow_projects import GIT, ROOT, command_project
from typer.testing import CliRunner

from cyclepref.cli import app
from cyclepref.config import Retrain
from flows import lineage
from flows.repro import ReproResult, failed_stage, repro, stage_statuses
from flows.retrain import register_current

TRAIN = '''"""Logs a reward model the way train_reward does: a nested run per variant, with the data digest."""
import mlflow

from cyclepref import stage


def run(params, root):
    tags = {"cyclepref.stage": "train_reward", "cyclepref.variant": "combo"}
    with mlflow.start_run(run_name="train_reward/combo", nested=True, tags=tags) as variant:
        mlflow.log_param("data_digest", "d1g357")
        model = mlflow.initialize_logged_model(name="reward_model", source_run_id=variant.info.run_id)
        mlflow.finalize_logged_model(model.model_id, "READY")
    (root / "model.txt").write_text("trained")
    return {"variants": 1}


stage.main("train_reward", run)
'''

DPO = '''"""Logs a LoRA adapter as a logged model, as dpo_vlm does."""
from cyclepref import stage, tracking


def run(params, root):
    out = root / "adapter"
    out.mkdir(exist_ok=True)
    (out / "adapter_config.json").write_text("{}")
    tracking.log_adapter_model(out, "dpo_vlm_adapter")
    return {"steps": 1}


stage.main("dpo_vlm", run)
'''

REPORT = '''import json
from pathlib import Path

Path("reports").mkdir(exist_ok=True)
Path("reports/score.json").write_text(json.dumps({"accuracy": 0.75, "detail": {"n": 4}, "note": "text"}))
'''

STAGES = {
    "report": {"cmd": "python report.py", "deps": ["report.py", "model.txt"],
               "metrics": [{"reports/score.json": {"cache": False}}]},
    "dpo_vlm": {"cmd": "python dpo.py", "deps": ["dpo.py", "model.txt"], "outs": ["adapter"]},
    "train_reward": {"cmd": "python train.py", "deps": ["train.py"], "outs": ["model.txt"]},
}
FILES = {"train.py": TRAIN, "dpo.py": DPO, "report.py": REPORT}
CFG = Retrain(registered_model="cyclereward", benchmark="absent.jsonl")


@pytest.fixture
def project(mlflow_uri, tmp_path, monkeypatch):
    """A project as the working directory (MLflow artifact locations are relative to it); stage subprocesses
    import cyclepref from this checkout."""
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    path = command_project(tmp_path / "project", STAGES, FILES)
    monkeypatch.chdir(path)
    return path


def _quiet(line: str) -> None:
    pass


def test_every_stage_is_recorded_executed_then_skipped_by_lock_hash(project):
    first = repro(project, echo=_quiet)
    assert first.returncode == 0
    assert first.statuses == {"train_reward": "executed", "dpo_vlm": "executed", "report": "executed"}
    client = lineage.client(project)
    parent = client.get_run(first.parent_run_id)
    assert parent.data.tags["cyclepref.trigger"] == "make run" and parent.info.status == "FINISHED"
    kids = {k.info.run_name: k for k in lineage.children(client, first.parent_run_id)}
    assert set(kids) == set(first.statuses)
    locks = lineage.lock_entries(project)
    for stage, kid in kids.items():
        assert kid.data.tags[lineage.STATUS_TAG] == "executed"
        assert kid.data.tags[lineage.LOCK_TAG] == lineage.lock_hash(locks[stage])
    assert "repro_summary.md" in [a.path for a in client.list_artifacts(first.parent_run_id)]

    second = repro(project, echo=_quiet)
    assert set(second.statuses.values()) == {"skipped"}
    for skipped in lineage.children(client, second.parent_run_id):
        stage = skipped.info.run_name
        assert skipped.data.tags[lineage.SOURCE_TAG] == kids[stage].info.run_id
        assert skipped.data.tags[lineage.ORIGIN_TAG] == f"run {kids[stage].info.run_id}"


def test_the_reward_model_is_registered_once_with_lineage_and_linked_adapters(project):
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True).stdout.strip()
    repro(project, echo=_quiet)
    client = lineage.client(project)
    reg = register_current(client, project, CFG)
    assert (reg.name, reg.version, reg.created) == ("cyclereward", "1", True)
    tags = client.get_model_version("cyclereward", "1").tags
    assert tags["cyclepref.dvc_stage_hash"] == lineage.stage_lock_hash(project, "train_reward")
    assert tags["git.commit"] == head and tags["cyclepref.data_digest"] == "d1g357"
    assert tags["cyclepref.train_run_id"] == reg.train_run_id
    adapter = reg.adapters["dpo_vlm"]
    assert tags["cyclepref.adapter.dpo_vlm"] == f"models:/{adapter}"
    assert client.get_logged_model(adapter).tags["cyclepref.reward_model"] == "cyclereward/1"
    assert client.get_registered_model("cyclereward").aliases == {}

    repro(project, echo=_quiet)
    again = register_current(client, project, CFG)
    assert (again.version, again.created) == ("1", False)
    assert len(client.search_model_versions("name = 'cyclereward'")) == 1

    (project / "train.py").write_text(TRAIN.replace("d1g357", "n3wd4ta"))
    repro(project, echo=_quiet)
    newer = register_current(client, project, CFG)
    assert (newer.version, newer.created) == ("2", True)
    assert client.get_model_version("cyclereward", "2").tags["cyclepref.data_digest"] == "n3wd4ta"


def test_register_command_is_idempotent(project):
    runner = CliRunner()
    first = runner.invoke(app, ["register", "--root", str(project)])
    assert first.exit_code == 0 and "nothing registered" in first.output and "dvc.lock" in first.output
    repro(project, echo=_quiet)
    assert "version 1 registered" in runner.invoke(app, ["register", "--root", str(project)]).output
    assert "version 1 already registered" in runner.invoke(app, ["register", "--root", str(project)]).output


def test_outputs_from_git_carry_the_committed_metrics_and_params_never_match(project, _mlflow_template, monkeypatch):
    repro(project, echo=_quiet)
    subprocess.run([*GIT, "add", "-A"], cwd=project, check=True)
    subprocess.run([*GIT, "commit", "-qm", "outputs"], cwd=project, check=True)
    fresh = project.parent / "fresh.db"
    shutil.copy(_mlflow_template, fresh)
    monkeypatch.setenv("CYCLEPREF_MLFLOW_URI", f"sqlite:///{fresh}")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{fresh}")
    client = lineage.client(project)
    lookalike = client.create_run(lineage.experiment_id(client), run_name="report",
                                  tags={lineage.STAGE_TAG: "report"})
    client.set_terminated(lookalike.info.run_id, "FINISHED")

    result = repro(project, echo=_quiet)
    assert set(result.statuses.values()) == {"skipped"}
    kids = {k.info.run_name: k for k in lineage.children(client, result.parent_run_id)}
    report = kids["report"]
    assert lineage.SOURCE_TAG not in report.data.tags
    assert report.data.tags[lineage.ORIGIN_TAG].startswith("git ")
    assert report.data.metrics == {"accuracy": 0.75, "detail.n": 4.0}
    assert result.records["report"].origin == lineage.FROM_GIT
    assert kids["train_reward"].data.tags[lineage.ORIGIN_TAG] == "dvc cache or remote"
    assert result.records["train_reward"].producer_run_id is None


def test_a_failed_stage_fails_the_parent_and_is_named(mlflow_uri, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    stages = {"ok": {"cmd": "echo ok > ok.txt", "outs": ["ok.txt"]},
              "broken": {"cmd": "exit 3", "deps": ["ok.txt"], "outs": ["never.txt"]}}
    project = command_project(tmp_path / "broken", stages)
    result = repro(project, echo=_quiet)
    assert result.returncode != 0 and result.statuses == {"ok": "executed", "broken": "failed"}
    parent = lineage.client(project).get_run(result.parent_run_id)
    assert parent.info.status == "FAILED" and parent.data.tags["cyclepref.failed_stage"] == "broken"
    assert list(result.records) == ["ok"]


def test_stage_statuses_follow_dvc_output():
    lines = ["Running stage 'a':", "> echo a", "Stage 'b' didn't change, skipping",
             "Stage 'c' is cached - skipping run, checking out outputs", "Running stage 'd':"]
    statuses = stage_statuses(lines)
    assert statuses == {"a": "executed", "b": "skipped", "c": "skipped", "d": "executed"}
    assert failed_stage(ReproResult("p", 1, statuses=statuses)) == "d"
    assert failed_stage(ReproResult("p", 0, statuses=statuses)) is None
