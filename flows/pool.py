"""The input pool under DVC, the data version of a round, and the round lock.

- `track_batches`: `dvc add` every committed pool batch (cyclepref.ingest) that has no `.dvc` file yet, so the
  batch is in DVC's cache and no checkout deletes it. Run at the start of every round, so a kill between the ingest's
  commit and the `dvc add` is repaired by the next round.
- `data_version`: what a round trained on: the pool's md5 as dvc.lock records it (prepare_inputs' dep), its batches,
  the dvc.lock digest and the git commit; recorded on the round's MLflow runs and model versions.
- `round_lock`: at most one retraining round per repository (an exclusive flock on .dvc/tmp/cyclepref-round.lock,
  released by the kernel when the process dies, SIGKILL included).
- `stop_on_signals`: SIGTERM / SIGINT end the round's stage processes (each in its own session) within seconds.
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

from cyclepref.ingest import pool_batches
from cyclepref.tracking import git_state
from flows import lineage

LOCK_FILE = ".dvc/tmp/cyclepref-round.lock"


class RoundRunning(RuntimeError):
    """Another retraining round holds this repository."""


@contextmanager
def round_lock(root: Path):
    """Hold the repository's round lock for the block; RoundRunning at once when another process holds it."""
    path = Path(root) / LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            raise RoundRunning(
                f"another retraining round (pid {holder}) is running on {root}; this trigger does nothing"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)


def untracked_batches(root: Path, pool: Path) -> list[Path]:
    return [b for b in pool_batches(pool) if not b.with_name(b.name + ".dvc").exists()]


def track_batches(root: Path, pool: Path) -> list[str]:
    """`dvc add` the pool's batches that have no .dvc file; their names."""
    todo = untracked_batches(root, pool)
    if todo:
        subprocess.run(
            [sys.executable, "-m", "dvc", "--wait-for-lock", "add", "-q", *[str(b.relative_to(root)) for b in todo]],
            cwd=root, check=True, capture_output=True, text=True,
        )
    return [b.name for b in todo]


def pool_md5(root: Path, pool: str) -> str:
    """The md5 dvc.lock records for the pool as a prepare_inputs dependency ('absent' without one)."""
    entry = lineage.lock_entries(root).get("prepare_inputs") or {}
    for dep in entry.get("deps") or []:
        if str(dep.get("path", "")).rstrip("/") == pool.rstrip("/"):
            return str(dep.get("md5") or dep.get("hash") or "absent")
    return "absent"


def data_version(root: Path, pool: str) -> dict[str, str]:
    """Tags naming the data a round trained on (read after its pipeline ran)."""
    batches = pool_batches(root / pool)
    return {
        "cyclepref.data.pool": pool,
        "cyclepref.data.pool_md5": pool_md5(root, pool),
        "cyclepref.data.pool_batches": str(len(batches)),
        "cyclepref.data.pool_last_batch": batches[-1].name if batches else "none",
        "cyclepref.data.dvc_lock_sha256": lineage.lock_digest(root),
        "cyclepref.data.git_commit": git_state(root)["git.commit"],
    }


def refuse_stage_outputs(root: Path, params) -> None:
    """ParamsError when the pool or the watch folder overlaps a stage's output (cyclepref.profiles)."""
    from cyclepref.profiles import require_ingest_home

    if (root / "dvc.yaml").exists():
        require_ingest_home(params, root / "dvc.yaml", str(root / "params.yaml"))


@contextmanager
def stop_on_signals(signals=(signal.SIGTERM, signal.SIGINT)):
    """In the main thread: on SIGTERM / SIGINT (Prefect's cancel of a deployment run is a SIGTERM), end every stage
    process group this process started (flows.pipeline.LIVE_STAGES; DVC's lock dies with its process), then hand the
    signal to the previous handler (KeyboardInterrupt when it was the default)."""
    from flows.pipeline import kill_live_stages

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}

    def handler(signum, frame):
        kill_live_stages()
        old = previous.get(signum)
        if callable(old):
            old(signum, frame)
        raise KeyboardInterrupt(f"stopped by signal {signal.Signals(signum).name}")

    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield
    finally:
        for s, old in previous.items():
            signal.signal(s, old)
