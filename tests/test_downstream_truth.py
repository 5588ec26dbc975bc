"""Ground-truth evaluation of the downstream stages on sandbox scenes: the evaluator's scores, best-of-N picks and
their intervals for oracle, adversarial and random verifiers, the before / after comparison, the params checks and
the best_of_n stage on a rendered sandbox input folder."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from pydantic import ValidationError

from cyclepref.downstream.best_of_n import Candidates, best_of_n, candidate_keys, random_scores, score_all
from cyclepref.downstream.evaluate import Outcomes, judge
from cyclepref.downstream.evaluators import GroundTruth, ModelEvaluator, ground_truth
from cyclepref.world.parse import as_parsed, f1, parse_caption, parse_image
from cyclepref.world.scene import COLOURS, SHAPES, WorldObject, caption, render, scene_from_record
from fixtures.downstream import WORLD, make_world_root, write_downstream_params, write_world_inputs
from fixtures.pipeline_tables import pass_gates

def _obj(k: int) -> WorldObject:
    return WorldObject(("top left", "top right", "bottom left", "bottom right")[k % 4], SHAPES[k % 3],
                       list(COLOURS)[(k + 1) % 6], ("small", "large")[k % 2])


def _wrong(obj: WorldObject, errors: int) -> WorldObject:
    """`obj` with the first `errors` of its colour, shape and size changed (position kept)."""
    alternatives = {"colour": list(COLOURS), "shape": list(SHAPES), "size": ["small", "large"]}
    changes = {a: next(v for v in values if v != getattr(obj, a)) for a, values in list(alternatives.items())[:errors]}
    return replace(obj, **changes)


# A candidate with e wrong attributes of a one-object scene has F1 (4 - e) / 4.
ERRORS = [[3, 1, 2, 0], [2, 3, 0, 1], [1, 0, 3, 2], [3, 2, 1, 0]]


def _caption_candidates(n_inputs: int) -> tuple[Candidates, dict, list[list[int]]]:
    ids = [f"in{i:03d}" for i in range(n_inputs)]
    objs = [_obj(i) for i in range(n_inputs)]
    errors = [ERRORS[i % len(ERRORS)] for i in range(n_inputs)]
    texts = [[caption((_wrong(o, e),)) for e in row] for o, row in zip(objs, errors, strict=True)]
    cands = Candidates("i2t", ids, candidate_keys(ids, "h", "s", 4), [[None] * 4 for _ in ids], texts)
    return cands, {i: as_parsed((o,)) for i, o in zip(ids, objs, strict=True)}, errors


class TableVerifier:
    """Scores looked up by text."""

    def __init__(self, name: str, values: dict[str, float]):
        self.name, self.values = name, values

    def score(self, images, texts) -> torch.Tensor:
        return torch.tensor([self.values[t] for t in texts], dtype=torch.float64)


class ParseVerifier:
    """An oracle from the pair alone: objects parsed from the image against those the prompt names."""

    name = "parse"

    def score(self, images, texts) -> torch.Tensor:
        return torch.tensor([f1(parse_image(im), parse_caption(t)) for im, t in zip(images, texts, strict=True)])


class FakeVerifiers:
    def __init__(self, *verifiers):
        self.by_name = {v.name: v for v in verifiers}

    def for_task(self, kinds, task):
        return {k: self.by_name[k] for k in kinds}


def test_ground_truth_scores_the_true_caption_and_image_1_and_a_wrong_one_by_its_errors():
    scene = (_obj(0), _obj(1))
    wrong = (_wrong(_obj(0), 1), _obj(1))
    i2t = GroundTruth({"a": as_parsed(scene)}, "i2t")
    assert i2t.score(["a", "a"], [None, None], [caption(scene), caption(wrong)]).tolist() == [1.0, 7 / 8]
    t2i = GroundTruth({"a": as_parsed(scene)}, "t2i")
    assert t2i.score(["a", "a"], [render(scene), render(wrong)], ["x", "x"]).tolist() == [1.0, 7 / 8]
    with pytest.raises(ValueError, match="no true scene"):
        i2t.score(["a", "b"], [None, None], ["x", "y"])


def test_best_of_n_under_ground_truth_oracle_adversary_and_random():
    cands, truth, errors = _caption_candidates(8)
    scores = score_all(cands, ["random", "ground_truth"], FakeVerifiers(), truth)
    assert scores["ground_truth"].tolist() == [[(4 - e) / 4 for e in row] for row in errors]
    scores |= {"oracle": scores["ground_truth"], "adversary": -scores["ground_truth"]}
    ns = [1, 2, 3, 4]
    result = best_of_n(cands, scores, ["oracle", "adversary", "random"], "ground_truth", ns, n_boot=2000)

    best = [np.mean([(4 - min(row[:n])) / 4 for row in errors]) for n in ns]
    worst = [np.mean([(4 - max(row[:n])) / 4 for row in errors]) for n in ns]
    assert result.curves["oracle"] == pytest.approx(best)
    assert result.curves["adversary"] == pytest.approx(worst)
    assert result.curves["oracle"] == sorted(result.curves["oracle"])
    assert all(r <= o + 1e-12 for r, o in zip(result.curves["random"], result.curves["oracle"], strict=True))
    assert len({c[0] for c in result.curves.values()}) == 1  # N = 1: everyone keeps the first candidate
    assert result.gains["oracle"][0] == pytest.approx(best[-1] - best[0])
    for name, curve in result.curves.items():
        for mean, (low, high) in zip(curve, result.intervals[name], strict=True):
            assert low <= mean <= high


def test_intervals_shrink_with_more_inputs():
    widths = {}
    for n_inputs in (8, 64):
        cands, truth, _ = _caption_candidates(n_inputs)
        scores = score_all(cands, ["random", "ground_truth"], FakeVerifiers(), truth)
        result = best_of_n(cands, scores, ["random"], "ground_truth", [1, 4], n_boot=2000)
        low, high = result.intervals["random"][0]
        widths[n_inputs] = high - low
    assert 0 < widths[64] < widths[8] / 2


def test_random_verifier_is_seeded_by_the_candidate_key():
    cands, _, _ = _caption_candidates(4)
    first = random_scores(cands)
    assert np.array_equal(first, random_scores(cands))
    flipped = Candidates("i2t", cands.input_ids[::-1], cands.keys[::-1], cands.images[::-1], cands.texts[::-1])
    assert np.array_equal(random_scores(flipped), first[::-1])
    assert len(np.unique(first)) == first.size and ((0 <= first) & (first < 1)).all()


def test_image_candidates_are_judged_by_the_objects_in_the_image():
    ids, objs = ["a", "b"], [_obj(0), _obj(5)]
    prompts = [caption((o,)) for o in objs]
    images = [[render((_wrong(o, e),)) for e in (2, 0, 3)] for o in objs]
    cands = Candidates("t2i", ids, candidate_keys(ids, "h", "images", 3), images, [[p] * 3 for p in prompts])
    truth = {i: as_parsed((o,)) for i, o in zip(ids, objs, strict=True)}
    scores = score_all(cands, ["parse", "ground_truth"], FakeVerifiers(ParseVerifier()), truth)
    assert scores["ground_truth"].tolist() == [[0.5, 1.0, 0.25]] * 2
    assert np.array_equal(scores["parse"], scores["ground_truth"])
    result = best_of_n(cands, scores, ["parse"], "ground_truth", [1, 3], n_boot=200)
    assert result.curves["parse"] == [0.5, 1.0]


def test_before_after_judged_by_ground_truth_per_input_mean_over_seeds():
    objs = [_obj(k) for k in range(4)]
    ids = [f"in{k}" for k in range(4)]
    truth = GroundTruth({i: as_parsed((o,)) for i, o in zip(ids, objs, strict=True)}, "t2i")
    before_errors, after_errors = [[2, 0], [1, 1], [3, 1], [0, 0]], [[0, 0], [0, 1], [1, 1], [0, 0]]
    images = [[render((_wrong(o, e),)) for e in row] for o, row in zip(objs, before_errors, strict=True)]
    after = [[render((_wrong(o, e),)) for e in row] for o, row in zip(objs, after_errors, strict=True)]
    prompts = [caption((o,)) for o in objs for _ in range(2)]
    outcomes = Outcomes("t2i", [i for i in ids for _ in range(2)], 2, [im for r in images for im in r], prompts,
                        [im for r in after for im in r], prompts)
    report = judge(outcomes, truth, n_boot=2000)
    before_means = [np.mean([(4 - e) / 4 for e in row]) for row in before_errors]
    after_means = [np.mean([(4 - e) / 4 for e in row]) for row in after_errors]
    assert report["n"] == 4 and report["judged_by"] == "ground truth"
    assert report["before"] == pytest.approx(np.mean(before_means))
    assert report["after"] == pytest.approx(np.mean(after_means))
    assert report["delta"] == pytest.approx(np.mean(after_means) - np.mean(before_means))
    assert report["win_rate"] == pytest.approx((3 + 0.5) / 4)
    for side in ("before", "after", "delta"):
        assert report[f"{side}_low"] <= report[side] <= report[f"{side}_high"]
    assert report["delta_low"] > 0  # every input improves or ties
    assert outcomes.changed() == 3

    text_outcomes = Outcomes("i2t", ids, 1, [None] * 4, ["x", "y", "x", "y"], [None] * 4, ["y"] * 4)
    model = judge(text_outcomes, ModelEvaluator(TableVerifier("reward", {"x": 0.0, "y": 1.0})), n_boot=200)
    assert model["judged_by"] == "model" and (model["before"], model["after"]) == (0.5, 1.0)


def test_truth_of_prepared_sandbox_inputs(tmp_path):
    from cyclepref.world.data import scenes

    world = scenes("pipeline", 5, seed=0)
    table = write_world_inputs(tmp_path, world)
    truth = ground_truth(tmp_path, WORLD)
    assert sorted(truth) == sorted(table.column("input_id").to_pylist())
    from cyclepref.inputs import decode_image

    for row in table.to_pylist():
        judge_i2t, judge_t2i = GroundTruth(truth, "i2t"), GroundTruth(truth, "t2i")
        ids = [row["input_id"]]
        assert judge_i2t.score(ids, [None], [row["prompt"]]).tolist() == [1.0]
        assert judge_t2i.score(ids, [decode_image(row["image"])], ["-"]).tolist() == [1.0]


def test_arrivals_carry_their_truth_through_the_pool_into_ground_truth(tmp_path):
    """A retraining round's arrivals (rendered, ingested into the pool, prepared beside the world's inputs) have
    ground truth: the evaluators of best_of_n and evaluate_downstream judge them (before, they stopped the round
    with "evaluated inputs have no true scene")."""
    from cyclepref import store
    from cyclepref.config import PrepareInputs
    from cyclepref.ingest import ingest_inputs
    from cyclepref.inputs import INPUTS_SCHEMA, inputs_table, iter_source, prepare
    from cyclepref.tables import PATHS
    from cyclepref.world.arrivals import render_arrivals
    from cyclepref.world.data import scenes

    write_world_inputs(tmp_path, scenes("pipeline", 3, seed=0))
    render_arrivals(tmp_path / "incoming", 4, 3, 0)
    truth_log = [json.loads(line) for line in next((tmp_path / "incoming/.arrivals").glob("*.jsonl")).open()]
    assert ingest_inputs(tmp_path / "incoming", tmp_path / "data/pool")["images"] == 4
    cfg = PrepareInputs(source="folder", path=WORLD, texts_file="texts.jsonl", pool="data/pool")
    kept, quarantined = prepare(iter_source(cfg, tmp_path), cfg)
    assert not quarantined and len(kept) == 7
    table = inputs_table(kept)
    store.write_table(table, tmp_path / PATHS["inputs"], INPUTS_SCHEMA)

    with pytest.raises(ValueError, match="no true scene"):
        GroundTruth(ground_truth(tmp_path, WORLD), "i2t").score(table.column("input_id").to_pylist(),
                                                               [None] * 7, ["-"] * 7)
    truth = ground_truth(tmp_path, WORLD, "data/pool")
    assert sorted(truth) == sorted(table.column("input_id").to_pylist())
    by_file = {t["file"]: as_parsed(scene_from_record(t["objects"])) for t in truth_log}
    pooled = [r for r in table.to_pylist() if r["source"].startswith("pool/")]
    assert len(pooled) == 4
    for row in pooled:
        assert truth[row["input_id"]] == by_file[row["source"].split("/", 2)[2]]
        assert GroundTruth(truth, "i2t").score([row["input_id"]], [None], [row["caption"]]).tolist() == [1.0]


def test_ground_truth_params_are_checked():
    from cyclepref.config import BestOfN, EvaluateDownstream

    llava = {"name": "l", "path": "p", "family": "llava"}
    bon = {"n": [1, 2], "captioner": llava, "tasks": ["i2t"], "verifiers": ["reward", "random"]}
    assert BestOfN(**bon, evaluator="ground_truth", truth=WORLD, second_evaluator="reward").truth == WORLD
    for section, kw in ((BestOfN, bon), (EvaluateDownstream, {})):
        with pytest.raises(ValidationError, match="needs .*truth"):
            section(**kw, evaluator="ground_truth")
        with pytest.raises(ValidationError, match="only by evaluator ground_truth"):
            section(**kw, truth=WORLD)
        with pytest.raises(ValidationError, match="repeats the evaluator"):
            section(**kw, second_evaluator="reward")
        with pytest.raises(ValidationError):
            section(**kw, evaluator="random")
        with pytest.raises(ValidationError):
            section(**kw, evaluator="ground_truth", truth=WORLD, second_evaluator="ground_truth")
        with pytest.raises(ValidationError, match="clip"):
            section(**kw, evaluator="ground_truth", truth=WORLD, second_evaluator="clipscore")
    with pytest.raises(ValidationError, match="seeds"):
        EvaluateDownstream(seeds=[0, 0])
    with pytest.raises(ValidationError):
        EvaluateDownstream(seeds=[])


def test_best_of_n_stage_under_ground_truth(zoo, tmp_path, mlflow_uri):
    from cyclepref import stage
    from cyclepref.world.data import scenes
    from cyclepref.world.truth import caption_quality, image_quality
    from fixtures.downstream import sections
    from tasks import best_of_n as task

    make_world_root(tmp_path, zoo, scenes("pipeline", 3, seed=0))
    cfg = sections(zoo)["best_of_n"] | {"verifiers": ["reward", "random"], "evaluator": "ground_truth",
                                        "truth": WORLD, "second_evaluator": "reward", "bootstrap_samples": 500}
    write_downstream_params(tmp_path, zoo, best_of_n=cfg)
    pass_gates(tmp_path)
    stage.main("best_of_n", task.run)

    report = json.loads((tmp_path / "reports/downstream/best_of_n.json").read_text())
    assert report["evaluator"] == "ground_truth" and report["second_evaluator"] == "reward"
    assert report["interval"]["method"] == "percentile bootstrap over inputs" and "note" not in report
    assert "model-judged" in report["second_note"]
    truth = ground_truth(tmp_path, WORLD)
    for t in ("i2t", "t2i"):
        section = report["tasks"][t]
        assert section["inputs"] == 3 and section["judged_by"] == "ground truth"
        assert section["second_evaluator"]["judged_by"] == "model"
        table = pq.read_table(tmp_path / f"data/downstream/best_of_n/candidates_{t}.parquet").to_pylist()
        if t == "i2t":
            expect = [caption_quality(r["text"], truth[r["input_id"]]) for r in table]
        else:
            from cyclepref.inputs import decode_image

            expect = [image_quality(decode_image(r["image"]), truth[r["input_id"]]) for r in table]
        assert [r["score_ground_truth"] for r in table] == pytest.approx(expect)
        first = np.mean([r["score_ground_truth"] for r in table if r["j"] == 0])
        oracle_3 = np.mean([max(r["score_ground_truth"] for r in table if r["input_id"] == i) for i in truth])
        for v in ("reward", "random"):
            assert section["quality"][v]["1"] == pytest.approx(first)
            assert section["quality"][v]["3"] <= oracle_3 + 1e-9
            for n in ("1", "2", "3"):
                assert section["low"][v][n] <= section["quality"][v][n] <= section["high"][v][n]
        csv = (tmp_path / f"reports/downstream/best_of_n_{t}.csv").read_text().splitlines()
        assert csv[0] == "n,reward,random,reward_low,reward_high,random_low,random_high" and len(csv) == 4


def test_judge_reports_the_sft_baseline_and_dpo_minus_sft_paired():
    ids = [f"in{k}" for k in range(6)]
    table = {"x": 0.0, "y": 1.0, "z": 0.5}
    outcomes = Outcomes("i2t", ids, 1, [None] * 6, ["x"] * 6, [None] * 6, ["y", "y", "y", "z", "z", "z"],
                        [None] * 6, ["z"] * 6)
    report = judge(outcomes, ModelEvaluator(TableVerifier("reward", table)), n_boot=500)
    assert (report["before"], report["after"]) == (0.0, 0.75)
    sft, vs = report["sft_baseline"], report["dpo_vs_sft"]
    assert (sft["before"], sft["after"], sft["delta"]) == (0.0, 0.5, 0.5)
    assert (vs["before"], vs["after"]) == (0.5, 0.75) and vs["delta"] == pytest.approx(0.25)
    assert vs["delta_low"] <= vs["delta"] <= vs["delta_high"]
    plain = judge(Outcomes("i2t", ids, 1, [None] * 6, ["x"] * 6, [None] * 6, ["y"] * 6),
                  ModelEvaluator(TableVerifier("reward", table)), n_boot=100)
    assert "sft_baseline" not in plain


def test_beats_policy_keeps_pairs_whose_chosen_beats_the_policys_own_score(tmp_path):
    import pyarrow as pa

    from cyclepref import store
    from cyclepref.downstream.data import beats_policy, policy_scores
    from cyclepref.tables import PATHS, SCORES

    rows = [("i1", "c1", "policy", 0.4, "lower"), ("i1", "c2", "other", 0.2, "lower"),
            ("i2", "c3", "policy", 0.1, "lower"), ("i3", "c4", "other", 0.3, "lower")]
    table = pa.table({"task": ["i2t"] * 4, "input_id": [r[0] for r in rows], "candidate_id": [r[1] for r in rows],
                      "model": [r[2] for r in rows], "text": ["t"] * 4, "score": [r[3] for r in rows],
                      "metric": ["dreamsim"] * 4, "direction": [r[4] for r in rows]}, schema=SCORES)
    store.write_table(table, tmp_path / PATHS["i2t_scores"], SCORES)
    scores = policy_scores(tmp_path, "i2t", "policy")
    assert scores == {"i1": pytest.approx(-0.4), "i2": pytest.approx(-0.1)}  # distances, oriented

    class Pairs:
        input_ids = ("i1", "i1", "i2", "i3")

        def cycle_scores(self):
            return np.array([-0.2, -0.4, -0.05, -0.3]), np.zeros(4)

    # i1: -0.2 beats the policy's -0.4, -0.4 only ties it; i2: -0.05 beats -0.1; i3: the policy has no caption
    assert beats_policy(Pairs(), scores) == [0, 2]
    with pytest.raises(ValueError, match="among the i2t candidate models"):
        policy_scores(tmp_path, "i2t", "absent")
