"""GPU throughput, FLOPs and MFU of the project's own adapters at paper scale, for a lent GPU machine with no network
(run through bench/gpu.sh).

At the start of the run it measures the device: a dense bf16 8192x8192x8192 matrix product (the MFU peak) and a
device-to-device copy (the bandwidth, bytes read + written). Then every row calls the code the stages call, with the
paper profile's settings (configs/paper.yaml: models' sizes, dtype, resolution, steps, tokens, batch sizes) and random
weights (`random_weights`: a model's from_pretrained builds it from its saved config on the device instead of reading
weights; processors, tokenizers, schedulers, pipelines, generate and decoding are the real ones):
- reward scoring: evaluate_reward's RewardScorer.score on a RewardModel (BLIP-large ITM + the paper head) placed with
  runtime.place, pairs/s;
- diffusion denoising: the denoiser (UNet / MMDiT) of the TextToImage adapter's pipeline, one call at the shapes the
  pipeline calls it with (CFG doubles the batch), reported as images/s for the paper's 50 steps;
- captioning: the engine's batch function (cyclepref.engine.Worker "caption", what generate_i2t / reconstruct_t2i run)
  on PNG payloads, LLaVA-1.5-7B, greedy, 77 new tokens, generated tokens/s;
- text-to-image: the engine's batch function ("render", generate_t2i / reconstruct_i2t) with fewer steps
  (--render-steps), so that text encoding, VAE decoding and PNG encoding are measured too;
- similarity: score_t2i's TextSimilarity (SBERT all-MiniLM-L6-v2 size) embedding captions, texts/s.
Arms are the runtime settings (cyclepref/runtime.py) a user sets: fp32 eager; `paper` (no setting: the params dtype);
bf16 + SDPA; bf16 + SDPA + torch.compile. Each row reports what the loaded model really got (dtype, attention).
FLOPs of one call are counted once per row with torch.utils.flop_counter.FlopCounterMode (compiled code run eagerly
for that count), outside the timed calls. A time budget (--budget-s) skips what no longer fits; the JSON is rewritten
after every row, so a run cut short keeps what it measured. `--smoke` runs every path on CPU at tiny sizes.
    python bench/gpu.py [--smoke] [--budget-s 400] [--out FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PAPER_STEPS = 50
SECTIONS = ("reward scoring", "diffusion denoising", "captioning", "text-to-image", "similarity")


@dataclass
class Row:
    section: str
    model: str
    arm: str
    batch: int
    throughput: float | None
    unit: str
    ms_per_call: float | None
    flops_per_call: int | None
    tflops: float | None
    mfu: float | None
    bw_util: float | None
    peak_gib: float | None
    note: str = ""
    stage: str = ""
    items_per_call: float | None = None


@dataclass(frozen=True)
class Arm:
    name: str
    precision: str
    attention: str
    compile: bool = False


FP32 = Arm("fp32 eager", "float32", "eager")
PAPER = Arm("paper", "params", "auto")
BF16 = Arm("bf16 sdpa", "bfloat16", "sdpa")
COMPILE = Arm("bf16 sdpa compile", "bfloat16", "sdpa", True)

PAPER_SIZES = {
    "blip_vision": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                        patch_size=16),
    "blip_text": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                      vocab_size=30524, max_position_embeddings=512),
    "blip_proj": 256,
    "unet": dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
                 block_out_channels=(320, 640, 1280, 1280), layers_per_block=2),
    "vae": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4),
    "clip_l": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   projection_dim=768, hidden_act="quick_gelu"),
    "clip_g": dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                   projection_dim=1280, hidden_act="gelu"),
    "sd3": dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
                num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                pooled_projection_dim=2048, pos_embed_max_size=192),
    "llava_vision": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                         patch_size=14, projection_dim=768),
    "llava_text": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                       intermediate_size=11008, vocab_size=32064, max_position_embeddings=4096),
    "llava_image": 336,
    "minilm": dict(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                   intermediate_size=1536, max_position_embeddings=512),
    "image_side": (1024, 768),
    "captions": 160,
}
SMOKE_SIZES = {
    "blip_vision": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        patch_size=16),
    "blip_text": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                      vocab_size=30524, max_position_embeddings=512),
    "blip_proj": 16,
    "unet": dict(sample_size=8, cross_attention_dim=32, attention_head_dim=4, block_out_channels=(32, 64),
                 layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8),
    "vae": dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=8,
                down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2),
    "clip_l": dict(hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                   projection_dim=32, hidden_act="quick_gelu"),
    "clip_g": dict(hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                   projection_dim=32, hidden_act="gelu"),
    "sd3": dict(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8,
                num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=16, pooled_projection_dim=64,
                pos_embed_max_size=16),
    "llava_vision": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                         patch_size=14, projection_dim=32),
    "llava_text": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                       intermediate_size=64, vocab_size=1024, max_position_embeddings=512),
    "llava_image": 28,
    "minilm": dict(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                   intermediate_size=64, max_position_embeddings=512),
    "image_side": (48, 40),
    "captions": 24,
}
SMOKE_BATCHES = {"reward": 3, "denoise": 2, "caption": 2, "render": 2, "similarity": 4}
SMOKE_STEPS, SMOKE_NEW_TOKENS = 2, 3


# ---------------------------------------------------------------- device peaks and FLOPs


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def mean_seconds(fn: Callable[[], object], device: str, warm: int = 3, calls: int = 10) -> float:
    for _ in range(warm):
        fn()
    sync(device)
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    sync(device)
    return (time.perf_counter() - started) / calls


def measure_peaks(device: str, n: int = 8192, copy_bytes: int = 2**31) -> dict:
    """Dense bf16 n x n x n matrix product (TFLOP/s; float32 on CPU) and a device-to-device copy of copy_bytes
    (TB/s, counting the bytes read and the bytes written), measured on this device now."""
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    matmul_s = mean_seconds(lambda: a @ b, device)
    del a, b
    src = torch.empty(copy_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_s = mean_seconds(lambda: dst.copy_(src), device)
    del src, dst
    return {"matmul_tflops": 2 * n**3 / matmul_s / 1e12, "matmul_n": n, "matmul_dtype": str(dtype).split(".")[1],
            "copy_tb_s": 2 * copy_bytes / copy_s / 1e12, "copy_bytes": copy_bytes}


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of fn, counted by torch.utils.flop_counter.FlopCounterMode (matmuls, convolutions and
    attention; element-wise work is not counted). torch.compile'd code runs eagerly for the count. The CPU kernel of
    scaled_dot_product_attention, which FlopCounterMode does not know, is counted as the CUDA kernels are."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def sdpa(query, key, value, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query, key, value)

    cpu_sdpa = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: sdpa}
    with torch.compiler.set_stance("force_eager"), FlopCounterMode(display=False, custom_mapping=cpu_sdpa) as counter:
        fn()
    return int(counter.get_total_flops())


# ---------------------------------------------------------------- random weights


def _dtype_arg(kw: dict):
    dtype = kw.get("dtype", kw.get("torch_dtype"))
    return None if dtype in (None, "auto") else (getattr(torch, dtype) if isinstance(dtype, str) else dtype)


@contextlib.contextmanager
def random_weights(device: str):
    """Within: transformers' and diffusers' model from_pretrained build the model from the config saved at the path
    (and subfolder) with random weights, directly on `device`, in the dtype and attention implementation the caller
    asked for, and read generation_config.json when there is one. Nothing else the adapters do is replaced."""
    from transformers import GenerationConfig, PreTrainedModel

    patched = [(PreTrainedModel, PreTrainedModel.__dict__["from_pretrained"])]

    def transformers_load(cls, path, *args, config=None, subfolder="", attn_implementation=None, **kw):
        where = Path(path) / subfolder
        config = config if config is not None else cls.config_class.from_pretrained(where)
        extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
        with torch.device(device):
            model = cls._from_config(config, dtype=_dtype_arg(kw), **extra)
        if (where / "generation_config.json").exists() and model.can_generate():
            model.generation_config = GenerationConfig.from_pretrained(where)
        return model.eval()

    PreTrainedModel.from_pretrained = classmethod(transformers_load)
    try:
        from diffusers import ModelMixin
    except ImportError:
        ModelMixin = None
    if ModelMixin is not None:
        patched.append((ModelMixin, ModelMixin.__dict__["from_pretrained"]))

        def diffusers_load(cls, path, *args, subfolder=None, **kw):
            config = cls.load_config(path, subfolder=subfolder)
            with torch.device(device):
                model = cls.from_config(config)
            dtype = _dtype_arg(kw)
            return (model.to(dtype) if dtype is not None else model).eval()

        ModelMixin.from_pretrained = classmethod(diffusers_load)
    try:
        yield
    finally:
        for owner, original in patched:
            owner.from_pretrained = original


@contextlib.contextmanager
def runtime_settings(arm: Arm, device: str, compile_backend: str):
    """The arm's CYCLEPREF_* runtime settings (cyclepref/runtime.py) in the environment, as a user sets them."""
    names = ("CYCLEPREF_DEVICE", "CYCLEPREF_PRECISION", "CYCLEPREF_ATTENTION", "CYCLEPREF_COMPILE",
             "CYCLEPREF_COMPILE_BACKEND", "CYCLEPREF_ENGINE", "CYCLEPREF_CAPTION_BACKEND")
    saved = {k: os.environ.get(k) for k in names}
    os.environ.update(CYCLEPREF_DEVICE=device, CYCLEPREF_PRECISION=arm.precision, CYCLEPREF_ATTENTION=arm.attention,
                      CYCLEPREF_COMPILE="1" if arm.compile else "0", CYCLEPREF_COMPILE_BACKEND=compile_backend,
                      CYCLEPREF_ENGINE="local", CYCLEPREF_CAPTION_BACKEND="transformers")
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ---------------------------------------------------------------- offline tokenizers and inputs

