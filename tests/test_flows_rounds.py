"""Retraining rounds on a shrunk sandbox (issue 20): arrivals land in the DVC-tracked pool, reach prepared inputs and
the next stage of the round, survive every DVC checkout, and each round records its data version; the profile check
refuses a retrain target inside a stage output; two rounds never run at once; a signal ends a round's stages (and
the temporary Prefect server of a CLI flow)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from flow_projects import ROOT, init_repo
from mlflow import MlflowClient

from cyclepref.world.arrivals import render_arrivals
from cyclepref.world.data import part_of, scenes
from cyclepref.world.scene import caption, scene_from_record
from flows import lineage
from flows.pool import LOCK_FILE, RoundRunning, round_lock

TRAIN = '''"""Stands in for train_reward (logs a model as it does) and reads the prepared inputs, as the pairs do."""
import json

import mlflow
import pyarrow.parquet as pq

from cyclepref import stage


def run(params, root):
    sources = sorted(pq.read_table(root / "data/prepared/inputs.parquet").column("source").to_pylist())
    tags = {"cyclepref.stage": "train_reward", "cyclepref.variant": "combo"}
    with mlflow.start_run(run_name="train_reward/combo", nested=True, tags=tags) as variant:
        model = mlflow.initialize_logged_model(name="reward_model", source_run_id=variant.info.run_id)
        mlflow.finalize_logged_model(model.model_id, "READY")
    (root / "trained_on.json").write_text(json.dumps(sources))
    return {"inputs": len(sources)}


stage.main("train_reward", run)
'''

WORLD_N = 6


def sandbox(path: Path) -> Path:
    """make_world (real, 6 scenes) -> prepare_inputs (real, the world's scenes and the pool) -> gate@inputs (real) ->
    train_reward (reads the prepared inputs, behind their gate); the retrain watch folder is `incoming`, the pool
    data/pool as in the default profile."""
    params = yaml.safe_load((ROOT / "configs/tiny.yaml").read_text())
    keep = {k: params[k] for k in ("world", "prepare_inputs")}
    keep["gates"] = {"inputs": params["gates"]["inputs"]}
    keep["world"]["inputs"]["n"] = WORLD_N
    keep |= {"profile": "rounds", "bootstrap_models": {"build": []},
             "retrain": {"registered_model": "cyclereward", "benchmark": "absent.jsonl", "watch_dir": "incoming"}}
    stages = {
        "make_world": {"cmd": "python -m tasks.make_world", "params": ["world.inputs", "world.inputs_dir"],
                       "outs": ["data/world/inputs"]},
        "prepare_inputs": {"cmd": "python -m tasks.prepare_inputs", "params": ["prepare_inputs"],
                           "deps": ["${prepare_inputs.path}", "${prepare_inputs.pool}"], "outs": ["data/prepared"]},
        "gate": {"foreach": {"inputs": {"table": "data/prepared"}},
                 "do": {"cmd": "python -m tasks.gate ${key}", "deps": ["${item.table}"], "params": ["gates.${key}"],
                        "outs": [{"reports/dq/${key}.json": {"cache": False}},
                                 {"reports/dq/${key}.md": {"cache": False}}],
                        "metrics": [{"reports/metrics/gate_${key}.json": {"cache": False}}]}},
        "train_reward": {"cmd": "python train.py", "deps": ["train.py", "data/prepared", "reports/dq/inputs.json"],
                         "outs": ["trained_on.json"]},
    }
    path.mkdir(parents=True)
    (path / "params.yaml").write_text(yaml.safe_dump(keep, sort_keys=False))
    (path / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}, sort_keys=False))
    (path / "train.py").write_text(TRAIN)
    (path / "data/pool").mkdir(parents=True)
    (path / "data/pool/README.md").write_text((ROOT / "data/pool/README.md").read_text())
    return init_repo(path)


def prepared_sources(project: Path) -> list[str]:
    return sorted(pq.read_table(project / "data/prepared/inputs.parquet").column("source").to_pylist())


def pool_images(project: Path) -> list[Path]:
    return sorted((project / "data/pool").rglob("*.png"))


def test_the_profile_check_refuses_a_retrain_target_inside_a_stage_output(tmp_path):
    from typer.testing import CliRunner

    from cyclepref.cli import app

    project = sandbox(tmp_path / "p")
    params = yaml.safe_load((project / "params.yaml").read_text())
    runner = CliRunner()
    assert runner.invoke(app, ["profile", "check", str(project / "params.yaml"), "--dvc-file",
                               str(project / "dvc.yaml")]).exit_code == 0
    for key, section, value in (("pool", "prepare_inputs", "data/world/inputs"),
                                ("watch_dir", "retrain", "data/world/inputs/new")):
        bad = json.loads(json.dumps(params))
        bad[section][key] = value
        (project / "bad.yaml").write_text(yaml.safe_dump(bad))
        res = runner.invoke(app, ["profile", "check", str(project / "bad.yaml"), "--dvc-file",
                                  str(project / "dvc.yaml")])
        assert res.exit_code == 2
        assert f"{section}.{key} = {value} overlaps data/world/inputs, an output of stage make_world" in res.output


def test_arrivals_are_new_pipeline_scenes_never_drawn_before(tmp_path):
    watch = tmp_path / "incoming"
    first = render_arrivals(watch, 4, 20, 0)
    second = render_arrivals(watch, 3, 20, 0)
    assert (first["seed"], second["seed"]) == (1000, 1001)
    rows = [json.loads(line) for line in (watch / "texts.jsonl").read_text().splitlines()]
    assert len(rows) == 7 and all((watch / r["file"]).is_file() for r in rows)
    truth = [json.loads(line) for p in sorted((watch / ".arrivals").glob("*.jsonl"))
             for line in p.read_text().splitlines()]
    drawn = [scene_from_record(t["objects"]) for t in truth]
    assert all(part_of(s) == "pipeline" for s in drawn)
    world = {caption(s) for s in scenes("pipeline", 20, 0)}
    assert len({caption(s) for s in drawn}) == 7 and not world & {caption(s) for s in drawn}
    assert [r["caption"] for r in rows] == [caption(s) for s in drawn]
    with pytest.raises(ValueError, match="used before"):
        render_arrivals(watch, 1, 20, 0, seed=1000)


HOLDER = """
import sys, time
from pathlib import Path
from flows.pool import round_lock
with round_lock(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_second_round_while_one_runs_does_nothing_and_a_killed_round_frees_the_lock(tmp_path):
    from flows.retrain import retrain

    root = tmp_path / "repo"
    (root / ".dvc").mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(root)], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RoundRunning, match=f"pid {holder.pid}"):
            retrain.fn(root=str(root))
        assert not (root / "reports").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with round_lock(root):
        assert (root / LOCK_FILE).read_text() == str(os.getpid())


