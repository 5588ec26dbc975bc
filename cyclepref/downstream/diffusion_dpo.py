"""Diffusion-DPO (Wallace et al. 2023; PAPER.md §6) of a UNet text-to-image pipeline with a LoRA adapter.

For a (prompt, preferred image, rejected image) pair both images are encoded by the frozen VAE (the posterior mean,
the latents the denoiser was trained on) and noised with the same noise and timestep; the UNet with the adapter is
the trained model, the same UNet with the adapter disabled is
the reference. Loss: cyclepref.downstream.losses.diffusion_dpo_loss. The adapter is saved in diffusers' LoRA format
(pytorch_lora_weights.safetensors), so `pipeline.load_lora_weights(dir)` restores it for generation.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from cyclepref.config import DiffusionDpo, LoraSpec, T2ISpec
from cyclepref.downstream import META_FILE, started_from
from cyclepref.models import local_spec
from cyclepref.store import atomic_dir, canonical_safetensors
from cyclepref.downstream.losses import diffusion_dpo_loss


class DiffusionDpoModel:
    """A pipeline's components for Diffusion-DPO: frozen VAE and text encoder, the UNet with a trainable LoRA."""

    def __init__(self, pipe, lora: LoraSpec, resolution: int, device: str = "cpu", init: Path | None = None):
        from diffusers import DDPMScheduler

        if not hasattr(pipe, "unet"):
            raise ValueError(f"{type(pipe).__name__} has no UNet; Diffusion-DPO here supports the 'sd' family")
        self.pipe, self.device, self.resolution = pipe, device, resolution
        self.unet, self.vae, self.text_encoder, self.tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        for module in (self.unet, self.vae, self.text_encoder):
            module.requires_grad_(False)
        self.started_from = self.add_lora(lora, init)
        for p in self.trainable():
            p.data = p.data.float()
        self.weight_dtype = self.vae.dtype

    def add_lora(self, lora: LoraSpec, init: Path | None) -> str:
        """A fresh LoRA on the UNet, or the adapter `init` (a diffusion_dpo adapter folder, e.g. the policy's
        champion) made trainable when it exists; the adapter is named "default" either way. Returns where it
        started."""
        from peft import LoraConfig

        from cyclepref.models import load_failed

        if init is None or not Path(init).exists():
            self.unet.add_adapter(LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                             target_modules=lora.target_modules, init_lora_weights="gaussian"))
            return started_from(None)
        try:
            self.pipe.load_lora_weights(str(init), adapter_name="default")
        except Exception as err:
            raise load_failed(str(init), err) from err
        for name, p in self.unet.named_parameters():
            p.requires_grad_("lora_" in name)
        return started_from(init)

    def trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.unet.parameters() if p.requires_grad]

    def trainable_names(self) -> list[str]:
        return [n for n, p in self.unet.named_parameters() if p.requires_grad]

    def _autocast(self):
        if self.device == "cpu" or self.weight_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=torch.device(self.device).type, dtype=self.weight_dtype)

    def pixels(self, images: Sequence) -> torch.Tensor:
        """RGB images -> (B, 3, R, R) in [-1, 1]: shorter side resized to R, centre crop."""
        from torchvision import transforms as T

        tf = T.Compose([T.Resize(self.resolution, interpolation=T.InterpolationMode.BILINEAR),
                        T.CenterCrop(self.resolution), T.ToTensor(), T.Normalize([0.5], [0.5])])
        return torch.stack([tf(im.convert("RGB")) for im in images])

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        tok = self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt")
        return self.text_encoder(tok.input_ids.to(self.device))[0]

    @torch.no_grad()
    def encode_images(self, images: Sequence) -> torch.Tensor:
        """Scaled latents from the VAE posterior's mean: the latents the denoiser was trained on (a posterior sample
        adds noise of the posterior's std to every training target)."""
        x = self.pixels(images).to(self.device, self.weight_dtype)
        return self.vae.encode(x).latent_dist.mean * self.vae.config.scaling_factor

    def predictions(self, examples: Sequence, generator: torch.Generator):
        """(model prediction, reference prediction, target), each (2B, C, h, w): preferred rows, then rejected."""
        latents = self.encode_images([e.chosen for e in examples] + [e.rejected for e in examples])
        b = len(examples)
        noise = torch.randn((b, *latents.shape[1:]), generator=generator).to(latents).repeat(2, 1, 1, 1)
        steps = self.noise_scheduler.config.num_train_timesteps
        t = torch.randint(0, steps, (b,), generator=generator).to(self.device).repeat(2)
        noisy = self.noise_scheduler.add_noise(latents, noise, t)
        kind = self.noise_scheduler.config.prediction_type
        if kind == "epsilon":
            target = noise
        elif kind == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, t)
        else:
            raise ValueError(f"unsupported prediction_type {kind!r}")
        emb = self.encode_prompts([e.prompt for e in examples]).repeat(2, 1, 1)
        with self._autocast():
            model_pred = self.unet(noisy, t, emb).sample
            with torch.no_grad():
                self.unet.disable_adapters()
                try:
                    ref_pred = self.unet(noisy, t, emb).sample
                finally:
                    self.unet.enable_adapters()
        return model_pred, ref_pred, target

    def loss(self, examples: Sequence, beta: float, generator: torch.Generator, sft_weight: float = 0.0,
             dpo_weight: float = 1.0):
        return diffusion_dpo_loss(*self.predictions(examples, generator), beta, sft_weight, dpo_weight)


