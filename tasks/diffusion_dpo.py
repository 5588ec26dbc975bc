"""Stage diffusion_dpo: Diffusion-DPO of the text-to-image model's UNet on the T2I pairs with a LoRA adapter.

Objective: Diffusion-DPO on latents from the VAE posterior mean plus the denoising loss of the preferred image
(`sft_weight`); with `sft_baseline` an SFT-only adapter on the preferred images is trained beside.
Outputs: data/downstream/diffusion_dpo/adapter/ (diffusers LoRA weights + downstream.json), .../sft/ (the baseline),
reports/downstream/diffusion_dpo.json (pairs, steps, loss, validation loss / implicit accuracy before and after),
reports/metrics/diffusion_dpo.json (DVC metric). The adapter is reloaded from disk and renders a few held-out
prompts before the stage ends. Logic: cyclepref.downstream.diffusion_dpo.
"""

from __future__ import annotations

from pathlib import Path

from cyclepref import metrics, runtime, stage, store, tracking
from cyclepref.config import Params, require


def run(params: Params, root: Path) -> dict:
    import mlflow

    from cyclepref.cycle import Context, t2i_hash
    from cyclepref.downstream import adapter_dir, baseline_dir, report_path
    from cyclepref.downstream.data import heldout_inputs
    from cyclepref.models import local_spec
    from cyclepref.downstream.diffusion_dpo import load_dpo_t2i, train_diffusion_dpo
    from cyclepref.downstream.evaluate import image_seeds

    cfg = require(params.diffusion_dpo, "diffusion_dpo")
    device = runtime.device()
    tracked = mlflow.active_run() is not None
    out = root / adapter_dir("diffusion_dpo")
    log = (lambda m, step: mlflow.log_metrics(m, step=step)) if tracked else None
    sft = root / baseline_dir("diffusion_dpo") if cfg.sft_baseline else None
    report = train_diffusion_dpo(cfg, root, device, out, log, sft)

    held = heldout_inputs(root, "t2i", ["test", "valid"], max_inputs=4)
    spec = local_spec(root, cfg.model)
    seeds = image_seeds(held.input_ids, t2i_hash(Context(root, device), cfg.model))
    images = load_dpo_t2i(spec, out, device).generate(held.prompts, seeds)
    report["reload_check"] = {"images": len(images)}
    written = store.write_json(report, root / report_path("diffusion_dpo"))
    metrics.write(root, "diffusion_dpo", metrics.dpo(report, "train_loss_last", "implicit_accuracy"))
    if tracked:
        tracking.log_adapter_model(out, "diffusion_dpo_adapter", {"cyclepref.stage": "diffusion_dpo"})
        mlflow.log_artifact(str(written))
        tracking.log_examples("diffusion_dpo_heldout", list(zip(images, held.prompts, strict=True)))
    summary = {k: report[k] for k in ("train_pairs", "valid_pairs", "steps", "train_loss_first", "train_loss_last")}
    for when in ("before", "after"):
        for k, v in report[f"valid_{when}"].items():
            summary[f"valid_{when}_{k}"] = round(v, 6)
    return summary


def main() -> None:
    stage.main("diffusion_dpo", run)


if __name__ == "__main__":
    main()
