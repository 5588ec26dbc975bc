"""Dataset export (Hugging Face `datasets`), the dataset card, the CyclePrefDB import, and the stages
gate -> build_pairs -> gate -> export_dataset run end to end on fixture tables."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import yaml
from fixtures.pipeline_tables import build_tables, write_params, write_tables

from cyclepref import cycleprefdb, gates, store
from cyclepref.config import BuildPairs, ExportDataset, Gates
from cyclepref.export import COLUMNS, dataset_card, write_export
from cyclepref.inputs import INPUTS_SCHEMA
from cyclepref.pairs import build_pairs, pair_stats
from cyclepref.tables import I2T_CANDIDATES, PATHS, SCORES, T2I_CANDIDATES

FIXTURE = Path(__file__).parent / "fixtures" / "cycleprefdb"


def load(directory: Path, task: str, tmp_path: Path):
    import datasets

    return datasets.load_dataset(str(directory), task, cache_dir=str(tmp_path / "hf-cache"))


def rows_of(dataset_dict) -> list[dict]:
    return [row for split in dataset_dict.values() for row in split]


@pytest.fixture(scope="module")
def world() -> dict[str, pa.Table]:
    t = build_tables()
    pairs, counts = build_pairs(pa.concat_tables([t["i2t_scores"], t["t2i_scores"]]), BuildPairs())
    return {**t, "pairs": pairs, "stats": pair_stats(pairs, counts, 0.005)}


# ---------------------------------------------------------------- export


def test_export_loads_with_datasets_and_keeps_every_pair(tmp_path, world):
    out = tmp_path / "export"
    cands = {"i2t": world["i2t_scores"].select(["candidate_id", "text"]),
             "t2i": world["t2i_candidates"].select(["candidate_id", "image"])}
    counts = write_export(out, world["pairs"], world["inputs"], cands, ExportDataset(rows_per_shard=5), world["stats"])
    pairs = world["pairs"].to_pandas()
    for task in ("i2t", "t2i"):
        ds = load(out, task, tmp_path)
        expected = pairs[pairs["task"] == task]
        assert sum(len(split) for split in ds.values()) == len(expected)
        assert set(ds) == {s for s, c in counts[task].items() if c["pairs"]}
        split = next(iter(ds))
        assert ds[split].column_names == [name for name, _ in COLUMNS[task]]
        assert all(row["split"] == split for row in ds[split])
    i2t = {r["pair_id"]: r for r in rows_of(load(out, "i2t", tmp_path))}
    text_of = dict(zip(*(world["i2t_scores"].column(c).to_pylist() for c in ("candidate_id", "text")), strict=True))
    for p in pairs[pairs["task"] == "i2t"].itertuples():
        row = i2t[p.pair_id]
        assert (row["preferred_text"], row["rejected_text"]) == (text_of[p.preferred_id], text_of[p.rejected_id])
        assert row["preferred_score"] == p.preferred_score and row["image"].size == (24, 24)
    image_of = dict(zip(*(world["t2i_candidates"].column(c).to_pylist() for c in ("candidate_id", "image")),
                        strict=True))
    row = rows_of(load(out, "t2i", tmp_path))[0]
    assert _png_pixels(image_of[row["preferred_id"]]) == list(row["preferred_image"].convert("RGB").getdata())
    assert row["prompt"].startswith("a photo of thing number")
    manifest = json.loads((out / "_manifest.json").read_text())
    assert "README.md" in manifest["files"] and manifest["counts"] == counts
    assert len([p for p in manifest["files"] if p.startswith("t2i/")]) > 1


def _png_pixels(data: bytes) -> list:
    import io

    from PIL import Image

    return list(Image.open(io.BytesIO(data)).convert("RGB").getdata())


def test_dataset_card_has_configs_counts_and_statistics(world):
    counts = {"i2t": {"train": {"pairs": 5, "inputs": 2}, "valid": {"pairs": 0, "inputs": 0},
                      "test": {"pairs": 1, "inputs": 1}}}
    card = dataset_card(ExportDataset(name="tiny"), counts, world["stats"])
    header = yaml.safe_load(card.split("---")[1])
    assert header["configs"] == [{"config_name": "i2t", "data_files": [
        {"split": "train", "path": "i2t/train-*.parquet"}, {"split": "test", "path": "i2t/test-*.parquet"}]}]
    assert header["task_categories"] == ["image-to-text"] and header["size_categories"] == ["n<1K"]
    assert "| i2t | valid | 0 | 0 |" in card and "Total: 6 pairs." in card
    assert "metric `dreamsim` (lower is better)" in card and "| model | wins | losses |" in card


def test_dataset_card_states_profile_models_rule_thresholds_and_licence(world):
    from cyclepref.config import load_params
    from cyclepref.export import provenance

    params = load_params(Path(__file__).resolve().parents[1] / "configs" / "default.yaml")
    counts = {"i2t": {"train": {"pairs": 5, "inputs": 2}, "valid": {"pairs": 0, "inputs": 0},
                      "test": {"pairs": 1, "inputs": 1}}}
    cfg = ExportDataset(name="sandbox", license="cc-by-4.0", license_note="Scenes and models made by cyclepref.")
    card = dataset_card(cfg, counts, world["stats"], provenance(params))
    assert f"profile `{params.profile}`" in card
    for spec in [*params.generate_i2t.captioners, params.reconstruct_i2t.model, *params.generate_t2i.models,
                 params.reconstruct_t2i.captioner]:
        assert f"`{spec.name}` ({spec.path})" in card
    rule = params.build_pairs
    assert f"< {rule.tie_gap} metric units" in card and f"sbert {rule.quality_limits.sbert}" in card
    assert f"train {rule.split.train}, valid {rule.split.valid}, test {rule.split.test}" in card
    assert "`margin` is |preferred score - rejected score|" in card
    assert yaml.safe_load(card.split("---")[1])["license"] == "cc-by-4.0"
    assert "## Licence\n\n`cc-by-4.0`.\nScenes and models made by cyclepref." in card
    assert "terms of the models" in dataset_card(ExportDataset(), counts)


def test_export_fails_on_pairs_without_their_candidates(tmp_path, world):
    cands = {"i2t": world["i2t_scores"].select(["candidate_id", "text"]).slice(1),
             "t2i": world["t2i_candidates"].select(["candidate_id", "image"])}
    with pytest.raises(ValueError, match="candidates not found"):
        write_export(tmp_path / "x", world["pairs"], world["inputs"], cands, ExportDataset())
    assert not (tmp_path / "x").exists()


# ---------------------------------------------------------------- CyclePrefDB import


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> tuple[Path, dict[str, int]]:
    """The CyclePrefDB fixture imported once: (root holding the pipeline tables, counts)."""
    root = tmp_path_factory.mktemp("cycleprefdb")
    return root, cycleprefdb.import_cycleprefdb(root, FIXTURE / "i2t", FIXTURE / "t2i")


def test_cycleprefdb_import_builds_pipeline_tables(imported):
    root, counts = imported
    assert counts == {"inputs": 5, "quarantined": 3, "i2t_candidates": 9, "t2i_candidates": 5}
    inputs = store.read_table(root / PATHS["inputs"], INPUTS_SCHEMA)
    assert pc.sum(pc.is_valid(inputs.column("image"))).as_py() == 3
    assert pc.sum(pc.is_valid(inputs.column("prompt"))).as_py() == 2
    reasons = store.read_table(root / PATHS["quarantine"]).column("reason").to_pylist()
    assert sorted(reasons) == ["file not found", "file not found", "score None is not a finite number"]
    i2t = store.read_table(root / PATHS["i2t_candidates"], I2T_CANDIDATES)
    assert "a green stripe pattern" in i2t.column("text").to_pylist()
    assert "two yellow dots" in i2t.column("text").to_pylist()
    assert set(i2t.column("model").to_pylist()) == {"m-a", "m-b", "m-c", "m-d", "generation-0", "generation-1",
                                                    "generation-2"}
    t2i = pq.read_table(root / PATHS["t2i_candidates"]).cast(T2I_CANDIDATES)
    assert sorted(zip(t2i.column("model").to_pylist(), t2i.column("seed").to_pylist())) == [
        ("gen-a", 0), ("gen-a", 0), ("gen-a", 1), ("gen-b", 0), ("gen-b", 1)]
    scores = store.read_table(root / PATHS["t2i_scores"], SCORES)
    assert set(scores.column("metric").to_pylist()) == {"sbert"}


def test_pairs_from_cycleprefdb_follow_the_rule_and_export(imported, tmp_path):
    root, _ = imported
    scores = {t: store.read_table(root / PATHS[f"{t}_scores"], SCORES) for t in ("i2t", "t2i")}
    candidates = {"i2t": gates.read_gate_table(root / PATHS["i2t_candidates"]),
                  "t2i": gates.read_gate_table(root / PATHS["t2i_candidates"])}
    for task in ("i2t", "t2i"):
        report = gates.check(f"{task}_scores", scores[task], getattr(Gates(), f"{task}_scores"),
                             candidates=candidates[task])
        assert report["success"], gates.failure_message(report)
    pairs, counts = build_pairs(pa.concat_tables(scores.values()), BuildPairs())
    assert (counts["i2t"]["pairs"], counts["t2i"]["pairs"]) == (4, 6)
    assert counts["i2t"]["merged_duplicate_texts"] == 1
    assert counts["i2t"]["dropped_low_quality"] == 2 and counts["i2t"]["dropped_near_tie"] == 1

    out = tmp_path / "export"
    cands = {"i2t": scores["i2t"].select(["candidate_id", "text"]),
             "t2i": pq.read_table(root / PATHS["t2i_candidates"], columns=["candidate_id", "image"])}
    write_export(out, pairs, store.read_table(root / PATHS["inputs"]), cands, ExportDataset())
    i2t = {(r["preferred_text"].lower(), r["rejected_text"]) for r in rows_of(load(out, "i2t", tmp_path))}
    assert i2t == {("a red square on white", "a blue circle"), ("a red square on white", "static noise"),
                   ("a blue circle", "static noise"), ("two yellow dots", "a yellow dot")}
    colour = {(255, 0, 0): "t0", (0, 255, 0): "t1", (0, 0, 255): "t2", (255, 255, 255): "t3"}
    t2i = {(colour[r["preferred_image"].getpixel((0, 0))], colour[r["rejected_image"].getpixel((0, 0))])
           for r in rows_of(load(out, "t2i", tmp_path))}
    assert t2i == {("t0", "t1"), ("t0", "t2"), ("t0", "t3"), ("t1", "t2"), ("t3", "t1"), ("t3", "t2")}


def test_cycleprefdb_reads_the_authors_make_dataset_output_like_the_hub_files(tmp_path):
    """make_dataset.py (hjbahng/cyclereward) writes <split>_rankings.json, each a JSON list of the same records."""
    for task in ("i2t", "t2i"):
        shutil.copytree(FIXTURE / task / "images", tmp_path / task / "images")
        for jsonl in (FIXTURE / task).glob("*.jsonl"):
            records = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
            (tmp_path / task / f"{jsonl.stem}_rankings.json").write_text(json.dumps(records))
    counts = cycleprefdb.import_cycleprefdb(tmp_path / "root", tmp_path / "i2t", tmp_path / "t2i")
    assert counts == {"inputs": 5, "quarantined": 3, "i2t_candidates": 9, "t2i_candidates": 5}


def test_cycleprefdb_layout_errors_are_named(tmp_path):
    (tmp_path / "train.jsonl").write_text(json.dumps({"input": "x", "texts": ["a"], "scores": [0.1]}) + "\n")
    with pytest.raises(cycleprefdb.CyclePrefDBError, match=r"train.jsonl:1: none of the keys \['generations'"):
        cycleprefdb.read_task("t2i", tmp_path)
    with pytest.raises(cycleprefdb.CyclePrefDBError, match="no train/valid/test"):
        cycleprefdb.read_task("t2i", tmp_path / "nowhere")


def test_cycleprefdb_card_reconstruction_paths_are_checked_not_read(tmp_path):
    """The I2T card's per-record reconstruction paths (the fixture's first I2T record has them; no file exists)."""
    first = json.loads((FIXTURE / "i2t" / "train.jsonl").read_text().splitlines()[0])
    assert len(first["reconstructions"]) == len(first["generations"])
    shutil.copytree(FIXTURE / "i2t" / "images", tmp_path / "images")
    (tmp_path / "train.jsonl").write_text(json.dumps({**first, "reconstructions": first["reconstructions"][:2]}))
    with pytest.raises(cycleprefdb.CyclePrefDBError, match="train.jsonl:1: reconstructions must be a list of 4"):
        cycleprefdb.read_task("i2t", tmp_path)


def test_cycleprefdb_per_pair_records_become_a_pair_file(tmp_path):
    """The per-pair dicts of the authors' dataset/dataset.py make_data (DATA_KEY_MAPPING)."""
    shutil.copytree(FIXTURE / "t2i" / "images", tmp_path / "t2i" / "images")
    shutil.copytree(FIXTURE / "i2t" / "images", tmp_path / "i2t" / "images")
    (tmp_path / "i2t" / "train.json").write_text(json.dumps([
        {"image": "images/photo0.png", "preferred_text": "a red square", "rejected_text": "a blue circle"},
        {"image": "images/gone.png", "preferred_text": "a", "rejected_text": "b"}]))
    (tmp_path / "t2i" / "valid.jsonl").write_text(json.dumps(
        {"prompt": "a red square", "preferred_image": "images/t0.png", "rejected_image": "images/t2.png"}) + "\n")
    with pytest.raises(cycleprefdb.CyclePrefDBError, match=r"train.json\[0\]: a per-pair record.*--pairs-out"):
        cycleprefdb.read_task("i2t", tmp_path / "i2t")
    cycleprefdb.main(["--i2t", str(tmp_path / "i2t"), "--t2i", str(tmp_path / "t2i"), "--pairs-out",
                      str(tmp_path / "out")])
    from cyclepref.reward.benchmarks import load_benchmark

    i2t = load_benchmark(tmp_path / "out" / "i2t" / "pairs.jsonl")["i2t"]
    t2i = load_benchmark(tmp_path / "out" / "t2i" / "pairs.jsonl")["t2i"]
    assert [(r["chosen"], r["rejected"]) for r in i2t.records] == [("a red square", "a blue circle")]
    assert t2i.example(0).chosen.getpixel((0, 0)) == (255, 0, 0) and t2i.example(0).prompt == "a red square"
    with pytest.raises(cycleprefdb.CyclePrefDBError, match="not a per-pair t2i record"):
        cycleprefdb.convert_pair_records("t2i", FIXTURE / "t2i", tmp_path / "x")


