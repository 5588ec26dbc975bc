"""Hub models are pinned to a commit: the profile check refuses an unpinned one and the item keys use the revision."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cyclepref.config import CaptionerSpec, ParamsError, T2ISpec, parse_params
from cyclepref.profiles import require_pinned

ROOT = Path(__file__).resolve().parents[1]
SHA_A, SHA_B = "a" * 40, "b" * 40


def _paper() -> dict:
    return yaml.safe_load((ROOT / "configs/paper.yaml").read_text())


def _check(data: dict, root: Path = ROOT) -> None:
    require_pinned(parse_params(data, "paper.yaml"), "paper.yaml", root)


def test_every_hub_model_of_the_paper_profile_is_pinned_to_a_commit():
    _check(_paper())


@pytest.mark.parametrize(
    ("section", "edit", "named"),
    [
        ("generate_i2t", lambda s: s["captioners"][3].pop("revision"), "generate_i2t.captioners[3]"),
        ("generate_t2i", lambda s: s["models"][0].update(revision="main"), "generate_t2i.models[0]"),
        ("score_t2i", lambda s: s["metric"].pop("revision"), "score_t2i.metric"),
        ("train_reward", lambda s: s["model"].pop("revision"), "train_reward.model"),
        ("evaluate_reward", lambda s: s.update(clip=s["clip"].split("@")[0]), "evaluate_reward.clip"),
    ],
)
def test_an_unpinned_hub_model_is_refused_with_its_key(section, edit, named):
    data = _paper()
    edit(data[section])
    with pytest.raises(ParamsError) as err:
        _check(data)
    assert named in str(err.value)
    assert str(err.value).count("\n") == 1


def test_a_local_directory_needs_no_revision(tmp_path):
    data = _paper()
    (tmp_path / "llava-hf/llava-1.5-7b-hf").mkdir(parents=True)
    data["dpo_vlm"]["captioner"].pop("revision")
    _check(data, tmp_path)
    with pytest.raises(ParamsError, match="dpo_vlm.captioner"):
        _check(data)


def test_profile_check_exits_2_on_an_unpinned_model(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from cyclepref.cli import app

    data = _paper()
    data["reconstruct_t2i"]["captioner"].pop("revision")
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(data))
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(app, ["profile", "check", "p.yaml", "--dvc-file", str(ROOT / "dvc.yaml")])
    assert res.exit_code == 2
    assert "reconstruct_t2i.captioner: hub model llava-hf/llava-1.5-13b-hf needs" in res.output


def test_item_keys_name_the_revision(tmp_path):
    from cyclepref.cycle import Context, captioner_hash, t2i_hash

    ctx = Context(tmp_path)
    cap = CaptionerSpec(name="c", path="org/cap", family="llava", revision=SHA_A)
    t2i = T2ISpec(name="g", path="org/gen", family="sd", steps=2, guidance=1.0, height=8, width=8, revision=SHA_A)
    assert captioner_hash(ctx, cap, "p") != captioner_hash(ctx, cap.model_copy(update={"revision": SHA_B}), "p")
    assert t2i_hash(ctx, t2i) != t2i_hash(ctx, t2i.model_copy(update={"revision": SHA_B}))
    assert ctx.fingerprint("org/cap", SHA_A) == f"org/cap@{SHA_A}"


def test_a_pinned_open_clip_hub_id_is_read_at_its_commit(monkeypatch, tmp_path):
    import huggingface_hub

    from cyclepref.models.similarity import open_clip_ident

    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download",
                        lambda repo, revision: calls.append((repo, revision)) or str(tmp_path))
    assert open_clip_ident(f"hf-hub:timm/clip@{SHA_A}") == f"local-dir:{tmp_path}"
    assert open_clip_ident("hf-hub:timm/clip", revision=SHA_B) == f"local-dir:{tmp_path}"
    assert calls == [("timm/clip", SHA_A), ("timm/clip", SHA_B)]
    assert open_clip_ident("hf-hub:timm/clip") == "hf-hub:timm/clip"
