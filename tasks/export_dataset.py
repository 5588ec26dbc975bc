"""Stage export_dataset: the pairs as a Hugging Face `datasets` directory with a dataset card.

Output: data/export/dataset/ (README.md card, <task>/<split>-<k>-of-<n>.parquet, manifest.json); see cyclepref.export.
Runs only after gate `pairs` passed.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq

from cyclepref import stage, store
from cyclepref.config import Params, require
from cyclepref.export import provenance, write_export
from cyclepref.tables import PAIRS, PATHS
from tasks.build_pairs import METRICS

EXPORT_DIR = "data/export/dataset"


def run(params: Params, root: Path) -> dict:
    cfg = require(params.export_dataset, "export_dataset")
    pairs = store.read_table(root / PATHS["pairs"], PAIRS)
    tasks = set(pairs.column("task").to_pylist())
    inputs = pq.read_table(root / PATHS["inputs"], columns=["input_id", "image", "prompt"])
    candidates = {}
    if "i2t" in tasks:
        candidates["i2t"] = pq.read_table(root / PATHS["i2t_scores"], columns=["candidate_id", "text"])
    if "t2i" in tasks:
        candidates["t2i"] = pq.read_table(root / PATHS["t2i_candidates"], columns=["candidate_id", "image"])
    stats_path = root / METRICS
    stats = json.loads(stats_path.read_text()) if stats_path.exists() else None
    counts = write_export(root / EXPORT_DIR, pairs, inputs, candidates, cfg, stats, provenance(params))
    return {f"{task}_{split}": c["pairs"] for task, per in counts.items() for split, c in per.items()}


def main() -> None:
    stage.main("export_dataset", run)


if __name__ == "__main__":
    main()
