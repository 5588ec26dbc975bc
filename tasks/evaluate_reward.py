"""Stage evaluate_reward: pairwise accuracy (95% Wilson interval) of the reward models and the baselines
(raw cycle score, CLIPScore, random) on the test split per task and on every configured benchmark file.

Outputs: reports/reward/eval.json (numbers only), reports/reward/eval.md (readable, with the notes on the baselines);
reports/reward/paired.json: on every benchmark, each reward model against every other scorer on the same pairs (gain,
95% paired bootstrap interval, McNemar p) per task and over both tasks pooled, also in eval.md; all of them, plus the
full report, in the stage's MLflow run; reports/metrics/evaluate_reward_<task>.json (DVC metric).
A benchmark with a ratings.jsonl beside its pairs (GenAI-Bench) also gets the reference metric of t2v_metrics
(cyclepref.reward.benchmarks.tie_calibrated_accuracy) in eval.md and the MLflow run.
"""

from __future__ import annotations

from pathlib import Path

from cyclepref import metrics, stage, store
from cyclepref.config import Params, require
from cyclepref.reward import REPORTS

PAIRED = "reports/reward/paired.json"

NOTES = {
    "accuracy": "share of pairs where the scorer ranks the preferred item higher; exact ties count one half; "
    "the interval is the 95% Wilson score interval",
    "cycle": "raw cycle-consistency score of each pair. On the pipeline's own splits the preference labels are "
    "defined by this score, so its accuracy is a label-agreement reference (100% by construction), not "
    "agreement with people. On an external benchmark it is n/a unless the file provides cycle scores.",
    "clipscore": "cosine similarity of open_clip image and text embeddings (same order as CLIPScore = "
    "2.5 max(cos, 0) where the cosine is positive)",
    "random": "seeded uniform random scores; expected accuracy 50%",
    "baselines": "blip_itm / blip_itc: a BLIP checkpoint (the reward model's backbone) used zero-shot, by its "
    "image-text matching head (match minus no-match logit) or its contrastive cosine",
}


def run(params: Params, root: Path) -> dict:
    import mlflow

    from cyclepref import runtime
    from cyclepref.reward.benchmarks import TASKS, load_benchmark, reference_accuracies, reference_markdown
    from cyclepref.reward.data import open_source
    from cyclepref.reward.evaluate import (
        RewardScorer,
        flat_metrics,
        outcome_accuracy,
        outcomes_by_scorer,
        paired_gains,
        paired_markdown,
        pooled,
        reference_scorers,
        report_markdown,
    )
    from cyclepref.reward.model import RewardModel

    cfg = require(params.evaluate_reward, "evaluate_reward")
    device = runtime.device()
    scorers = [
        RewardScorer(m.name, runtime.place(RewardModel.from_pretrained(root / m.path), "blip_itm", device, ("head",)))
        for m in cfg.models
    ] + reference_scorers(cfg, root, device)

    source = open_source(cfg.data, root)
    sections: dict[str, dict] = {}
    for split in (cfg.split, *cfg.fit_splits):
        sections[split] = {}
        for task in TASKS:
            if cfg.data.source == "hf_datasets" and getattr(cfg.data, f"{task}_path") is None:
                continue
            sections[split][task] = source.pairs(task, split)
    ratings = {}
    for bench in cfg.benchmarks:
        sections[bench.name] = load_benchmark(root / bench.path)
        if (root / bench.path).with_name("ratings.jsonl").is_file():
            ratings[bench.name] = (root / bench.path).with_name("ratings.jsonl")

    results: dict[str, dict] = {}
    by_task: dict[str, dict] = {b.name: {} for b in cfg.benchmarks}
    for section, pairsets in sections.items():
        results[section] = {}
        for task, pairset in pairsets.items():
            outcomes = outcomes_by_scorer(pairset, scorers, cfg.batch_size)
            results[section][task] = {
                "pairs": len(pairset),
                "scores": {name: None if o is None else outcome_accuracy(o).as_dict() for name, o in outcomes.items()},
            }
            if section in by_task:
                by_task[section][task] = outcomes
    models = [m.name for m in cfg.models]
    paired = {section: {task: paired_gains(o, models, seed=cfg.seed) for task, o in tasks.items()}
              for section, tasks in by_task.items()}
    for section, tasks in by_task.items():
        if len(tasks) > 1:
            paired[section]["both"] = paired_gains(pooled(tasks), models, seed=cfg.seed)
    reference = {name: reference_accuracies(path, scorers, cfg.batch_size) for name, path in ratings.items()}
    report = {
        "results": results,
        "reference": reference,
        "models": {m.name: m.path for m in cfg.models},
        "clip": cfg.clip,
        "notes": NOTES | {"sections": f"'{cfg.split}', {cfg.fit_splits} = the pipeline's splits (labels = the cycle "
                          "comparison: accuracy there is fit to the teacher); others = benchmark files"},
    }
    store.write_json(metric_file(results), root / REPORTS["eval"])
    store.write_json(paired, root / PAIRED)
    # The split's labels come from the cycle score, so raw cycle is 100% there by construction: not a baseline.
    headline = metrics.evaluate_reward(results.get(cfg.split, {}), models[0], [*models, "cycle"])
    metrics.write_parts(root, "evaluate_reward", headline, metrics.TASKS)
    md = root / REPORTS["eval_md"]
    with store.atomic_path(md) as tmp:
        tmp.write_text(report_markdown(report) + paired_markdown(paired) + reference_markdown(reference))
    if mlflow.active_run() is not None:
        mlflow.log_metrics(flat_metrics(report))
        mlflow.log_metrics({f"{bench}.t2i_reference.{name}.pairwise_acc_tie_calibrated": r[
            "pairwise_acc_tie_calibrated"] for bench, by_scorer in reference.items() for name, r in by_scorer.items()})
        mlflow.log_dict(report, "eval_report.json")
        mlflow.log_artifact(str(md))
        mlflow.log_artifact(str(root / PAIRED))
    summary: dict = {}
    for section, tasks in results.items():
        for task, res in tasks.items():
            summary[f"{section}_{task}_pairs"] = res["pairs"]
            first = res["scores"][cfg.models[0].name]
            if first["accuracy"] is not None:
                summary[f"{section}_{task}_{cfg.models[0].name}_accuracy"] = round(first["accuracy"], 4)
    return summary


def metric_file(results: dict) -> dict:
    """The numbers report: {section: {task: {"pairs": n, <scorer>: {accuracy, ci95_low, ci95_high, n, ties}}}},
    numbers only (a scorer without a value on a section, e.g. cycle on a benchmark without scores, is absent)."""
    return {
        section: {
            task: {"pairs": res["pairs"], **{name: acc for name, acc in res["scores"].items() if acc is not None}}
            for task, res in tasks.items()
        }
        for section, tasks in results.items()
    }


def main() -> None:
    stage.main("evaluate_reward", run)


if __name__ == "__main__":
    main()
