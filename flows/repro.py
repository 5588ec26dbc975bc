"""`cyclepref repro` (what `make run` runs): `dvc repro` with MLflow lineage, without Prefect or a server.

It opens one parent MLflow run (kind `pipeline`, trigger `make run`), runs `dvc repro` once with
CYCLEPREF_PARENT_RUN_ID exported, so every stage that runs logs its run as a child, and then records every stage DVC
reported, executed or skipped, exactly as the Prefect pipeline flow does (flows/lineage.py): executed runs get
their DVC lock hash, skipped stages get a child pointing to the run that produced their outputs.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from contextlib import chdir
from dataclasses import dataclass, field
from pathlib import Path

from flows import lineage, uptodate

RAN = re.compile(r"^Running stage '(.+)':")
SKIPPED = re.compile(r"^Stage '(.+)' (?:didn't change, skipping|is cached - skipping run)")


@dataclass
class ReproResult:
    parent_run_id: str
    returncode: int
    records: dict[str, lineage.StageRecord] = field(default_factory=dict)
    statuses: dict[str, str] = field(default_factory=dict)


def stage_statuses(lines: list[str]) -> dict[str, str]:
    """Stage -> executed | skipped, in the order `dvc repro` reported them."""
    out: dict[str, str] = {}
    for line in lines:
        if m := RAN.match(line):
            out[m.group(1)] = lineage.EXECUTED
        elif m := SKIPPED.match(line):
            out.setdefault(m.group(1), lineage.SKIPPED)
    return out


def run_dvc(root: Path, targets: list[str], env: dict[str, str], echo: Callable[[str], None]) -> tuple[int, list]:
    """`dvc repro [targets]` in `root`, its output echoed line by line; returns (exit code, lines)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "dvc", "repro", *targets],
        cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
    )
    lines = []
    assert proc.stdout is not None
    for raw in proc.stdout:
        line = raw.rstrip("\n").rsplit("\r", 1)[-1]
        lines.append(line)
        echo(line)
    return proc.wait(), lines


def summary_markdown(result: ReproResult) -> str:
    lines = [
        f"# cyclepref repro: {'completed' if result.returncode == 0 else 'FAILED'}",
        "",
        "| stage | status | MLflow run | outputs from |",
        "|---|---|---|---|",
    ]
    for stage, status in result.statuses.items():
        r = result.records.get(stage)
        origin = "" if r is None else (f"run {r.producer_run_id}" if r.producer_run_id else r.origin)
        lines.append(f"| `{stage}` | {status} | {r.child_run_id if r else ''} | {origin} |")
    return "\n".join(lines) + "\n"


def failed_stage(result: ReproResult) -> str | None:
    """The stage that stopped a failed `dvc repro`: the last one it started."""
    if result.returncode == 0:
        return None
    ran = [s for s, status in result.statuses.items() if status == lineage.EXECUTED]
    return ran[-1] if ran else None


def repro(
    root: Path, targets: list[str] | None = None, trigger: str = "make run", echo: Callable[[str], None] = print
) -> ReproResult:
    """Run `dvc repro` in `root` under one parent MLflow run and record every stage it reported; first the preflight
    (cyclepref.preflight: PreflightError, a ParamsError, before DVC hashes anything)."""
    from cyclepref.config import load_params
    from cyclepref.preflight import require_clean

    root = root.resolve()
    params = load_params(root / "params.yaml")
    require_clean(root, root / "dvc.yaml", params)
    with chdir(root):
        client = lineage.client(root)
        profile = params.profile
        parent = lineage.start_pipeline_run(client, root, profile, trigger, {"cyclepref.runner": "dvc repro"})
        env = {**os.environ, lineage.PARENT_ENV: parent, "CYCLEPREF_MLFLOW_URI": client.tracking_uri}
        env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
        code, lines = run_dvc(root, list(targets or []), env, echo)
        result = ReproResult(parent, code, statuses=stage_statuses(lines))
        failed = failed_stage(result)
        if failed is not None:
            result.statuses[failed] = "failed"
            client.set_tag(parent, "cyclepref.failed_stage", failed)
        for stage, status in result.statuses.items():
            if status == "failed":
                continue
            record = lineage.record_executed if status == lineage.EXECUTED else lineage.record_skipped
            result.records[stage] = record(client, parent, stage, root)
        lineage.finish_pipeline_run(client, parent, root, failed=code != 0)
        client.log_text(parent, summary_markdown(result), "repro_summary.md")
    if code == 0 and not targets:
        uptodate.remember(root, parent, trigger, client.tracking_uri, len(result.statuses))
    return result
