"""A no-op `cyclepref pipeline` without Prefect or MLflow.

A pipeline run that completed (the Prefect flow, or `cyclepref repro` of the whole pipeline) leaves a record of the
state it recorded: the digest of dvc.lock and the MLflow tracking URI it wrote to, with its parent run. When DVC has
nothing to run (one in-process `dvc status`) and dvc.lock is still that digest, that run already records this exact
state, and `cyclepref pipeline` reports it instead of starting a flow run and a child run per stage. `--record`
records a new run anyway.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from cyclepref.tracking import sqlite_file, tracking_uri
from flows.lineage import lock_digest

RECORD = Path(".dvc/tmp/cyclepref/last_pipeline.json")


@dataclass(frozen=True)
class LastRecord:
    parent_run_id: str
    recorded_by: str
    finished_utc: str
    stages: int


def remember(root: Path, parent_run_id: str, recorded_by: str, uri: str, stages: int) -> None:
    """Note that `parent_run_id` (in the store at `uri`) recorded the whole pipeline at the current dvc.lock."""
    path = root / RECORD
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"dvc_lock": lock_digest(root), "tracking_uri": uri, "parent_run_id": parent_run_id,
              "recorded_by": recorded_by, "stages": stages,
              "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record) + "\n")
    tmp.replace(path)


def current(root: Path) -> LastRecord | None:
    """The last pipeline record when it still describes this repository: same dvc.lock, same tracking store (still
    present), and nothing for DVC to run. None otherwise (then the pipeline runs and records)."""
    try:
        record = json.loads((root / RECORD).read_text())
    except (OSError, ValueError):
        return None
    uri = tracking_uri(root)
    db = sqlite_file(uri)
    if record.get("tracking_uri") != uri or (db is not None and not db.exists()):
        return None
    if record.get("dvc_lock") != lock_digest(root) or not nothing_to_run(root):
        return None
    return LastRecord(record["parent_run_id"], record["recorded_by"], record["finished_utc"], record["stages"])


def nothing_to_run(root: Path) -> bool:
    """True when `dvc status` reports no changed stage (DVC's own check, in process)."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    try:
        with Repo(str(root)) as repo:
            return not repo.status()
    except DvcException:
        return False
