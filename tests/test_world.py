"""The sandbox world: scenes, captions, parsers and F1 (the ground-truth judges every sandbox number rests on)."""

import random

import pytest

from cyclepref.world import data
from cyclepref.world.parse import as_parsed, f1, parse_caption, parse_image
from cyclepref.world.scene import (
    COLOURS,
    IMAGE_SIZE,
    POSITIONS,
    SHAPES,
    WorldObject,
    caption,
    generate_scenes,
    paraphrase,
    render,
    scene_from_record,
    scene_record,
)


def test_scenes_are_seeded_and_follow_the_world_rules():
    a, b = generate_scenes(300, seed=3), generate_scenes(300, seed=3)
    assert a == b and a != generate_scenes(300, seed=4)
    for s in a:
        assert 1 <= len(s) <= 3
        assert len({o.position for o in s}) == len(s)
        assert [POSITIONS.index(o.position) for o in s] == sorted(POSITIONS.index(o.position) for o in s)
    seen = {(o.shape, o.colour, o.size) for s in a for o in s}
    assert {x[0] for x in seen} == set(SHAPES) and {x[1] for x in seen} == set(COLOURS)


def test_image_parser_recovers_every_object_of_clean_renders():
    scenes = generate_scenes(1000, seed=1)
    exact = sum(
        {o["position"]: o for o in parse_image(render(s))}.get(o["position"]) == o for s in scenes for o in as_parsed(s)
    )
    total = sum(len(s) for s in scenes)
    assert exact / total >= 0.95
    assert exact == total


def test_image_parser_finds_nothing_in_an_empty_image_and_reads_each_attribute():
    assert parse_image(render(())) == ()
    for shape in SHAPES:
        for size in ("small", "large"):
            obj = WorldObject("bottom right", shape, "purple", size)
            assert parse_image(render((obj,))) == as_parsed((obj,))


def test_caption_parser_reads_canonical_captions_and_every_paraphrase():
    rng = random.Random(0)
    for s in generate_scenes(500, seed=2):
        truth = as_parsed(s)
        assert sorted(map(str, parse_caption(caption(s)))) == sorted(map(str, truth))
        assert f1(parse_caption(paraphrase(s, rng)), truth) == 1.0


def test_f1_counts_attributes_of_matched_objects():
    red = WorldObject("top left", "circle", "red", "large")
    blue = WorldObject("bottom right", "square", "blue", "small")
    truth = as_parsed((red, blue))
    assert f1(truth, truth) == 1.0
    assert f1((), ()) == 1.0 and f1((), truth) == 0.0 and f1(truth, ()) == 0.0
    one_wrong = as_parsed((red, WorldObject("bottom right", "square", "green", "small")))
    assert f1(one_wrong, truth) == pytest.approx(7 / 8)
    missing = as_parsed((red,))
    precision, recall = 4 / 4, 4 / 8
    assert f1(missing, truth) == pytest.approx(2 * precision * recall / (precision + recall))
    swapped = as_parsed((blue, red))
    assert f1(swapped, truth) == 1.0
    assert f1(parse_caption("a large red circle at the top left."), truth) == f1(missing, truth)
    assert f1(parse_caption("a red circle"), as_parsed((red,))) == pytest.approx(0.5)


def test_parts_never_share_a_scene_and_records_round_trip():
    parts = {p: {caption(s) for s in data.scenes(p, 150, seed=0)} for p in data.PARTS}
    assert all(len(v) == 150 for v in parts.values())
    assert not (parts["train"] & parts["pipeline"]) and not (parts["train"] & parts["benchmark"])
    assert not (parts["pipeline"] & parts["benchmark"])
    s = data.scenes("benchmark", 5, seed=0)
    assert [scene_from_record(scene_record(x)) for x in s] == s
    with pytest.raises(ValueError, match="unknown part"):
        data.scenes("test", 1, seed=0)


def test_renders_are_the_world_size_and_objects_centred_on_whole_pixels():
    obj = WorldObject("top right", "square", "green", "small")
    img = render((obj,))
    assert img.size == (IMAGE_SIZE, IMAGE_SIZE)
    px = img.load()
    assert px[IMAGE_SIZE * 3 // 4, IMAGE_SIZE // 4] == COLOURS["green"]
    assert px[IMAGE_SIZE // 4, IMAGE_SIZE // 4] == (255, 255, 255)


def test_alt_text_is_partial_order_free_and_sometimes_wrong_at_the_stated_rates():
    import random

    from cyclepref.world.alttext import ALT_TEXT, OFF_TOPIC, alt_text
    from cyclepref.world.data import scenes
    from cyclepref.world.parse import parse_caption
    from cyclepref.world.scene import caption

    rng = random.Random(0)
    world = [s for s in scenes("train", 3000, 0) if len(s) == 3]
    named = sizes = positions = off = 0
    for s in world:
        text = alt_text(s, rng)
        objects = parse_caption(text)
        if text.rstrip(".") in OFF_TOPIC:
            off += 1
            continue
        assert 1 <= len(objects) <= 3 and text != caption(s)
        named += len(objects)
        sizes += sum(o["size"] is not None for o in objects)
        positions += sum(o["position"] is not None for o in objects)
    n = len(world) - off
    assert off / len(world) == pytest.approx(ALT_TEXT.off_topic, abs=0.02)
    # three objects each named with p = mention, at least one always: 3p + (1-p)^3
    p = ALT_TEXT.mention
    assert named / n == pytest.approx(3 * p + (1 - p) ** 3, abs=0.06)
    assert sizes / named == pytest.approx(1 - ALT_TEXT.drop_size, abs=0.04)
    assert positions / named == pytest.approx(1 - ALT_TEXT.drop_position, abs=0.04)
