"""`cyclepref report`: one offline HTML page of the pipeline's outputs in the project.

Headline numbers (reports/metrics/, reports/sandbox.json), gate outcomes (reports/dq/), examples of inputs with
their candidates, reconstructions and cycle scores (data/), reward-model accuracies (reports/reward/eval.json) and
the Best-of-N curves (reports/downstream/). Images are embedded as data URIs and charts are inline SVG, so the page
needs no network and no JavaScript. A section whose inputs are missing says which stage makes them.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from cyclepref import metrics
from cyclepref.scoring import oriented
from cyclepref.tables import PATHS
from cyclepref.world import verdicts

COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")
STYLE = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;
vertical-align:top}th{background:#f3f3f3}.fail{color:#b00020;font-weight:bold}.ok{color:#1b7f3b}
.note{color:#666}img{image-rendering:pixelated}figure{display:inline-block;margin:0 1em 1em 0}"""


def esc(value: object) -> str:
    return html.escape(str(value))


def number(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return esc(value)


def table(header: list[str], rows: list[list[str]]) -> str:
    """An HTML table; cells are already HTML."""
    head = "".join(f"<th>{esc(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def missing(what: str, stage: str) -> str:
    return f'<p class="note">{esc(what)} not found: run <code>make run</code> (stage {esc(stage)}).</p>'


def image_uri(data: bytes, size: int = 128) -> str:
    """A PNG data URI of encoded image bytes, scaled to `size` px on its longer side."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im = im.convert("RGB")
        im.thumbnail((size, size))
        buf = io.BytesIO()
        im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def img(data: bytes, size: int = 128) -> str:
    return f'<img src="{image_uri(data, size)}" alt="" width="{size}">'


def line_chart(x: list[float], series: dict[str, list[float]], title: str, x_label: str, y_label: str) -> str:
    """An inline SVG line chart, one colour per series, with a legend."""
    w, h, pad = 560, 300, 50
    ys = [v for vs in series.values() for v in vs]
    lo, hi = min(ys), max(ys)
    hi = hi if hi > lo else lo + 1.0
    x0, x1 = min(x), max(x) if max(x) > min(x) else min(x) + 1

    def sx(v: float) -> float:
        return pad + (v - x0) / (x1 - x0) * (w - 2 * pad)

    def sy(v: float) -> float:
        return h - pad - (v - lo) / (hi - lo) * (h - 2 * pad)

    parts = [f'<svg width="{w + 140}" height="{h}" role="img">',
             f'<text x="{w / 2}" y="18" text-anchor="middle" font-weight="bold">{esc(title)}</text>',
             f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="#888"/>',
             f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h - pad}" stroke="#888"/>',
             f'<text x="{w / 2}" y="{h - 12}" text-anchor="middle">{esc(x_label)}</text>',
             f'<text x="14" y="{h / 2}" transform="rotate(-90 14 {h / 2})" text-anchor="middle">{esc(y_label)}</text>',
             f'<text x="{pad - 4}" y="{h - pad}" text-anchor="end" font-size="11">{lo:.3g}</text>',
             f'<text x="{pad - 4}" y="{pad + 4}" text-anchor="end" font-size="11">{hi:.3g}</text>']
    parts += [f'<text x="{sx(v):.1f}" y="{h - pad + 14}" text-anchor="middle" font-size="11">{v:g}</text>' for v in x]
    for k, (name, values) in enumerate(series.items()):
        colour = COLOURS[k % len(COLOURS)]
        points = " ".join(f"{sx(a):.1f},{sy(b):.1f}" for a, b in zip(x, values, strict=True))
        parts += [f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{points}"/>',
                  f'<rect x="{w + 10}" y="{pad + 18 * k - 9}" width="12" height="12" fill="{colour}"/>',
                  f'<text x="{w + 28}" y="{pad + 18 * k + 1}" font-size="12">{esc(name)}</text>']
    return "".join(parts) + "</svg>"


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


# ---------------------------------------------------------------- sections


HEADLINE_NOTES = {
    "evaluate_reward accuracy / baseline": "on the pipeline's own test split, whose labels are made from the cycle "
    "score; the baseline is the best scorer other than raw cycle, which agrees with those labels by construction. "
    "The ground-truth comparison is the benchmark (sandbox section and verdicts).",
    "dpo_vlm / diffusion_dpo accuracy / baseline": "implicit-reward accuracy on the validation pairs after / before "
    "training; before training the policy equals the reference, every implicit reward is 0 and no pair is ranked, "
    "so the baseline is 0 by construction. Ground-truth quality is evaluate_downstream's gain.",
}


def verdict_section(root: Path) -> str:
    """The sandbox report's verdicts in plain words (cyclepref.world.verdicts), first on the page."""
    sandbox = read_json(root / "reports/sandbox.json")
    lines = verdicts.verdicts(sandbox) if sandbox else []
    if not lines:
        return "<h2>Verdicts</h2>" + missing("reports/sandbox.json", "sandbox_report")
    return "<h2>Verdicts</h2><ul>" + "".join(f"<li>{esc(line)}</li>" for line in lines) + "</ul>"


def headline_section(root: Path) -> str:
    files = sorted((root / metrics.DIR).glob("*.json"))
    out = ["<h2>Headline numbers</h2>"]
    if not files:
        return out[0] + missing(f"{metrics.DIR}/*.json", "any")
    rows = []
    for path in files:
        values = json.loads(path.read_text())
        if values:
            rows.append([esc(path.stem), *(number(values[k]) if k in values else "" for k in metrics.VOCABULARY)])
    out.append(table(["stage", *metrics.VOCABULARY], rows))
    notes = "".join(f"<li><b>{esc(k)}</b>: {esc(v)}</li>" for k, v in HEADLINE_NOTES.items())
    out.append(f'<p class="note">Meaning of each column: cyclepref/metrics.py.</p><ul class="note">{notes}</ul>')
    sandbox = read_json(root / "reports/sandbox.json")
    if sandbox:
        out.append(sandbox_section(sandbox))
    return "".join(out)


def interval(value: object, low: object, high: object) -> str:
    return f"{number(value)} [{number(low)}, {number(high)}]" if value is not None else ""


def sandbox_section(sandbox: dict) -> str:
    """reports/sandbox.json as five small tables: agreement, benchmark accuracy, ladders, Best-of-N, DPO (all
    measured against ground truth, 95% intervals in brackets; the full report is reports/sandbox.md)."""
    tasks = ("i2t", "t2i")
    agree = sandbox.get("agreement", {})
    bench = sandbox.get("benchmark", {})
    scorers = sorted({s for t in tasks for s in bench.get(t, {})})
    bon = sandbox.get("best_of_n", {}).get("tasks", {})
    verifiers = sorted({v for t in tasks for v in bon.get(t, {}).get("gain", {})})
    down = sandbox.get("downstream", {}).get("tasks", {})
    ladder = sandbox.get("ladder", {})
    ov = {t: agree.get(t, {}).get("overall", {}) for t in tasks}
    return "".join([
        "<h3>Sandbox: measured against ground truth</h3>",
        "<p>Pair labels that agree with ground truth</p>",
        table(["task", "agreement", "pairs"],
              [[t, interval(ov[t].get("value"), ov[t].get("ci95_low"), ov[t].get("ci95_high")), number(ov[t].get("n"))]
               for t in tasks if ov[t]]),
        "<p>Accuracy on the held-out benchmark</p>",
        table(["scorer", *tasks], [[esc(s), *(interval(*(bench.get(t, {}).get(s, {}).get(k) for k in
                                                        ("accuracy", "ci95_low", "ci95_high"))) for t in tasks)]
                                   for s in scorers]),
        "<p>Best-of-N: gain in F1 of the pick over N = 1</p>",
        table(["verifier", *tasks], [[esc(v), *(interval(*(bon.get(t, {}).get(k, {}).get(v) for k in
                                                         ("gain", "gain_low", "gain_high"))) for t in tasks)]
                                     for v in verifiers]),
        "<p>DPO (i2t) and Diffusion-DPO (t2i): F1 before and after</p>",
        table(["task", "before", "after", "change"],
              [[t, number(d.get("before")), number(d.get("after")),
                interval(d.get("delta"), d.get("delta_low"), d.get("delta_high"))] for t, d in down.items()]),
        "<p>Model ladders: F1 of each model's outputs</p>",
        table(["task", "model", "F1"], [[t, esc(m), interval(r.get("value"), r.get("ci95_low"), r.get("ci95_high"))]
                                         for t in tasks for m, r in ladder.get(t, {}).items()]),
    ])


def gates_section(root: Path) -> str:
    reports = [json.loads(p.read_text()) for p in sorted((root / "reports/dq").glob("*.json"))]
    out = ["<h2>Data-quality gates</h2>"]
    if not reports:
        return out[0] + missing("reports/dq/*.json", "gate@<table>")
    rows, failing = [], []
    for r in reports:
        c = r["counts"]
        status = '<span class="ok">passed</span>' if r["success"] else '<span class="fail">FAILED</span>'
        rows.append([esc(r["gate"]), status, number(r["rows"]), number(c["passed"]), number(c["failed_critical"]),
                     number(c["failed_warning"])])
        failing += [[esc(r["gate"]), esc(name), esc(ch["severity"]), esc(ch["observed"]), esc(ch["expected"])]
                    for name, ch in sorted(r["checks"].items()) if not ch["success"]]
    out.append(table(["gate", "status", "rows", "checks passed", "failed critical", "failed warning"], rows))
    if failing:
        out += ["<h3>Checks that did not pass</h3>",
                table(["gate", "check", "severity", "observed", "expected"], failing)]
    return "".join(out)


def _scores(root: Path, task: str):
    path = root / PATHS[f"{task}_scores"]
    return pq.read_table(path).to_pandas() if path.exists() else None


def i2t_examples(root: Path, n: int) -> str:
    out = ["<h2>Image → text examples</h2><p>Each input image, its captions (best cycle score first) and the image "
           "the backward model rendered from each caption.</p>"]
    scores = _scores(root, "i2t")
    if scores is None:
        return out[0] + missing(PATHS["i2t_scores"], "score_i2t")
    inputs = pq.read_table(root / PATHS["inputs"], columns=["input_id", "image"]).to_pandas().set_index("input_id")
    keys = pq.read_table(root / PATHS["i2t_candidates"], columns=["candidate_id", "text_key"]).to_pandas()
    recon = pq.read_table(root / PATHS["i2t_reconstructions"], columns=["text_key", "image"]).to_pandas()
    scores = scores.merge(keys, on="candidate_id").merge(recon.drop_duplicates("text_key"), on="text_key", how="left")
    for input_id in sorted(scores["input_id"].unique())[:n]:
        rows = _best_first(scores[scores["input_id"] == input_id])
        cells = [[esc(r.model), esc(r.text), img(r.image, 96) if isinstance(r.image, bytes) else "", number(r.score)]
                 for r in rows.itertuples()]
        metric, direction = rows["metric"].iloc[0], rows["direction"].iloc[0]
        out += [f"<figure>{img(inputs.loc[input_id, 'image'])}<figcaption>input {esc(input_id[:10])}</figcaption>"
                "</figure>",
                table(["captioner", "caption", "reconstruction", f"{metric} ({direction} is better)"], cells)]
    return "".join(out)


def t2i_examples(root: Path, n: int) -> str:
    out = ["<h2>Text → image examples</h2><p>Each prompt, its generated images (best cycle score first) and the "
           "caption the backward model wrote for each.</p>"]
    scores = _scores(root, "t2i")
    if scores is None:
        return out[0] + missing(PATHS["t2i_scores"], "score_t2i")
    prompts = pq.read_table(root / PATHS["inputs"], columns=["input_id", "prompt"]).to_pandas().set_index("input_id")
    images = pq.read_table(root / PATHS["t2i_candidates"], columns=["candidate_id", "image", "seed"]).to_pandas()
    back = pq.read_table(root / PATHS["t2i_reconstructions"], columns=["candidate_id", "text"]).to_pandas()
    scores = scores.drop(columns=["text"]).merge(images, on="candidate_id").merge(back, on="candidate_id", how="left")
    for input_id in sorted(scores["input_id"].unique())[:n]:
        rows = _best_first(scores[scores["input_id"] == input_id])
        cells = [[esc(f"{r.model} (seed {r.seed})"), img(r.image, 96), esc(r.text), number(r.score)]
                 for r in rows.itertuples()]
        metric, direction = rows["metric"].iloc[0], rows["direction"].iloc[0]
        out += [f"<p><b>Prompt:</b> {esc(prompts.loc[input_id, 'prompt'])}</p>",
                table(["model", "image", "back-caption", f"{metric} ({direction} is better)"], cells)]
    return "".join(out)


def _best_first(rows):
    order = np.argsort(-oriented(rows["score"].to_numpy(), rows["direction"].iloc[0]), kind="stable")
    return rows.iloc[order]


def reward_section(root: Path) -> str:
    report = read_json(root / "reports/reward/eval.json")
    out = ["<h2>Reward model: pairwise accuracy</h2>"]
    if report is None:
        return out[0] + missing("reports/reward/eval.json", "evaluate_reward")
    for section, tasks in report.items():
        rows = []
        for task, res in tasks.items():
            for scorer, acc in res.items():
                if isinstance(acc, dict):
                    rows.append([esc(task), esc(scorer), number(acc["accuracy"]),
                                 f"[{number(acc['ci95_low'])}, {number(acc['ci95_high'])}]", number(acc["n"])])
        out += [f"<h3>{esc(section)}</h3>", table(["task", "scorer", "accuracy", "95% interval", "pairs"], rows)]
    return "".join(out)


def best_of_n_section(root: Path) -> str:
    out = ["<h2>Best-of-N</h2><p>Mean quality of the pick among the first N candidates, per verifier.</p>"]
    csvs = sorted((root / "reports/downstream").glob("best_of_n_*.csv"))
    if not csvs:
        return out[0] + missing("reports/downstream/best_of_n_<task>.csv", "best_of_n")
    report = read_json(root / "reports/downstream/best_of_n.json") or {}
    for path in csvs:
        task = path.stem.removeprefix("best_of_n_")
        lines = [line.split(",") for line in path.read_text().split()]
        header, data = lines[0], np.array(lines[1:], dtype=float)
        series = {name: data[:, k].tolist() for k, name in enumerate(header) if name != "n"}
        evaluator = report.get("tasks", {}).get(task, {}).get("evaluator", report.get("evaluator", "evaluator"))
        out.append(line_chart(data[:, header.index("n")].tolist(), series, f"Best-of-N {task}", "N",
                              f"quality ({evaluator})"))
    return "".join(out)


def sync_readme(root: Path) -> bool:
    """Rewrite README.md's sandbox numbers from reports/sandbox.json; True when the file changed."""
    from cyclepref import store
    from cyclepref.world import numbers

    readme, sandbox = root / "README.md", read_json(root / "reports/sandbox.json")
    if sandbox is None or not readme.exists() or numbers.current(readme.read_text()) is None:
        return False
    text = readme.read_text()
    new = numbers.sync(text, sandbox)
    if new != text:
        with store.atomic_path(readme) as tmp:
            tmp.write_text(new)
    return new != text


def build(root: Path, examples: int = 3) -> str:
    """The whole page."""
    sections = [verdict_section(root), headline_section(root), gates_section(root), i2t_examples(root, examples),
                t2i_examples(root, examples), reward_section(root), best_of_n_section(root)]
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>cyclepref report</title>'
            f"<style>{STYLE}</style></head><body><h1>cyclepref report</h1>{''.join(sections)}</body></html>\n")
