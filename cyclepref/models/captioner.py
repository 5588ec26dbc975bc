"""Captioner adapter (F: image -> text) over transformers image-text-to-text models."""

from __future__ import annotations

import functools
import re
import sys
from collections.abc import Sequence

import torch
from PIL import Image

from cyclepref import runtime
from cyclepref.config import CaptionerSpec
from cyclepref.models import ModelLoadError, load_failed, locate
from cyclepref.models.formats import DETAILED

DEFAULT_PROMPTS = {
    "llava": DETAILED,
    "llava_next": DETAILED,
    "llava_onevision": DETAILED,
    "qwen2_vl": DETAILED,
    "internvl": "Please describe the image in detail.",
    "blip2": "this is a picture of",
    "blip": "this is a picture of",
}
PREFIX_FAMILIES = {"blip", "blip2"}

_WS = re.compile(r"\s+")
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ufffd]")


def clean_caption(text: str) -> str:
    """PAPER.md §2: remove `**` and double quotes, collapse white space; control characters never belong in a
    caption and are removed as well."""
    text = _CONTROL.sub("", text.replace("**", "").replace('"', ""))
    return _WS.sub(" ", text).strip()


def prompt_for(spec: CaptionerSpec) -> str:
    return spec.prompt if spec.prompt is not None else DEFAULT_PROMPTS[spec.family]


def in_batches(generate, images: Sequence[Image.Image], batch_size: int, sample: dict | None,
               seeds: Sequence[int] | None) -> list[str]:
    """`generate(rgb_images, generate_kwargs) -> captions` over batches: greedy batch by batch, or sampled one image at
    a time with the torch seed of that item, so an item's caption never depends on its batch."""
    out: list[str] = []
    for start in range(0, len(images), batch_size):
        batch = [im.convert("RGB") for im in images[start : start + batch_size]]
        if sample is None:
            out += generate(batch, {"do_sample": False})
            continue
        if seeds is None:
            raise ValueError("sampling needs one seed per image")
        for i, im in enumerate(batch):
            torch.manual_seed(int(seeds[start + i]))
            out += generate([im], {"do_sample": True, **sample})
    return out


class Captioner:
    """Batched greedy (or seeded sampled) captioning with left padding; one model load per instance."""

    def __init__(self, spec: CaptionerSpec, device: str = "cpu"):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.spec, self.device = spec, device
        self.prompt = prompt_for(spec)
        path = locate(spec.path)
        kw = dict(revision=spec.revision, trust_remote_code=spec.trust_remote_code)
        try:
            self.processor = AutoProcessor.from_pretrained(path, **kw)
            if spec.family == "blip":
                from transformers import BlipForConditionalGeneration as cls
            elif spec.family == "blip2":
                from transformers import Blip2ForConditionalGeneration as cls
            else:
                cls = AutoModelForImageTextToText
            fast = runtime.load_kwargs(spec.family, spec.dtype, device)
            self.model = cls.from_pretrained(path, **fast, **kw).to(device).eval()
            runtime.compile_parts(self.model, "forward")
        except Exception as err:
            raise load_failed(spec.path, err) from err
        self.tokenizer = getattr(self.processor, "tokenizer", None)
        if self.tokenizer is not None:
            self.tokenizer.padding_side = "left"
        self._text = self._chat_text() if spec.family not in PREFIX_FAMILIES else self.prompt

    def _chat_text(self) -> str:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.prompt}]}]
        return self.processor.apply_chat_template(messages, add_generation_prompt=True)

    @torch.inference_mode()
    def caption(
        self,
        images: Sequence[Image.Image],
        batch_size: int = 8,
        sample: dict | None = None,
        seeds: Sequence[int] | None = None,
    ) -> list[str]:
        """Raw (uncleaned) captions, one per image. `sample` = generate kwargs for sampling (e.g. temperature);
        sampling is seeded per item from `seeds`, so an item's caption does not depend on its batch."""
        return in_batches(self._generate, images, batch_size, sample, seeds)

    def _generate(self, batch: list[Image.Image], gen: dict) -> list[str]:
        inputs = self.processor(images=batch, text=[self._text] * len(batch), return_tensors="pt", padding=True)
        inputs = inputs.to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.model.dtype)
        ids = self.model.generate(**inputs, max_new_tokens=self.spec.max_new_tokens, **gen)
        if not self.model.config.is_encoder_decoder and self.spec.family != "blip":
            ids = ids[:, inputs["input_ids"].shape[1] :]
        texts = self.processor.batch_decode(ids, skip_special_tokens=True)
        if self.spec.family in PREFIX_FAMILIES:
            texts = [_strip_prefix(t, self.prompt) for t in texts]
        return texts


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def closest_tiling(width: int, height: int, tile: int, min_num: int, max_num: int) -> tuple[int, int]:
    """InternVL's find_closest_aspect_ratio: the (columns, rows) grid with min_num..max_num tiles whose aspect ratio
    is closest to the image's; on a tie the larger grid wins when the image covers over half of it."""
    grids = sorted(
        {(i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1)
         if min_num <= i * j <= max_num},
        key=lambda g: g[0] * g[1],
    )
    aspect, area = width / height, width * height
    best, best_diff = (1, 1), float("inf")
    for g in grids:
        diff = abs(aspect - g[0] / g[1])
        if diff < best_diff:
            best, best_diff = g, diff
        elif diff == best_diff and area > 0.5 * tile * tile * g[0] * g[1]:
            best = g
    return best


