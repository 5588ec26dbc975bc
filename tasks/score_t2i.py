"""Stage score_t2i: text similarity between each prompt and its back-captions.

Output: data/t2i/scores/ (see cyclepref.tables). Logic: cyclepref.cycle.score_t2i.
"""

from __future__ import annotations

from pathlib import Path

from cyclepref import cycle, runtime, stage, tracking
from cyclepref.config import Params, require
from tasks.gate import require_gates


def run(params: Params, root: Path) -> dict:
    cfg = require(params.score_t2i, "score_t2i")
    require_gates("score_t2i", root, ["t2i_reconstructions"])
    ctx = cycle.Context(root, runtime.device())
    summary = cycle.score_t2i(ctx, cfg.metric, runtime.batch_size("score_t2i", cfg.batch_size))
    tracking.log_examples("score_t2i", cycle.examples(ctx, "score_t2i"))
    return summary


def main() -> None:
    stage.main("score_t2i", run)


if __name__ == "__main__":
    main()
