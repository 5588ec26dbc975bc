"""Issue 12, defects 6-9: gate reports bound to the table they checked, stages check what they publish, profiles
hold every section their stages read, clear one-line CLI errors, out of memory is not retried, `make clean` keeps
the registry, and the reward loader refuses a foreign model before loading any of it."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pyarrow as pa
import pytest
import yaml
from fixtures.pipeline_tables import build_tables, write_params, write_tables
from typer.testing import CliRunner

from cyclepref import cycle, gates, store, tables
from cyclepref.cli import app
from cyclepref.config import BuildPairs, Gates, TextMetricSpec
from cyclepref.tables import PATHS

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- 6: gates bound to their table


def test_a_table_changed_after_its_gate_passed_is_refused_as_stale(tmp_path, mlflow_uri):
    from tasks import build_pairs as build_stage
    from tasks import gate

    world = build_tables()
    write_tables(tmp_path, {k: world[k] for k in ("i2t_candidates", "t2i_candidates", "i2t_scores", "t2i_scores")})
    write_params(tmp_path, build_pairs=BuildPairs().model_dump(mode="json"), gates=Gates().model_dump(mode="json"))
    for name in ("i2t_scores", "t2i_scores"):
        gate.main([name])
    scores = world["i2t_scores"]
    changed = scores.set_column(scores.schema.get_field_index("score"), "score",
                                pa.array([5.0] * scores.num_rows, pa.float64()))
    store.write_table(changed, tmp_path / PATHS["i2t_scores"], tables.SCORES)
    with pytest.raises(SystemExit, match=r"build_pairs: .*i2t_scores.json is stale: gate i2t_scores checked"):
        build_stage.main()
    assert not (tmp_path / PATHS["pairs"]).exists()
    with pytest.raises(SystemExit):
        gate.main(["i2t_scores"])
    report = json.loads((tmp_path / "reports/dq/i2t_scores.json").read_text())
    assert report["digest"] == store.table_digest(tmp_path / PATHS["i2t_scores"]) and not report["success"]
    gate_report = {"success": True}
    (tmp_path / "reports/dq/t2i_scores.json").write_text(json.dumps(gate_report))
    with pytest.raises(gates.GateFailed, match="no digest"):
        gates.require_passed(tmp_path / "reports/dq", {"t2i_scores": tmp_path / PATHS["t2i_scores"]})


def test_a_stage_republishing_from_its_work_store_checks_the_contract(tmp_path):
    world = build_tables()
    write_tables(tmp_path, {k: world[k] for k in ("inputs", "t2i_reconstructions")})
    ctx = cycle.Context(tmp_path)
    metric = TextMetricSpec(path="no-such-model")
    metric_hash = cycle.key_of("metric", metric.kind, ctx.fingerprint(metric.path, None))
    recs = world["t2i_reconstructions"].to_pylist()
    prompts = {r["input_id"]: r["prompt"] for r in world["inputs"].to_pylist()}
    keys = [cycle.key_of(r["candidate_id"], r["text"], prompts.get(r["input_id"], ""), metric_hash) for r in recs]
    scores = [0.5] * len(keys)
    scores[3] = float("nan")
    ctx.work("score_t2i", cycle.SCORE_ROWS).add(pa.table({"key": keys, "score": scores}, schema=cycle.SCORE_ROWS))
    with pytest.raises(ValueError, match="refusing to publish t2i_scores: 1 non-finite score"):
        cycle.score_t2i(ctx, metric, batch_size=4)
    assert not (tmp_path / PATHS["t2i_scores"]).exists()


def test_contract_refuses_repeated_keys_and_nulls():
    world = build_tables()
    pairs_like = world["i2t_scores"]
    with pytest.raises(tables.ContractError, match="key.s. repeated"):
        tables.conform_to_contract("i2t_scores", pa.concat_tables([pairs_like, pairs_like.slice(0, 1)]))
    nulls = pairs_like.set_column(1, "input_id", pa.nulls(pairs_like.num_rows, pa.string()))
    with pytest.raises(tables.ContractError, match="refusing to publish i2t_scores: .*'input_id'"):
        tables.conform_to_contract("i2t_scores", nulls)


# ---------------------------------------------------------------- 7: profiles hold every section their stages read


def _project(tmp_path, monkeypatch, drop: tuple[str, ...]) -> Path:
    shutil.copy(ROOT / "dvc.yaml", tmp_path / "dvc.yaml")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({k: v for k, v in params.items() if k not in drop}))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_profile_check_requires_every_section_the_stages_read(tmp_path, monkeypatch):
    _project(tmp_path, monkeypatch, drop=("score_t2i", "gates"))
    result = CliRunner().invoke(app, ["profile", "check"])
    assert result.exit_code == 2, result.output
    assert "score_t2i: read by score_t2i" in result.output
    assert "gates: read by gate@inputs, gate@i2t_candidates" in result.output
    assert "Traceback" not in result.output


def test_a_stage_whose_section_is_missing_exits_2_with_one_line(tmp_path, monkeypatch, capsys):
    from cyclepref import stage
    from tasks import build_pairs as build_stage

    _project(tmp_path, monkeypatch, drop=("build_pairs",))
    with pytest.raises(SystemExit) as exit_info:
        stage.main("build_pairs", build_stage.run)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "build_pairs: read by build_pairs" in err


def test_stage_sections_come_from_dvc_yaml_with_foreach_expanded(tmp_path):
    from cyclepref.profiles import stage_sections

    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "make_world": {"cmd": "x", "params": ["world.inputs", "world.inputs_dir"]},
        "train_world": {"foreach": ["captioner", "clip"],
                        "do": {"cmd": "x", "params": ["world.train.seed", "world.train.${item}"]}},
        "gate": {"foreach": {"inputs": {"table": "t"}}, "do": {"cmd": "x", "params": ["gates.${key}"]}},
        "best_of_n": {"cmd": "x", "params": ["best_of_n", "score_i2t.metric", {"params.yaml": ["dpo_vlm.lr"]},
                                             {"other.yaml": ["elsewhere"]}]},
        "plain": {"cmd": "x"},
    }}))
    assert stage_sections(tmp_path / "dvc.yaml") == {
        "make_world": {"world"}, "train_world@captioner": {"world"}, "train_world@clip": {"world"},
        "gate@inputs": {"gates"}, "best_of_n": {"best_of_n", "score_i2t", "dpo_vlm"}, "plain": set(),
    }


@pytest.mark.parametrize("profile", ["params.yaml", *sorted(p.relative_to(ROOT).as_posix()
                                                             for p in (ROOT / "configs").glob("*.yaml"))])
def test_bundled_profiles_hold_every_section_their_stages_read(profile):
    from cyclepref.config import load_params
    from cyclepref.profiles import missing_sections

    assert missing_sections(load_params(ROOT / profile), ROOT / "dvc.yaml") == {}


# ---------------------------------------------------------------- 8: CLI paths, out of memory, make clean


def test_score_with_a_bad_model_path_or_jsonl_exits_2_with_one_line(tmp_path):
    from PIL import Image

    image = tmp_path / "x.png"
    Image.new("RGB", (8, 8)).save(image)
    runner = CliRunner()
    result = runner.invoke(app, ["score", str(image), "-t", "a cat", "-m", str(tmp_path / "no-model")])
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)
    assert "no-model: no such model directory" in result.output and len(result.output.strip().splitlines()) == 1
    result = runner.invoke(app, ["score", "--jsonl", str(tmp_path / "missing.jsonl"), "-m", "x"])
    assert result.exit_code == 2 and "missing.jsonl: cannot read" in result.output
    (tmp_path / "bad.jsonl").write_text('{"image": "x.png", "text": "a"}\n{oops\n')
    result = runner.invoke(app, ["score", "--jsonl", str(tmp_path / "bad.jsonl"), "-m", "x"])
    assert result.exit_code == 2 and "bad.jsonl:2: not valid JSON" in result.output


@pytest.mark.parametrize("output", [
    "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB\nERROR: failed to reproduce 'x'",
    "RuntimeError: CUDA out of memory. Tried to allocate 20.00 MiB\n",
    "MemoryError: Unable to allocate 40.0 GiB for an array\n",
])
def test_out_of_memory_is_a_permanent_failure(tmp_path, output):
    from flows.pipeline import classify

    err = classify("train_reward", 1, output, tmp_path)
    assert not err.transient and err.kind == "out of memory" and "batch_size" in str(err)


def test_make_clean_keeps_the_registry_and_clean_all_removes_it():
    def recipe(target: str) -> str:
        return subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True, check=True).stdout

    assert "data/work" in recipe("clean")
    assert "mlflow.db" not in recipe("clean") and "mlruns" not in recipe("clean")
    assert "mlflow.db" in recipe("clean-all") and "mlruns" in recipe("clean-all")
    readme = (ROOT / "README.md").read_text()
    assert "`make clean-all` removes the registry too" in readme


# ---------------------------------------------------------------- 9: the reward loader checks before loading


def test_a_foreign_pickled_pyfunc_is_refused_before_anything_is_loaded(tmp_path, monkeypatch):
    import mlflow

    from cyclepref.reward.pyfunc import load_reward_model

    marker = tmp_path / "loaded"

    class Foreign(mlflow.pyfunc.PythonModel):
        def load_context(self, context):
            marker.write_text("foreign code ran")

        def predict(self, context, model_input, params=None):
            return model_input

    mlflow.pyfunc.save_model(tmp_path / "foreign", python_model=Foreign())
    marker.unlink(missing_ok=True)
    monkeypatch.setenv("CYCLEPREF_MLFLOW_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    with pytest.raises(Exception, match="not a cyclepref reward model") as refused:
        load_reward_model(str(tmp_path / "foreign"))
    assert not marker.exists(), "the foreign model was unpickled and its code ran"
    assert "a pickled python model" in str(refused.value) and str(refused.value).endswith("nothing was loaded")