WORDS = ("a photo of the red green blue small large wooden table chair window light dog cat man woman child tree "
         "street car house sky cloud with and on in near under behind bright dark old new two three").split()


def bert_tokenizer(max_length: int, blip: bool):
    """A WordPiece tokenizer over a small vocabulary (random weights make the ids' meaning irrelevant; the number of
    tokens per text is what costs), with BLIP's [DEC] / [ENC] tokens when `blip`."""
    from transformers import BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, *"abcdefghijklmnopqrstuvwxyz.,"]
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True, model_max_length=max_length)
    if blip:
        tok.add_special_tokens({"bos_token": "[DEC]", "additional_special_tokens": ["[ENC]"]})
    return tok


def clip_tokenizer():
    """CLIP's byte-level BPE alphabet with no merges (one token per character; the pipelines pad to 77 anyway)."""
    from transformers import CLIPTokenizer

    from cyclepref.models.tokenizers import _bytes_to_unicode

    chars = list(_bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=[], model_max_length=77,
                         pad_token="<|endoftext|>")


def caption(n_words: int, seed: int) -> str:
    return " ".join(WORDS[(seed * 7 + 3 * i) % len(WORDS)] for i in range(n_words))


def photos(n: int, size: tuple[int, int], seed: int = 0) -> list:
    """Smooth RGB images of a photo's size (coarse noise upsampled), distinct objects."""
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    coarse = (torch.rand(n, 3, 12, 16, generator=g) * 255).to(torch.uint8)
    out = []
    for c in coarse:
        im = Image.fromarray(c.permute(1, 2, 0).numpy(), "RGB")
        out.append(im.resize(size, Image.BILINEAR))
    return out


