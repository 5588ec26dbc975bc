"""The cycle stages on the tiny models: batching, resume, per-item seeds, dedup, incremental runs, directions."""

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from cyclepref import cycle, store, tables
from cyclepref.config import CaptionerSpec, ImageMetricSpec, PrepareInputs, T2ISpec, TextMetricSpec
from cyclepref.inputs import decode_image, inputs_table, prepare, INPUTS_SCHEMA, iter_source
from cyclepref.scoring import better, oriented
from cyclepref.workstore import key_of, seed_of

ROOT = Path(__file__).resolve().parents[1]
STEMS = ["astronaut", "coffee", "rocket"]


def make_root(tmp: Path, stems=STEMS) -> Path:
    """A project root holding prepared inputs for the given bundled photos."""
    src = tmp / "src"
    (src / "images").mkdir(parents=True)
    rows = [json.loads(line) for line in (ROOT / "data/inputs/texts.jsonl").read_text().splitlines()]
    keep = [r for r in rows if Path(r["file"]).stem in stems]
    for r in keep:
        shutil.copy(ROOT / "data/inputs" / r["file"], src / r["file"])
    (src / "texts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in keep))
    cfg = PrepareInputs(source="folder", path="src", texts_file="texts.jsonl")
    records, _ = prepare(iter_source(cfg, tmp), cfg)
    store.write_table(inputs_table(records), tmp / tables.PATHS["inputs"], INPUTS_SCHEMA)
    return tmp


def llava(zoo, name="tiny-llava", **kw):
    return CaptionerSpec(name=name, path=str(zoo / "tiny-llava"), family="llava", max_new_tokens=12, **kw)


def blip(zoo):
    return CaptionerSpec(name="tiny-blip", path=str(zoo / "tiny-blip"), family="blip", max_new_tokens=12)


def sd(zoo, name="tiny-sd", family="sd", d="tiny-sd"):
    return T2ISpec(name=name, path=str(zoo / d), family=family, steps=2, guidance=7.5, height=32, width=32)


def shard_bytes(path: Path) -> list[bytes]:
    return [p.read_bytes() for p in sorted(path.glob("*.parquet"))]


# ---------------------------------------------------------------- batched == per item


def test_captioner_batched_equals_single(zoo):
    from cyclepref.models.captioner import Captioner

    images = [decode_image((ROOT / f"data/inputs/images/{s}.jpg").read_bytes()) for s in STEMS]
    for spec in (llava(zoo), blip(zoo)):
        cap = Captioner(spec)
        assert cap.caption(images, batch_size=3) == [cap.caption([im])[0] for im in images]


def test_text_to_image_batched_equals_single_within_tolerance(zoo):
    from cyclepref.models.t2i import TextToImage

    for spec in (sd(zoo), sd(zoo, "tiny-sd3", "sd3", "tiny-sd3")):
        model = TextToImage(spec)
        prompts, seeds = ["a cat", "a red car", "a cat"], [5, 6, 7]
        batched = model.generate(prompts, seeds, batch_size=3)
        single = [model.generate([p], [s])[0] for p, s in zip(prompts, seeds)]
        for a, b in zip(batched, single):
            assert np.abs(np.asarray(a, int) - np.asarray(b, int)).max() <= 2
        assert np.abs(np.asarray(batched[0], int) - np.asarray(batched[2], int)).mean() > 5


def test_similarities_batched_equal_single(zoo):
    from cyclepref.models.similarity import ImageSimilarity, TextSimilarity

    images = [decode_image((ROOT / f"data/inputs/images/{s}.jpg").read_bytes()) for s in STEMS]
    sim = ImageSimilarity(ImageMetricSpec(kind="open_clip", path=str(zoo / "tiny-open-clip")))
    batched = sim.embed(images, batch_size=3)
    single = torch.cat([sim.embed([im]) for im in images])
    assert torch.allclose(batched, single, atol=1e-5)
    text = TextSimilarity(TextMetricSpec(path=str(zoo / "all-MiniLM-L6-v2")))
    texts = ["a cat", "a much longer sentence about a dog in a park", "x"]
    assert torch.allclose(text.embed(texts, 3), torch.cat([text.embed([t]) for t in texts]), atol=1e-5)


# ---------------------------------------------------------------- keys and seeds


def test_item_keys_and_seeds_depend_on_identity_not_position():
    a = key_of("input-1", "model", "prompt", 0, "gen")
    assert a == key_of("input-1", "model", "prompt", 0, "gen")
    assert len({a, key_of("input-2", "model", "prompt", 0, "gen"), key_of("input-1", "model", "prompt", 1, "gen"),
                key_of("input-1", "model", "prompt", 0, "gen2")}) == 4
    assert seed_of(a) == seed_of(a) and 0 <= seed_of(a) < 2**63


def test_t2i_candidates_do_not_depend_on_which_other_inputs_exist(zoo, tmp_path):
    full = make_root(tmp_path / "full")
    part = make_root(tmp_path / "part", stems=["rocket", "astronaut"])
    for root in (full, part):
        cycle.generate_t2i(cycle.Context(root), [sd(zoo)], seeds=[0, 1], batch_size=4)
    a = pq.read_table(full / tables.PATHS["t2i_candidates"]).to_pylist()
    b = {r["candidate_id"]: r for r in pq.read_table(part / tables.PATHS["t2i_candidates"]).to_pylist()}
    shared = [r for r in a if r["candidate_id"] in b]
    assert len(shared) == 4 and len(a) == 6
    for r in shared:
        other = b[r["candidate_id"]]
        assert (r["seed"], r["gen_hash"], r["prompt"]) == (other["seed"], other["gen_hash"], other["prompt"])
        diff = np.abs(np.asarray(decode_image(r["image"]), int) - np.asarray(decode_image(other["image"]), int))
        assert diff.max() <= 2


# ---------------------------------------------------------------- resume


class Crash(RuntimeError):
    pass


def test_generate_t2i_resume_after_crash_is_byte_identical(zoo, tmp_path, monkeypatch):
    from cyclepref.models.t2i import TextToImage

    clean = make_root(tmp_path / "clean")
    s1 = cycle.generate_t2i(cycle.Context(clean), [sd(zoo)], seeds=[0, 1], batch_size=2)
    assert s1 == {"candidates": 6, "computed": 6, "reused": 0}

    crashed = make_root(tmp_path / "crashed")
    original = TextToImage.generate
    calls = {"n": 0}

    def flaky(self, prompts, seeds, batch_size=4):
        calls["n"] += 1
        if calls["n"] == 2:
            raise Crash("injected")
        return original(self, prompts, seeds, batch_size)

    monkeypatch.setattr(TextToImage, "generate", flaky)
    with pytest.raises(Crash):
        cycle.generate_t2i(cycle.Context(crashed), [sd(zoo)], seeds=[0, 1], batch_size=2)
    monkeypatch.setattr(TextToImage, "generate", original)
    s2 = cycle.generate_t2i(cycle.Context(crashed), [sd(zoo)], seeds=[0, 1], batch_size=2)
    assert s2 == {"candidates": 6, "computed": 4, "reused": 2}
    path = tables.PATHS["t2i_candidates"]
    assert shard_bytes(clean / path) == shard_bytes(crashed / path)


def test_i2t_chain_resume_is_byte_identical(zoo, tmp_path, monkeypatch):
    from cyclepref.models.captioner import Captioner

    def chain(root):
        ctx = cycle.Context(root)
        cycle.generate_i2t(ctx, [llava(zoo), blip(zoo)], batch_size=2)
        cycle.reconstruct_i2t(ctx, sd(zoo), batch_size=2)
        return cycle.score_i2t(ctx, ImageMetricSpec(kind="open_clip", path=str(zoo / "tiny-open-clip")), 2)

    clean = make_root(tmp_path / "clean")
    chain(clean)
    crashed = make_root(tmp_path / "crashed")
    original = Captioner.caption

    def flaky(self, images, batch_size=8, **kw):
        if self.spec.family == "blip":
            raise Crash("injected")
        return original(self, images, batch_size, **kw)

    monkeypatch.setattr(Captioner, "caption", flaky)
    with pytest.raises(Crash):
        chain(crashed)
    monkeypatch.setattr(Captioner, "caption", original)
    chain(crashed)
    for name in ("i2t_candidates", "i2t_scores"):
        assert (clean / tables.PATHS[name]).read_bytes() == (crashed / tables.PATHS[name]).read_bytes()
    assert shard_bytes(clean / tables.PATHS["i2t_reconstructions"]) == shard_bytes(
        crashed / tables.PATHS["i2t_reconstructions"]
    )


# ---------------------------------------------------------------- incremental runs and dedup


def test_adding_a_captioner_computes_only_its_items(zoo, tmp_path, monkeypatch):
    from cyclepref.models.captioner import Captioner

    root = make_root(tmp_path)
    ctx = cycle.Context(root)
    loads, captioned = [], []
    init, caption = Captioner.__init__, Captioner.caption

    def counting_init(self, spec, device="cpu"):
        loads.append(spec.name)
        init(self, spec, device)

    def counting_caption(self, images, batch_size=8, **kw):
        captioned.append((self.spec.name, len(images)))
        return caption(self, images, batch_size, **kw)

    monkeypatch.setattr(Captioner, "__init__", counting_init)
    monkeypatch.setattr(Captioner, "caption", counting_caption)
    first = cycle.generate_i2t(ctx, [llava(zoo)], batch_size=8)
    assert first["computed"] == 3 and loads == ["tiny-llava"]
    loads.clear()
    captioned.clear()
    second = cycle.generate_i2t(ctx, [llava(zoo), blip(zoo)], batch_size=8)
    assert second == {"candidates": 6, "computed": 3, "reused": 3, "quarantined": 0}
    assert loads == ["tiny-blip"] and captioned == [("tiny-blip", 3)]
    r1 = cycle.reconstruct_i2t(ctx, sd(zoo), batch_size=8)
    assert r1["computed"] == 6
    cycle.generate_i2t(ctx, [llava(zoo), blip(zoo), llava(zoo, "tiny-llava-brief", prompt="Describe it briefly.")], 8)
    r2 = cycle.reconstruct_i2t(ctx, sd(zoo), batch_size=8)
    assert r2["reused"] == 6 and r2["computed"] == r2["distinct"] - 6 >= 1
    third = cycle.generate_i2t(ctx, [llava(zoo), blip(zoo)], batch_size=8)
    assert third["computed"] == 0 and third["candidates"] == 6


def test_identical_captions_of_an_input_are_reconstructed_once(zoo, tmp_path, monkeypatch):
    from cyclepref.models.t2i import TextToImage

    root = make_root(tmp_path)
    ctx = cycle.Context(root)
    specs = [llava(zoo), llava(zoo, "tiny-llava-copy")]
    gen = cycle.generate_i2t(ctx, specs, batch_size=8)
    assert gen["candidates"] == 6
    rendered = []
    original = TextToImage.generate

    def counting(self, prompts, seeds, batch_size=4):
        rendered.extend(prompts)
        return original(self, prompts, seeds, batch_size)

    monkeypatch.setattr(TextToImage, "generate", counting)
    rec = cycle.reconstruct_i2t(ctx, sd(zoo), batch_size=8)
    assert rec == {"captions": 6, "distinct": 3, "computed": 3, "reused": 0}
    assert len(rendered) == 3
    scores = cycle.score_i2t(ctx, ImageMetricSpec(kind="open_clip", path=str(zoo / "tiny-open-clip")), 8)
    assert scores["scores"] == 6 and scores["distinct"] == 3
    table = store.read_table(root / tables.PATHS["i2t_scores"], tables.SCORES).to_pandas()
    assert table.groupby("input_id").score.nunique().eq(1).all()


def test_empty_captions_are_quarantined_with_reason(zoo, tmp_path, monkeypatch):
    from cyclepref.models.captioner import Captioner

    root = make_root(tmp_path)
    monkeypatch.setattr(Captioner, "caption", lambda self, images, batch_size=8, **kw: ['** "" **'] * len(images))
    summary = cycle.generate_i2t(cycle.Context(root), [llava(zoo)], batch_size=8)
    assert summary["candidates"] == 0 and summary["quarantined"] == 3
    q = pq.read_table(root / tables.PATHS["i2t_quarantine"]).to_pylist()
    assert {r["reason"] for r in q} == {"caption empty after cleaning"}


def test_caption_cleaning():
    from cyclepref.models.captioner import clean_caption

    assert clean_caption('  **A** "cat"\n\n on  a\tmat\x04 ') == "A cat on a mat"


# ---------------------------------------------------------------- T2I chain and score directions


def test_t2i_chain_scores_every_candidate(zoo, tmp_path):
    root = make_root(tmp_path)
    ctx = cycle.Context(root)
    cycle.generate_t2i(ctx, [sd(zoo), sd(zoo, "tiny-sd3", "sd3", "tiny-sd3")], seeds=[0, 1], batch_size=4)
    rec = cycle.reconstruct_t2i(ctx, llava(zoo), batch_size=4)
    assert rec["back_captions"] == 12
    s = cycle.score_t2i(ctx, TextMetricSpec(path=str(zoo / "all-MiniLM-L6-v2")), batch_size=8)
    assert s == {"scores": 12, "computed": 12, "reused": 0}
    scores = store.read_table(root / tables.PATHS["t2i_scores"], tables.SCORES)
    assert set(scores.column("direction").to_pylist()) == {"higher"}
    assert scores.column("text").null_count == 12
    cands = pq.read_table(root / tables.PATHS["t2i_candidates"], columns=["candidate_id"]).column(0).to_pylist()
    assert sorted(cands) == sorted(scores.column("candidate_id").to_pylist())
    assert cycle.score_t2i(ctx, TextMetricSpec(path=str(zoo / "all-MiniLM-L6-v2")), 8)["computed"] == 0


def test_score_direction_is_honoured():
    distance = [0.2, 0.5]
    similarity = [0.8, 0.5]
    assert better(distance[0], distance[1], "lower") and not better(distance[1], distance[0], "lower")
    assert better(similarity[0], similarity[1], "higher")
    assert list(oriented(distance, "lower")) == [-0.2, -0.5]
    with pytest.raises(ValueError, match="unknown score direction"):
        oriented([1.0], "up")  # type: ignore[arg-type]


def test_vllm_backend_is_selected_by_runtime_setting_and_fails_clearly_without_vllm(zoo, monkeypatch):
    import importlib.util

    from cyclepref.models import ModelLoadError
    from cyclepref.models.captioner import Captioner, make_captioner

    assert isinstance(make_captioner(llava(zoo)), Captioner)
    monkeypatch.setenv("CYCLEPREF_CAPTION_BACKEND", "vllm")
    if importlib.util.find_spec("vllm") is None:
        with pytest.raises(ModelLoadError, match="pip install vllm"):
            make_captioner(llava(zoo))
    monkeypatch.setenv("CYCLEPREF_CAPTION_BACKEND", "tensorrt")
    with pytest.raises(ValueError, match="CYCLEPREF_CAPTION_BACKEND must be"):
        make_captioner(llava(zoo))
