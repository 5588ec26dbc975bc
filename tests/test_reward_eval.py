"""Evaluation: accuracy and intervals, scorers and baselines, the pair format and the benchmark converters."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cyclepref.models.similarity import ImageEmbedder
from cyclepref.reward.benchmarks import (
    BenchmarkFormatError,
    convert_detailcaps,
    convert_genai_arena,
    convert_genai_bench,
    load_benchmark,
)
from cyclepref.reward.evaluate import (
    ClipScorer,
    RandomScorer,
    RewardScorer,
    Scorer,
    evaluate_pairset,
    flat_metrics,
    pair_outcomes,
    paired_gains,
    paired_markdown,
    pairset_outcomes,
    pairwise_accuracy,
    pooled,
    report_markdown,
    wilson,
)
from cyclepref.reward.model import RewardModel
from cyclepref.reward.synthetic import colour_pairs


def png(rgb: tuple[int, int, int], size: int = 16) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), rgb).save(buf, format="PNG")
    return buf.getvalue()


def test_accuracy_counts_ties_as_half_with_a_wilson_interval():
    acc = pairwise_accuracy([3, 2, 1, 5], [1, 2, 4, 0])
    assert (acc.accuracy, acc.n, acc.ties) == (0.625, 4, 1)
    assert acc.ci95_low < 0.625 < acc.ci95_high
    lo, hi = wilson(0.5, 100)
    assert (round(lo, 4), round(hi, 4)) == (0.4038, 0.5962)
    assert wilson(1.0, 20)[1] == 1.0 and wilson(0.0, 20)[0] == 0.0
    assert pairwise_accuracy([], []).accuracy is None


class ByIdScorer(Scorer):
    name = "by-id"

    def __init__(self, scores: dict[str, tuple[float, float]]):
        self.scores = scores

    def score(self, examples):
        return tuple(np.array([self.scores[e.pair_id][k] for e in examples]) for k in (0, 1))


def test_pair_outcomes_are_aligned_by_pair_with_ties_one_half():
    assert pair_outcomes([3, 2, 1, 5], [1, 2, 4, 0]).tolist() == [1.0, 0.5, 0.0, 1.0]
    with pytest.raises(ValueError, match="rejected"):
        pair_outcomes([1, 2], [1])
    pairs = colour_pairs("t2i", 7, seed=2)
    ids = [pairs.example(i).pair_id for i in range(7)]
    expected = [1.0, 0.0, 0.5, 0.0, 1.0, 1.0, 0.0]
    scorer = ByIdScorer({pid: (o, 1 - o) for pid, o in zip(ids, expected, strict=True)})
    assert pairset_outcomes(pairs, scorer, batch_size=3).tolist() == expected
    assert evaluate_pairset(pairs, [scorer], 3)["by-id"].accuracy == pytest.approx(3.5 / 7)


def test_scorers_on_a_pair_set(zoo):
    pairs = colour_pairs("i2t", 40, seed=3)
    model = RewardModel.from_backbone(str(zoo / "tiny-blip-itm"), max_length=16)
    clip = ClipScorer(ImageEmbedder(str(zoo / "tiny-open-clip")))
    embedded = []
    original = clip.embedder.embed_images
    clip.embedder.embed_images = lambda ims, *a, **k: (embedded.append(len(ims)), original(ims, *a, **k))[1]
    results = evaluate_pairset(pairs, [RewardScorer("rm", model), clip, RandomScorer(0)], batch_size=16)
    assert results["cycle"].accuracy == 1.0
    assert sum(embedded) == 40
    assert 0.25 < results["random"].accuracy < 0.75
    images = [pairs.example(i).image for i in range(40)]
    direct = model.score(images, [pairs.example(i).chosen for i in range(40)])
    direct_rej = model.score(images, [pairs.example(i).rejected for i in range(40)])
    assert results["rm"].accuracy == pytest.approx(pairwise_accuracy(direct.numpy(), direct_rej.numpy()).accuracy)
    t2i = evaluate_pairset(colour_pairs("t2i", 8, seed=1), [clip, RandomScorer(0)], batch_size=3)
    assert t2i["clipscore"].n == 8
    assert evaluate_pairset(colour_pairs("t2i", 5, 1), [RandomScorer(1)], 2)["random"].accuracy == \
        evaluate_pairset(colour_pairs("t2i", 5, 1), [RandomScorer(1)], 4)["random"].accuracy


def test_report_markdown_and_flat_metrics():
    acc = pairwise_accuracy([1, 2], [0, 3]).as_dict()
    report = {"results": {"test": {"i2t": {"pairs": 2, "scores": {"rm": acc, "cycle": None}}}},
              "notes": {"cycle": "label agreement"}}
    md = report_markdown(report)
    assert "| rm | 50.00 |" in md and "| cycle | n/a |" in md and "- cycle: label agreement" in md
    assert flat_metrics(report) == {"test.i2t.rm.accuracy": 0.5, "test.i2t.rm.ci95_low": acc["ci95_low"],
                                    "test.i2t.rm.ci95_high": acc["ci95_high"]}


def test_pair_format_loads_both_tasks_and_rejects_bad_lines(tmp_path):
    (tmp_path / "images").mkdir()
    for name, rgb in (("a.png", (255, 0, 0)), ("b.png", (0, 0, 255))):
        (tmp_path / "images" / name).write_bytes(png(rgb))
    lines = [
        {"id": "1", "task": "i2t", "image": "images/a.png", "chosen": "red", "rejected": "blue",
         "chosen_cycle_score": 0.2, "rejected_cycle_score": 0.4, "cycle_direction": "lower"},
        {"id": "2", "task": "t2i", "prompt": "a red thing", "chosen": "images/a.png", "rejected": "images/b.png"},
    ]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    sets = load_benchmark(path)
    assert sorted(sets) == ["i2t", "t2i"]
    assert sets["i2t"].example(0).image.getpixel((0, 0)) == (255, 0, 0)
    assert sets["i2t"].cycle_scores()[0].tolist() == [-0.2]
    assert sets["t2i"].example(0).rejected.getpixel((0, 0)) == (0, 0, 255) and sets["t2i"].cycle_scores() is None
    path.write_text(json.dumps({"id": "3", "task": "t2i", "prompt": "x", "chosen": "images/a.png"}) + "\n")
    with pytest.raises(BenchmarkFormatError, match="pairs.jsonl:1: t2i pair needs.*rejected"):
        load_benchmark(path)
    path.write_text('{"task": "v2v"}\n')
    with pytest.raises(BenchmarkFormatError, match="'task' must be one of"):
        load_benchmark(path)


def detailcaps_row(source, image, colour, captions: dict, gpt4_eval) -> dict:
    """One row of DetailCaps-4870.parquet: source / image / binary / GT_Caption_* as confirmed by the dataset card and
    lmms-eval tasks/detailcaps/utils.py; the caption columns and GPT4_Eval are the converter's unconfirmed
    assumption."""
    return {"source": source, "image": image, "binary": png(colour), "GT_Caption_GPT4V": "gt v",
            "GT_Caption_GPT4O": "gt o", "GT_Caption_Gemini15Pro": "gt g", **captions,
            "GPT4_Eval": None if gpt4_eval is None else json.dumps(gpt4_eval)}


def test_detailcaps_converter(tmp_path):
    rows = [
        detailcaps_row("COCO", "coco/1.jpg", (10, 20, 30),
                       {"CogVLM": "cog caption", "ShareCaptioner": "share caption", "LLaVA_v15": "llava caption"},
                       {"CogVLM": 3.5, "ShareCaptioner": "4", "LLaVA_v15": 2}),
        detailcaps_row("SAM", "sam/2", (40, 50, 60), {"CogVLM": "a", "ShareCaptioner": "b", "LLaVA_v15": "c"}, None),
        detailcaps_row("LAION", "http://x/3.jpg", (70, 80, 90),
                       {"CogVLM": "x", "ShareCaptioner": "y", "LLaVA_v15": "z"},
                       {"CogVLM": 3, "ShareCaptioner": 3, "LLaVA_v15": 1, "GT_Caption_GPT4V": 5}),
    ]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "DetailCaps-4870.parquet")
    stats = convert_detailcaps(tmp_path / "DetailCaps-4870.parquet", tmp_path / "out")
    assert stats == {"pairs": 5, "rows": 3, "skipped_no_eval": 1, "skipped_tied_pairs": 1}
    sets = load_benchmark(tmp_path / "out" / "pairs.jsonl")
    i2t = sets["i2t"]
    got = {(r["chosen"], r["rejected"]) for r in i2t.records}
    assert got == {("share caption", "cog caption"), ("share caption", "llava caption"),
                   ("cog caption", "llava caption"), ("x", "z"), ("y", "z")}
    assert i2t.example(0).image.getpixel((0, 0)) == (10, 20, 30)
    assert len(list((tmp_path / "out" / "images").iterdir())) == 2


def test_detailcaps_without_the_assumed_score_column_stops_and_names_the_columns(tmp_path):
    row = detailcaps_row("COCO", "coco/1.jpg", (1, 2, 3), {"CogVLM": "a", "ShareCaptioner": "b"}, None)
    del row["GPT4_Eval"]
    pq.write_table(pa.Table.from_pylist([row]), tmp_path / "DetailCaps-4870.parquet")
    message = "no GPT-4 score column 'GPT4_Eval'.*assumed, not confirmed.*GT_Caption_GPT4O"
    with pytest.raises(ValueError, match=message):
        convert_detailcaps(tmp_path / "DetailCaps-4870.parquet", tmp_path / "out")
    assert not (tmp_path / "out" / "pairs.jsonl").exists()


def write_genai_bench(root) -> None:
    """A miniature GenAI-Image-527 folder as linzhiqiu/t2v_metrics dataset.py GenAIBench_Image reads it
    (zhiqiulin/GenAI-Bench-527): genai_image.json {idx: {"prompt", "models": {model: [ratings]}}} and
    <model>/<idx>.jpeg. Prompt indices are zero-padded here; the converter uses them verbatim as file stems."""
    meta = {
        "00000": {"prompt": "a cat on a mat", "models": {"DALLE_3": [5, 4, 5], "SDXL_Turbo": [2, 3, 3],
                                                         "Midjourney_6": [5, 5, 5]}},
        "00001": {"prompt": "two red apples", "models": {"DALLE_3": [3, 3, 3], "SDXL_Turbo": [4, 2, 3],
                                                         "Midjourney_6": [1, 1, 2]}},
    }
    (root / "genai_image.json").write_text(json.dumps(meta))
    for n, (idx, entry) in enumerate(meta.items()):
        for k, model in enumerate(entry["models"]):
            if (idx, model) == ("00001", "Midjourney_6"):
                continue
            (root / model).mkdir(exist_ok=True)
            Image.new("RGB", (8, 8), (40 * n, 40 * k, 7)).save(root / model / f"{idx}.jpeg", quality=100)


def test_genai_bench_ratings_converter(tmp_path):
    src = tmp_path / "GenAI-Image-527"
    src.mkdir()
    write_genai_bench(src)
    stats = convert_genai_bench(src, tmp_path / "out")
    assert stats == {"pairs": 3, "prompts": 2, "rated_images": 5, "skipped_tied_pairs": 1,
                     "skipped_unrated_or_missing_images": 1}
    t2i = load_benchmark(tmp_path / "out" / "pairs.jsonl")["t2i"]
    got = {(r["prompt"], r["meta"]["chosen_model"], r["meta"]["rejected_model"]) for r in t2i.records}
    assert got == {("a cat on a mat", "DALLE_3", "SDXL_Turbo"), ("a cat on a mat", "Midjourney_6", "SDXL_Turbo"),
                   ("a cat on a mat", "Midjourney_6", "DALLE_3")}
    best = next(i for i, r in enumerate(t2i.records) if r["meta"]["rejected_model"] == "DALLE_3")
    assert t2i.records[best]["meta"]["chosen_mean_rating"] == 5.0
    assert t2i.example(best).chosen.getpixel((4, 4))[1] > 70
    assert {r["group"] for r in t2i.records} == {"genai-00000"}


def test_genai_arena_votes_converter(tmp_path):
    img = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    rows = [
        {"prompt": "a cat", "left_image": {"bytes": png((1, 1, 1)), "path": None},
         "right_image": {"bytes": png((2, 2, 2)), "path": None}, "vote_type": "leftvote", "left_model": "A",
         "right_model": "B"},
        {"prompt": "a dog", "left_image": {"bytes": png((3, 3, 3)), "path": None},
         "right_image": {"bytes": png((4, 4, 4)), "path": None}, "vote_type": "rightvote", "left_model": "A",
         "right_model": "C"},
        {"prompt": "a cow", "left_image": {"bytes": png((5, 5, 5)), "path": None},
         "right_image": {"bytes": png((6, 6, 6)), "path": None}, "vote_type": "tievote", "left_model": "A",
         "right_model": "C"},
        {"prompt": "a bat", "left_image": {"bytes": png((7, 7, 7)), "path": None},
         "right_image": {"bytes": png((8, 8, 8)), "path": None}, "vote_type": "bothbad_vote", "left_model": "B",
         "right_model": "C"},
    ]
    schema = pa.schema([("prompt", pa.string()), ("left_image", img), ("right_image", img),
                        ("vote_type", pa.string()), ("left_model", pa.string()), ("right_model", pa.string())])
    (tmp_path / "src" / "image_generation").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema), tmp_path / "src" / "image_generation" / "train-0.parquet")
    stats = convert_genai_arena(tmp_path / "src", tmp_path / "out")
    assert stats == {"pairs": 2, "rows": 4, "skipped_tievote": 1, "skipped_bothbad_vote": 1}
    t2i = load_benchmark(tmp_path / "out" / "pairs.jsonl")["t2i"]
    first, second = t2i.example(0), t2i.example(1)
    assert first.prompt == "a cat" and first.chosen.getpixel((0, 0)) == (1, 1, 1)
    assert second.prompt == "a dog" and second.chosen.getpixel((0, 0)) == (4, 4, 4)
    assert t2i.records[1]["meta"] == {"vote_type": "rightvote", "chosen_model": "C", "rejected_model": "A"}
    assert len(t2i) == 2


def test_backbone_zero_shot_scores_are_the_itm_margin_and_the_itc_cosine(zoo):
    import torch
    from transformers import AutoProcessor, BlipForImageTextRetrieval

    from cyclepref.reward.evaluate import BackboneScorer

    path = str(zoo / "tiny-blip-itm")
    pairs = colour_pairs("i2t", 6, seed=2)
    examples = [pairs.example(i) for i in range(6)]
    itm, itc = BackboneScorer("itm", path, "itm"), BackboneScorer("itc", path, "itc")
    model = BlipForImageTextRetrieval.from_pretrained(path).eval()
    processor = AutoProcessor.from_pretrained(path)
    e = examples[0]
    with torch.no_grad():
        batch = processor(images=[e.image.convert("RGB")], text=[e.rejected], return_tensors="pt")
        logits = model(**batch, use_itm_head=True).itm_score[0]
        cosine = model(**batch, use_itm_head=False).itm_score[0, 0]
    chosen, rejected = itm.score(examples)
    assert chosen.shape == (6,) and rejected[0] == pytest.approx(float(logits[1] - logits[0]), abs=1e-4)
    assert itc.score(examples)[1][0] == pytest.approx(float(cosine), abs=1e-4)
    t2i = [colour_pairs("t2i", 3, seed=1).example(i) for i in range(3)]
    assert itc.score(t2i)[0].shape == (3,)
    with pytest.raises(ValueError, match="itm' or 'itc"):
        BackboneScorer("x", path, "cosine")


def test_paired_gains_compare_each_model_with_every_other_scorer_on_the_same_pairs():
    outcomes = {
        "model": np.array([1, 1, 1, 1, 0, 1, 1, 0.5, 1, 1], dtype=float),
        "other": np.array([0, 1, 0, 1, 0, 0, 1, 0.5, 1, 0], dtype=float),
        "same": np.array([1, 1, 1, 1, 0, 1, 1, 0.5, 1, 1], dtype=float),
        "cycle": None,
    }
    gains = paired_gains(outcomes, ["model"], n_boot=2000)
    assert set(gains) == {"model"} and set(gains["model"]) == {"other", "same"}
    other = gains["model"]["other"]
    assert other["gain"] == pytest.approx(0.4) and other["n"] == 10
    assert 0.0 < other["ci95_low"] < 0.4 < other["ci95_high"] <= 0.7
    assert other["mcnemar_p"] == pytest.approx(2 * 1 / 16)
    same = gains["model"]["same"]
    assert same["gain"] == same["ci95_low"] == same["ci95_high"] == 0.0 and same["mcnemar_p"] == 1.0
    md = paired_markdown({"bench": {"i2t": gains}})
    assert "## bench / i2t: paired comparisons" in md and "| model | other | +40.00 |" in md


def test_pooled_outcomes_put_the_tasks_one_after_the_other_and_drop_scorers_missing_anywhere():
    by_task = {"i2t": {"m": np.array([1.0, 0.0]), "cycle": np.array([1.0, 1.0]), "only_i2t": np.array([1.0, 1.0])},
               "t2i": {"m": np.array([0.5]), "cycle": None}}
    out = pooled(by_task)
    assert set(out) == {"m", "cycle"} and out["cycle"] is None
    assert out["m"].tolist() == [1.0, 0.0, 0.5]
