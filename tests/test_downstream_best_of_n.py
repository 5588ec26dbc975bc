"""Best-of-N: selection rule, N = 1 equals plain sampling / greedy decoding, per-item seeds, and the stage."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from cyclepref.config import CaptionerSpec, T2ISpec
from cyclepref.downstream.best_of_n import (
    Candidates,
    best_of_n,
    candidate_keys,
    decoding,
    pick,
    sample_captions,
    sample_images,
    score_candidates,
)
from cyclepref.models.captioner import clean_caption
from cyclepref.workstore import seed_of
from fixtures.downstream import heldout_ids, make_root, write_downstream_params
from fixtures.pipeline_tables import pass_gates
from test_downstream_losses import image


class TableVerifier:
    """Scores looked up by text (a stand-in verifier with known values)."""

    def __init__(self, name: str, values: dict[str, float]):
        self.name, self.values = name, values

    def score(self, images, texts) -> torch.Tensor:
        return torch.tensor([self.values[t] for t in texts])


def test_pick_takes_the_best_of_the_first_n_and_the_earliest_of_equals():
    scores = np.array([[0.1, 0.5, 0.5, 0.9], [0.3, 0.2, 0.1, 0.0]])
    assert pick(scores, 1).tolist() == [0, 0]
    assert pick(scores, 3).tolist() == [1, 0]
    assert pick(scores, 4).tolist() == [3, 0]
    with pytest.raises(ValueError):
        pick(scores, 5)


def test_best_of_n_curves_are_the_evaluator_score_of_each_verifiers_pick():
    texts = [["a", "b", "c"], ["d", "e", "f"]]
    cands = Candidates("i2t", ["x", "y"], [["k"] * 3] * 2, [[None] * 3] * 2, texts)
    quality = {"a": 0.0, "b": 1.0, "c": 2.0, "d": 3.0, "e": 1.0, "f": 5.0}
    other = {"a": 0.0, "b": 9.0, "c": 1.0, "d": 0.0, "e": 9.0, "f": 1.0}
    verifiers = {"q": TableVerifier("q", quality), "o": TableVerifier("o", other)}
    result = best_of_n(cands, score_candidates(cands, verifiers), ["q", "o"], "q", [1, 2, 3])
    assert result.curves["q"] == pytest.approx([1.5, 2.0, 3.5])
    assert result.curves["o"] == pytest.approx([1.5, 1.0, 1.0])
    assert [t for _, t in result.picked("o", 3)] == ["b", "e"]


def _llava(zoo) -> CaptionerSpec:
    return CaptionerSpec(name="tiny-llava", path=str(zoo / "tiny-llava"), family="llava", max_new_tokens=8)


def test_best_of_1_equals_plain_sampling_and_greedy_decoding(zoo):
    from cyclepref.models.captioner import Captioner

    captioner = Captioner(_llava(zoo))
    images, ids = [image(k) for k in range(3)], ["i0", "i1", "i2"]
    sample = decoding(1.0)
    cands = sample_captions(captioner, images, ids, "hash", sample, 3, batch_size=2)
    verifier = {"v": TableVerifier("v", {t: float(len(t)) for row in cands.texts for t in row})}
    result = best_of_n(cands, score_candidates(cands, verifier), ["v"], "v", [1, 3])
    first = [k[0] for k in candidate_keys(ids, "hash", sorted(sample.items()), 3)]
    plain = [clean_caption(captioner.caption([im], sample=sample, seeds=[seed_of(k)])[0])
             for im, k in zip(images, first, strict=True)]
    assert [t for _, t in result.picked("v", 1)] == plain
    assert len({t for row in cands.texts for t in row}) > 3  # sampling varies across candidates

    reordered = sample_captions(captioner, images[::-1], ids[::-1], "hash", sample, 2, batch_size=3)
    assert [row for row in reordered.texts[::-1]] == [row[:2] for row in cands.texts]

    greedy = sample_captions(captioner, images, ids, "hash", decoding(0.0), 2, batch_size=3)
    result = best_of_n(greedy, score_candidates(greedy, verifier | {"v": TableVerifier("v", {
        t: 0.0 for row in greedy.texts for t in row})}), ["v"], "v", [1])
    assert [t for _, t in result.picked("v", 1)] == [clean_caption(t) for t in captioner.caption(images)]


def test_best_of_1_images_equal_plain_generation(zoo):
    from cyclepref.models.t2i import TextToImage

    t2i = TextToImage(T2ISpec(name="tiny-sd", path=str(zoo / "tiny-sd"), family="sd", steps=2, guidance=7.5,
                              height=32, width=32))
    prompts, ids = ["a red car", "a cat"], ["i0", "i1"]
    cands = sample_images(t2i, prompts, ids, "hash", 2, batch_size=1)
    first = [k[0] for k in candidate_keys(ids, "hash", "images", 2)]
    plain = [t2i.generate([p], [seed_of(k)])[0] for p, k in zip(prompts, first, strict=True)]
    for (im, _), ref in zip(best_of_n(cands, {"v": np.zeros(cands.shape)}, ["v"], "v", [1]).picked("v", 1), plain,
                            strict=True):
        assert np.array_equal(np.asarray(im), np.asarray(ref))
    assert not np.array_equal(np.asarray(cands.images[0][0]), np.asarray(cands.images[0][1]))


def test_best_of_n_stage(zoo, tmp_path, mlflow_uri):
    import mlflow

    from cyclepref import stage
    from tasks import best_of_n as task

    make_root(tmp_path, zoo)
    pass_gates(tmp_path)
    write_downstream_params(tmp_path, zoo)
    summary = stage.main("best_of_n", task.run)

    report = json.loads((tmp_path / "reports/downstream/best_of_n.json").read_text())
    assert report["evaluator"] == "reward" and "upper" in report["note"]
    for t in ("i2t", "t2i"):
        section = report["tasks"][t]
        assert section["inputs"] == 2 and section["heldout"] == "inputs with pairs in test+valid"
        curves = section["quality"]
        assert set(curves) == {"reward", "cycle", "clipscore"}
        assert len({c["1"] for c in curves.values()}) == 1  # N = 1: every verifier keeps the first sample
        reward = [curves["reward"][str(n)] for n in (1, 2, 3)]
        assert reward == sorted(reward)  # the evaluator's own picks never get worse with N
        assert all(curves["reward"][str(n)] >= curves[v][str(n)] - 1e-9 for v in curves for n in (1, 2, 3))
        csv = (tmp_path / f"reports/downstream/best_of_n_{t}.csv").read_text().splitlines()
        names = ["reward", "cycle", "clipscore"]
        assert csv[0].split(",") == ["n", *names, *(f"{v}_{s}" for v in names for s in ("low", "high"))]
        assert len(csv) == 4
        assert section["judged_by"] == "model" and "second_evaluator" not in section
        for v in names:
            for n in ("1", "2", "3"):
                assert section["low"][v][n] <= curves[v][n] <= section["high"][v][n]
        table = pq.read_table(tmp_path / f"data/downstream/best_of_n/candidates_{t}.parquet")
        assert table.num_rows == 6 and sorted(set(table.column("input_id").to_pylist())) == heldout_ids(tmp_path)
        assert {"score_reward", "score_cycle", "score_clipscore"} <= set(table.column_names)
    run = mlflow.get_run(summary["mlflow_run_id"])
    assert run.data.metrics["i2t.reward.quality"] == pytest.approx(report["tasks"]["i2t"]["quality"]["reward"]["3"])
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "plots")}
    assert {"plots/best_of_n_i2t.png", "plots/best_of_n_t2i.png", "plots/best_of_n_i2t.csv"} <= artifacts


def test_heldout_inputs_are_the_test_and_valid_inputs_or_all_when_there_are_none(tmp_path):
    import pyarrow as pa

    from cyclepref import store
    from cyclepref.config import BuildPairs
    from cyclepref.downstream.data import heldout_inputs
    from cyclepref.pairs import build_pairs
    from cyclepref.tables import PAIRS, PATHS
    from fixtures.pipeline_tables import build_tables, write_tables

    tables = build_tables()
    write_tables(tmp_path, tables)
    pairs, _ = build_pairs(pa.concat_tables([tables["i2t_scores"], tables["t2i_scores"]]), BuildPairs())
    ids = sorted(tables["inputs"].column("input_id").to_pylist())
    for split_of, expect, source in (
        ({ids[2]: "test"}, [ids[2]], "inputs with pairs in test+valid"),
        ({}, ids, "all inputs (no pairs in test+valid)"),
    ):
        splits = [split_of.get(i, "train") for i in pairs.column("input_id").to_pylist()]
        table = pairs.set_column(pairs.schema.get_field_index("split"), "split", pa.array(splits, pa.string()))
        store.write_table(table, tmp_path / PATHS["pairs"], PAIRS)
        for task in ("i2t", "t2i"):
            held = heldout_inputs(tmp_path, task, ["test", "valid"])
            assert held.input_ids == expect and held.source == source
            assert len(held.images if task == "i2t" else held.prompts) == len(expect)
    assert heldout_inputs(tmp_path, "i2t", ["test", "valid"], max_inputs=2).input_ids == ids[:2]


def test_best_of_n_params_are_checked():
    from pydantic import ValidationError

    from cyclepref.config import BestOfN, DiffusionDpo, DpoVlm

    llava = {"name": "l", "path": "p", "family": "llava"}
    with pytest.raises(ValidationError, match="strictly increasing"):
        BestOfN(n=[1, 4, 2], captioner=llava, tasks=["i2t"], verifiers=["reward"])
    with pytest.raises(ValidationError, match="clip"):
        BestOfN(n=[1, 2], captioner=llava, tasks=["i2t"], verifiers=["clipscore"])
    with pytest.raises(ValidationError, match="t2i_model"):
        BestOfN(n=[1, 2], captioner=llava, verifiers=["reward"])
    lora = {"target_modules": ["q_proj"]}
    with pytest.raises(ValidationError, match="chat VLM"):
        DpoVlm(captioner={**llava, "family": "blip"}, lora=lora, lr=1e-5)
    sd3 = {"name": "s", "path": "p", "family": "sd3", "steps": 1, "guidance": 1.0, "height": 8, "width": 8}
    with pytest.raises(ValidationError, match="UNet"):
        DiffusionDpo(model=sd3, lora=lora, lr=1e-5)
