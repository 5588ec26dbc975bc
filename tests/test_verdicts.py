"""The report's verdicts in plain words, computed from the numbers; the README's sandbox numbers generated from
reports/sandbox.json; `dvc metrics show` narrow."""

from __future__ import annotations

import copy
import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from cyclepref.world import numbers, verdicts

ROOT = Path(__file__).resolve().parents[1]
SANDBOX = json.loads((ROOT / "reports/sandbox.json").read_text())


def _acc(value: float, low: float, high: float, n: int = 100) -> dict:
    return {"accuracy": value, "ci95_low": low, "ci95_high": high, "n": n, "ties": 0}


def test_benchmark_verdict_compares_intervals():
    report = {"benchmark": {"i2t": {"cyclereward-combo": _acc(0.80, 0.77, 0.83), "cycle": _acc(0.92, 0.90, 0.94),
                                    "clipscore": _acc(0.82, 0.79, 0.85), "random": _acc(0.5, 0.47, 0.53)}}}
    [line] = verdicts.benchmark(report)
    assert line == ("On the I2T benchmark the reward model (cyclereward-combo, 80.0%) is above random (50.0%); "
                    "not distinguishable from CLIPScore (82.0%); below raw cycle consistency (92.0%).")
    report["benchmark"]["i2t"]["cycle"] = _acc(0.70, 0.60, 0.76)
    assert "is above raw cycle consistency (70.0%) and random (50.0%)" in verdicts.benchmark(report)[0]


def test_gain_verdicts_follow_the_interval():
    def report(delta, low, high):
        return {"downstream": {"evaluator": "ground_truth",
                               "tasks": {"i2t": {"delta": delta, "delta_low": low, "delta_high": high, "n": 64}}}}

    assert verdicts.downstream(report(0.03, 0.01, 0.05)) == [
        "DPO of the captioner raised ground-truth F1 by +0.030 [+0.010, +0.050] on 64 held-out inputs."]
    assert "lowered ground-truth F1 by -0.030" in verdicts.downstream(report(-0.03, -0.05, -0.01))[0]
    assert "did not change ground-truth F1 beyond noise" in verdicts.downstream(report(-0.01, -0.02, 0.01))[0]


def test_verdicts_read_keys_defensively():
    assert verdicts.verdicts({}) == [] and verdicts.markdown({}) == []
    partial = {"benchmark": {"i2t": {"cycle": _acc(0.9, 0.8, 0.95)}}, "agreement": {"t2i": {"overall": {}}},
               "best_of_n": {"tasks": {"i2t": {"gain": {"cycle": 0.1}}}}, "downstream": {"tasks": {"t2i": {}}}}
    assert verdicts.verdicts(partial) == []
    assert "| question | I2T | T2I |" in numbers.block(partial)


def test_committed_report_says_the_reward_model_is_below_its_teacher_on_i2t():
    lines = verdicts.verdicts(SANDBOX)
    i2t = next(line for line in lines if line.startswith("On the I2T benchmark"))
    bench = SANDBOX["benchmark"]["i2t"]
    if bench["cyclereward-combo"]["ci95_high"] < bench["cycle"]["ci95_low"]:
        assert re.search(r"below .*raw cycle consistency", i2t)
    else:
        assert "below" not in i2t.split("raw cycle consistency")[0].rsplit(";", 1)[-1]


def test_sandbox_markdown_and_report_page_open_with_the_verdicts(tmp_path):
    from cyclepref.report import build
    from cyclepref.world.report import markdown

    md = markdown(SANDBOX, [])
    first = verdicts.verdicts(SANDBOX)[0]
    assert md.index("## Verdicts") < md.index(first) < md.index("## (a)")
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports/sandbox.json").write_text(json.dumps(SANDBOX))
    page = build(tmp_path, 0)
    assert page.index("<h2>Verdicts</h2>") < page.index("<h2>Headline numbers</h2>")
    assert verdicts.verdicts(SANDBOX)[2] in page


def test_readme_numbers_are_generated_from_sandbox_json():
    """Fails when README.md's sandbox block differs from what reports/sandbox.json gives: run `cyclepref report`."""
    text = (ROOT / "README.md").read_text()
    assert numbers.current(text) == numbers.block(SANDBOX)
    outside = text.replace(numbers.current(text), "")
    for cell in ("82.1 /", "85.8", "67.6", "+0.062"):
        assert cell not in outside, f"a stale sandbox number {cell!r} outside the generated block"


