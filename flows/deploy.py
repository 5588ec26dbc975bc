"""Serve the retraining flow on a cron schedule, at most one run at a time.

    python -m flows.deploy            (or `cyclepref serve-schedule`), from the project root, with PREFECT_API_URL
                                      pointing at a running `prefect server start`

The schedule comes from CYCLEPREF_RETRAIN_CRON / CYCLEPREF_RETRAIN_TIMEZONE (runtime settings, not params). The
deployment's concurrency limit of 1 is a Prefect global concurrency limit: a run that comes due while another is
still going waits in the queue (ENQUEUE) instead of running two pipelines on one DVC repository.
"""

from __future__ import annotations

from pathlib import Path

from flows import settings
from flows.retrain import retrain

DEPLOYMENT = "retrain-schedule"


def build_deployment(
    root: str | Path = ".",
    cron: str | None = None,
    timezone: str | None = None,
    name: str = DEPLOYMENT,
    ingest: bool = True,
):
    """The RunnerDeployment of the retraining flow: cron schedule, concurrency limit 1, trigger 'schedule'."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.schedules import Cron

    return retrain.to_deployment(
        name=name,
        schedule=Cron(cron or settings.retrain_cron(), timezone=timezone or settings.retrain_timezone()),
        concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE),
        parameters={"root": str(Path(root).resolve()), "trigger": "schedule", "ingest": ingest},
        tags=["cyclepref"],
        description="Ingest new inputs, run the DVC pipeline, register the reward model, promote on the benchmark.",
    )


def serve_schedule(
    root: str | Path = ".", cron: str | None = None, timezone: str | None = None, name: str = DEPLOYMENT
) -> None:
    """Register the deployment with the Prefect API and poll for its scheduled runs until interrupted."""
    from prefect import serve

    serve(build_deployment(root, cron, timezone, name))


if __name__ == "__main__":
    serve_schedule()