def internvl_tiles(image: Image.Image, tile: int, min_num: int, max_num: int, thumbnail: bool) -> list[Image.Image]:
    """InternVL's dynamic_preprocess: resize to the closest grid of tile x tile crops, crop row by row, and append
    a whole-image thumbnail when there is more than one tile."""
    cols, rows = closest_tiling(image.width, image.height, tile, min_num, max_num)
    resized = image.resize((cols * tile, rows * tile))
    boxes = [(c * tile, r * tile, (c + 1) * tile, (r + 1) * tile) for r in range(rows) for c in range(cols)]
    tiles = [resized.crop(box) for box in boxes]
    if thumbnail and len(tiles) != 1:
        tiles.append(image.resize((tile, tile)))
    return tiles


def internvl_pixels(image: Image.Image, tile: int, min_num: int, max_num: int, thumbnail: bool) -> torch.Tensor:
    """(tiles, 3, tile, tile): each tile resized bicubic to tile x tile, scaled to [0, 1], ImageNet-normalised."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    out = []
    for t in internvl_tiles(image.convert("RGB"), tile, min_num, max_num, thumbnail):
        x = TF.to_tensor(TF.resize(t, [tile, tile], interpolation=InterpolationMode.BICUBIC))
        out.append(TF.normalize(x, IMAGENET_MEAN, IMAGENET_STD))
    return torch.stack(out)


SAMPLING_KEYS = {"temperature", "top_p", "top_k"}


def next_token(logits: torch.Tensor, sample: dict) -> torch.Tensor:
    """Greedy argmax, or a draw from the temperature / top-k / top-p (nucleus) filtered distribution, as
    transformers' TemperatureLogitsWarper, TopKLogitsWarper and TopPLogitsWarper filter it (in that order)."""
    if not sample:
        return logits.argmax(-1)
    logits = logits / float(sample.get("temperature", 1.0))
    top_k = int(sample.get("top_k") or 0)
    if 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    top_p = float(sample.get("top_p", 1.0))
    if top_p < 1.0:
        ordered, order = logits.sort(dim=-1, descending=False)
        drop = ordered.softmax(-1).cumsum(-1) <= 1 - top_p
        drop[..., -1:] = False
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1)[:, 0]


def _cache_of(output):
    cache = output.get("cache") if hasattr(output, "get") else None
    return cache if cache is not None else output.past_key_values


