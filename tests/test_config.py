import shutil
from pathlib import Path

import pytest
import yaml

from cyclepref.config import ParamsError, load_params, parse_params

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", ["params.yaml", "configs/default.yaml", "configs/tiny.yaml", "configs/paper.yaml"])
def test_profiles_validate(path):
    params = load_params(ROOT / path)
    assert params.profile == ("default" if path == "params.yaml" else Path(path).stem)


def test_tiny_profile_keeps_the_default_world_models():
    default, tiny = load_params(ROOT / "configs/default.yaml"), load_params(ROOT / "configs/tiny.yaml")
    assert tiny.world.train == default.world.train
    assert default.prepare_inputs.path == default.world.inputs_dir == tiny.prepare_inputs.path


def test_params_yaml_is_the_default_profile():
    assert (ROOT / "params.yaml").read_text() == (ROOT / "configs/default.yaml").read_text()


def test_paper_profile_has_the_papers_models_and_settings():
    p = load_params(ROOT / "configs/paper.yaml")
    assert len(p.generate_i2t.captioners) == 11
    assert {c.max_new_tokens for c in p.generate_i2t.captioners} == {77}
    assert p.reconstruct_i2t.model.family == "sd3" and p.reconstruct_i2t.model.steps == 50
    assert p.reconstruct_i2t.model.guidance == 7.5 and p.reconstruct_i2t.model.height == 1024
    assert len(p.generate_t2i.models) * len(p.generate_t2i.seeds) == 12
    flux = next(m for m in p.generate_t2i.models if m.family == "flux")
    assert (flux.steps, flux.guidance) == (4, 0.0)
    assert p.score_i2t.metric.kind == "dreamsim" and p.score_t2i.metric.kind == "sbert"
    assert p.reconstruct_t2i.captioner.path == "llava-hf/llava-1.5-13b-hf"


def _default() -> dict:
    return yaml.safe_load((ROOT / "configs/default.yaml").read_text())


def test_broken_params_name_the_key_and_reason():
    data = _default()
    data["generate_i2t"]["captioners"][0]["max_new_tokens"] = -3
    data["prepare_inputs"]["sourse"] = "folder"
    with pytest.raises(ParamsError) as err:
        parse_params(data, "broken.yaml")
    msg = str(err.value)
    assert "broken.yaml" in msg
    assert "generate_i2t.captioners.0.max_new_tokens" in msg and "greater than 0" in msg and "-3" in msg
    assert "prepare_inputs.sourse" in msg and "Extra inputs are not permitted" in msg


def test_missing_section_and_bad_literal_are_reported():
    data = _default()
    del data["prepare_inputs"]
    data["score_i2t"]["metric"]["kind"] = "ssim"
    with pytest.raises(ParamsError) as err:
        parse_params(data)
    msg = str(err.value)
    assert "prepare_inputs: Field required" in msg
    assert "score_i2t.metric.kind" in msg and "'ssim'" in msg


def test_duplicate_model_names_and_seeds_rejected():
    data = _default()
    data["generate_i2t"]["captioners"].append(dict(data["generate_i2t"]["captioners"][0]))
    with pytest.raises(ParamsError, match="model names must be unique, repeated: world-cap-200"):
        parse_params(data)
    data = _default()
    data["generate_t2i"]["seeds"] = [0, 0]
    with pytest.raises(ParamsError, match="seeds must be distinct"):
        parse_params(data)


def test_invalid_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("profile: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)
    with pytest.raises(ParamsError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ParamsError, match="expected a mapping"):
        load_params(bad)


def test_profile_use_switches_and_validates(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from cyclepref.cli import app

    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    res = runner.invoke(app, ["profile", "use", "paper"])
    assert res.exit_code == 0, res.output
    assert load_params(tmp_path / "params.yaml").profile == "paper"
    res = runner.invoke(app, ["profile", "use", "nonexistent"])
    assert res.exit_code == 2 and "available: default, paper, tiny" in res.output
    (tmp_path / "configs" / "broken.yaml").write_text("profile: broken\n")
    res = runner.invoke(app, ["profile", "use", "broken"])
    assert res.exit_code == 2 and "bootstrap_models: Field required" in res.output
    assert load_params(tmp_path / "params.yaml").profile == "paper"
