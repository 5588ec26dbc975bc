"""Data-quality gates: every gate passes good tables and fails, with a readable reason, on bad ones."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from fixtures.pipeline_tables import build_tables, write_params, write_tables

from cyclepref import gates
from cyclepref.config import BuildPairs, Gates, PairsGate, ScoresGate
from cyclepref.pairs import build_pairs
from cyclepref.tables import PATHS
from tasks.gate import GATES

GATE_NAMES = list(GATES)


@pytest.fixture(scope="module")
def tables() -> dict[str, pa.Table]:
    t = build_tables()
    t["pairs"], _ = build_pairs(pa.concat_tables([t["i2t_scores"], t["t2i_scores"]]), BuildPairs())
    return t


def run_gate(name: str, tables: dict[str, pa.Table], table: pa.Table | None = None, **thresholds) -> dict:
    related = {kw: tables[key] for kw, key in GATES[name][1].items()}
    thr = getattr(Gates(), name).model_copy(update=thresholds)
    return gates.check(name, table if table is not None else tables[name], thr, f"{name}.parquet", **related)


def failed(report: dict) -> dict[str, dict]:
    return {n: c for n, c in report["checks"].items() if not c["success"]}


def critical(report: dict) -> set[str]:
    return {n for n, c in failed(report).items() if c["severity"] == "critical"}


def replace(table: pa.Table, column: str, values: list) -> pa.Table:
    i = table.column_names.index(column)
    return table.set_column(i, table.schema.field(i), pa.array(values, table.schema.field(i).type))


# ---------------------------------------------------------------- good fixtures pass


@pytest.mark.parametrize("name", GATE_NAMES)
def test_gate_passes_good_tables(tables, name):
    report = run_gate(name, tables)
    assert report["success"], gates.failure_message(report)
    assert report["counts"]["failed_critical"] == 0
    assert report["counts"]["checks"] >= 5
    assert any(c["source"].startswith("great_expectations:") for c in report["checks"].values())
    assert any(c["source"] == "computed" for c in report["checks"].values())
    json.dumps(report)


# ---------------------------------------------------------------- bad fixtures fail with a reason


def test_nan_scores_fail(tables):
    scores = tables["i2t_scores"]
    values = scores.column("score").to_pylist()
    values[2] = float("nan")
    report = run_gate("i2t_scores", tables, replace(scores, "score", values))
    bad = failed(report)
    assert not report["success"]
    assert {"score_not_null", "score_finite"} <= bad.keys()
    assert bad["score_finite"]["examples"] == [scores.column("candidate_id")[2].as_py()]
    assert "1 NaN/inf score(s)" in gates.failure_message(report)


def test_all_equal_scores_fail_as_a_collapsed_scorer(tables):
    scores = tables["t2i_scores"]
    report = run_gate("t2i_scores", tables, replace(scores, "score", [0.5] * scores.num_rows))
    bad = failed(report)
    assert not report["success"]
    assert bad["score_spread"]["severity"] == "critical" and bad["score_spread"]["observed"] == 0.0
    assert bad["tied_inputs"]["severity"] == "warning"
    assert "scorer collapsed" in gates.failure_message(report)


def test_out_of_range_scores_and_wrong_direction_fail(tables):
    scores = tables["t2i_scores"]
    values = scores.column("score").to_pylist()
    values[0] = 1.7
    report = run_gate("t2i_scores", tables, replace(replace(scores, "score", values), "direction",
                                                    ["lower"] * scores.num_rows))
    assert {"score_range", "direction_matches_metric"} <= failed(report).keys()


def test_duplicate_candidate_ids_fail(tables):
    cands = tables["i2t_candidates"]
    ids = cands.column("candidate_id").to_pylist()
    ids[1] = ids[0]
    report = run_gate("i2t_candidates", tables, replace(cands, "candidate_id", ids))
    bad = failed(report)
    assert not report["success"]
    assert bad["candidate_id_unique"]["unexpected_count"] == 2
    assert ids[0] in bad["candidate_id_unique"]["examples"]


def test_empty_captions_fail(tables):
    cands = tables["i2t_candidates"]
    texts = cands.column("text").to_pylist()
    texts[3] = "   "
    report = run_gate("i2t_candidates", tables, replace(cands, "text", texts))
    assert not report["success"]
    assert "text_not_empty" in failed(report)
    assert "captions not empty" in gates.failure_message(report)
    assert run_gate("i2t_candidates", tables, replace(cands, "text", texts), max_empty_text_fraction=0.1)["success"]


def test_empty_back_captions_fail(tables):
    rec = tables["t2i_reconstructions"]
    texts = rec.column("text").to_pylist()
    texts[0] = ""
    assert "text_not_empty" in failed(run_gate("t2i_reconstructions", tables, replace(rec, "text", texts)))


def test_missing_candidates_scores_and_reconstructions_fail_coverage(tables):
    for name in ("i2t_candidates", "t2i_candidates", "i2t_reconstructions", "t2i_reconstructions", "t2i_scores"):
        report = run_gate(name, tables, tables[name].slice(1))
        assert critical(report) == {"coverage"}, name
        assert "1 of" in failed(report)["coverage"]["observed"]
    assert run_gate("t2i_scores", tables, tables["t2i_scores"].slice(1), max_missing_fraction=0.1)["success"]


def test_scores_of_unknown_candidates_fail(tables):
    scores = tables["i2t_scores"]
    ids = scores.column("candidate_id").to_pylist()
    ids[0] = "ghost"
    bad = failed(run_gate("i2t_scores", tables, replace(scores, "candidate_id", ids)))
    assert bad["candidates_known"]["examples"] == ["ghost"]


def test_preferred_equal_to_rejected_fails(tables):
    pairs = tables["pairs"]
    report = run_gate("pairs", tables, replace(pairs, "rejected_id", pairs.column("preferred_id").to_pylist()))
    bad = failed(report)
    assert not report["success"]
    assert bad["preferred_not_rejected"]["unexpected_count"] == pairs.num_rows
    assert "preferred == rejected" in gates.failure_message(report)


def test_an_input_in_two_splits_fails(tables):
    pairs = tables["pairs"]
    splits = pairs.column("split").to_pylist()
    first = pairs.column("input_id")[0].as_py()
    splits[0] = "test" if splits[0] != "test" else "train"
    report = run_gate("pairs", tables, replace(pairs, "split", splits))
    assert critical(report) == {"split_leakage"}
    assert failed(report)["split_leakage"]["examples"] == [first]


def test_pairs_that_prefer_the_worse_candidate_fail(tables):
    pairs = tables["pairs"]
    swapped = replace(replace(pairs, "preferred_score", pairs.column("rejected_score").to_pylist()),
                      "rejected_score", pairs.column("preferred_score").to_pylist())
    assert "preferred_is_better" in failed(run_gate("pairs", tables, swapped))


def test_too_few_pairs_fail(tables):
    only_i2t = tables["pairs"].filter(pc.equal(tables["pairs"].column("task"), "i2t"))
    bad = failed(run_gate("pairs", tables, only_i2t))
    assert bad["min_pairs"]["observed"]["t2i"] == 0
    report = gates.check_pairs(tables["pairs"], PairsGate(min_pairs=10_000))
    assert not report["success"] and "min_pairs" in failed(report)


def test_schema_violation_fails_before_anything_else(tables):
    report = run_gate("t2i_scores", tables, tables["t2i_scores"].drop_columns(["metric"]))
    assert not report["success"]
    assert list(report["checks"]) == ["schema"]
    assert "missing ['metric']" in report["checks"]["schema"]["observed"]


def test_inputs_gate_checks_images_texts_and_quarantine_share(tables):
    inputs = tables["inputs"]
    images = inputs.column("image").to_pylist()
    images[0] = b"GIF89a not a png"
    prompts = inputs.column("prompt").to_pylist()
    prompts[1] = ""
    bad = failed(run_gate("inputs", tables, replace(replace(inputs, "image", images), "prompt", prompts)))
    assert {"image_is_png", "prompt_length"} <= bad.keys()
    quarantine = pa.concat_tables([tables["quarantine"]] * 3)
    report = run_gate("inputs", {**tables, "quarantine": quarantine}, max_quarantined_fraction=0.1)
    assert critical(report) == {"quarantined_fraction"}
    assert failed(report)["quarantined_fraction"]["observed"] == "3 of 7 raw inputs quarantined (42.9%)"


def test_warnings_do_not_fail_a_gate(tables):
    cands = tables["i2t_candidates"]
    same = replace(cands, "text_key", ["k"] * cands.num_rows)
    report = run_gate("i2t_candidates", tables, same, max_duplicate_text_fraction=0.0)
    assert report["success"] and report["counts"]["failed_warning"] == 1
    assert failed(report)["duplicate_texts"]["severity"] == "warning"


# ---------------------------------------------------------------- tables, reports and the stage


def test_read_gate_table_summarises_images(tmp_path, tables):
    write_tables(tmp_path, {"t2i_candidates": tables["t2i_candidates"]})
    table = gates.read_gate_table(tmp_path / PATHS["t2i_candidates"], batch_size=3)
    assert "image" not in table.column_names
    assert table.column("image__png").to_pylist() == [True] * tables["t2i_candidates"].num_rows
    assert gates.original_schema(table).field("image").type == pa.binary()
    assert run_gate("t2i_candidates", tables, table)["success"]


def test_markdown_report_lists_failures_first(tables):
    scores = tables["t2i_scores"]
    report = run_gate("t2i_scores", tables, replace(scores, "score", [0.5] * scores.num_rows))
    md = gates.render_markdown(report)
    assert md.startswith("# Data-quality gate `t2i_scores`: FAILED")
    rows = [line for line in md.splitlines() if line.startswith("| ")][1:]
    assert rows[0].startswith("| **FAIL** | `score_spread`")
    assert "- `min_score_std`: 1e-06" in md


def test_gate_stage_writes_reports_and_exits_nonzero_on_failure(tmp_path, mlflow_uri, tables, capsys):
    from tasks import gate

    bad_scores = replace(tables["t2i_scores"], "score", [float("nan")] * tables["t2i_scores"].num_rows)
    write_tables(tmp_path, {**{k: tables[k] for k in ("t2i_candidates", "i2t_candidates", "i2t_scores")},
                            "t2i_scores": bad_scores})
    write_params(tmp_path, gates={"t2i_scores": ScoresGate().model_dump()})
    gate.main(["i2t_scores"])
    assert json.loads((tmp_path / "reports/dq/i2t_scores.json").read_text())["success"]
    with pytest.raises(SystemExit) as exit_info:
        gate.main(["t2i_scores"])
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "gate t2i_scores" in err and "FAILED" in err and "[critical] score_not_null" in err
    report = json.loads((tmp_path / "reports/dq/t2i_scores.json").read_text())
    assert report["success"] is False and report["checks"]["score_finite"]["unexpected_count"] == bad_scores.num_rows
    assert (tmp_path / "reports/dq/t2i_scores.md").read_text().startswith("# Data-quality gate `t2i_scores`: FAILED")
    with pytest.raises(gates.GateFailed, match="gate t2i_scores failed"):
        gates.require_passed(tmp_path / "reports/dq", {n: tmp_path / PATHS[n] for n in ("i2t_scores", "t2i_scores")})
    with pytest.raises(gates.GateFailed, match="dvc repro gate@pairs"):
        gates.require_passed(tmp_path / "reports/dq", {"pairs": tmp_path / PATHS["pairs"]})


def test_unknown_gate_name_is_a_usage_error():
    from tasks import gate

    with pytest.raises(SystemExit, match="usage: python -m tasks.gate"):
        gate.main(["nope"])
    with pytest.raises(ValueError, match="unknown gate"):
        gates.check("t2i_nope", pa.table({"a": [1]}), ScoresGate())


def test_score_spread_uses_the_threshold(tables):
    scores = tables["i2t_scores"]
    jitter = (0.5 + np.arange(scores.num_rows) * 1e-5).tolist()
    assert "score_spread" in failed(run_gate("i2t_scores", tables, replace(scores, "score", jitter),
                                             min_score_std=1e-3))
    assert "score_spread" not in failed(run_gate("i2t_scores", tables, replace(scores, "score", jitter)))