def test_readme_block_gains_a_row_for_a_new_scorer_and_sync_needs_markers():
    report = copy.deepcopy(SANDBOX)
    report["benchmark"]["i2t"]["pickscore"] = _acc(0.917, 0.9, 0.93, 1025)
    assert "| (b) benchmark accuracy: pickscore | 91.7% [90.0, 93.0] of 1025 pairs |  |" in numbers.block(report)
    with pytest.raises(ValueError, match="no block"):
        numbers.sync("no markers here", report)
    text = f"before\n{numbers.BEGIN}\nold\n{numbers.END}\nafter\n"
    assert numbers.sync(text, report) == f"before\n{numbers.block(report)}\nafter\n"


def test_sandbox_headline_metrics_use_the_shared_vocabulary():
    from cyclepref import metrics

    head = numbers.headline_metrics(SANDBOX)
    assert set(head) == {"i2t", "t2i"}
    assert head["i2t"]["accuracy"] == SANDBOX["benchmark"]["i2t"]["cyclereward-combo"]["accuracy"]
    web_like = ("clipscore", "cycle", "backbone-itc", "backbone-itm")
    assert head["i2t"]["baseline"] == max(SANDBOX["benchmark"]["i2t"][k]["accuracy"] for k in web_like)
    assert all(set(v) <= set(metrics.VOCABULARY) for v in head.values())


def _flat_keys(obj, prefix=""):
    if isinstance(obj, dict):
        return {k for key, v in obj.items() for k in _flat_keys(v, f"{prefix}{key}.")}
    return {prefix.rstrip(".")}


def test_dvc_metrics_stay_a_narrow_table():
    """Every metrics file of dvc.yaml is a headline file in reports/metrics/, and all of them together have at most
    15 distinct keys (reports/sandbox.json alone had 362)."""
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    declared = []
    for stage in spec.values():
        body = stage.get("do", stage)
        items = stage.get("foreach", [None])
        for entry in body.get("metrics", []):
            path = next(iter(entry)) if isinstance(entry, dict) else entry
            declared += [path.replace("${item}", str(i)).replace("${key}", str(i)) for i in items]
    assert declared and all(p.startswith("reports/metrics/") for p in declared), declared
    keys = set().union(*(_flat_keys(json.loads((ROOT / p).read_text())) for p in declared if (ROOT / p).exists()))
    assert len(keys) <= 15, sorted(keys)


def _first_score_example() -> list[str]:
    text = (ROOT / "README.md").read_text().replace("\\\n", " ")
    line = next(ln for ln in text.splitlines() if ln.startswith(".venv/bin/cyclepref score -m data/reward/"))
    return shlex.split(line.split("#")[0])


def test_first_scoring_example_is_a_world_scene_with_a_correct_and_a_colour_swapped_caption():
    from PIL import Image

    from cyclepref.world.parse import f1, parse_caption, parse_image

    args = _first_score_example()
    image = ROOT / args[4]
    texts = [args[i + 1] for i, a in enumerate(args) if a == "-t"]
    assert image.is_file() and len(texts) == 2
    scene = parse_image(Image.open(image))
    right, swapped = (parse_caption(t) for t in texts)
    assert f1(right, scene) == 1.0 and f1(swapped, scene) < 1.0
    right_at, swapped_at = ({o["position"]: o for o in p} for p in (right, swapped))
    assert right_at.keys() == swapped_at.keys()
    changed = [k for k in right_at if right_at[k] != swapped_at[k]]
    assert changed and all({a for a in right_at[k] if right_at[k][a] != swapped_at[k][a]} == {"colour"}
                           for k in changed)


@pytest.mark.skipif(not (ROOT / "data/reward/combo/model").exists(), reason="no trained model: run `make run` first")
def test_first_scoring_example_scores_the_correct_caption_higher(monkeypatch):
    from typer.testing import CliRunner

    from cyclepref.cli import app

    monkeypatch.chdir(ROOT)
    args = _first_score_example()
    done = CliRunner().invoke(app, [*args[1:], "--format", "json"], catch_exceptions=False)
    assert done.exit_code == 0, done.output
    right, swapped = (json.loads(line)["score"] for line in done.output.splitlines() if line.startswith("{"))
    assert right > swapped
