"""GPU throughput at paper scale, for a lent GPU machine with no network (run through bench/gpu.sh).

Builds paper-size architectures from configs with random weights (throughput does not depend on the weights' values)
and times them in one process:
- an SD1.5-size UNet (860M) at 512 px and an SD3-medium-size MMDiT transformer (2B) at 1024 px, one denoising call
  with classifier-free guidance (batch doubled), reported as images/s for 50 steps (the paper's setting); the VAE
  decode and text encoders (once per image) are left out;
- the BLIP-large reward model (ViT-L/16 at 224 px, BERT-base cross-attending; PAPER.md section 4), pairs/s;
- a 7B LLaVA-1.5-shaped captioner (CLIP ViT-L/14 at 336 px, LLaMA-7B), greedy generation of 77 new tokens,
  generated tokens/s.
Arms: fp32 with eager attention (TF32 off), bf16 with SDPA, bf16 + SDPA + torch.compile; batched against one item
per call. A time budget (--budget-s) skips the rows that no longer fit; one table is printed at the end.
`--smoke` runs every code path on CPU at tiny sizes (tests/test_runtime_gpu_smoke.py).
    python bench/gpu.py [--smoke] [--budget-s 450] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

STEPS = 50
NEW_TOKENS = 77


@dataclass
class Row:
    model: str
    arm: str
    batch: int
    throughput: float | None
    unit: str
    ms_per_call: float | None
    peak_gib: float | None
    note: str = ""


@dataclass(frozen=True)
class Arm:
    name: str
    dtype: torch.dtype
    attention: str
    compile: bool


ARMS = [Arm("fp32 eager", torch.float32, "eager", False), Arm("bf16 sdpa", torch.bfloat16, "sdpa", False),
        Arm("bf16 sdpa compile", torch.bfloat16, "sdpa", True)]

PAPER = {
    "unet": dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8,
                 block_out_channels=(320, 640, 1280, 1280), layers_per_block=2),
    "unet_batch": 8,
    "sd3": dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
                num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
                pooled_projection_dim=2048, pos_embed_max_size=192),
    "sd3_text_tokens": 333,
    "sd3_batch": 2,
    "blip_vision": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                        image_size=224, patch_size=16),
    "blip_text": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                      encoder_hidden_size=1024),
    "blip_tokens": 128,
    "blip_batch": 128,
    "llava_vision": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096,
                         image_size=336, patch_size=14, projection_dim=768),
    "llava_text": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                       intermediate_size=11008, vocab_size=32064, max_position_embeddings=4096),
    "llava_prompt_tokens": 24,
    "llava_batch": 16,
    "new_tokens": NEW_TOKENS,
    "per_item_calls": 3,
}
SMOKE = {
    "unet": dict(sample_size=8, cross_attention_dim=32, attention_head_dim=4, block_out_channels=(32, 64),
                 layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=8),
    "unet_batch": 2,
    "sd3": dict(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
                num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32,
                pos_embed_max_size=16),
    "sd3_text_tokens": 6,
    "sd3_batch": 2,
    "blip_vision": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                        image_size=32, patch_size=16),
    "blip_text": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                      encoder_hidden_size=32),
    "blip_tokens": 8,
    "blip_batch": 4,
    "llava_vision": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                         image_size=28, patch_size=14, projection_dim=32),
    "llava_text": dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                       intermediate_size=64, vocab_size=32064, max_position_embeddings=256),
    "llava_prompt_tokens": 4,
    "llava_batch": 2,
    "new_tokens": 4,
    "per_item_calls": 2,
}


class Bench:
    def __init__(self, device: str, sizes: dict, budget_s: float, compile_backend: str, min_s: float):
        self.device, self.sizes, self.compile_backend, self.min_s = device, sizes, compile_backend, min_s
        self.deadline = time.monotonic() + budget_s
        self.rows: list[Row] = []

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def sync(self) -> None:
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()

    def seconds_per_call(self, fn: Callable[[], object], max_calls: int = 20) -> float:
        """Two warm-up calls (compilation happens there), then calls until min_s has passed."""
        for _ in range(2):
            fn()
        self.sync()
        calls, started = 0, time.perf_counter()
        while calls < max_calls and (calls == 0 or time.perf_counter() - started < self.min_s):
            fn()
            calls += 1
        self.sync()
        return (time.perf_counter() - started) / calls

    def measure(self, model: str, arm: Arm, batch: int, fn: Callable[[], object], per_call: float, unit: str,
                need_s: float, note: str = "") -> None:
        """Time fn (which does `batch` items) and record per_call * items/s, unless the budget is spent."""
        if self.left() < need_s:
            self.rows.append(Row(model, arm.name, batch, None, unit, None, None, f"skipped: {self.left():.0f} s left"))
            return
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        try:
            s = self.seconds_per_call(fn)
        except torch.OutOfMemoryError:
            self.rows.append(Row(model, arm.name, batch, None, unit, None, None, "out of memory"))
            torch.cuda.empty_cache()
            return
        peak = torch.cuda.max_memory_allocated() / 2**30 if self.device.startswith("cuda") else None
        self.rows.append(Row(model, arm.name, batch, round(per_call * batch / s, 3), unit, round(1000 * s, 2),
                             None if peak is None else round(peak, 1), note))

    def compiled(self, module, arm: Arm):
        return torch.compile(module, backend=self.compile_backend) if arm.compile else module


def _diffusers_attention(model, arm: Arm) -> str:
    """The UNet's attention processors for the arm (classic = eager, AttnProcessor2_0 = SDPA); the SD3 transformer
    keeps its SDPA joint-attention processor in every arm (diffusers has no eager one)."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    if model.__class__.__name__ == "UNet2DConditionModel":
        model.set_attn_processor(AttnProcessor() if arm.attention == "eager" else AttnProcessor2_0())
        return ""
    return "SDPA in every arm (diffusers has no eager joint-attention processor)"


