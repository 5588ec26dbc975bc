"""The GPU fast path's runtime settings (cyclepref/runtime.py), checked on CPU: precision per family, attention
backend, torch.compile and batch-size overrides reach the real loaders, and bfloat16 reward scores stay within a
stated tolerance of float32 on the tiny models."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from cyclepref import runtime
from cyclepref.config import CaptionerSpec, T2ISpec

ROOT = Path(__file__).resolve().parents[1]
FAST_ENV = ("CYCLEPREF_PRECISION", "CYCLEPREF_ATTENTION", "CYCLEPREF_COMPILE", "CYCLEPREF_COMPILE_BACKEND",
            "CYCLEPREF_BATCH_SIZE")
BF16_TOLERANCE = 0.1
"""Max |bf16 - fp32| reward, as a share of the fp32 rewards' standard deviation (bf16 keeps 8 mantissa bits)."""


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in FAST_ENV:
        monkeypatch.delenv(name, raising=False)


def test_default_precision_is_the_params_dtype_on_accelerators_and_float32_on_cpu():
    assert runtime.dtype_name("llava", "bfloat16", "cpu") == "float32"
    assert runtime.dtype_name("llava", "bfloat16", "cuda") == "bfloat16"
    assert runtime.dtype_name("sd", "float16", "cuda:1") == "float16"


def test_half_precision_follows_the_family(monkeypatch):
    monkeypatch.setenv("CYCLEPREF_PRECISION", "half")
    assert runtime.dtype_name("sd", "float32", "cuda") == "float16"
    assert runtime.dtype_name("flux", "float32", "cuda") == "bfloat16"
    assert runtime.dtype_name("blip2", "float32", "cpu") == "bfloat16"
    assert set(runtime.FP16_OVERFLOWS) <= set(runtime.HALF_PRECISION)
    assert all(runtime.HALF_PRECISION[f] == "bfloat16" for f in runtime.FP16_OVERFLOWS)


@pytest.mark.parametrize("family", sorted(runtime.FP16_OVERFLOWS))
def test_float16_is_refused_where_it_overflows(monkeypatch, family):
    monkeypatch.setenv("CYCLEPREF_PRECISION", "float16")
    with pytest.raises(ValueError, match=family):
        runtime.dtype_name(family, "float32", "cuda")
    assert runtime.dtype_name("llava", "float32", "cuda") == "float16"


def test_params_float16_is_refused_too_for_an_overflowing_family():
    with pytest.raises(ValueError, match="sdxl"):
        runtime.dtype_name("sdxl", "float16", "cuda")


@pytest.mark.parametrize("name,value", [("CYCLEPREF_PRECISION", "fp8"), ("CYCLEPREF_ATTENTION", "flash"),
                                        ("CYCLEPREF_COMPILE", "yes"), ("CYCLEPREF_BATCH_SIZE", "0")])
def test_bad_settings_are_rejected_with_their_name(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=name):
        runtime.dtype_name("llava", "float32", "cpu")
        runtime.load_kwargs("llava")
        runtime.compile_enabled()
        runtime.batch_size("score_i2t", 8)


def test_attention_is_passed_only_where_the_family_has_it(monkeypatch):
    assert "attn_implementation" not in runtime.load_kwargs("llava", device_name="cpu")
    monkeypatch.setenv("CYCLEPREF_ATTENTION", "eager")
    assert runtime.load_kwargs("llava", device_name="cpu")["attn_implementation"] == "eager"
    assert "attn_implementation" not in runtime.load_kwargs("blip", device_name="cpu")
    assert "attn_implementation" not in runtime.load_kwargs("sd", device_name="cpu")


def test_batch_size_override(monkeypatch):
    assert runtime.batch_size("score_i2t", 8) == 8
    monkeypatch.setenv("CYCLEPREF_BATCH_SIZE", "64")
    assert runtime.batch_size("score_i2t", 8) == 64
    monkeypatch.setenv("CYCLEPREF_BATCH_SIZE", "generate_t2i=4, score_i2t=32")
    assert runtime.batch_size("score_i2t", 8) == 32
    assert runtime.batch_size("generate_t2i", 16) == 4
    assert runtime.batch_size("generate_i2t", 16) == 16


def test_the_stage_receives_the_overridden_batch_size(monkeypatch, tmp_path):
    import tasks.cycle as stage_module
    from cyclepref.config import load_params

    seen = {}
    monkeypatch.setattr(stage_module.cycle, "score_i2t", lambda ctx, metric, bs: seen.setdefault("bs", bs) and {})
    monkeypatch.setattr(stage_module.tracking, "log_examples", lambda *a, **k: None)
    monkeypatch.setattr(stage_module.cycle, "examples", lambda *a, **k: [])
    monkeypatch.setenv("CYCLEPREF_BATCH_SIZE", "score_i2t=3")
    stage_module.run(load_params(ROOT / "params.yaml"), tmp_path, "score_i2t")
    assert seen["bs"] == 3


