"""Data-quality gates: one function per table kind, each returning a report dict.

Checks that Great Expectations expresses (schema-level nulls, uniqueness, ranges, sets, text patterns, row counts,
score spread) run as one GE 1.x ExpectationSuite in an ephemeral context on a pandas frame; checks across rows or
tables (coverage, split leakage, orientation of pairs, quarantine share) are computed here. Both kinds land in the same
report format:

    {"gate", "table", "success", "rows", "counts": {...}, "thresholds": {...},
     "checks": {<name>: {"severity": "critical"|"warning", "success", "observed", "expected", "source",
                         "element_count", "unexpected_count", "examples"}},
     "digest": <sha256 of the table as stored (cyclepref.store.table_digest), added by the gate stage>}

A stage that consumes a gated table calls `require_passed`, which accepts a report only when it passed and its digest
is the digest of the table as it is now: a table changed after its gate is refused as stale.

`success` is False only when a critical check fails; warnings are reported and never fail a gate.
Image columns are summarised before validation (`<col>__bytes`, `<col>__png`) so that images never reach pandas.
Great Expectations is imported lazily, inside `_run_expectations`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from cyclepref.gatecheck import (  # noqa: F401  (re-exported)
    CRITICAL,
    GATES,
    REPORT_DIR,
    GateFailed,
    failure_message,
    gates_read_by,
    require_passed,
    require_read,
)
from cyclepref.config import CandidatesGate, InputsGate, PairsGate, ReconstructionsGate, ScoresGate, Section
from cyclepref.inputs import INPUTS_SCHEMA
from cyclepref.scoring import DIRECTIONS, oriented
from cyclepref.tables import (
    I2T_CANDIDATES,
    I2T_RECONSTRUCTIONS,
    PAIRS,
    SCORES,
    T2I_CANDIDATES,
    T2I_RECONSTRUCTIONS,
)

WARNING = "warning"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
METRIC_RANGES: dict[str, tuple[float, float]] = {
    "open_clip": (-1.0 - 1e-4, 1.0 + 1e-4),
    "sbert": (-1.0 - 1e-4, 1.0 + 1e-4),
    "dreamsim": (-1e-4, 2.0 + 1e-4),
    "lpips": (-1e-4, 10.0),
}
"""Mathematical range of each metric (cosines in [-1, 1], DreamSim = 1 - cosine in [0, 2]), with float slack."""
_ORIGINAL_SCHEMA = b"cyclepref.gate.original_schema"
_EXAMPLES = 5


# ---------------------------------------------------------------- tables


def _is_binary(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t)


def original_schema(table: pa.Table) -> pa.Schema:
    """The schema the table had on disk, before `summarise_binary` replaced its image columns."""
    meta = table.schema.metadata or {}
    if _ORIGINAL_SCHEMA in meta:
        return pa.ipc.read_schema(pa.py_buffer(meta[_ORIGINAL_SCHEMA]))
    return table.schema


def summarise_binary(table: pa.Table, schema: pa.Schema | None = None) -> pa.Table:
    """Binary columns replaced by `<col>__bytes` (length) and `<col>__png` (has the PNG signature); idempotent."""
    schema = schema or original_schema(table)
    names, columns = [], []
    for f, col in zip(table.schema, table.columns, strict=True):
        if _is_binary(f.type):
            names += [f"{f.name}__bytes", f"{f.name}__png"]
            columns += [pc.binary_length(col).cast(pa.int64()), pc.starts_with(col, PNG_SIGNATURE)]
        else:
            names.append(f.name)
            columns.append(col)
    out = pa.Table.from_arrays(columns, names=names)
    return out.replace_schema_metadata({_ORIGINAL_SCHEMA: schema.serialize().to_pybytes()})


def read_gate_table(path: str | Path, batch_size: int = 512) -> pa.Table:
    """A parquet file, or a directory of part-*.parquet shards, with its image columns summarised batch by batch
    (images are never all in memory)."""
    path = Path(path)
    files = sorted(path.glob("part-*.parquet")) if path.is_dir() else [path]
    if not path.exists() or not files:
        raise FileNotFoundError(f"{path}: table not found (has the stage that writes it run? try `dvc repro`)")
    schema = pq.read_schema(files[0])
    parts = [
        summarise_binary(pa.Table.from_batches([b], schema), schema)
        for f in files
        for b in pq.ParquetFile(f).iter_batches(batch_size=batch_size)
    ]
    if not parts:
        return summarise_binary(schema.empty_table(), schema)
    return pa.concat_tables(parts).replace_schema_metadata(parts[0].schema.metadata)


def _frame(table: pa.Table) -> pd.DataFrame:
    return summarise_binary(table).to_pandas()


# ---------------------------------------------------------------- checks


@dataclass(frozen=True)
class Expect:
    """One Great Expectations expectation under our check name: `kind` names a class of gx.expectations."""

    name: str
    kind: str
    kwargs: dict
    expected: str
    severity: str = CRITICAL


@dataclass
class Report:
    gate: str
    table: str
    rows: int
    thresholds: dict
    checks: dict[str, dict] = field(default_factory=dict)

    def add(
        self,
        name: str,
        success: bool,
        observed: object,
        expected: str,
        severity: str = CRITICAL,
        unexpected_count: int | None = None,
        element_count: int | None = None,
        examples: Iterable = (),
        source: str = "computed",
    ) -> None:
        self.checks[name] = {
            "severity": severity,
            "success": bool(success),
            "observed": _jsonable(observed),
            "expected": expected,
            "source": source,
            "element_count": element_count,
            "unexpected_count": unexpected_count,
            "examples": [_jsonable(x) for x in list(examples)[:_EXAMPLES]],
        }

    def as_dict(self) -> dict:
        failed = [c for c in self.checks.values() if not c["success"]]
        critical = sum(c["severity"] == CRITICAL for c in failed)
        return {
            "gate": self.gate,
            "table": self.table,
            "success": critical == 0,
            "rows": self.rows,
            "counts": {
                "checks": len(self.checks),
                "passed": len(self.checks) - len(failed),
                "failed_critical": critical,
                "failed_warning": len(failed) - critical,
            },
            "thresholds": self.thresholds,
            "checks": self.checks,
        }


def _jsonable(value: object) -> object:
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def _run_expectations(frame: pd.DataFrame, expects: list[Expect], report: Report) -> None:
    """Validate `frame` against one ExpectationSuite in an ephemeral GE context; add each result to the report."""
    if not expects:
        return
    import great_expectations as gx
    import great_expectations.expectations as gxe
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch = context.data_sources.add_pandas("cyclepref").add_dataframe_asset(report.gate)
    batch_definition = batch.add_batch_definition_whole_dataframe("whole")
    suite = context.suites.add(gx.ExpectationSuite(name=report.gate))
    for e in expects:
        suite.add_expectation(getattr(gxe, e.kind)(**e.kwargs, severity=e.severity, meta={"check": e.name}))
    validation = context.validation_definitions.add(
        gx.ValidationDefinition(name=report.gate, data=batch_definition, suite=suite)
    )
    result = validation.run(
        batch_parameters={"dataframe": frame},
        result_format={"result_format": "SUMMARY", "partial_unexpected_count": _EXAMPLES},
    )
    by_name = {e.name: e for e in expects}
    for r in result.results:
        e = by_name[r.expectation_config.meta["check"]]
        res = r.result or {}
        error = (r.exception_info or {}).get("exception_message")
        observed = res.get("observed_value")
        if observed is None and "unexpected_count" in res:
            observed = f"{res['unexpected_count']} of {res.get('element_count')} unexpected"
        if error:
            observed = f"error: {error}"
        report.add(
            e.name,
            r.success,
            observed,
            e.expected,
            e.severity,
            unexpected_count=res.get("unexpected_count"),
            element_count=res.get("element_count"),
            examples=res.get("partial_unexpected_list") or [],
            source=f"great_expectations:{r.expectation_config.type}",
        )
    for name in by_name.keys() - report.checks.keys():
        report.add(name, False, "expectation did not run", by_name[name].expected, by_name[name].severity)


def _schema_check(report: Report, table: pa.Table, contract: pa.Schema) -> bool:
    """Columns equal the contract's and each type casts to the contract's type; records the check."""
    actual = original_schema(table)
    missing = [n for n in contract.names if n not in actual.names]
    extra = [n for n in actual.names if n not in contract.names]
    bad_types = []
    for f in contract:
        if f.name in actual.names:
            try:
                pa.array([], actual.field(f.name).type).cast(f.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                bad_types.append(f"{f.name}: {actual.field(f.name).type} (expected {f.type})")
    ok = not (missing or extra or bad_types)
    observed = "matches" if ok else f"missing {missing}, unexpected {extra}, wrong types {bad_types}"
    report.add("schema", ok, observed, f"columns {contract.names} with castable types")
    return ok


def _contract_expects(contract: pa.Schema, min_rows: int, keys: list[str]) -> list[Expect]:
    expects = [
        Expect(
            "row_count",
            "ExpectTableRowCountToBeBetween",
            {"min_value": min_rows},
            f">= {min_rows} rows",
        )
    ]
    for f in contract:
        if not f.nullable:
            column = f"{f.name}__bytes" if _is_binary(f.type) else f.name
            expects.append(
                Expect(f"{f.name}_not_null", "ExpectColumnValuesToNotBeNull", {"column": column}, "no nulls / NaN")
            )
    if len(keys) == 1:
        expects.append(Expect(f"{keys[0]}_unique", "ExpectColumnValuesToBeUnique", {"column": keys[0]}, "unique"))
    elif keys:
        expects.append(
            Expect(f"{'_'.join(keys)}_unique", "ExpectCompoundColumnsToBeUnique", {"column_list": keys}, "unique")
        )
    return expects


def _png_expect(column: str) -> list[Expect]:
    return [
        Expect(f"{column}_is_png", "ExpectColumnValuesToBeInSet", {"column": f"{column}__png", "value_set": [True]},
               "PNG bytes"),
    ]


def _non_empty_text(column: str, max_empty_fraction: float, what: str) -> Expect:
    return Expect(
        f"{column}_not_empty",
        "ExpectColumnValuesToMatchRegex",
        {"column": column, "regex": r"\S", "mostly": 1.0 - max_empty_fraction},
        f"{what} not empty (at most {max_empty_fraction:.1%} empty)",
    )


def _missing_check(report: Report, name: str, expected_keys: pd.Series, present: Iterable, max_fraction: float,
                   what: str) -> None:
    """Coverage: share of `expected_keys` absent from `present` must be <= max_fraction."""
    expected_keys = expected_keys.drop_duplicates()
    absent = expected_keys[~expected_keys.isin(pd.Index(list(present)))]
    fraction = len(absent) / len(expected_keys) if len(expected_keys) else 0.0
    report.add(
        name,
        fraction <= max_fraction,
        f"{len(absent)} of {len(expected_keys)} {what} missing ({fraction:.1%})",
        f"at most {max_fraction:.1%} missing",
        unexpected_count=len(absent),
        element_count=len(expected_keys),
        examples=absent.astype(str).tolist(),
    )


def _orphans_check(report: Report, name: str, keys: pd.Series, known: Iterable, what: str) -> None:
    orphans = keys[~keys.isin(pd.Index(list(known)))].drop_duplicates()
    report.add(
        name,
        orphans.empty,
        f"{len(orphans)} {what} unknown upstream",
        f"every {what} exists upstream",
        unexpected_count=len(orphans),
        element_count=int(keys.nunique()),
        examples=orphans.astype(str).tolist(),
    )


def _quarantine_check(report: Report, kept: int, quarantined: int, max_fraction: float, what: str) -> None:
    total = kept + quarantined
    share = quarantined / total if total else 0.0
    observed = f"{quarantined} of {total} {what} quarantined ({share:.1%})"
    report.add("quarantined_fraction", share <= max_fraction, observed, f"at most {max_fraction:.1%}",
               unexpected_count=quarantined, element_count=total)


def _finish(
    report: Report,
    table: pa.Table,
    contract: pa.Schema,
    expects: list[Expect],
    computed: Callable[[pd.DataFrame], None],
    derive: Callable[[pa.Table], pa.Table] | None = None,
) -> dict:
    """Schema first; when it holds, the GE suite and the computed checks on the (derived) frame."""
    if _schema_check(report, table, contract):
        frame = _frame(derive(table) if derive else table)
        _run_expectations(frame, expects, report)
        computed(frame)
    return report.as_dict()


def _valid_ids(inputs: pa.Table, column: str) -> pd.Series:
    """input_ids whose `column` is present; accepts raw or summarised (`<column>__bytes`) image columns."""
    name = column if column in inputs.column_names else f"{column}__bytes"
    rows = inputs.filter(pc.is_valid(inputs.column(name)))
    return pd.Series(rows.column("input_id").to_pylist(), dtype=object)


def _slot_keys(df: pd.DataFrame, columns: list[str]) -> pd.Series:
    if df.empty:
        return pd.Series(dtype=object)
    return df[columns].astype(str).agg("|".join, axis=1)


def _new_report(gate: str, table: pa.Table, thresholds: Section, path: str | None) -> Report:
    return Report(gate, path or gate, table.num_rows, thresholds.model_dump(mode="json"))


# ---------------------------------------------------------------- gates


def check_inputs(
    table: pa.Table, thresholds: InputsGate, quarantine: pa.Table | None = None, path: str | None = None
) -> dict:
    """Gate `inputs`: prepared inputs (INPUTS_SCHEMA) and the share of quarantined raw items."""
    report = _new_report("inputs", table, thresholds, path)
    t = thresholds
    expects = _contract_expects(INPUTS_SCHEMA, t.min_rows, ["input_id"]) + _png_expect("image") + [
        Expect("prompt_length", "ExpectColumnValueLengthsToBeBetween",
               {"column": "prompt", "min_value": 1, "max_value": t.max_text_chars}, f"1..{t.max_text_chars} chars"),
        Expect("caption_length", "ExpectColumnValueLengthsToBeBetween",
               {"column": "caption", "min_value": 1, "max_value": t.max_text_chars}, f"1..{t.max_text_chars} chars"),
        Expect("width_range", "ExpectColumnValuesToBeBetween", {"column": "width", "min_value": t.min_image_side},
               f">= {t.min_image_side} px"),
        Expect("height_range", "ExpectColumnValuesToBeBetween", {"column": "height", "min_value": t.min_image_side},
               f">= {t.min_image_side} px"),
    ]

    def computed(df: pd.DataFrame) -> None:
        empty = df["image__bytes"].isna() & df["prompt"].isna()
        report.add("image_or_prompt", not empty.any(), f"{int(empty.sum())} input(s) with neither",
                   "every input has an image or a prompt", unexpected_count=int(empty.sum()),
                   element_count=len(df), examples=df.loc[empty, "input_id"].tolist())
        if quarantine is not None:
            _quarantine_check(report, len(df), quarantine.num_rows, t.max_quarantined_fraction, "raw inputs")

    return _finish(report, table, INPUTS_SCHEMA, expects, computed)


def check_candidates(
    task: str,
    table: pa.Table,
    thresholds: CandidatesGate,
    inputs: pa.Table | None = None,
    quarantine: pa.Table | None = None,
    path: str | None = None,
) -> dict:
    """Gates `i2t_candidates` (one caption per input and captioner) and `t2i_candidates` (one image per prompt,
    model and seed). Coverage: every input (with an image / a prompt) has a candidate, or a quarantined one (i2t:
    captions empty after cleaning, with input_id and model), for every model (and seed)."""
    contract = I2T_CANDIDATES if task == "i2t" else T2I_CANDIDATES
    report = _new_report(f"{task}_candidates", table, thresholds, path)
    t = thresholds
    keys = ["input_id", "model", "seed", "gen_hash"] + (["prompt"] if task == "i2t" else [])
    expects = _contract_expects(contract, t.min_rows, ["candidate_id"])
    expects.append(Expect("generation_key_unique", "ExpectCompoundColumnsToBeUnique", {"column_list": keys},
                          "one candidate per generation key"))
    if task == "i2t":
        expects.append(_non_empty_text("text", t.max_empty_text_fraction, "captions"))
    else:
        expects += _png_expect("image")

    def computed(df: pd.DataFrame) -> None:
        slots = ["input_id", "model"] if task == "i2t" else ["input_id", "model", "seed"]
        if inputs is not None:
            ids = _valid_ids(inputs, "image" if task == "i2t" else "prompt")
            _orphans_check(report, "inputs_known", df["input_id"], inputs.column("input_id").to_pylist(), "input_id")
        else:
            ids = df["input_id"].drop_duplicates()
        expected = ids.to_frame("input_id").merge(df[slots[1:]].drop_duplicates(), how="cross")
        present = _slot_keys(df, slots)
        if quarantine is not None:
            _quarantine_check(report, len(df), quarantine.num_rows, t.max_quarantined_fraction, "candidates")
            if quarantine.num_rows and set(slots) <= set(quarantine.column_names):
                present = pd.concat([present, _slot_keys(quarantine.select(slots).to_pandas(), slots)])
        _missing_check(report, "coverage", _slot_keys(expected, slots), present,
                       t.max_missing_fraction, f"candidates ({'|'.join(slots)})")
        if task == "i2t":
            dup = df.duplicated(["input_id", "text_key"])
            share = float(dup.mean()) if len(df) else 0.0
            report.add("duplicate_texts", share <= t.max_duplicate_text_fraction,
                       f"{int(dup.sum())} of {len(df)} captions repeat another caption of their input ({share:.1%})",
                       f"at most {t.max_duplicate_text_fraction:.1%}", WARNING, int(dup.sum()), len(df),
                       df.loc[dup, "text"].tolist())

    return _finish(report, table, contract, expects, computed)


def check_reconstructions(
    task: str, table: pa.Table, thresholds: ReconstructionsGate, candidates: pa.Table | None = None,
    path: str | None = None,
) -> dict:
    """Gates `i2t_reconstructions` (one image per distinct caption, by text_key) and `t2i_reconstructions` (one
    back-caption per candidate image). Coverage: every caption / candidate image was reconstructed."""
    contract = I2T_RECONSTRUCTIONS if task == "i2t" else T2I_RECONSTRUCTIONS
    key = "text_key" if task == "i2t" else "candidate_id"
    report = _new_report(f"{task}_reconstructions", table, thresholds, path)
    t = thresholds
    expects = _contract_expects(contract, t.min_rows, [key])
    if task == "i2t":
        expects += _png_expect("image")
    else:
        expects.append(_non_empty_text("text", t.max_empty_text_fraction, "back-captions"))

    def computed(df: pd.DataFrame) -> None:
        if candidates is not None:
            wanted = pd.Series(candidates.column(key).to_pylist(), dtype=object)
            _missing_check(report, "coverage", wanted, df[key], t.max_missing_fraction, f"{key}s")
            _orphans_check(report, "candidates_known", df[key], wanted, key)

    return _finish(report, table, contract, expects, computed)


def check_scores(
    task: str, table: pa.Table, thresholds: ScoresGate, candidates: pa.Table | None = None, path: str | None = None
) -> dict:
    """Gates `i2t_scores` / `t2i_scores`: finite scores in the metric's range, one metric and its direction, spread
    (a collapsed scorer fails), coverage (every candidate scored exactly once)."""
    report = _new_report(f"{task}_scores", table, thresholds, path)
    t = thresholds
    metrics = sorted(set(table.column("metric").to_pylist())) if "metric" in table.column_names else []
    expects = _contract_expects(SCORES, t.min_rows, ["candidate_id"]) + [
        Expect("task_value", "ExpectColumnValuesToBeInSet", {"column": "task", "value_set": [task]}, f"task = {task}"),
        Expect("direction_value", "ExpectColumnValuesToBeInSet",
               {"column": "direction", "value_set": ["higher", "lower"]}, "higher | lower"),
        Expect("one_metric", "ExpectColumnUniqueValueCountToBeBetween",
               {"column": "metric", "min_value": 1, "max_value": 1}, "exactly one metric"),
        Expect("score_spread", "ExpectColumnStdevToBeBetween", {"column": "score", "min_value": t.min_score_std},
               f"standard deviation >= {t.min_score_std:g} (else the scorer collapsed)"),
    ]
    if len(metrics) == 1 and metrics[0] in METRIC_RANGES:
        low, high = METRIC_RANGES[metrics[0]]
        expects.append(Expect("score_range", "ExpectColumnValuesToBeBetween",
                              {"column": "score", "min_value": low, "max_value": high},
                              f"{metrics[0]} score in [{low:g}, {high:g}]"))
    if task == "i2t":
        expects += [
            Expect("text_not_null", "ExpectColumnValuesToNotBeNull", {"column": "text"}, "i2t: every caption present"),
            _non_empty_text("text", 0.0, "candidate captions"),
        ]

    def computed(df: pd.DataFrame) -> None:
        score = df["score"].to_numpy(np.float64)
        bad = ~np.isfinite(score)
        report.add("score_finite", not bad.any(), f"{int(bad.sum())} NaN/inf score(s)", "finite scores",
                   unexpected_count=int(bad.sum()), element_count=len(df),
                   examples=df.loc[bad, "candidate_id"].tolist())
        pairs = df[["metric", "direction"]].drop_duplicates()
        wrong = [f"{m}: {d}" for m, d in pairs.itertuples(index=False) if m in DIRECTIONS and DIRECTIONS[m] != d]
        report.add("direction_matches_metric", not wrong, wrong or "consistent",
                   "direction of each known metric as in cyclepref.scoring.DIRECTIONS")
        sizes = df.groupby("input_id")["score"].agg(["size", "nunique"])
        multi = sizes[sizes["size"] >= 2]
        tied = multi[multi["nunique"] <= 1]
        share = len(tied) / len(multi) if len(multi) else 0.0
        report.add("tied_inputs", share <= t.max_tied_input_fraction,
                   f"{len(tied)} of {len(multi)} inputs have all candidates tied ({share:.1%})",
                   f"at most {t.max_tied_input_fraction:.1%}", WARNING, len(tied), len(multi), tied.index.tolist())
        if candidates is not None:
            wanted = pd.Series(candidates.column("candidate_id").to_pylist(), dtype=object)
            _missing_check(report, "coverage", wanted, df["candidate_id"], t.max_missing_fraction, "candidates")
            _orphans_check(report, "candidates_known", df["candidate_id"], wanted, "candidate_id")

    return _finish(report, table, SCORES, expects, computed)


def check_pairs(table: pa.Table, thresholds: PairsGate, path: str | None = None) -> dict:
    """Gate `pairs`: preferred != rejected and really better, positive margins, no input in two splits, no pair
    twice, and at least `min_pairs` pairs of each task."""
    report = _new_report("pairs", table, thresholds, path)
    t = thresholds
    expects = _contract_expects(PAIRS, 0, ["pair_id"]) + [
        Expect("unordered_pair_unique", "ExpectCompoundColumnsToBeUnique",
               {"column_list": ["task", "input_id", "_low_id", "_high_id"]}, "each unordered pair once"),
        Expect("task_value", "ExpectColumnValuesToBeInSet", {"column": "task", "value_set": ["i2t", "t2i"]},
               "i2t | t2i"),
        Expect("split_value", "ExpectColumnValuesToBeInSet",
               {"column": "split", "value_set": ["train", "valid", "test"]}, "train | valid | test"),
        Expect("direction_value", "ExpectColumnValuesToBeInSet",
               {"column": "direction", "value_set": ["higher", "lower"]}, "higher | lower"),
        Expect("margin_positive", "ExpectColumnValuesToBeBetween",
               {"column": "margin", "min_value": 0.0, "strict_min": True}, "margin > 0"),
    ]

    def computed(df: pd.DataFrame) -> None:
        same = df["preferred_id"] == df["rejected_id"]
        report.add("preferred_not_rejected", not same.any(), f"{int(same.sum())} pair(s) with preferred == rejected",
                   "preferred_id != rejected_id", unexpected_count=int(same.sum()), element_count=len(df),
                   examples=df.loc[same, "pair_id"].tolist())
        wrong = np.zeros(len(df), dtype=bool)
        for direction, rows in df.groupby("direction").groups.items():
            if direction in ("higher", "lower"):
                d = df.loc[rows]
                wrong[df.index.get_indexer(rows)] = ~(
                    oriented(d["preferred_score"], direction) > oriented(d["rejected_score"], direction)
                )
        report.add("preferred_is_better", not wrong.any(), f"{int(wrong.sum())} pair(s) prefer the worse score",
                   "preferred score better than rejected (by direction)", unexpected_count=int(wrong.sum()),
                   element_count=len(df), examples=df.loc[wrong, "pair_id"].tolist())
        gap = np.abs(df["preferred_score"] - df["rejected_score"]) - df["margin"]
        off = ~np.isclose(gap, 0.0, atol=1e-9)
        report.add("margin_consistent", not off.any(), f"{int(off.sum())} margin(s) != |preferred - rejected|",
                   "margin = |preferred_score - rejected_score|", unexpected_count=int(off.sum()),
                   element_count=len(df), examples=df.loc[off, "pair_id"].tolist())
        splits = df.groupby("input_id")["split"].nunique()
        leaked = splits[splits > 1]
        report.add("split_leakage", leaked.empty, f"{len(leaked)} input(s) in more than one split",
                   "every input in exactly one split", unexpected_count=len(leaked), element_count=len(splits),
                   examples=leaked.index.tolist())
        per_task = df["task"].value_counts()
        short = {task: int(per_task.get(task, 0)) for task in t.tasks if per_task.get(task, 0) < t.min_pairs}
        report.add("min_pairs", not short, {task: int(per_task.get(task, 0)) for task in t.tasks},
                   f">= {t.min_pairs} pairs for each of {t.tasks}", unexpected_count=len(short),
                   element_count=len(t.tasks), examples=[f"{k}: {v}" for k, v in short.items()])
        for task in [task for task in t.tasks if per_task.get(task, 0)]:
            present = set(df.loc[df["task"] == task, "split"])
            absent = [s for s in ("train", "valid", "test") if s not in present]
            report.add(f"{task}_splits_present", not absent, f"absent: {absent}" if absent else "all present",
                       "pairs in train, valid and test", WARNING)

    return _finish(report, table, PAIRS, expects, computed, _with_unordered_ids)


def _with_unordered_ids(table: pa.Table) -> pa.Table:
    """Adds `_low_id` / `_high_id`: the pair's candidate ids in sorted order."""
    a, b = table.column("preferred_id"), table.column("rejected_id")
    lower = pc.less_equal(a, b)
    return table.append_column("_low_id", pc.if_else(lower, a, b)).append_column("_high_id", pc.if_else(lower, b, a))