# ---------------------------------------------------------------- the stages


def test_stages_gate_build_pairs_gate_export(tmp_path, mlflow_uri, world, capsys):
    from tasks import build_pairs as build_stage
    from tasks import export_dataset as export_stage
    from tasks import gate

    write_tables(tmp_path, {k: world[k] for k in ("inputs", "quarantine", "i2t_candidates", "t2i_candidates",
                                                   "i2t_scores", "t2i_scores")})
    write_params(tmp_path, build_pairs=BuildPairs().model_dump(mode="json"), gates=Gates().model_dump(mode="json"),
                 export_dataset=ExportDataset(name="fixture", rows_per_shard=4).model_dump(mode="json"))
    with pytest.raises(SystemExit, match="dvc repro gate@i2t_scores"):
        build_stage.main()
    for name in ("i2t_scores", "t2i_scores"):
        gate.main([name])
    build_stage.main()
    pairs = store.read_table(tmp_path / PATHS["pairs"])
    assert pairs.equals(world["pairs"])
    metrics = json.loads((tmp_path / "reports/pairs.json").read_text())
    assert metrics["pairs"] == pairs.num_rows and set(metrics["tasks"]) == {"i2t", "t2i"}
    assert metrics["tasks"]["t2i"]["models"]["gen-a"]["wins"] + metrics["tasks"]["t2i"]["models"]["gen-b"]["wins"] \
        == metrics["tasks"]["t2i"]["pairs"]
    with pytest.raises(SystemExit, match="gate@inputs"):
        export_stage.main()
    for name in ("inputs", "t2i_candidates"):
        gate.main([name])
    with pytest.raises(SystemExit, match="gate@pairs"):
        export_stage.main()
    gate.main(["pairs"])
    export_stage.main()
    out = tmp_path / "data/export/dataset"
    assert sum(len(s) for s in load(out, "t2i", tmp_path).values()) == metrics["tasks"]["t2i"]["pairs"]
    card = (out / "README.md").read_text()
    assert "# fixture" in card and f"Total: {pairs.num_rows} pairs." in card
    assert "export_dataset: i2t_train=" in capsys.readouterr().out


