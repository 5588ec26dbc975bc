"""Stage sandbox_report: the pipeline's numbers judged against the sandbox world's ground truth
(cyclepref.world.report). Writes reports/sandbox.json, reports/metrics/sandbox_report_<task>.json (DVC metrics),
reports/sandbox.md with plots and examples under reports/sandbox/, and logs them as MLflow artifacts."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from cyclepref import metrics, stage, tables
from cyclepref.config import Params, require
from cyclepref.downstream import report_path
from cyclepref.reward import REPORTS
from cyclepref.world import numbers
from cyclepref.world import report as rp
from cyclepref.world.data import scenes
from cyclepref.world.truth import load_truth

JSON, MD, ASSETS = Path("reports/sandbox.json"), Path("reports/sandbox.md"), Path("reports/sandbox")
SCALE = Path("reports/scale/ablation.json")
BENCHMARK = "sandbox"


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _sha(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def candidate_tables(root: Path) -> dict[str, dict]:
    from cyclepref.workstore import read_shards

    i2t = rp.read_table(root / tables.PATHS["i2t_candidates"], ["candidate_id", "input_id", "model", "text"])
    t2i = read_shards(root / tables.PATHS["t2i_candidates"], tables.T2I_CANDIDATES,
                      ["candidate_id", "input_id", "model", "image"]).to_pydict()
    return {"i2t": i2t, "t2i": t2i}


def text_metric_ablation(params: Params, root: Path, f1_t2i: dict[str, float]) -> dict:
    """The T2I cycle's text metric, ablated as the paper ablates the I2T image metric: agreement with ground truth of
    the pairs built from SBERT (the pipeline's scores, the paper's choice), ROUGE-L and the judge CLIP's text
    cosine between prompt and back-caption, each under the pipeline's tie gap (SBERT also under its 0.4 limit)."""
    from cyclepref import runtime
    from cyclepref.models.similarity import ImageEmbedder

    pairs_cfg = require(params.build_pairs, "build_pairs")
    sbert = rp.read_table(root / tables.PATHS["t2i_scores"], ["input_id", "candidate_id", "model", "score"])
    back = rp.read_table(root / tables.PATHS["t2i_reconstructions"], ["candidate_id", "input_id", "model", "text"])
    inputs = rp.read_table(root / tables.PATHS["inputs"], ["input_id", "prompt"])
    prompt = dict(zip(inputs["input_id"], inputs["prompt"], strict=True))
    prompts = [prompt[i] for i in back["input_id"]]
    judge = require(params.evaluate_reward, "evaluate_reward").clip
    clip = ImageEmbedder(str(root / judge) if (root / judge).exists() else judge, runtime.device())
    cos = (clip.embed_texts(prompts) * clip.embed_texts(back["text"])).sum(-1).tolist()
    other = {"rouge_l": [rp.rouge_l(p, t) for p, t in zip(prompts, back["text"], strict=True)], "clip_text": cos}
    out = {"sbert": rp.metric_agreement(sbert, f1_t2i, pairs_cfg.tie_gap, pairs_cfg.quality_limits.sbert)}
    for name, values in other.items():
        out[name] = rp.metric_agreement({**back, "score": values}, f1_t2i, pairs_cfg.tie_gap, None)
    return out


def label_tables(root: Path) -> tuple[dict, dict, dict]:
    """I2T reconstructions (text, image), T2I back-captions (candidate_id, text), T2I candidate images by id."""
    from cyclepref.workstore import read_shards

    recon = read_shards(root / tables.PATHS["i2t_reconstructions"], tables.I2T_RECONSTRUCTIONS,
                        ["text", "image"]).to_pydict()
    back = rp.read_table(root / tables.PATHS["t2i_reconstructions"], ["candidate_id", "text"])
    images = read_shards(root / tables.PATHS["t2i_candidates"], tables.T2I_CANDIDATES,
                         ["candidate_id", "image"]).to_pydict()
    return recon, back, dict(zip(images["candidate_id"], images["image"], strict=True))


def build(params: Params, root: Path) -> tuple[dict, dict, dict]:
    """The report, the inputs' truth and every candidate's ground-truth F1."""
    world = require(params.world, "world")
    truth = load_truth(root / world.inputs_dir, root / tables.PATHS["inputs"], root / params.prepare_inputs.pool)
    cands = candidate_tables(root)
    f1 = {task: rp.candidate_f1(task, c, truth) for task, c in cands.items()}
    pairs = rp.read_table(root / tables.PATHS["pairs"], ["task", "preferred_id", "rejected_id", "margin"])
    by_task = {t: {k: [v for v, tk in zip(pairs[k], pairs["task"], strict=True) if tk == t] for k in pairs}
               for t in ("i2t", "t2i")}
    parser_scenes = scenes("benchmark", 300, seed=world.benchmark.seed)
    backward = require(params.reconstruct_i2t, "reconstruct_i2t").model.path
    eval_report = _json(root / REPORTS["eval"])
    return {
        "label_quality": rp.label_quality(*label_tables(root)),
        "t2i_text_metric": text_metric_ablation(params, root, f1["t2i"]),
        "scale": _json(root / SCALE),
        "fit_to_teacher": {split: eval_report[split] for split in ("train", "valid", "test") if split in eval_report},
        "inputs_with_truth": len(truth),
        "agreement": {t: rp.agreement(by_task[t], f1[t]) for t in by_task},
        "ladder": {t: rp.ladder(cands[t], f1[t]) for t in cands},
        "benchmark": rp.benchmark_accuracy(eval_report, BENCHMARK),
        "best_of_n": _json(root / report_path("best_of_n")),
        "downstream": _json(root / report_path("evaluate")),
        "parser": {"clean_renders": rp.parser_accuracy(parser_scenes),
                   "t2i_vae_round_trip": rp.parser_accuracy(parser_scenes, rp.vae_round_trip(str(root / backward)))},
        "provenance": {"pairs_sha256": _sha(root / tables.PATHS["pairs"]),
                       "benchmark_sha256": _sha(root / "data/benchmarks/sandbox/pairs.jsonl"),
                       "eval_report_sha256": _sha(root / REPORTS["eval"])},
    }, truth, f1


def run(params: Params, root: Path) -> dict:
    import mlflow

    report, truth, f1 = build(params, root)
    assets = root / ASSETS
    assets.mkdir(parents=True, exist_ok=True)
    for old in assets.glob("*.png"):
        old.unlink()
    rp.plot_agreement(report["agreement"], assets / "agreement.png")
    rp.plot_benchmark(report["benchmark"], assets / "benchmark.png")
    rp.plot_best_of_n(report["best_of_n"], assets / "best_of_n.png")
    rp.plot_before_after(rp.before_after(report["downstream"]), assets / "before_after.png")
    examples = rp.examples_markdown(root, truth, {**f1["i2t"], **f1["t2i"]}, assets)
    (root / JSON).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    (root / MD).write_text(rp.markdown(report, examples))
    metrics.write_parts(root, "sandbox_report", numbers.headline_metrics(report), metrics.TASKS)
    mlflow.log_artifact(str(root / JSON), "sandbox")
    mlflow.log_artifact(str(root / MD), "sandbox")
    mlflow.log_artifacts(str(assets), "sandbox/sandbox")
    return rp.headline(report)


def main() -> None:
    stage.main("sandbox_report", run)


if __name__ == "__main__":
    main()
