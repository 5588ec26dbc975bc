"""`cyclepref ui mlflow|prefect`: each server starts for the project from a subdirectory, on a free port, and the
pages the README names load with the right content in a real headless browser (Debian's chromium); stopping ends
every process the server started. CI installs chromium (.ci/run sets CYCLEPREF_REQUIRE_BROWSER=1, so a missing
browser fails there instead of skipping)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from urllib.request import urlopen

import pytest
from mlflow import MlflowClient

from cyclepref import tracking, ui
from flows import lineage

BROWSER = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not BROWSER and not os.environ.get("CYCLEPREF_REQUIRE_BROWSER"),
                       reason="no chromium (apt-get install chromium); CI requires it"),
]


def render(url: str, screenshot: Path | None = None, budget_ms: int = 20000) -> str:
    """The page's DOM after its scripts ran (headless chromium); optionally a screenshot of it."""
    assert BROWSER, "chromium is required here (CYCLEPREF_REQUIRE_BROWSER=1)"
    with tempfile.TemporaryDirectory() as profile:
        base = [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--user-data-dir={profile}", "--window-size=1400,900", f"--virtual-time-budget={budget_ms}"]
        if screenshot is not None:
            subprocess.run([*base, f"--screenshot={screenshot}", url], capture_output=True, timeout=120)
        done = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    return done.stdout


def mlflow_project(root: Path) -> dict[str, str]:
    """A project whose store holds what `make run` leaves: the cyclepref experiment, a pipeline run with a stage
    child run, and registered model cyclereward version 1 with its lineage description."""
    (root / "dvc.yaml").write_text("stages: {}\n")
    (root / "sub" / "dir").mkdir(parents=True)
    old = Path.cwd()
    os.chdir(root)
    try:
        client = MlflowClient(tracking.use_store(root))
        parent = lineage.start_pipeline_run(client, root, "default", "make run")
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "summary.txt").write_text("stage artifact\n")
            child = lineage._child(client, parent, "train_reward", {lineage.STATUS_TAG: "executed"}, "a stage",
                                   {"accuracy": 0.75})
            client.log_artifact(child, str(Path(tmp) / "summary.txt"))
        client.set_terminated(parent, "FINISHED")
        client.create_registered_model("cyclereward")
        version = client.create_model_version("cyclereward", f"runs:/{child}/model", run_id=child, tags={
            "cyclepref.train_run_id": child, "git.commit": "0123abc", "git.dirty": "false"})
        lineage.describe_version(client, "cyclereward", version.version)
        return {"parent": parent, "child": child, "experiment": lineage.experiment_id(client)}
    finally:
        os.chdir(old)


def test_mlflow_ui_opens_the_runs_of_the_project_and_stops_every_process(tmp_path, monkeypatch):
    monkeypatch.delenv("CYCLEPREF_MLFLOW_URI", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = tmp_path / "project"
    root.mkdir()
    ids = mlflow_project(root)
    shots = Path(os.environ.get("CYCLEPREF_UI_SCREENS", tmp_path))
    server = ui.start("mlflow", root / "sub" / "dir", port=ui.free_port())
    try:
        assert server.root == root.resolve() and server.proc.args[server.proc.args.index("--workers") + 1] == "1"
        exp = ids["experiment"]
        assert server.start_url == f"{server.url}/#/experiments/{exp}/runs?workflowType=machine_learning"
        runs = render(server.start_url, shots / "mlflow-experiment.png")
        assert "pipeline" in runs and "Model registry" in runs
        assert not {"Judges", "Sessions", "Evaluation runs"} & set(re.findall(r">([^<>]+)<", runs))
        genai = render(f"{server.url}/#/experiments/{exp}/runs")
        assert "Judges" in genai, "without the workflow type MLflow opens its GenAI view"
        run = render(lineage.run_url(server.url, exp, ids["child"]), shots / "mlflow-stage-run.png")
        assert "train_reward" in run and "accuracy" in run and "Parent run" in run
        assert not {"Judges", "Evaluations", "Evaluation runs"} & set(re.findall(r">([^<>]+)<", run))
        listed = json.loads(urlopen(f"{server.url}/ajax-api/2.0/mlflow/artifacts/list?run_id={ids['child']}").read())
        assert [f["path"] for f in listed["files"]] == ["summary.txt"]
        got = urlopen(f"{server.url}/get-artifact?path=summary.txt&run_uuid={ids['child']}").read()
        assert got == b"stage artifact\n"
        model = render(f"{server.url}/#/models/cyclereward/versions/1?workflowType=machine_learning",
                       shots / "mlflow-registered-model.png")
        assert "trained by run" in model and "0123abc" in model
    finally:
        server.stop()
    assert not ui.group_alive(server.proc.pid)


def test_prefect_ui_works_on_a_port_other_than_4200(tmp_path, monkeypatch):
    root = tmp_path / "project"
    (root / "sub").mkdir(parents=True)
    (root / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))
    shots = Path(os.environ.get("CYCLEPREF_UI_SCREENS", tmp_path))
    port = ui.free_port()
    server = ui.start("prefect", root / "sub", port=port if port != 4200 else ui.free_port())
    try:
        flow = ("from prefect import flow, runtime\n@flow(name='cyclepref-ui-check')\ndef f():\n"
                "    print('FLOW_RUN', runtime.flow_run.id)\nf()\n")
        env = {**os.environ, "PREFECT_API_URL": f"{server.url}/api"}
        done = subprocess.run([sys.executable, "-c", flow], env=env, check=True, capture_output=True, text=True,
                              timeout=300)
        run_id = re.search(r"FLOW_RUN (\S+)", done.stdout).group(1)
        page = render(f"{server.url}/runs", shots / "prefect-runs.png")
        assert "cyclepref-ui-check" in page and "Oops" not in page
        page = render(f"{server.url}/runs/flow-run/{run_id}", shots / "prefect-flow-run.png")
        assert "cyclepref-ui-check" in page and "Completed" in page and "Oops" not in page
    finally:
        server.stop()
    assert not ui.group_alive(server.proc.pid)


def test_a_port_in_use_and_a_directory_outside_a_project_are_one_line_errors(tmp_path):
    import socket

    with pytest.raises(ui.UIError, match="not inside a cyclepref project"):
        ui.project_root(tmp_path)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(ui.UIError, match="in use"):
            ui.pick_port("mlflow", "127.0.0.1", busy.getsockname()[1])
