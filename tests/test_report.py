"""What `dvc metrics show`, `dvc plots show` and `cyclepref report` give a person: a few headline numbers per stage
in one vocabulary, one coloured chart per idea, and an offline HTML page of the run."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from fixtures.pipeline_tables import build_tables, write_params, write_tables
from typer.testing import CliRunner

from cyclepref import metrics
from cyclepref.cli import app
from cyclepref.config import BuildPairs, Gates

ROOT = Path(__file__).resolve().parents[1]
VERIFIERS = ["reward", "cycle", "clipscore", "random"]
HEADLINES = {
    **{f"gate@{g}": [None] for g in ("inputs", "i2t_candidates", "i2t_reconstructions", "i2t_scores",
                                     "t2i_candidates", "t2i_reconstructions", "t2i_scores", "pairs")},
    "build_pairs": metrics.TASKS,
    "train_reward": metrics.VARIANTS,
    "evaluate_reward": metrics.TASKS,
    "best_of_n": metrics.TASKS,
    "dpo_vlm": [None],
    "diffusion_dpo": [None],
    "evaluate_downstream": metrics.TASKS,
    "sandbox_report": metrics.TASKS,
}
"""The stages whose DVC metrics are headline files, and the parts each writes."""


# ---------------------------------------------------------------- headline metrics


def test_headlines_keep_to_the_vocabulary_and_finite_numbers(tmp_path):
    path = metrics.write(tmp_path, "gate@pairs", {"rows": 3, "passed": 1})
    assert path == tmp_path / "reports/metrics/gate_pairs.json"
    assert json.loads(path.read_text()) == {"passed": 1, "rows": 3}
    with pytest.raises(ValueError, match="not in"):
        metrics.write(tmp_path, "x", {"survival": 0.5})
    with pytest.raises(ValueError, match="numbers"):
        metrics.write(tmp_path, "x", {"loss": "0.5"})
    kept = metrics.write(tmp_path, "x", {"loss": math.nan, "gain": math.inf, "low": None, "high": 0.2})
    assert json.loads(kept.read_text()) == {"high": 0.2}
    written = metrics.write_parts(tmp_path, "best_of_n", {"i2t": {"gain": 0.1}}, metrics.TASKS)
    assert [json.loads(p.read_text()) for p in written] == [{"gain": 0.1}, {}]
    with pytest.raises(ValueError, match="parts"):
        metrics.write_parts(tmp_path, "best_of_n", {"x2y": {}}, metrics.TASKS)


def test_headlines_take_the_right_numbers_from_each_report():
    gate = {"success": False, "rows": 12, "counts": {"checks": 5, "passed": 3, "failed_critical": 1,
                                                     "failed_warning": 1}}
    assert metrics.gate(gate) == {"passed": 0, "rows": 12, "warnings": 1}
    assert metrics.train_reward({"combo": {"best_val_loss": 0.6, "best_step": 3, "val_acc_i2t": 0.6,
                                           "val_acc_t2i": 0.8, "val_loss_i2t": 0.7}}) == {
        "combo": {"loss": 0.6, "accuracy": pytest.approx(0.7)}}
    acc = {"accuracy": 0.7, "ci95_low": 0.6, "ci95_high": 0.8, "n": 50, "ties": 0}
    section = {"i2t": {"pairs": 50, "scores": {"combo": acc, "i2t": {**acc, "accuracy": 0.9},
                                               "clipscore": {**acc, "accuracy": 0.55}, "cycle": None,
                                               "random": {**acc, "accuracy": 0.5}}}}
    assert metrics.evaluate_reward(section, "combo", ["combo", "i2t"]) == {
        "i2t": {"rows": 50, "accuracy": 0.7, "low": 0.6, "high": 0.8, "baseline": 0.55}}
    bon = {"t2i": {"gain": {"reward": 0.2, "cycle": 0.1}, "gain_low": {"reward": 0.1, "cycle": 0.0},
                   "gain_high": {"reward": 0.3, "cycle": 0.2}}}
    assert metrics.best_of_n(bon) == {"t2i": {"gain": 0.2, "low": 0.1, "high": 0.3}}
    dpo = {"train_loss": 0.5, "valid_before": {"rewards_accuracies": 0.4}, "valid_after": {"rewards_accuracies": 0.7}}
    assert metrics.dpo(dpo, "train_loss", "rewards_accuracies") == {"loss": 0.5, "accuracy": 0.7, "baseline": 0.4}
    assert metrics.dpo({"loss": 1.0, "valid_before": {}, "valid_after": {}}, "loss", "x") == {"loss": 1.0}
    assert metrics.downstream({"i2t": {"delta": 0.1, "delta_low": -0.1, "delta_high": 0.3, "n": 9}}) == {
        "i2t": {"gain": 0.1, "low": -0.1, "high": 0.3}}


def _stages():
    from dvc.repo import Repo

    with Repo(str(ROOT)) as repo:
        return {s.addressing: s for s in repo.index.stages}


def test_dvc_metrics_are_the_headline_files_the_stages_write():
    stages = _stages()
    for name, stage in stages.items():
        declared = sorted(str(o.def_path) for o in stage.outs if o.metric)
        if name in HEADLINES:
            assert declared == sorted(metrics.path(name, part) for part in HEADLINES[name]), name
        else:
            assert declared == [], name
    gate = stages["gate@pairs"]
    assert {str(o.def_path) for o in gate.outs if not o.metric} == {"reports/dq/pairs.json", "reports/dq/pairs.md"}


def test_each_idea_is_one_chart_with_a_colour_per_series(tmp_path):
    stages = _stages()
    assert not [o for s in stages.values() for o in s.outs if o.plot], "plots are declared once, at the top level"
    project = tmp_path / "plots"
    (project / "reports/downstream").mkdir(parents=True)
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=project, check=True)
    (project / ".dvc/plots").mkdir()
    (project / ".dvc/plots/series.json").write_text((ROOT / ".dvc/plots/series.json").read_text())
    plots = yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"]
    (project / "dvc.yaml").write_text(yaml.safe_dump({"plots": plots}))
    bounds = [f"{v}_{side}" for v in VERIFIERS for side in ("low", "high")]
    for task in metrics.TASKS:
        rows = [",".join(["n", *VERIFIERS, *bounds])] + [
            ",".join([str(n), *(str(0.1 * k + n) for k in range(4)), *(str(n + 0.01 * k) for k in range(8))])
            for n in (1, 2, 4)]
        (project / f"reports/downstream/best_of_n_{task}.csv").write_text("\n".join(rows) + "\n")
    shown = subprocess.run([sys.executable, "-m", "dvc", "plots", "show", "--json"], cwd=project,
                           capture_output=True, text=True, check=True)
    charts = json.loads(shown.stdout)["data"]
    assert sorted(charts) == ["best_of_n_i2t", "best_of_n_t2i"]
    titles = set()
    for [chart] in charts.values():
        spec = chart["content"]
        assert spec["encoding"]["color"]["field"] == "field"
        assert sorted({row["field"] for row in spec["data"]["values"]}) == sorted(VERIFIERS)
        band = next(layer for layer in spec["layer"] if layer["mark"]["type"] == "errorband")
        assert (band["encoding"]["y"]["field"], band["encoding"]["y2"]["field"]) == ("interval_low", "interval_high")
        assert "datum[datum.field + '_low']" in json.dumps(spec["transform"])
        assert all(f"{row['field']}_low" in row for row in spec["data"]["values"])
        titles.add(spec["title"] if isinstance(spec["title"], str) else spec["title"]["text"])
    assert len(titles) == 2 and all(titles)



def test_dvc_plots_page_needs_no_network(tmp_path):
    """The project's `dvc plots show` page inlines Vega: no script is fetched from a CDN, and the libraries the
    chart code calls (vega, vegaLite, vegaEmbed) are defined in the page itself."""
    import re

    out = tmp_path / "plots"
    subprocess.run([sys.executable, "-m", "dvc", "plots", "show", "-o", str(out)], cwd=ROOT, check=True,
                   capture_output=True, text=True)
    page = (out / "index.html").read_text()
    assert not re.search(r"<script[^>]*\bsrc=", page)
    assert "vegaEmbed(" in page and "best_of_n_i2t" in page
    for name in ("vega", "vega-lite", "vega-embed"):
        assert f"/* {name} " in page


# ---------------------------------------------------------------- the HTML report


@pytest.fixture
def project(tmp_path, mlflow_uri):
    """Fixture tables at the pipeline's paths, the real gates and build_pairs run on them, and hand-made reward and
    Best-of-N reports."""
    from tasks import build_pairs, gate

    tables = build_tables()
    write_tables(tmp_path, tables)
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    write_params(tmp_path, build_pairs=BuildPairs().model_dump(mode="json"), gates=Gates().model_dump(mode="json"))
    for name in ("i2t_scores", "t2i_scores"):
        gate.main([name])
    build_pairs.main()
    gate.main(["pairs"])
    acc = {"accuracy": 0.75, "ci95_low": 0.5, "ci95_high": 0.9, "n": 8, "ties": 0}
    (tmp_path / "reports/reward").mkdir(parents=True)
    (tmp_path / "reports/reward/eval.json").write_text(json.dumps({"test": {"i2t": {"pairs": 8, "combo": acc}}}))
    (tmp_path / "reports/downstream").mkdir(parents=True)
    rows = [",".join(["n", *VERIFIERS]), "1,0.5,0.5,0.5,0.5", "2,0.6,0.55,0.52,0.49", "4,0.7,0.6,0.5,0.51"]
    (tmp_path / "reports/downstream/best_of_n_i2t.csv").write_text("\n".join(rows) + "\n")
    return tmp_path, tables


def _report(root: Path) -> str:
    out = CliRunner().invoke(app, ["report", "--root", str(root), "--examples", "2"])
    assert out.exit_code == 0, out.output
    return (root / "reports/report.html").read_text()


def test_the_report_is_offline_and_shows_examples_gates_headlines_and_curves(project):
    root, tables = project
    page = _report(root)
    assert not re.search(r"https?://|<script|<link", page)
    assert page.count('src="data:image/png;base64,') >= 2 + 2 * 3
    for name in ("i2t_scores", "t2i_scores", "pairs"):
        assert f"<td>{name}</td><td><span class=\"ok\">passed</span>" in page
    assert "<td>gate_pairs</td>" in page and "<td>build_pairs_i2t</td>" in page
    assert "<td>combo</td><td>0.75</td><td>[0.5, 0.9]</td>" in page

    scores = tables["i2t_scores"].to_pandas()
    first = sorted(scores["input_id"].unique())[0]
    expected = scores[scores["input_id"] == first].sort_values("score")["text"].tolist()
    shown = [t for t in re.findall(r"<td>([^<]*sees thing[^<]*)</td>", page)][: len(expected)]
    assert shown == expected, "captions best first (dreamsim: lower is better)"

    [svg] = re.findall(r"<svg.*?</svg>", page)
    colours = re.findall(r'<polyline fill="none" stroke="(#[0-9a-f]{6})"', svg)
    assert len(colours) == len(VERIFIERS) == len(set(colours))
    assert all(f">{v}</text>" in svg for v in VERIFIERS)


def test_a_report_before_any_run_says_what_to_run(tmp_path):
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    page = _report(tmp_path)
    assert "run <code>make run</code> (stage score_i2t)" in page and "(stage best_of_n)" in page


def test_sandbox_numbers_are_small_tables_with_intervals():
    from cyclepref.report import interval, sandbox_section

    sandbox = json.loads((ROOT / "reports/sandbox.json").read_text())
    page = sandbox_section(sandbox)
    i2t = sandbox["agreement"]["i2t"]["overall"]
    assert f"<td>i2t</td><td>{interval(i2t['value'], i2t['ci95_low'], i2t['ci95_high'])}</td>" in page
    reward = sandbox["best_of_n"]["tasks"]["t2i"]
    assert interval(reward["gain"]["reward"], reward["gain_low"]["reward"], reward["gain_high"]["reward"]) in page
    assert page.count("<table") == 5 and "by_margin" not in page and "provenance" not in page
