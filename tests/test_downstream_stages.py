"""The dpo_vlm, diffusion_dpo and evaluate_downstream stages on the tiny fixture: they train, save and log their
adapters, the adapters reload and generate, and the evaluation compares base and trained models on held-out inputs."""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pytest
import torch

from cyclepref.config import load_params
from fixtures.downstream import make_root, write_downstream_params


def _artifacts(run_id: str, path: str) -> set[str]:
    return {a.path for a in mlflow.MlflowClient().list_artifacts(run_id, path)}


def test_dpo_stages_train_reload_and_evaluate(zoo, tmp_path, mlflow_uri):
    from cyclepref import stage
    from cyclepref.downstream.data import heldout_inputs
    from cyclepref.downstream.dpo_vlm import load_dpo_captioner
    from cyclepref.models.captioner import Captioner
    from tasks import diffusion_dpo, dpo_vlm, evaluate_downstream

    make_root(tmp_path, zoo)
    write_downstream_params(tmp_path, zoo)
    params = load_params(tmp_path / "params.yaml")

    summary = stage.main("dpo_vlm", dpo_vlm.run)
    report = json.loads((tmp_path / "reports/downstream/dpo_vlm.json").read_text())
    assert report["steps"] == 3 and report["train_pairs"] > 0 and report["valid_pairs"] > 0
    assert report["valid_before"]["loss"] == pytest.approx(np.log(2), abs=1e-5)  # adapter starts as identity
    assert report["reload_check"]["captions"] == 2
    assert {"adapter/adapter_model.safetensors", "adapter/adapter_config.json"} <= _artifacts(
        summary["mlflow_run_id"], "adapter")
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
    assert report["steps"] == 3 and report["train_loss_first"] == pytest.approx(np.log(2), abs=1e-5)
    assert report["valid_before"]["loss"] == pytest.approx(np.log(2), abs=1e-5)
    assert report["reload_check"]["images"] == 2
    assert "adapter/pytorch_lora_weights.safetensors" in _artifacts(summary["mlflow_run_id"], "adapter")

    summary = stage.main("evaluate_downstream", evaluate_downstream.run)
    report = json.loads((tmp_path / "reports/downstream/evaluate.json").read_text())
    assert report["evaluator"] == "reward" and "favours" in report["note"]
    for task in ("i2t", "t2i"):
        section = report["tasks"][task]
        assert section["n"] == 2 and section["heldout"] == "inputs with pairs in test+valid"
        assert section["delta"] == pytest.approx(section["after"] - section["before"])
        assert 0.0 <= section["win_rate"] <= 1.0 and section["changed"] >= 1
    assert summary["t2i_n"] == 2
