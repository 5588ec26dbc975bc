"""MLflow lineage of pipeline runs (no Prefect here).

One parent run per pipeline run (git commit, dirty flag, dvc.lock digest, profile, trigger): a Prefect pipeline run
or a `cyclepref repro` (`make run`). A stage that runs logs its own run (cyclepref.tracking.stage_run) as a child of
the parent, because the runner exports CYCLEPREF_PARENT_RUN_ID; after it succeeds that run is tagged with the
stage's lock hash (the digest of the stage's dvc.lock entry: cmd, deps, params and outs with their hashes). A stage
that DVC skips as up to date gets a child run that points to the run that produced its outputs, found by that lock
hash and nothing else. When no run in the store has it, the child says where the outputs came from: committed in
git (the child then carries the committed metrics) or DVC's cache / a DVC remote.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import json
import subprocess
import time
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
ORIGIN_TAG = "cyclepref.outputs_from"
KIND_TAG = "cyclepref.kind"
EXECUTED, SKIPPED = "executed", "skipped"
FROM_RUN, FROM_GIT, FROM_DVC = "run", "git", "dvc"


@dataclass(frozen=True)
class StageRecord:
    """The MLflow side of one stage in one pipeline run: its child run and the run that produced its outputs."""

    child_run_id: str
    producer_run_id: str | None
    lock_hash: str | None
    origin: str = FROM_RUN


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
    """The stages of root/dvc.lock (parsed once per version of the file; callers must not modify it)."""
    path = root / "dvc.lock"
    try:
        st = path.stat()
    except FileNotFoundError:
        return {}
    return _parsed_lock(str(path.resolve()), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=8)
def _parsed_lock(path: str, mtime_ns: int, size: int) -> dict[str, dict]:
    data = yaml.load(Path(path).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) or {}
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


def _child(
    mlflow_client, parent_run_id: str, stage: str, tags: dict[str, str], note: str, metrics: dict | None = None
) -> str:
    from mlflow.entities import Metric

    run = mlflow_client.create_run(
        experiment_id(mlflow_client),
        run_name=stage,
        tags={PARENT_TAG: parent_run_id, STAGE_TAG: stage, "mlflow.note.content": note, **tags},
    )
    if metrics:
        now = int(time.time() * 1000)
        mlflow_client.log_batch(run.info.run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics.items()])
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


def tracked_by_git(root: Path, paths: list[str]) -> bool:
    """Every path is committed in git with no local change (a directory: every file under it)."""
    if not paths:
        return False
    for path in paths:
        listed = subprocess.run(["git", "ls-files", "--", path], cwd=root, capture_output=True, text=True)
        changed = subprocess.run(["git", "status", "--porcelain", "--", path], cwd=root, capture_output=True, text=True)
        if listed.returncode != 0 or not listed.stdout.strip() or changed.stdout.strip():
            return False
    return True


def metric_files(root: Path, stage: str) -> list[str]:
    """The stage's metric files as dvc.yaml declares them."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return [str(o.def_path) for s in repo.stage.collect(stage) for o in s.outs if o.metric]


def committed_metrics(root: Path, stage: str) -> dict[str, float]:
    """The numbers in the stage's metric files (file stem prefixed when there are several), flattened with dots."""
    files = metric_files(root, stage)
    out: dict[str, float] = {}
    for name in files:
        path = root / name
        if not path.exists():
            continue
        prefix = f"{Path(name).stem}." if len(files) > 1 else ""
        for key, value in flatten(json.loads(path.read_text()), prefix).items():
            try:
                out[key] = float(value)
            except ValueError:
                continue
    return out


def outputs_origin(root: Path, entry: dict) -> str:
    """Where a skipped stage's outputs came from when no run in the store produced them: git or DVC's cache."""
    outs = [o["path"] for o in entry.get("outs") or []]
    return FROM_GIT if tracked_by_git(root, outs) else FROM_DVC


def record_skipped(mlflow_client, parent_run_id: str, stage: str, root: Path) -> StageRecord:
    """A child run for a stage DVC skipped as up to date, pointing to the run that produced its outputs (found by
    the stage's lock hash); without one, the child records whether the outputs came from git (with the committed
    metrics) or from DVC's cache or a remote."""
    entry = lock_entries(root).get(stage)
    digest = lock_hash(entry) if entry is not None else None
    producer = find_producer(mlflow_client, stage, digest) if digest else None
    tags = {STATUS_TAG: SKIPPED, **({LOCK_TAG: digest} if digest else {})}
    if producer:
        origin = FROM_RUN
        tags |= {SOURCE_TAG: producer, ORIGIN_TAG: f"run {producer}"}
        note = f"DVC skipped {stage}: outputs up to date, produced by run {producer} (same DVC lock hash)."
    elif entry is not None and outputs_origin(root, entry) == FROM_GIT:
        origin, commit = FROM_GIT, git_state(root)["git.commit"]
        tags |= {ORIGIN_TAG: f"git {commit}"}
        note = (f"DVC skipped {stage}: its outputs are committed in git (commit {commit}); no run in this store has "
                f"lock hash {digest}. The metrics of this run are the committed ones.")
    else:
        origin = FROM_DVC
        tags |= {ORIGIN_TAG: "dvc cache or remote"}
        note = (f"DVC skipped {stage}: outputs up to date in DVC's cache (restored, pulled from a remote or made by "
                f"a plain `dvc repro`); no run in this store has lock hash {digest}.")
    metrics = committed_metrics(root, stage) if origin == FROM_GIT else None
    return StageRecord(_child(mlflow_client, parent_run_id, stage, tags, note, metrics), producer, digest, origin)


def children(mlflow_client, parent_run_id: str) -> list:
    """The direct child runs of a run, oldest first."""
    runs = mlflow_client.search_runs(
        [experiment_id(mlflow_client)], f"tags.`{PARENT_TAG}` = '{parent_run_id}'", max_results=1000
    )
    return sorted(runs, key=lambda r: r.info.start_time)


def run_url(ui_url: str, experiment: str, run_id: str) -> str:
    """The run's page in the MLflow UI's model-training view (without the workflow type MLflow 3 shows a stage run
    as one of its GenAI "Evaluations")."""
    from cyclepref.ui import ML_VIEW

    return f"{ui_url}/#/experiments/{experiment}/runs/{run_id}{ML_VIEW}"


VERSION_LINEAGE = (
    ("trained by run", "cyclepref.train_run_id"),
    ("variant", "cyclepref.variant"),
    ("DVC stage hash", "cyclepref.dvc_stage_hash"),
    ("git commit", "git.commit"),
    ("source changed since the commit", "git.dirty"),
    ("training data digest", "cyclepref.data_digest"),
)


def version_description(tags: dict[str, str]) -> str:
    """A registered version's lineage tags as a short markdown table (the model page shows the description)."""
    rows = [(label, tags[key]) for label, key in VERSION_LINEAGE if key in tags]
    rows += [(f"adapter of {key.removeprefix('cyclepref.adapter.')}", value)
             for key, value in sorted(tags.items()) if key.startswith("cyclepref.adapter.")]
    return "\n".join(["| lineage | value |", "|---|---|", *(f"| {label} | `{value}` |" for label, value in rows)])


def describe_version(mlflow_client, name: str, version: str) -> str:
    """Write the version's lineage table into its description (kept in the tags as well); returns it."""
    text = version_description(mlflow_client.get_model_version(name, version).tags)
    mlflow_client.update_model_version(name, version, description=text)
    return text