def png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------- paper-size model directories (configs only)


def write_llava(out: Path, sizes: dict, max_new_tokens: int) -> None:
    """LLaVA-1.5 layout (config, processor, chat template) at the given size; generation_config makes every caption
    max_new_tokens long (random weights would otherwise stop at a random end-of-sequence token)."""
    from transformers import CLIPImageProcessor, GenerationConfig, LlavaConfig, LlavaProcessor

    from cyclepref.models import tokenizers as tk
    from cyclepref.models.formats import CLIP_MEAN, CLIP_STD, LLAVA_CHAT_TEMPLATE

    tok = tk.build_bpe_tokenizer([caption(40, s) for s in range(50)] + ["USER: ASSISTANT:"], vocab_size=256)
    tok.chat_template = LLAVA_CHAT_TEMPLATE
    side, vision = sizes["llava_image"], sizes["llava_vision"]
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", image_size=side, **vision),
        text_config=dict(model_type="llama", **sizes["llava_text"], **ids),
        image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_layer=-2,
        vision_feature_select_strategy="default", projector_hidden_act="gelu",
    )
    config.save_pretrained(out)
    GenerationConfig(**ids, min_new_tokens=max_new_tokens).save_pretrained(out)
    ip = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side},
                            image_mean=CLIP_MEAN, image_std=CLIP_STD)
    LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=vision["patch_size"],
                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                   chat_template=LLAVA_CHAT_TEMPLATE).save_pretrained(out)