@torch.no_grad()
def cached_decode(lm, inputs_embeds, attention_mask, max_new_tokens: int, eos_token_id: int | None = None,
                  do_sample: bool = False, pad_token_id: int | None = None, **kwargs) -> torch.Tensor:
    """`generate` for a remote-code causal LM that has none (InternVL2's InternLM2ForCausalLM on transformers >=
    4.50): decodes from `inputs_embeds` over the model's own forward with its legacy tuple cache (`past_key_values`),
    position ids from the attention mask as the model's prepare_inputs_for_generation builds them. Returns the new
    tokens only (batch, <= max_new_tokens), as `generate(inputs_embeds=...)` does; a finished row is padded."""
    kwargs.pop("generation_config", None), kwargs.pop("output_hidden_states", None), kwargs.pop("use_cache", None)
    unknown = set(kwargs) - SAMPLING_KEYS
    if unknown:
        raise ValueError(f"cached_decode: unsupported generation arguments {sorted(unknown)}")
    sample = {k: v for k, v in kwargs.items() if v is not None} if do_sample else {}
    pad = pad_token_id if pad_token_id is not None else (eos_token_id if eos_token_id is not None else 0)
    batch = inputs_embeds.shape[0]
    mask = attention_mask.long()
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    step = {"inputs_embeds": inputs_embeds, "position_ids": positions}
    cache, done, out = None, torch.zeros(batch, dtype=torch.bool, device=mask.device), []
    for _ in range(max_new_tokens):
        result = lm(**step, attention_mask=mask, past_key_values=cache, use_cache=True, return_dict=True)
        cache = _cache_of(result)
        token = next_token(result.logits[:, -1, :].float(), sample).masked_fill(done, pad)
        out.append(token)
        done |= token == eos_token_id
        if bool(done.all()):
            break
        mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=1)
        step = {"input_ids": token[:, None], "position_ids": step["position_ids"][:, -1:] + 1}
    return torch.stack(out, dim=1) if out else torch.empty(batch, 0, dtype=torch.long, device=mask.device)


def give_generate(lm) -> bool:
    """InternVL2's InternLM2ForCausalLM derives from PreTrainedModel only; since transformers 4.50 that no longer
    brings GenerationMixin, so `InternVLChatModel.generate` fails on `self.language_model.generate`. The LM gets
    `cached_decode` as its `generate` (the remote prepare_inputs_for_generation speaks the legacy `past_key_values`
    API, which transformers' own generate no longer feeds). True when the LM needed it."""
    from transformers import GenerationMixin

    if isinstance(lm, GenerationMixin):
        return False
    lm.generate = functools.partial(cached_decode, lm)
    return True


class InternVLCaptioner:
    """InternVL2 through its repository code (AutoModel + trust_remote_code), as its model card runs it: the slow
    tokenizer, dynamic tiling with a thumbnail, the conversation template of the repository's conversation.py
    (`get_conv_template(model.template)` with the model's system message), <image> expanded into
    <img><IMG_CONTEXT>*n</img>, left padding, and the model's own `generate` (vision features merged into the LM's
    input embeddings). `batch_chat` itself is not called: the pinned snapshots move its inputs with `.cuda()`.
    Same contract as Captioner."""

    def __init__(self, spec: CaptionerSpec, device: str = "cpu"):
        from transformers import AutoModel, AutoTokenizer

        self.spec, self.device = spec, device
        self.prompt = prompt_for(spec)
        path = locate(spec.path)
        kw = dict(revision=spec.revision, trust_remote_code=spec.trust_remote_code)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, use_fast=False, **kw)
            self.model = AutoModel.from_pretrained(path, **runtime.load_kwargs(spec.family, spec.dtype, device), **kw)
            self.model = self.model.to(device).eval()
            self.template = sys.modules[type(self.model).__module__].get_conv_template(self.model.template)
        except Exception as err:
            raise load_failed(spec.path, err) from err
        give_generate(self.model.language_model)
        cfg = self.model.config
        self.tile = cfg.force_image_size or cfg.vision_config.image_size
        self.min_tiles = cfg.min_dynamic_patch if cfg.dynamic_image_size else 1
        self.max_tiles = cfg.max_dynamic_patch if cfg.dynamic_image_size else 1
        self.thumbnail = bool(cfg.use_thumbnail)
        self.sep = self.template.sep.strip()
        self.model.img_context_token_id = self.tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>")

    def pixels(self, image: Image.Image) -> torch.Tensor:
        return internvl_pixels(image, self.tile, self.min_tiles, self.max_tiles, self.thumbnail)

    def query(self, num_tiles: int) -> str:
        """The prompt batch_chat builds for one image of `num_tiles` tiles."""
        template = self.template.copy()
        template.system_message = self.model.system_message
        template.append_message(template.roles[0], f"<image>\n{self.prompt}")
        template.append_message(template.roles[1], None)
        image = "<img>" + "<IMG_CONTEXT>" * self.model.num_image_token * num_tiles + "</img>"
        return template.get_prompt().replace("<image>", image, 1)

    @torch.inference_mode()
    def caption(self, images, batch_size: int = 8, sample: dict | None = None, seeds=None) -> list[str]:
        return in_batches(self._chat, images, batch_size, sample, seeds)

    def _chat(self, batch: list[Image.Image], gen: dict) -> list[str]:
        tiles = [self.pixels(im) for im in batch]
        pixel_values = torch.cat(tiles).to(self.device, self.model.dtype)
        self.tokenizer.padding_side = "left"
        inputs = self.tokenizer([self.query(len(t)) for t in tiles], return_tensors="pt", padding=True)
        ids = self.model.generate(
            pixel_values=pixel_values, input_ids=inputs["input_ids"].to(self.device),
            attention_mask=inputs["attention_mask"].to(self.device), max_new_tokens=self.spec.max_new_tokens,
            eos_token_id=self.tokenizer.convert_tokens_to_ids(self.sep), **gen,
        )
        texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        return [t.split(self.sep)[0].strip() for t in texts]


