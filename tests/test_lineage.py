"""The flow's stage order is DVC's order. MLflow lineage: lock hashes, executed and skipped children, plain repro."""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from flow_projects import ROOT, command_project, repro_order

from flows import lineage
from flows.pipeline import ConfigError, stage_order, stage_plan

DIAMOND = {
    "report": {"cmd": "cat b.txt c.txt > report.txt", "deps": ["b.txt", "c.txt"], "outs": ["report.txt"]},
    "check": {
        "foreach": ["x", "y"],
        "do": {"cmd": "cat b.txt > check_${item}.txt", "deps": ["b.txt"], "outs": ["check_${item}.txt"]},
    },
    "b": {"cmd": "cat a.txt > b.txt", "deps": ["a.txt"], "outs": ["b.txt"]},
    "a": {"cmd": "echo a > a.txt", "outs": ["a.txt"]},
    "c": {"cmd": "cat a.txt > c.txt", "deps": ["a.txt"], "outs": ["c.txt"]},
}


def test_stage_order_equals_the_order_dvc_repro_runs(tmp_path):
    project = command_project(tmp_path / "diamond", DIAMOND)
    order = stage_order(project)
    assert order == repro_order(project)
    assert stage_order(project) == order
    assert sorted(order) == ["a", "b", "c", "check@x", "check@y", "report"]
    assert order.index("a") < order.index("b") < order.index("check@x")


def test_targets_plan_only_those_stages_and_their_upstream_in_dvc_order(tmp_path):
    project = command_project(tmp_path / "diamond", DIAMOND)
    order, upstream = stage_plan(project, targets=["c", "check@x"])
    assert order == repro_order(project, "c", "check@x") and sorted(order) == ["a", "b", "c", "check@x"]
    assert upstream["check@x"] == ["b"] and upstream["c"] == ["a"]
    with pytest.raises(ConfigError, match="nope"):
        stage_plan(project, targets=["nope"])


def test_a_retrain_round_of_this_repository_leaves_out_only_reports():
    from cyclepref.config import load_params

    stages = load_params(ROOT / "params.yaml").retrain.stages
    planned = stage_plan(ROOT, targets=stages)[0]
    assert set(stages) <= set(planned) and {"build_pairs", "prepare_inputs"} <= set(planned)
    assert sorted(set(stage_order(ROOT)) - set(planned)) == [
        "best_of_n", "evaluate_downstream", "evaluate_reward", "sandbox_report"]


def test_stage_order_of_this_repository_follows_its_dvc_graph():
    order = stage_order(ROOT)
    dvc = [sys.executable, "-m", "dvc"]
    listed = subprocess.run(
        [*dvc, "stage", "list", "--name-only"], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert sorted(order) == sorted(listed.stdout.split())
    assert len(order) == len(set(order))
    dot = subprocess.run([*dvc, "dag", "--dot"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    edges = re.findall(r'^"(.+)" -> "(.+)";$', dot, flags=re.MULTILINE)
    assert edges
    for upstream, downstream in edges:
        assert order.index(upstream) < order.index(downstream), (upstream, downstream)


def test_lock_hash_depends_on_content_not_key_order():
    entry = {"cmd": "python -m tasks.x", "deps": [{"path": "a", "md5": "1"}], "outs": [{"path": "b", "md5": "2"}]}
    assert lineage.lock_hash(entry) == lineage.lock_hash(dict(reversed(list(entry.items()))))
    changed = copy.deepcopy(entry)
    changed["outs"][0]["md5"] = "3"
    assert lineage.lock_hash(changed) != lineage.lock_hash(entry)


def _write_lock(root: Path, stages: dict) -> None:
    (root / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": stages}))


def test_executed_and_skipped_stages_become_children_of_the_pipeline_run(mlflow_uri, tmp_path, monkeypatch):
    from cyclepref.tracking import stage_run

    root = tmp_path
    entry = {"cmd": "python -m tasks.s", "outs": [{"path": "out", "md5": "abc", "size": 1}]}
    client = lineage.client(root)
    parent = lineage.start_pipeline_run(client, root, "flowtest", "test")
    assert client.get_run(parent).data.tags["dvc.lock.digest"] == "absent"
    monkeypatch.setenv(lineage.PARENT_ENV, parent)
    with stage_run("s", None, "flowtest") as own:
        pass
    _write_lock(root, {"s": entry})
    executed = lineage.record_executed(client, parent, "s", root)
    silent = lineage.record_executed(client, parent, "silent", root)
    lineage.finish_pipeline_run(client, parent, root, failed=False)

    assert executed.child_run_id == own.info.run_id == executed.producer_run_id
    tags = client.get_run(own.info.run_id).data.tags
    assert tags[lineage.PARENT_TAG] == parent
    assert tags[lineage.STATUS_TAG] == "executed" and tags[lineage.LOCK_TAG] == lineage.lock_hash(entry)
    placeholder = client.get_run(silent.child_run_id)
    assert placeholder.info.run_name == "silent" and placeholder.data.tags[lineage.PARENT_TAG] == parent
    done = client.get_run(parent)
    assert done.info.status == "FINISHED"
    assert done.data.tags["dvc.lock.digest_after"] == lineage.lock_digest(root) != "absent"

    second = lineage.start_pipeline_run(client, root, "flowtest", "test")
    skipped = lineage.record_skipped(client, second, "s", root)
    child = client.get_run(skipped.child_run_id)
    assert child.info.run_name == "s" and child.info.status == "FINISHED"
    assert child.data.tags[lineage.PARENT_TAG] == second
    assert child.data.tags[lineage.STATUS_TAG] == "skipped"
    assert child.data.tags[lineage.SOURCE_TAG] == own.info.run_id == skipped.producer_run_id
    assert own.info.run_id in child.data.tags["mlflow.note.content"]
    assert [r.info.run_id for r in lineage.children(client, second)] == [skipped.child_run_id]

    _write_lock(root, {"s": {**entry, "outs": [{"path": "out", "md5": "changed", "size": 1}]}})
    orphan = lineage.record_skipped(client, second, "s", root)
    assert orphan.producer_run_id is None and orphan.origin == lineage.FROM_DVC
    assert lineage.SOURCE_TAG not in client.get_run(orphan.child_run_id).data.tags


def test_plain_dvc_repro_logs_top_level_runs(mlflow_uri, tmp_path, monkeypatch):
    monkeypatch.delenv(lineage.PARENT_ENV, raising=False)
    monkeypatch.setenv("PATH", str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"])
    script = "from cyclepref.tracking import stage_run\nwith stage_run('logged', None, 't'):\n    open('out', 'w')\n"
    stages = {"logged": {"cmd": "python logged.py", "deps": ["logged.py"], "outs": ["out"]}}
    project = command_project(tmp_path / "plain", stages, files={"logged.py": script})
    subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=project, check=True, capture_output=True)
    client = lineage.client(project)
    runs = client.search_runs([lineage.experiment_id(client)], "tags.`cyclepref.stage` = 'logged'")
    assert len(runs) == 1
    assert lineage.PARENT_TAG not in runs[0].data.tags
    assert runs[0].info.status == "FINISHED"
