"""Prefect flows over the DVC stages: the pipeline flow, the retraining flow and its scheduled deployment.

DVC decides what runs (and what is skipped as up to date); Prefect schedules, retries transient failures, enforces
timeouts and shows the runs; MLflow records one parent run per pipeline run with one child per stage.
"""
