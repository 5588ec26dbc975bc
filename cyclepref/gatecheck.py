"""The gate reports a stage relies on, kept light (no pandas, no Great Expectations): which gate guards which table,
which gated tables a stage reads (the gated tables among its deps in dvc.yaml), and the check that each of them passed
its gate on the table as it is now (the report's digest). cyclepref.gates builds the reports and re-exports these."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path

from cyclepref.tables import PATHS

CRITICAL = "critical"


class GateFailed(RuntimeError):
    """A stage was asked to run on a table whose gate failed or never ran."""


GATES: dict[str, tuple[str, dict[str, str]]] = {
    "inputs": ("inputs", {"quarantine": "quarantine"}),
    "i2t_candidates": ("i2t_candidates", {"inputs": "inputs", "quarantine": "i2t_quarantine"}),
    "i2t_reconstructions": ("i2t_reconstructions", {"candidates": "i2t_candidates"}),
    "t2i_candidates": ("t2i_candidates", {"inputs": "inputs"}),
    "t2i_reconstructions": ("t2i_reconstructions", {"candidates": "t2i_candidates"}),
    "i2t_scores": ("i2t_scores", {"candidates": "i2t_candidates"}),
    "t2i_scores": ("t2i_scores", {"candidates": "t2i_candidates"}),
    "pairs": ("pairs", {}),
}
"""gate name -> (the table it validates, {keyword: upstream table it is checked against}), as keys of PATHS."""

REPORT_DIR = "reports/dq"


def gates_read_by(deps: Iterable[str]) -> dict[str, str]:
    """gate name -> its table (a path of PATHS) for every gated table under one of a stage's `deps` (dvc.yaml)."""
    norm = [d.rstrip("/") for d in deps]
    return {name: PATHS[table] for name, (table, _) in GATES.items()
            if any(PATHS[table] == d or PATHS[table].startswith(d + "/") for d in norm)}


def require_read(stage: str, root: Path, deps: Iterable[str], only_present: bool = False) -> None:
    """Raise GateFailed unless the gate of every gated table among the stage's deps passed on the table as it is now
    (`only_present`: tables absent under root are not read by this run and are left out)."""
    if stage.startswith("gate@"):
        return
    tables = {name: Path(root) / path for name, path in gates_read_by(deps).items()}
    if only_present:
        tables = {name: path for name, path in tables.items() if path.exists()}
    require_passed(Path(root) / REPORT_DIR, tables)


def require_passed(report_dir: str | Path, tables: Mapping[str, str | Path]) -> None:
    """Raise GateFailed unless every named gate wrote a passing report on the table (gate name -> its path) as it is
    now, so a stage run alone (e.g. `dvc repro --single-item`) never consumes a table that failed its gate, was
    never gated, or changed after its gate passed."""
    from cyclepref.store import table_digest

    for name, table in tables.items():
        path = Path(report_dir) / f"{name}.json"
        if not path.exists():
            raise GateFailed(f"{path} not found: run the gate first (`dvc repro gate@{name}`)")
        report = json.loads(path.read_text())
        if not report.get("success"):
            raise GateFailed(f"gate {name} failed, see {path.with_suffix('.md')}:\n{failure_message(report)}")
        checked, now = report.get("digest"), table_digest(table)
        if checked != now:
            seen = f"digest {checked[:12]}" if isinstance(checked, str) else "no digest"
            raise GateFailed(
                f"{path} is stale: gate {name} checked another version of {table} ({seen}, now {now[:12]}); "
                f"rerun the gate (`dvc repro gate@{name}`)"
            )


def failure_message(report: dict) -> str:
    """The failing checks, one line each, critical first."""
    failed = [(n, c) for n, c in report["checks"].items() if not c["success"]]
    failed.sort(key=lambda nc: nc[1]["severity"] != CRITICAL)
    head = "FAILED" if not report["success"] else "passed with warnings" if failed else "passed"
    lines = [f"gate {report['gate']} ({report['table']}, {report['rows']} rows): {head}"]
    for name, c in failed:
        ex = f"; e.g. {', '.join(map(str, c['examples']))}" if c["examples"] else ""
        lines.append(f"  [{c['severity']}] {name}: observed {c['observed']}; expected {c['expected']}{ex}")
    return "\n".join(lines)
