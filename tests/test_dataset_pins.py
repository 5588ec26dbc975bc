"""Published data is pinned like models: every `datasets` entry of a profile carries a commit (hub datasets) or a
sha256 (archives), the profile check refuses one without, and the DCI archive is verified against the digest DCI's
download script publishes (facebookresearch/DCI dataset/densely_captioned_images/dataset/scripts/download.py)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import yaml
from fixtures.dci import write_dci

from cyclepref import inputs as inp
from cyclepref.config import ParamsError, PrepareInputs, parse_params
from cyclepref.profiles import require_pinned_datasets

ROOT = Path(__file__).resolve().parents[1]


def _paper() -> dict:
    return yaml.safe_load((ROOT / "configs/paper.yaml").read_text())


def _check(data: dict) -> None:
    require_pinned_datasets(parse_params(data, "paper.yaml"), "paper.yaml")


def test_the_paper_profile_pins_detailcaps_genai_bench_cycleprefdb_and_dci():
    data = _paper()
    _check(data)
    assert set(data["datasets"]) == {"detailcaps", "genai-bench", "cycleprefdb-i2t", "cycleprefdb-t2i", "dci"}
    assert {b["name"]: b.get("dataset") for b in data["evaluate_reward"]["benchmarks"]} == {
        "detailcaps": "detailcaps", "genai-bench": "genai-bench", "bundled": None}
    assert data["datasets"]["dci"]["sha256"] == inp.DCI_ARCHIVE_SHA256


@pytest.mark.parametrize(
    ("name", "edit", "message"),
    [
        ("detailcaps", lambda d: d.pop("revision"), "datasets.detailcaps: hub dataset foundation-multimodal-models/"),
        ("genai-bench", lambda d: d.update(revision="main"), "datasets.genai-bench: hub dataset zhiqiulin/"),
        ("cycleprefdb-i2t", lambda d: d.update(revision="435d914"), "datasets.cycleprefdb-i2t: hub dataset"),
        ("cycleprefdb-t2i", lambda d: d.pop("revision"), "datasets.cycleprefdb-t2i: hub dataset"),
        ("dci", lambda d: d.pop("sha256"), "datasets.dci: https://dl.fbaipublicfiles.com/"),
    ],
)
def test_an_unpinned_dataset_is_refused_with_its_key(name, edit, message):
    data = _paper()
    edit(data["datasets"][name])
    with pytest.raises(ParamsError) as err:
        _check(data)
    assert message in str(err.value) and str(err.value).count("\n") == 1


def test_a_benchmark_must_name_a_listed_dataset_and_a_pin_has_one_source():
    data = _paper()
    data["evaluate_reward"]["benchmarks"][0]["dataset"] = "detailcaps-v2"
    with pytest.raises(ParamsError, match="not in `datasets`: detailcaps-v2"):
        parse_params(data, "paper.yaml")
    data = _paper()
    data["datasets"]["dci"]["hub"] = "facebook/dci"
    with pytest.raises(ParamsError, match="either `hub`"):
        parse_params(data, "paper.yaml")


def test_profile_check_exits_2_on_an_unpinned_dataset(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from cyclepref.cli import app

    data = _paper()
    data["datasets"]["detailcaps"].pop("revision")
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(data))
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["profile", "check", "p.yaml", "--dvc-file", str(ROOT / "dvc.yaml")])
    assert res.exit_code == 2
    assert "datasets.detailcaps: hub dataset foundation-multimodal-models/DetailCaps-4870 needs" in res.output


def test_the_dci_archive_beside_the_release_is_verified_first(tmp_path, monkeypatch):
    write_dci(tmp_path)
    archive = tmp_path / "dci.tar.gz"
    archive.write_bytes(b"not the DCI release")
    cfg = PrepareInputs(source="dci", path="densely_captioned_images", split="train", min_side=8)
    with pytest.raises(ValueError, match=f"but DCI's download script publishes {inp.DCI_ARCHIVE_SHA256}"):
        list(inp.iter_source(cfg, tmp_path))
    monkeypatch.setattr(inp, "DCI_ARCHIVE_SHA256", hashlib.sha256(archive.read_bytes()).hexdigest())
    records, _ = inp.prepare(inp.iter_source(cfg, tmp_path), cfg)
    assert len(records) == 3
    archive.unlink()
    monkeypatch.undo()
    assert len(inp.prepare(inp.iter_source(cfg, tmp_path), cfg)[0]) == 3
