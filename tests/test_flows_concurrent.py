"""Independent stages run concurrently in the pipeline flow: the scheduler's rules on fake futures, and a stress test
on a real toy DVC project (four independent branches started at once, no stagger) whose dvc.lock must come out
complete and identical to a serial `dvc repro`, with every stage in MLflow."""

from __future__ import annotations

import concurrent.futures
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from flow_projects import command_project
from mlflow import MlflowClient

from flows import lineage, settings
from flows.pipeline import StageScheduler, TransientStageError, classify, is_lock_race, pipeline, stage_plan

BRANCHES = ["b1", "b2", "b3", "b4"]
STAMP = (
    "import pathlib, sys, time; name = sys.argv[1]; log = pathlib.Path('../times'); log.mkdir(exist_ok=True); "
    "(log / (name + '.start')).write_text(repr(time.time())); time.sleep(2); "
    "pathlib.Path(name + '.txt').write_text(pathlib.Path('root.txt').read_text() + name); "
    "(log / (name + '.end')).write_text(repr(time.time()))"
)


class FakeFuture:
    """A Prefect-future stand-in: `wrapped_future` is a concurrent future, `result()` its value."""

    def __init__(self, inner: concurrent.futures.Future):
        self.wrapped_future = inner

    def result(self):
        return self.wrapped_future.result()


def _fake_submit(pool, log, lock, fail=(), seconds=0.2):
    def work(stage, gpu):
        with lock:
            log.append(("start", stage, gpu))
        time.sleep(seconds)
        with lock:
            log.append(("end", stage, gpu))
        if stage in fail:
            raise RuntimeError(f"{stage} failed")
        return stage

    return lambda stage, gpu: FakeFuture(pool.submit(work, stage, gpu))


DAG = {"prep": [], "a1": ["prep"], "a2": ["a1"], "b1": ["prep"], "b2": ["b1"], "gate_a": ["a2"], "gate_b": ["b2"],
       "join": ["gate_a", "gate_b"]}
ORDER = ["prep", "a1", "a2", "gate_a", "b1", "b2", "gate_b", "join"]


def _max_running(log) -> int:
    running = peak = 0
    for kind, *_ in log:
        running += 1 if kind == "start" else -1
        peak = max(peak, running)
    return peak


def test_limit_one_is_dvc_order_and_higher_limits_overlap_independent_stages():
    for limit, expect_peak in ((1, 1), (2, 2), (4, 2)):
        log, lock = [], threading.Lock()
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            scheduler = StageScheduler(ORDER, DAG, limit)
            scheduler.run(_fake_submit(pool, log, lock))
        assert scheduler.outcomes() == ORDER
        assert _max_running(log) == expect_peak
        starts = [s for kind, s, _ in log if kind == "start"]
        ends = [s for kind, s, _ in log if kind == "end"]
        for stage, ups in DAG.items():
            assert all(ends.index(u) < ends.index(stage) and starts.index(stage) > starts.index(u) for u in ups)
        if limit == 1:
            assert starts == ORDER


def test_each_running_stage_holds_its_own_gpu():
    log, lock = [], threading.Lock()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        StageScheduler(ORDER, DAG, 2, ["0", "1"]).run(_fake_submit(pool, log, lock))
    held: dict[str, str] = {}
    for kind, stage, gpu in log:
        assert gpu in ("0", "1")
        if kind == "start":
            assert gpu not in held.values()
            held[stage] = gpu
        else:
            del held[stage]


def test_after_a_failure_nothing_new_starts_and_running_stages_finish():
    log, lock = [], threading.Lock()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        scheduler = StageScheduler(ORDER, DAG, 2)
        with pytest.raises(RuntimeError, match="a1 failed"):
            scheduler.run(_fake_submit(pool, log, lock, fail={"a1"}))
    started = {s for kind, s, _ in log if kind == "start"}
    assert scheduler.failed == "a1"
    assert "a2" not in started and "join" not in started
    assert "b1" in scheduler.outcomes()
    assert {s for kind, s, _ in log if kind == "end"} == started


def test_lock_races_are_recognised_as_transient(tmp_path):
    busy = "ERROR: '/p/dvc.yaml' is busy, it is being blocked by:\n  (PID 12: dvc repro)\n"
    for output in (busy, "ERROR: Unable to acquire lock. Most likely another DVC process is running"):
        err = classify("b1", 255, output, tmp_path)
        assert isinstance(err, TransientStageError) and is_lock_race(err)
    assert not is_lock_race(classify("b1", -9, "", tmp_path))


