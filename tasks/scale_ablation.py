"""The scale run's ablations (`make scale`, profile configs/scale.yaml; cyclepref.reward.scale): reward models
trained on nested subsets of the training pairs and on the pairs of the first k captioners, each scored on the
frozen ground-truth benchmark beside raw cycle, CLIPScore, the backbone zero-shot and random.

Not a DVC stage: it reads the scale profile's pairs (`dvc repro gate@pairs` under that profile first) and writes its
report to scale_ablation.out (ablation.json, .md, .svg), which is committed and which sandbox_report shows. Each run
keeps its result under data/work/scale/<run>/result.json with a key of its settings and data, so a rerun skips
finished runs, and an interrupted run resumes from its last checkpoint (cyclepref.reward.train).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from cyclepref import stage, store
from cyclepref.config import Params, require

WORK = "data/work/scale"


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _scores(pairsets: dict, scorers: list, batch_size: int) -> dict:
    from cyclepref.reward.evaluate import evaluate_pairset

    out: dict = {}
    for task, pairset in pairsets.items():
        for name, acc in evaluate_pairset(pairset, scorers, batch_size).items():
            if acc is not None:
                out.setdefault(name, {})[task] = acc.as_dict()
    return out


def _train_and_score(run, cfg, train_cfg, sets, valid, base_digest, bench, bench_key, root: Path) -> dict:
    from cyclepref.reward import VARIANT_TASKS
    from cyclepref.reward.evaluate import RewardScorer
    from cyclepref.reward.model import RewardModel
    from cyclepref.reward.scale import SubsetSource, epochs_for
    from cyclepref.reward.train import fingerprint_body, train_variant

    source = SubsetSource(sets, {"train": run.keep, "valid": valid}, base_digest)
    tasks = VARIANT_TASKS[run.variant]
    pairs = {t: len(source.pairs(t, "train")) for t in tasks}
    epochs = epochs_for(sum(pairs.values()), cfg.pair_budget, cfg.min_epochs, cfg.max_epochs)
    run_cfg = train_cfg.model_copy(update={"epochs": epochs, "variants": [run.variant]})
    key = _key(fingerprint_body(run.variant, run_cfg), source.digest(), bench_key)
    work = root / WORK / run.name
    done = work / "result.json"
    if done.is_file() and json.loads(done.read_text())["key"] == key:
        return json.loads(done.read_text())
    trained = train_variant(run.variant, run_cfg, source, work / "model", work / "train", resume="auto")
    scorer = RewardScorer("reward", RewardModel.from_pretrained(work / "model"))
    result = {
        "key": key, "run": run.name, "axis": run.axis, "value": run.value, "variant": run.variant,
        "train_pairs": pairs, "epochs": epochs, "steps": trained.steps, "best_step": trained.best_step,
        "best_val_loss": trained.best_loss,
        "benchmark": _scores({t: bench[t] for t in tasks}, [scorer], 64)["reward"],
    }
    store.write_json(result, done)
    shutil.rmtree(work / "model", ignore_errors=True)
    shutil.rmtree(work / "train", ignore_errors=True)
    return result


def _references(params: Params, bench: dict, bench_key: str, root: Path) -> dict:
    from cyclepref import runtime
    from cyclepref.reward.evaluate import reference_scorers

    ev = require(params.evaluate_reward, "evaluate_reward")
    key = _key(ev.model_dump(), bench_key)
    done = root / WORK / "references.json"
    if done.is_file() and json.loads(done.read_text())["key"] == key:
        return json.loads(done.read_text())["scores"]
    scores = _scores(bench, reference_scorers(ev, root, runtime.device()), ev.batch_size)
    store.write_json({"key": key, "scores": scores}, done)
    return scores


def run(params: Params, root: Path) -> dict:
    import mlflow

    from cyclepref.reward.benchmarks import load_benchmark
    from cyclepref.reward.data import TablePairSource
    from cyclepref.reward.scale import TASKS, plan, valid_keep, write_report
    from cyclepref.store import file_digest
    from cyclepref.tables import PAIRS, PATHS

    cfg = require(params.scale_ablation, "scale_ablation")
    train_cfg = require(params.train_reward, "train_reward")
    rows = store.read_table(root / PATHS["pairs"], PAIRS).to_pylist()
    base = TablePairSource(root)
    sets = {(t, s): base.pairs(t, s) for t in TASKS for s in ("train", "valid")}
    valid = valid_keep([r for r in rows if r["split"] == "valid"], cfg.valid_pairs, cfg.seed)
    bench = load_benchmark(root / cfg.benchmark)
    bench_key = file_digest(root / cfg.benchmark)
    results = [_train_and_score(r, cfg, train_cfg, sets, valid, base.digest(), bench, bench_key, root)
               for r in plan([r for r in rows if r["split"] == "train"], cfg)]
    report = {"profile": params.profile, "benchmark": cfg.benchmark, "runs": results,
              "references": _references(params, bench, bench_key, root),
              "settings": cfg.model_dump(),
              "train_reward": train_cfg.model_dump(exclude={"epochs", "variants"})}
    paths = write_report(report, root / cfg.out)
    if mlflow.active_run() is not None:
        for r in results:
            for task, acc in r["benchmark"].items():
                mlflow.log_metric(f"{r['run']}.{task}.accuracy", acc["accuracy"])
        for p in paths:
            mlflow.log_artifact(str(p))
    return {"runs": len(results), "pairs_max": max(sum(r["train_pairs"].values()) for r in results)}


def main() -> None:
    stage.main("scale_ablation", run)


if __name__ == "__main__":
    main()
