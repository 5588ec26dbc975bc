"""Preference pairs from cycle scores (PAPER.md §3), vectorised over all inputs at once.

For every input and every unordered pair {a, b} of its candidates:
1. I2T: drop the pair when both captions are equal ignoring case and surrounding white space;
2. drop near-ties |s_a - s_b| < tie_gap (in the metric's own units; exact ties are always dropped);
3. the preferred candidate is the one with the better score (cyclepref.scoring.oriented);
4. drop the pair when the preferred score is worse than the metric's quality limit.
Candidates are put in a canonical order (input_id, candidate_id) before pairing and every step is symmetric in a and
b, so pairs, labels and counts never depend on the order of the score rows (the released code's defect, §7).

Splits are assigned per input from a salted hash of input_id, so adding inputs never moves an existing input, and
every pair of an input (of either task) shares its split. Pair ids hash (task, input_id, the two candidate ids in
sorted order), so they do not depend on which candidate won.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from cyclepref.config import BuildPairs, PairSplit, QualityLimits
from cyclepref.scoring import DIRECTIONS, Direction, oriented
from cyclepref.tables import PAIRS, SCORES

SPLITS = ("train", "valid", "test")
_SEP = "\x1f"
_HASH_KEYS = ("cyclepref-pair-0", "cyclepref-pair-1")


class PairError(ValueError):
    """Scores that cannot be paired (mixed metrics, NaN scores, duplicate candidates, ...)."""


@dataclass(frozen=True)
class PairRule:
    """The pair rule of one task: near-tie gap and quality limit in the metric's units, and its direction."""

    direction: Direction
    tie_gap: float = 0.005
    quality_limit: float | None = None
    dedupe_texts: bool = True

    @classmethod
    def for_metric(cls, metric: str, direction: Direction, cfg: BuildPairs) -> PairRule:
        if metric not in QualityLimits.model_fields:
            known = ", ".join(QualityLimits.model_fields)
            raise PairError(f"no quality limit is defined for metric {metric!r} (build_pairs.quality_limits: {known})")
        if metric in DIRECTIONS and DIRECTIONS[metric] != direction:
            raise PairError(f"metric {metric!r} is '{DIRECTIONS[metric]}'-is-better but the scores say {direction!r}")
        return cls(direction, cfg.tie_gap, getattr(cfg.quality_limits, metric), cfg.dedupe_texts)


# ---------------------------------------------------------------- ids and splits


def _hash64(values: pa.Array | pa.ChunkedArray, key: str, categorize: bool = False) -> np.ndarray:
    """SipHash-2-4 (pandas.util.hash_array, fixed 16-byte key) of each string: stable across runs and machines.

    categorize only changes speed (hash the distinct values once), never the result.
    """
    strings = values.to_numpy(zero_copy_only=False)
    return pd.util.hash_array(strings, encoding="utf8", hash_key=key, categorize=categorize)


def _hex(*digests: np.ndarray) -> pa.Array:
    """Concatenated big-endian hex of uint64 digests, vectorised: one string of 16 * len(digests) digits per row."""
    if len(digests[0]) == 0:
        return pa.array([], pa.string())
    lut = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
    raw = np.stack([d.astype(">u8") for d in digests], axis=1).view(np.uint8).reshape(len(digests[0]), -1)
    chars = np.empty((raw.shape[0], raw.shape[1] * 2), dtype=np.uint8)
    chars[:, 0::2], chars[:, 1::2] = lut[raw >> 4], lut[raw & 15]
    width = chars.shape[1]
    fixed = pa.Array.from_buffers(pa.binary(width), len(chars), [None, pa.py_buffer(chars.tobytes())])
    return fixed.cast(pa.binary()).cast(pa.string())


def _join(*columns: pa.Array | pa.ChunkedArray) -> pa.Array:
    return pc.binary_join_element_wise(*columns, _SEP)


def pair_ids(task, input_id, a, b) -> pa.Array:
    """32 hex digits per pair from (task, input_id, min(a, b), max(a, b)): independent of orientation.
    Arguments are string arrays (pyarrow, numpy or lists) of equal length."""
    task, input_id, a, b = (pa.array(x, pa.string()) if not isinstance(x, pa.Array | pa.ChunkedArray) else x
                            for x in (task, input_id, a, b))
    a_first = pc.less_equal(a, b)
    keys = _join(task, input_id, pc.if_else(a_first, a, b), pc.if_else(a_first, b, a))
    return _hex(*(_hash64(keys, k) for k in _HASH_KEYS))