def test_concurrency_settings(monkeypatch):
    monkeypatch.delenv("CYCLEPREF_CONCURRENT_STAGES", raising=False)
    monkeypatch.delenv("CYCLEPREF_STAGE_GPUS", raising=False)
    assert settings.concurrent_stages() == 1 and settings.stage_gpus() == []
    monkeypatch.setenv("CYCLEPREF_STAGE_GPUS", "0, 1,2")
    assert settings.stage_gpus() == ["0", "1", "2"] and settings.concurrent_stages() == 3
    monkeypatch.setenv("CYCLEPREF_CONCURRENT_STAGES", "0")
    with pytest.raises(ValueError, match="CYCLEPREF_CONCURRENT_STAGES"):
        settings.concurrent_stages()


def _toy(path: Path) -> Path:
    stages = {"root": {"cmd": "python -c \"import pathlib; pathlib.Path('root.txt').write_text('r')\"",
                       "outs": ["root.txt"]}}
    for b in BRANCHES:
        stages[b] = {"cmd": f'python -c "{STAMP}" {b}', "deps": ["root.txt"], "outs": [f"{b}.txt"]}
    stages["join"] = {"cmd": "cat " + " ".join(f"{b}.txt" for b in BRANCHES) + " > join.txt",
                      "deps": [f"{b}.txt" for b in BRANCHES], "outs": ["join.txt"]}
    return command_project(path, stages)


def _lock(project: Path) -> dict:
    return yaml.safe_load((project / "dvc.lock").read_text())


def test_concurrent_flow_writes_the_same_dvc_lock_as_a_serial_repro(prefect_api, mlflow_uri, tmp_path, monkeypatch):
    serial = _toy(tmp_path / "serial" / "proj")
    subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=serial, check=True, capture_output=True)
    concurrent_project = _toy(tmp_path / "concurrent" / "proj")
    order, upstream = stage_plan(concurrent_project)
    assert upstream["join"] == BRANCHES and all(upstream[b] == ["root"] for b in BRANCHES)

    monkeypatch.setenv("CYCLEPREF_CONCURRENT_STAGES", "4")
    monkeypatch.setenv("CYCLEPREF_STAGE_STAGGER_S", "0")
    result = pipeline(root=str(concurrent_project), trigger="test", stage_retries=0)

    assert [o.stage for o in result.outcomes] == order
    assert all(o.status == "executed" for o in result.outcomes)
    times = tmp_path / "concurrent" / "times"
    spans = {b: (float((times / f"{b}.start").read_text()), float((times / f"{b}.end").read_text()))
             for b in BRANCHES}
    assert max(s for s, _ in spans.values()) < min(e for _, e in spans.values()), f"branches did not overlap: {spans}"
    assert _lock(concurrent_project) == _lock(serial)
    assert set(_lock(serial)["stages"]) == {"root", "join", *BRANCHES}
    assert (concurrent_project / "join.txt").read_text() == "rb1rb2rb3rb4"
    kids = lineage.children(MlflowClient(mlflow_uri), result.parent_run_id)
    assert sorted(k.info.run_name for k in kids) == sorted(order)
    for kid in kids:
        entry = _lock(concurrent_project)["stages"][kid.info.run_name]
        assert kid.data.tags.get(lineage.LOCK_TAG) == lineage.lock_hash(entry)
    status = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=concurrent_project,
                            capture_output=True, text=True, check=True)
    assert json.loads(status.stdout) == {}
    shutil.rmtree(times)


def test_a_lost_lock_race_is_retried_at_once_and_other_errors_are_not(monkeypatch, tmp_path):
    import flows.pipeline as fp

    busy = TransientStageError("b1", "a DVC lock is held by another process", "ERROR: Unable to acquire lock.")
    calls = []

    def flaky(stage, root, env, timeout_s, echo, errors=[busy, busy]):
        calls.append(stage)
        if errors:
            raise errors.pop(0)
        return "executed", 1.0

    monkeypatch.setattr(fp, "execute_stage", flaky)
    monkeypatch.setattr(fp.random, "uniform", lambda a, b: 0.0)
    assert fp.execute_with_lock_retries("b1", tmp_path, {}, 10, lambda line: None, retries=3) == ("executed", 1.0)
    assert len(calls) == 3
    killed = TransientStageError("b1", "killed by a signal (exit -9)", "")
    monkeypatch.setattr(fp, "execute_stage", lambda *a: (_ for _ in ()).throw(killed))
    with pytest.raises(TransientStageError, match="killed"):
        fp.execute_with_lock_retries("b1", tmp_path, {}, 10, lambda line: None, retries=3)
