import io
import json
from pathlib import Path

import pytest
from PIL import Image

from cyclepref import inputs as inp
from cyclepref.config import PrepareInputs

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
    assert reasons["missing.jpg"] == "file not found"
    assert reasons["texts.jsonl#5"] == "prompt is empty"
    assert reasons["texts.jsonl#6"] == "prompt has wrong type int (expected a string)"
    dup = [q for q in quarantined if q.reason.startswith("duplicate of")]
    assert len(dup) == 1 and {dup[0].source} <= {"copy.jpg", "good.jpg"}
    assert len(records) == 3 and len(quarantined) == 8
    by_source = {r.source: r for r in records}
    good = by_source.get("good.jpg") or by_source["copy.jpg"]
    assert good.image is not None
    text_only = by_source["texts.jsonl#4"]
    assert text_only.image is None and text_only.prompt == "a prompt without an image"
    assert by_source["good.jpg"].prompt == "a red square" if "good.jpg" in by_source else True


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


def test_dci_layout(tmp_path):
    root = tmp_path / "dci"
    (root / "photos").mkdir(parents=True)
    (root / "annotations").mkdir()
    for i, name in enumerate(["sa_1", "sa_2", "sa_3"]):
        (root / "photos" / f"{name}.jpg").write_bytes(_jpeg((i * 50, 20, 20)))
        ann = {"image": f"{name}.jpg", "short_caption": f"short {i}", "extra_caption": f"extra {i}",
               "summary": [f"summary {i}", "longer"]}
        (root / "annotations" / f"{name}.json").write_text(json.dumps(ann))
    (root / "annotations" / "broken.json").write_text("{nope")
    (root / "splits.json").write_text(json.dumps({"train": ["sa_1.json", "sa_2.json", "broken.json"], "test": ["sa_3.json"]}))
    cfg = PrepareInputs(source="dci", path="dci", split="train", min_side=8)
    records, quarantined = inp.prepare(inp.iter_source(cfg, tmp_path), cfg)
    assert sorted(r.prompt for r in records) == ["summary 0", "summary 1"]
    assert sorted(r.caption for r in records) == ["short 0 extra 0", "short 1 extra 1"]
    assert len(quarantined) == 1 and quarantined[0].reason.startswith("annotation unreadable")
    cfg = PrepareInputs(source="dci", path="dci", split="test", dci_text="short_caption", min_side=8)
    records, _ = inp.prepare(inp.iter_source(cfg, tmp_path), cfg)
    assert [r.prompt for r in records] == ["short 2"]
    with pytest.raises(ValueError, match="no split 'valid'"):
        list(inp.iter_source(PrepareInputs(source="dci", path="dci", split="valid"), tmp_path))


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


def test_bad_jsonl_line_names_file_and_line(tmp_path):
    d = tmp_path / "p"
    d.mkdir()
    (d / "t.jsonl").write_text('{"prompt": "ok"}\n{broken\n')
    cfg = PrepareInputs(source="folder", path="p", texts_file="t.jsonl")
    with pytest.raises(ValueError, match=r"t.jsonl:2: not valid JSON"):
        list(inp.iter_source(cfg, tmp_path))


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
    assert summary == {"inputs": 16, "with_image": 16, "with_prompt": 16, "quarantined": 1}
    table = store.read_table(tmp_path / PATHS["inputs"], inp.INPUTS_SCHEMA)
    assert table.num_rows == 16 and table.column("caption").null_count == 0
    q = store.read_table(tmp_path / PATHS["quarantine"], inp.QUARANTINE_SCHEMA).to_pylist()
    assert q == [{"source": "images/broken.png", "reason": "not an image (cannot identify image file)"}]
    manifest = json.loads((tmp_path / "data/prepared/_manifest.json").read_text())
    assert manifest["counts"]["quarantined"] == 1 and set(manifest["files"]) == {"inputs.parquet", "quarantine.parquet"}
    first = (tmp_path / PATHS["inputs"]).read_bytes()
    prepare_inputs.run(params, tmp_path)
    assert (tmp_path / PATHS["inputs"]).read_bytes() == first
