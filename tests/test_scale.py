"""The scale run's ablations (cyclepref.reward.scale, tasks.scale_ablation): nested subsets drawn by input, the
captioner pools, the epoch rule, and the whole command on pipeline tables with the tiny BLIP."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from fixtures.pipeline_tables import write_params
from fixtures.reward.tables import write_reward_tables
from test_reward_stage import write_benchmark

from cyclepref import stage
from cyclepref.config import ScaleAblation
from cyclepref.reward.data import ListPairSet
from cyclepref.reward.scale import (
    SubsetPairSet,
    SubsetSource,
    captioner_keep,
    epochs_for,
    first_inputs,
    input_order,
    plan,
    valid_keep,
)
from cyclepref.reward.synthetic import colour_pairs


def rows(n_inputs: int, per_input: int, task: str = "i2t", models=("a", "b")) -> list[dict]:
    return [{"pair_id": f"{task}-{i}-{j}", "task": task, "input_id": f"in-{i}", "preferred_model": models[j % 2],
             "rejected_model": models[(j + 1) % 2]} for i in range(n_inputs) for j in range(per_input)]


def test_subsets_are_nested_whole_inputs_in_a_seeded_order_independent_of_listing():
    table = rows(20, 3)
    small, large = first_inputs(table, 7, seed=0), first_inputs(table, 20, seed=0)
    assert len(small) == 9 and len(large) == 21 and small < large
    by_input = {}
    for r in table:
        by_input.setdefault(r["input_id"], set()).add(r["pair_id"])
    assert all(ids <= small or not ids & small for ids in by_input.values())
    assert first_inputs(list(reversed(table)), 7, seed=0) == small
    assert first_inputs(table, 7, seed=1) != small
    assert input_order(["x", "y", "z"], 3) == input_order(["z", "x", "y", "x"], 3)
    assert first_inputs(table, 1000, seed=0) == {r["pair_id"] for r in table}


def test_valid_cap_is_per_task_and_captioner_pools_keep_pairs_inside_the_pool():
    table = rows(10, 2, "i2t") + rows(10, 4, "t2i")
    keep = valid_keep(table, 5, seed=0)
    assert len([p for p in keep if p.startswith("i2t")]) == 6 and len([p for p in keep if p.startswith("t2i")]) == 8
    mixed = [{"pair_id": str(i), "task": t, "input_id": "x", "preferred_model": a, "rejected_model": b}
             for i, (t, a, b) in enumerate([("i2t", "a", "b"), ("i2t", "b", "c"), ("i2t", "c", "a"), ("t2i", "a", "b")])]
    assert captioner_keep(mixed, ["a", "b", "c"], 2) == {"0"}
    assert captioner_keep(mixed, ["c", "a", "b"], 2) == {"2"}
    assert captioner_keep(mixed, ["a", "b", "c"], 3) == {"0", "1", "2"}


def test_epochs_follow_the_pair_budget_within_bounds():
    assert epochs_for(250, 33000, 2, 12) == 12
    assert epochs_for(5000, 33000, 2, 12) == 7
    assert epochs_for(27500, 33000, 2, 12) == 2
    assert epochs_for(0, 33000, 2, 12) == 12


def test_subset_source_keeps_only_listed_pairs_with_their_cycle_scores():
    base = colour_pairs("i2t", 6, seed=1)
    base = ListPairSet("i2t", base.examples, (np.arange(6.0), -np.arange(6.0)))
    sub = SubsetPairSet(base, [4, 1])
    assert [sub.example(i).pair_id for i in range(2)] == [base.examples[4].pair_id, base.examples[1].pair_id]
    np.testing.assert_array_equal(sub.cycle_scores()[0], [4.0, 1.0])
    np.testing.assert_array_equal(sub.cycle_scores()[1], [-4.0, -1.0])

    table = SimpleNamespace(pair_ids=[e.pair_id for e in base.examples])
    kept = frozenset(table.pair_ids[:2])
    source = SubsetSource({("i2t", "train"): table}, {"train": kept}, "d")
    assert source.pairs("i2t", "train").indices == [0, 1]
    other = SubsetSource({("i2t", "train"): table}, {"train": frozenset(table.pair_ids[:3])}, "d")
    assert source.digest() != other.digest() and len(source.digest()) == 64


def test_plan_drops_sizes_that_already_hold_every_pair_and_checks_captioner_counts():
    cfg = ScaleAblation(pairs=[4, 9, 500], captioners=["a", "b"], captioner_counts=[2], pair_budget=10,
                        valid_pairs=2, benchmark="b.jsonl")
    runs = plan(rows(6, 3), cfg)
    assert [(r.name, len(r.keep)) for r in runs] == [("pairs-4", 6), ("pairs-9", 9), ("pairs-all-18", 18),
                                                     ("captioners-2", 18)]
    with pytest.raises(ValueError, match="captioner_counts"):
        ScaleAblation(pairs=[4, 9], captioners=["a", "b"], captioner_counts=[3], pair_budget=10, valid_pairs=2,
                      benchmark="b.jsonl")


@pytest.mark.slow
def test_scale_ablation_trains_scores_reports_and_skips_finished_runs(zoo, mlflow_uri, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pairs = write_reward_tables(tmp_path).to_pylist()
    bench = write_benchmark(tmp_path)
    cfg = {"pairs": [4, 9], "include_all": True, "captioners": ["cap-a", "cap-b", "cap-c"],
           "captioner_counts": [2], "pair_budget": 12, "min_epochs": 1, "max_epochs": 2, "valid_pairs": 2,
           "benchmark": bench}
    write_params(
        tmp_path,
        train_reward={"model": {"path": str(zoo / "tiny-blip-itm"), "max_length": 32}, "variants": ["combo"],
                      "lr": {"combo": 1e-3, "i2t": 1e-3}, "weight_decay": {"combo": 0.0, "i2t": 0.0},
                      "batch_size": 4, "grad_accum": 1, "validations_per_epoch": 1},
        evaluate_reward={"models": [{"name": "combo", "path": "data/reward/combo/model"}],
                         "clip": str(zoo / "tiny-open-clip"), "batch_size": 4,
                         "baselines": [{"name": "backbone-itc", "kind": "blip_itc", "path": str(zoo / "tiny-blip-itm")}]},
        scale_ablation=cfg,
    )
    from tasks import scale_ablation

    stage.main("scale_ablation", scale_ablation.run)
    report = json.loads((tmp_path / "reports/scale/ablation.json").read_text())
    train = [r for r in pairs if r["split"] == "train"]
    by_name = {r["run"]: r for r in report["runs"]}
    assert list(by_name) == ["pairs-4", "pairs-all-18", "captioners-2"]
    assert sum(by_name["pairs-4"]["train_pairs"].values()) == 9
    assert by_name["pairs-all-18"]["train_pairs"] == {"i2t": 6, "t2i": 12}
    in_pool = [r for r in train if r["task"] == "i2t" and {r["preferred_model"], r["rejected_model"]} <= {"cap-a", "cap-b"}]
    assert by_name["captioners-2"]["train_pairs"] == {"i2t": len(in_pool)} and 0 < len(in_pool) < 6
    assert [by_name[n]["epochs"] for n in by_name] == [2, 1, 2]
    for r in report["runs"]:
        assert set(r["benchmark"]) == ({"i2t", "t2i"} if r["variant"] == "combo" else {"i2t"})
        acc = r["benchmark"]["i2t"]
        assert acc["n"] == 4 and acc["ci95_low"] <= acc["accuracy"] <= acc["ci95_high"]
    refs = report["references"]
    assert refs["cycle"]["t2i"]["accuracy"] == 1.0 and {"clipscore", "backbone-itc", "random"} <= set(refs)
    md = (tmp_path / "reports/scale/ablation.md").read_text()
    assert "| 9 (3 + 6) | 2 |" in md and "reference: cycle" in md and "| 2 | " in md
    assert (tmp_path / "reports/scale/ablation.svg").read_text().lstrip().startswith("<?xml")

    import cyclepref.reward.train as train_module

    def refuse(*a, **k):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(train_module, "train_variant", refuse)
    stage.main("scale_ablation", scale_ablation.run)
    assert json.loads((tmp_path / "reports/scale/ablation.json").read_text()) == report
    write_params(tmp_path, **{**yaml.safe_load((tmp_path / "params.yaml").read_text()),
                              "scale_ablation": cfg | {"pair_budget": 40}})
    with pytest.raises(AssertionError, match="trained again"):
        stage.main("scale_ablation", scale_ablation.run)
