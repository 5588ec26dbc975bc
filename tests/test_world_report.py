"""Ground-truth scoring of the sandbox: cycle-vs-truth agreement, benchmark labels, parser accuracy."""

import pytest
from PIL import Image

from cyclepref.world import benchmark as bm
from cyclepref.world import report as rp
from cyclepref.world.data import scenes


def test_agreement_counts_pairs_the_truth_also_prefers_and_leaves_out_truth_ties():
    f1 = {"a": 1.0, "b": 0.5, "c": 0.5, "d": 0.0}
    pairs = {"preferred_id": ["a", "b", "d", "b", "a", "x"], "rejected_id": ["b", "d", "a", "c", "d", "a"],
             "margin": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]}
    out = rp.agreement(pairs, f1)
    assert out["pairs"] == 5 and out["ground_truth_ties"] == 1
    assert out["overall"]["n"] == 4 and out["overall"]["value"] == pytest.approx(3 / 4)
    assert out["overall"]["ci95_low"] < 0.75 < out["overall"]["ci95_high"]
    assert sum(b["n"] for b in out["by_margin"]) >= 4


def test_agreement_by_margin_separates_confident_from_unsure_pairs():
    f1 = {f"good{i}": 1.0 for i in range(40)} | {f"bad{i}": 0.0 for i in range(40)}
    right = [(f"good{i}", f"bad{i}", 0.5 + i) for i in range(20)]
    wrong = [(f"bad{i}", f"good{i}", 0.01 * i) for i in range(20, 40)]
    p, r, m = zip(*(right + wrong))
    out = rp.agreement({"preferred_id": p, "rejected_id": r, "margin": m}, f1)
    assert out["overall"]["value"] == pytest.approx(0.5)
    assert out["by_margin"][0]["value"] == 0.0 and out["by_margin"][-1]["value"] == 1.0


def test_benchmark_labels_prefer_the_truly_better_candidate():
    cands = [bm.Candidate(0, "m1", "a red circle", 0.4), bm.Candidate(0, "m2", "A red circle ", 0.4),
             bm.Candidate(0, "m3", "a blue square", 0.9), bm.Candidate(0, "m4", "a blue circle", 0.42),
             bm.Candidate(1, "m1", "a green circle", 0.1)]
    pairs = bm.labelled_pairs(cands, min_gap=0.05)
    assert {(c.model, r.model) for c, r in pairs} == {("m3", "m1"), ("m3", "m2"), ("m3", "m4")}
    assert all(c.truth_f1 > r.truth_f1 for c, r in pairs)


def test_parser_accuracy_is_one_on_clean_renders_and_zero_on_blank_images():
    drawn = scenes("benchmark", 40, seed=0)
    assert rp.parser_accuracy(drawn)["exact"]["value"] == 1.0
    blank = rp.parser_accuracy(drawn, lambda ims: [Image.new("RGB", im.size, "white") for im in ims])
    assert blank["exact"]["value"] == 0.0 and blank["colour"] == 0.0


def test_mean_interval_contains_the_mean():
    e = rp.mean_interval([0.0, 1.0] * 50)
    assert e["value"] == 0.5 and e["ci95_low"] < 0.5 < e["ci95_high"] and e["n"] == 100


def test_fidelity_counts_exact_scenes_object_counts_and_f1():
    from cyclepref.world.parse import parse_caption, parse_image
    from cyclepref.world.scene import WorldObject, caption, render

    a = (WorldObject("top left", "circle", "red", "large"),)
    b = (WorldObject("top left", "circle", "red", "large"), WorldObject("bottom right", "square", "blue", "small"))
    wrong_colour = (WorldObject("top left", "circle", "green", "large"),)
    texts = [parse_caption(caption(a)), parse_caption(caption(b)), parse_caption(caption(a))]
    images = [parse_image(render(a)), parse_image(render(a)), parse_image(render(wrong_colour))]
    out = rp.fidelity(texts, images)
    assert out["exact_scene"]["value"] == pytest.approx(1 / 3) and out["exact_scene"]["n"] == 3
    assert out["object_count"]["value"] == pytest.approx(2 / 3)
    # F1 of the image against the text: 1; one of two objects drawn (precision 1, recall 1/2); 3 of 4 attributes
    assert out["f1"]["value"] == pytest.approx((1 + 2 / 3 + 0.75) / 3)


def test_rouge_l_is_the_lcs_f_measure_of_word_sequences():
    assert rp.rouge_l("a red circle at the top left.", "a red circle at the top left") == 1.0
    # LCS of (a red circle) and (a blue circle) is 2 words: F = 2 * 2 / (3 + 3)
    assert rp.rouge_l("a red circle", "a blue circle") == pytest.approx(2 / 3)
    assert rp.rouge_l("red", "") == 0.0 and rp.rouge_l("x y", "z") == 0.0


def test_metric_agreement_builds_pairs_by_the_pair_rule_and_scores_them_against_truth():
    scores = {"input_id": ["i"] * 3 + ["j"] * 2, "candidate_id": ["a", "b", "c", "d", "e"],
              "model": ["m"] * 5, "score": [0.9, 0.5, 0.501, 0.2, 0.8]}
    f1 = {"a": 1.0, "b": 0.5, "c": 0.0, "d": 1.0, "e": 0.0}
    out = rp.metric_agreement(scores, f1, tie_gap=0.005, quality_limit=None)
    # pairs: a>b (right), a>c (right), b~c dropped as a near-tie, e>d (wrong)
    assert out["pairs"] == 3 and out["overall"]["value"] == pytest.approx(2 / 3)
    limited = rp.metric_agreement(scores, f1, tie_gap=0.005, quality_limit=0.85)
    assert limited["pairs"] == 2 and limited["overall"]["value"] == 1.0
