"""The local MLflow store is portable: a copied or moved project keeps its runs, artifacts and registered models."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest
from mlflow import MlflowClient
from PIL import Image

from cyclepref import tracking

NAME = "cyclereward"


@pytest.fixture
def project(_mlflow_template, tmp_path, monkeypatch) -> Path:
    """A project directory with a fresh store, as the working directory, with the default tracking URI."""
    monkeypatch.delenv("CYCLEPREF_MLFLOW_URI", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    root = tmp_path / "original"
    root.mkdir()
    shutil.copy(_mlflow_template, root / "mlflow.db")
    monkeypatch.chdir(root)
    return root


def _reward_dir(root: Path) -> Path:
    from cyclepref.models import zoo
    from cyclepref.reward.model import RewardModel

    backbone = zoo.build("blip_itm", root / "zoo", seed=0, image_size=32)
    model = RewardModel.from_backbone(str(backbone), seed=0, max_length=16)
    model.save_pretrained(root / "reward")
    return root / "reward"


def _score() -> list[float]:
    from cyclepref.reward.pyfunc import load_reward_model

    model = load_reward_model(f"models:/{NAME}@champion")
    return model.score([Image.new("RGB", (32, 32), "red")], ["a red square"], batch_size=1).tolist()


def _move(src: Path, dest: Path, monkeypatch) -> None:
    """Copy the project, delete the original, continue in the copy as a new process would (mlflow exports the
    tracking URI it was given to the environment)."""
    shutil.copytree(src, dest)
    shutil.rmtree(src)
    monkeypatch.chdir(dest)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def _store_text(db: Path) -> str:
    with sqlite3.connect(db) as con:
        return "\n".join(con.iterdump())


def test_a_moved_project_keeps_runs_artifacts_and_the_registered_model(project, tmp_path, monkeypatch):
    import mlflow

    from cyclepref.reward.pyfunc import log_reward_model

    reward = _reward_dir(project)
    with tracking.stage_run("train_reward", None, "test") as run:
        mlflow.log_text("hello", "notes/hello.txt")
        info = log_reward_model(reward)
    version = mlflow.register_model(info.model_uri, NAME)
    MlflowClient().set_registered_model_alias(NAME, "champion", version.version)
    before = _score()

    moved = tmp_path / "moved"
    _move(project, moved, monkeypatch)
    assert str(project) not in _store_text(moved / "mlflow.db")
    client = MlflowClient(tracking.use_store())
    assert tracking.tracking_uri() == f"sqlite:///{moved / 'mlflow.db'}"
    assert [a.path for a in client.list_artifacts(run.info.run_id, "notes")] == ["notes/hello.txt"]
    assert Path(client.download_artifacts(run.info.run_id, "notes/hello.txt")).read_text() == "hello"
    assert not Path(client.get_run(run.info.run_id).data.tags["mlflow.source.name"]).is_absolute()
    mlmodel = next((moved / "mlruns").rglob("MLmodel")).read_text()
    assert str(project) not in mlmodel and "path: artifacts/reward" in mlmodel
    assert _score() == pytest.approx(before)


def test_a_store_made_with_absolute_locations_is_made_relative_after_a_move(project, tmp_path, monkeypatch):
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{project / 'mlflow.db'}")
    mlflow.set_experiment("cyclepref")
    with mlflow.start_run() as run:
        mlflow.log_text("hello", "notes/hello.txt")
    assert str(project) in _store_text(project / "mlflow.db")

    moved = tmp_path / "moved"
    _move(project, moved, monkeypatch)
    client = MlflowClient(tracking.use_store())
    assert str(project) not in _store_text(moved / "mlflow.db")
    assert client.get_run(run.info.run_id).info.artifact_uri == f"mlruns/{run.info.experiment_id}/{run.info.run_id}/artifacts"
    assert Path(client.download_artifacts(run.info.run_id, "notes/hello.txt")).read_text() == "hello"


def test_locations_outside_the_project_are_left_alone(tmp_path):
    shared = tmp_path / "shared" / "mlruns" / "3"
    shared.mkdir(parents=True)
    root = tmp_path / "project"
    (root / "mlruns" / "1").mkdir(parents=True)
    assert tracking.project_prefix(f"{root}/mlruns/1", root) == f"{root}/"
    assert tracking.project_prefix(f"file://{root}/mlruns/1", root) == f"file://{root}/"
    assert tracking.project_prefix(f"{tmp_path}/gone/mlruns/1", root) == f"{tmp_path}/gone/"
    assert tracking.project_prefix(str(shared), root) is None
    assert tracking.project_prefix("s3://bucket/mlruns/1", root) is None
    assert tracking.project_prefix("mlruns/1", root) is None


def test_the_experiment_opens_in_the_model_training_view(project):
    client = MlflowClient(tracking.use_store())
    exp = client.get_experiment(tracking.experiment_id(client))
    assert exp.tags[tracking.KIND_TAG] == "custom_model_development"
    assert exp.artifact_location == f"mlruns/{exp.experiment_id}"