def check(gate: str, table: pa.Table, thresholds: Section, path: str | None = None, **related: pa.Table) -> dict:
    """Run gate `gate` (inputs, {i2t,t2i}_{candidates,reconstructions,scores}, pairs) on `table`.

    related: the upstream tables a gate checks against, by keyword: inputs gate `quarantine`; candidates gates
    `inputs` (and i2t `quarantine`); reconstructions and scores gates `candidates`.
    """
    if gate == "inputs":
        return check_inputs(table, thresholds, path=path, **related)
    if gate == "pairs":
        return check_pairs(table, thresholds, path=path, **related)
    task, _, kind = gate.partition("_")
    functions = {"candidates": check_candidates, "reconstructions": check_reconstructions, "scores": check_scores}
    if task not in ("i2t", "t2i") or kind not in functions:
        raise ValueError(f"unknown gate {gate!r}")
    return functions[kind](task, table, thresholds, path=path, **related)





# ---------------------------------------------------------------- rendering


def render_markdown(report: dict) -> str:
    """A human-readable report: status, every check in a table, thresholds."""
    status = "PASSED" if report["success"] else "FAILED"
    c = report["counts"]
    lines = [
        f"# Data-quality gate `{report['gate']}`: {status}",
        "",
        f"Table `{report['table']}`, {report['rows']} rows. {c['checks']} checks: {c['passed']} passed, "
        f"{c['failed_critical']} critical failure(s), {c['failed_warning']} warning(s).",
        "",
        f"Table digest (sha256): `{report.get('digest', 'not recorded')}`.",
        "",
        "| | check | severity | observed | expected | examples |",
        "|---|---|---|---|---|---|",
    ]
    for name, check in sorted(report["checks"].items(), key=lambda nc: (nc[1]["success"], nc[0])):
        mark = "ok" if check["success"] else ("**FAIL**" if check["severity"] == CRITICAL else "warn")
        examples = ", ".join(str(x) for x in check["examples"])
        cells = [mark, f"`{name}`", check["severity"], str(check["observed"]), check["expected"], examples]
        lines.append("| " + " | ".join(s.replace("|", "\\|").replace("\n", " ") for s in cells) + " |")
    lines += ["", "## Thresholds", ""] + [f"- `{k}`: {v}" for k, v in report["thresholds"].items()]
    return "\n".join(lines) + "\n"