def bench_unet(b: Bench) -> None:
    from diffusers import UNet2DConditionModel

    cfg = b.sizes["unet"]
    with torch.device(b.device):
        unet = UNet2DConditionModel(**cfg).eval()
    side, ctx = cfg["sample_size"], cfg["cross_attention_dim"]
    for arm in ARMS:
        unet.to(arm.dtype)
        note = _diffusers_attention(unet, arm)
        net = b.compiled(unet, arm)
        for batch in (b.sizes["unet_batch"], 1):
            latents = torch.randn(2 * batch, 4, side, side, device=b.device, dtype=arm.dtype)
            text = torch.randn(2 * batch, 77, ctx, device=b.device, dtype=arm.dtype)
            t = torch.full((2 * batch,), 500, device=b.device)

            @torch.inference_mode()
            def call(net=net, latents=latents, text=text, t=t):
                return net(latents, t, encoder_hidden_states=text).sample

            b.measure("UNet SD1.5-size 512px", arm, batch, call, 1 / STEPS, f"img/s ({STEPS} steps, CFG)",
                      need_s=90 if arm.compile else 20, note=note)
    del unet


def bench_sd3(b: Bench) -> None:
    from diffusers import SD3Transformer2DModel

    cfg = b.sizes["sd3"]
    with torch.device(b.device):
        model = SD3Transformer2DModel(**cfg).eval()
    side = cfg["sample_size"]
    for arm in ARMS:
        model.to(arm.dtype)
        note = _diffusers_attention(model, arm)
        net = b.compiled(model, arm)
        for batch in (b.sizes["sd3_batch"], 1):
            n = 2 * batch
            latents = torch.randn(n, cfg["in_channels"], side, side, device=b.device, dtype=arm.dtype)
            text = torch.randn(n, b.sizes["sd3_text_tokens"], cfg["joint_attention_dim"], device=b.device,
                               dtype=arm.dtype)
            pooled = torch.randn(n, cfg["pooled_projection_dim"], device=b.device, dtype=arm.dtype)
            t = torch.full((n,), 500.0, device=b.device)

            @torch.inference_mode()
            def call(net=net, latents=latents, text=text, pooled=pooled, t=t):
                return net(latents, encoder_hidden_states=text, pooled_projections=pooled, timestep=t).sample

            b.measure("MMDiT SD3-medium-size 1024px", arm, batch, call, 1 / STEPS, f"img/s ({STEPS} steps, CFG)",
                      need_s=120 if arm.compile else 30, note=note)
    del model


def _blip(b: Bench):
    from transformers import BlipConfig

    cfg = BlipConfig(vision_config=b.sizes["blip_vision"], text_config={**b.sizes["blip_text"], "vocab_size": 30524})
    try:
        from cyclepref.reward.model import RewardModel

        with torch.device(b.device):
            return RewardModel(cfg, None, 0.7, b.sizes["blip_tokens"], processor=None).eval(), "cyclepref RewardModel"
    except ImportError as err:
        from transformers import BlipForImageTextRetrieval

        with torch.device(b.device):
            return BlipForImageTextRetrieval(cfg).eval(), f"BLIP ITM without the head ({err})"


def bench_reward(b: Bench) -> None:
    model, what = _blip(b)
    vision = b.sizes["blip_vision"]
    for arm in ARMS:
        model.to(arm.dtype)
        if hasattr(model, "head"):
            model.head.float()
        net = b.compiled(model, arm)
        for batch in (b.sizes["blip_batch"], 1):
            pixels = torch.randn(batch, 3, vision["image_size"], vision["image_size"], device=b.device,
                                 dtype=arm.dtype)
            ids = torch.randint(1000, 30000, (batch, b.sizes["blip_tokens"]), device=b.device)
            mask = torch.ones_like(ids)

            @torch.inference_mode()
            def call(net=net, pixels=pixels, ids=ids, mask=mask):
                return net(pixel_values=pixels, input_ids=ids, attention_mask=mask)

            b.measure("BLIP-large reward model", arm, batch, call, 1.0, "pairs/s",
                      need_s=90 if arm.compile else 15, note=f"{what}; BLIP has no SDPA path: eager attention")
    del model


