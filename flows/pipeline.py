"""The pipeline flow: every DVC stage in DVC's own order, one Prefect task per stage.

Each task runs `dvc repro --single-item <stage>` in its own process group, so a stage has a hard timeout (the whole
group is killed) and its GPU memory is freed when the process exits. DVC decides whether a stage runs or is skipped
as up to date; Prefect caching is off (the only cache is DVC's). Only transient failures are retried (timeouts,
processes killed by a signal, DVC lock contention, connection errors); a failed data-quality gate, a config error,
running out of memory and any other stage error fail the flow at once. An interruption (SIGINT, SIGTERM, which is how
Prefect's runner delivers a cancel) ends every running stage's process group, and no stage starts or is retried
after it. MLflow lineage: see flows/lineage.py.

Independent stages (the I2T and T2I branches, their gates) run concurrently up to CYCLEPREF_CONCURRENT_STAGES
(flows/settings.py), each pinned to one of CYCLEPREF_STAGE_GPUS when given. Concurrent `dvc repro --single-item`
processes share the repository lock: each waits for it (`dvc --wait-for-lock`), starts are staggered, and a stage
that still loses a race for a lock (.dvc/tmp/lock, rwlock) is retried at once, before Prefect's own retries.
"""

from __future__ import annotations

import concurrent.futures
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows import lineage, settings, uptodate

GATE_PREFIX = "gate@"
GATE_REPORTS = "reports/dq"
RUN_MARKER = "Running stage '"
SKIP_MARKERS = ("didn't change, skipping", "is cached - skipping run")
TRANSIENT_EXCEPTIONS = (
    "ConnectionError",
    "ConnectionResetError",
    "ConnectionRefusedError",
    "ConnectionAbortedError",
    "BrokenPipeError",
    "TimeoutError",
)
OUT_OF_MEMORY_EXCEPTIONS = ("OutOfMemoryError", "MemoryError")
LOCK_MARKERS = ("Unable to acquire lock", "is busy, it is being blocked by")
KILLED_CODES = {137, 143}


class StageError(RuntimeError):
    """A stage that did not complete; `transient` decides whether Prefect retries it."""

    transient: ClassVar[bool] = False
    kind: ClassVar[str] = "failed"

    def __init__(self, stage: str, message: str, output: str = ""):
        super().__init__(f"{stage}: {message}" + (f"\n--- last output ---\n{output}" if output else ""))
        self.stage = stage
        self.output = output


class StageFailed(StageError):
    """The stage's command failed (a code error, a missing input): retrying would fail the same way."""


class ConfigError(StageError):
    """Invalid params or dvc.yaml (stages exit with code 2 on a params error)."""

    kind = "config error"


class GateFailed(StageError):
    """A data-quality gate failed a critical check; its report is reports/dq/<gate>.json."""

    kind = "gate failed"


class OutOfMemory(StageFailed):
    """The stage ran out of memory (CUDA or host): a retry with the same settings fails the same way."""

    kind = "out of memory"


class TransientStageError(StageError):
    """A failure that may pass on a retry: a timeout, a killed process, a busy DVC lock, a lost connection."""

    transient = True
    kind = "transient"


class StageTimeout(TransientStageError):
    kind = "timeout"


@dataclass(frozen=True)
class StageOutcome:
    stage: str
    status: str
    seconds: float
    attempts: int
    child_run_id: str
    producer_run_id: str | None
    lock_hash: str | None
    origin: str = lineage.FROM_RUN

    def outputs_from(self) -> str:
        return self.producer_run_id or {lineage.FROM_GIT: "git", lineage.FROM_DVC: "DVC cache"}.get(self.origin, "?")


@dataclass
class PipelineResult:
    parent_run_id: str
    experiment_id: str
    profile: str
    stages: list[str]
    outcomes: list[StageOutcome] = field(default_factory=list)
    failed_stage: str | None = None
    error: str | None = None

    def outcome(self, stage: str) -> StageOutcome | None:
        return next((o for o in self.outcomes if o.stage == stage), None)


def stage_order(root: Path) -> list[str]:
    """The stages of root/dvc.yaml in the order `dvc repro` runs them (DVC's own planner on DVC's graph)."""
    return stage_plan(root)[0]