def _strip_prefix(text: str, prefix: str) -> str:
    t = text.strip()
    return t[len(prefix) :].strip() if t.lower().startswith(prefix.lower()) else t


class VllmCaptioner:
    """The same captioning contract served by vLLM (continuous batching on GPUs), used when
    CYCLEPREF_CAPTION_BACKEND=vllm and vllm is installed. The prompt text comes from the model's own chat template
    (or the family's text prefix), so it is the same prompt the transformers backend feeds."""

    def __init__(self, spec: CaptionerSpec, device: str = "cuda"):
        try:
            from vllm import LLM
        except ImportError as err:
            raise ModelLoadError("CYCLEPREF_CAPTION_BACKEND=vllm needs `pip install vllm` (GPU machines)") from err
        from transformers import AutoProcessor

        self.spec, self.prompt = spec, prompt_for(spec)
        path = locate(spec.path)
        try:
            processor = AutoProcessor.from_pretrained(path, revision=spec.revision,
                                                      trust_remote_code=spec.trust_remote_code)
            self._text = self.prompt if spec.family in PREFIX_FAMILIES else processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.prompt}]}],
                add_generation_prompt=True,
            )
            self.llm = LLM(model=path, revision=spec.revision, dtype=spec.dtype,
                           trust_remote_code=spec.trust_remote_code, limit_mm_per_prompt={"image": 1})
        except Exception as err:
            raise load_failed(spec.path, err) from err

    def caption(self, images, batch_size: int = 8, sample: dict | None = None, seeds=None) -> list[str]:
        from vllm import SamplingParams

        n = len(images)
        if sample is not None and seeds is None:
            raise ValueError("sampling needs one seed per image")
        params = [
            SamplingParams(max_tokens=self.spec.max_new_tokens, temperature=0.0)
            if sample is None
            else SamplingParams(max_tokens=self.spec.max_new_tokens, seed=int(seeds[i]), **sample)
            for i in range(n)
        ]
        requests = [{"prompt": self._text, "multi_modal_data": {"image": im.convert("RGB")}} for im in images]
        outs = self.llm.generate(requests, params, use_tqdm=False)
        texts = [o.outputs[0].text for o in outs]
        return [_strip_prefix(t, self.prompt) for t in texts] if self.spec.family in PREFIX_FAMILIES else texts


def make_captioner(spec: CaptionerSpec, device: str = "cpu") -> Captioner | InternVLCaptioner | VllmCaptioner:
    """The captioner for the runtime backend (CYCLEPREF_CAPTION_BACKEND = transformers | vllm); InternVL2 (remote
    code, no processor) goes through InternVLCaptioner on the transformers backend."""
    from cyclepref.runtime import caption_backend

    if caption_backend() == "vllm":
        return VllmCaptioner(spec, device)
    return InternVLCaptioner(spec, device) if spec.family == "internvl" else Captioner(spec, device)
