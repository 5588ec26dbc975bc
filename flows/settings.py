"""Runtime settings of the flows, read from the environment (never from params, so they invalidate no DVC stage).

CYCLEPREF_STAGE_TIMEOUT_S    hard wall-clock limit of one stage subprocess (default 43200 = 12 h)
CYCLEPREF_STAGE_RETRIES      retries of a stage after a transient failure (default 2)
CYCLEPREF_RETRY_DELAY_S      seconds between those retries (default 30)
CYCLEPREF_CONCURRENT_STAGES  independent stages the pipeline flow runs at once (default: the number of
                             CYCLEPREF_STAGE_GPUS, else 1 = one stage at a time in DVC's order)
CYCLEPREF_STAGE_GPUS         GPU ids, comma-separated ("0,1,2,3"): each running stage gets one of them as its
                             CUDA_VISIBLE_DEVICES (default: none; stages see every GPU)
CYCLEPREF_STAGE_STAGGER_S    seconds between two stage starts when stages run concurrently (default 1)
CYCLEPREF_LOCK_RETRIES       quick retries of a stage whose `dvc repro` lost a race for a DVC lock (default 3)
CYCLEPREF_RETRAIN_CRON       cron schedule of the retraining deployment (default "0 3 * * *": 03:00 daily)
CYCLEPREF_RETRAIN_TIMEZONE   time zone of that schedule (default UTC)
CYCLEPREF_MLFLOW_UI_URL      base URL of the MLflow UI for links (default: the tracking URI when it is http(s),
                             else http://127.0.0.1:5000)
The MLflow tracking URI comes from CYCLEPREF_MLFLOW_URI (cyclepref.tracking); the Prefect API from PREFECT_API_URL.
"""

from __future__ import annotations

import os
from pathlib import Path


def _number(name: str, default: float) -> float:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{name} must be a number, got {raw!r}") from None
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {raw!r}")
    return value


def stage_timeout_s() -> float:
    return _number("CYCLEPREF_STAGE_TIMEOUT_S", 43200.0)


def stage_retries() -> int:
    return int(_number("CYCLEPREF_STAGE_RETRIES", 2))


def retry_delay_s() -> float:
    return _number("CYCLEPREF_RETRY_DELAY_S", 30.0)


def stage_gpus() -> list[str]:
    raw = os.environ.get("CYCLEPREF_STAGE_GPUS", "")
    return [g.strip() for g in raw.split(",") if g.strip()]


def concurrent_stages() -> int:
    value = int(_number("CYCLEPREF_CONCURRENT_STAGES", float(len(stage_gpus()) or 1)))
    if value < 1:
        raise ValueError(f"CYCLEPREF_CONCURRENT_STAGES must be >= 1, got {value}")
    return value


def stage_stagger_s() -> float:
    return _number("CYCLEPREF_STAGE_STAGGER_S", 1.0)


def lock_retries() -> int:
    return int(_number("CYCLEPREF_LOCK_RETRIES", 3))


def retrain_cron() -> str:
    return os.environ.get("CYCLEPREF_RETRAIN_CRON", "0 3 * * *")


def retrain_timezone() -> str:
    return os.environ.get("CYCLEPREF_RETRAIN_TIMEZONE", "UTC")


def mlflow_ui_url(root: Path | None = None) -> str:
    explicit = os.environ.get("CYCLEPREF_MLFLOW_UI_URL")
    if explicit:
        return explicit.rstrip("/")
    from cyclepref.tracking import tracking_uri

    uri = tracking_uri(root)
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else "http://127.0.0.1:5000"
