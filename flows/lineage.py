"""MLflow lineage of pipeline runs (no Prefect here).

One parent run per pipeline run (git commit, dirty flag, dvc.lock digest, profile, trigger). A stage that runs
logs its own run (cyclepref.tracking.stage_run) as a child of the parent, because the flow exports
CYCLEPREF_PARENT_RUN_ID; after it succeeds the flow tags that run with the stage's lock hash (the digest of the
stage's dvc.lock entry: cmd, deps, params and outs with their hashes). A stage that DVC skips as up to date gets a
child run that points to the run that produced its outputs, found through the same lock hash (outputs made by a
plain `dvc repro` are matched once by stage and params, then tagged; see adopt_producer).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
from contextlib import chdir
from dataclasses import dataclass
from pathlib import Path

import yaml

from cyclepref import tracking
from cyclepref.tracking import flatten, git_state

PARENT_ENV = "CYCLEPREF_PARENT_RUN_ID"
PARENT_TAG = "mlflow.parentRunId"
STAGE_TAG = "cyclepref.stage"
STATUS_TAG = "cyclepref.stage_status"
LOCK_TAG = "cyclepref.lock_hash"
SOURCE_TAG = "cyclepref.source_run_id"
ADOPTED_TAG = "cyclepref.lock_hash_source"
KIND_TAG = "cyclepref.kind"
EXECUTED, SKIPPED = "executed", "skipped"


@dataclass(frozen=True)
class StageRecord:
    """The MLflow side of one stage in one pipeline run: its child run and the run that produced its outputs."""

    child_run_id: str
    producer_run_id: str | None
    lock_hash: str | None


def in_project(fn):
    """Run a flow function in its `root` argument's directory: the local store's artifact locations are relative
    to the project root, and MLflow resolves them against the working directory."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        bound = inspect.signature(fn).bind(*args, **kwargs)
        bound.apply_defaults()
        with chdir(Path(bound.arguments["root"]).resolve()):
            return fn(*args, **kwargs)

    return wrapper


def client(root: Path | None = None):
    from mlflow import MlflowClient

    return MlflowClient(tracking.use_store(root))


def experiment_id(mlflow_client) -> str:
    return tracking.experiment_id(mlflow_client)


def lock_entries(root: Path) -> dict[str, dict]:
    path = root / "dvc.lock"
    if not path.exists():
        return {}
    data = yaml.safe_load(path.read_text()) or {}
    return data.get("stages") or {}


def lock_hash(entry: dict) -> str:
    """Digest of one stage's dvc.lock entry; equal entries mean equal command, inputs and outputs."""
    return hashlib.sha256(json.dumps(entry, sort_keys=True, default=str).encode()).hexdigest()


def stage_lock_hash(root: Path, stage: str) -> str | None:
    entry = lock_entries(root).get(stage)
    return lock_hash(entry) if entry is not None else None


def lock_digest(root: Path) -> str:
    path = root / "dvc.lock"
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else "absent"


def start_pipeline_run(mlflow_client, root: Path, profile: str, trigger: str, extra_tags: dict | None = None) -> str:
    """Create the parent run of one pipeline run; returns its id."""
    tags = {
        KIND_TAG: "pipeline",
        "cyclepref.profile": profile,
        "cyclepref.trigger": trigger,
        "dvc.lock.digest": lock_digest(root),
        **git_state(root),
        **(extra_tags or {}),
    }
    run = mlflow_client.create_run(experiment_id(mlflow_client), run_name="pipeline", tags=tags)
    return run.info.run_id


def finish_pipeline_run(mlflow_client, run_id: str, root: Path, failed: bool) -> None:
    mlflow_client.set_tag(run_id, "dvc.lock.digest_after", lock_digest(root))
    mlflow_client.set_terminated(run_id, "FAILED" if failed else "FINISHED")


def _search(mlflow_client, filter_string: str, max_results: int = 1) -> list:
    return mlflow_client.search_runs(
        [experiment_id(mlflow_client)], filter_string, max_results=max_results, order_by=["attributes.start_time DESC"]
    )