def write_pipeline(out: Path, family: str, sizes: dict, side: int) -> None:
    """A diffusers pipeline directory (model_index.json, each component's config, tokenizers, scheduler) of the
    SD1.5 or SD3-medium architecture; the SD3 T5 encoder is left out (zero T5 embeddings, as diffusers does without
    it: the denoiser still sees 77 + 256 text tokens)."""
    from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, PNDMScheduler, SD3Transformer2DModel,
                           StableDiffusion3Pipeline, StableDiffusionPipeline, UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def clip(kind, cls):
        return cls(CLIPTextConfig(**sizes[kind], max_position_embeddings=77, vocab_size=49408, bos_token_id=49406,
                                  eos_token_id=49407, pad_token_id=49407))

    with torch.device("meta"):
        if family == "sd":
            pipe = StableDiffusionPipeline(
                vae=AutoencoderKL(**sizes["vae"], latent_channels=4, sample_size=side),
                text_encoder=clip("clip_l", CLIPTextModel), tokenizer=clip_tokenizer(),
                unet=UNet2DConditionModel(**sizes["unet"]),
                scheduler=PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False),
                safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        else:
            latent = sizes["sd3"]["in_channels"]
            pipe = StableDiffusion3Pipeline(
                transformer=SD3Transformer2DModel(**sizes["sd3"]),
                scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                vae=AutoencoderKL(**sizes["vae"], latent_channels=latent, sample_size=side, use_quant_conv=False,
                                  use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5305),
                text_encoder=clip("clip_l", CLIPTextModelWithProjection), tokenizer=clip_tokenizer(),
                text_encoder_2=clip("clip_g", CLIPTextModelWithProjection), tokenizer_2=clip_tokenizer(),
                text_encoder_3=None, tokenizer_3=None)
    pipe.save_config(out)
    for name, part in pipe.components.items():
        if part is None:
            continue
        if hasattr(part, "save_config"):
            part.save_config(out / name)
        elif isinstance(part, torch.nn.Module):
            part.config.save_pretrained(out / name)
        else:
            part.save_pretrained(out / name)


def write_minilm(out: Path, sizes: dict) -> None:
    """An all-MiniLM-L6-v2-shaped BERT directory; sentence-transformers adds mean pooling to a plain model."""
    from transformers import BertConfig

    BertConfig(**sizes["minilm"]).save_pretrained(out)
    bert_tokenizer(256, blip=False).save_pretrained(out)


# ---------------------------------------------------------------- the bench


class Bench:
    def __init__(self, device: str, sizes: dict, params, budget_s: float, min_s: float, compile_backend: str,
                 peaks: dict, out: str | None, smoke: bool, render_steps: int):
        self.device, self.sizes, self.params, self.min_s = device, sizes, params, min_s
        self.compile_backend, self.peaks, self.out, self.smoke = compile_backend, peaks, out, smoke
        self.render_steps = render_steps
        self.deadline = time.monotonic() + budget_s
        self.rows: list[Row] = []
        self.arms: set[str] | None = None
        self.tmp = Path(tempfile.mkdtemp(prefix="cyclepref-gpu-bench-"))
        self.info: dict = {}

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def chosen(self, arms: list[Arm]) -> list[Arm]:
        return [a for a in arms if self.arms is None or a.name in self.arms]

    def batch(self, kind: str, paper: int) -> int:
        return SMOKE_BATCHES[kind] if self.smoke else paper

    def cuda(self) -> bool:
        return self.device.startswith("cuda")

    def skip(self, section: str, model: str, arm: Arm, batch: int, unit: str, why: str, stage: str = "") -> None:
        self.rows.append(Row(section, model, arm.name, batch, None, unit, None, None, None, None, None, None, why,
                             stage))
        self.save()

    def measure(self, section: str, model: str, arm: Arm, batch: int, fn: Callable[[], object], items: float,
                unit: str, stage: str, note: str = "", weight_bytes: float = 0.0, weight_reads: float = 1.0,
                need_s: float = 5.0) -> Row | None:
        """One row: FLOPs of one call (counted, also the first warm-up), one more warm-up call (compilation happens
        there; not in smoke runs), then calls until min_s has passed (at least one, as many as the budget allows).
        `items` per call gives the throughput; weight_bytes x weight_reads per call gives the share of the copy
        bandwidth."""
        if self.left() < need_s:
            self.skip(section, model, arm, batch, unit, f"skipped: {self.left():.0f} s left", stage)
            return None
        if self.cuda():
            torch.cuda.reset_peak_memory_stats()
        try:
            started = time.perf_counter()
            flops = count_flops(fn)
            sync(self.device)
            first = time.perf_counter() - started
            if not self.smoke:
                started = time.perf_counter()
                fn()
                sync(self.device)
                first = min(first, time.perf_counter() - started)
            calls = max(1, min(20, math.ceil(self.min_s / max(first, 1e-6)), int(self.left() / max(first, 1e-6)) - 1))
            started = time.perf_counter()
            for _ in range(calls):
                fn()
            sync(self.device)
            seconds = (time.perf_counter() - started) / calls
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            self.skip(section, model, arm, batch, unit, "out of memory", stage)
            return None
        peak = torch.cuda.max_memory_allocated() / 2**30 if self.cuda() else None
        tflops = flops / seconds / 1e12
        bw = weight_bytes * weight_reads / seconds / 1e12 / self.peaks["copy_tb_s"] if weight_bytes else None
        row = Row(section, model, arm.name, batch, round(items / seconds, 4), unit, round(1000 * seconds, 4),
                  flops, round(tflops, 3), round(tflops / self.peaks["matmul_tflops"], 4),
                  None if bw is None else round(bw, 4), None if peak is None else round(peak, 2), note, stage,
                  items)
        self.rows.append(row)
        self.save()
        return row

    def save(self) -> None:
        if not self.out:
            return
        payload = {**self.info, "peaks": self.peaks, "rows": [asdict(r) for r in ordered(self.rows)]}
        Path(self.out).write_text(json.dumps(payload, indent=2) + "\n")

    def free(self) -> None:
        import gc

        gc.collect()
        if self.cuda():
            torch.cuda.empty_cache()


