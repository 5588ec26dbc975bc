"""The one optimiser loop of the world models' trainers (captioner, CLIP, text-to-image VAE and UNet, BLIP).

Each trainer gives a function that draws its batch and returns the step's loss; the loop does the rest the same way
for all of them: AdamW, linear warm-up, optional gradient clipping, a loss average logged every 50 steps, and a hook
after each step (a ladder saves its checkpoints there, the CLIP clamps its temperature).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

LOG_EVERY = 50


def optimise(params: Sequence[torch.nn.Parameter], steps: int, lr: float, step_loss: Callable[[int], torch.Tensor],
             name: str, log: Callable[[str], None] = print, *, weight_decay: float = 0.0, warmup: int | None = 50,
             max_grad_norm: float | None = None,
             after_step: Callable[[int], None] | None = None) -> list[float]:
    """Run `steps` optimiser steps (1-based) on `params`; returns the loss of every step."""
    params = list(params)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup)) if warmup else None
    losses: list[float] = []
    for step in range(1, steps + 1):
        loss = step_loss(step)
        opt.zero_grad()
        loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
        if sched is not None:
            sched.step()
        losses.append(loss.item())
        if step % LOG_EVERY == 0:
            log(f"{name} step {step}: loss {sum(losses[-LOG_EVERY:]) / LOG_EVERY:.5f}")
        if after_step is not None:
            after_step(step)
    return losses
