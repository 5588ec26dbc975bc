"""Every model family of configs/paper.yaml loads through the real adapters (make_captioner / TextToImage) from a
tiny save_pretrained directory of the same class (tests/fixtures/tiny_families.py), and keeps the adapters'
contracts: batched output equals per-item output, the family's prompt format reaches the model, the generation
budget and the dtype setting are honoured."""

import numpy as np
import pytest
import torch
from fixtures import tiny_families as tf
from PIL import Image

from cyclepref import runtime
from cyclepref.config import CaptionerSpec, T2ISpec
from cyclepref.models import captioner as cap_mod
from cyclepref.models import t2i as t2i_mod
from cyclepref.models.formats import DETAILED

# name: (family, builder, text the prompt fed to the model must contain, extra spec fields)
CAPTIONERS = {
    "blip2-opt": ("blip2", tf.build_blip2_opt, ["this is a picture of"], {}),
    "blip2-flan-t5": ("blip2", tf.build_blip2_t5, ["this is a picture of"], {}),
    "llava-next": ("llava_next", tf.build_llava_next, ["[INST]", f"{DETAILED} [/INST]"], {}),
    "llava-onevision": ("llava_onevision", tf.build_llava_onevision, ["user <image>", "<|im_start|>assistant\n"], {}),
    "qwen2-vl": ("qwen2_vl", tf.build_qwen2_vl, ["<|vision_start|><|image_pad|>", "<|im_start|>assistant\n"], {}),
    "internvl2": ("internvl", tf.build_internvl,
                  ["<img><IMG_CONTEXT>",
                   "</img>\nPlease describe the image in detail.<|im_end|><|im_start|>assistant\n"],
                  {"trust_remote_code": True}),
}
T2I = {"sdxl": tf.build_sdxl, "flux": tf.build_flux, "sd3": tf.build_sd3_t5}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Family name -> model directory, each built once per module on first use."""
    root, cache = tmp_path_factory.mktemp("families"), {}

    def get(name: str):
        if name not in cache:
            builder = CAPTIONERS[name][1] if name in CAPTIONERS else T2I[name]
            builder(root / name)
            cache[name] = root / name
        return cache[name]

    return get


@pytest.fixture(scope="module")
def images():
    """Three photos of different aspect ratios, so that tiling / native-resolution families pad their batches."""
    from pathlib import Path

    paths = sorted((Path(__file__).resolve().parents[1] / "data/inputs/images").glob("*.jpg"))[:3]
    photos = [Image.open(p).convert("RGB") for p in paths]
    return [photos[0].resize((96, 40)), photos[1].resize((40, 96)), photos[2].resize((64, 64))]


def _captioner(built, name, max_new_tokens=8, **kw):
    family, _, _, extra = CAPTIONERS[name]
    spec = CaptionerSpec(name=name, path=str(built(name)), family=family, max_new_tokens=max_new_tokens,
                         **extra, **kw)
    return cap_mod.make_captioner(spec)


class GenerateSpy:
    """Wraps model.generate on the instance and records its inputs and outputs."""

    def __init__(self, model):
        self.calls, self._orig = [], model.generate
        model.generate = self

    def __call__(self, *args, **kwargs):
        out = self._orig(*args, **kwargs)
        self.calls.append((kwargs, out))
        return out


@pytest.mark.parametrize("name", list(CAPTIONERS))
def test_captioner_family_batched_equals_per_item(built, images, name):
    cap = _captioner(built, name)
    batched = cap.caption(images, batch_size=3)
    single = [cap.caption([im], batch_size=1)[0] for im in images]
    assert batched == single
    assert len(batched) == 3 and all(isinstance(t, str) for t in batched)


@pytest.mark.parametrize("name", list(CAPTIONERS))
def test_captioner_family_prompt_and_length(built, images, name):
    family, _, markers, _ = CAPTIONERS[name]
    cap = _captioner(built, name, max_new_tokens=5)
    spy = GenerateSpy(cap.model)
    captions = cap.caption(images, batch_size=3)
    (kwargs, out), = spy.calls
    assert not any(c.lower().startswith(markers[-1].lower()) for c in captions), "the prompt is not echoed"
    ids = kwargs["input_ids"]
    tok = cap.tokenizer
    text = tok.decode(ids[-1][kwargs["attention_mask"][-1].bool()])
    for marker in markers:
        assert marker in text
    image_token = {"internvl": "<IMG_CONTEXT>", "qwen2_vl": "<|image_pad|>"}.get(family, "<image>")
    assert (ids == tok.convert_tokens_to_ids(image_token)).sum() > 0
    assert kwargs["max_new_tokens"] == 5
    prompt_included = out.shape[1] > ids.shape[1] and torch.equal(out[:, : ids.shape[1]], ids)
    new = out.shape[1] - (ids.shape[1] if prompt_included else 0)
    new -= 1 if cap.model.config.is_encoder_decoder else 0
    assert new == 5
    if family in ("llava_next", "llava_onevision", "qwen2_vl", "internvl"):
        assert not bool(kwargs["attention_mask"].all()), "images of different shapes must pad the batch"
        assert kwargs["attention_mask"][:, 0].float().mean() < 1, "padding must be on the left"


@pytest.mark.parametrize("name", list(CAPTIONERS))
def test_captioner_family_dtype_setting(built, images, name, monkeypatch):
    monkeypatch.setattr(runtime, "torch_dtype", lambda dtype, device, family="": getattr(torch, dtype))
    cap = _captioner(built, name, max_new_tokens=3, dtype="bfloat16")
    assert cap.model.dtype == torch.bfloat16
    spy = GenerateSpy(cap.model)
    out = cap.caption(images[:2], batch_size=2)
    assert len(out) == 2
    (kwargs, _), = spy.calls
    assert kwargs["pixel_values"].dtype == torch.bfloat16


def test_internvl_tiling_follows_the_model_card():
    """find_closest_aspect_ratio / dynamic_preprocess of the InternVL2 model cards (448 px tiles, up to 12)."""
    from cyclepref.models.captioner import closest_tiling, internvl_tiles

    assert closest_tiling(448, 448, 448, 1, 12) == (1, 1)
    assert closest_tiling(1000, 300, 448, 1, 12) == (3, 1)
    assert closest_tiling(300, 1000, 448, 1, 12) == (1, 3)
    assert closest_tiling(896, 448, 448, 1, 12) == (2, 1)
    assert closest_tiling(1792, 896, 448, 1, 12) == (4, 2)
    tiles = internvl_tiles(Image.new("RGB", (1000, 300)), 448, 1, 12, thumbnail=True)
    assert [t.size for t in tiles] == [(448, 448)] * 4
    assert len(internvl_tiles(Image.new("RGB", (448, 448)), 448, 1, 12, thumbnail=True)) == 1


def test_internvl_pixels_are_imagenet_normalised():
    from cyclepref.models.captioner import internvl_pixels

    x = internvl_pixels(Image.new("RGB", (120, 40), (255, 128, 0)), 56, 1, 4, thumbnail=True)
    assert x.shape == (4, 3, 56, 56)
    expected = (torch.tensor([255, 128, 0]) / 255 - torch.tensor(tf.IMAGENET_MEAN)) / torch.tensor(tf.IMAGENET_STD)
    assert torch.allclose(x.mean(dim=(0, 2, 3)), expected, atol=1e-4)


def test_internvl_loads_repository_code(built):
    cap = _captioner(built, "internvl2")
    assert type(cap.model).__name__ == "InternVLChatModel"
    assert type(cap.model).__module__.startswith("transformers_modules")
    assert cap.tile == 56 and cap.max_tiles == 4 and cap.thumbnail


def _t2i(built, name, **kw):
    spec = dict(name=name, path=str(built(name)), family=name, steps=2, guidance=0.0 if name == "flux" else 7.5,
                height=32, width=48)
    return t2i_mod.TextToImage(T2ISpec(**{**spec, **kw}))


def _denoiser(pipe):
    return pipe.unet if hasattr(pipe, "unet") else pipe.transformer


@pytest.mark.parametrize("name", list(T2I))
def test_t2i_family_batched_equals_per_item(built, name):
    g = _t2i(built, name)
    prompts, seeds = ["a cat on a mat", "a red car", "a small white dog on the grass"], [5, 6, 7]
    batched = g.generate(prompts, seeds, batch_size=3)
    single = [g.generate([p], [s], batch_size=1)[0] for p, s in zip(prompts, seeds, strict=True)]
    assert [im.size for im in batched] == [(48, 32)] * 3
    for a, b in zip(batched, single, strict=True):
        assert np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int)).max() <= 2
    assert np.abs(np.asarray(batched[0], dtype=int) - np.asarray(batched[1], dtype=int)).max() > 2


@pytest.mark.parametrize("name", list(T2I))
def test_t2i_family_components_steps_and_prompt(built, name):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel

    g = _t2i(built, name, steps=3)
    pipe = g.pipe
    expected = {
        "sdxl": ("StableDiffusionXLPipeline", [CLIPTextModel, CLIPTextModelWithProjection]),
        "flux": ("FluxPipeline", [CLIPTextModel, T5EncoderModel]),
        "sd3": ("StableDiffusion3Pipeline", [CLIPTextModelWithProjection, CLIPTextModelWithProjection, T5EncoderModel]),
    }[name]
    assert type(pipe).__name__ == expected[0]
    encoders = [pipe.text_encoder, pipe.text_encoder_2, getattr(pipe, "text_encoder_3", None)]
    assert [type(e) for e in encoders if e is not None] == expected[1]
    calls = []
    _denoiser(pipe).register_forward_hook(lambda *a: calls.append(1))
    same_seed = g.generate(["a cat on a mat", "a red car"], [3, 3], batch_size=2)
    assert len(calls) == 3
    assert np.abs(np.asarray(same_seed[0], dtype=int) - np.asarray(same_seed[1], dtype=int)).max() > 2


def test_sd3_t5_branch_is_used(built):
    g = _t2i(built, "sd3")
    embeds, *_ = g.pipe.encode_prompt("a cat on a mat", "a cat on a mat", "a cat on a mat",
                                       do_classifier_free_guidance=False, max_sequence_length=16)
    assert embeds.shape[1] == 77 + 16
    assert embeds[:, 77:].abs().sum() > 0


@pytest.mark.parametrize("name", list(T2I))
def test_t2i_family_dtype_setting(built, name, monkeypatch):
    monkeypatch.setattr(runtime, "torch_dtype", lambda dtype, device, family="": getattr(torch, dtype))
    g = _t2i(built, name, dtype="bfloat16", steps=1)
    assert _denoiser(g.pipe).dtype == torch.bfloat16 and g.pipe.vae.dtype == torch.bfloat16
    (im,) = g.generate(["a cat"], [1], batch_size=1)
    assert im.size == (48, 32)


@pytest.mark.parametrize("name", ["flux", "sd3"])
def test_t5_prompt_length_setting_reaches_the_pipeline(built, name, monkeypatch):
    g = _t2i(built, name, steps=1, max_sequence_length=24)
    seen = []
    original = g.pipe.encode_prompt
    monkeypatch.setattr(g.pipe, "encode_prompt",
                        lambda *a, **kw: seen.append(kw["max_sequence_length"]) or original(*a, **kw))
    g.generate(["a cat"], [1], batch_size=1)
    assert seen == [24]