def ordered(rows: list[Row]) -> list[Row]:
    """Rows by section (reward scoring, diffusion denoising, captioning first), in measuring order within one."""
    return sorted(rows, key=lambda r: SECTIONS.index(r.section))


def weights_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def resolved(model) -> str:
    """What the loaded model really runs in: weights dtype and attention implementation."""
    p = next(model.parameters())
    attn = getattr(getattr(model, "config", None), "_attn_implementation", None)
    return f"{str(p.dtype).split('.')[1]}" + (f", {attn} attention" if attn else "")


# ---------------------------------------------------------------- rows


def bench_reward(b: Bench, arms: list[Arm]) -> None:
    """evaluate_reward's scoring path: runtime.place(RewardModel, "blip_itm", device, ("head",)), then
    RewardScorer.score on `batch` I2T pairs (one image, two captions each: 2 x batch texts per forward)."""
    from transformers import BlipConfig, BlipProcessor

    from cyclepref import runtime
    from cyclepref.reward.data import PairExample
    from cyclepref.reward.evaluate import RewardScorer
    from cyclepref.reward.model import RewardModel, reward_image_processor

    m = b.params.train_reward.model
    side = 32 if b.smoke else m.image_size
    cfg = BlipConfig(vision_config={**b.sizes["blip_vision"], "image_size": side},
                     text_config={**b.sizes["blip_text"], "encoder_hidden_size": b.sizes["blip_vision"]["hidden_size"]},
                     projection_dim=b.sizes["blip_proj"], image_text_hidden_size=b.sizes["blip_proj"])
    processor = BlipProcessor(image_processor=reward_image_processor(side),
                              tokenizer=bert_tokenizer(m.max_length, blip=True))
    paper_batch = b.batch("reward", b.params.evaluate_reward.batch_size)
    images = photos(paper_batch, b.sizes["image_side"])
    n_words = b.sizes["captions"]
    pairs = [PairExample(f"p{i}", "i2t", f"g{i}", im, None, caption(n_words, i), caption(n_words, i + 1))
             for i, im in enumerate(images)]
    for arm in b.chosen(arms):
        if b.left() < (120 if arm.compile else 10):
            for batch in (paper_batch, 1):
                b.skip("reward scoring", "BLIP-large reward model", arm, batch, "pairs/s",
                       f"skipped: {b.left():.0f} s left", "evaluate_reward")
            continue
        with runtime_settings(arm, b.device, b.compile_backend):
            with torch.device(b.device):
                model = RewardModel(cfg, m.head_widths, m.fix_rate, m.max_length, processor).eval()
            model = runtime.place(model, "blip_itm", b.device, ("head",))
            scorer = RewardScorer("reward", model)
            default = " (the paper profile's default)" if arm == FP32 else ""
            note = f"{resolved(model.vision_model)}{default}; {m.max_length}-token texts; {side} px; head float32"
            for batch in (paper_batch, 1):
                b.measure("reward scoring", "BLIP-large reward model", arm, batch,
                          lambda n=batch: scorer.score(pairs[:n]), batch, "pairs/s", "evaluate_reward", note,
                          weights_bytes(model), need_s=60 if arm.compile else 5)
        del model, scorer
        b.free()


