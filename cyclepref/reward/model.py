"""RewardModel: a transformers BLIP image-text matching backbone with the CycleReward MLP head (PAPER.md §4).

The text encoder reads the caption while cross-attending to the ViT's image tokens; its [CLS] output goes through
an MLP (paper: 768 -> 1024 -> 128 -> 64 -> 16 -> 1, GELU between layers, Xavier-uniform weights, zero biases) to one
unbounded scalar, higher = better aligned. The first `fix_rate` of the text layers and ViT blocks, both embeddings
and the projection layers are frozen, and so is the head's output bias: it cancels in r_chosen - r_rejected, so a
pairwise loss gives it zero gradient. `head_init: itm` (a deviation from the paper's random head) sets the head so
that the untrained model scores exactly the backbone's ITM logit difference on the same [CLS] embedding
(`RewardHead.match_itm`).

Images are preprocessed as the authors trained (CycleReward dataset.py `_transform`): bicubic resize of the shorter
side to the input size, centre crop, scale to [0, 1], normalise with the OpenAI CLIP mean / std
(`reward_image_processor`). Regularisation follows BLIP's ViT-L / med BERT as the authors trained it when the params
ask for it (`Regularisation`): dropout of the text encoder's hidden states and attention probabilities
(transformers' BlipTextConfig), attention dropout of the ViT (BlipVisionConfig), and stochastic depth of the ViT
blocks, which transformers' BLIP lacks and `add_drop_path` adds as forward hooks (no change to the weights' names).

A saved model is a plain directory: reward_config.json (head, freeze rule, max_length, drop-path rate and the BLIP
config, dropout included), model.safetensors and the BLIP processor files (the image processor above): training,
evaluation, `cyclepref score` and the pyfunc serving all read images through this one saved processor.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from cyclepref.models import ModelLoadError, load_failed, locate
from cyclepref.store import atomic_dir

PAPER_HEAD = (1024, 128, 64, 16)
HEAD_INITS = ("random", "itm")
PAPER_TEXT_WIDTH = 768
CONFIG_FILE = "reward_config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "cyclepref-reward/1"
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def head_widths_for(text_hidden: int, widths: Sequence[int] | None) -> list[int]:
    """The head's hidden widths: as given, or the paper's scaled by text_hidden / 768 (at least 8 each)."""
    if widths is not None:
        if not widths or any(w <= 0 for w in widths):
            raise ValueError(f"head widths must be positive, got {list(widths)}")
        return list(widths)
    return [max(8, round(w * text_hidden / PAPER_TEXT_WIDTH)) for w in PAPER_HEAD]


LOAD_OPTIONS = ("local_files_only",)


def drop_load_options(model_dir: Path) -> None:
    """Remove the options of the load that transformers writes back into a saved tokenizer config
    (`local_files_only` follows HF_HUB_OFFLINE), so that the saved model does not depend on the environment."""
    for path in model_dir.glob("*_config.json"):
        cfg = json.loads(path.read_text())
        if any(k in cfg for k in LOAD_OPTIONS):
            path.write_text(json.dumps({k: v for k, v in cfg.items() if k not in LOAD_OPTIONS}, indent=2) + "\n")


class RewardHead(nn.Module):
    """in -> widths... -> 1 with GELU between layers; `layers` indices match the authors' `mlp.layers`."""

    def __init__(self, in_features: int, widths: Sequence[int]):
        super().__init__()
        dims = [in_features, *widths, 1]
        layers: list[nn.Module] = []
        for i in range(len(dims) - 1):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < len(dims) - 2:
                layers.append(nn.GELU())
        self.layers = nn.Sequential(*layers)
        for m in self.layers:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x).squeeze(-1)

    @torch.no_grad()
    def match_itm(self, itm_head: nn.Linear) -> None:
        """Set the weights so that the head's output equals the BLIP ITM head's logit[1] - logit[0] ("match"
        minus "no match") on the same [CLS] embedding, exactly. GELU(z) - GELU(-z) = z for every z (x Phi(x) with
        Phi(-x) = 1 - Phi(x); the tanh form is odd the same way), so units 0 and 1 of each hidden layer carry +z and
        -z and the next layer reads z = unit 0 - unit 1. The other hidden units keep their Xavier-initialised
        inputs, and no unit reads them or feeds the pair (zero weights) until training moves those weights, so
        the head starts at the backbone's zero-shot ITM score with all its width trainable."""
        linears = [m for m in self.layers if isinstance(m, nn.Linear)]
        if itm_head.out_features != 2 or itm_head.in_features != linears[0].in_features:
            raise ValueError(
                f"ITM head {itm_head.in_features} -> {itm_head.out_features} does not fit a reward head reading "
                f"{linears[0].in_features} features (expected {linears[0].in_features} -> 2)"
            )
        narrow = [m.out_features for m in linears[:-1] if m.out_features < 2]
        if narrow:
            raise ValueError(f"head_init 'itm' needs every hidden width >= 2 (a +z / -z unit pair), got {narrow}")
        w = itm_head.weight[1] - itm_head.weight[0]
        b = itm_head.bias[1] - itm_head.bias[0]
        first, rest = linears[0], linears[1:]
        first.weight[0].copy_(w)
        first.weight[1].copy_(-w)
        first.bias[0].copy_(b)
        first.bias[1].copy_(-b)
        for layer in rest:
            layer.weight[:, :2] = 0.0
            layer.weight[:2, :] = 0.0
            layer.bias[:2] = 0.0
            layer.weight[0, 0], layer.weight[0, 1] = 1.0, -1.0
            if layer.out_features > 1:
                layer.weight[1, 0], layer.weight[1, 1] = -1.0, 1.0
        linears[-1].weight.zero_()
        linears[-1].weight[0, 0], linears[-1].weight[0, 1] = 1.0, -1.0
        linears[-1].bias.zero_()


