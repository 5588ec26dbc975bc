import shutil
from pathlib import Path

import pytest
import yaml

from cyclepref.config import ParamsError, load_params, parse_params

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("path", ["params.yaml", "configs/default.yaml", "configs/tiny.yaml", "configs/paper.yaml",
                                  "configs/scale.yaml"])
def test_profiles_validate(path):
    params = load_params(ROOT / path)
    assert params.profile == ("default" if path == "params.yaml" else Path(path).stem)


def test_tiny_profile_keeps_the_default_world_models():
    default, tiny = load_params(ROOT / "configs/default.yaml"), load_params(ROOT / "configs/tiny.yaml")
    assert tiny.world.train == default.world.train
    assert default.prepare_inputs.path == default.world.inputs_dir == tiny.prepare_inputs.path


def test_scale_profile_is_the_default_with_ten_times_the_inputs_and_its_ablations():
    default = load_params(ROOT / "configs/default.yaml").model_dump()
    scale = load_params(ROOT / "configs/scale.yaml").model_dump()
    changed = {k for k in default.keys() | scale.keys() if default.get(k) != scale.get(k)}
    assert changed == {"profile", "world", "build_pairs", "scale_ablation"}
    assert scale["world"] == default["world"] | {"inputs": {"n": 10 * default["world"]["inputs"]["n"], "seed": 0}}
    assert scale["build_pairs"] == default["build_pairs"] | {"split": scale["build_pairs"]["split"]}
    captioners = [c["name"] for c in default["generate_i2t"]["captioners"]]
    assert sorted(scale["scale_ablation"]["captioners"]) == sorted(captioners)
    assert max(scale["scale_ablation"]["pairs"]) >= 10 * 2740 and min(scale["scale_ablation"]["pairs"]) <= 250


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


def test_reward_head_init_is_validated():
    data = _default()
    assert parse_params(data, "d.yaml").train_reward.model.head_init == "itm"
    del data["train_reward"]["model"]["head_init"]
    assert parse_params(data, "d.yaml").train_reward.model.head_init == "random"
    data["train_reward"]["model"]["head_init"] = "itm"
    data["train_reward"]["model"]["head_widths"] = [16, 1]
    with pytest.raises(ParamsError, match="train_reward.model.*every head width must be >= 2"):
        parse_params(data, "d.yaml")
    data["train_reward"]["model"]["head_init"] = "zeros"
    with pytest.raises(ParamsError, match="train_reward.model.head_init"):
        parse_params(data, "d.yaml")


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
    assert res.exit_code == 2 and "available: default, paper, scale, tiny" in res.output
    (tmp_path / "configs" / "broken.yaml").write_text("profile: broken\n")
    res = runner.invoke(app, ["profile", "use", "broken"])
    assert res.exit_code == 2 and "bootstrap_models: Field required" in res.output
    assert load_params(tmp_path / "params.yaml").profile == "paper"


BOUNDS = ("gt", "ge", "lt", "le")


def _numeric_leaves(annotation, metadata: list) -> list[tuple[type, list]]:
    """(int | float, constraints) of every number an annotation holds: through Optional, Annotated and the items
    of lists, tuples and dict values (a container's own constraints, such as min_length, are not the items')."""
    import types
    import typing

    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _numeric_leaves(args[0], metadata + list(args[1:]))
    if origin in (typing.Union, types.UnionType):
        return [leaf for a in args if a is not type(None) for leaf in _numeric_leaves(a, metadata)]
    if origin in (list, tuple):
        return [leaf for a in args if a is not Ellipsis for leaf in _numeric_leaves(a, [])]
    if origin is dict:
        return _numeric_leaves(args[1], [])
    return [(annotation, metadata)] if annotation in (int, float) else []


def _bounded(metadata: list) -> bool:
    flat = [m for item in metadata for m in [item, *getattr(item, "metadata", [])]]
    return any(getattr(m, b, None) is not None for m in flat for b in BOUNDS)


def test_every_number_in_the_schema_carries_its_constraint():
    import inspect

    from cyclepref import config

    unbounded = [
        f"{cls.__name__}.{name}"
        for cls in vars(config).values()
        if inspect.isclass(cls) and issubclass(cls, config.Section)
        for name, info in cls.model_fields.items()
        for _, meta in _numeric_leaves(info.annotation, list(info.metadata))
        if not _bounded(meta)
    ]
    assert unbounded == []


@pytest.mark.parametrize(
    ("path", "value", "reason"),
    [
        (("train_reward", "lr", "combo"), -2e-5, "greater than 0"),
        (("train_reward", "weight_decay", "combo"), -1.0, "greater than or equal to 0"),
        (("train_reward", "betas"), [0.9, 1.5], "less than 1"),
        (("generate_t2i", "seeds"), [0, -1], "greater than or equal to 0"),
        (("best_of_n", "n"), [0, 2], "greater than 0"),
        (("build_pairs", "split", "train"), 1.5, "less than or equal to 1"),
    ],
)
def test_profile_check_rejects_a_value_outside_its_constraint(tmp_path, monkeypatch, path, value, reason):
    from typer.testing import CliRunner

    from cyclepref.cli import app

    data = _default()
    section = data
    for key in path[:-1]:
        section = section[key]
    section[path[-1]] = value
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data))
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["profile", "check"])
    assert res.exit_code == 2
    assert ".".join(path) in res.output and reason in res.output


def test_world_ladders_must_increase():
    data = _default()
    data["world"]["train"]["captioner"]["steps"] = [300, 200]
    with pytest.raises(ParamsError, match="world.train.captioner.*strictly increasing"):
        parse_params(data)
