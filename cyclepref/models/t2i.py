"""Text-to-image adapter (G: text -> image) over diffusers pipelines."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from cyclepref import runtime
from cyclepref.config import T2ISpec
from cyclepref.models import load_failed, locate


def _absent_components(path: str) -> dict[str, None]:
    """Components saved as absent (e.g. SD3 without its T5 encoder) must be passed as None when loading."""
    index = Path(path) / "model_index.json"
    if not index.exists():
        return {}
    entries = json.loads(index.read_text())
    return {k: None for k, v in entries.items() if isinstance(v, list) and v == [None, None]}


class TextToImage:
    """Batched generation with one torch.Generator per item: an item's image depends on its seed only."""

    def __init__(self, spec: T2ISpec, device: str = "cpu"):
        from diffusers import DiffusionPipeline

        self.spec, self.device = spec, device
        path = locate(spec.path)
        try:
            self.pipe = DiffusionPipeline.from_pretrained(
                path,
                revision=spec.revision,
                **runtime.load_kwargs(spec.family, spec.dtype, device),
                trust_remote_code=spec.trust_remote_code,
                **_absent_components(path),
            )
        except Exception as err:
            raise load_failed(spec.path, err) from err
        self.pipe.to(device)
        self.pipe.set_progress_bar_config(disable=True)
        if runtime.attention() == "eager" and getattr(self.pipe, "unet", None) is not None:
            from diffusers.models.attention_processor import AttnProcessor

            self.pipe.unet.set_attn_processor(AttnProcessor())
        runtime.compile_parts(self.pipe, "unet", "transformer")

    @torch.inference_mode()
    def generate(self, prompts: Sequence[str], seeds: Sequence[int], batch_size: int = 4) -> list[Image.Image]:
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        images: list[Image.Image] = []
        for start in range(0, len(prompts), batch_size):
            chunk = list(prompts[start : start + batch_size])
            gens = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds[start : start + batch_size]]
            result = self.pipe(
                prompt=chunk,
                num_inference_steps=self.spec.steps,
                guidance_scale=self.spec.guidance,
                height=self.spec.height,
                width=self.spec.width,
                generator=gens,
                output_type="pil",
                **({"max_sequence_length": self.spec.max_sequence_length}
                   if self.spec.max_sequence_length is not None else {}),
            )
            images += result.images
        return images
