"""Stage evaluate_downstream: the DPO-trained captioner (i2t) and text-to-image model (t2i) against their base
models on held-out inputs, judged by the profile's evaluator (ground truth where the inputs have true scenes), with a
model evaluator optionally beside it.

Output: reports/downstream/evaluate.json (per task n, mean before / after, delta, their intervals over inputs, win
rate, changed outputs), reports/metrics/evaluate_downstream_<task>.json (DVC metric).
Logic: cyclepref.downstream.evaluate.
"""

from __future__ import annotations

from pathlib import Path

from cyclepref import metrics, runtime, stage, store, tracking
from cyclepref.config import Params, require

NOTE = ("evaluator 'reward' is the reward model distilled from the same cycle-consistency preferences the DPO models "
        "were trained on, so it favours them; its numbers are model-judged, not ground truth")


def run(params: Params, root: Path) -> dict:
    import mlflow

    from cyclepref.downstream import adapter_dir, baseline_dir, report_path
    from cyclepref.downstream.data import heldout_inputs
    from cyclepref.models import local_spec
    from cyclepref.downstream.evaluate import evaluate_task
    from cyclepref.downstream.evaluators import GROUND_TRUTH, ground_truth, interval_method, make_evaluator
    from cyclepref.downstream.verifiers import Verifiers, VerifierSettings

    cfg = require(params.evaluate_downstream, "evaluate_downstream")
    device = runtime.device()
    verifiers = Verifiers(VerifierSettings.from_params(params, cfg, root, device))
    truth = ground_truth(root, cfg.truth, params.prepare_inputs.pool) if cfg.evaluator == GROUND_TRUTH else None
    report: dict = {"evaluator": cfg.evaluator, "second_evaluator": cfg.second_evaluator,
                    "interval": interval_method(cfg), "tasks": {}}
    if "reward" in (cfg.evaluator, cfg.second_evaluator):
        report["note"] = NOTE
    summary: dict = {}
    for task in cfg.tasks:
        stage_name = "dpo_vlm" if task == "i2t" else "diffusion_dpo"
        trained = require(getattr(params, stage_name), stage_name)
        spec, adapter = (trained.captioner if task == "i2t" else trained.model), adapter_dir(stage_name)
        baseline = root / baseline_dir(stage_name) if trained.sft_baseline else None
        held = heldout_inputs(root, task, list(cfg.heldout_splits), cfg.max_inputs)
        evaluator = make_evaluator(cfg.evaluator, task, verifiers, truth)
        second = make_evaluator(cfg.second_evaluator, task, verifiers, truth) if cfg.second_evaluator else None
        section, examples = evaluate_task(task, local_spec(root, spec), root / adapter, held, evaluator, second, root,
                                          device, cfg, baseline)
        report["tasks"][task] = section
        summary |= {f"{task}_{k}": round(v, 6) if isinstance(v, float) else v
                    for k, v in section.items() if isinstance(v, int | float)}
        tracking.log_examples(f"evaluate_downstream_{task}", examples)
    written = store.write_json(report, root / report_path("evaluate"))
    metrics.write_parts(root, "evaluate_downstream", metrics.downstream(report["tasks"]), metrics.TASKS)
    if mlflow.active_run() is not None:
        mlflow.log_artifact(str(written))
    return summary


def main() -> None:
    stage.main("evaluate_downstream", run)


if __name__ == "__main__":
    main()
