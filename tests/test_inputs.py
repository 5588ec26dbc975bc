import io
import json
from pathlib import Path

import pytest
from PIL import Image

from cyclepref import inputs as inp
from cyclepref.config import PrepareInputs
from fixtures.dci import LONG, write_dci

ROOT = Path(__file__).resolve().parents[1]


def _jpeg(color, size=(40, 30), exif_orientation=None) -> bytes:
    img = Image.new("RGB", size, color)
    img.putpixel((0, 0), (255, 255, 255))
    buf = io.BytesIO()
    if exif_orientation:
        exif = Image.Exif()
        exif[0x0112] = exif_orientation
        img.save(buf, "JPEG", exif=exif, quality=95)
    else:
        img.save(buf, "JPEG", quality=95)
    return buf.getvalue()


@pytest.fixture
def folder(tmp_path) -> Path:
    d = tmp_path / "in"
    (d / "sub").mkdir(parents=True)
    (d / "good.jpg").write_bytes(_jpeg((200, 10, 10)))
    (d / "sub" / "rotated.jpg").write_bytes(_jpeg((10, 200, 10), exif_orientation=6))
    (d / "truncated.jpg").write_bytes(_jpeg((10, 10, 200))[:200])
    (d / "empty.jpg").write_bytes(b"")
    (d / "notes.png").write_text("this is not an image")
    (d / "tiny.png").write_bytes(_png((4, 4)))
    (d / "copy.jpg").write_bytes(_jpeg((200, 10, 10)))
    (d / "readme.md").write_text("ignored: not an image suffix")
    rows = [
        {"file": "good.jpg", "prompt": "  a red   square ", "caption": "A red square."},
        {"file": "sub/rotated.jpg", "prompt": "a green square"},
        {"file": "missing.jpg", "prompt": "x"},
        {"prompt": "a prompt without an image"},
        {"prompt": "   "},
        {"prompt": 42},
    ]
    (d / "texts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return d


def _png(size) -> bytes:
    buf = io.BytesIO()
    Image.new("RGBA", size, (0, 0, 0, 0)).save(buf, "PNG")
    return buf.getvalue()


def _cfg(**kw) -> PrepareInputs:
    base = dict(source="folder", path="in", texts_file="texts.jsonl", min_side=8)
    return PrepareInputs(**{**base, **kw})


def test_folder_good_and_bad_inputs(folder):
    cfg = _cfg()
    records, quarantined = inp.prepare(inp.iter_source(cfg, folder.parent), cfg)
    reasons = {q.source: q.reason for q in quarantined}
    assert reasons["truncated.jpg"].startswith("unreadable image")
    assert reasons["empty.jpg"] == "empty file (0 bytes)"
    assert reasons["notes.png"] == "not an image (cannot identify image file)"
    assert reasons["tiny.png"].startswith("image too small (4x4")
    assert reasons["missing.jpg"] == "file not found (texts.jsonl:3)"
    assert reasons["texts.jsonl:5"] == "prompt is empty"
    assert reasons["texts.jsonl:6"] == "prompt has wrong type int (expected a string)"
    assert len(records) == 3 and len(quarantined) == 8
    by_source = {r.source: r for r in records}
    text_only = by_source["texts.jsonl:4"]
    assert text_only.image is None and text_only.prompt == "a prompt without an image"


def test_duplicate_images_keep_the_captioned_original_not_the_uncaptioned_copy(folder):
    cfg = _cfg()
    records, quarantined = inp.prepare(inp.iter_source(cfg, folder.parent), cfg)
    dup = [q for q in quarantined if q.reason.startswith("duplicate of")]
    assert [q.source for q in dup] == ["copy.jpg"]
    assert dup[0].reason.startswith("duplicate of good.jpg") and inp.KEEP_RULE in dup[0].reason
    good = next(r for r in records if r.source == "good.jpg")
    assert (good.prompt, good.caption) == ("a red square", "A red square.")


def test_exif_orientation_applied_and_rgb(folder):
    cfg = _cfg()
    records, _ = inp.prepare(inp.iter_source(cfg, folder.parent), cfg)
    rot = next(r for r in records if r.source == "sub/rotated.jpg")
    img = inp.decode_image(rot.image)
    assert (rot.width, rot.height) == (30, 40) == img.size
    assert img.mode == "RGB"


def test_ids_are_content_hashes_stable_across_order_and_names(folder, tmp_path):
    cfg = _cfg()
    a, _ = inp.prepare(inp.iter_source(cfg, folder.parent), cfg)
    items = list(inp.iter_source(cfg, folder.parent))
    b, _ = inp.prepare(iter(reversed(items)), cfg)
    assert [r.input_id for r in a] == [r.input_id for r in b]
    assert [r.input_id for r in a] == sorted(r.input_id for r in a)


def test_transparent_png_is_composited_on_white():
    img = inp.normalise_image(Image.new("RGBA", (10, 10), (0, 0, 0, 0)))
    assert img.mode == "RGB" and img.getpixel((5, 5)) == (255, 255, 255)


def test_dci_release_summaries_from_complete_and_short_captions_from_annotations(tmp_path):
    write_dci(tmp_path)
    cfg = PrepareInputs(source="dci", path="densely_captioned_images", split="train", min_side=8)
    records, quarantined = inp.prepare(inp.iter_source(cfg, tmp_path), cfg)
    by_photo = {r.caption: r.prompt for r in records}
    assert by_photo == {
        "short caption 1 extra caption 1": "summary of photo one",
        "short caption 2 extra caption 2": "first summary of photo two",
        "short caption 3 extra caption 3": "short alternate of photo three",
    }
    reasons = {q.source: q.reason for q in quarantined}
    assert set(reasons) == {"complete/sa_4.json", "complete/sa_5.json"}
    assert "fits 77 CLIP tokens" in reasons["complete/sa_4.json"]
    assert "entry unreadable" in reasons["complete/sa_5.json"]

    cfg = PrepareInputs(source="dci", path="densely_captioned_images", split="train", dci_text="short_caption",
                        min_side=8)
    records, quarantined = inp.prepare(inp.iter_source(cfg, tmp_path), cfg)
    assert sorted(r.prompt for r in records) == [f"short caption {n}" for n in range(1, 6)] and not quarantined
    with pytest.raises(ValueError, match="no split 'val'"):
        list(inp.iter_source(PrepareInputs(source="dci", path="densely_captioned_images", split="val"), tmp_path))


def test_clip_token_length_counts_start_and_end_tokens():
    assert inp.clip_token_length("a photo of a cat") == 7
    assert inp.clip_token_length(LONG) > inp.CLIP_TOKENS


def test_hf_datasets_directory(tmp_path):
    import datasets

    imgs = [Image.new("RGB", (20, 20), (i * 60, 0, 0)) for i in range(3)]
    ds = datasets.Dataset.from_dict(
        {"image": imgs, "text": ["one", "two", ""]}, features=datasets.Features(
            {"image": datasets.Image(), "text": datasets.Value("string")}
        )
    )
    datasets.DatasetDict({"train": ds}).save_to_disk(tmp_path / "hf")
    cfg = PrepareInputs(source="hf_datasets", path="hf", min_side=8)
    records, quarantined = inp.prepare(inp.iter_source(cfg, tmp_path), cfg)
    assert sorted(r.prompt for r in records) == ["one", "two"]
    assert [q.reason for q in quarantined] == ["prompt is empty"]


def test_txt_prompts_file(tmp_path):
    d = tmp_path / "p"
    d.mkdir()
    (d / "prompts.txt").write_text("a cat\n\na dog\na cat\n")
    cfg = PrepareInputs(source="folder", path="p", texts_file="prompts.txt")
    records, quarantined = inp.prepare(inp.iter_source(cfg, tmp_path), cfg)
    assert sorted(r.prompt for r in records) == ["a cat", "a dog"]
    assert len(quarantined) == 1 and quarantined[0].reason.startswith("duplicate of")


def test_bad_jsonl_lines_are_quarantined_with_file_and_line_and_the_rest_is_kept(tmp_path):
    d = tmp_path / "p"
    d.mkdir()
    lines = [b'{"prompt": "ok"}', b"{broken", b'{"prompt": "caf\xe9 \xff"}', b'["a", "list"]', b'"a string"',
             b'{"prompt": "also ok"}']
    (d / "t.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    cfg = PrepareInputs(source="folder", path="p", texts_file="t.jsonl")
    records, quarantined = inp.prepare(inp.iter_source(cfg, tmp_path), cfg)
    assert sorted(r.prompt for r in records) == ["also ok", "ok"]
    reasons = {q.source: q.reason for q in quarantined}
    assert reasons["t.jsonl:2"].startswith("not valid JSON (")
    assert reasons["t.jsonl:3"] == "not valid UTF-8 (byte 0xe9 at column 16)"
    assert reasons["t.jsonl:4"] == "expected a JSON object, got a JSON array"
    assert reasons["t.jsonl:5"] == "expected a JSON object, got a JSON string"
    assert len(records) + len(quarantined) == len(lines)


def test_non_utf8_file_name_is_kept_with_a_printable_source(tmp_path):
    import os

    from cyclepref import store
    from cyclepref.tables import PATHS
    from tasks import prepare_inputs

    d = tmp_path / "in"
    d.mkdir()
    (d / "good.jpg").write_bytes(_jpeg((200, 10, 10)))
    with open(os.path.join(os.fsencode(d), b"caf\xe9.jpg"), "wb") as f:
        f.write(_jpeg((10, 200, 10)))
    params = _params(tmp_path, path="in")
    summary = prepare_inputs.run(params, tmp_path)
    assert summary["inputs"] == 2 and summary["quarantined"] == 0
    sources = store.read_table(tmp_path / PATHS["inputs"], inp.INPUTS_SCHEMA).column("source").to_pylist()
    assert sorted(sources) == ["caf\\xe9.jpg", "good.jpg"]


def _params(tmp_path, **prepare):
    from cyclepref.config import load_params

    params = load_params(ROOT / "params.yaml")
    cfg = params.prepare_inputs.model_copy(update={"texts_file": None, "min_side": 8, **prepare})
    return params.model_copy(update={"prepare_inputs": cfg})


def test_prepare_inputs_stage_on_bundled_set(tmp_path):
    import shutil

    from cyclepref import store
    from cyclepref.config import load_params
    from cyclepref.tables import PATHS
    from tasks import prepare_inputs

    shutil.copytree(ROOT / "data/inputs", tmp_path / "data/inputs")
    (tmp_path / "data/inputs/images/broken.png").write_text("not an image")
    params = load_params(ROOT / "params.yaml")
    photos = params.prepare_inputs.model_copy(update={"path": "data/inputs"})
    params = params.model_copy(update={"prepare_inputs": photos})
    summary = prepare_inputs.run(params, tmp_path)
    assert summary == {"inputs": 16, "with_image": 16, "with_prompt": 16, "quarantined": 1, "over_limit": 0,
                       "noted": 0}
    table = store.read_table(tmp_path / PATHS["inputs"], inp.INPUTS_SCHEMA)
    assert table.num_rows == 16 and table.column("caption").null_count == 0
    q = store.read_table(tmp_path / PATHS["quarantine"], inp.QUARANTINE_SCHEMA).to_pylist()
    assert q == [{"source": "images/broken.png", "reason": "not an image (cannot identify image file)"}]
    manifest = json.loads((tmp_path / "data/prepared/_manifest.json").read_text())
    assert manifest["counts"]["quarantined"] == 1 and set(manifest["files"]) == {"inputs.parquet", "quarantine.parquet"}
    first = (tmp_path / PATHS["inputs"]).read_bytes()
    prepare_inputs.run(params, tmp_path)
    assert (tmp_path / PATHS["inputs"]).read_bytes() == first


# ---------------------------------------------------------------- containment (issue 12, defect 2)


def test_paths_outside_the_input_folder_are_never_read(tmp_path):
    secret = tmp_path / "outside.png"
    secret.write_bytes(_jpeg((1, 2, 3)))
    d = tmp_path / "data" / "in"
    d.mkdir(parents=True)
    (d / "good.jpg").write_bytes(_jpeg((200, 10, 10)))
    (d / "link.png").symlink_to(secret)
    (d / "sub").symlink_to(tmp_path, target_is_directory=True)
    rows = [{"file": "../../outside.png", "prompt": "up"}, {"file": str(secret), "prompt": "absolute"},
            {"file": "sub/outside.png", "prompt": "through a symlinked folder"}]
    (d / "texts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = PrepareInputs(source="folder", path="data/in", texts_file="texts.jsonl", min_side=8)
    records, quarantined = inp.prepare(inp.iter_source(cfg, tmp_path), cfg)
    assert [r.source for r in records] == ["good.jpg"]
    reasons = {q.source: q.reason for q in quarantined}
    assert "resolves outside" in reasons["link.png"]
    assert "climbs out of its folder" in reasons["texts.jsonl:1"]
    assert "is absolute" in reasons["texts.jsonl:2"]
    assert "resolves outside" in reasons["sub/outside.png"]
    assert len(quarantined) == 4


def test_dci_annotation_and_image_paths_stay_inside(tmp_path):
    (tmp_path / "secret.json").write_text(json.dumps({"image": "x.jpg", "summaries": {"base": "leak"}}))
    (tmp_path / "x.jpg").write_bytes(_jpeg((5, 5, 5)))
    root = tmp_path / "dci"
    (root / "photos").mkdir(parents=True)
    (root / "complete").mkdir()
    (root / "complete" / "a.json").write_text(json.dumps({"image": "../../x.jpg", "summaries": {"base": "s"}}))
    (root / "splits.json").write_text(json.dumps({"train": ["a.json", "../../secret.json"]}))
    cfg = PrepareInputs(source="dci", path="dci", split="train", min_side=8)
    records, quarantined = inp.prepare(inp.iter_source(cfg, tmp_path), cfg)
    assert records == []
    assert sorted(q.source for q in quarantined) == ["complete/../../secret.json", "photos/../../x.jpg"]
    assert all("outside" in q.reason for q in quarantined)


def test_containment_helper():
    from cyclepref.paths import OutsideRoot, inside, relative_key

    assert relative_key("a/./b/../c.png") == "a/c.png"
    for bad in ("/etc/passwd", "../x", "a/../../x", "x\0y"):
        with pytest.raises(OutsideRoot):
            relative_key(bad)
    with pytest.raises(OutsideRoot):
        inside("/tmp", "/etc/passwd")
    assert inside("/tmp", "a/b") == Path("/tmp/a/b").resolve()


# ---------------------------------------------------------------- image modes (issue 12, defect 3)


def _encoded(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _item(data: bytes, name: str = "x.png") -> inp.RawItem:
    return inp.RawItem(name, data)


def test_sixteen_bit_grey_is_scaled_not_clipped_and_differs_from_a_transparent_image():
    import numpy as np

    grey16 = Image.fromarray(np.full((20, 20), 40000, np.uint16))
    big_endian = Image.new("I;16B", (20, 20))
    big_endian.frombytes(np.full((20, 20), 20000, ">u2").tobytes())
    transparent = Image.new("RGBA", (20, 20), (0, 0, 0, 0))
    cfg = PrepareInputs(source="folder", path=".", min_side=8)
    items = [_item(_encoded(grey16), "g16.png"), _item(_encoded(big_endian, "TIFF"), "g16b.tif"),
             _item(_encoded(transparent), "clear.png")]
    records, quarantined = inp.prepare(iter(items), cfg)
    by = {r.source: r for r in records}
    assert inp.decode_image(by["g16.png"].image).getpixel((3, 3)) == (156, 156, 156)
    assert inp.decode_image(by["g16b.tif"].image).getpixel((3, 3)) == (78, 78, 78)
    assert by["g16.png"].note == "16-bit grey scaled to 8 bits"
    assert inp.decode_image(by["clear.png"].image).getpixel((3, 3)) == (255, 255, 255)
    assert by["clear.png"].note == "alpha composited on white"
    assert quarantined == []


def test_cmyk_palette_and_animated_images_are_normalised_with_a_note():
    cmyk = Image.new("CMYK", (20, 20), (0, 255, 255, 0))
    palette = Image.new("RGB", (20, 20), (0, 0, 200)).convert("P")
    frames = [Image.new("RGB", (20, 20), c) for c in ((250, 0, 0), (0, 250, 0))]
    animated = _encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    cfg = PrepareInputs(source="folder", path=".", min_side=8)
    items = [_item(_encoded(cmyk, "JPEG"), "c.jpg"), _item(_encoded(palette), "p.png"), _item(animated, "a.gif")]
    records, quarantined = inp.prepare(iter(items), cfg)
    assert quarantined == []
    notes = {r.source: r.note for r in records}
    assert notes == {"c.jpg": "CMYK converted to RGB", "p.png": "palette converted to RGB",
                     "a.gif": "animated (2 frames): first frame kept; palette converted to RGB"}
    first = inp.decode_image(next(r.image for r in records if r.source == "a.gif")).getpixel((5, 5))
    assert first[0] > 200 and first[1] < 50


# ---------------------------------------------------------------- texts and ids (issue 12, defect 4)


def test_control_characters_are_removed_and_noted():
    cfg = PrepareInputs(source="folder", path=".")
    item = inp.RawItem("t:1", None, prompt="a \x1b[31mred\x1b[0m cat\x00 with a\x07 bell\u0085", caption="cafe\u0301")
    [r], [] = inp.prepare(iter([item]), cfg)
    assert r.prompt == "a red cat with a bell"
    assert r.caption == "caf\u00e9"
    assert r.note == "11 control character(s) and escape codes removed from prompt"
    only_controls = inp.RawItem("t:2", None, prompt="\x00\x07\x1b[2J")
    [], [q] = inp.prepare(iter([only_controls]), cfg)
    assert q.reason == "prompt is empty after removing control characters"


def test_row_ids_are_honoured_and_duplicate_ids_quarantined(tmp_path):
    d = tmp_path / "p"
    d.mkdir()
    rows = [{"id": "cat-1", "prompt": "a cat"}, {"id": "cat-1", "prompt": "another cat"},
            {"id": 7, "prompt": "a dog"}, {"id": "../x", "prompt": "a bad id"}, {"prompt": "no id"}]
    (d / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = PrepareInputs(source="folder", path="p", texts_file="t.jsonl")
    records, quarantined = inp.prepare(inp.iter_source(cfg, tmp_path), cfg)
    ids = {r.prompt: r.input_id for r in records}
    assert ids["a cat"] == "cat-1" and ids["a dog"] == "7" and len(ids["no id"]) == 16
    reasons = {q.source: q.reason for q in quarantined}
    assert reasons["t.jsonl:2"].startswith("duplicate id 'cat-1' (kept t.jsonl:1)")
    assert reasons["t.jsonl:4"].startswith("id '../x' is not")
    assert len(records) + len(quarantined) == len(rows)


def test_cycleprefdb_and_benchmark_image_paths_stay_inside(tmp_path):
    from cyclepref import cycleprefdb
    from cyclepref.reward.benchmarks import BenchmarkFormatError, load_benchmark

    (tmp_path / "secret.jpg").write_bytes(_jpeg((1, 2, 3)))
    d = tmp_path / "db"
    (d / "images").mkdir(parents=True)
    (d / "images" / "ok.jpg").write_bytes(_jpeg((200, 2, 3)))
    (d / "train.jsonl").write_text(json.dumps({"input": "../secret.jpg", "generations": ["a"], "scores": [0.1]}) + "\n")
    imported = cycleprefdb.read_task("i2t", d, prepare=PrepareInputs(source="folder", path=".", min_side=8))
    assert imported.inputs == {} and "resolves outside" in imported.quarantined[0].reason
    (d / "train.jsonl").write_text(json.dumps(
        {"input": "a prompt", "generations": ["images/ok.jpg", str(tmp_path / "secret.jpg")], "scores": [0.1, 0.2]}
    ) + "\n")
    imported = cycleprefdb.read_task("t2i", d, prepare=PrepareInputs(source="folder", path=".", min_side=8))
    assert len(imported.candidates["t2i"]) == 1
    assert [q.source for q in imported.quarantined] == ["cycleprefdb-t2i/train.jsonl:1#generation1"]
    bench = tmp_path / "bench" / "pairs.jsonl"
    bench.parent.mkdir()
    bench.write_text(json.dumps({"id": "p", "task": "i2t", "image": "../secret.jpg", "chosen": "a", "rejected": "b"}))
    with pytest.raises(BenchmarkFormatError, match=r"pairs.jsonl:1: image: path '../secret.jpg' resolves outside"):
        load_benchmark(bench)
