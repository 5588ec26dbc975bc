"""The dpo_vlm, diffusion_dpo and evaluate_downstream stages on the tiny fixture: they train, save and log their
adapters, the adapters reload and generate, and the evaluation compares base and trained models on held-out inputs,
judged by the reward model or by ground truth (true scenes given to the fixture's inputs) with the reward beside."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pytest
import torch

from cyclepref.config import load_params
from fixtures.downstream import REWARD, WORLD, make_root, write_downstream_params, write_scenes
from fixtures.pipeline_tables import pass_gates


def _adapter_files(run_id: str) -> set[str]:
    """The files of the adapter the run logged as an MLflow logged model."""
    client = mlflow.MlflowClient()
    exp = client.get_run(run_id).info.experiment_id
    [model] = client.search_logged_models([exp], filter_string=f"source_run_id = '{run_id}'")
    assert model.model_type == "lora-adapter" and model.status == "READY"
    return {a.path for a in client.list_logged_model_artifacts(model.model_id)}


def test_dpo_stages_train_reload_and_evaluate(zoo, tmp_path, mlflow_uri):
    from cyclepref import stage
    from cyclepref.downstream.data import heldout_inputs
    from cyclepref.downstream.dpo_vlm import load_dpo_captioner
    from cyclepref.models.captioner import Captioner
    from tasks import diffusion_dpo, dpo_vlm, evaluate_downstream

    make_root(tmp_path, zoo)
    pass_gates(tmp_path)
    write_downstream_params(tmp_path, zoo)
    params = load_params(tmp_path / "params.yaml")

    summary = stage.main("dpo_vlm", dpo_vlm.run)
    report = json.loads((tmp_path / "reports/downstream/dpo_vlm.json").read_text())
    assert report["steps"] == 3 and report["train_pairs"] > 0 and report["valid_pairs"] > 0
    assert report["loss_type"] == ["sigmoid", "sft"] and report["sft_baseline"]["loss_type"] == ["sft"]
    assert (tmp_path / "data/downstream/dpo_vlm/sft/adapter_model.safetensors").exists()
    # the adapter starts as the identity: zero implicit reward margin, DPO term log 2 plus the chosen captions' NLL
    assert report["valid_before"]["rewards_margins"] == pytest.approx(0.0, abs=1e-6)
    assert report["valid_before"]["loss"] > np.log(2) + 1e-3
    assert report["reload_check"]["captions"] == 2
    assert {"adapter_model.safetensors", "adapter_config.json"} <= _adapter_files(summary["mlflow_run_id"])
    assert "train_loss" in mlflow.get_run(summary["mlflow_run_id"]).data.metrics

    held = heldout_inputs(tmp_path, "i2t", ["test", "valid"])
    base = Captioner(params.dpo_vlm.captioner)
    tuned = load_dpo_captioner(params.dpo_vlm.captioner, tmp_path / "data/downstream/dpo_vlm/adapter")
    inputs = base.processor(images=held.images[:1], text=[base._text], return_tensors="pt")
    with torch.no_grad():
        assert not torch.allclose(base.model(**inputs).logits, tuned.model(**inputs).logits)
    assert len(tuned.caption(held.images)) == len(held.images)

    summary = stage.main("diffusion_dpo", diffusion_dpo.run)
    report = json.loads((tmp_path / "reports/downstream/diffusion_dpo.json").read_text())
    # at the identity adapter the DPO term is log 2; the denoising term of the preferred images comes on top
    assert report["steps"] == 3 and report["train_loss_first"] > np.log(2) + 1e-4
    assert report["sft_baseline"]["steps"] == 3 and report["sft_baseline"]["dpo_weight"] == 0.0
    assert (tmp_path / "data/downstream/diffusion_dpo/sft/pytorch_lora_weights.safetensors").exists()
    assert report["valid_before"]["loss"] == pytest.approx(np.log(2), abs=1e-5)
    assert report["reload_check"]["images"] == 2
    assert "pytorch_lora_weights.safetensors" in _adapter_files(summary["mlflow_run_id"])

    summary = stage.main("evaluate_downstream", evaluate_downstream.run)
    report = json.loads((tmp_path / "reports/downstream/evaluate.json").read_text())
    assert report["evaluator"] == "reward" and "favours" in report["note"]
    for task in ("i2t", "t2i"):
        section = report["tasks"][task]
        assert section["n"] == 2 and section["heldout"] == "inputs with pairs in test+valid"
        assert section["delta"] == pytest.approx(section["after"] - section["before"])
        assert 0.0 <= section["win_rate"] <= 1.0 and section["changed"] >= 1
        assert section["judged_by"] == "model"
        for side in ("before", "after", "delta"):
            assert section[f"{side}_low"] <= section[side] <= section[f"{side}_high"]
        sft = section["sft_baseline"]
        assert sft["before"] == section["before"] and sft["delta"] == pytest.approx(sft["after"] - sft["before"])
        assert section["dpo_vs_sft"]["delta"] == pytest.approx(section["after"] - sft["after"])
    assert summary["t2i_n"] == 2
    _evaluate_under_ground_truth(tmp_path, zoo, params, held, report)


def _evaluate_under_ground_truth(root, zoo, params, held, reward_report):
    """True scenes for the fixture's inputs; before = the ground-truth F1 of the base models' outputs, recomputed."""
    from cyclepref import stage
    from cyclepref.cycle import Context, t2i_hash
    from cyclepref.downstream.data import heldout_inputs
    from cyclepref.downstream.evaluate import image_seeds
    from cyclepref.downstream.evaluators import ground_truth
    from cyclepref.inputs import INPUTS_SCHEMA
    from cyclepref.models import local_spec
    from cyclepref.models.captioner import Captioner, clean_caption
    from cyclepref.models.t2i import TextToImage
    from cyclepref.store import read_table
    from cyclepref.tables import PATHS
    from cyclepref.world.data import scenes
    from cyclepref.world.truth import caption_quality, image_quality
    from tasks import evaluate_downstream

    sources = read_table(root / PATHS["inputs"], INPUTS_SCHEMA).column("source").to_pylist()
    write_scenes(root, dict(zip(sources, scenes("pipeline", len(sources), seed=0), strict=True)))
    write_downstream_params(root, zoo, evaluate_downstream={
        "reward_model": REWARD, "batch_size": 4, "evaluator": "ground_truth", "truth": WORLD,
        "second_evaluator": "reward", "seeds": [0, 1], "bootstrap_samples": 500})
    stage.main("evaluate_downstream", evaluate_downstream.run)
    report = json.loads((root / "reports/downstream/evaluate.json").read_text())
    assert report["evaluator"] == "ground_truth" and report["second_evaluator"] == "reward"
    assert "favours" in report["note"]
    truth = ground_truth(root, WORLD)

    captions = [clean_caption(t) for t in Captioner(params.dpo_vlm.captioner).caption(held.images)]
    i2t = report["tasks"]["i2t"]
    assert i2t["judged_by"] == "ground truth"
    assert i2t["before"] == pytest.approx(np.mean([caption_quality(c, truth[i])
                                                   for c, i in zip(captions, held.input_ids, strict=True)]))
    beside = i2t["second_evaluator"]
    assert beside["name"] == "reward" and beside["judged_by"] == "model"
    assert (beside["before"], beside["after"]) == pytest.approx(
        (reward_report["tasks"]["i2t"]["before"], reward_report["tasks"]["i2t"]["after"]))

    prompts = heldout_inputs(root, "t2i", ["test", "valid"])
    spec = local_spec(root, params.diffusion_dpo.model)
    seeds = image_seeds(prompts.input_ids, t2i_hash(Context(root, "cpu"), spec), [0, 1])
    images = TextToImage(spec).generate([p for p in prompts.prompts for _ in range(2)], seeds)
    ids = [i for i in prompts.input_ids for _ in range(2)]
    t2i = report["tasks"]["t2i"]
    assert t2i["n"] == 2 and t2i["seeds"] == [0, 1]
    assert t2i["before"] == pytest.approx(np.mean([image_quality(im, truth[i])
                                                   for im, i in zip(images, ids, strict=True)]))
    for section in (i2t, t2i):
        assert section["delta"] == pytest.approx(section["after"] - section["before"])
        for side in ("before", "after", "delta"):
            assert section[f"{side}_low"] <= section[side] <= section[f"{side}_high"]