def stage_plan(
    root: Path, status: bool = False, targets: list[str] | None = None
) -> tuple[list[str], dict[str, list[str]]] | tuple:
    """(the stages in `dvc repro` order, each stage's direct upstream stages) from DVC's own graph; with `status`,
    also the stages DVC would skip now (one in-process `dvc status` on the same index). `targets`: only these
    stages and everything upstream of them (`dvc repro TARGET...`); None: the whole pipeline."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo
    from dvc.repo.reproduce import collect_stages, get_active_graph, plan_repro

    try:
        with Repo(str(root)) as repo:
            graph = get_active_graph(repo.index.graph)
            names = [f"{root / 'dvc.yaml'}:{t}" for t in targets] if targets else [str(root / "dvc.yaml")]
            planned = plan_repro(graph, collect_stages(repo, names))
            upstream = {_address(s): sorted(_address(u) for u in graph.successors(s)) for s in planned}
            order = [_address(s) for s in planned]
            if not status:
                return order, upstream
            changed = set(repo.status())
            return order, upstream, {_address(s) for s in planned if s.addressing not in changed}
    except DvcException as err:
        raise ConfigError("dvc.yaml", str(err)) from err


def _address(stage) -> str:
    """The stage's name as `dvc repro` takes it from the project root (Stage.addressing is relative to the cwd)."""
    name = getattr(stage, "name", None)
    if name is None:
        return stage.path_in_repo
    return name if stage.path_in_repo == "dvc.yaml" else f"{stage.path_in_repo}:{name}"


def preflight(root: Path) -> None:
    """ConfigError with one line per entry under a stage's deps that DVC cannot hash (cyclepref.preflight)."""
    from cyclepref.config import ParamsError, load_params
    from cyclepref.preflight import require_clean

    try:
        require_clean(root, root / "dvc.yaml", load_params(root / "params.yaml"))
    except ParamsError as err:
        raise ConfigError("preflight", str(err).removeprefix("preflight: ")) from err


def read_profile(root: Path) -> str:
    from cyclepref.config import ParamsError, load_params

    try:
        return load_params(root / "params.yaml").profile
    except ParamsError as err:
        raise ConfigError("params.yaml", str(err)) from err


def gate_report_path(root: Path, stage: str) -> Path | None:
    return root / GATE_REPORTS / f"{stage[len(GATE_PREFIX):]}.json" if stage.startswith(GATE_PREFIX) else None


def _gate_failed(root: Path, stage: str) -> bool:
    import json

    path = gate_report_path(root, stage)
    if path is None or not path.exists():
        return False
    try:
        return json.loads(path.read_text()).get("success") is False
    except ValueError:
        return False


def classify(stage: str, returncode: int, output: str, root: Path) -> StageError:
    """The error for a `dvc repro` that exited with `returncode` after printing `output`."""
    exited = re.findall(r"exited with (-?\d+)", output)
    code = int(exited[-1]) if exited else None
    exceptions = re.findall(r"^(?:[\w.]+\.)?(\w+(?:Error|Exception)):", output, flags=re.MULTILINE)
    if any(marker in output for marker in LOCK_MARKERS):
        return TransientStageError(stage, "a DVC lock is held by another process", output)
    status = code if code is not None else returncode
    if returncode < 0 or returncode in KILLED_CODES or status < 0 or status in KILLED_CODES:
        return TransientStageError(stage, f"killed by a signal (exit {status})", output)
    if code == 2 or "is invalid" in output or "ParamsError" in exceptions:
        return ConfigError(stage, f"invalid configuration (exit {status})", output)
    if code == 1 and _gate_failed(root, stage):
        return GateFailed(stage, f"data-quality gate failed, see {gate_report_path(root, stage)}", output)
    if set(exceptions) & set(OUT_OF_MEMORY_EXCEPTIONS) or "CUDA out of memory" in output:
        return OutOfMemory(stage, "out of memory: lower the stage's batch_size in params or use a larger device "
                           "(not retried: the same settings fail the same way)", output)
    if exceptions and exceptions[-1] in TRANSIENT_EXCEPTIONS:
        return TransientStageError(stage, f"transient {exceptions[-1]}", output)
    return StageFailed(stage, f"stage command failed (exit {status})", output)


def stage_env(root: Path, parent_run_id: str, gpu: str | None = None) -> dict[str, str]:
    """The stage's environment: this interpreter first on PATH, the tracking URI, the parent run and (when the flow
    pins stages to GPUs) CUDA_VISIBLE_DEVICES."""
    from cyclepref.tracking import tracking_uri

    env = dict(os.environ)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    env[lineage.PARENT_ENV] = parent_run_id
    env["CYCLEPREF_MLFLOW_URI"] = tracking_uri(root)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env.setdefault("DVC_NO_ANALYTICS", "1")
    return env


def _kill_group(proc: subprocess.Popen, grace_s: float = 10.0) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace_s)
            return
        except subprocess.TimeoutExpired:
            continue


