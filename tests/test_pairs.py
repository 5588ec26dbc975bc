"""The pair rule (PAPER.md §3): orientation, filters, order independence, split, ids, and the §7 regression."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.bench_pairs import naive_pairs, synthetic_scores
from cyclepref.config import BuildPairs, PairSplit, QualityLimits
from cyclepref.pairs import PairError, PairRule, assign_split, build_pairs, pair_ids, pair_stats, pair_task
from cyclepref.tables import PAIRS, SCORES

KEY = ["task", "input_id", "preferred_id", "rejected_id"]


def scores_frame(rows: list[tuple], task: str = "i2t", metric: str = "dreamsim") -> pd.DataFrame:
    """rows: (input_id, candidate_id, score[, text]); model = "m-" + candidate_id."""
    direction = {"dreamsim": "lower", "lpips": "lower"}.get(metric, "higher")
    return pd.DataFrame(
        {
            "task": task,
            "input_id": [r[0] for r in rows],
            "candidate_id": [r[1] for r in rows],
            "model": [f"m-{r[1]}" for r in rows],
            "text": [(r[3] if len(r) > 3 else f"caption {r[1]}") if task == "i2t" else None for r in rows],
            "score": [float(r[2]) for r in rows],
            "metric": metric,
            "direction": direction,
        }
    )


def pairs_of(df: pd.DataFrame, **cfg) -> pd.DataFrame:
    task = df["task"].iloc[0]
    table, _ = build_pairs(df, BuildPairs(tasks=[task], **cfg))
    return table.to_pandas()


def as_set(pairs: pd.DataFrame | pa.Table) -> set[tuple[str, str, str]]:
    df = pairs.to_pandas() if isinstance(pairs, pa.Table) else pairs
    return set(df[["input_id", "preferred_id", "rejected_id"]].itertuples(index=False, name=None))


# ---------------------------------------------------------------- the rule on hand-made cases


def test_distance_prefers_lower_and_similarity_prefers_higher():
    d = pairs_of(scores_frame([("x", "a", 0.2), ("x", "b", 0.5)]))
    assert as_set(d) == {("x", "a", "b")}
    assert d["margin"].tolist() == pytest.approx([0.3])
    s = pairs_of(scores_frame([("x", "a", 0.5), ("x", "b", 0.8)], task="t2i", metric="sbert"))
    assert as_set(s) == {("x", "b", "a")}
    assert s["preferred_score"].tolist() == [0.8] and s["rejected_score"].tolist() == [0.5]


def test_near_ties_are_dropped_in_metric_units():
    df = scores_frame([("x", "a", 0.300), ("x", "b", 0.304), ("x", "c", 0.310), ("x", "d", 0.310)])
    assert as_set(pairs_of(df)) == {("x", "a", "c"), ("x", "a", "d"), ("x", "b", "c"), ("x", "b", "d")}
    assert as_set(pairs_of(df, tie_gap=0.0)) == {("x", "a", "b"), ("x", "a", "c"), ("x", "a", "d"), ("x", "b", "c"),
                                                 ("x", "b", "d")}


def test_quality_limit_applies_to_the_preferred_in_the_metric_direction():
    dist = scores_frame([("x", "a", 0.69), ("x", "b", 0.95), ("y", "c", 0.75), ("y", "d", 0.9)])
    assert as_set(pairs_of(dist)) == {("x", "a", "b")}
    sim = scores_frame([("x", "a", 0.41), ("x", "b", 0.1), ("y", "c", 0.39), ("y", "d", 0.1)], "t2i", "sbert")
    assert as_set(pairs_of(sim)) == {("x", "a", "b")}
    open_limits = QualityLimits(dreamsim=None, sbert=None)
    assert len(pairs_of(dist, quality_limits=open_limits)) == 2


def test_open_clip_default_has_no_quality_limit():
    df = scores_frame([("x", "a", -0.9), ("x", "b", -0.5)], metric="open_clip")
    assert as_set(pairs_of(df)) == {("x", "b", "a")}


def test_equal_captions_never_pair_and_are_merged():
    df = scores_frame(
        [("x", "a", 0.2, "A dog. "), ("x", "b", 0.5, "a dog."), ("x", "c", 0.4, "a cat")]
    )
    table, counts = build_pairs(df, BuildPairs(tasks=["i2t"]))
    assert as_set(table.to_pandas()) == {("x", "a", "c")}
    assert counts["i2t"]["merged_duplicate_texts"] == 1
    kept, counts = build_pairs(df, BuildPairs(tasks=["i2t"], dedupe_texts=False))
    assert as_set(kept.to_pandas()) == {("x", "a", "c"), ("x", "c", "b")}
    assert counts["i2t"]["dropped_equal_text"] == 1


def test_output_matches_the_pairs_contract_and_is_sorted():
    table, _ = build_pairs(synthetic_scores("t2i", 30), BuildPairs(tasks=["t2i"]))
    assert table.schema.equals(PAIRS)
    df = table.to_pandas()
    assert (df["margin"] > 0).all() and (df["preferred_id"] != df["rejected_id"]).all()
    assert df.equals(df.sort_values(["task", "input_id", "pair_id"]).reset_index(drop=True))
    assert df["pair_id"].str.fullmatch(r"[0-9a-f]{32}").all() and df["pair_id"].is_unique


def test_vectorised_rule_equals_the_naive_loop():
    cfg = BuildPairs()
    for task, metric, direction in (("i2t", "dreamsim", "lower"), ("t2i", "sbert", "higher")):
        scores = synthetic_scores(task, 60, seed=3)
        table, _ = build_pairs(scores, cfg.model_copy(update={"tasks": [task]}))
        naive = naive_pairs(scores, PairRule.for_metric(metric, direction, cfg))
        assert as_set(table.to_pandas()) == as_set(naive)
        assert len(naive) == table.num_rows > 0


# ---------------------------------------------------------------- §7: the released rule gets these wrong


def released_rule(generations: list[str], scores: list[float], data_type: str) -> list[tuple[str, str]]:
    """The released data loader's pairing as described in PAPER.md §7 (reimplemented here to document the defect):
    its branch for 'first-listed candidate has the larger score' swaps the conditions."""
    gap, limit = 0.005, 0.7 if data_type == "I2T" else 0.4
    pairs = []
    for i in range(len(scores)):
        for j in range(i + 1, len(scores)):
            if generations[i].lower() == generations[j].lower() or abs(scores[i] - scores[j]) < gap:
                continue
            if scores[i] < scores[j]:
                if data_type == "T2I" and scores[j] >= limit:
                    pairs.append((generations[j], generations[i]))
                elif data_type == "I2T" and scores[i] <= limit:
                    pairs.append((generations[i], generations[j]))
            elif scores[i] > scores[j]:
                if data_type == "I2T" and scores[j] >= limit:
                    pairs.append((generations[i], generations[j]))
                elif data_type == "T2I" and scores[j] <= limit:
                    pairs.append((generations[j], generations[i]))
    return pairs


def test_regression_released_rule_drops_valid_pairs_and_prefers_worse_ones():
    # I2T, DreamSim: "a" listed first with the larger distance.
    assert released_rule(["a", "b"], [0.5, 0.3], "I2T") == []
    assert released_rule(["a", "b"], [0.9, 0.8], "I2T") == [("a", "b")]
    assert as_set(pairs_of(scores_frame([("x", "a", 0.5), ("x", "b", 0.3)]))) == {("x", "b", "a")}
    assert pairs_of(scores_frame([("x", "a", 0.9), ("x", "b", 0.8)])).empty
    # T2I, SBERT: "a" listed first with the higher similarity.
    assert released_rule(["a", "b"], [0.8, 0.5], "T2I") == []
    assert released_rule(["a", "b"], [0.35, 0.2], "T2I") == [("b", "a")]
    assert as_set(pairs_of(scores_frame([("x", "a", 0.8), ("x", "b", 0.5)], "t2i", "sbert"))) == {("x", "a", "b")}
    assert pairs_of(scores_frame([("x", "a", 0.35), ("x", "b", 0.2)], "t2i", "sbert")).empty


def test_regression_released_rule_depends_on_listing_order_ours_does_not():
    assert released_rule(["a", "b"], [0.3, 0.5], "I2T") != released_rule(["b", "a"], [0.5, 0.3], "I2T")
    forward = pairs_of(scores_frame([("x", "a", 0.3), ("x", "b", 0.5)]))
    backward = pairs_of(scores_frame([("x", "b", 0.5), ("x", "a", 0.3)]))
    assert forward.equals(backward) and as_set(forward) == {("x", "a", "b")}


# ---------------------------------------------------------------- properties

GRID = [0.1, 0.2, 0.3, 0.3025, 0.305, 0.35, 0.5, 0.65, 0.7, 0.7025, 0.75, 0.9]


@st.composite
def score_tables(draw, task: str = "i2t") -> pd.DataFrame:
    rows = []
    for i in range(draw(st.integers(1, 4))):
        for j in range(draw(st.integers(1, 7))):
            text = draw(st.sampled_from(["a cat", "A cat ", "a dog", "two birds", "a tree"]))
            rows.append((f"in{i}", f"c{i}-{j}", draw(st.sampled_from(GRID)), text))
    return scores_frame(rows, task=task, metric="dreamsim" if task == "i2t" else "sbert")


@settings(max_examples=60, deadline=None)
@given(df=score_tables(), order=st.randoms(use_true_random=False), dedupe=st.booleans())
def test_pairs_and_counts_do_not_depend_on_candidate_order(df, order, dedupe):
    cfg = BuildPairs(tasks=["i2t"], dedupe_texts=dedupe)
    shuffled = df.iloc[order.sample(range(len(df)), len(df))].reset_index(drop=True)
    table, counts = build_pairs(df, cfg)
    shuffled_table, shuffled_counts = build_pairs(shuffled, cfg)
    assert table.equals(shuffled_table)
    assert counts == shuffled_counts


@settings(max_examples=60, deadline=None)
@given(df=score_tables(), scale=st.sampled_from([1.0, 0.5, 4.0]), limit=st.sampled_from([None, 0.3, 0.7]))
def test_distance_and_similarity_with_the_same_ranking_give_the_same_pairs(df, scale, limit):
    as_distance = PairRule("lower", tie_gap=0.005, quality_limit=limit)
    as_similarity = PairRule("higher", tie_gap=0.005 * scale, quality_limit=None if limit is None else -limit * scale)
    flipped = df.assign(score=-df["score"] * scale, direction="higher", metric="similarity")
    dist_pairs, dist_counts = pair_task(df, as_distance)
    sim_pairs, sim_counts = pair_task(flipped, as_similarity)
    assert as_set(dist_pairs) == as_set(sim_pairs)
    assert dist_counts == sim_counts
    margins = np.sort(dist_pairs.column("margin").to_numpy()) * scale
    assert np.array_equal(margins, np.sort(sim_pairs.column("margin").to_numpy()))


@settings(max_examples=30, deadline=None)
@given(df=score_tables("t2i"))
def test_every_kept_pair_satisfies_the_rule(df):
    pairs = pairs_of(df)
    assert (pairs["preferred_score"] - pairs["rejected_score"] >= 0.005).all()
    assert (pairs["preferred_score"] >= 0.4).all()
    n = df.groupby("input_id").size()
    assert len(pairs) <= int((n * (n - 1) // 2).sum())


# ---------------------------------------------------------------- ids and splits


def test_pair_id_ignores_orientation_and_separates_tasks_and_inputs():
    ids = pair_ids(["i2t", "i2t", "t2i", "i2t", "i2t"], ["x", "x", "x", "y", "x"], ["a", "b", "a", "a", "a|b"],
                   ["b", "a", "b", "b", "c"]).to_pylist()
    assert ids[0] == ids[1]
    assert len(set(ids)) == 4
    assert ids[0] == pair_ids(["i2t"], ["x"], ["a"], ["b"]).to_pylist()[0]


def test_split_is_stable_when_inputs_are_added_and_near_90_5_5():
    ids = np.array([f"input-{k}" for k in range(20000)], object)
    split = PairSplit()
    full = assign_split(ids, split)
    assert (assign_split(ids[:500], split) == full[:500]).all()
    shares = pd.Series(full).value_counts(normalize=True)
    assert shares["train"] == pytest.approx(0.9, abs=0.01)
    assert shares["valid"] == pytest.approx(0.05, abs=0.006) and shares["test"] == pytest.approx(0.05, abs=0.006)
    reshuffled = assign_split(ids, PairSplit(salt="other"))
    assert (reshuffled != full).mean() > 0.05


def test_all_pairs_of_an_input_share_a_split_across_tasks():
    i2t = synthetic_scores("i2t", 200)
    t2i = synthetic_scores("t2i", 200, seed=1)
    table, _ = build_pairs(pd.concat([i2t, t2i], ignore_index=True), BuildPairs())
    per_input = table.to_pandas().groupby("input_id")["split"].nunique()
    assert (per_input == 1).all()
    assert set(table.column("split").to_pylist()) == {"train", "valid", "test"}


# ---------------------------------------------------------------- errors and statistics


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.assign(score=d["score"].where(d.index != 1, np.nan)), "non-finite"),
        (lambda d: d.assign(candidate_id="same"), "scored more than once"),
        (lambda d: d.assign(metric=["dreamsim", "lpips", "dreamsim"]), "exactly one metric"),
        (lambda d: d.assign(metric="mystery"), "no quality limit"),
        (lambda d: d.assign(direction="higher"), "lower"),
    ],
)
def test_unpairable_scores_fail_with_a_reason(change, message):
    df = change(scores_frame([("x", "a", 0.2), ("x", "b", 0.5), ("x", "c", 0.6)]))
    with pytest.raises(PairError, match=message):
        build_pairs(df, BuildPairs(tasks=["i2t"]))


def test_missing_task_is_an_error():
    with pytest.raises(PairError, match="no scores for task 't2i'"):
        build_pairs(scores_frame([("x", "a", 0.2), ("x", "b", 0.5)]), BuildPairs())


def test_pair_stats_count_wins_losses_and_drops():
    df = scores_frame([("x", "a", 0.2), ("x", "b", 0.5), ("x", "c", 0.9), ("y", "d", 0.3), ("y", "e", 0.3)])
    scores = pa.Table.from_pandas(df, schema=SCORES, preserve_index=False)
    table, counts = build_pairs(scores, BuildPairs(tasks=["i2t"]))
    stats = pair_stats(table, counts, 0.005)["tasks"]["i2t"]
    assert stats["pairs"] == 3 and stats["considered"] == 4 and stats["dropped_near_tie"] == 1
    assert stats["models"]["m-a"] == {"wins": 2, "losses": 0, "win_rate": 1.0, "mean_margin_won": pytest.approx(0.5)}
    assert stats["models"]["m-c"]["wins"] == 0 and stats["models"]["m-c"]["losses"] == 2
    assert sum(s["pairs"] for s in stats["splits"].values()) == 3
    assert stats["margin"]["max"] == pytest.approx(0.7)
