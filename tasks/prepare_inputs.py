"""Stage prepare_inputs: read the raw inputs, normalise them, quarantine bad ones.

Outputs: data/prepared/inputs.parquet, data/prepared/quarantine.parquet, data/prepared/_manifest.json.
Counts: raw items = inputs + quarantined + over_limit (inputs left out by prepare_inputs.limit).
"""

from __future__ import annotations

from pathlib import Path

from cyclepref import inputs as inp
from cyclepref import stage, store
from cyclepref.config import Params
from cyclepref.tables import PATHS


def run(params: Params, root: Path) -> dict:
    cfg = params.prepare_inputs
    try:
        records, quarantined = inp.prepare(inp.iter_source(cfg, root), cfg)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"prepare_inputs: {err}") from None
    records, over_limit = inp.apply_limit(records, cfg.limit)
    if not records:
        reasons = "; ".join(f"{q.source}: {q.reason}" for q in quarantined[:5])
        raise SystemExit(f"prepare_inputs: no valid inputs in {cfg.path} ({len(quarantined)} quarantined: {reasons})")
    out_inputs = store.write_table(inp.inputs_table(records), root / PATHS["inputs"], inp.INPUTS_SCHEMA)
    out_q = store.write_table(inp.quarantine_table(quarantined), root / PATHS["quarantine"], inp.QUARANTINE_SCHEMA)
    summary = {
        "inputs": len(records),
        "with_image": sum(r.image is not None for r in records),
        "with_prompt": sum(r.prompt is not None for r in records),
        "quarantined": len(quarantined),
        "over_limit": over_limit,
        "noted": sum(r.note is not None for r in records),
    }
    store.write_manifest(out_inputs.parent, [out_inputs, out_q], counts=summary, source=cfg.source)
    return summary


def main() -> None:
    stage.main("prepare_inputs", run)


if __name__ == "__main__":
    main()