SLOW_ROUND = """
import sys
from pathlib import Path
from flows.pipeline import execute_stage
from flows.pool import stop_on_signals
with stop_on_signals():
    execute_stage("slow", Path(sys.argv[1]), dict(__import__("os").environ), 120, echo=print)
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_ends_the_stage_processes_and_releases_the_dvc_lock_in_seconds(tmp_path, sig):
    from flow_projects import command_project

    stage = {"slow": {"cmd": "python -c \"import time, pathlib; pathlib.Path('started').touch(); time.sleep(120)\"",
                      "outs": ["never.txt"]}}
    project = command_project(tmp_path / "p", stage)
    proc = subprocess.Popen([sys.executable, "-c", SLOW_ROUND, str(project)], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not (project / "started").exists():
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.2)
    sent = time.monotonic()
    proc.send_signal(sig)
    proc.wait(timeout=20)
    assert time.monotonic() - sent < 10
    assert processes_in(project, "time.sleep\\(120\\)") == []
    free = subprocess.run([sys.executable, "-m", "dvc", "status"], cwd=project, capture_output=True, text=True,
                          timeout=30)
    assert free.returncode == 0, free.stderr


def processes_in(folder: Path, pattern: str) -> list[str]:
    found = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()
    return [p for p in found if Path(f"/proc/{p}/cwd").resolve() == folder]


@pytest.mark.slow
def test_sigterm_to_a_cli_flow_ends_its_stages_and_its_temporary_prefect_server(tmp_path, mlflow_uri):
    from flow_projects import command_project

    stage = {"slow": {"cmd": "python -c \"import time, pathlib; pathlib.Path('started').touch(); time.sleep(120)\"",
                      "outs": ["never.txt"]}}
    project = command_project(tmp_path / "p", stage)
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env |= {"PYTHONPATH": str(ROOT), "PREFECT_HOME": str(tmp_path / "prefect"), "CYCLEPREF_MLFLOW_URI": mlflow_uri}
    server = "prefect.server.api.server:create_app"
    proc = subprocess.Popen([sys.executable, "-m", "cyclepref.cli", "pipeline", "--root", str(project)], cwd=project,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while not (project / "started").exists():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.2)
        assert processes_in(project, server)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 128 + signal.SIGTERM
        time.sleep(1)
        assert processes_in(project, "time.sleep\\(120\\)") == []
        assert processes_in(project, server) == []
    finally:
        proc.kill()
        for pid in processes_in(project, server) + processes_in(project, "time.sleep\\(120\\)"):
            os.kill(int(pid), signal.SIGKILL)


def test_make_runs_registration_takes_the_champion_decision(mlflow_uri, tmp_path, monkeypatch):
    """`cyclepref register` after `make run`: with no champion, the version becomes `champion` when it clears the
    floor, so models:/cyclereward@champion resolves; a rerun is recorded as its own round and moves nothing."""
    import numpy as np
    from flow_projects import command_project
    from test_repro import FILES, STAGES

    from cyclepref.config import Retrain
    from flows.repro import repro
    from flows.retrain import register_and_decide

    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    project = command_project(tmp_path / "made", STAGES, FILES)
    monkeypatch.chdir(project)
    (project / "bench.jsonl").write_text("".join(
        json.dumps({"id": f"p{i}", "task": "t2i", "prompt": "a red square", "chosen": "a.png", "rejected": "b.png"})
        + "\n" for i in range(100)))
    assert repro(project, echo=lambda line: None).returncode == 0
    client = lineage.client(project)
    cfg = Retrain(registered_model="cyclereward", benchmark="bench.jsonl")
    scored = {"model": np.r_[np.ones(80), np.zeros(20)], "floor": np.r_[np.ones(55), np.zeros(45)]}
    evaluate = lambda uri, bench, tasks, batch: scored["model"]  # noqa: E731
    floor = lambda root, bench, tasks, batch: {"backbone zero-shot": scored["floor"]}  # noqa: E731

    reg, out = register_and_decide(client, project, cfg, evaluate, floor)
    assert reg.version == "1" and out.decision.promote and "clears the floor" in out.decision.reason
    assert str(client.get_model_version_by_alias("cyclereward", "champion").version) == "1"
    again_reg, again = register_and_decide(client, project, cfg, evaluate, floor)
    assert again_reg.version == "1" and not again.decision.promote and "already the champion" in again.decision.reason
    tags = client.get_model_version("cyclereward", "1").tags
    assert tags["cyclepref.decision"] == "promoted"
    rounds = [json.loads(v)["decision"] for k, v in tags.items() if k.startswith("cyclepref.round.register-")]
    assert sorted(rounds) == ["kept", "promoted"]
