"""Pair sources: the pipeline tables, exported datasets (export layout and save_to_disk), and their errors."""

from __future__ import annotations

import io
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from fixtures.reward.tables import write_reward_tables
from PIL import Image

from cyclepref import store
from cyclepref.reward.data import HFPairSource, TablePairSource, open_source
from cyclepref.tables import PAIRS, PATHS


def png(rgb: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), rgb).save(buf, format="PNG")
    return buf.getvalue()


def test_table_source_joins_pairs_with_inputs_and_candidates(tmp_path):
    pairs = write_reward_tables(tmp_path).to_pylist()
    source = TablePairSource(tmp_path)
    i2t = source.pairs("i2t", "train")
    rows = sorted((p for p in pairs if p["task"] == "i2t" and p["split"] == "train"), key=lambda r: r["pair_id"])
    assert len(i2t) == len(rows) == 6
    e = i2t.example(0)
    cands = pq.read_table(tmp_path / PATHS["i2t_candidates"]).to_pylist()
    text = {c["candidate_id"]: c["text"] for c in cands}
    assert e.task == "i2t" and e.group == rows[0]["input_id"] and e.image.size == (24, 24)
    assert (e.chosen, e.rejected) == (text[rows[0]["preferred_id"]], text[rows[0]["rejected_id"]])
    chosen, rejected = i2t.cycle_scores()
    assert np.all(chosen > rejected)
    assert chosen[0] == pytest.approx(-rows[0]["preferred_score"])
    t2i = source.pairs("t2i", "test")
    assert len(t2i) == 6 and t2i.example(0).prompt.startswith("a photo of thing number 3")
    assert isinstance(t2i.example(0).chosen, Image.Image)
    assert len(source.digest()) == 64 and source.digest() == TablePairSource(tmp_path).digest()


def test_table_source_names_missing_candidates(tmp_path):
    write_reward_tables(tmp_path)
    table = store.read_table(tmp_path / PATHS["pairs"], PAIRS).to_pylist()
    table[0]["preferred_id"] = "nope"
    store.write_table(pa.Table.from_pylist(table, PAIRS), tmp_path / PATHS["pairs"], PAIRS)
    with pytest.raises(ValueError, match="missing: \\['nope'\\]"):
        TablePairSource(tmp_path).pairs(table[0]["task"], table[0]["split"])
    with pytest.raises(ValueError, match="unknown split"):
        TablePairSource(tmp_path).pairs("i2t", "dev")


def export_layout(root: Path) -> Path:
    """The export stage's layout: README card with one config per task, <task>/<split>-k-of-n.parquet."""
    image = datasets.Image()
    i2t = datasets.Dataset.from_dict(
        {"image": [png((200, 0, 0)), png((0, 0, 200))], "preferred_text": ["red", "blue"],
         "rejected_text": ["blue", "red"], "preferred_score": [0.2, 0.3], "rejected_score": [0.5, 0.6],
         "direction": ["lower", "lower"], "pair_id": ["p1", "p2"], "input_id": ["a", "b"]},
    ).cast_column("image", image)
    t2i = datasets.Dataset.from_dict(
        {"prompt": ["a red square"], "preferred_image": [png((200, 0, 0))], "rejected_image": [png((0, 200, 0))],
         "preferred_score": [0.9], "rejected_score": [0.5], "direction": ["higher"], "pair_id": ["q1"],
         "input_id": ["c"]},
    )
    t2i = t2i.cast_column("preferred_image", image).cast_column("rejected_image", image)
    (root / "i2t").mkdir(parents=True)
    (root / "t2i").mkdir()
    i2t.to_parquet(str(root / "i2t" / "train-00000-of-00001.parquet"))
    i2t.select([0]).to_parquet(str(root / "i2t" / "valid-00000-of-00001.parquet"))
    t2i.to_parquet(str(root / "t2i" / "train-00000-of-00001.parquet"))
    configs = [
        {"config_name": "i2t", "data_files": [{"split": "train", "path": "i2t/train-*.parquet"},
                                              {"split": "valid", "path": "i2t/valid-*.parquet"}]},
        {"config_name": "t2i", "data_files": [{"split": "train", "path": "t2i/train-*.parquet"}]},
    ]
    (root / "README.md").write_text(f"---\n{yaml.safe_dump({'configs': configs})}---\n# export\n")
    return root