def _child(mlflow_client, parent_run_id: str, stage: str, tags: dict[str, str], note: str) -> str:
    run = mlflow_client.create_run(
        experiment_id(mlflow_client),
        run_name=stage,
        tags={PARENT_TAG: parent_run_id, STAGE_TAG: stage, "mlflow.note.content": note, **tags},
    )
    mlflow_client.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def record_executed(mlflow_client, parent_run_id: str, stage: str, root: Path) -> StageRecord:
    """Tag the stage's own child run (the newest finished one) with its lock hash; a stage that logged no run gets
    a child created here so that the parent lists every stage."""
    digest = stage_lock_hash(root, stage)
    tags = {STATUS_TAG: EXECUTED, **({LOCK_TAG: digest} if digest else {})}
    mine = f"tags.`{PARENT_TAG}` = '{parent_run_id}' and tags.`{STAGE_TAG}` = '{stage}'"
    found = _search(mlflow_client, f"{mine} and attributes.status = 'FINISHED'")
    if found:
        run_id = found[0].info.run_id
        for key, value in tags.items():
            mlflow_client.set_tag(run_id, key, value)
    else:
        run_id = _child(mlflow_client, parent_run_id, stage, tags, f"DVC ran stage {stage}; the stage logged no run.")
    return StageRecord(run_id, run_id, digest)


def find_producer(mlflow_client, stage: str, digest: str) -> str | None:
    """The newest executed run of `stage` whose outputs match the lock hash `digest`."""
    found = _search(
        mlflow_client,
        f"tags.`{STAGE_TAG}` = '{stage}' and tags.`{LOCK_TAG}` = '{digest}' and tags.`{STATUS_TAG}` = '{EXECUTED}'",
    )
    return found[0].info.run_id if found else None


def _lock_params(entry: dict) -> dict[str, str]:
    out: dict[str, str] = {}
    for values in (entry.get("params") or {}).values():
        out.update(flatten(values))
    return out


def adopt_producer(mlflow_client, stage: str, entry: dict, digest: str) -> str | None:
    """For outputs made by a plain `dvc repro` (whose stage run has no lock hash): the newest finished run of
    `stage` without a lock hash whose logged params agree with the params in the stage's dvc.lock entry. The run is
    tagged with the lock hash (source "adopted"), so later lookups find it directly."""
    wanted = _lock_params(entry)
    runs = _search(
        mlflow_client, f"tags.`{STAGE_TAG}` = '{stage}' and attributes.status = 'FINISHED'", max_results=100
    )
    for run in runs:
        if run.info.run_name != stage or LOCK_TAG in run.data.tags or run.data.tags.get(STATUS_TAG) == SKIPPED:
            continue
        logged = run.data.params
        if all(logged.get(k, logged.get(k.split(".", 1)[-1])) == v for k, v in wanted.items()):
            for key, value in {LOCK_TAG: digest, STATUS_TAG: EXECUTED, ADOPTED_TAG: "adopted"}.items():
                mlflow_client.set_tag(run.info.run_id, key, value)
            return run.info.run_id
    return None


def record_skipped(mlflow_client, parent_run_id: str, stage: str, root: Path) -> StageRecord:
    """A child run for a stage DVC skipped as up to date, pointing to the run that produced its outputs."""
    entry = lock_entries(root).get(stage)
    digest = lock_hash(entry) if entry is not None else None
    producer = find_producer(mlflow_client, stage, digest) if digest else None
    how = "lock hash"
    if producer is None and digest:
        producer, how = adopt_producer(mlflow_client, stage, entry, digest), "adoption (same stage and params)"
    tags = {STATUS_TAG: SKIPPED, **({LOCK_TAG: digest} if digest else {})}
    if producer:
        tags[SOURCE_TAG] = producer
        note = f"DVC skipped {stage}: outputs up to date, produced by run {producer} (found by {how})."
    else:
        note = f"DVC skipped {stage}: outputs up to date; no run with lock hash {digest} was found (produced outside "
        note += "the pipeline flow, or in another tracking store)."
    return StageRecord(_child(mlflow_client, parent_run_id, stage, tags, note), producer, digest)


def children(mlflow_client, parent_run_id: str) -> list:
    """The direct child runs of a run, oldest first."""
    runs = mlflow_client.search_runs(
        [experiment_id(mlflow_client)], f"tags.`{PARENT_TAG}` = '{parent_run_id}'", max_results=1000
    )
    return sorted(runs, key=lambda r: r.info.start_time)


def run_url(ui_url: str, experiment: str, run_id: str) -> str:
    return f"{ui_url}/#/experiments/{experiment}/runs/{run_id}"