def test_compile_wraps_the_named_parts_only_when_asked(monkeypatch):
    owner = torch.nn.Module()
    owner.unet = torch.nn.Linear(4, 4)
    owner.transformer = None
    assert runtime.compile_parts(owner, "unet", "transformer").unet.__class__ is torch.nn.Linear
    monkeypatch.setenv("CYCLEPREF_COMPILE", "1")
    monkeypatch.setenv("CYCLEPREF_COMPILE_BACKEND", "eager")
    x = torch.randn(2, 4)
    expected = owner.unet(x)
    runtime.compile_parts(owner, "unet", "transformer")
    assert isinstance(owner.unet, torch._dynamo.eval_frame.OptimizedModule)
    assert owner.transformer is None
    torch.testing.assert_close(owner.unet(x), expected)


def test_captioner_loads_in_the_asked_precision_and_attention(zoo, monkeypatch):
    from cyclepref.models.captioner import Captioner

    spec = CaptionerSpec(name="c", path=str(zoo / "tiny-llava"), family="llava", max_new_tokens=4)
    plain = Captioner(spec)
    assert plain.model.dtype == torch.float32
    assert plain.model.config._attn_implementation == "sdpa"
    monkeypatch.setenv("CYCLEPREF_PRECISION", "bfloat16")
    monkeypatch.setenv("CYCLEPREF_ATTENTION", "eager")
    fast = Captioner(spec)
    assert fast.model.dtype == torch.bfloat16
    assert fast.model.config._attn_implementation == "eager"
    from PIL import Image

    assert len(fast.caption([Image.new("RGB", (32, 32), "red")] * 2, batch_size=2)) == 2


def test_text_to_image_loads_in_the_asked_precision(zoo, monkeypatch):
    from cyclepref.models.t2i import TextToImage

    spec = T2ISpec(name="g", path=str(zoo / "tiny-sd"), family="sd", steps=2, guidance=7.5, height=32, width=32)
    assert TextToImage(spec).pipe.unet.dtype == torch.float32
    monkeypatch.setenv("CYCLEPREF_PRECISION", "bfloat16")
    fast = TextToImage(spec)
    assert fast.pipe.unet.dtype == fast.pipe.vae.dtype == torch.bfloat16
    assert len(fast.generate(["a red square"], [0], batch_size=1)) == 1


def test_bf16_reward_scores_stay_within_tolerance_of_fp32(zoo, monkeypatch):
    from cyclepref.reward.model import RewardModel
    from cyclepref.reward.synthetic import COLOURS, colour_image

    rng = random.Random(3)
    names = sorted(COLOURS)
    images = [colour_image(COLOURS[rng.choice(names)], rng, 32) for _ in range(48)]
    texts = [f"a photo of a {rng.choice(names)} square" for _ in range(48)]
    model = RewardModel.from_backbone(str(zoo / "tiny-blip-itm"), max_length=32, seed=0)
    model = runtime.place(model, "blip_itm", "cpu", ("head",)).eval()
    assert next(model.vision_model.parameters()).dtype == torch.float32
    full = model.score(images, texts, batch_size=16)
    monkeypatch.setenv("CYCLEPREF_PRECISION", "bfloat16")
    model = runtime.place(model, "blip_itm", "cpu", ("head",))
    assert next(model.vision_model.parameters()).dtype == torch.bfloat16
    assert next(model.head.parameters()).dtype == torch.float32
    half = model.score(images, texts, batch_size=16)
    assert half.dtype == torch.float32 and full.std() > 0
    error = (half - full).abs().max() / full.std()
    assert error <= BF16_TOLERANCE, f"bf16 differs from fp32 by {error:.3f} std"


def test_eager_attention_reaches_the_text_to_image_unet(zoo, monkeypatch):
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    from cyclepref.models.t2i import TextToImage

    spec = T2ISpec(name="g", path=str(zoo / "tiny-sd"), family="sd", steps=2, guidance=7.5, height=32, width=32)
    kinds = {type(p) for p in TextToImage(spec).pipe.unet.attn_processors.values()}
    assert kinds == {AttnProcessor2_0}
    monkeypatch.setenv("CYCLEPREF_ATTENTION", "eager")
    kinds = {type(p) for p in TextToImage(spec).pipe.unet.attn_processors.values()}
    assert kinds == {AttnProcessor}


def test_place_compiles_the_forward_only_when_asked(monkeypatch):
    module = torch.nn.Linear(4, 2)
    x = torch.randn(3, 4)
    expected = module(x)
    assert "forward" not in vars(runtime.place(module, "blip_itm", "cpu"))
    monkeypatch.setenv("CYCLEPREF_COMPILE", "1")
    monkeypatch.setenv("CYCLEPREF_COMPILE_BACKEND", "eager")
    placed = runtime.place(module, "blip_itm", "cpu")
    assert hasattr(vars(placed)["forward"], "_torchdynamo_orig_callable")
    torch.testing.assert_close(placed(x), expected)
