"""DPO and Diffusion-DPO losses: hand-computed values, log 2 at identity, agreement with trl's DPOTrainer, and one
optimisation step that changes only the LoRA parameters."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from cyclepref.config import DiffusionDpo, DpoVlm, LoraSpec
from cyclepref.downstream.losses import diffusion_dpo_loss, dpo_loss
from cyclepref.reward.data import PairExample

LOG2 = math.log(2)
LLM_LORA = {"r": 4, "alpha": 8, "target_modules": r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj)"}
UNET_LORA = {"r": 4, "alpha": 4, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]}


def image(seed: int, size: int = 32) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8))


# ---------------------------------------------------------------- DPO (trl's sigmoid loss)


def test_dpo_loss_equals_hand_computed_values():
    loss = dpo_loss(
        torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0]), torch.tensor([-1.5, -2.0]), torch.tensor([-2.0, -1.5]),
        beta=0.5,
    )
    # pair 1: 0.5 * ((-1 + 1.5) - (-3 + 2)) = 0.75; pair 2: 0.5 * ((-2 + 2) - (-1 + 1.5)) = -0.25
    expected = (math.log(1 + math.exp(-0.75)) + math.log(1 + math.exp(0.25))) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert loss.item() == pytest.approx(0.6064052130, abs=1e-6)


def test_dpo_loss_is_log2_when_policy_equals_reference():
    logps = torch.randn(5) * 10
    other = torch.randn(5) * 10
    assert dpo_loss(logps, other, logps, other, beta=0.3).item() == pytest.approx(LOG2, abs=1e-6)


# ---------------------------------------------------------------- Diffusion-DPO


def test_diffusion_dpo_loss_equals_hand_computed_values():
    # rows: preferred of pair 1, preferred of pair 2, rejected of pair 1, rejected of pair 2; shape (4, 1, 1, 2)
    model = torch.tensor([[1.0, 1.0], [1.0, 1.0], [2.0, 0.0], [0.0, 0.0]]).view(4, 1, 1, 2)
    ref = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [1.0, 1.0]]).view(4, 1, 1, 2)
    target = torch.zeros(4, 1, 1, 2)
    loss, stats = diffusion_dpo_loss(model, ref, target, beta=1.0)
    # errors are means over elements: model (1, 1, 2, 0), ref (0, 0, 0, 1); d = (1, 1, 2, -1)
    # pair 1: -1/2 * (1 - 2) = 0.5; pair 2: -1/2 * (1 - (-1)) = -1
    expected = (math.log(1 + math.exp(-0.5)) + math.log(1 + math.exp(1.0))) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert loss.item() == pytest.approx(0.8936693358, abs=1e-6)
    assert stats["implicit_accuracy"].item() == 0.5


def test_diffusion_dpo_loss_is_log2_when_model_equals_reference():
    pred, target = torch.randn(6, 4, 8, 8), torch.randn(6, 4, 8, 8)
    loss, stats = diffusion_dpo_loss(pred, pred.clone(), target, beta=5000.0)
    assert loss.item() == pytest.approx(LOG2, abs=1e-6)
    assert stats["implicit_accuracy"].item() == 0.0


def test_diffusion_dpo_sft_term_is_the_denoising_error_of_the_preferred_images():
    model, ref, target = torch.randn(4, 2, 3, 3), torch.randn(4, 2, 3, 3), torch.randn(4, 2, 3, 3)
    dpo, _ = diffusion_dpo_loss(model, ref, target, beta=10.0)
    mix, stats = diffusion_dpo_loss(model, ref, target, beta=10.0, sft_weight=0.5)
    preferred_err = (model[:2] - target[:2]).pow(2).mean()
    assert stats["sft"].item() == pytest.approx(preferred_err.item(), rel=1e-6)
    assert mix.item() == pytest.approx(dpo.item() + 0.5 * preferred_err.item(), rel=1e-6)
    sft_only, _ = diffusion_dpo_loss(model, ref, target, beta=10.0, sft_weight=1.0, dpo_weight=0.0)
    assert sft_only.item() == pytest.approx(preferred_err.item(), rel=1e-6)
    rejected_changed = model.clone()
    rejected_changed[2:] += 1.0
    assert diffusion_dpo_loss(rejected_changed, ref, target, 10.0, 1.0, 0.0)[0].item() == pytest.approx(
        sft_only.item(), rel=1e-6)


def test_diffusion_dpo_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        diffusion_dpo_loss(torch.zeros(3, 1), torch.zeros(3, 1), torch.zeros(3, 1), beta=1.0)


# ---------------------------------------------------------------- trl DPOTrainer on the tiny LLaVA


def _dpo_trainer(zoo, tmp_path, lr: float = 5e-2, sft_weight: float = 0.0):
    from cyclepref.config import CaptionerSpec
    from cyclepref.downstream.dpo_vlm import make_trainer, preference_dataset, preference_row
    from cyclepref.models.captioner import Captioner

    spec = CaptionerSpec(name="tiny-llava", path=str(zoo / "tiny-llava"), family="llava", max_new_tokens=8)
    captioner = Captioner(spec)
    examples = [
        PairExample(f"p{k}", "i2t", f"g{k}", image(k), None, "a red photo of the image", "blue green white")
        for k in range(2)
    ]
    rows = [preference_row(e, captioner.prompt) for e in examples]
    cfg = DpoVlm(captioner=spec, lora=LoraSpec(**LLM_LORA), beta=0.5, lr=lr, max_steps=1, batch_size=2,
                 lr_scheduler="constant", sft_weight=sft_weight)
    trainer = make_trainer(captioner, preference_dataset(examples, captioner.prompt), None, cfg, "cpu",
                           tmp_path / "trainer")
    return trainer, rows


def _completion_logps(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of log p(token) over the completion tokens, for the chosen half and the rejected half of a trl batch."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   pixel_values=batch["pixel_values"]).logits
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    tokens = logp.gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    summed = (tokens * batch["completion_mask"][:, 1:]).sum(-1)
    return summed.chunk(2)


def test_trl_dpo_loss_matches_ours_and_one_step_changes_only_lora(zoo, tmp_path):
    trainer, rows = _dpo_trainer(zoo, tmp_path)
    model = trainer.model
    batch = trainer.data_collator([dict(r) for r in rows])
    with torch.no_grad():
        assert trainer.compute_loss(model, batch).item() == pytest.approx(LOG2, abs=1e-6)

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    lora = {n for n in before if "lora_" in n}
    assert changed, "one optimisation step changed nothing"
    assert changed <= lora, f"non-LoRA parameters changed: {sorted(changed - lora)[:5]}"
    assert {n for n in lora if "lora_B" in n} <= changed

    model.eval()
    with torch.no_grad():
        trl_loss = trainer.compute_loss(model, batch).item()
        chosen, rejected = _completion_logps(model, batch)
        with model.disable_adapter():
            ref_chosen, ref_rejected = _completion_logps(model, batch)
    ours = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.5).item()
    assert trl_loss != pytest.approx(LOG2, abs=1e-4)
    assert trl_loss == pytest.approx(ours, abs=1e-5)


def test_dpo_with_sft_term_adds_the_chosen_captions_mean_token_nll(zoo, tmp_path):
    trainer, rows = _dpo_trainer(zoo, tmp_path, sft_weight=0.7)
    assert list(trainer.args.loss_type) == ["sigmoid", "sft"] and list(trainer.args.loss_weights) == [1.0, 0.7]
    model = trainer.model
    batch = trainer.data_collator([dict(r) for r in rows])
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       pixel_values=batch["pixel_values"]).logits
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
        mask = batch["completion_mask"][:, 1:].bool()
        chosen_nll = -logp.chunk(2)[0][mask.chunk(2)[0]].mean().item()
        assert trainer.compute_loss(model, batch).item() == pytest.approx(LOG2 + 0.7 * chosen_nll, abs=1e-5)


def test_dpo_objective_and_the_sft_baseline():
    from cyclepref.config import CaptionerSpec
    from cyclepref.downstream.dpo_vlm import objective

    spec = CaptionerSpec(name="c", path="c", family="llava")
    cfg = DpoVlm(captioner=spec, lora=LoraSpec(**LLM_LORA), lr=1e-4)
    assert objective(cfg) == (["sigmoid", "sft"], [1.0, 1.0])
    assert objective(cfg.model_copy(update={"sft_weight": 0.0})) == (["sigmoid"], [1.0])
    assert objective(cfg, sft_only=True) == (["sft"], [1.0])


def test_dpo_vlm_rejects_a_max_length_that_cuts_image_tokens(zoo, tmp_path):
    from cyclepref.downstream.dpo_vlm import check_max_length, prompt_length

    trainer, rows = _dpo_trainer(zoo, tmp_path)
    n = prompt_length(trainer.processing_class, rows[0])
    assert n > 16  # the tiny LLaVA expands <image> into 16 patch tokens
    check_max_length(trainer.processing_class, rows[0], None)
    check_max_length(trainer.processing_class, rows[0], n + 8)
    with pytest.raises(ValueError, match="image tokens"):
        check_max_length(trainer.processing_class, rows[0], n - 1)


# ---------------------------------------------------------------- Diffusion-DPO on the tiny SD


def test_diffusion_dpo_step_changes_only_lora_and_reference_stays_base(zoo, tmp_path):
    from diffusers import StableDiffusionPipeline

    from cyclepref.config import T2ISpec
    from cyclepref.downstream.diffusion_dpo import DiffusionDpoModel, save_adapter, train_steps

    spec = T2ISpec(name="tiny-sd", path=str(zoo / "tiny-sd"), family="sd", steps=2, guidance=7.5, height=32,
                   width=32)
    cfg = DiffusionDpo(model=spec, lora=LoraSpec(**UNET_LORA), beta=2500.0, lr=1e-2, max_steps=1, batch_size=2)
    pipe = StableDiffusionPipeline.from_pretrained(str(zoo / "tiny-sd"))
    base_unet = StableDiffusionPipeline.from_pretrained(str(zoo / "tiny-sd")).unet.eval()
    model = DiffusionDpoModel(pipe, cfg.lora, 32)
    examples = [PairExample(f"p{k}", "t2i", f"g{k}", None, f"a photo of thing {k}", image(10 + k), image(20 + k))
                for k in range(2)]
    with torch.no_grad():
        loss, _ = model.loss(examples, cfg.beta, torch.Generator().manual_seed(0))
        mean = model.vae.encode(model.pixels([examples[0].chosen])).latent_dist.mean
        assert torch.equal(model.encode_images([examples[0].chosen]), mean * model.vae.config.scaling_factor)
        assert torch.equal(model.encode_images([examples[0].chosen]), model.encode_images([examples[0].chosen]))
    assert loss.item() == pytest.approx(LOG2, abs=1e-6)

    modules = {"unet": model.unet, "vae": model.vae, "text_encoder": model.text_encoder}
    before = {f"{m}.{n}": p.detach().clone() for m, mod in modules.items() for n, p in mod.named_parameters()}
    history = train_steps(model, examples, cfg)
    assert len(history) == 1
    after = {f"{m}.{n}": p.detach() for m, mod in modules.items() for n, p in mod.named_parameters()}
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    lora = {n for n in before if "lora_" in n}
    assert changed and changed <= lora, f"non-LoRA parameters changed: {sorted(changed - lora)[:5]}"
    assert {n for n in lora if "lora_B" in n} <= changed

    x, t, emb = torch.randn(1, 4, 16, 16), torch.tensor([500]), torch.randn(1, 77, 32)
    with torch.no_grad():
        trained = model.unet(x, t, emb).sample
        model.unet.disable_adapters()
        reference = model.unet(x, t, emb).sample
        model.unet.enable_adapters()
        base = base_unet(x, t, emb).sample
    assert torch.allclose(reference, base, atol=1e-6)
    assert (trained - base).abs().max() > 1e-6

    from cyclepref.downstream.diffusion_dpo import load_dpo_t2i

    save_adapter(model.unet, tmp_path / "adapter", spec, {})
    reloaded = load_dpo_t2i(spec, tmp_path / "adapter")
    with torch.no_grad():
        again = reloaded.pipe.unet(x, t, emb).sample
    assert torch.allclose(again, trained, atol=1e-5)
    assert len(reloaded.generate(["a photo of thing 0"], [3])) == 1