def _llava(b: Bench, dtype: torch.dtype, attention: str):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    text = LlamaConfig(**b.sizes["llava_text"], pad_token_id=0, bos_token_id=1, eos_token_id=2)
    cfg = LlavaConfig(vision_config=CLIPVisionConfig(**b.sizes["llava_vision"]), text_config=text)
    cfg._attn_implementation = attention
    with torch.device(b.device):
        model = LlavaForConditionalGeneration._from_config(cfg, dtype=dtype).eval()
    model.generation_config.pad_token_id = 0
    return model


def bench_captioner(b: Bench) -> None:
    vision = b.sizes["llava_vision"]
    image_tokens = (vision["image_size"] // vision["patch_size"]) ** 2
    new = b.sizes["new_tokens"]
    for arm in ARMS[:2]:
        if b.left() < 60:
            b.rows.append(Row("LLaVA-1.5-7B-shaped captioner", arm.name, 0, None, "tokens/s", None, None,
                              f"skipped: {b.left():.0f} s left"))
            continue
        model = _llava(b, arm.dtype, arm.attention)
        image_token = getattr(model.config, "image_token_id", None) or model.config.image_token_index
        for batch in (b.sizes["llava_batch"], 1):
            prompt = [1] + [image_token] * image_tokens + list(range(1000, 1000 + b.sizes["llava_prompt_tokens"]))
            ids = torch.tensor([prompt] * batch, device=b.device)
            pixels = torch.randn(batch, 3, vision["image_size"], vision["image_size"], device=b.device,
                                 dtype=arm.dtype)

            @torch.inference_mode()
            def call(model=model, ids=ids, pixels=pixels):
                return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels,
                                      max_new_tokens=new, min_new_tokens=new, do_sample=False)

            b.measure("LLaVA-1.5-7B-shaped captioner", arm, batch, call, new, "tokens/s", need_s=30,
                      note=f"{model.config._attn_implementation} attention; greedy, {new} new tokens; "
                      "torch.compile not timed for generate (vLLM is the fast path)")
        del model
        if b.device.startswith("cuda"):
            torch.cuda.empty_cache()


def table(rows: list[Row]) -> str:
    head = f"{'model':32s} {'arm':18s} {'batch':>5s} {'throughput':>12s} {'unit':24s} {'ms/call':>9s} {'GiB':>6s}  note"
    lines = [head, "-" * len(head)]
    for r in rows:
        thr = "-" if r.throughput is None else f"{r.throughput:12.3f}"
        ms = "-" if r.ms_per_call is None else f"{r.ms_per_call:9.1f}"
        gib = "-" if r.peak_gib is None else f"{r.peak_gib:6.1f}"
        lines.append(f"{r.model:32s} {r.arm:18s} {r.batch:5d} {thr:>12s} {r.unit:24s} {ms:>9s} {gib:>6s}  {r.note}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on CPU: check every code path")
    parser.add_argument("--device", default=None)
    parser.add_argument("--budget-s", type=float, default=450.0)
    parser.add_argument("--min-s", type=float, default=None, help="timed seconds per measurement")
    parser.add_argument("--compile-backend", default=None,
                        help="torch.compile backend (default inductor; smoke: eager)")
    parser.add_argument("--out", default=None, help="write the rows as JSON")
    args = parser.parse_args(argv)
    device = args.device or ("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if not args.smoke and not device.startswith("cuda"):
        raise SystemExit("no GPU: run with --smoke to check the code paths on CPU")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    b = Bench(device, SMOKE if args.smoke else PAPER, args.budget_s,
              args.compile_backend or ("eager" if args.smoke else "inductor"),
              args.min_s if args.min_s is not None else (0.05 if args.smoke else 1.0))
    torch.manual_seed(0)
    for name, section in (("reward", bench_reward), ("unet", bench_unet), ("captioner", bench_captioner),
                          ("sd3", bench_sd3)):
        try:
            section(b)
        except ImportError as err:
            b.rows.append(Row(name, "-", 0, None, "-", None, None, f"skipped: {err}"))
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    info = torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu (smoke)"
    print(f"\n{info}, torch {torch.__version__}; TF32 off; random weights, paper-size configs\n")
    print(table(b.rows))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"device": info, "torch": torch.__version__, "rows": [asdict(r) for r in b.rows]}, fh, indent=2)
    return b.rows


if __name__ == "__main__":
    main()