def _t2i_spec(b: Bench, name: str):
    specs = {s.name: s for s in b.params.generate_t2i.models}
    specs[b.params.reconstruct_i2t.model.name] = b.params.reconstruct_i2t.model
    return specs[name]


def _denoiser_call(b: Bench, pipe, family: str, batch: int):
    """The pipeline's denoiser and one call at the pipeline's shapes (CFG: 2 x batch), at the pipeline's dtype."""
    net = pipe.unet if family == "sd" else pipe.transformer
    dtype = next(iter(pipe.unet.parameters() if family == "sd" else pipe.transformer.parameters())).dtype
    n = 2 * batch
    with torch.device(b.device):
        if family == "sd":
            cfg = pipe.unet.config
            latents = torch.randn(n, cfg.in_channels, cfg.sample_size, cfg.sample_size, dtype=dtype)
            text = torch.randn(n, 77, cfg.cross_attention_dim, dtype=dtype)
            t = torch.full((n,), 500)
            return lambda: net(latents, t, encoder_hidden_states=text).sample
        cfg = pipe.transformer.config
        latents = torch.randn(n, cfg.in_channels, cfg.sample_size, cfg.sample_size, dtype=dtype)
        text = torch.randn(n, 77 + 256, cfg.joint_attention_dim, dtype=dtype)
        pooled = torch.randn(n, cfg.pooled_projection_dim, dtype=dtype)
        t = torch.full((n,), 500.0)
        return lambda: net(hidden_states=latents, encoder_hidden_states=text, pooled_projections=pooled,
                           timestep=t).sample


T2I_ROWS = {"sd-1.5": ("SD1.5 UNet 512 px", "generate_t2i"), "sd3-medium": ("SD3-medium MMDiT 1024 px",
                                                                             "reconstruct_i2t")}


def bench_t2i(b: Bench, name: str, arms: list[Arm], render: bool = False) -> None:
    """The TextToImage adapter (built by the engine's Worker, as the stages do): its pipeline's denoiser at the
    pipeline's shapes (diffusion denoising rows) or, with `render`, the Worker's whole batch function at
    render_steps steps (text-to-image rows)."""
    from cyclepref.engine import Worker

    spec = _t2i_spec(b, name)
    model, stage = T2I_ROWS[name]
    side = 64 if b.smoke else spec.height
    where = b.tmp / name
    if not where.exists():
        write_pipeline(where, spec.family, b.sizes, side)
    steps = SMOKE_STEPS if b.smoke else b.render_steps
    local = spec.model_copy(update={"path": str(where), "height": side, "width": side, "steps": steps})
    paper_batch = b.batch("denoise", b.params.generate_t2i.batch_size if stage == "generate_t2i"
                          else b.params.reconstruct_i2t.batch_size)
    paper_steps = SMOKE_STEPS if b.smoke else spec.steps
    unit = f"img/s ({paper_steps} steps, CFG)"
    for arm in b.chosen(arms):
        if b.left() < (150 if arm.compile else 20):
            section = "text-to-image" if render else "diffusion denoising"
            for batch in (paper_batch,) if render else (paper_batch, 1):
                b.skip(section, model, arm, batch, unit, f"skipped: {b.left():.0f} s left", stage)
            continue
        with runtime_settings(arm, b.device, b.compile_backend), random_weights(b.device):
            worker = Worker("render", local.model_dump(mode="json"), b.device)
            pipe = worker.model.pipe
            net = pipe.unet if spec.family == "sd" else pipe.transformer
            note = f"{resolved(net)}; {_processor_name(net)}"
            for batch in () if render else (paper_batch, 1):
                b.measure("diffusion denoising", model, arm, batch, _denoiser_call(b, pipe, spec.family, batch),
                          batch / paper_steps, unit, stage, note, weights_bytes(net),
                          need_s=90 if arm.compile else 10)
            if render:
                prompts = [caption(60, i) for i in range(paper_batch)]
                payload = {"prompts": prompts, "seeds": list(range(paper_batch))}
                b.measure("text-to-image", f"{model} pipeline", arm, paper_batch, lambda: worker.run(payload),
                          paper_batch, f"img/s ({steps} steps + encode, decode, PNG)", stage,
                          f"{note}; engine Worker('render').run", need_s=30)
        del worker, pipe, net
        b.free()


