"""Stage best_of_n: quality of the best of N sampled candidates against N, per verifier (PAPER.md §6), judged by the
evaluator (ground truth where the inputs have true scenes) with intervals over inputs.

Outputs: data/downstream/best_of_n/ (candidates_<task>.parquet with every verifier's and evaluator's score,
best_of_n_<task>.png), reports/downstream/best_of_n.json (the report), reports/downstream/best_of_n_<task>.csv
(plot data), reports/metrics/best_of_n_<task>.json (DVC metric). Logic: cyclepref.downstream.best_of_n.
"""

from __future__ import annotations

from pathlib import Path

from cyclepref import metrics, runtime, stage, store, tracking
from cyclepref.config import Params, require

NOTE = ("evaluator {0!r} is also verifier {0!r}: its own picks maximise it by construction, so its curve is an upper "
        "bound under this evaluator, not evidence that it beats the other verifiers")
SECOND_NOTE = ("second_evaluator {0!r} is a model: its numbers are model-judged, and it favours the verifier of its "
               "own kind")


def run(params: Params, root: Path) -> dict:
    import mlflow

    from cyclepref.cycle import IMAGE_ROWS, TEXT_ROWS, Context
    from cyclepref.downstream import plot_path, report_path, stage_dir
    from cyclepref.downstream.best_of_n import candidates_table, curve_csv, plot_curves, run_task, summarize
    from cyclepref.downstream.evaluators import GROUND_TRUTH, ground_truth, interval_method
    from cyclepref.downstream.verifiers import Verifiers, VerifierSettings

    cfg = require(params.best_of_n, "best_of_n")
    device = runtime.device()
    ctx = Context(root, device)
    verifiers = Verifiers(VerifierSettings.from_params(params, cfg, root, device))
    out = root / stage_dir("best_of_n")
    tracked = mlflow.active_run() is not None
    truth = ground_truth(root, cfg.truth, params.prepare_inputs.pool) if cfg.evaluator == GROUND_TRUTH else None
    report: dict = {"evaluator": cfg.evaluator, "second_evaluator": cfg.second_evaluator,
                    "interval": interval_method(cfg), "tasks": {}}
    if cfg.evaluator in cfg.verifiers:
        report["note"] = NOTE.format(cfg.evaluator)
    if cfg.second_evaluator is not None:
        report["second_note"] = SECOND_NOTE.format(cfg.second_evaluator)
    files, summary = [], {}
    for task in cfg.tasks:
        work = ctx.work(f"best_of_n_{task}", TEXT_ROWS if task == "i2t" else IMAGE_ROWS)
        result, source = run_task(task, cfg, root, device, verifiers, work, truth)
        files.append(store.write_table(candidates_table(result), out / f"candidates_{task}.parquet"))
        csv = curve_csv(result, root / plot_path(task))
        png = plot_curves(result, out / f"best_of_n_{task}.png", f"best-of-N {task}, {cfg.evaluator} evaluator")
        files.append(png)
        report["tasks"][task] = summarize(result, source)
        summary[f"{task}_inputs"] = result.candidates.shape[0]
        for name, gain in report["tasks"][task]["gain"].items():
            summary[f"{task}_{name}_gain"] = round(gain, 6)
        if tracked:
            for name, values in result.curves.items():
                for n, v, (low, high) in zip(result.ns, values, result.intervals[name], strict=True):
                    mlflow.log_metrics({f"{task}.{name}.quality": v, f"{task}.{name}.low": low,
                                        f"{task}.{name}.high": high}, step=n)
            for name, values in result.second_curves.items():
                for n, v in zip(result.ns, values, strict=True):
                    mlflow.log_metric(f"{task}.{name}.{cfg.second_evaluator}_quality", v, step=n)
            mlflow.log_artifact(str(png), "plots")
            mlflow.log_artifact(str(csv), "plots")
            best = cfg.verifiers[0]
            tracking.log_examples(f"best_of_n_{task}_{best}_n{max(cfg.n)}",
                                  [(im, t) for im, t in result.picked(best, max(cfg.n))[:8]])
    written = store.write_json(report, root / report_path("best_of_n"))
    verifier = "reward" if "reward" in cfg.verifiers else cfg.verifiers[0]
    metrics.write_parts(root, "best_of_n", metrics.best_of_n(report["tasks"], verifier), metrics.TASKS)
    store.write_manifest(out, files, tasks=list(cfg.tasks))
    if tracked:
        mlflow.log_artifact(str(written))
    return summary


def main() -> None:
    stage.main("best_of_n", run)


if __name__ == "__main__":
    main()
