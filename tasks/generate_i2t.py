"""Stage generate_i2t: every captioner captions every input image.

Output: data/i2t/candidates/ (see cyclepref.tables). Logic: cyclepref.cycle.generate_i2t.
"""

from __future__ import annotations

from pathlib import Path

from cyclepref import cycle, runtime, stage, tracking
from cyclepref.config import Params, require
from tasks.gate import require_gates


def run(params: Params, root: Path) -> dict:
    cfg = require(params.generate_i2t, "generate_i2t")
    require_gates("generate_i2t", root, ["inputs"])
    ctx = cycle.Context(root, runtime.device())
    summary = cycle.generate_i2t(ctx, cfg.captioners, runtime.batch_size("generate_i2t", cfg.batch_size))
    tracking.log_examples("generate_i2t", cycle.examples(ctx, "generate_i2t"))
    return summary


def main() -> None:
    stage.main("generate_i2t", run)


if __name__ == "__main__":
    main()
