"""Sandbox text-to-image models: a Stable-Diffusion-family pipeline trained from scratch on world scenes.

An AutoencoderKL (32 px -> 16x16x4 latents) is trained first; then a UNet2DConditionModel (v-prediction, cosine
schedule) and its CLIPTextModel are trained together on captions and paraphrases, with 10% empty prompts for
classifier-free guidance. Checkpoints of that run at increasing steps form the ladder of text-to-image models.
Everything is saved as a diffusers StableDiffusionPipeline, the class the paper profile's SD1.5 loads with.

The run is resumable (`resume`, a directory the caller keys by everything that decides the weights): the loop's
state is saved there every few hundred steps and the rungs already reached are kept there until the run ends, so a
killed run started again continues where it stopped and saves the weights an uninterrupted run would.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cyclepref.models import tokenizers as tk
from cyclepref.world.data import training_examples, zero_unused_rows
from cyclepref.world.optimise import optimise
from cyclepref.world.scene import IMAGE_SIZE

PROMPT_DROPOUT = 0.1


def build(seed: int):
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    vae = AutoencoderKL(block_out_channels=[32, 64], in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        layers_per_block=1, norm_num_groups=32, sample_size=IMAGE_SIZE,
                        mid_block_add_attention=False)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, hidden_size=64, intermediate_size=128,
        num_attention_heads=4, num_hidden_layers=2, vocab_size=49408, max_position_embeddings=77))
    unet = UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 2, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64, 64), norm_num_groups=32, cross_attention_dim=64, attention_head_dim=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                              prediction_type="v_prediction", clip_sample=False, set_alpha_to_one=False,
                              steps_offset=1, timestep_spacing="trailing")
    return vae, text_encoder, unet, scheduler


def _pixels(images) -> torch.Tensor:
    x = torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1


def train_vae(vae, pixels: torch.Tensor, steps: int, batch_size: int, lr: float, gen, log) -> list[float]:
    vae.train()

    def step_loss(step: int) -> torch.Tensor:
        x = pixels[torch.randint(0, len(pixels), (batch_size,), generator=gen)]
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
        return F.mse_loss(vae.decode(z).sample, x) + 1e-6 * posterior.kl().mean()

    losses = optimise(vae.parameters(), steps, lr, step_loss, "vae", log, warmup=None)
    vae.eval()
    with torch.no_grad():
        std = torch.cat([vae.encode(pixels[i : i + 256]).latent_dist.mean for i in range(0, 1024, 256)]).std()
    vae.register_to_config(scaling_factor=float(1.0 / std))
    return losses


def save_pipeline(out: Path, vae, text_encoder, unet, scheduler, tokenizer) -> None:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.to(torch.float16).save_pretrained(out, safe_serialization=True)
    pipe.to(torch.float32)


def train(out: Path, vae_steps: int, steps: list[int], seed: int, n_scenes: int, batch_size: int, lr: float,
          vae_lr: float, log=print, resume: Path | None = None) -> dict[str, list[float]]:
    """Train the VAE, then UNet + text encoder; save a pipeline at each step of `steps` to out/step-<k>."""
    rungs = out if resume is None else resume
    examples = list(training_examples(n_scenes, seed))
    vae, text_encoder, unet, scheduler = build(seed)
    tokenizer = tk.build_clip_tokenizer()
    gen = torch.Generator().manual_seed(seed)
    pixels = _pixels([e[0] for e in examples])
    vae_losses = train_vae(vae, pixels, vae_steps, batch_size, vae_lr, gen, log)
    vae.requires_grad_(False)
    with torch.no_grad():
        latents = torch.cat([vae.encode(pixels[i : i + 256]).latent_dist.mean for i in range(0, len(pixels), 256)])
    latents = latents * vae.config.scaling_factor
    ids = [tokenizer([e[k] for e in examples], padding="max_length", max_length=77, truncation=True,
                     return_tensors="pt").input_ids for k in (1, 2)]
    empty = tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    unet.train()
    text_encoder.train()

    def step_loss(step: int) -> torch.Tensor:
        idx = torch.randint(0, len(examples), (batch_size,), generator=gen)
        which = torch.randint(0, 2, (batch_size,), generator=gen)
        tokens = torch.where(which[:, None] == 0, ids[0][idx], ids[1][idx])
        drop = torch.rand(batch_size, generator=gen) < PROMPT_DROPOUT
        tokens = torch.where(drop[:, None], empty, tokens)
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch_size,), generator=gen)
        pred = unet(scheduler.add_noise(x0, noise, t), t, encoder_hidden_states=text_encoder(tokens)[0]).sample
        return F.mse_loss(pred, scheduler.get_velocity(x0, noise, t))

    def save(step: int) -> None:
        if step in steps:
            zero_unused_rows(text_encoder.get_input_embeddings(), [*ids[0].flatten().tolist(),
                                                                  *ids[1].flatten().tolist(),
                                                                  *empty.flatten().tolist()])
            unet.eval()
            text_encoder.eval()
            save_pipeline(rungs / f"step-{step}", vae, text_encoder, unet, scheduler, tokenizer)
            unet.train()
            text_encoder.train()

    losses = optimise([*unet.parameters(), *text_encoder.parameters()], max(steps), lr, step_loss, "t2i", log,
                      warmup=100, max_grad_norm=1.0, after_step=save,
                      resume=None if resume is None else resume / "state.pt", rng=gen)
    if resume is not None:
        for step in steps:
            shutil.move(resume / f"step-{step}", out / f"step-{step}")
    return {"vae": vae_losses, "t2i": losses}
