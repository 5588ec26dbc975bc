"""The pipeline and retraining flows on tiny real DVC projects (one Prefect test server per session), failure
classification and retries, hard timeouts, ingestion, the scheduled deployment and the CLI commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from flow_projects import ROOT, command_project, inputs_project
from mlflow import MlflowClient
from test_flows_rounds import WORLD_N, pool_images, prepared_sources, sandbox
from typer.testing import CliRunner

from cyclepref.world.arrivals import render_arrivals
from flows import lineage, uptodate
from flows.pipeline import (
    ConfigError,
    GateFailed,
    PipelineResult,
    StageFailed,
    StageOutcome,
    StageTimeout,
    TransientStageError,
    classify,
    execute_stage,
    pipeline,
    retry_transient,
    stage_env,
    stage_order,
)
from flows.retrain import ingest_inputs, retrain


@pytest.fixture
def stage_path(monkeypatch):
    """Stage subprocesses import tasks/ from this repository."""
    monkeypatch.setenv("PYTHONPATH", str(ROOT))


def _task_runs(flow_run_id: str) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))


def test_pipeline_flow_runs_stages_in_dvc_order_with_mlflow_lineage(
    prefect_api, mlflow_uri, stage_path, tmp_path, monkeypatch
):
    from prefect.artifacts import Artifact

    project = inputs_project(tmp_path / "project")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True).stdout.strip()
    client = MlflowClient(mlflow_uri)

    first = pipeline(root=str(project), trigger="test", stage_retries=0)
    assert first.stages == stage_order(project) == ["prepare_inputs", "gate@inputs", "summarise"]
    assert [(o.stage, o.status, o.attempts) for o in first.outcomes] == [
        (s, "executed", 1) for s in first.stages
    ]
    parent = client.get_run(first.parent_run_id)
    tags = parent.data.tags
    assert parent.info.status == "FINISHED" and parent.info.run_name == "pipeline"
    assert tags["cyclepref.trigger"] == "test" and tags["cyclepref.profile"] == "flowtest"
    assert tags["git.commit"] == head and tags["git.dirty"] in {"true", "false"}
    assert tags["dvc.lock.digest"] == "absent" and tags["dvc.lock.digest_after"] == lineage.lock_digest(project)
    kids = lineage.children(client, first.parent_run_id)
    assert [k.info.run_name for k in kids] == first.stages
    locks = lineage.lock_entries(project)
    for kid, outcome in zip(kids, first.outcomes, strict=True):
        assert kid.info.run_id == outcome.child_run_id and kid.info.status == "FINISHED"
        assert kid.data.tags[lineage.STATUS_TAG] == "executed"
        assert kid.data.tags[lineage.LOCK_TAG] == lineage.lock_hash(locks[outcome.stage])
        assert "stage_seconds" in kid.data.metrics
    assert kids[0].data.params["source"] == "folder" and kids[1].data.metrics["success"] == 1.0
    assert kids[2].data.metrics["rows"] == 16.0

    second = pipeline(root=str(project), trigger="test", stage_retries=0)
    assert [o.status for o in second.outcomes] == ["skipped"] * 3
    skipped = lineage.children(client, second.parent_run_id)
    assert [k.info.run_name for k in skipped] == second.stages
    assert [k.data.tags[lineage.SOURCE_TAG] for k in skipped] == [o.child_run_id for o in first.outcomes]
    assert client.get_run(second.parent_run_id).data.tags["dvc.lock.digest"] == tags["dvc.lock.digest_after"]

    first_states = {t.name: t.state.name for t in _task_runs(parent.data.tags["prefect.flow_run_id"])}
    second_tags = client.get_run(second.parent_run_id).data.tags
    second_states = {t.name: t.state.name for t in _task_runs(second_tags["prefect.flow_run_id"])}
    assert set(first_states.values()) == {"Completed"} and set(second_states.values()) == {"Skipped"}

    summary = Artifact.get("pipeline-summary")
    assert "0 stage(s) run, 3 skipped as up to date" in summary.data
    assert "| `gate@inputs` | skipped | " in summary.data and first.outcomes[1].child_run_id in summary.data
    gate_rows = json.loads(Artifact.get("gate-inputs").data)
    assert gate_rows and all(row["success"] for row in gate_rows)
    cells = [row[k] for row in gate_rows for k in ("observed", "expected")]
    assert "\\>= 1 rows" in cells and not any(c.startswith(">") for c in cells)
    assert second.parent_run_id in Artifact.get("mlflow-pipeline-run").data
    monkeypatch.chdir(project)
    assert "pipeline_summary.md" in [a.path for a in client.list_artifacts(second.parent_run_id)]


def test_gate_failure_fails_retrain_without_retry_and_leaves_aliases(prefect_api, mlflow_uri, stage_path, tmp_path):
    project = inputs_project(tmp_path / "project", min_rows=1000)
    client = MlflowClient(mlflow_uri)
    client.create_registered_model("cyclereward")
    champion = client.create_model_version("cyclereward", source=str(tmp_path), run_id=None)
    client.set_registered_model_alias("cyclereward", "champion", champion.version)

    with pytest.raises(GateFailed, match="gate@inputs"):
        retrain(root=str(project), trigger="test", stage_retries=3, retry_delay_s=0)

    assert {k: str(v) for k, v in client.get_registered_model("cyclereward").aliases.items()} == {"champion": "1"}
    assert len(client.search_model_versions("name = 'cyclereward'")) == 1
    exp = lineage.experiment_id(client)
    gate_runs = client.search_runs([exp], "tags.`cyclepref.stage` = 'gate@inputs'")
    assert len(gate_runs) == 1 and gate_runs[0].info.status == "FAILED"
    [parent] = client.search_runs([exp], "tags.`cyclepref.kind` = 'pipeline'")
    assert parent.info.status == "FAILED" and parent.data.tags["cyclepref.failed_stage"] == "gate@inputs"
    assert not any(k.startswith("retrain.") for k in parent.data.tags)
    runs = {t.name: t for t in _task_runs(parent.data.tags["prefect.flow_run_id"])}
    assert runs["gate@inputs"].state.is_failed() and runs["gate@inputs"].run_count == 1
    assert runs["prepare_inputs"].state.is_completed()
    assert json.loads((project / "reports/dq/inputs.json").read_text())["success"] is False


TRAIN = '''"""Logs a model the way train_reward does: a nested run per variant inside the stage's run."""
import mlflow