def weights(cfg: DiffusionDpo, sft_only: bool) -> dict[str, float]:
    """The objective: Diffusion-DPO plus the denoising term on the preferred image, or that term alone (baseline)."""
    return {"dpo_weight": 0.0, "sft_weight": 1.0} if sft_only else {"dpo_weight": 1.0, "sft_weight": cfg.sft_weight}


def evaluate(model: DiffusionDpoModel, examples: Sequence, beta: float, batch_size: int, seed: int) -> dict:
    """Mean Diffusion-DPO loss, implicit accuracy and denoising error of the preferred images over examples, with a
    fixed generator (comparable across calls)."""
    if not len(examples):
        return {}
    gen = torch.Generator().manual_seed(seed)
    totals = {"loss": 0.0, "implicit_accuracy": 0.0, "sft": 0.0}
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            loss, stats = model.loss(chunk, beta, gen)
            for key, value in (("loss", loss), ("implicit_accuracy", stats["implicit_accuracy"]),
                               ("sft", stats["sft"])):
                totals[key] += float(value) * len(chunk)
    return {k: v / len(examples) for k, v in totals.items()}


def train_steps(model: DiffusionDpoModel, examples: Sequence, cfg: DiffusionDpo,
                log_metrics: Callable[[dict, int], None] | None = None, sft_only: bool = False) -> list[dict]:
    """AdamW on the LoRA parameters; each step averages cfg.grad_accum micro-batches of cfg.batch_size pairs."""
    opt = torch.optim.AdamW(model.trainable(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    per_step = cfg.batch_size * cfg.grad_accum
    total = cfg.max_steps or cfg.epochs * math.ceil(len(examples) / per_step)
    model.unet.train()
    history: list[dict] = []
    while len(history) < total:
        order = torch.randperm(len(examples), generator=gen).tolist()
        for start in range(0, len(order), per_step):
            group = order[start : start + per_step]
            opt.zero_grad(set_to_none=True)
            losses, accs = [], []
            for m in range(0, len(group), cfg.batch_size):
                micro = [examples[i] for i in group[m : m + cfg.batch_size]]
                loss, stats = model.loss(micro, cfg.beta, gen, **weights(cfg, sft_only))
                (loss * len(micro) / len(group)).backward()
                losses.append(loss.item() * len(micro))
                accs.append(stats["implicit_accuracy"].item() * len(micro))
            if cfg.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.trainable(), cfg.max_grad_norm)
            opt.step()
            row = {"loss": sum(losses) / len(group), "implicit_accuracy": sum(accs) / len(group)}
            history.append(row)
            if log_metrics is not None:
                log_metrics(row, len(history))
            if len(history) >= total:
                break
    model.unet.eval()
    return history


def train_one(cfg: DiffusionDpo, root: Path, device: str, train, valid, out_dir: Path,
              log_metrics: Callable[[dict, int], None] | None = None, sft_only: bool = False) -> dict:
    """Train one adapter from the base model (or from the adapter cfg.init_adapter, when it exists), validate before
    and after on the valid pairs, save it to out_dir."""
    from cyclepref.models.t2i import TextToImage

    torch.manual_seed(cfg.seed)
    t2i = TextToImage(local_spec(root, cfg.model), device)
    init = root / cfg.init_adapter if cfg.init_adapter else None
    model = DiffusionDpoModel(t2i.pipe, cfg.lora, cfg.resolution or cfg.model.height, device, init)
    before = evaluate(model, valid, cfg.beta, cfg.batch_size, cfg.seed)
    history = train_steps(model, train, cfg, log_metrics, sft_only)
    after = evaluate(model, valid, cfg.beta, cfg.batch_size, cfg.seed)
    objective = weights(cfg, sft_only)
    save_adapter(model.unet, out_dir, cfg.model, {"beta": cfg.beta, "lr": cfg.lr, "steps": len(history), **objective,
                                                  "started_from": model.started_from})
    return {
        "started_from": model.started_from,
        **objective,
        "steps": len(history),
        "train_loss_first": history[0]["loss"],
        "train_loss_last": history[-1]["loss"],
        "trainable_params": sum(p.numel() for p in model.trainable()),
        "valid_before": before,
        "valid_after": after,
    }


def train_diffusion_dpo(cfg: DiffusionDpo, root: Path, device: str, out_dir: Path,
                        log_metrics: Callable[[dict, int], None] | None = None, sft_dir: Path | None = None) -> dict:
    """Diffusion-DPO (+ denoising term) on the selected train pairs into out_dir; with `sft_dir`, the SFT-only
    baseline beside."""
    from cyclepref.downstream.data import policy_pairs

    train, valid = policy_pairs(root, "t2i", cfg.pairs, cfg.model.name, cfg.max_pairs)
    report = {"pairs": cfg.pairs, "train_pairs": len(train), "valid_pairs": len(valid),
              **train_one(cfg, root, device, train, valid, out_dir, log_metrics)}
    if sft_dir is not None:
        report["sft_baseline"] = train_one(cfg, root, device, train, valid, sft_dir, sft_only=True)
    return report


def save_adapter(unet, out_dir: Path, base: T2ISpec, extra: dict) -> Path:
    """diffusers LoRA weights of the UNet (with the adapter config as metadata) and the base model they belong to."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    config = unet.peft_config["default"].to_dict()
    config = {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}
    with atomic_dir(Path(out_dir)) as tmp:
        StableDiffusionPipeline.save_lora_weights(
            str(tmp), unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet)),
            unet_lora_adapter_metadata=config, safe_serialization=True,
        )
        for weights in tmp.glob("*.safetensors"):
            canonical_safetensors(weights)
        meta = {"kind": "diffusion_dpo", "base": base.model_dump(mode="json"), **extra}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return Path(out_dir)


def apply_adapter(t2i, adapter: Path):
    """Load a diffusion_dpo adapter into a TextToImage's pipeline in place."""
    from cyclepref.models import load_failed

    try:
        t2i.pipe.load_lora_weights(str(adapter))
    except Exception as err:
        raise load_failed(str(adapter), err) from err
    return t2i


def load_dpo_t2i(spec: T2ISpec, adapter: Path, device: str = "cpu"):
    """The base text-to-image model with the Diffusion-DPO adapter: generates like any TextToImage."""
    from cyclepref.models.t2i import TextToImage

    return apply_adapter(TextToImage(spec, device), adapter)