def _processor_name(net) -> str:
    procs = getattr(net, "attn_processors", {})
    names = sorted({type(p).__name__ for p in procs.values()})
    return "/".join(names) if names else ""


def bench_captioner(b: Bench, arms: list[Arm]) -> None:
    """The engine's caption batch function (Worker("caption").run on PNG bytes: decode, processor, generate,
    decode), LLaVA-1.5-7B as generate_i2t runs it."""
    from cyclepref.engine import Worker

    spec = next(s for s in b.params.generate_i2t.captioners if s.name == "llava-1.5-7b")
    new = SMOKE_NEW_TOKENS if b.smoke else spec.max_new_tokens
    where = b.tmp / spec.name
    if not where.exists():
        write_llava(where, b.sizes, new)
    local = spec.model_copy(update={"path": str(where), "max_new_tokens": new})
    paper_batch = b.batch("caption", b.params.generate_i2t.batch_size)
    images = [png(im) for im in photos(paper_batch, b.sizes["image_side"], seed=1)]
    model = "LLaVA-1.5-7B captioner"
    for arm in b.chosen(arms):
        if b.left() < (240 if arm.compile else 40):
            for batch in (paper_batch, 1):
                b.skip("captioning", model, arm, batch, "tokens/s", f"skipped: {b.left():.0f} s left", "generate_i2t")
            continue
        with runtime_settings(arm, b.device, b.compile_backend), random_weights(b.device):
            worker = Worker("caption", local.model_dump(mode="json"), b.device)
            net = worker.model.model
            note = f"{resolved(net)}; greedy, {new} new tokens"
            for batch in (paper_batch, 1):
                payload = {"images": images[:batch]}
                b.measure("captioning", model, arm, batch, lambda p=payload: worker.run(p), batch * new, "tokens/s",
                          "generate_i2t", note, weights_bytes(net), new, need_s=200 if arm.compile else 15)
        del worker, net
        b.free()


def bench_similarity(b: Bench, arms: list[Arm]) -> None:
    """score_t2i's TextSimilarity (SBERT) embedding a batch of captions and comparing them with their prompts."""
    from cyclepref.models.similarity import TextSimilarity

    spec = b.params.score_t2i.metric
    where = b.tmp / "minilm"
    if not where.exists():
        write_minilm(where, b.sizes)
    local = spec.model_copy(update={"path": str(where)})
    paper_batch = b.batch("similarity", b.params.score_t2i.batch_size)
    texts = [caption(50, i) for i in range(paper_batch)]
    for arm in b.chosen(arms):
        with runtime_settings(arm, b.device, b.compile_backend), random_weights(b.device):
            sim = TextSimilarity(local, b.device)
            net = next(m for m in sim.model.modules() if hasattr(m, "config") and hasattr(m, "can_generate"))
            ref = sim.embed(texts, paper_batch)
            for batch in (paper_batch, 1):
                b.measure("similarity", "SBERT all-MiniLM-L6-v2", arm, batch,
                          lambda n=batch: sim.compare(ref[:n], sim.embed(texts[:n], n)), batch, "texts/s",
                          "score_t2i", f"{resolved(net)}; sentence-transformers does not read CYCLEPREF_PRECISION",
                          weights_bytes(net))
        del sim, net
        b.free()


# ---------------------------------------------------------------- output


def _cell(value, fmt: str, width: int) -> str:
    return f"{'-':>{width}s}" if value is None else f"{value:{width}{fmt}}"


def table(rows: list[Row], peaks: dict, device: str) -> str:
    head = (f"{'model':34s} {'arm':18s} {'batch':>5s} {'throughput':>11s} {'unit':34s} {'ms/call':>9s} "
            f"{'TFLOP/s':>8s} {'MFU %':>6s} {'BW %':>6s} {'GiB':>6s}  note")
    lines = [f"{device}: dense {peaks['matmul_dtype']} {peaks['matmul_n']}^3 matmul {peaks['matmul_tflops']:.1f} "
             f"TFLOP/s, device copy {peaks['copy_tb_s']:.3f} TB/s (read + write); MFU = TFLOP/s / that peak; "
             "BW = weight bytes read per call / time / copy bandwidth", "", head, "-" * len(head)]
    for r in ordered(rows):
        pct = [None if v is None else 100 * v for v in (r.mfu, r.bw_util)]
        lines.append(f"{r.model[:34]:34s} {r.arm:18s} {r.batch:5d} {_cell(r.throughput, '.3f', 11)} "
                     f"{r.unit[:34]:34s} {_cell(r.ms_per_call, '.1f', 9)} {_cell(r.tflops, '.1f', 8)} "
                     f"{_cell(pct[0], '.1f', 6)} {_cell(pct[1], '.1f', 6)} {_cell(r.peak_gib, '.1f', 6)}  {r.note}")
    return "\n".join(lines)