def test_hf_source_reads_the_export_layout(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    root = export_layout(tmp_path / "export")
    source = HFPairSource(root, root)
    i2t = source.pairs("i2t", "train")
    assert len(i2t) == 2
    e = i2t.example(1)
    assert (e.chosen, e.rejected, e.group, e.pair_id) == ("blue", "red", "b", "p2")
    assert e.image.getpixel((0, 0)) == (0, 0, 200)
    chosen, rejected = i2t.cycle_scores()
    assert chosen.tolist() == [-0.2, -0.3] and rejected.tolist() == [-0.5, -0.6]
    t2i = source.pairs("t2i", "train").example(0)
    assert t2i.prompt == "a red square" and t2i.chosen.getpixel((0, 0)) == (200, 0, 0)
    assert len(source.pairs("i2t", "valid")) == 1
    assert len(source.pairs("t2i", "test")) == 0
    assert len(source.digest()) == 64


def test_hf_source_reads_save_to_disk_with_chosen_rejected_columns(tmp_path):
    ds = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"prompt": ["p"], "chosen": [png((1, 2, 3))],
                                             "rejected": [png((9, 9, 9))]}),
        "validation": datasets.Dataset.from_dict({"prompt": ["q"], "chosen": [png((1, 2, 3))],
                                                  "rejected": [png((9, 9, 9))]}),
    })
    ds = ds.cast_column("chosen", datasets.Image()).cast_column("rejected", datasets.Image())
    ds.save_to_disk(str(tmp_path / "t2i"))
    spec = type("Spec", (), {"source": "hf_datasets", "i2t_path": None, "t2i_path": "t2i"})()
    source = open_source(spec, tmp_path)
    valid = source.pairs("t2i", "valid")
    assert len(valid) == 1 and valid.example(0).prompt == "q" and valid.cycle_scores() is None
    with pytest.raises(ValueError, match="no i2t_path"):
        source.pairs("i2t", "train")
    datasets.Dataset.from_dict({"prompt": ["p"], "image_a": [png((1, 2, 3))]}).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(ValueError, match="a single Dataset without a 'split' column"):
        HFPairSource(None, tmp_path / "bad").pairs("t2i", "train")


def test_non_embedded_export_reads_its_images_from_the_dataset_dir_wherever_the_process_runs(tmp_path, monkeypatch):
    from fixtures.pipeline_tables import build_tables

    from cyclepref.config import BuildPairs, ExportDataset
    from cyclepref.export import write_export
    from cyclepref.pairs import build_pairs

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    t = build_tables()
    pairs, _ = build_pairs(pa.concat_tables([t["i2t_scores"], t["t2i_scores"]]), BuildPairs())
    cands = {"i2t": t["i2t_scores"].select(["candidate_id", "text"]),
             "t2i": t["t2i_candidates"].select(["candidate_id", "image"])}
    out = tmp_path / "project" / "data" / "export" / "dataset"
    write_export(out, pairs, t["inputs"], cands, ExportDataset(embed_images=False))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    pixels = {i: np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))
              for i, b in zip(*(t["inputs"].column(c).to_pylist() for c in ("input_id", "image")), strict=True)}
    pixels |= {c: np.asarray(Image.open(io.BytesIO(b)).convert("RGB"))
               for c, b in zip(*(t["t2i_candidates"].column(k).to_pylist() for k in ("candidate_id", "image")),
                               strict=True)}
    source = HFPairSource(out, out)
    by_id = {r["pair_id"]: r for r in pairs.to_pylist()}
    decoded = 0
    for task in ("i2t", "t2i"):
        for split in ("train", "valid", "test"):
            pairset = source.pairs(task, split)
            for k in range(len(pairset)):
                e = pairset.example(k)
                row = by_id[e.pair_id]
                if task == "i2t":
                    assert np.array_equal(np.asarray(e.image), pixels[row["input_id"]])
                else:
                    assert np.array_equal(np.asarray(e.chosen), pixels[row["preferred_id"]])
                    assert np.array_equal(np.asarray(e.rejected), pixels[row["rejected_id"]])
                decoded += 1
    assert decoded == pairs.num_rows > 0


def test_an_exported_image_path_that_leaves_the_dataset_dir_is_refused(tmp_path, monkeypatch):
    from cyclepref.paths import OutsideRoot

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    Image.new("RGB", (8, 8), (1, 2, 3)).save(tmp_path / "secret.png")
    root = tmp_path / "export"
    (root / "i2t").mkdir(parents=True)
    (root / "images").mkdir()
    Image.new("RGB", (8, 8), (9, 9, 9)).save(root / "images" / "ok.png")
    ds = datasets.Dataset.from_dict({"image": ["images/ok.png", "../secret.png", str(tmp_path / "secret.png")],
                                     "preferred_text": ["a", "b", "c"], "rejected_text": ["x", "y", "z"],
                                     "split": ["train"] * 3})
    ds.to_parquet(str(root / "i2t" / "train-00000-of-00001.parquet"))
    monkeypatch.chdir(root)
    pairset = HFPairSource(root, None).pairs("i2t", "train")
    assert pairset.example(0).image.getpixel((0, 0)) == (9, 9, 9)
    for k in (1, 2):
        with pytest.raises(OutsideRoot, match="resolves outside"):
            pairset.example(k)