LIVE_STAGES: set[subprocess.Popen] = set()
"""The stage processes (each its own session) this process is running: ended by kill_live_stages on a signal."""


STOPPING = threading.Event()
"""Set once this process ends its stages (a signal, a cancelled flow): no stage starts or is retried after that."""


def kill_live_stages(grace_s: float = 3.0) -> None:
    STOPPING.set()
    for proc in list(LIVE_STAGES):
        _kill_group(proc, grace_s)


def execute_stage(
    stage: str, root: Path, env: dict[str, str], timeout_s: float, echo: Callable[[str], None] = print
) -> tuple[str, float]:
    """Run `dvc repro --single-item stage`; returns (executed | skipped, seconds) or raises a StageError."""
    if STOPPING.is_set():
        raise StageFailed(stage, "not started: the flow is stopping")
    started = time.perf_counter()
    tail: deque[str] = deque(maxlen=400)
    seen = {"run": False, "skip": False}
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dvc", "--wait-for-lock", "repro", "--single-item", stage],
            cwd=root,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,
        )
    except OSError as err:
        raise TransientStageError(stage, f"cannot start dvc: {err}") from err

    def pump() -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.rstrip("\n").rsplit("\r", 1)[-1]
            seen["run"] |= RUN_MARKER in line
            seen["skip"] |= any(m in line for m in SKIP_MARKERS)
            tail.append(line)
            if line.strip():
                echo(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    LIVE_STAGES.add(proc)
    try:
        returncode = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        reader.join(timeout=5)
        raise StageTimeout(stage, f"exceeded {timeout_s:g} s and was killed", "\n".join(tail)) from None
    except BaseException:
        _kill_group(proc, 3.0)
        raise
    finally:
        LIVE_STAGES.discard(proc)
    reader.join()
    if returncode != 0:
        raise classify(stage, returncode, "\n".join(tail), root)
    status = lineage.SKIPPED if seen["skip"] and not seen["run"] else lineage.EXECUTED
    return status, round(time.perf_counter() - started, 2)


def dvc_repo_lock(root: Path):
    """DVC's repository lock (.dvc/tmp/lock), waited for: held while reading dvc.lock, so that a concurrent
    `dvc repro` (which rewrites dvc.lock in place under this lock) is never read half-written."""
    from dvc.lock import make_lock

    tmp = root / ".dvc" / "tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    return make_lock(str(tmp / "lock"), tmp_dir=str(tmp), wait=True)


def is_lock_race(err: StageError) -> bool:
    return isinstance(err, TransientStageError) and any(marker in err.output for marker in LOCK_MARKERS)


def execute_with_lock_retries(
    stage: str, root: Path, env: dict[str, str], timeout_s: float, echo: Callable[[str], None], retries: int
) -> tuple[str, float]:
    """execute_stage, run again after a short random pause when it lost a race for a DVC lock."""
    for attempt in range(retries + 1):
        try:
            return execute_stage(stage, root, env, timeout_s, echo)
        except TransientStageError as err:
            if attempt == retries or not is_lock_race(err):
                raise
            echo(f"{stage}: a DVC lock is busy; starting again (retry {attempt + 1} of {retries})")
            time.sleep(random.uniform(0.5, 2.0))
    raise AssertionError("unreachable")


def retry_transient(task_, task_run, state) -> bool:
    """Prefect retry_condition_fn: retry only TransientStageError, and nothing once the flow is stopping."""
    if STOPPING.is_set():
        return False
    try:
        state.result()
    except TransientStageError:
        return True
    except BaseException:
        return False
    return False


@task(
    name="dvc-stage",
    task_run_name="{stage}",
    cache_policy=NO_CACHE,
    persist_result=False,
    retry_condition_fn=retry_transient,
)
def run_stage(
    stage: str, root: str, parent_run_id: str, timeout_s: float, gpu: str | None = None, fresh: bool = False
):
    """One DVC stage in a subprocess, then its MLflow child run (tagged or created). Returns the StageOutcome; a
    stage DVC skipped ends in a Completed state named "Skipped", so the UI tells it from one that ran. A `fresh`
    stage (up to date in the flow's `dvc status` and no upstream stage ran since) is skipped without a process."""
    from prefect.runtime import task_run
    from prefect.states import Completed

    logger = get_run_logger()
    path = Path(root)
    if fresh:
        status, seconds = lineage.SKIPPED, 0.0
    else:
        env = stage_env(path, parent_run_id, gpu)
        status, seconds = execute_with_lock_retries(stage, path, env, timeout_s, logger.info, settings.lock_retries())
    client = lineage.client(path)
    with dvc_repo_lock(path):
        record = (lineage.record_executed if status == lineage.EXECUTED else lineage.record_skipped)(
            client, parent_run_id, stage, path
        )
    logger.info("%s: %s in %.1f s (MLflow run %s)", stage, status, seconds, record.child_run_id)
    outcome = StageOutcome(
        stage, status, seconds, int(task_run.run_count or 1), record.child_run_id, record.producer_run_id,
        record.lock_hash, record.origin,
    )
    if status == lineage.SKIPPED:
        return Completed(name="Skipped", message=f"up to date; outputs from {outcome.outputs_from()}", data=outcome)
    return outcome


def summary_markdown(result: PipelineResult, run_link: str) -> str:
    """The run summary: every stage with its status (executed / skipped as up to date / failed / not run)."""
    done = {o.stage: o for o in result.outcomes}
    state = "FAILED" if result.failed_stage else "completed"
    executed = sum(o.status == lineage.EXECUTED for o in result.outcomes)
    skipped = sum(o.status == lineage.SKIPPED for o in result.outcomes)
    lines = [
        f"# cyclepref pipeline: {state}",
        "",
        f"Profile `{result.profile}`; {executed} stage(s) run, {skipped} skipped as up to date, "
        f"{len(result.stages)} in the DAG. MLflow run: [{result.parent_run_id}]({run_link})",
        "",
        "| stage | status | seconds | attempts | MLflow run | outputs from run |",
        "|---|---|---|---|---|---|",
    ]
    for stage in result.stages:
        o = done.get(stage)
        if o is not None:
            lines.append(
                f"| `{stage}` | {o.status} | {o.seconds:.1f} | {o.attempts} | {o.child_run_id} | "
                f"{o.outputs_from()} |"
            )
        elif stage == result.failed_stage:
            lines.append(f"| `{stage}` | **failed** | | | | |")
        else:
            lines.append(f"| `{stage}` | not run | | | | |")
    if result.error:
        lines += ["", "## Error", "", "```", result.error[-4000:], "```"]
    return "\n".join(lines) + "\n"


def gate_tables(root: Path, stages: list[str]) -> dict[str, list[dict]]:
    """gate stage -> rows (one per check) of its report, for the gates whose report exists."""
    import json

    tables: dict[str, list[dict]] = {}
    for stage in stages:
        path = gate_report_path(root, stage)
        if path is None or not path.exists():
            continue
        report = json.loads(path.read_text())
        tables[stage] = [
            {
                "check": name,
                "severity": check.get("severity"),
                "success": check.get("success"),
                "observed": markdown_cell(check.get("observed")),
                "expected": markdown_cell(check.get("expected")),
            }
            for name, check in sorted(report.get("checks", {}).items())
        ]
    return tables


BLOCK_START = re.compile(r"^(\s*)(>|[#*+-](?=\s|$)|\d+[.)](?=\s|$))")


def markdown_cell(value: object) -> str:
    """Text for a cell of a Prefect table artifact, which the UI renders as markdown: a leading block marker
    (`>=` would open a quote, `- ` a list, `1.` a numbered list, `#` a heading) and pipes are escaped."""
    text = str(value).replace("|", "\\|")
    return BLOCK_START.sub(r"\1\\\2", text)


def artifact_key(text: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")


def publish(result: PipelineResult, root: Path, client) -> None:
    """Prefect artifacts (summary, one table per gate report, link to the MLflow run) and the summary in MLflow."""
    from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

    link = lineage.run_url(settings.mlflow_ui_url(root), result.experiment_id, result.parent_run_id)
    text = summary_markdown(result, link)
    create_markdown_artifact(text, key="pipeline-summary", description="Stages run / skipped, seconds each")
    ran = [o.stage for o in result.outcomes] + ([result.failed_stage] if result.failed_stage else [])
    for stage, rows in gate_tables(root, ran).items():
        create_table_artifact(rows, key=artifact_key(stage), description=f"Data-quality report of {stage}")
    create_link_artifact(link, link_text="MLflow pipeline run", key="mlflow-pipeline-run")
    client.log_text(result.parent_run_id, text, "pipeline_summary.md")


class StageScheduler:
    """Starts each stage once its upstream stages have completed, at most `limit` at a time, in DVC's order among
    the ready ones (limit 1 = exactly `dvc repro`'s sequence). After a failure nothing new starts; the stages
    already running finish, then the first failure is raised."""

    def __init__(self, stages: list[str], upstream: dict[str, list[str]], limit: int, gpus: list[str] | None = None):
        self.stages, self.limit = stages, max(1, limit)
        self.upstream = {s: [u for u in upstream.get(s, []) if u in stages] for s in stages}
        self.free_gpus = list(gpus or [])
        self.done: dict[str, object] = {}
        self.failed: str | None = None
        self.last_started: str | None = None

    def ready(self, pending: list[str], running: dict) -> list[str]:
        free = self.limit - len(running)
        return [s for s in pending if all(u in self.done for u in self.upstream[s])][: max(free, 0)]

    def fresh(self, stage: str, up_to_date: set[str]) -> bool:
        """Up to date when the flow started, and every upstream stage was skipped (none changed its outputs)."""
        return stage in up_to_date and all(
            getattr(self.done.get(u), "status", None) == "skipped" for u in self.upstream[stage])

    def run(self, submit: Callable[[str, str | None], object], stagger_s: float = 0.0) -> None:
        """`submit(stage, gpu)` returns a Prefect future whose result is the task's final state."""
        pending, running, error = list(self.stages), {}, None
        while running or (pending and error is None):
            starts = self.ready(pending, running) if error is None else []
            for i, stage in enumerate(starts):
                if i or running:
                    time.sleep(stagger_s)
                gpu = self.free_gpus.pop(0) if self.free_gpus else None
                running[stage] = (submit(stage, gpu), gpu)
                pending.remove(stage)
                self.last_started = stage
            if not running:
                raise RuntimeError(f"stages {pending} wait for stages that are not in the plan")
            waiting = {future.wrapped_future: stage for stage, (future, _) in running.items()}
            finished, _ = concurrent.futures.wait(waiting, return_when=concurrent.futures.FIRST_COMPLETED)
            for stage in sorted((waiting[f] for f in finished), key=self.stages.index):
                future, gpu = running.pop(stage)
                if gpu is not None:
                    self.free_gpus.append(gpu)
                try:
                    self.done[stage] = future.result()
                except BaseException as err:
                    if error is None:
                        self.failed, error = stage, err
        if error is not None:
            raise error

    def outcomes(self) -> list:
        """The completed stages' outcomes in DVC's order."""
        return [self.done[s] for s in self.stages if s in self.done]


@flow(name="cyclepref-pipeline", persist_result=False)
@lineage.in_project
def pipeline(
    root: str = ".",
    trigger: str = "manual",
    stage_timeout_s: float | None = None,
    stage_retries: int | None = None,
    retry_delay_s: float | None = None,
    targets: list[str] | None = None,
) -> PipelineResult:
    """Run every DVC stage of `root` in dependency order (with `targets`: those stages and their upstream only); one
    MLflow parent run, one child per stage."""
    from prefect.runtime import flow_run

    path = Path(root).resolve()
    STOPPING.clear()
    stages, upstream, fresh = stage_plan(path, status=True, targets=targets)
    profile = read_profile(path)
    preflight(path)
    timeout = settings.stage_timeout_s() if stage_timeout_s is None else stage_timeout_s
    run = run_stage.with_options(
        retries=settings.stage_retries() if stage_retries is None else stage_retries,
        retry_delay_seconds=settings.retry_delay_s() if retry_delay_s is None else retry_delay_s,
    )
    client = lineage.client(path)
    tags = {"prefect.flow_run_id": str(flow_run.id or ""), "cyclepref.stages": ",".join(stages)}
    parent = lineage.start_pipeline_run(client, path, profile, trigger, tags)
    result = PipelineResult(parent, lineage.experiment_id(client), profile, stages)
    scheduler = StageScheduler(stages, upstream, settings.concurrent_stages(), settings.stage_gpus())
    try:
        scheduler.run(lambda stage, gpu: run.submit(stage, str(path), parent, timeout, gpu,
                                                    scheduler.fresh(stage, fresh)),
                      stagger_s=settings.stage_stagger_s())
    except BaseException as err:
        if not isinstance(err, StageError):
            kill_live_stages()
        result.outcomes = scheduler.outcomes()
        result.failed_stage, result.error = scheduler.failed or scheduler.last_started, str(err)
        client.set_tag(parent, "cyclepref.failed_stage", result.failed_stage or "")
        lineage.finish_pipeline_run(client, parent, path, failed=True)
        publish(result, path, client)
        raise
    result.outcomes = scheduler.outcomes()
    lineage.finish_pipeline_run(client, parent, path, failed=False)
    publish(result, path, client)
    if not targets:
        uptodate.remember(path, parent, "cyclepref pipeline", client.tracking_uri, len(stages))
    return result
