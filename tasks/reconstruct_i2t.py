"""Stage reconstruct_i2t: the text-to-image model renders each distinct caption of an input once.

Output: data/i2t/reconstructions/ (see cyclepref.tables). Logic: cyclepref.cycle.reconstruct_i2t.
"""

from __future__ import annotations

from pathlib import Path

from cyclepref import cycle, runtime, stage, tracking
from cyclepref.config import Params, require
from tasks.gate import require_gates


def run(params: Params, root: Path) -> dict:
    cfg = require(params.reconstruct_i2t, "reconstruct_i2t")
    require_gates("reconstruct_i2t", root, ["i2t_candidates"])
    ctx = cycle.Context(root, runtime.device())
    summary = cycle.reconstruct_i2t(ctx, cfg.model, runtime.batch_size("reconstruct_i2t", cfg.batch_size))
    tracking.log_examples("reconstruct_i2t", cycle.examples(ctx, "reconstruct_i2t"))
    return summary


def main() -> None:
    stage.main("reconstruct_i2t", run)


if __name__ == "__main__":
    main()
