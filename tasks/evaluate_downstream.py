"""Stage evaluate_downstream: the DPO-trained captioner (i2t) and text-to-image model (t2i) against their base
models on held-out inputs, scored by the profile's evaluator.

Output: reports/downstream/evaluate.json (DVC metric: per task n, mean before / after, delta, win rate, changed
outputs). Logic: cyclepref.downstream.evaluate.
"""

from __future__ import annotations

from pathlib import Path

from cyclepref import runtime, stage, store, tracking
from cyclepref.config import Params, require

NOTE = ("evaluator 'reward' is the reward model distilled from the same cycle-consistency preferences the DPO models "
        "were trained on, so it favours them; it stands in until a ground-truth evaluator exists")


def run(params: Params, root: Path) -> dict:
    import mlflow

    from cyclepref.downstream import adapter_dir, report_path
    from cyclepref.downstream.data import heldout_inputs
    from cyclepref.models import local_spec
    from cyclepref.downstream.evaluate import evaluate_task
    from cyclepref.downstream.verifiers import Verifiers, VerifierSettings

    cfg = require(params.evaluate_downstream, "evaluate_downstream")
    device = runtime.device()
    verifiers = Verifiers(VerifierSettings.from_params(params, cfg, root, device))
    report: dict = {"evaluator": cfg.evaluator, "tasks": {}}
    if cfg.evaluator == "reward":
        report["note"] = NOTE
    summary: dict = {}
    for task in cfg.tasks:
        if task == "i2t":
            spec, adapter = require(params.dpo_vlm, "dpo_vlm").captioner, adapter_dir("dpo_vlm")
        else:
            spec, adapter = require(params.diffusion_dpo, "diffusion_dpo").model, adapter_dir("diffusion_dpo")
        held = heldout_inputs(root, task, list(cfg.heldout_splits), cfg.max_inputs)
        section, examples = evaluate_task(task, local_spec(root, spec), root / adapter, held,
                                          verifiers.get(cfg.evaluator, task), root, device, cfg.batch_size)
        report["tasks"][task] = section
        summary |= {f"{task}_{k}": round(v, 6) if isinstance(v, float) else v
                    for k, v in section.items() if isinstance(v, int | float)}
        tracking.log_examples(f"evaluate_downstream_{task}", examples)
    metrics = store.write_json(report, root / report_path("evaluate"))
    if mlflow.active_run() is not None:
        mlflow.log_artifact(str(metrics))
    return summary


def main() -> None:
    stage.main("evaluate_downstream", run)


if __name__ == "__main__":
    main()
