"""The DPO stages continue from a champion adapter (params `init_adapter`) on the tiny fixture: with a negligible
learning rate the saved adapter equals the one it started from (a fresh LoRA would not: zero B for dpo_vlm, a
gaussian init for diffusion_dpo), the report says what it started from, and a missing init folder (no champion yet)
means the base model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from cyclepref.config import load_params
from fixtures.downstream import make_root, write_downstream_params
from fixtures.pipeline_tables import pass_gates

CHAMPION = "data/champions/policy/adapter"


def _weights(folder: Path) -> dict:
    [file] = sorted(folder.glob("*.safetensors"))
    return load_file(file)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all((a[k] - b[k]).abs().max() < 1e-6 for k in a)


def _section(root: Path, stage: str, **update):
    params = load_params(root / "params.yaml")
    return getattr(params, stage).model_copy(update={"sft_baseline": False, "max_steps": 1, **update})


@pytest.fixture
def root(zoo, tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    make_root(tmp_path, zoo)
    pass_gates(tmp_path)
    write_downstream_params(tmp_path, zoo)
    return tmp_path


def _champion(root: Path, trained: Path) -> Path:
    import shutil

    dest = root / CHAMPION
    shutil.copytree(trained, dest)
    (dest / "champion.json").write_text(json.dumps({"registered_model": "cyclepref-policy", "version": "3"}))
    return dest


def test_dpo_vlm_continues_from_the_champion_adapter(root):
    from cyclepref.downstream.dpo_vlm import train_dpo_vlm

    first = train_dpo_vlm(_section(root, "dpo_vlm", max_steps=2), root, "cpu", root / "a1", root / "w1")
    assert first["started_from"] == "base"
    _champion(root, root / "a1")
    still = _section(root, "dpo_vlm", lr=1e-12, init_adapter=CHAMPION)
    report = train_dpo_vlm(still, root, "cpu", root / "a2", root / "w2")
    assert report["started_from"] == "cyclepref-policy version 3"
    assert _same(_weights(root / "a2"), _weights(root / "a1"))
    assert not any(p.is_dir() for p in (root / "a2").iterdir())  # trl's frozen reference copy is not saved


def test_diffusion_dpo_continues_from_the_champion_adapter(root):
    from cyclepref.downstream.diffusion_dpo import train_diffusion_dpo

    first = train_diffusion_dpo(_section(root, "diffusion_dpo", max_steps=2), root, "cpu", root / "a1")
    assert first["started_from"] == "base"
    _champion(root, root / "a1")
    still = _section(root, "diffusion_dpo", lr=1e-12, init_adapter=CHAMPION)
    report = train_diffusion_dpo(still, root, "cpu", root / "a2")
    assert report["started_from"] == "cyclepref-policy version 3"
    assert _same(_weights(root / "a2"), _weights(root / "a1"))
    assert report["valid_before"]["loss"] == pytest.approx(first["valid_after"]["loss"], abs=1e-5)


def test_a_missing_champion_folder_means_the_base_model(tmp_path):
    from cyclepref.downstream import started_from

    assert started_from(None) == "base" and started_from(tmp_path / "absent") == "base"
    (tmp_path / "adapter").mkdir()
    assert started_from(tmp_path / "adapter") == str(tmp_path / "adapter")