def frozen_parameter(name: str, n_text_frozen: int, n_vision_frozen: int, fix_rate: float) -> bool:
    """The freeze rule: projections always; with fix_rate > 0 also both embeddings and the first layers."""
    if name.startswith(("vision_proj.", "text_proj.")):
        return True
    if fix_rate <= 0:
        return False
    if name.startswith(("text_encoder.embeddings.", "vision_model.embeddings.")):
        return True
    layers = (("text_encoder.encoder.layer.", n_text_frozen), ("vision_model.encoder.layers.", n_vision_frozen))
    for prefix, n in layers:
        if name.startswith(prefix):
            return int(name[len(prefix) :].split(".", 1)[0]) < n
    return False


def resize_image_input(backbone, size: int) -> None:
    """Set the ViT input resolution to `size` px: the patch position embeddings are resampled once (bicubic) and
    the config follows."""
    vc, emb = backbone.config.vision_config, backbone.vision_model.embeddings
    if size == vc.image_size:
        return
    if size % vc.patch_size:
        raise ValueError(f"image_size {size} is not a multiple of the patch size {vc.patch_size}")
    old, new = vc.image_size // vc.patch_size, size // vc.patch_size
    pos = emb.position_embedding.data
    grid = pos[:, 1:].reshape(1, old, old, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid.float(), size=(new, new), mode="bicubic", align_corners=False).to(pos.dtype)
    patches = grid.permute(0, 2, 3, 1).reshape(1, new * new, -1)
    emb.position_embedding = nn.Parameter(torch.cat([pos[:, :1], patches], 1))
    emb.image_size, emb.num_patches, emb.num_positions = size, new * new, new * new + 1
    vc.image_size = size


def reward_image_processor(size: int):
    """The authors' image transform as the settings of a transformers image processor (saved with the model; applied
    by `image_pixels`): bicubic resize of the shorter side to `size`, centre crop to size x size, RGB, scale to
    [0, 1], normalise with the OpenAI CLIP mean / std."""
    from transformers import BlipImageProcessor
    from transformers.image_utils import PILImageResampling

    return BlipImageProcessor(
        do_resize=True,
        size={"shortest_edge": size},
        resample=PILImageResampling.BICUBIC,
        do_center_crop=True,
        crop_size={"height": size, "width": size},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=list(OPENAI_CLIP_MEAN),
        image_std=list(OPENAI_CLIP_STD),
        do_convert_rgb=True,
    )


