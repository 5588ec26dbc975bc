"""Stage gate@<name>: validate one table and write its data-quality report; fail only on critical checks.

    python -m tasks.gate <name>      name in: inputs, i2t_candidates, i2t_reconstructions, t2i_candidates,
                                     t2i_reconstructions, i2t_scores, t2i_scores, pairs

Outputs: reports/dq/<name>.json (the report, with the digest of the table it checked) and .md,
reports/metrics/gate_<name>.json (DVC metric: passed, rows, warnings). Thresholds: params `gates.<name>`. Every stage
checks the gates of the tables it reads before it runs (cyclepref.stage, cyclepref.gates.require_read).
A failed gate exits 1 after writing its report and printing the failing checks, so DVC runs nothing downstream.
"""

from __future__ import annotations

import sys
from pathlib import Path

from cyclepref import gates, metrics, stage, store
from cyclepref.config import Gates, Params, require
from cyclepref.gates import GATES
from cyclepref.tables import PATHS

REPORT_DIR = gates.REPORT_DIR


def table_path(name: str, root: Path) -> Path:
    """Where the table that gate `name` validates lives under `root`."""
    return root / PATHS[GATES[name][0]]


def evaluate(name: str, root: Path, thresholds: Gates) -> dict:
    """The report of gate `name` on the tables under `root`, with the digest of the table it checked."""
    table_key, related = GATES[name]
    digest = store.table_digest(table_path(name, root))
    table = gates.read_gate_table(table_path(name, root))
    upstream = {kw: gates.read_gate_table(root / PATHS[key]) for kw, key in related.items()}
    report = gates.check(name, table, getattr(thresholds, name), PATHS[table_key], **upstream)
    if store.table_digest(table_path(name, root)) != digest:
        raise SystemExit(f"gate@{name}: {PATHS[table_key]} changed while it was checked; rerun the gate")
    return report | {"digest": digest}


def write_report(report: dict, root: Path) -> tuple[Path, Path]:
    """The full report (reports/dq/<gate>.json and .md) and its headline metrics (cyclepref.metrics)."""
    out = root / REPORT_DIR / f"{report['gate']}.json"
    store.write_json(report, out)
    metrics.write(root, f"gate@{report['gate']}", metrics.gate(report))
    md = out.with_suffix(".md")
    with store.atomic_path(md) as tmp:
        tmp.write_text(gates.render_markdown(report))
    return out, md


def run(params: Params, root: Path, name: str) -> dict:
    thresholds = require(params.gates, "gates")
    report = evaluate(name, root, thresholds)
    json_path, md_path = write_report(report, root)

    import mlflow

    from cyclepref.tracking import flatten

    mlflow.log_params(flatten(getattr(thresholds, name), f"gates.{name}."))
    mlflow.log_artifact(str(json_path), "dq")
    mlflow.log_artifact(str(md_path), "dq")
    counts = report["counts"]
    summary = {"rows": report["rows"], **counts, "success": int(report["success"])}
    if not report["success"]:
        mlflow.log_metrics({k: float(v) for k, v in summary.items()})
        print(gates.failure_message(report), file=sys.stderr)
        print(f"report: {md_path}", file=sys.stderr)
        raise SystemExit(1)
    if counts["failed_warning"]:
        print(gates.failure_message(report), file=sys.stderr)
    return summary


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0] not in GATES:
        raise SystemExit(f"usage: python -m tasks.gate <name>   (name in: {', '.join(GATES)})")
    name = args[0]
    stage.main(f"gate@{name}", lambda params, root: run(params, root, name))


if __name__ == "__main__":
    main()
