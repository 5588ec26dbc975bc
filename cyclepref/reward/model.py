"""RewardModel: a transformers BLIP image-text matching backbone with the CycleReward MLP head (PAPER.md §4).

The text encoder reads the caption while cross-attending to the ViT's image tokens; its [CLS] output goes through
an MLP (paper: 768 -> 1024 -> 128 -> 64 -> 16 -> 1, GELU between layers, Xavier-uniform weights, zero biases) to one
unbounded scalar, higher = better aligned. The first `fix_rate` of the text layers and ViT blocks, both embeddings
and the projection layers are frozen, and so is the head's output bias: it cancels in r_chosen - r_rejected, so a
pairwise loss gives it zero gradient.

A saved model is a plain directory: reward_config.json (head, freeze rule, max_length and the BLIP config),
model.safetensors and the BLIP processor files.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from cyclepref.models import ModelLoadError, load_failed, locate
from cyclepref.store import atomic_dir

PAPER_HEAD = (1024, 128, 64, 16)
PAPER_TEXT_WIDTH = 768
CONFIG_FILE = "reward_config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "cyclepref-reward/1"


def head_widths_for(text_hidden: int, widths: Sequence[int] | None) -> list[int]:
    """The head's hidden widths: as given, or the paper's scaled by text_hidden / 768 (at least 8 each)."""
    if widths is not None:
        if not widths or any(w <= 0 for w in widths):
            raise ValueError(f"head widths must be positive, got {list(widths)}")
        return list(widths)
    return [max(8, round(w * text_hidden / PAPER_TEXT_WIDTH)) for w in PAPER_HEAD]


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


def resize_image_input(backbone, processor, size: int) -> None:
    """Set the ViT input resolution to `size` px: the patch position embeddings are resampled once (bicubic), the
    config and the image processor follow."""
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
    processor.image_processor.size = {"height": size, "width": size}




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
    ):
        super().__init__()
        from transformers import BlipForImageTextRetrieval

        if not 0.0 <= fix_rate <= 1.0:
            raise ValueError(f"fix_rate must be in [0, 1], got {fix_rate}")
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
        seed: int = 0,
    ) -> RewardModel:
        """A new reward model on a BLIP ITM checkpoint (hub id or local directory); the head is seeded.
        `image_size`: input resolution (None = the checkpoint's; see resize_image_input)."""
        from transformers import AutoProcessor, BlipForImageTextRetrieval

        where = locate(path)
        try:
            processor = AutoProcessor.from_pretrained(where, revision=revision)
            backbone = BlipForImageTextRetrieval.from_pretrained(where, revision=revision, dtype=torch.float32)
        except Exception as err:
            raise load_failed(path, err) from err
        if image_size is not None:
            resize_image_input(backbone, processor, image_size)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return cls(backbone.config, head_widths, fix_rate, max_length, processor, backbone=backbone)

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
                BlipConfig.from_dict(cfg["backbone"]), cfg["head_widths"], cfg["fix_rate"], cfg["max_length"], processor
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
            "backbone": self.blip_config.to_dict(),
            "metadata": metadata if metadata is not None else self.metadata,
        }
        with atomic_dir(path) as tmp:
            state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
            save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT})
            self.processor.save_pretrained(str(tmp))
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
        return self.processor.image_processor([im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]

    def preprocess_tensor(self, pixels: torch.Tensor) -> torch.Tensor:
        """Differentiable preprocessing of RGB images in [0, 1] (B, 3, H, W): resize and normalise."""
        ip = self.processor.image_processor
        size = (ip.size["height"], ip.size["width"])
        x = pixels
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
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