def image_pixels(image_processor, images: Sequence[Image.Image]) -> torch.Tensor:
    """Pixel values (B, 3, S, S) of PIL images under a saved image processor's settings. With a centre crop (every
    model from `reward_image_processor`) the resize and crop are torchvision's on the PIL image, i.e. exactly the
    authors' transform (transformers' own crop rounds an odd margin down, torchvision's to the nearest even offset);
    a processor without a crop (a model saved before) is applied as it is."""
    ip = image_processor
    if not getattr(ip, "do_center_crop", False):
        return ip([im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF

    crop = [ip.crop_size["height"], ip.crop_size["width"]]
    short = ip.size["shortest_edge"]
    pixels = [
        TF.to_tensor(TF.center_crop(TF.resize(im.convert("RGB"), short, InterpolationMode.BICUBIC), crop))
        for im in images
    ]
    return TF.normalize(torch.stack(pixels), list(ip.image_mean), list(ip.image_std))


@dataclass(frozen=True)
class Regularisation:
    """Dropout and stochastic depth used in training (inactive in eval mode). Authors (BLIP ViT-L, med BERT):
    text 0.1 / 0.1, ViT attention 0, drop path 0.1."""

    text_dropout: float = 0.0
    text_attention_dropout: float = 0.0
    vision_attention_dropout: float = 0.0
    drop_path_rate: float = 0.0

    def apply(self, blip_config) -> None:
        """Write the dropout rates into a BlipConfig (drop path is not a transformers setting)."""
        blip_config.text_config.hidden_dropout_prob = self.text_dropout
        blip_config.text_config.attention_probs_dropout_prob = self.text_attention_dropout
        blip_config.vision_config.attention_dropout = self.vision_attention_dropout


def _drop_branch(rate: float, module: nn.Module, args, output):
    """Forward hook: drop a residual branch's output per sample with probability `rate` and scale the kept ones by
    1 / (1 - rate) (timm's DropPath), in training only."""
    if not module.training:
        return None
    x = output[0] if isinstance(output, tuple) else output
    keep = 1.0 - rate
    mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep).div_(keep)
    return (x * mask, *output[1:]) if isinstance(output, tuple) else x * mask


def add_drop_path(vision_model, rate: float) -> None:
    """Stochastic depth on both residual branches (attention, MLP) of every ViT block, the rate rising linearly
    from 0 at the first block to `rate` at the last (BLIP's VisionTransformer)."""
    layers = vision_model.encoder.layers
    for i, layer in enumerate(layers):
        p = rate * i / max(len(layers) - 1, 1)
        if p > 0:
            layer.self_attn.register_forward_hook(partial(_drop_branch, p))
            layer.mlp.register_forward_hook(partial(_drop_branch, p))


class RewardModel(nn.Module):
    """score(images, texts) -> tensor[B]; forward(...) is the differentiable path used for training."""

    def __init__(
        self,
        blip_config,
        head_widths: Sequence[int] | None,
        fix_rate: float,
        max_length: int,
        processor,
        backbone=None,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        from transformers import BlipForImageTextRetrieval

        if not 0.0 <= fix_rate <= 1.0:
            raise ValueError(f"fix_rate must be in [0, 1], got {fix_rate}")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        max_pos = blip_config.text_config.max_position_embeddings
        if not 0 < max_length <= max_pos:
            raise ValueError(f"max_length {max_length} must be in 1..{max_pos} (the text encoder's positions)")
        blip = backbone if backbone is not None else BlipForImageTextRetrieval(blip_config)
        self.blip_config = blip_config
        self.vision_model = blip.vision_model
        self.text_encoder = blip.text_encoder
        self.vision_proj = blip.vision_proj
        self.text_proj = blip.text_proj
        text_hidden = blip_config.text_config.hidden_size
        self.head_widths = head_widths_for(text_hidden, head_widths)
        self.head = RewardHead(text_hidden, self.head_widths)
        self.fix_rate = float(fix_rate)
        self.max_length = int(max_length)
        self.processor = processor
        self.metadata: dict = {}
        self.drop_path_rate = float(drop_path_rate)
        add_drop_path(self.vision_model, self.drop_path_rate)
        self.apply_freeze()

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_backbone(
        cls,
        path: str,
        *,
        revision: str | None = None,
        head_widths: Sequence[int] | None = None,
        fix_rate: float = 0.7,
        max_length: int = 128,
        image_size: int | None = None,
        regularisation: Regularisation | None = None,
        seed: int = 0,
        head_init: str = "random",
    ) -> RewardModel:
        """A new reward model on a BLIP ITM checkpoint (hub id or local directory); the head is seeded.
        `image_size`: input resolution (None = the checkpoint's; see resize_image_input); images are read with
        `reward_image_processor` at that size (the tokenizer is the checkpoint's).
        `head_init`: "random" (the paper's Xavier-uniform head) or "itm" (RewardHead.match_itm: the untrained
        model scores exactly the checkpoint's ITM logit difference, so training starts at its zero-shot score)."""
        from transformers import AutoProcessor, BlipConfig, BlipForImageTextRetrieval

        if head_init not in HEAD_INITS:
            raise ValueError(f"head_init must be one of {HEAD_INITS}, got {head_init!r}")
        reg = regularisation or Regularisation()
        where = locate(path)
        try:
            processor = AutoProcessor.from_pretrained(where, revision=revision)
            config = BlipConfig.from_pretrained(where, revision=revision)
            reg.apply(config)
            backbone = BlipForImageTextRetrieval.from_pretrained(
                where, revision=revision, config=config, dtype=torch.float32
            )
        except Exception as err:
            raise load_failed(path, err) from err
        if image_size is not None:
            resize_image_input(backbone, image_size)
        processor.image_processor = reward_image_processor(backbone.config.vision_config.image_size)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = cls(backbone.config, head_widths, fix_rate, max_length, processor, backbone=backbone,
                        drop_path_rate=reg.drop_path_rate)
        if head_init == "itm":
            model.head.match_itm(backbone.itm_head)
        return model

    @classmethod
    def from_pretrained(cls, path: str | Path) -> RewardModel:
        """Load a directory written by save_pretrained."""
        from safetensors.torch import load_file
        from transformers import AutoProcessor, BlipConfig

        path = Path(path)
        cfg_file = path / CONFIG_FILE
        if not cfg_file.exists():
            raise ModelLoadError(
                f"{path}: not a cyclepref reward model directory (no {CONFIG_FILE}); "
                "train one with `dvc repro train_reward` or start from a BLIP backbone with RewardModel.from_backbone"
            )
        cfg = json.loads(cfg_file.read_text())
        if cfg.get("format") != FORMAT:
            raise ModelLoadError(f"{cfg_file}: format {cfg.get('format')!r}, expected {FORMAT!r}")
        try:
            processor = AutoProcessor.from_pretrained(str(path))
            model = cls(
                BlipConfig.from_dict(cfg["backbone"]), cfg["head_widths"], cfg["fix_rate"], cfg["max_length"],
                processor, drop_path_rate=cfg.get("drop_path_rate", 0.0),
            )
            state = load_file(str(path / WEIGHTS_FILE))
        except Exception as err:
            raise load_failed(str(path), err) from err
        model.load_state_dict(state, strict=True)
        model.metadata = cfg.get("metadata", {})
        return model.eval()

    def save_pretrained(self, path: str | Path, metadata: dict | None = None) -> Path:
        """Write config, weights and processor into `path` (atomically replaced)."""
        from safetensors.torch import save_file

        path = Path(path)
        cfg = {
            "format": FORMAT,
            "head_widths": self.head_widths,
            "fix_rate": self.fix_rate,
            "max_length": self.max_length,
            "drop_path_rate": self.drop_path_rate,
            "backbone": self.blip_config.to_dict(),
            "metadata": metadata if metadata is not None else self.metadata,
        }
        with atomic_dir(path) as tmp:
            state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
            save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT})
            self.processor.save_pretrained(str(tmp))
            drop_load_options(tmp)
            (tmp / CONFIG_FILE).write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str) + "\n")
        return path

    # ------------------------------------------------------------------ freeze rule

    def frozen_counts(self) -> tuple[int, int]:
        n_text = self.blip_config.text_config.num_hidden_layers
        n_vision = self.blip_config.vision_config.num_hidden_layers
        return int(n_text * self.fix_rate), int(n_vision * self.fix_rate)

    def apply_freeze(self) -> None:
        n_text, n_vision = self.frozen_counts()
        for name, p in self.named_parameters():
            p.requires_grad_(not frozen_parameter(name, n_text, n_vision, self.fix_rate))
        self.head.layers[-1].bias.requires_grad_(False)

    def trainable_names(self) -> list[str]:
        return [n for n, p in self.named_parameters() if p.requires_grad]

    # ------------------------------------------------------------------ inputs

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        tok = self.processor.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {"input_ids": tok["input_ids"], "attention_mask": tok["attention_mask"]}

    def pixels(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return image_pixels(self.processor.image_processor, images)

    def preprocess_tensor(self, pixels: torch.Tensor) -> torch.Tensor:
        """Differentiable preprocessing of RGB images in [0, 1] (B, 3, H, W), as the image processor does it:
        resize the shorter side and centre crop (or, for a processor without a crop, resize to its size), then
        normalise."""
        ip = self.processor.image_processor
        x = pixels
        if ip.do_center_crop:
            crop = (ip.crop_size["height"], ip.crop_size["width"])
            h, w = x.shape[-2:]
            short = ip.size["shortest_edge"]
            size = (short, int(short * w / h)) if h <= w else (int(short * h / w), short)
        else:
            size = crop = (ip.size["height"], ip.size["width"])
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
        top, left = (round((s - c) / 2.0) for s, c in zip(size, crop, strict=True))
        x = x[..., top : top + crop[0], left : left + crop[1]]
        mean = torch.tensor(ip.image_mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(ip.image_std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std

    # ------------------------------------------------------------------ scoring

    def forward(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Rewards for T texts against P images; text t attends to image image_index[t] (default: t)."""
        image_embeds = self.vision_model(pixel_values=pixel_values).last_hidden_state
        if image_index is not None:
            image_embeds = image_embeds.index_select(0, image_index)
        if image_embeds.shape[0] != input_ids.shape[0]:
            raise ValueError(f"{input_ids.shape[0]} texts but {image_embeds.shape[0]} images (pass image_index)")
        hidden = self.text_encoder(
            input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds
        ).last_hidden_state
        return self.head(hidden[:, 0, :].float())

    def reward(self, pixels: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
        """Differentiable rewards for images given as a (B, 3, H, W) tensor in [0, 1] (e.g. generator outputs)."""
        if pixels.shape[0] != len(texts):
            raise ValueError(f"{pixels.shape[0]} images but {len(texts)} texts")
        tok = {k: v.to(pixels.device) for k, v in self.tokenize(texts).items()}
        return self(self.preprocess_tensor(pixels), tok["input_ids"], tok["attention_mask"])

    @torch.inference_mode()
    def score(self, images: Sequence[Image.Image], texts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
        """Rewards for aligned (image, text) pairs, batched; the same image object is encoded once per batch."""
        if len(images) != len(texts):
            raise ValueError(f"{len(images)} images but {len(texts)} texts")
        out = []
        for start in range(0, len(texts), batch_size):
            imgs, txts = images[start : start + batch_size], texts[start : start + batch_size]
            slot: dict[int, int] = {}
            unique: list[Image.Image] = []
            index = []
            for im in imgs:
                if id(im) not in slot:
                    slot[id(im)] = len(unique)
                    unique.append(im)
                index.append(slot[id(im)])
            tok = self.tokenize(txts)
            dev = self.device
            out.append(
                self(
                    self.pixels(unique).to(dev),
                    tok["input_ids"].to(dev),
                    tok["attention_mask"].to(dev),
                    torch.tensor(index, device=dev),
                ).float().cpu()
            )
        return torch.cat(out) if out else torch.empty(0)
