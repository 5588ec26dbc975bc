"""Stage reconstruct_t2i: the captioner describes every candidate image.

Output: data/t2i/reconstructions/ (see cyclepref.tables). Logic: cyclepref.cycle.reconstruct_t2i.
"""

from __future__ import annotations

from pathlib import Path

from cyclepref import cycle, runtime, stage, tracking
from cyclepref.config import Params, require
from tasks.gate import require_gates


def run(params: Params, root: Path) -> dict:
    cfg = require(params.reconstruct_t2i, "reconstruct_t2i")
    require_gates("reconstruct_t2i", root, ["t2i_candidates"])
    ctx = cycle.Context(root, runtime.device())
    summary = cycle.reconstruct_t2i(ctx, cfg.captioner, runtime.batch_size("reconstruct_t2i", cfg.batch_size))
    tracking.log_examples("reconstruct_t2i", cycle.examples(ctx, "reconstruct_t2i"))
    return summary


def main() -> None:
    stage.main("reconstruct_t2i", run)


if __name__ == "__main__":
    main()
