"""Stage build_pairs: preference pairs from the cycle scores of every task in params build_pairs.tasks.

Runs only after the gates of those score tables passed on the tables as they are now.
Outputs: data/pairs/pairs.parquet (PAIRS), data/pairs/manifest.json, reports/pairs.json (drop counts, survival, split
sizes, margin statistics and per-model win rates per task), reports/metrics/build_pairs_<task>.json (DVC metric).
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from cyclepref import metrics, stage, store, tables
from cyclepref.config import Params, require
from cyclepref.pairs import build_pairs, pair_stats
from cyclepref.tables import PAIRS, PATHS, SCORES

METRICS = "reports/pairs.json"


def run(params: Params, root: Path) -> dict:
    cfg = require(params.build_pairs, "build_pairs")
    scores = pa.concat_tables([store.read_table(root / PATHS[f"{task}_scores"], SCORES) for task in cfg.tasks])
    pairs, counts = build_pairs(scores, cfg)
    out = store.write_table(tables.conform_to_contract("pairs", pairs), root / PATHS["pairs"], PAIRS)
    stats = pair_stats(pairs, counts, cfg.tie_gap)
    report = store.write_json(stats, root / METRICS)
    metrics.write_parts(root, "build_pairs", metrics.pairs(stats), metrics.TASKS)
    store.write_manifest(out.parent, [out], pairs=pairs.num_rows, tasks=list(cfg.tasks))

    import mlflow

    mlflow.log_artifact(str(report))
    summary: dict = {"pairs": pairs.num_rows}
    for task, s in stats["tasks"].items():
        summary |= {f"{task}_pairs": s["pairs"], f"{task}_survival": round(s["survival"], 4)}
    return summary


def main() -> None:
    stage.main("build_pairs", run)


if __name__ == "__main__":
    main()
