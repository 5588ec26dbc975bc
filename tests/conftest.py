"""Test-session setup: offline and no-telemetry environment (before any heavy import), the tiny model zoo built
once per session, and one migrated MLflow sqlite database per session, copied per test."""

import os
import tempfile

_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "DVC_NO_ANALYTICS": "1",
    "GX_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
    "CYCLEPREF_DEVICE": "cpu",
}
for _k, _v in _ENV.items():
    os.environ[_k] = _v
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="cyclepref-prefect-"))

import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def prefect_api():
    """One temporary Prefect server for the whole session; its URL is exported as PREFECT_API_URL for the flows that
    tests start in subprocesses."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        previous = os.environ.get("PREFECT_API_URL")
        os.environ["PREFECT_API_URL"] = PREFECT_API_URL.value()
        yield
        if previous is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = previous


@pytest.fixture(scope="session")
def zoo(tmp_path_factory) -> Path:
    """The tiny model zoo (all families), built once per session; returns the directory holding data/models/*."""
    from cyclepref.models import zoo as z

    out = tmp_path_factory.mktemp("zoo")
    for name in z.BUILDERS:
        z.build(name, out, seed=0, image_size=32)
    return out


@pytest.fixture(scope="session")
def _mlflow_template(tmp_path_factory) -> Path:
    import mlflow

    d = tmp_path_factory.mktemp("mlflow-template")
    db = d / "mlflow.db"
    mlflow.set_tracking_uri(f"sqlite:///{db}")
    mlflow.search_experiments()
    return db


@pytest.fixture
def mlflow_uri(_mlflow_template, tmp_path, monkeypatch) -> str:
    """A fresh migrated MLflow sqlite store for one test, exported as CYCLEPREF_MLFLOW_URI."""
    db = tmp_path / "mlflow.db"
    shutil.copy(_mlflow_template, db)
    uri = f"sqlite:///{db}"
    monkeypatch.setenv("CYCLEPREF_MLFLOW_URI", uri)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    import mlflow

    mlflow.set_tracking_uri(uri)
    return uri
