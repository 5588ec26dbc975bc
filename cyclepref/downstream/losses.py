"""Preference losses of the downstream trainers, as small functions of tensors."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """The sigmoid DPO loss that trl's DPOTrainer optimises (loss_type "sigmoid", reverse KL, no label smoothing):
    mean of -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))) over sequence log-probabilities summed over the
    completion tokens. Equal policy and reference give log 2."""
    margin = (policy_chosen_logps - ref_chosen_logps) - (policy_rejected_logps - ref_rejected_logps)
    return -F.logsigmoid(beta * margin).mean()


def diffusion_dpo_loss(
    model_pred: torch.Tensor, ref_pred: torch.Tensor, target: torch.Tensor, beta: float, sft_weight: float = 0.0,
    dpo_weight: float = 1.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Diffusion-DPO (Wallace et al. 2023; PAPER.md §6).

    Inputs are (2B, ...) predictions of the trained and the reference denoiser and their regression target (the
    noise for epsilon-prediction); rows 0..B-1 are the preferred images, rows B..2B-1 the rejected ones, each pair
    noised with the same noise and timestep. Per image d = err(model) - err(ref) with err = squared error averaged
    over the latent's elements (as in the reference implementation, for which beta 2000-5000 is calibrated on SD1.5);
    loss = mean of -log sigmoid(-beta / 2 * (d_preferred - d_rejected)). Equal model and reference give log 2.
    Also returns the implicit accuracy (share of pairs with d_preferred < d_rejected) and the mean of the inner term.
    `sft_weight` adds the plain denoising loss of the preferred images (err(model) of rows 0..B-1), the diffusion
    analogue of DPO's SFT term; `dpo_weight` 0 with `sft_weight` 1 is the SFT-on-preferred baseline.
    """
    if model_pred.shape != ref_pred.shape or model_pred.shape != target.shape or model_pred.shape[0] % 2:
        raise ValueError(f"expected equal (2B, ...) shapes, got {model_pred.shape}, {ref_pred.shape}, {target.shape}")
    dims = tuple(range(1, model_pred.ndim))
    model_err = (model_pred.float() - target.float()).pow(2).mean(dim=dims)
    ref_err = (ref_pred.float() - target.float()).pow(2).mean(dim=dims)
    d_preferred, d_rejected = (model_err - ref_err).chunk(2)
    inside = -0.5 * beta * (d_preferred - d_rejected)
    sft = model_err.chunk(2)[0].mean()
    loss = dpo_weight * -F.logsigmoid(inside).mean() + sft_weight * sft
    stats = {"implicit_accuracy": (inside > 0).float().mean().detach(), "inside": inside.mean().detach(),
             "sft": sft.detach()}
    return loss, stats
