"""The one optimiser loop of the world models' trainers (captioner, CLIP, text-to-image VAE and UNet, BLIP).

Each trainer gives a function that draws its batch and returns the step's loss; the loop does the rest the same way
for all of them: AdamW, linear warm-up, optional gradient clipping, a loss average logged every 50 steps, and a hook
after each step (a ladder saves its checkpoints there, the CLIP clamps its temperature).

A long run is resumable: with `resume` (a file) and the `rng` its batches are drawn from, the loop saves its whole
state there every `resume_every` steps (parameters, optimiser, warm-up, generator, losses) and, started again,
continues from it; the weights it ends with are the ones an uninterrupted run gives. The caller keys the file by
everything that decides the run (cyclepref.world.train_t2i) and deletes it when its outputs are saved.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

LOG_EVERY = 50


def _save_state(path: Path, step: int, params, opt, sched, rng, losses) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"step": step, "params": [p.detach().clone() for p in params], "opt": opt.state_dict(),
                "sched": sched.state_dict() if sched is not None else None, "rng": rng.get_state(),
                "losses": losses}, tmp)
    os.replace(tmp, path)


def _load_state(path: Path, params, opt, sched, rng, log) -> tuple[int, list[float]]:
    state = torch.load(path, weights_only=True)
    with torch.no_grad():
        for p, saved in zip(params, state["params"], strict=True):
            p.copy_(saved)
    opt.load_state_dict(state["opt"])
    if sched is not None:
        sched.load_state_dict(state["sched"])
    rng.set_state(state["rng"])
    log(f"resumed from {path} at step {state['step']}")
    return state["step"], list(state["losses"])


def optimise(params: Sequence[torch.nn.Parameter], steps: int, lr: float, step_loss: Callable[[int], torch.Tensor],
             name: str, log: Callable[[str], None] = print, *, weight_decay: float = 0.0, warmup: int | None = 50,
             max_grad_norm: float | None = None, after_step: Callable[[int], None] | None = None,
             resume: Path | None = None, rng: torch.Generator | None = None, resume_every: int = 250) -> list[float]:
    """Run `steps` optimiser steps (1-based) on `params`; returns the loss of every step."""
    params = list(params)
    if resume is not None and rng is None:
        raise ValueError("a resumable run needs the generator its batches are drawn from (rng)")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup)) if warmup else None
    done, losses = 0, []
    if resume is not None and resume.exists():
        done, losses = _load_state(resume, params, opt, sched, rng, log)
    for step in range(done + 1, steps + 1):
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
        if resume is not None and step % resume_every == 0 and step < steps:
            _save_state(resume, step, params, opt, sched, rng, losses)
    return losses
