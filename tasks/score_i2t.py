"""Stage score_i2t: image similarity between each input image and its reconstructions.

Output: data/i2t/scores/ (see cyclepref.tables). Logic: cyclepref.cycle.score_i2t.
"""

from __future__ import annotations

from pathlib import Path

from cyclepref import cycle, runtime, stage, tracking
from cyclepref.config import Params, require
from tasks.gate import require_gates


def run(params: Params, root: Path) -> dict:
    cfg = require(params.score_i2t, "score_i2t")
    require_gates("score_i2t", root, ["i2t_reconstructions"])
    ctx = cycle.Context(root, runtime.device())
    summary = cycle.score_i2t(ctx, cfg.metric, runtime.batch_size("score_i2t", cfg.batch_size))
    tracking.log_examples("score_i2t", cycle.examples(ctx, "score_i2t"))
    return summary


def main() -> None:
    stage.main("score_i2t", run)


if __name__ == "__main__":
    main()