from cyclepref import stage


def run(params, root):
    tags = {"cyclepref.stage": "train_reward", "cyclepref.variant": "combo"}
    with mlflow.start_run(run_name="train_reward/combo", nested=True, tags=tags) as variant:
        model = mlflow.initialize_logged_model(name="reward_model", source_run_id=variant.info.run_id)
        mlflow.finalize_logged_model(model.model_id, "READY")
    (root / "model.txt").write_text(model.model_id)
    return {"variants": 1}


stage.main("train_reward", run)
'''


def test_retrain_flow_ingests_registers_and_records_the_decision(prefect_api, mlflow_uri, tmp_path, monkeypatch):
    from prefect.artifacts import Artifact

    stages = {"train_reward": {"cmd": "python train.py", "deps": ["train.py"], "outs": ["model.txt"]}}
    files = {"train.py": TRAIN, "data/inputs/texts.jsonl": "", "incoming/texts.jsonl": '{"prompt": "a red cube"}\n'}
    retrain_params = {"registered_model": "cyclereward", "benchmark": "absent.jsonl", "watch_dir": "incoming"}
    project = command_project(tmp_path / "retrain", stages, files, {"retrain": retrain_params})
    client = MlflowClient(mlflow_uri)

    first = retrain(root=str(project), trigger="test", stage_retries=0)
    assert first.ingested == {"images": 0, "texts": 1, "quarantined": 0}
    [batch] = [p for p in (project / "data/pool").iterdir() if p.is_dir()]
    assert (batch / "texts.jsonl").read_text() == '{"prompt": "a red cube"}\n'
    assert (project / "data/pool" / f"{batch.name}.dvc").exists()
    assert (first.challenger_version, first.champion_version, first.decision.promote) == ("1", None, False)
    assert "benchmark missing" in first.decision.reason
    version = client.get_model_version("cyclereward", "1")
    assert version.source == f"models:/{(project / 'model.txt').read_text()}"
    assert version.tags["cyclepref.pipeline_run_id"] == first.pipeline_run_id
    assert version.tags["cyclepref.decision"] == "kept"
    assert {k: str(v) for k, v in client.get_registered_model("cyclereward").aliases.items()} == {"challenger": "1"}
    parent = client.get_run(first.pipeline_run_id)
    assert parent.data.tags["retrain.decision"] == "kept"
    monkeypatch.chdir(project)
    assert "retrain_decision.md" in [a.path for a in client.list_artifacts(first.pipeline_run_id)]
    assert "kept the champion" in Artifact.get("retrain-decision").data

    second = retrain(root=str(project), trigger="test", stage_retries=0)
    assert second.ingested == {"images": 0, "texts": 0, "quarantined": 0}
    assert second.challenger_version == "1"
    assert len(client.search_model_versions("name = 'cyclereward'")) == 1
    [skipped] = lineage.children(client, second.pipeline_run_id)
    assert skipped.data.tags[lineage.STATUS_TAG] == "skipped"
    assert skipped.data.tags[lineage.SOURCE_TAG] == lineage.children(client, first.pipeline_run_id)[0].info.run_id


def test_transient_failure_is_retried_and_silent_stage_gets_a_child(prefect_api, mlflow_uri, tmp_path):
    flaky = (
        "import os, pathlib, signal; p = pathlib.Path('attempted'); first = not p.exists(); p.touch(); "
        "first and os.kill(os.getpid(), signal.SIGKILL); pathlib.Path('flaky.txt').write_text('ok')"
    )
    project = command_project(tmp_path / "flaky", {"flaky": {"cmd": f'python -c "{flaky}"', "outs": ["flaky.txt"]}})
    result = pipeline(root=str(project), trigger="test", stage_retries=2, retry_delay_s=0)
    [outcome] = result.outcomes
    assert (outcome.status, outcome.attempts) == ("executed", 2)
    child = MlflowClient(mlflow_uri).get_run(outcome.child_run_id)
    assert child.info.run_name == "flaky" and child.data.tags[lineage.PARENT_TAG] == result.parent_run_id


def test_stage_timeout_kills_the_whole_process_group(tmp_path):
    sleeper = "import os, pathlib, time; pathlib.Path('pid').write_text(str(os.getpid())); time.sleep(120)"
    project = command_project(tmp_path / "slow", {"slow": {"cmd": f'python -c "{sleeper}"', "outs": ["never.txt"]}})
    started = time.monotonic()
    with pytest.raises(StageTimeout) as err:
        execute_stage("slow", project, stage_env(project, "parent"), timeout_s=8, echo=lambda line: None)
    assert err.value.transient and time.monotonic() - started < 60
    pid = int((project / "pid").read_text())
    for _ in range(50):
        if not Path(f"/proc/{pid}").exists():
            break
        time.sleep(0.1)
    assert not Path(f"/proc/{pid}").exists()


def _gate_report(root: Path, name: str, success: bool) -> None:
    path = root / "reports/dq" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"gate": name, "success": success, "checks": {}}))


def test_failures_are_classified(tmp_path):
    failed = "ERROR: failed to reproduce 'x': failed to run: python -m tasks.x, exited with {}"
    assert type(classify("x", 255, failed.format(2), tmp_path)) is ConfigError
    assert type(classify("x", 255, "ERROR: './dvc.yaml' is invalid.", tmp_path)) is ConfigError
    _gate_report(tmp_path, "pairs", success=False)
    assert type(classify("gate@pairs", 255, failed.format(1), tmp_path)) is GateFailed
    _gate_report(tmp_path, "inputs", success=True)
    assert type(classify("gate@inputs", 255, failed.format(1), tmp_path)) is StageFailed
    assert type(classify("x", 255, "ValueError: bad\n" + failed.format(1), tmp_path)) is StageFailed
    assert type(classify("x", 255, failed.format(-9), tmp_path)) is TransientStageError
    assert type(classify("x", 255, "ERROR: Unable to acquire lock. Most likely", tmp_path)) is TransientStageError
    assert type(classify("x", -15, "", tmp_path)) is TransientStageError
    crashed = "Traceback (most recent call last):\nrequests.exceptions.ConnectionError: reset\n" + failed.format(1)
    assert type(classify("x", 255, crashed, tmp_path)) is TransientStageError
    assert not any(e.transient for e in (ConfigError("x", ""), GateFailed("x", ""), StageFailed("x", "")))


def test_only_transient_errors_are_retried():
    from prefect.states import Completed, Failed

    assert retry_transient(None, None, Failed(data=TransientStageError("x", "lock")))
    assert retry_transient(None, None, Failed(data=StageTimeout("x", "slow")))
    for err in (GateFailed("gate@x", "failed"), ConfigError("x", "exit 2"), StageFailed("x", "exit 1"), OSError()):
        assert not retry_transient(None, None, Failed(data=err))
    assert not retry_transient(None, None, Completed(data=1))


def test_ingest_moves_new_inputs_once(tmp_path):
    watch, pool = tmp_path / "watch", tmp_path / "data" / "pool"
    (watch / "batch").mkdir(parents=True)
    (watch / "batch" / "new.png").write_bytes(b"png")
    (watch / "texts.jsonl").write_text('{"file": "batch/new.png", "prompt": "new"}\n{"prompt": "text only"}\n')

    assert ingest_inputs(watch, pool) == {"images": 1, "texts": 2, "quarantined": 0}
    [batch] = [p for p in pool.iterdir() if p.is_dir()]
    rows = [json.loads(line) for line in (batch / "texts.jsonl").read_text().splitlines()]
    assert rows == [{"file": "batch/new.png", "prompt": "new"}, {"prompt": "text only"}]
    assert (batch / rows[0]["file"]).read_bytes() == b"png"
    assert not (watch / "texts.jsonl").exists() and list((watch / ".ingested").rglob("new.png"))
    assert ingest_inputs(watch, pool) == {"images": 0, "texts": 0, "quarantined": 0}


def test_deployment_is_cron_scheduled_with_concurrency_one(monkeypatch, tmp_path):
    from prefect.client.schemas.objects import ConcurrencyLimitStrategy

    from flows.deploy import build_deployment

    monkeypatch.setenv("CYCLEPREF_RETRAIN_CRON", "15 2 * * 1")
    deployment = build_deployment(tmp_path)
    [schedule] = deployment.schedules
    assert (schedule.schedule.cron, schedule.schedule.timezone) == ("15 2 * * 1", "UTC")
    assert deployment.concurrency_limit == 1
    assert deployment.concurrency_options.collision_strategy == ConcurrencyLimitStrategy.ENQUEUE
    assert deployment.parameters == {"root": str(tmp_path.resolve()), "trigger": "schedule", "ingest": True}
    assert deployment.entrypoint == "flows/retrain.py:retrain"
    assert build_deployment(tmp_path, cron="0 * * * *", timezone="Europe/Paris").schedules[0].schedule.timezone == (
        "Europe/Paris"
    )


def test_cli_commands_call_the_flows(monkeypatch, tmp_path):
    import flows.deploy
    import flows.pipeline
    from cyclepref.cli import app

    calls: dict[str, dict] = {}

    def fake_pipeline(**kwargs):
        calls["pipeline"] = kwargs
        outcome = StageOutcome("prepare_inputs", "skipped", 0.4, 1, "child", "source", "hash")
        return PipelineResult("parent-run", "0", "flowtest", ["prepare_inputs"], [outcome])

    monkeypatch.setattr(flows.pipeline, "pipeline", fake_pipeline)
    monkeypatch.setattr(flows.deploy, "serve_schedule", lambda *args: calls.setdefault("serve", args))
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    runner = CliRunner()
    result = runner.invoke(app, ["pipeline", "--root", str(tmp_path), "--timeout-s", "60", "--retries", "0"])
    assert result.exit_code == 0, result.output
    assert calls["pipeline"] == {"root": str(tmp_path.resolve()), "trigger": "cli", "stage_timeout_s": 60.0,
                                 "stage_retries": 0}
    assert "prepare_inputs\tskipped" in result.output and "parent-run" in result.output
    cwd = os.getcwd()
    try:
        result = runner.invoke(app, ["serve-schedule", "--root", str(tmp_path), "--cron", "0 4 * * *"])
    finally:
        os.chdir(cwd)
    assert result.exit_code == 0, result.output
    assert calls["serve"] == (tmp_path.resolve(), "0 4 * * *", None, "retrain-schedule")
    assert runner.invoke(app, ["pipeline", "--root", str(tmp_path / "missing")]).exit_code == 2


def test_cli_reports_a_config_error_with_exit_2(monkeypatch, tmp_path):
    import flows.pipeline
    from cyclepref.cli import app

    def broken(**kwargs):
        raise ConfigError("params.yaml", "invalid")

    monkeypatch.setattr(flows.pipeline, "pipeline", broken)
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    result = CliRunner().invoke(app, ["pipeline", "--root", str(tmp_path)])
    assert result.exit_code == 2 and "invalid" in result.output


@pytest.mark.slow
def test_noop_pipeline_starts_no_stage_process_and_reruns_what_changed(prefect_api, mlflow_uri, tmp_path, monkeypatch):
    """One `dvc status` decides the up-to-date stages: a no-op run starts no `dvc repro` process; after an input
    changes, its stage and every stage below it go through DVC again."""
    import flows.pipeline as fp

    copy = 'python -c "import shutil, sys; shutil.copy(sys.argv[1], sys.argv[2])" {} {}'
    stages = {"a": {"cmd": copy.format("in.txt", "a.txt"), "deps": ["in.txt"], "outs": ["a.txt"]},
              "b": {"cmd": copy.format("a.txt", "b.txt"), "deps": ["a.txt"], "outs": ["b.txt"]},
              "c": {"cmd": copy.format("other.txt", "c.txt"), "deps": ["other.txt"], "outs": ["c.txt"]}}
    project = command_project(tmp_path / "chain", stages, files={"in.txt": "1\n", "other.txt": "x\n"})
    first = pipeline(root=str(project), trigger="test", stage_retries=0)
    assert sorted(o.status for o in first.outcomes) == ["executed"] * 3
    started: list[str] = []
    real = fp.execute_stage
    monkeypatch.setattr(fp, "execute_stage", lambda stage, *a, **k: started.append(stage) or real(stage, *a, **k))

    second = pipeline(root=str(project), trigger="test", stage_retries=0)
    assert started == [] and [o.status for o in second.outcomes] == ["skipped"] * 3
    kids = lineage.children(MlflowClient(mlflow_uri), second.parent_run_id)
    producers = {o.stage: o.child_run_id for o in first.outcomes}
    assert {k.info.run_name: k.data.tags[lineage.SOURCE_TAG] for k in kids} == producers

    assert uptodate.current(project).parent_run_id == second.parent_run_id
    (project / "in.txt").write_text("2\n")
    assert uptodate.current(project) is None
    third = pipeline(root=str(project), trigger="test", stage_retries=0)
    assert sorted(started) == ["a", "b"]
    assert {o.stage: o.status for o in third.outcomes} == {"a": "executed", "b": "executed", "c": "skipped"}
    assert (project / "b.txt").read_text() == "2\n"


def test_a_noop_cli_pipeline_reports_the_run_that_recorded_this_state_and_records_nothing(
    mlflow_uri, tmp_path, monkeypatch
):
    """After a whole-pipeline record (`make run`'s `cyclepref repro` here), a `cyclepref pipeline` with nothing to run
    starts no flow and no MLflow run; a changed input, a changed dvc.lock, another store or --record run the flow."""
    import flows.pipeline
    from cyclepref.cli import app
    from flows.repro import repro

    copy = 'python -c "import shutil, sys; shutil.copy(sys.argv[1], sys.argv[2])" {} {}'
    stages = {"a": {"cmd": copy.format("in.txt", "a.txt"), "deps": ["in.txt"], "outs": ["a.txt"]}}
    project = command_project(tmp_path / "p", stages, files={"in.txt": "1\n"})
    made = repro(project, echo=lambda line: None)
    assert made.returncode == 0
    calls: list[dict] = []
    monkeypatch.setattr(flows.pipeline, "pipeline", lambda **kw: calls.append(kw) or PipelineResult(
        "new-run", "0", "flowtest", ["a"]))
    client = MlflowClient(mlflow_uri)
    runs = len(client.search_runs([lineage.experiment_id(client)]))

    def cli(*extra: str) -> str:
        done = CliRunner().invoke(app, ["pipeline", "--root", str(project), *extra])
        assert done.exit_code == 0, done.output
        return done.output

    out = cli()
    assert calls == [] and f"recorded by MLflow run {made.parent_run_id}" in out and "1 stages" in out
    assert len(client.search_runs([lineage.experiment_id(client)])) == runs
    assert "new-run" in cli("--record") and len(calls) == 1
    (project / "in.txt").write_text("2\n")
    assert "new-run" in cli() and len(calls) == 2
    subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=project, check=True, capture_output=True)
    assert "new-run" in cli() and len(calls) == 3
    assert repro(project, echo=lambda line: None).returncode == 0 and "up to date" in cli()
    monkeypatch.setenv("CYCLEPREF_MLFLOW_URI", f"sqlite:///{tmp_path / 'other.db'}")
    assert "new-run" in cli() and len(calls) == 4


@pytest.fixture
def sandbox_project(prefect_api, mlflow_uri, tmp_path, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    return sandbox(tmp_path / "sandbox")


def with_report_stage(project: Path) -> None:
    """A stage downstream of train_reward, as the reports are, that a round with `retrain.stages` leaves out."""
    (project / "report.py").write_text("import shutil\n\nshutil.copy('trained_on.json', 'report.json')\n")
    dvc_yaml = yaml.safe_load((project / "dvc.yaml").read_text())
    dvc_yaml["stages"]["report"] = {"cmd": "python report.py", "deps": ["report.py", "trained_on.json"],
                                    "outs": ["report.json"]}
    (project / "dvc.yaml").write_text(yaml.safe_dump(dvc_yaml, sort_keys=False))


@pytest.mark.slow
def test_two_rounds_keep_every_ingested_input_and_record_their_data_version(sandbox_project, mlflow_uri):
    project = sandbox_project
    client = MlflowClient(mlflow_uri)
    render_arrivals(project / "incoming", 3, WORLD_N, 0)
    with_report_stage(project)
    first = retrain(root=str(project), trigger="test", stage_retries=0)
    assert first.ingested == {"images": 3, "texts": 3, "quarantined": 0}
    render_arrivals(project / "incoming", 2, WORLD_N, 0)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["retrain"]["stages"] = ["train_reward"]
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    second = retrain(root=str(project), trigger="test", stage_retries=0)
    assert second.ingested == {"images": 2, "texts": 2, "quarantined": 0}
    planned = [client.get_run(r.pipeline_run_id).data.tags["cyclepref.stages"].split(",") for r in (first, second)]
    assert planned[0][-2:] == ["train_reward", "report"] and "report" not in planned[1]
    assert "train_reward" in planned[1]
    record = json.loads((project / uptodate.RECORD).read_text())
    assert record["parent_run_id"] == first.pipeline_run_id

    batches = sorted(p.name for p in (project / "data/pool").iterdir() if p.is_dir())
    assert len(batches) == 2 and all((project / "data/pool" / f"{b}.dvc").exists() for b in batches)
    pooled = [f"pool/{p.relative_to(project / 'data/pool').as_posix()}" for p in pool_images(project)]
    assert len(pooled) == 5
    sources = prepared_sources(project)
    assert len(sources) == WORLD_N + 5 and set(pooled) <= set(sources)
    assert json.loads((project / "trained_on.json").read_text()) == sources
    assert len(json.loads((project / "report.json").read_text())) == WORLD_N + 3

    lock = lineage.lock_entries(project)
    [pool_dep] = [d for d in lock["prepare_inputs"]["deps"] if d["path"] == "data/pool"]
    for out in (first, second):
        version = client.get_model_version("cyclereward", out.challenger_version).tags
        run = client.get_run(out.pipeline_run_id).data.tags
        assert run["retrain.data.pool_batches"] == ("1" if out is first else "2")
        assert run["retrain.data.git_commit"] == version["cyclepref.data.git_commit"] != "unknown"
    tags = client.get_run(second.pipeline_run_id).data.tags
    assert tags["retrain.data.pool_md5"] == pool_dep["md5"]
    assert tags["retrain.data.dvc_lock_sha256"] == lineage.lock_digest(project)
    rounds = json.loads((project / "reports/retrain_rounds.json").read_text())
    assert [r["ingested"]["images"] for r in rounds] == [3, 2] and all(r["seconds"] > 0 for r in rounds)
    assert "| 2 |" in (project / "reports/retrain_rounds.md").read_text()

    dvc = [sys.executable, "-m", "dvc"]
    before = {p: p.read_bytes() for p in pool_images(project)}
    (project / "data/world/inputs/scene-00000.png").unlink()
    subprocess.run([*dvc, "checkout", "--force"], cwd=project, check=True, capture_output=True)
    subprocess.run([*dvc, "repro", "--force", "make_world"], cwd=project, check=True, capture_output=True)
    assert (project / "data/world/inputs/scene-00000.png").exists()
    assert {p: p.read_bytes() for p in pool_images(project)} == before
    status = subprocess.run([*dvc, "status", "data/pool/" + batches[0] + ".dvc"], cwd=project, capture_output=True,
                            text=True, check=True).stdout
    assert "changed" not in status
