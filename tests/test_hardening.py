"""Issue 21: the preflight before DVC hashes anything, every gate a stage reads checked and work-store keys bound to
the inputs, serving refuses what it cannot score in one line, model paths resolved by `profile check` and model
load failures as one line."""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest
from fixtures.bad_inputs import decompression_bomb
from fixtures.pipeline_tables import build_tables, write_tables
from PIL import Image
from typer.testing import CliRunner

from cyclepref import cycle, gates, stage, store, tables
from cyclepref.cli import app
from cyclepref.config import ImageMetricSpec, load_params
from cyclepref.profiles import stage_deps
from cyclepref.reward import pyfunc
from cyclepref.tables import PATHS

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """A copy of the project's dvc.yaml and params.yaml in an empty folder, as the working directory."""
    for name in ("dvc.yaml", "params.yaml"):
        shutil.copy(ROOT / name, tmp_path / name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def hostile_inputs(project: Path) -> Path:
    """The default profile's input folder with one entry of each kind DVC cannot hash, and a good image."""
    folder = project / load_params(project / "params.yaml").prepare_inputs.path
    folder.mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(folder / "good.png")
    with open(os.path.join(os.fsencode(folder), b"caf\xff.png"), "wb") as f:
        f.write(b"x")
    (folder / "loop.png").symlink_to(folder / "loop.png")
    (folder / "gone.png").symlink_to(folder / "nowhere.png")
    os.mkfifo(folder / "x.png")
    return folder


# ---------------------------------------------------------------- 1: the preflight


def test_profile_check_and_repro_refuse_entries_dvc_cannot_hash_one_line_each(project):
    hostile_inputs(project)
    checked = CliRunner().invoke(app, ["profile", "check"])
    assert checked.exit_code == 2
    lines = [line.strip() for line in checked.output.splitlines() if line.startswith("  ")]
    assert len(lines) == 4, checked.output
    expected = {"caf\\xff.png": "not valid UTF-8", "loop.png": "symbolic link loop", "gone.png": "dangling",
                "x.png": "a FIFO"}
    for name, what in expected.items():
        [line] = [x for x in lines if x.startswith(f"data/world/inputs/{name}: ")]
        assert what in line and "; fix: " in line
    repro = CliRunner().invoke(app, ["repro"])
    assert repro.exit_code == 2 and "preflight: 4 entries" in repro.output
    assert not (project / ".dvc").exists() and not (project / "mlruns").exists()


def test_the_pipeline_flow_stops_at_the_preflight_as_a_config_error(project):
    from flows.pipeline import ConfigError, preflight

    hostile_inputs(project)
    with pytest.raises(ConfigError, match=r"preflight: 4 entries under the stages' deps"):
        preflight(project)
    for bad in ("caf\udcff.png", "loop.png", "gone.png", "x.png"):
        os.remove(project / "data/world/inputs" / bad)
    preflight(project)


def test_the_preflight_scans_the_deps_of_every_stage_with_params_filled_in(project):
    from cyclepref.preflight import stage_dep_paths

    deps = stage_dep_paths(project / "dvc.yaml", load_params(project / "params.yaml"))
    assert {"data/world/inputs", "data/prepared", "data/inputs/texts.jsonl", "data/i2t/scores",
            "cyclepref/world/train_clip.py", "data/world/models/clip"} <= set(deps)
    assert not any("${" in d for d in deps)


# ---------------------------------------------------------------- 3: every gate a stage reads


def test_each_stage_requires_the_gate_of_every_gated_table_among_its_deps():
    deps = stage_deps(ROOT / "dvc.yaml", load_params(ROOT / "params.yaml"))
    read = {name: set(gates.gates_read_by(d)) for name, d in deps.items()}
    assert read["score_i2t"] == {"inputs", "i2t_candidates", "i2t_reconstructions"}
    assert read["train_reward"] == {"pairs", "inputs", "i2t_candidates", "t2i_candidates"}
    assert read["build_pairs"] == {"i2t_scores", "t2i_scores"}
    assert read["prepare_inputs"] == set() and read["make_world"] == set()


def test_the_gates_a_stage_reads_run_before_it_in_the_dag():
    from dvc.repo import Repo

    with Repo(str(ROOT)) as repo:
        stages = {s.addressing: ([d.def_path for d in s.deps], [o.def_path for o in s.outs]) for s in repo.index.stages}
    producer = {out: name for name, (_, outs) in stages.items() for out in outs}

    def ancestors(name: str, seen: set[str]) -> set[str]:
        for dep in stages[name][0]:
            up = next((p for out, p in producer.items() if dep == out or dep.startswith(out + "/")), None)
            if up is not None and up not in seen:
                seen.add(up)
                ancestors(up, seen)
        return seen

    for name, (deps, _) in stages.items():
        if not name.startswith("gate@"):
            assert {f"gate@{g}" for g in gates.gates_read_by(deps)} <= ancestors(name, set()), name


def test_score_i2t_refuses_candidates_changed_behind_their_passed_gate(project):
    world = build_tables()
    write_tables(project, {k: world[k] for k in ("inputs", "i2t_candidates", "i2t_reconstructions")})
    for name in ("inputs", "i2t_candidates", "i2t_reconstructions"):
        report = {"gate": name, "success": True, "digest": store.table_digest(project / PATHS[name])}
        store.write_json(report, project / "reports/dq" / f"{name}.json")
    ran = []
    stage.require_gates("score_i2t", project, load_params(project / "params.yaml"))
    cands = world["i2t_candidates"]
    texts = cands.column("text").to_pylist()
    texts[0] = "a different caption"
    changed = cands.set_column(cands.schema.get_field_index("text"), "text", pa.array(texts, pa.string()))
    store.write_table(changed, project / PATHS["i2t_candidates"], tables.I2T_CANDIDATES)
    with pytest.raises(SystemExit, match=r"score_i2t: .*i2t_candidates.json is stale: gate i2t_candidates checked"):
        stage.main("score_i2t", lambda params, root: ran.append(1) or {})
    assert not ran


def llava(zoo):
    from cyclepref.config import CaptionerSpec

    return CaptionerSpec(name="tiny-llava", path=str(zoo / "tiny-llava"), family="llava", max_new_tokens=12)


def sd(zoo):
    from cyclepref.config import T2ISpec

    return T2ISpec(name="tiny-sd", path=str(zoo / "tiny-sd"), family="sd", steps=2, guidance=7.5, height=32, width=32)


def test_a_changed_caption_never_carries_the_score_of_the_old_text(zoo, tmp_path):
    from test_cycle import make_root

    root = make_root(tmp_path, ["astronaut", "coffee"])
    ctx = cycle.Context(root)
    metric = ImageMetricSpec(kind="open_clip", path=str(zoo / "tiny-open-clip"))
    cycle.generate_i2t(ctx, [llava(zoo)], batch_size=4)
    cycle.reconstruct_i2t(ctx, sd(zoo), batch_size=4)
    first = cycle.score_i2t(ctx, metric, 4)
    assert first["computed"] == 2
    cands = store.read_table(root / PATHS["i2t_candidates"], tables.I2T_CANDIDATES)
    texts = cands.column("text").to_pylist()
    texts[0] = "a bright green triangle on a wooden table"
    changed = cands.set_column(cands.schema.get_field_index("text"), "text", pa.array(texts, pa.string()))
    store.write_table(changed, root / PATHS["i2t_candidates"], tables.I2T_CANDIDATES)
    with pytest.raises(RuntimeError, match="1 caption.s. differ from the text their reconstruction was made from"):
        cycle.score_i2t(ctx, metric, 4)
    rec = cycle.reconstruct_i2t(ctx, sd(zoo), batch_size=4)
    assert (rec["computed"], rec["reused"]) == (1, 1)
    again = cycle.score_i2t(ctx, metric, 4)
    assert (again["computed"], again["reused"]) == (1, 1)
    scores = store.read_table(root / PATHS["i2t_scores"], tables.SCORES).to_pylist()
    assert scores[0]["text"] == texts[0]


# ---------------------------------------------------------------- 4: serving limits


def encoded(img: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def refusal(frame: pd.DataFrame) -> str:
    with pytest.raises(pyfunc.InvalidInput) as err:
        pyfunc.RewardPyfunc().predict(None, frame)
    message = err.value.message
    assert "\n" not in message and len(message) < 300
    return message


def test_serving_refuses_what_it_cannot_score_in_one_line_with_the_limit():
    limit = pyfunc.MAX_IMAGE_PIXELS
    for side in (15000, 100_000):
        message = refusal(pd.DataFrame({"image": [decompression_bomb(side)], "text": ["a"]}))
        assert message.startswith("row 0: image") and f"limit is {limit} pixels" in message
    big = encoded(Image.new("1", (4097, 4097)), "PNG")
    assert f"4097x4097 = {4097 * 4097} pixels; the limit is {limit} pixels" in refusal(
        pd.DataFrame({"image": [big], "text": ["a"]}))
    tiff = encoded(Image.new("RGB", (8, 8)), "TIFF")
    assert "not a PNG or JPEG file" in refusal(pd.DataFrame({"image": [tiff], "text": ["a"]}))
    png = encoded(Image.new("RGB", (8, 8)), "PNG")
    long_text = "word " * 2_000_000
    message = refusal(pd.DataFrame({"image": [png, png], "text": ["fine", long_text]}))
    assert message == f"row 1: text has {len(long_text)} characters; the limit is {pyfunc.MAX_TEXT_CHARS} characters"
    secret = "a caption that must not be echoed"
    message = refusal(pd.DataFrame({"picture": [png], "caption": [secret]}))
    assert "missing ['image', 'text']" in message and secret not in message


def test_a_request_may_lower_the_limits_never_raise_them():
    assert pyfunc.limits({"max_text_chars": 10**9}) == pyfunc.LIMITS
    assert pyfunc.limits({"max_text_chars": 5})["max_text_chars"] == 5
    png = encoded(Image.new("RGB", (8, 8)), "PNG")
    with pytest.raises(pyfunc.InvalidInput, match="the limit is 2 characters"):
        pyfunc.RewardPyfunc().predict(None, pd.DataFrame({"image": [png], "text": ["abc"]}), {"max_text_chars": 2})


def test_the_signature_states_the_limits_and_formats():
    sig = pyfunc.signature()
    params = {p.name: p.default for p in sig.params.params}
    assert params == {"max_image_pixels": pyfunc.MAX_IMAGE_PIXELS, "max_text_chars": pyfunc.MAX_TEXT_CHARS,
                      "image_formats": "PNG,JPEG"}
    readme = (ROOT / "README.md").read_text()
    assert f"{pyfunc.MAX_IMAGE_PIXELS:,}" in readme and f"{pyfunc.MAX_TEXT_CHARS:,}" in readme


# ---------------------------------------------------------------- 5: model paths


def test_profile_check_says_not_found_for_a_missing_local_model(project):
    (project / "models").mkdir()
    (project / "data/world/models/captioner").mkdir(parents=True)
    params = (project / "params.yaml").read_text()
    params = params.replace("path: data/world/models/t2i/step-10000", "path: models/captioner-typo", 1)
    params = params.replace("path: data/world/models/captioner/step-800", "path: data/world/models/captioner/typo", 1)
    (project / "params.yaml").write_text(params)
    checked = CliRunner().invoke(app, ["profile", "check"])
    assert checked.exit_code == 2
    assert "unpinned" not in checked.output
    assert "reconstruct_i2t.model.path: local model path models/captioner-typo not found" in checked.output
    assert "local model path data/world/models/captioner/typo not found" in checked.output


def test_a_hub_like_path_without_a_local_folder_is_named_both_ways(project):
    params = (project / "params.yaml").read_text()
    (project / "params.yaml").write_text(params.replace("path: data/world/models/t2i/step-10000", "path: org/typo", 1))
    checked = CliRunner().invoke(app, ["profile", "check"])
    assert checked.exit_code == 2
    assert "hub model org/typo needs `revision" in checked.output and "org/typo not found" in checked.output


def test_a_model_that_fails_to_load_stops_the_stage_with_one_line(project, mlflow_uri, capsys):
    from cyclepref.models import locate

    (project / "models").mkdir()
    with pytest.raises(SystemExit) as stop:
        stage.main("prepare_inputs", lambda params, root: {"x": locate("models/captioner-typo")})
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("prepare_inputs: models/captioner-typo: no such local model directory")
