"""Schemas of the tables that flow between stages (the data contracts), and where each stage writes them.

prepare_inputs   data/prepared/inputs.parquet          INPUTS (cyclepref.inputs)
generate_i2t     data/i2t/candidates/candidates.parquet  I2T_CANDIDATES   one caption per (input, captioner)
reconstruct_i2t  data/i2t/reconstructions/part-*.parquet I2T_RECONSTRUCTIONS  one image per distinct caption of an input
score_i2t        data/i2t/scores/scores.parquet          SCORES (task = "i2t")
generate_t2i     data/t2i/candidates/part-*.parquet      T2I_CANDIDATES   one image per (prompt, model, seed)
reconstruct_t2i  data/t2i/reconstructions/reconstructions.parquet  T2I_RECONSTRUCTIONS  one back-caption per image
score_t2i        data/t2i/scores/scores.parquet          SCORES (task = "t2i")
build_pairs      data/pairs/pairs.parquet                PAIRS
Images are PNG bytes inside the tables; image tables are directories of shards (part-NNNNN.parquet, readable as
one table with pyarrow.parquet.read_table(dir)); every output directory has a manifest.
A stage checks what it publishes with `conform_to_contract`: the schema's columns and types, no nulls in non-null
fields, a unique key, finite numbers.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa


def _f(name: str, typ: pa.DataType, nullable: bool = False) -> pa.Field:
    return pa.field(name, typ, nullable=nullable)


I2T_CANDIDATES = pa.schema(
    [
        _f("candidate_id", pa.string()),
        _f("input_id", pa.string()),
        _f("model", pa.string()),
        _f("prompt", pa.string()),
        _f("seed", pa.int64()),
        _f("gen_hash", pa.string()),
        _f("raw_text", pa.string()),
        _f("text", pa.string()),
        _f("text_key", pa.string()),
    ]
)
"""text = cleaned caption; text_key = hash(input_id, text.strip().lower()) — identical captions of one input share it."""

I2T_RECONSTRUCTIONS = pa.schema(
    [
        _f("text_key", pa.string()),
        _f("input_id", pa.string()),
        _f("text", pa.string()),
        _f("model", pa.string()),
        _f("seed", pa.int64()),
        _f("gen_hash", pa.string()),
        _f("image", pa.binary()),
    ]
)

T2I_CANDIDATES = pa.schema(
    [
        _f("candidate_id", pa.string()),
        _f("input_id", pa.string()),
        _f("model", pa.string()),
        _f("prompt", pa.string()),
        _f("seed", pa.int64()),
        _f("gen_hash", pa.string()),
        _f("image", pa.binary()),
    ]
)

T2I_RECONSTRUCTIONS = pa.schema(
    [
        _f("candidate_id", pa.string()),
        _f("input_id", pa.string()),
        _f("model", pa.string()),
        _f("gen_hash", pa.string()),
        _f("raw_text", pa.string()),
        _f("text", pa.string()),
    ]
)

SCORES = pa.schema(
    [
        _f("task", pa.string()),
        _f("input_id", pa.string()),
        _f("candidate_id", pa.string()),
        _f("model", pa.string()),
        _f("text", pa.string(), nullable=True),
        _f("score", pa.float64()),
        _f("metric", pa.string()),
        _f("direction", pa.string()),
    ]
)
"""One row per candidate. `text` is the candidate caption (i2t) or null (t2i); `score` is the raw metric value
(a distance when direction = "lower"); compare scores only through cyclepref.scoring.oriented."""

PAIRS = pa.schema(
    [
        _f("pair_id", pa.string()),
        _f("task", pa.string()),
        _f("input_id", pa.string()),
        _f("preferred_id", pa.string()),
        _f("rejected_id", pa.string()),
        _f("preferred_model", pa.string()),
        _f("rejected_model", pa.string()),
        _f("preferred_score", pa.float64()),
        _f("rejected_score", pa.float64()),
        _f("margin", pa.float64()),
        _f("metric", pa.string()),
        _f("direction", pa.string()),
        _f("split", pa.string()),
    ]
)
"""margin = |preferred_score - rejected_score| (> 0); split in {train, valid, test}; all pairs of one input share
a split. preferred_id / rejected_id are candidate_ids of the task's candidates table."""

PATHS = {
    "inputs": "data/prepared/inputs.parquet",
    "quarantine": "data/prepared/quarantine.parquet",
    "i2t_candidates": "data/i2t/candidates/candidates.parquet",
    "i2t_quarantine": "data/i2t/candidates/quarantine.parquet",
    "i2t_reconstructions": "data/i2t/reconstructions",
    "i2t_scores": "data/i2t/scores/scores.parquet",
    "t2i_candidates": "data/t2i/candidates",
    "t2i_reconstructions": "data/t2i/reconstructions/reconstructions.parquet",
    "t2i_scores": "data/t2i/scores/scores.parquet",
    "pairs": "data/pairs/pairs.parquet",
}

CONTRACTS: dict[str, tuple[pa.Schema, tuple[str, ...]]] = {
    "i2t_candidates": (I2T_CANDIDATES, ("candidate_id",)),
    "i2t_reconstructions": (I2T_RECONSTRUCTIONS, ("text_key",)),
    "i2t_scores": (SCORES, ("candidate_id",)),
    "t2i_candidates": (T2I_CANDIDATES, ("candidate_id",)),
    "t2i_reconstructions": (T2I_RECONSTRUCTIONS, ("candidate_id",)),
    "t2i_scores": (SCORES, ("candidate_id",)),
    "pairs": (PAIRS, ("pair_id",)),
}
"""table (a key of PATHS) -> (schema, key columns)."""


class ContractError(ValueError):
    """A table a stage is about to publish that breaks its contract."""


def conform_to_contract(name: str, table: pa.Table) -> pa.Table:
    """`table` cast to the schema of contract `name`; raises ContractError naming the table and the broken rule.
    For a sharded table call it per shard and check key uniqueness across shards with `require_unique`."""
    from cyclepref.store import SchemaError, conform

    schema, key = CONTRACTS[name]
    try:
        table = conform(table, schema, name)
    except SchemaError as err:
        raise ContractError(f"refusing to publish {err}") from None
    require_unique(name, list(zip(*(table.column(c).to_pylist() for c in key), strict=True)))
    for f in schema:
        if pa.types.is_floating(f.type):
            bad = int(np.count_nonzero(~np.isfinite(table.column(f.name).to_numpy(zero_copy_only=False))))
            if bad:
                raise ContractError(f"refusing to publish {name}: {bad} non-finite {f.name} value(s)")
    return table


def require_unique(name: str, keys: list) -> None:
    repeated = [k for k, n in Counter(keys).items() if n > 1]
    if repeated:
        raise ContractError(f"refusing to publish {name}: {len(repeated)} key(s) repeated, e.g. {repeated[0]}")