def assign_split(input_ids, split: PairSplit) -> np.ndarray:
    """The split ("train" | "valid" | "test") of each input id: a uniform number in [0, 1) from the salted hash of
    the id, cut at the shares. Depends on nothing but the id and the salt."""
    ids = pa.array(input_ids, pa.string()) if not isinstance(input_ids, pa.Array | pa.ChunkedArray) else input_ids
    keys = _join(pa.array(np.full(len(ids), split.salt, dtype=object), pa.string()), ids)
    u = (_hash64(keys, _HASH_KEYS[0], categorize=True) >> np.uint64(11)).astype(np.float64) * 2.0**-53
    return np.select([u < split.train, u < split.train + split.valid], ["train", "valid"], "test").astype(object)


# ---------------------------------------------------------------- the rule


def _within_group_pairs(starts: np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (a, b), a < b, of every unordered pair inside each contiguous group; one step per group size."""
    ia, ib = [np.empty(0, np.int64)], [np.empty(0, np.int64)]
    for k in np.unique(sizes[sizes >= 2]):
        i, j = np.triu_indices(int(k), 1)
        first = starts[sizes == k][:, None]
        ia.append((first + i).ravel())
        ib.append((first + j).ravel())
    return np.concatenate(ia), np.concatenate(ib)


def _codes(values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Integer code per value (equal values, equal codes; null -> -1)."""
    encoded = pc.dictionary_encode(values)
    if isinstance(encoded, pa.ChunkedArray):
        encoded = encoded.combine_chunks()
    return pc.fill_null(encoded.indices, -1).to_numpy(zero_copy_only=False).astype(np.int64)


def _first_of_each(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Mask of the first row of each distinct (a, b) code combination."""
    combined = a * (int(b.max(initial=-1)) + 2) + (b + 1)
    _, first = np.unique(combined, return_index=True)
    mask = np.zeros(len(a), dtype=bool)
    mask[first] = True
    return mask


def _as_table(scores: pa.Table | pd.DataFrame) -> pa.Table:
    if isinstance(scores, pd.DataFrame):
        scores = pa.Table.from_pandas(scores, preserve_index=False)
    missing = [c for c in SCORES.names if c not in scores.column_names]
    if missing:
        raise PairError(f"scores table lacks column(s) {missing}")
    return scores.select(SCORES.names).cast(pa.schema([f.with_nullable(True) for f in SCORES]))


def pair_task(scores: pa.Table | pd.DataFrame, rule: PairRule) -> tuple[pa.Table, dict[str, int]]:
    """Pairs of one task's score rows (SCORES columns, one metric), without split; and the drop counts."""
    t = _as_table(scores).sort_by([("input_id", "ascending"), ("candidate_id", "ascending")])
    input_code, cand_code = _codes(t.column("input_id")), _codes(t.column("candidate_id"))
    duplicated = ~_first_of_each(input_code, cand_code)
    if duplicated.any():
        first = t.column("candidate_id")[int(np.flatnonzero(duplicated)[0])].as_py()
        raise PairError(f"{int(duplicated.sum())} candidate(s) scored more than once, e.g. {first!r}")
    score = t.column("score").to_numpy(zero_copy_only=False)
    if not np.isfinite(score).all():
        first = t.column("candidate_id")[int(np.flatnonzero(~np.isfinite(score))[0])].as_py()
        raise PairError(f"{int((~np.isfinite(score)).sum())} non-finite score(s) (NaN, inf or missing), e.g. {first!r}")
    counts = {"candidates": t.num_rows, "merged_duplicate_texts": 0}
    text_code = _codes(pc.utf8_lower(pc.utf8_trim_whitespace(t.column("text"))))
    if rule.dedupe_texts:
        merged = (text_code >= 0) & ~_first_of_each(input_code, text_code)
        counts["merged_duplicate_texts"] = int(merged.sum())
        keep_rows = np.flatnonzero(~merged)
        t, score = t.take(keep_rows), score[keep_rows]
        input_code, text_code = input_code[keep_rows], text_code[keep_rows]

    starts = np.flatnonzero(np.r_[True, input_code[1:] != input_code[:-1]]) if len(input_code) else np.empty(0, int)
    sizes = np.diff(np.r_[starts, len(input_code)])
    ia, ib = _within_group_pairs(starts, sizes)
    equal_text = (text_code[ia] == text_code[ib]) & (text_code[ia] >= 0)
    gap = np.abs(score[ia] - score[ib])
    near_tie = ~equal_text & ((gap < rule.tie_gap) | (gap == 0))
    good = oriented(score, rule.direction)
    a_wins = good[ia] > good[ib]
    pref, rej = np.where(a_wins, ia, ib), np.where(a_wins, ib, ia)
    if rule.quality_limit is None:
        quality_ok = np.ones(len(ia), dtype=bool)
    else:
        quality_ok = good[pref] >= oriented(rule.quality_limit, rule.direction)
    low_quality = ~equal_text & ~near_tie & ~quality_ok
    keep = ~equal_text & ~near_tie & quality_ok
    counts |= {
        "inputs": len(starts),
        "considered": len(ia),
        "dropped_equal_text": int(equal_text.sum()),
        "dropped_near_tie": int(near_tie.sum()),
        "dropped_low_quality": int(low_quality.sum()),
        "pairs": int(keep.sum()),
    }

    p, r = pa.array(pref[keep]), pa.array(rej[keep])
    winner, loser = t.take(p), t.take(r)
    pairs = pa.table(
        {
            "pair_id": pair_ids(winner["task"], winner["input_id"], winner["candidate_id"], loser["candidate_id"]),
            "task": winner["task"],
            "input_id": winner["input_id"],
            "preferred_id": winner["candidate_id"],
            "rejected_id": loser["candidate_id"],
            "preferred_model": winner["model"],
            "rejected_model": loser["model"],
            "preferred_score": winner["score"],
            "rejected_score": loser["score"],
            "margin": pa.array(np.abs(score[pref[keep]] - score[rej[keep]])),
            "metric": winner["metric"],
            "direction": winner["direction"],
        }
    )
    return pairs, counts


def _one_value(t: pa.Table, column: str, task: str) -> str:
    values = sorted(v for v in pc.unique(t.column(column)).to_pylist() if v is not None)
    if len(values) != 1:
        raise PairError(f"task {task}: scores must have exactly one {column}, found {values}")
    return values[0]


def build_pairs(scores: pa.Table | pd.DataFrame, cfg: BuildPairs) -> tuple[pa.Table, dict[str, dict]]:
    """PAIRS table for every task in cfg.tasks (sorted by task, input_id, pair_id) and per-task drop counts."""
    table = _as_table(scores)
    parts, counts = [], {}
    for task in cfg.tasks:
        rows = table.filter(pc.equal(table.column("task"), task))
        if rows.num_rows == 0:
            raise PairError(f"no scores for task {task!r} (build_pairs.tasks lists it)")
        metric, direction = _one_value(rows, "metric", task), _one_value(rows, "direction", task)
        rule = PairRule.for_metric(metric, direction, cfg)
        pairs, task_counts = pair_task(rows, rule)
        counts[task] = {"metric": metric, "direction": direction, "quality_limit": rule.quality_limit, **task_counts}
        parts.append(pairs)
    out = pa.concat_tables(parts)
    inputs = pc.unique(out.column("input_id"))
    split_of = pa.array(assign_split(inputs, cfg.split), pa.string())
    out = out.append_column("split", split_of.take(pc.index_in(out.column("input_id"), value_set=inputs)))
    return out.cast(PAIRS).sort_by([("task", "ascending"), ("input_id", "ascending"), ("pair_id", "ascending")]), counts


# ---------------------------------------------------------------- statistics


def _describe(values: np.ndarray) -> dict[str, float]:
    if len(values) == 0:
        return {k: 0.0 for k in ("mean", "std", "min", "p10", "median", "p90", "max")}
    p10, median, p90 = np.percentile(values, [10, 50, 90])
    return {
        "mean": float(values.mean()),
        "std": float(values.std()),
        "min": float(values.min()),
        "p10": float(p10),
        "median": float(median),
        "p90": float(p90),
        "max": float(values.max()),
    }


def _split_counts(rows: pd.DataFrame, split: str) -> dict[str, int]:
    in_split = rows["split"] == split
    return {"pairs": int(in_split.sum()), "inputs": int(rows.loc[in_split, "input_id"].nunique())}


def model_stats(pairs: pd.DataFrame) -> dict[str, dict[str, float]]:
    """Per model: pairs won and lost, win rate, and mean margin of the pairs it won."""
    models = sorted(set(pairs["preferred_model"]) | set(pairs["rejected_model"]))
    wins = pairs["preferred_model"].value_counts()
    losses = pairs["rejected_model"].value_counts()
    won_margin = pairs.groupby("preferred_model")["margin"].mean()
    out = {}
    for m in models:
        w, lo = int(wins.get(m, 0)), int(losses.get(m, 0))
        out[m] = {
            "wins": w,
            "losses": lo,
            "win_rate": w / (w + lo) if w + lo else 0.0,
            "mean_margin_won": float(won_margin.get(m, 0.0)),
        }
    return out


def pair_stats(pairs: pa.Table, counts: dict[str, dict], tie_gap: float) -> dict:
    """The build_pairs metric: per task the drop counts, survival, split sizes, margins and per-model win rates."""
    df = pairs.to_pandas()
    tasks = {}
    for task, c in counts.items():
        rows = df[df["task"] == task]
        tasks[task] = {
            **c,
            "survival": c["pairs"] / c["considered"] if c["considered"] else 0.0,
            "pairs_per_input": c["pairs"] / c["inputs"] if c["inputs"] else 0.0,
            "splits": {s: _split_counts(rows, s) for s in SPLITS},
            "margin": _describe(rows["margin"].to_numpy(np.float64)),
            "models": model_stats(rows),
        }
    return {"pairs": int(pairs.num_rows), "tie_gap": tie_gap, "tasks": tasks}
