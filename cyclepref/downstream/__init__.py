"""Downstream uses of the preference data and the reward model (PAPER.md §6).

best_of_n            sample N candidates per held-out input, keep the best by a verifier (reward model, raw cycle
                     score, CLIPScore, random); quality of the pick against N, judged by the profile's evaluator
dpo_vlm              DPO of a LLaVA-family captioner on the I2T pairs (trl DPOTrainer + peft LoRA)
diffusion_dpo        Diffusion-DPO of a UNet text-to-image model on the T2I pairs (LoRA; reference = adapter off)
evaluate_downstream  the two DPO-trained models against their base models on held-out inputs
evaluators           ground truth (the sandbox's true scenes) or a model verifier, behind one scoring call

Layout of what the stages write:
  data/downstream/best_of_n/        candidates_<task>.parquet (every sample with every verifier's score), plots
  data/downstream/dpo_vlm/adapter/  peft LoRA adapter of the captioner (+ downstream.json: base model, settings)
  data/downstream/dpo_vlm/sft/      the SFT-on-chosen baseline adapter, same format
  data/downstream/diffusion_dpo/adapter/  diffusers LoRA weights of the UNet (+ downstream.json)
  data/downstream/diffusion_dpo/sft/      the SFT-on-preferred baseline adapter, same format
  reports/downstream/<stage>.json   full reports; their headline numbers, the DVC metrics, in reports/metrics/
  reports/downstream/best_of_n_<task>.csv  DVC plot data
Evaluator: `ground_truth` where the inputs are sandbox scenes with known content (attribute F1 of a caption or of
the objects parsed from an image); elsewhere a model (the reward model), which favours the reward-model verifier and
the DPO models trained on the pairs it was distilled from. Every mean is reported with a bootstrap interval over inputs.
"""

from __future__ import annotations

import json
from pathlib import Path

OUT_DIR = "data/downstream"
REPORT_DIR = "reports/downstream"
META_FILE = "downstream.json"
CHAMPION_FILE = "champion.json"  # beside a champion adapter the retraining flow materialised: which version it is


def stage_dir(stage: str) -> str:
    return f"{OUT_DIR}/{stage}"


def adapter_dir(stage: str) -> str:
    """Where dpo_vlm / diffusion_dpo write their adapter."""
    return f"{OUT_DIR}/{stage}/adapter"


def baseline_dir(stage: str) -> str:
    """Where dpo_vlm / diffusion_dpo write the SFT-on-chosen baseline adapter (same format as the adapter)."""
    return f"{OUT_DIR}/{stage}/sft"


def report_path(name: str) -> str:
    return f"{REPORT_DIR}/{name}.json"


def plot_path(task: str) -> str:
    """Best-of-N curve of one task (CSV: n, one column per verifier, then <verifier>_low, <verifier>_high)."""
    return f"{REPORT_DIR}/best_of_n_{task}.csv"


def started_from(init: Path | None) -> str:
    """What a DPO stage trained from: "base", or the champion version named in the init adapter's champion.json
    (written by the retraining flow), or else the adapter's path."""
    if init is None or not Path(init).exists():
        return "base"
    champion = Path(init) / CHAMPION_FILE
    if not champion.exists():
        return str(init)
    meta = json.loads(champion.read_text())
    return f"{meta['registered_model']} version {meta['version']}"
