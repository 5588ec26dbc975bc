"""Stage generate_t2i: every text-to-image model renders every prompt once per seed.

Output: data/t2i/candidates/ (see cyclepref.tables). Logic: cyclepref.cycle.generate_t2i.
"""

from __future__ import annotations

from pathlib import Path

from cyclepref import cycle, runtime, stage, tracking
from cyclepref.config import Params, require
from tasks.gate import require_gates


def run(params: Params, root: Path) -> dict:
    cfg = require(params.generate_t2i, "generate_t2i")
    require_gates("generate_t2i", root, ["inputs"])
    ctx = cycle.Context(root, runtime.device())
    summary = cycle.generate_t2i(ctx, cfg.models, cfg.seeds, runtime.batch_size("generate_t2i", cfg.batch_size))
    tracking.log_examples("generate_t2i", cycle.examples(ctx, "generate_t2i"))
    return summary


def main() -> None:
    stage.main("generate_t2i", run)


if __name__ == "__main__":
    main()
