"""The CycleReward reward model (PAPER.md §4): model, pair data, training, evaluation, serving.

Layout of what the stages write:
  data/reward/<variant>/model/     the best-by-validation RewardModel (train_reward; RewardModel.from_pretrained)
  data/work/reward/<variant>/      resumable training checkpoints (not a DVC output; survives interruptions)
  reports/reward/train.json        training metrics per variant
  reports/reward/eval.json         pairwise accuracies with 95% intervals (evaluate_reward)
  reports/metrics/                 their headline numbers, the DVC metrics (cyclepref.metrics)
  reports/reward/eval.md           the same as a readable table, with notes on the baselines
"""

from __future__ import annotations

from typing import Literal

Task = Literal["i2t", "t2i"]
Variant = Literal["i2t", "t2i", "combo"]
VARIANT_TASKS: dict[str, tuple[Task, ...]] = {"i2t": ("i2t",), "t2i": ("t2i",), "combo": ("i2t", "t2i")}

REWARD_DIR = "data/reward"
WORK_DIR = "data/work/reward"
REPORTS = {
    "train": "reports/reward/train.json",
    "eval": "reports/reward/eval.json",
    "eval_md": "reports/reward/eval.md",
}


def model_dir(variant: str) -> str:
    """Where train_reward writes the model of one variant."""
    return f"{REWARD_DIR}/{variant}/model"
