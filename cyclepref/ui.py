"""`cyclepref ui mlflow|prefect`: the project's MLflow and Prefect UIs, started right from anywhere inside it.

MLflow: `mlflow server` on the project's sqlite store, in the project root (the store's artifact locations are
relative to it, so runs list their artifacts and downloads work), one worker, no job execution (no job runner, no
huey consumers), and the URL of the cyclepref experiment's runs (its model-training view, not the GenAI overview).
Prefect: `prefect server start` with PREFECT_UI_API_URL set to the server's own API, so the UI works on any port.
Each server runs in its own process group; `Server.stop` ends the whole group (workers included).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

KINDS = ("mlflow", "prefect")
DEFAULT_PORTS = {"mlflow": 5000, "prefect": 4200}
HEALTH = {"mlflow": "/health", "prefect": "/api/health"}
ML_VIEW = "?workflowType=machine_learning"
"""MLflow's UI opens in its GenAI view unless the URL names the workflow type (localStorage otherwise)."""
QUIET = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


class UIError(RuntimeError):
    """A UI that cannot start: no project, a busy port, a server that exited or never answered."""


def project_root(start: Path | None = None) -> Path:
    """The nearest directory at or above `start` (default: the working directory) holding dvc.yaml."""
    here = (start or Path.cwd()).resolve()
    for candidate in (here, *here.parents):
        if (candidate / "dvc.yaml").is_file():
            return candidate
    raise UIError(f"{here}: not inside a cyclepref project (no dvc.yaml here or above)")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
        return True


def pick_port(kind: str, host: str, port: int | None) -> int:
    """The given port (an error when busy), else the kind's usual port when free, else any free port."""
    if port is not None:
        if not port_free(host, port):
            raise UIError(f"port {port} on {host} is in use")
        return port
    usual = DEFAULT_PORTS[kind]
    return usual if port_free(host, usual) else free_port(host)


def mlflow_start_url(root: Path, base: str) -> str:
    """The cyclepref experiment's runs in the model-training view; the experiments list when there is none yet."""
    from cyclepref import tracking

    db = root / "mlflow.db"
    if db.exists():
        import sqlite3

        name = os.environ.get("CYCLEPREF_EXPERIMENT", tracking.EXPERIMENT)
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
            try:
                row = con.execute("select experiment_id from experiments where name = ?", (name,)).fetchone()
            except sqlite3.Error:
                row = None
        if row:
            return f"{base}/#/experiments/{row[0]}/runs{ML_VIEW}"
    return f"{base}/#/experiments{ML_VIEW}"


def command(kind: str, root: Path, host: str, port: int) -> tuple[list[str], dict[str, str]]:
    """The server command and its environment."""
    env = {**os.environ, **QUIET, "PYTHONUNBUFFERED": "1"}
    if kind == "mlflow":
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
        store = f"sqlite:///{root / 'mlflow.db'}"
        return [sys.executable, "-m", "mlflow", "server", "--host", host, "--port", str(port), "--workers", "1",
                "--backend-store-uri", store, "--default-artifact-root", "mlruns"], env
    if kind == "prefect":
        env["PREFECT_UI_API_URL"] = f"http://{host}:{port}/api"
        return [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port)], env
    raise UIError(f"unknown UI {kind!r}; one of {', '.join(KINDS)}")


@dataclass
class Server:
    kind: str
    root: Path
    url: str
    start_url: str
    proc: subprocess.Popen
    log: Path

    def stop(self, grace_s: float = 15.0) -> None:
        """SIGTERM to the server's process group, SIGKILL to what is left after `grace_s`."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            deadline = time.monotonic() + grace_s
            while time.monotonic() < deadline and group_alive(self.proc.pid):
                self.proc.poll()
                time.sleep(0.2)
            if not group_alive(self.proc.pid):
                break
        self.proc.wait(timeout=grace_s)


def group_alive(pgid: int) -> bool:
    """Whether any process of process group `pgid` is still running (zombies excluded)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def start(kind: str, root: Path, host: str = "127.0.0.1", port: int | None = None, wait_s: float = 300.0,
          log: Path | None = None) -> Server:
    """Start the UI server of `kind` for the project at `root` and wait until it answers its health check."""
    root = project_root(root)
    port = pick_port(kind, host, port)
    cmd, env = command(kind, root, host, port)
    log = log or Path(tempfile.mkstemp(prefix=f"cyclepref-ui-{kind}-", suffix=".log")[1])
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://{host}:{port}"
    server = Server(kind, root, base, base, proc, log)
    deadline = time.monotonic() + wait_s
    while not _healthy(base + HEALTH[kind]):
        if proc.poll() is not None or time.monotonic() > deadline:
            server.stop()
            tail = log.read_text(errors="replace")[-2000:]
            raise UIError(f"{kind} server did not start on {base} (log {log}):\n{tail}")
        time.sleep(0.5)
    server.start_url = mlflow_start_url(root, base) if kind == "mlflow" else f"{base}/runs"
    return server


def advice(server: Server) -> list[str]:
    """What to export in the shell that runs the flows, and where the data lives."""
    if server.kind == "mlflow":
        return [f"export CYCLEPREF_MLFLOW_UI_URL={server.url}   # links in the Prefect artifacts",
                f"store: {server.root / 'mlflow.db'}, artifacts under {server.root / 'mlruns'}"]
    home = os.environ.get("PREFECT_HOME") or str(Path.home() / ".prefect")
    return [f"export PREFECT_API_URL={server.url}/api   # flows report to this server",
            f"database: {home}/prefect.db (PREFECT_HOME={home}); export the same PREFECT_HOME before "
            "`cyclepref ui prefect` to keep one database, or PREFECT_HOME=<project>/.prefect to keep this "
            "project's flow runs apart"]


def serve(kind: str, root: Path, host: str, port: int | None, echo=print) -> None:
    """Start the UI, print where it is, and run until interrupted; then stop every process it started."""
    server = start(kind, root, host, port)
    stop = {"now": False}

    def handler(signum, frame):
        stop["now"] = True

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        echo(f"{kind} UI: {server.start_url}")
        for line in advice(server):
            echo(line)
        echo(f"server log: {server.log}; Ctrl-C stops it")
        while not stop["now"] and server.proc.poll() is None:
            time.sleep(0.5)
    finally:
        server.stop()
        for s, h in previous.items():
            signal.signal(s, h)
    if not stop["now"]:
        raise UIError(f"{kind} server exited with {server.proc.returncode} (log {server.log})")