RUNS: dict[str, tuple[str, Callable[[Bench], None]]] = {
    "reward": (SECTIONS[0], lambda b: bench_reward(b, [FP32, BF16])),
    "sd": (SECTIONS[1], lambda b: bench_t2i(b, "sd-1.5", [FP32, PAPER, BF16], render=False)),
    "sd3": (SECTIONS[1], lambda b: bench_t2i(b, "sd3-medium", [PAPER, BF16, FP32], render=False)),
    "captioner": (SECTIONS[2], lambda b: bench_captioner(b, [FP32, PAPER, BF16])),
    "similarity": (SECTIONS[4], lambda b: bench_similarity(b, [PAPER, BF16])),
    "render-sd": (SECTIONS[3], lambda b: bench_t2i(b, "sd-1.5", [PAPER], render=True)),
    "render-sd3": (SECTIONS[3], lambda b: bench_t2i(b, "sd3-medium", [PAPER], render=True)),
    "compile-reward": (SECTIONS[0], lambda b: bench_reward(b, [COMPILE])),
    "compile-sd": (SECTIONS[1], lambda b: bench_t2i(b, "sd-1.5", [COMPILE], render=False)),
    "compile-sd3": (SECTIONS[1], lambda b: bench_t2i(b, "sd3-medium", [COMPILE], render=False)),
    "compile-captioner": (SECTIONS[2], lambda b: bench_captioner(b, [COMPILE])),
}


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on CPU: check every code path")
    parser.add_argument("--device", default=None)
    parser.add_argument("--budget-s", type=float, default=400.0)
    parser.add_argument("--min-s", type=float, default=None, help="timed seconds per row (default 1; smoke 0.01)")
    parser.add_argument("--render-steps", type=int, default=4, help="denoising steps of the text-to-image rows")
    parser.add_argument("--compile-backend", default=None, help="torch.compile backend (inductor; smoke: eager)")
    parser.add_argument("--runs", default=",".join(RUNS), help="comma-separated, in measuring order")
    parser.add_argument("--arms", default=None, help="comma-separated arm names to measure (default: all)")
    parser.add_argument("--out", default=None, help="write the rows as JSON (rewritten after every row)")
    parser.add_argument("--print", dest="print_json", default=None, help="print the table of a JSON written before")
    args = parser.parse_args(argv)
    if args.print_json:
        saved = json.loads(Path(args.print_json).read_text())
        rows = [Row(**r) for r in saved["rows"]]
        print(table(rows, saved["peaks"], saved["device"]))
        return rows
    device = args.device or ("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if not args.smoke and not device.startswith("cuda"):
        raise SystemExit("no GPU: run with --smoke to check the code paths on CPU")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    from cyclepref.config import load_params

    params = load_params(ROOT / "configs" / "paper.yaml")
    started = time.monotonic()
    peaks = measure_peaks(device, 128, 2**20) if args.smoke else measure_peaks(device)
    name = torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu (smoke)"
    b = Bench(device, SMOKE_SIZES if args.smoke else PAPER_SIZES, params, args.budget_s - (time.monotonic() - started),
              args.min_s if args.min_s is not None else (0.01 if args.smoke else 1.0),
              args.compile_backend or ("eager" if args.smoke else "inductor"), peaks, args.out, args.smoke,
              args.render_steps)
    b.arms = set(args.arms.split(",")) if args.arms else None
    b.info = {"device": name, "torch": torch.__version__, "tf32": False, "weights": "random, paper-size configs",
              "profile": "configs/paper.yaml", "smoke": args.smoke}
    torch.manual_seed(0)
    try:
        for run in args.runs.split(","):
            section, fn = RUNS[run]
            try:
                fn(b)
            except ImportError as err:
                b.skip(section, run, Arm("-", "", ""), 0, "-", f"skipped: {err}")
            b.free()
    finally:
        shutil.rmtree(b.tmp, ignore_errors=True)
    b.save()
    print(f"\n{name}, torch {torch.__version__}; TF32 off; random weights, paper-size configs\n")
    print(table(b.rows, peaks, name))
    return ordered(b.rows)


if __name__ == "__main__":
    main()