def test_export_with_image_files_writes_each_image_once(tmp_path, world):
    out = tmp_path / "export"
    cands = {"i2t": world["i2t_scores"].select(["candidate_id", "text"]),
             "t2i": world["t2i_candidates"].select(["candidate_id", "image"])}
    write_export(out, world["pairs"], world["inputs"], cands, ExportDataset(embed_images=False))
    pairs = world["pairs"].to_pandas()
    i2t = rows_of(load(out, "i2t", tmp_path))
    assert {r["image"] for r in i2t} == {f"images/inputs/{i}.png" for i in pairs.loc[pairs.task == "i2t", "input_id"]}
    t2i = pairs[pairs.task == "t2i"]
    used = set(t2i["preferred_id"]) | set(t2i["rejected_id"])
    assert sorted(p.stem for p in (out / "images/candidates").iterdir()) == sorted(used)
    image_of = dict(zip(*(world["t2i_candidates"].column(c).to_pylist() for c in ("candidate_id", "image")),
                        strict=True))
    row = rows_of(load(out, "t2i", tmp_path))[0]
    assert (out / row["preferred_image"]).read_bytes() == image_of[row["preferred_id"]]
    assert "images/candidates/" + next(iter(used)) + ".png" in json.loads((out / "_manifest.json").read_text())["files"]
