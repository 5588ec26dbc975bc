"""Stage dpo_vlm: DPO of the LLaVA-family captioner on the I2T pairs with a LoRA adapter (trl DPOTrainer).

Objective: sigmoid DPO plus an SFT term on the chosen caption (`sft_weight`), on the train pairs whose chosen caption
beats the policy's own caption by the pipeline's cycle score (`pairs: beats_policy`). With `sft_baseline` the same
chosen captions also train an SFT-only adapter, which evaluate_downstream reports beside DPO.
Outputs: data/downstream/dpo_vlm/adapter/ (peft adapter + downstream.json), data/downstream/dpo_vlm/sft/ (the
baseline), reports/downstream/dpo_vlm.json (pairs, steps, train loss, validation loss / reward accuracy before and
after, the same for the baseline), reports/metrics/dpo_vlm.json (DVC metric). The adapter is reloaded from disk and
captions a few held-out images before the stage ends. Logic: cyclepref.downstream.dpo_vlm.
"""

from __future__ import annotations

from pathlib import Path

from cyclepref import metrics, runtime, stage, store, tracking
from cyclepref.config import Params, require

WORK = "data/work/dpo_vlm"


def run(params: Params, root: Path) -> dict:
    import mlflow

    from cyclepref.downstream import adapter_dir, baseline_dir, report_path
    from cyclepref.downstream.data import heldout_inputs
    from cyclepref.models import local_spec
    from cyclepref.downstream.dpo_vlm import load_dpo_captioner, train_dpo_vlm

    cfg = require(params.dpo_vlm, "dpo_vlm")
    device = runtime.device()
    tracked = mlflow.active_run() is not None
    out = root / adapter_dir("dpo_vlm")
    log = (lambda m, step: mlflow.log_metrics(m, step=step)) if tracked else None
    sft = root / baseline_dir("dpo_vlm") if cfg.sft_baseline else None
    report = train_dpo_vlm(cfg, root, device, out, root / WORK, log, sft)

    held = heldout_inputs(root, "i2t", ["test", "valid"], max_inputs=4)
    captions = load_dpo_captioner(local_spec(root, cfg.captioner), out, device).caption(held.images)
    report["reload_check"] = {"captions": len(captions), "nonempty": sum(bool(c.strip()) for c in captions)}
    written = store.write_json(report, root / report_path("dpo_vlm"))
    metrics.write(root, "dpo_vlm", metrics.dpo(report, "train_loss", "rewards_accuracies"))
    if tracked:
        tracking.log_adapter_model(out, "dpo_vlm_adapter", {"cyclepref.stage": "dpo_vlm"})
        mlflow.log_artifact(str(written))
        tracking.log_examples("dpo_vlm_heldout", list(zip(held.images, captions, strict=True)))
    summary = {k: report[k] for k in ("train_pairs", "valid_pairs", "steps", "train_loss")}
    for when in ("before", "after"):
        for k, v in report[f"valid_{when}"].items():
            summary[f"valid_{when}_{k}"] = round(v, 6)
    return summary


def main() -> None:
    stage.main("dpo_vlm", run)


if __name__ == "__main__":
    main()
