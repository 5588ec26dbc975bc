"""The sandbox report: every quality number of the pipeline judged against the world's ground truth.

(a) agreement of cycle-derived preferences (data/pairs) with ground-truth preferences, overall and by margin bucket;
(b) pairwise accuracy on the frozen benchmark of the reward models vs raw cycle score, CLIPScore and random
    (from evaluate_reward's report); (c) Best-of-N ground-truth F1 against N; (d) DPO and (e) Diffusion-DPO
    before / after (from the downstream reports); plus the ladders' ground-truth quality and the image parser's
    accuracy. Intervals are 95%: Wilson for proportions, bootstrap (over inputs) for means.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from cyclepref import stats
from cyclepref.reward.evaluate import wilson
from cyclepref.world import verdicts
from cyclepref.world.parse import Parsed, as_parsed, parse_caption, parse_image
from cyclepref.world.parse import f1 as parsed_f1
from cyclepref.world.truth import caption_quality, image_quality

BUCKETS = 4


def proportion(k: int, n: int) -> dict:
    if n == 0:
        return {"value": None, "ci95_low": None, "ci95_high": None, "n": 0}
    low, high = wilson(k / n, n)
    return {"value": k / n, "ci95_low": low, "ci95_high": high, "n": n}


def mean_interval(x) -> dict:
    x = np.asarray(x, dtype=np.float64)
    if x.size == 0:
        return {"value": None, "ci95_low": None, "ci95_high": None, "n": 0}
    mean, low, high = stats.mean_interval(x, n_boot=2000)
    return {"value": mean, "ci95_low": low, "ci95_high": high, "n": int(x.size)}


def candidate_f1(task: str, candidates, truth: dict[str, Parsed]) -> dict[str, float]:
    """candidate_id -> ground-truth F1 (I2T: the caption against the image's scene; T2I: the image against the
    prompt's scene) for candidates of inputs with ground truth."""
    ids, inputs = candidates["candidate_id"], candidates["input_id"]
    content = candidates["text"] if task == "i2t" else candidates["image"]
    judge = caption_quality if task == "i2t" else (lambda png, t: image_quality(Image.open(io.BytesIO(png)), t))
    return {c: judge(x, truth[i]) for c, i, x in zip(ids, inputs, content, strict=True) if i in truth}


def agreement(pairs: dict, f1: dict[str, float]) -> dict:
    """Share of cycle preferences that ground truth also prefers; pairs whose two candidates have equal ground
    truth F1 are counted as ties and left out of the share."""
    rows = [(f1[p], f1[r], m) for p, r, m in zip(pairs["preferred_id"], pairs["rejected_id"], pairs["margin"],
                                                 strict=True) if p in f1 and r in f1]
    pref, rej, margin = (np.array(c, dtype=np.float64) for c in zip(*rows)) if rows else (np.zeros(0),) * 3
    decided = np.abs(pref - rej) > 1e-9
    agree = pref > rej
    out = {"pairs": len(rows), "ground_truth_ties": int((~decided).sum()),
           "overall": proportion(int(agree[decided].sum()), int(decided.sum())), "by_margin": []}
    if decided.sum() >= BUCKETS:
        edges = np.quantile(margin[decided], np.linspace(0, 1, BUCKETS + 1))
        for lo, hi in zip(edges[:-1], edges[1:], strict=True):
            sel = decided & (margin >= lo) & (margin <= hi)
            out["by_margin"].append({"margin_low": float(lo), "margin_high": float(hi),
                                     **proportion(int(agree[sel].sum()), int(sel.sum()))})
    return out


def ladder(candidates, f1: dict[str, float]) -> dict[str, dict]:
    """Mean ground-truth F1 of each model's candidates."""
    by_model: dict[str, list[float]] = {}
    for c, m in zip(candidates["candidate_id"], candidates["model"], strict=True):
        if c in f1:
            by_model.setdefault(m, []).append(f1[c])
    return {m: mean_interval(v) for m, v in sorted(by_model.items())}


def parser_accuracy(scenes: list, transform=None) -> dict:
    """Share of objects the image parser recovers exactly (all four attributes), and per attribute."""
    exact, total, per = 0, 0, {"shape": 0, "colour": 0, "size": 0, "position": 0}
    from cyclepref.world.scene import render

    images = [render(s) for s in scenes]
    if transform is not None:
        images = transform(images)
    for s, im in zip(scenes, images, strict=True):
        found = {o["position"]: o for o in parse_image(im)}
        for o in as_parsed(s):
            total += 1
            got = found.get(o["position"], {})
            exact += got == o
            for k in per:
                per[k] += got.get(k) == o[k]
    return {"objects": total, "exact": proportion(exact, total), **{k: v / total for k, v in per.items()}}


def vae_round_trip(pipeline_dir: str):
    """The images after the text-to-image model's own VAE (encode, decode): what its decoder can express."""
    import torch
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(pipeline_dir, subfolder="vae", dtype=torch.float32).eval()

    def transform(images: list[Image.Image]) -> list[Image.Image]:
        x = torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in images])).permute(0, 3, 1, 2)
        with torch.inference_mode():
            y = vae.decode(vae.encode(x.float() / 127.5 - 1).latent_dist.mean).sample
        y = ((y.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
        return [Image.fromarray(a) for a in y]

    return transform


def scene_key(objects: Parsed) -> tuple:
    return tuple(sorted(tuple(o[a] or "" for a in ("position", "shape", "colour", "size")) for o in objects))


def fidelity(described: list[Parsed], drawn: list[Parsed]) -> dict:
    """How faithfully images show what texts say: the share of (text, image) pairs whose parsed objects are exactly
    the same scene, the share with the same object count, and the mean F1 of the image against the text."""
    exact = sum(scene_key(t) == scene_key(i) for t, i in zip(described, drawn, strict=True))
    count = sum(len(t) == len(i) for t, i in zip(described, drawn, strict=True))
    return {"exact_scene": proportion(exact, len(drawn)), "object_count": proportion(count, len(drawn)),
            "f1": mean_interval([parsed_f1(i, t) for t, i in zip(described, drawn, strict=True)])}


def label_quality(i2t_recon: dict, t2i_back: dict, t2i_images: dict) -> dict:
    """Cycle label quality. I2T decoder: every reconstruction against the caption it was drawn from. T2I
    back-captioner: every back-caption against the candidate image it describes."""
    decoder = fidelity([parse_caption(t) for t in i2t_recon["text"]],
                       [parse_image(Image.open(io.BytesIO(b))) for b in i2t_recon["image"]])
    ids = [c for c in t2i_back["candidate_id"] if c in t2i_images]
    back = dict(zip(t2i_back["candidate_id"], t2i_back["text"], strict=True))
    captioner = fidelity([parse_caption(back[c]) for c in ids],
                         [parse_image(Image.open(io.BytesIO(t2i_images[c]))) for c in ids])
    return {"i2t_decoder": decoder, "t2i_back_captioner": captioner}


def rouge_l(a: str, b: str) -> float:
    """ROUGE-L F-measure of two texts' lower-cased word sequences (longest common subsequence)."""
    x, y = a.lower().replace(",", " ").replace(".", " ").split(), b.lower().replace(",", " ").replace(".", " ").split()
    if not x or not y:
        return 0.0
    prev = [0] * (len(y) + 1)
    for u in x:
        row = [0]
        for j, v in enumerate(y):
            row.append(prev[j] + 1 if u == v else max(prev[j + 1], row[j]))
        prev = row
    lcs = prev[-1]
    return 0.0 if lcs == 0 else 2 * lcs / (len(x) + len(y))


def metric_agreement(scores: dict, f1_of: dict[str, float], tie_gap: float, quality_limit: float | None) -> dict:
    """Agreement with ground truth of the pairs the pipeline's pair rule builds from one metric's T2I scores
    (scores: SCORES columns input_id, candidate_id, model, score, higher is better)."""
    import pyarrow as pa

    from cyclepref.pairs import PairRule, pair_task

    n = len(scores["candidate_id"])
    table = pa.table({"task": ["t2i"] * n, "input_id": scores["input_id"], "candidate_id": scores["candidate_id"],
                      "model": scores["model"], "text": pa.nulls(n, pa.string()),
                      "score": pa.array(scores["score"], pa.float64()), "metric": ["ablation"] * n,
                      "direction": ["higher"] * n})
    pairs, _ = pair_task(table, PairRule("higher", tie_gap, quality_limit, dedupe_texts=False))
    return agreement(pairs.select(["preferred_id", "rejected_id", "margin"]).to_pydict(), f1_of)


def read_table(path: Path, columns: list[str]) -> dict:
    return pq.read_table(path, columns=columns).to_pydict()


def benchmark_accuracy(eval_report: dict, benchmark: str) -> dict:
    """(b): per task, every scorer's accuracy on the benchmark section of evaluate_reward's report."""
    section = eval_report.get(benchmark, {})
    return {task: {k: v for k, v in scores.items() if isinstance(v, dict)} for task, scores in section.items()}


def _bar(ax, labels: list[str], entries: list[dict], title: str) -> None:
    vals = [e.get("value", e.get("accuracy")) or 0.0 for e in entries]
    low = [v - (e.get("ci95_low") if e.get("ci95_low") is not None else v) for v, e in zip(vals, entries)]
    high = [(e.get("ci95_high") if e.get("ci95_high") is not None else v) - v for v, e in zip(vals, entries)]
    ax.bar(range(len(vals)), vals, yerr=[low, high], capsize=4, color="#4c72b0")
    ax.set_xticks(range(len(vals)), labels, rotation=30, ha="right", fontsize=8)
    ax.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax.set_ylim(0, 1)
    ax.set_title(title, fontsize=9)


def plot_agreement(agree: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(agree), figsize=(4.5 * len(agree), 3.2), squeeze=False)
    for ax, (task, a) in zip(axes[0], agree.items()):
        entries = [a["overall"], *a["by_margin"]]
        labels = ["all"] + [f"{b['margin_low']:.3g}-{b['margin_high']:.3g}" for b in a["by_margin"]]
        _bar(ax, labels, entries, f"(a) {task}: cycle vs ground truth (by margin)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_benchmark(bench: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, max(1, len(bench)), figsize=(4.5 * max(1, len(bench)), 3.2), squeeze=False)
    for ax, (task, scores) in zip(axes[0], bench.items()):
        _bar(ax, list(scores), list(scores.values()), f"(b) {task}: accuracy on the held-out benchmark")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def save_thumb(png: bytes | Image.Image, path: Path, scale: int = 3) -> str:
    im = png if isinstance(png, Image.Image) else Image.open(io.BytesIO(png))
    im.convert("RGB").resize((im.width * scale, im.height * scale), Image.NEAREST).save(path, format="PNG")
    return path.name


def examples_markdown(root: Path, truth: dict, f1: dict, out_dir: Path, n: int = 3) -> list[str]:
    """Example inputs: the image, every caption with its reconstruction, cycle score and ground-truth F1; the
    prompt, every candidate image with its back-caption, cycle score and F1."""
    from cyclepref import tables
    from cyclepref.workstore import read_shards

    inputs = read_table(root / tables.PATHS["inputs"], ["input_id", "image", "prompt", "caption"])
    i2t = read_table(root / tables.PATHS["i2t_candidates"], ["candidate_id", "input_id", "model", "text", "text_key"])
    recon = read_shards(root / tables.PATHS["i2t_reconstructions"], tables.I2T_RECONSTRUCTIONS,
                        ["text_key", "image"]).to_pydict()
    recon = dict(zip(recon["text_key"], recon["image"], strict=True))
    scores = {**_scores(root / tables.PATHS["i2t_scores"]), **_scores(root / tables.PATHS["t2i_scores"])}
    t2i = read_shards(root / tables.PATHS["t2i_candidates"], tables.T2I_CANDIDATES,
                      ["candidate_id", "input_id", "model", "seed", "image"]).to_pydict()
    back = read_table(root / tables.PATHS["t2i_reconstructions"], ["candidate_id", "text"])
    back = dict(zip(back["candidate_id"], back["text"], strict=True))
    lines = []
    for k, iid in enumerate(sorted(i for i in inputs["input_id"] if i in truth)[:n]):
        row = inputs["input_id"].index(iid)
        lines += [f"### Example {k + 1}", "",
                  f"![input](sandbox/{save_thumb(inputs['image'][row], out_dir / f'ex{k}_input.png')}) "
                  f"truth: *{inputs['caption'][row]}*", "",
                  "| captioner | caption | reconstruction | cycle score | ground-truth F1 |", "|---|---|---|---|---|"]
        for j, c in enumerate(i2t["candidate_id"]):
            if i2t["input_id"][j] == iid and c in f1:
                thumb = save_thumb(recon[i2t["text_key"][j]], out_dir / f"ex{k}_recon_{j}.png")
                lines.append(f"| {i2t['model'][j]} | {i2t['text'][j]} | ![](sandbox/{thumb}) | "
                             f"{scores.get(c, float('nan')):.4f} | {f1[c]:.3f} |")
        lines += ["", f"prompt: *{inputs['prompt'][row]}*", "",
                  "| model | seed | image | back-caption | cycle score | ground-truth F1 |", "|---|---|---|---|---|---|"]
        for j, c in enumerate(t2i["candidate_id"]):
            if t2i["input_id"][j] == iid and c in f1:
                thumb = save_thumb(t2i["image"][j], out_dir / f"ex{k}_t2i_{j}.png")
                lines.append(f"| {t2i['model'][j]} | {t2i['seed'][j]} | ![](sandbox/{thumb}) | {back.get(c, '')} | "
                             f"{scores.get(c, float('nan')):.4f} | {f1[c]:.3f} |")
        lines.append("")
    return lines


def _scores(path: Path) -> dict[str, float]:
    t = read_table(path, ["candidate_id", "score"])
    return dict(zip(t["candidate_id"], t["score"], strict=True))


def _fmt(e: dict | None) -> str:
    if not e or e.get("value", e.get("accuracy")) is None:
        return "n/a"
    v = e.get("value", e.get("accuracy"))
    return f"{100 * v:.1f}% [{100 * e['ci95_low']:.1f}, {100 * e['ci95_high']:.1f}] (n={e['n']})"


def headline(report: dict) -> dict[str, float]:
    """The numbers logged as metrics of the stage's MLflow run."""
    out = {}
    for task, a in report["agreement"].items():
        if a["overall"]["value"] is not None:
            out[f"agreement_{task}"] = a["overall"]["value"]
    for task, scores in report["benchmark"].items():
        for name, e in scores.items():
            if e.get("accuracy") is not None:
                out[f"benchmark_{task}_{name}"] = e["accuracy"]
    out["parser_clean_exact"] = report["parser"]["clean_renders"]["exact"]["value"]
    return out


def markdown(report: dict, examples: list[str]) -> str:
    lines = ["# Sandbox report: cycle consistency against ground truth", "", *verdicts.markdown(report),
             "Every number here is judged by the world's ground truth (parsed scenes, attribute-level F1), not by "
             "a model of the pipeline. Intervals are 95% (Wilson for shares, bootstrap over inputs for means).", "",
             f"Inputs with ground truth: {report['inputs_with_truth']}."
             + ("" if report["inputs_with_truth"] else " These inputs are not sandbox scenes, so (a), (c), (d) and (e) "
                "cannot be judged; the benchmark (b) still can."), "",
             "## (a) Do cycle preferences agree with ground truth?", "",
             "Share of the pipeline's preference pairs (data/pairs, all splits) whose preferred candidate also has "
             "the higher ground-truth F1; pairs whose candidates have equal F1 are ties and left out.", "",
             "| task | pairs | ground-truth ties | agreement |", "|---|---|---|---|"]
    for task, a in report["agreement"].items():
        lines.append(f"| {task} | {a['pairs']} | {a['ground_truth_ties']} | {_fmt(a['overall'])} |")
    lines += ["", "By cycle-score margin (quartiles):", "", "| task | margin | agreement |", "|---|---|---|"]
    for task, a in report["agreement"].items():
        lines += [f"| {task} | {b['margin_low']:.4g} - {b['margin_high']:.4g} | {_fmt(b)} |" for b in a["by_margin"]]
    lines += ["", "![agreement](sandbox/agreement.png)", ""]
    lines += label_quality_markdown(report)
    lines += ["## (b) Reward models on the frozen held-out benchmark", "",
              "Pairwise accuracy on data/benchmarks/sandbox (held-out scenes; candidates from the world models; the "
              "truly better candidate is the chosen one). `cycle` is raw cycle consistency on the same pairs.", "",
              "| task | scorer | accuracy |", "|---|---|---|"]
    for task, scores in report["benchmark"].items():
        lines += [f"| {task} | {name} | {_fmt(e)} |" for name, e in scores.items()]
    lines += ["", "`backbone-itc` / `backbone-itm`: the reward model's starting BLIP used zero-shot (contrastive cosine / "
              "matching head); rows ending in `-dense` are judges pretrained on the world's complete dense captions "
              "(what no web-trained judge sees), reported for comparison.", "", "![benchmark](sandbox/benchmark.png)", ""]
    lines += fit_markdown(report)
    lines += scale_markdown(report)
    lines += ["", "## Ladders: ground-truth quality of each model", "",
              "| task | model | mean F1 of its candidates |", "|---|---|---|"]
    for task, models in report["ladder"].items():
        lines += [f"| {task} | {m} | {_fmt(e)} |" for m, e in models.items()]
    p = report["parser"]
    lines += ["", "## The image parser", "",
              f"Objects recovered exactly from clean renders: {_fmt(p['clean_renders']['exact'])}; after the "
              f"text-to-image model's VAE (what its decoder can express): {_fmt(p['t2i_vae_round_trip']['exact'])} "
              "(per attribute: " + ", ".join(f"{k} {100 * p['t2i_vae_round_trip'][k]:.1f}%"
                                            for k in ("shape", "colour", "size", "position")) + ").", ""]
    lines += downstream_markdown(report)
    return "\n".join(lines + ["## Examples", "", *examples]) + "\n"


def scale_markdown(report: dict) -> list[str]:
    """The scale run's ablations (reports/scale, committed; `make scale`), or a line saying it has not run."""
    from cyclepref.reward.scale import report_markdown

    scale = report.get("scale")
    head = ["", "## Data scale and captioner count (the scale run)", ""]
    if not scale:
        return head + ["Not run in this checkout: `make scale` (profile configs/scale.yaml) writes reports/scale/."]
    return head + [
        f"Profile `{scale['profile']}`: reward models trained on nested subsets of its training pairs (whole inputs "
        "in a seeded order) and on the pairs of the first k candidate captioners, each scored on the frozen "
        "benchmark above; references are the zero-shot scorers on the same pairs. Epochs per run: the pair budget "
        "over the run's pairs, clamped to the profile's bounds (reports/scale/ablation.json).", "",
        *report_markdown(scale).splitlines(), "", "![scale](scale/ablation.svg)"]


def label_quality_markdown(report: dict) -> list[str]:
    q, ablation = report.get("label_quality"), report.get("t2i_text_metric")
    if not q:
        return []
    lines = ["## Cycle label quality", "",
             "How faithful each cycle's backward model is, judged by parsing both sides: I2T decoder = every "
             "reconstruction against the caption it was drawn from; T2I back-captioner = every back-caption against "
             "the candidate image it describes.", "",
             "| backward model | exact scene | object count | mean F1 |", "|---|---|---|---|"]
    for name, e in (("I2T decoder (text-to-image)", q["i2t_decoder"]), ("T2I back-captioner", q["t2i_back_captioner"])):
        lines.append(f"| {name} | {_fmt(e['exact_scene'])} | {_fmt(e['object_count'])} | {_fmt(e['f1'])} |")
    if ablation:
        lines += ["", "T2I text metric (the paper ablates the I2T image metric; this ablates the T2I text metric): "
                  "agreement with ground truth of the pairs each metric yields under the pipeline's pair rule.", "",
                  "| metric | pairs | agreement |", "|---|---|---|"]
        lines += [f"| {m} | {a['pairs']} | {_fmt(a['overall'])} |" for m, a in ablation.items()]
    return lines + [""]


def fit_markdown(report: dict) -> list[str]:
    fit = report.get("fit_to_teacher")
    if not fit:
        return []
    lines = ["## Fit to the teacher", "",
             "Agreement of each reward model with the cycle labels it was distilled from (the pipeline's pairs, per "
             "split): a student far below 100% on train underfits its teacher.", "",
             "| split | task | " + " | ".join(m for m in _reward_names(fit)) + " |",
             "|---|---|" + "---|" * len(_reward_names(fit))]
    for split, tasks in fit.items():
        for task, scores in tasks.items():
            lines.append(f"| {split} | {task} | " + " | ".join(_fmt(scores.get(m)) for m in _reward_names(fit)) + " |")
    return lines + [""]


def _reward_names(fit: dict) -> list[str]:
    names = {n for tasks in fit.values() for scores in tasks.values() for n in scores if n.startswith("cyclereward")}
    return sorted(names)


def plot_best_of_n(best: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = best.get("tasks", {})
    fig, axes = plt.subplots(1, max(1, len(tasks)), figsize=(4.5 * max(1, len(tasks)), 3.2), squeeze=False)
    for ax, (task, sec) in zip(axes[0], tasks.items()):
        ns = [int(n) for n in sec["n"]]
        for v, curve in sec["quality"].items():
            ax.plot(ns, [curve[str(n)] for n in ns], marker="o", label=v)
            ax.fill_between(ns, [sec["low"][v][str(n)] for n in ns], [sec["high"][v][str(n)] for n in ns], alpha=0.15)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("N")
        ax.set_ylabel(f"{sec['evaluator']} F1 of the pick")
        ax.set_title(f"(c) Best-of-N {task}", fontsize=9)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def before_after(downstream: dict) -> dict[str, dict]:
    """(d) DPO of the captioner (i2t) and (e) Diffusion-DPO (t2i): before, after and the paired difference; with the
    SFT-on-chosen baseline's after (`sft`) and difference (`sft_delta`), and DPO minus SFT (`dpo_vs_sft`)."""
    out = {}
    for task, sec in downstream.get("tasks", {}).items():
        out[task] = {k: _entry(sec, k) for k in ("before", "after", "delta")}
        if "sft_baseline" in sec:
            out[task] |= {"sft": _entry(sec["sft_baseline"], "after"), "sft_delta": _entry(sec["sft_baseline"], "delta"),
                          "dpo_vs_sft": _entry(sec["dpo_vs_sft"], "delta")}
    return out


def _entry(sec: dict, k: str) -> dict:
    return {"value": sec.get(k), "ci95_low": sec.get(f"{k}_low"), "ci95_high": sec.get(f"{k}_high"), "n": sec.get("n")}


def plot_before_after(ba: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = {"i2t": "(d) DPO of the captioner", "t2i": "(e) Diffusion-DPO"}
    fig, axes = plt.subplots(1, max(1, len(ba)), figsize=(3.6 * max(1, len(ba)), 3.2), squeeze=False)
    for ax, (task, e) in zip(axes[0], ba.items()):
        arms = [a for a in ("before", "after", "sft") if a in e]
        _bar(ax, [{"after": "DPO", "sft": "SFT"}.get(a, a) for a in arms], [e[a] for a in arms],
             f"{names.get(task, task)}: ground-truth F1")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def downstream_markdown(report: dict) -> list[str]:
    best = report["best_of_n"].get("tasks", {})
    lines = ["## (c) Best-of-N", "",
             f"Mean {report['best_of_n'].get('evaluator', '?')} F1 of the pick among the first N samples, per "
             "verifier (95% bootstrap interval over inputs); `gain` is N=max minus N=1 with its paired interval.", "",
             "| task | verifier | " + " | ".join(f"N={n}" for n in next(iter(best.values()), {}).get("n", []))
             + " | gain |", "|---|---|" + "---|" * (len(next(iter(best.values()), {}).get("n", [])) + 1)]
    for task, sec in best.items():
        for v, curve in sec["quality"].items():
            cells = [f"{curve[str(n)]:.3f}" for n in sec["n"]]
            gain = f"{sec['gain'][v]:+.3f} [{sec['gain_low'][v]:+.3f}, {sec['gain_high'][v]:+.3f}]"
            lines.append(f"| {task} | {v} | " + " | ".join(cells) + f" | {gain} |")
    lines += ["", "![best-of-n](sandbox/best_of_n.png)", "", "## (d) DPO and (e) Diffusion-DPO", "",
              f"Judged by {report['downstream'].get('evaluator', '?')} on held-out inputs: i2t = caption F1 of the "
              "DPO-trained captioner's greedy captions, t2i = image F1 of the Diffusion-DPO model's images. `SFT` is "
              "the baseline trained on the same chosen captions / preferred images with the supervised loss alone; "
              "`DPO - SFT` tells whether the preference term adds anything.", "",
              "| task | before | DPO | DPO - before | SFT | SFT - before | DPO - SFT |", "|---|---|---|---|---|---|---|"]
    for task, e in before_after(report["downstream"]).items():
        sft = [_num(e[k], signed=k != "sft") if k in e else "n/a" for k in ("sft", "sft_delta", "dpo_vs_sft")]
        lines.append(f"| {task} | {_num(e['before'])} | {_num(e['after'])} | {_num(e['delta'], signed=True)} | "
                     + " | ".join(sft) + " |")
    return lines + ["", "![before-after](sandbox/before_after.png)", ""]


def _num(e: dict, signed: bool = False) -> str:
    if e["value"] is None:
        return "n/a"
    f = "{:+.3f}" if signed else "{:.3f}"
    return f"{f.format(e['value'])} [{f.format(e['ci95_low'])}, {f.format(e['ci95_high'])}] (n={e['n']})"
