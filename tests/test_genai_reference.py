"""GenAI-Bench: the reference metric of linzhiqiu/t2v_metrics (pairwise accuracy with tie calibration over all image
pairs, dataset.py GenAIBench_Image.correlation -> tau_optimization.py acc_23) and the 1600-prompt release's layout
(one <model>.zip per model beside genai_image.json, dataset.py GenAIBench_Image)."""

import itertools
import json
import zipfile

import numpy as np
import pytest
from test_reward_eval import write_genai_bench

from cyclepref.reward.benchmarks import (
    convert_genai_bench,
    load_benchmark,
    load_ratings,
    ratings_pairset,
    reference_accuracies,
    tie_calibrated_accuracy,
)


def test_tie_calibrated_accuracy_on_small_tables_by_hand():
    # pairs (0,1) (0,2) (0,3) (1,2) (1,3) (2,3): five concordant, (1,2) tied in the human score with |dm| = 0.05;
    # eps = 0 gives 5/6; eps = 0.05 turns (1,2) into a tie on both sides without touching a concordant pair: 6/6
    assert tie_calibrated_accuracy([1, 2, 2, 3], [0.1, 0.5, 0.45, 0.9]) == pytest.approx((1.0, 0.05))
    # (0,1) discordant, (0,2) and (1,2) concordant, no human ties: 2/3 at eps 0
    assert tie_calibrated_accuracy([1, 2, 3], [0.3, 0.2, 0.9]) == pytest.approx((2 / 3, 0.0))
    # an exact metric tie on a human tie counts at eps 0: 3/3
    assert tie_calibrated_accuracy([2, 2, 1], [0.5, 0.5, 0.1]) == pytest.approx((1.0, 0.0))
    # concordant (0,2) (0,3) (2,3) with |dm| .1 .2 .1, discordant (1,2) (1,3), human tie (0,1) with |dm| .3:
    # eps 0 -> 3/6; eps .1 -> 1/6; eps .3 -> 1/6 (the tie gained, all concordant lost): best 1/2 at eps 0
    assert tie_calibrated_accuracy([1, 1, 2, 3], [0.0, 0.3, 0.1, 0.2]) == pytest.approx((0.5, 0.0))


def _reference(human, metric):
    """The definition, literally: every threshold in {0} + {|m_i - m_j|}, acc_23 over all pairs, the maximum."""
    pairs = list(itertools.combinations(range(len(human)), 2))
    best = (-1.0, 0.0)
    for eps in sorted({0.0} | {abs(metric[i] - metric[j]) for i, j in pairs}):
        good = 0
        for i, j in pairs:
            dh, dm = human[i] - human[j], metric[i] - metric[j]
            if abs(dm) <= eps:
                good += dh == 0
            else:
                good += dh * dm > 0
        if good / len(pairs) > best[0]:
            best = (good / len(pairs), eps)
    return best


def test_tie_calibrated_accuracy_equals_the_definition_on_random_tables():
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(2, 12))
        human = list(rng.integers(1, 4, n) / 2.0)
        metric = list(np.round(rng.random(n), 1))
        assert tie_calibrated_accuracy(human, metric) == pytest.approx(_reference(human, metric))


def _zip_release(src, dst):
    """The 1600 release's files: genai_image.json and one zip per model holding <model>/<idx>.jpeg."""
    dst.mkdir()
    (dst / "genai_image.json").write_text((src / "genai_image.json").read_text())
    for folder in [p for p in src.iterdir() if p.is_dir()]:
        with zipfile.ZipFile(dst / f"{folder.name}.zip", "w") as z:
            for f in sorted(folder.iterdir()):
                z.write(f, f"{folder.name}/{f.name}")


def test_genai_bench_1600_zips_convert_like_the_unzipped_folders(tmp_path):
    folders = tmp_path / "GenAI-Image-527"
    folders.mkdir()
    write_genai_bench(folders)
    _zip_release(folders, tmp_path / "GenAI-Image-1600")
    a = convert_genai_bench(folders, tmp_path / "a")
    b = convert_genai_bench(tmp_path / "GenAI-Image-1600", tmp_path / "b")
    assert a == b and a["pairs"] == 3 and a["rated_images"] == 5
    for name in ("pairs.jsonl", "ratings.jsonl"):
        assert (tmp_path / "a" / name).read_text() == (tmp_path / "b" / name).read_text()
    ratings = load_ratings(tmp_path / "b" / "ratings.jsonl")
    assert sorted((r["prompt_idx"], r["model"], r["human"]) for r in ratings) == [
        ("00000", "DALLE_3", pytest.approx(14 / 3)), ("00000", "Midjourney_6", 5.0),
        ("00000", "SDXL_Turbo", pytest.approx(8 / 3)), ("00001", "DALLE_3", 3.0), ("00001", "SDXL_Turbo", 3.0)]
    assert load_benchmark(tmp_path / "b" / "pairs.jsonl")["t2i"].example(0).chosen.size == (8, 8)


class _PixelScorer:
    """Scores a T2I example by its chosen image's red channel (the fixture's images differ in it by prompt)."""

    name = "red"

    def reset(self, pairset):
        pass

    def score(self, examples):
        s = np.array([e.chosen.getpixel((4, 4))[0] for e in examples], dtype=float)
        return s, s


def test_reference_accuracy_scores_every_rated_image_once(tmp_path):
    src = tmp_path / "GenAI-Image-527"
    src.mkdir()
    write_genai_bench(src)
    convert_genai_bench(src, tmp_path / "out")
    ratings = tmp_path / "out" / "ratings.jsonl"
    pairset = ratings_pairset(ratings)
    assert len(pairset) == 5 and all(r["chosen"] == r["rejected"] for r in pairset.records)
    got = reference_accuracies(ratings, [_PixelScorer()], batch_size=2)["red"]
    human = [r["human"] for r in pairset.records]
    red = [float(pairset.example(i).chosen.getpixel((4, 4))[0]) for i in range(len(pairset))]
    assert got["images"] == 5
    assert (got["pairwise_acc_tie_calibrated"], got["epsilon"]) == pytest.approx(_reference(human, red))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "x", "prompt": "p", "image": "../secret.jpg", "human": 1.0}) + "\n")
    with pytest.raises(Exception, match="bad.jsonl:1: image"):
        load_ratings(bad)
