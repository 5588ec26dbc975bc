"""Stages generate_i2t, reconstruct_i2t, score_i2t, generate_t2i, reconstruct_t2i, score_t2i:
`python -m tasks.cycle <stage>`.

The six cycle stages share one frame (cyclepref.stage checks the gates of the tables each reads): read the stage's
params section, call the stage's function in cyclepref.cycle (where the logic is) with the section's models and batch
size, log example rows.
Outputs: data/{i2t,t2i}/{candidates,reconstructions,scores}/ (see cyclepref.tables).
"""

from __future__ import annotations

import sys
from pathlib import Path

from cyclepref import cycle, runtime, stage, tracking
from cyclepref.config import Params, require

# stage -> the params fields passed to cyclepref.cycle.<stage> before batch_size
STAGES: dict[str, tuple[str, ...]] = {
    "generate_i2t": ("captioners",),
    "reconstruct_i2t": ("model",),
    "score_i2t": ("metric",),
    "generate_t2i": ("models", "seeds"),
    "reconstruct_t2i": ("captioner",),
    "score_t2i": ("metric",),
}


def run(params: Params, root: Path, name: str) -> dict:
    fields = STAGES[name]
    cfg = require(getattr(params, name), name)
    ctx = cycle.Context(root, runtime.device())
    summary = getattr(cycle, name)(ctx, *(getattr(cfg, f) for f in fields), runtime.batch_size(name, cfg.batch_size))
    tracking.log_examples(name, cycle.examples(ctx, name))
    return summary


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0] not in STAGES:
        raise SystemExit(f"usage: python -m tasks.cycle <stage>   (stage in: {', '.join(STAGES)})")
    stage.main(args[0], lambda params, root: run(params, root, args[0]))


if __name__ == "__main__":
    main()
