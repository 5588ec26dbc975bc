"""DPO of a LLaVA-family captioner on the I2T pairs with trl's DPOTrainer and a peft LoRA adapter (PAPER.md §6).

A pair becomes one conversational preference example: prompt = the user turn (the input image and the captioner's
instruction, exactly what the captioner sees when it captions), chosen / rejected = an assistant turn with the
preferred / rejected caption. trl renders both through the processor's chat template, and, because the model is a
PeftModel without a separate reference, computes the reference log-probabilities with the adapter disabled.

Truncation pitfall: trl truncates prompt + completion to max_length *after* the processor has expanded the image
placeholder into one token per image feature (576 for LLaVA-1.5). A max_length below that prompt length cuts image
tokens, and the model then fails (or silently misaligns features). We train with max_length None and reject a
budget that would cut the prompt.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from cyclepref.config import CaptionerSpec, DpoVlm, LoraSpec
from cyclepref.downstream import META_FILE, started_from
from cyclepref.models import local_spec
from cyclepref.store import atomic_dir


def lora_config(spec: LoraSpec, **kw):
    from peft import LoraConfig

    return LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout,
                      target_modules=spec.target_modules, **kw)


def preference_row(example, instruction: str) -> dict:
    """An I2T PairExample as a trl conversational vision preference row (images, prompt, chosen, rejected)."""
    user = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]

    def turn(text: str) -> list[dict]:
        return [{"role": "assistant", "content": [{"type": "text", "text": text}]}]

    return {"images": [example.image], "prompt": user, "chosen": turn(example.chosen),
            "rejected": turn(example.rejected)}


def preference_dataset(examples: Sequence, instruction: str):
    """A datasets.Dataset of preference rows that decodes each pair when it is read (memory stays flat)."""
    from datasets import Dataset

    def rows(batch: dict) -> dict:
        out = [preference_row(examples[i], instruction) for i in batch["index"]]
        return {k: [r[k] for r in out] for k in ("images", "prompt", "chosen", "rejected")}

    return Dataset.from_dict({"index": list(range(len(examples)))}).with_transform(rows)


def prompt_length(processor, row: dict) -> int:
    """Tokens of the rendered prompt with the image placeholders expanded (what trl's max_length counts)."""
    text = processor.apply_chat_template(row["prompt"], add_generation_prompt=True)
    return int(processor(images=row["images"], text=[text], return_tensors="pt")["input_ids"].shape[1])


def check_max_length(processor, row: dict, max_length: int | None) -> None:
    if max_length is None:
        return
    n = prompt_length(processor, row)
    if max_length <= n:
        raise ValueError(
            f"dpo_vlm.max_length = {max_length} would truncate the prompt ({n} tokens including the image tokens) "
            "and cut image tokens; use max_length: null"
        )


def objective(cfg: DpoVlm, sft_only: bool = False) -> tuple[list[str], list[float]]:
    """trl loss types and weights: sigmoid DPO plus the SFT term on the chosen caption (weight cfg.sft_weight), or
    the SFT term alone (the SFT-on-chosen baseline)."""
    if sft_only:
        return ["sft"], [1.0]
    if cfg.sft_weight == 0:
        return ["sigmoid"], [1.0]
    return ["sigmoid", "sft"], [1.0, cfg.sft_weight]


def make_trainer(captioner, train, valid, cfg: DpoVlm, device: str, output_dir: Path,
                 log_metrics: Callable[[dict, int], None] | None = None, sft_only: bool = False):
    """A DPOTrainer on the captioner's model (LoRA applied by trl from cfg.lora); train / valid: preference
    datasets (preference_dataset), valid may be None; `sft_only`: the SFT-on-chosen baseline."""
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import DPOConfig, DPOTrainer

    on_accel = device != "cpu"
    dtype = captioner.spec.dtype
    loss_type, loss_weights = objective(cfg, sft_only)
    args = DPOConfig(
        output_dir=str(output_dir),
        beta=cfg.beta,
        loss_type=loss_type,
        loss_weights=loss_weights,
        learning_rate=cfg.lr,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps or -1,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,
        weight_decay=cfg.weight_decay,
        max_length=cfg.max_length,
        gradient_checkpointing=cfg.gradient_checkpointing,
        bf16=on_accel and dtype == "bfloat16",
        fp16=on_accel and dtype == "float16",
        use_cpu=not on_accel,
        seed=cfg.seed,
        data_seed=cfg.seed,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to=[],
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=True,
    )
    callbacks = []
    if log_metrics is not None:

        class _Log(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kw):
                values = {k.replace("/", "_"): float(v) for k, v in (logs or {}).items() if isinstance(v, int | float)}
                log_metrics(values, state.global_step)

        callbacks.append(_Log())
    trainer = DPOTrainer(
        model=captioner.model,
        args=args,
        train_dataset=train,
        eval_dataset=valid,
        processing_class=captioner.processor,
        peft_config=None if is_peft(captioner.model) else lora_config(cfg.lora),
        callbacks=callbacks,
    )
    trainer.remove_callback(PrinterCallback)
    return trainer


def is_peft(model) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def start_from(captioner, init: Path | None):
    """Continue training the adapter `init` (loaded trainable; trl copies it as the frozen reference adapter 'ref')
    when it exists; else leave the base model, to which the trainer adds a fresh LoRA (reference: the adapter
    disabled). Returns what it started from."""
    from peft import PeftModel

    from cyclepref.models import load_failed

    if init is None or not Path(init).exists():
        return started_from(None)
    try:
        captioner.model = PeftModel.from_pretrained(captioner.model, str(init), is_trainable=True)
    except Exception as err:
        raise load_failed(str(init), err) from err
    return started_from(init)


EVAL_KEYS = ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins", "eval_rewards/chosen",
             "eval_rewards/rejected")


def _eval(trainer) -> dict[str, float]:
    out = trainer.evaluate()
    return {k.removeprefix("eval_").replace("/", "_"): float(out[k]) for k in EVAL_KEYS if k in out}


def train_one(cfg: DpoVlm, root: Path, device: str, train, valid, out_dir: Path, work_dir: Path,
              log_metrics: Callable[[dict, int], None] | None = None, sft_only: bool = False) -> dict:
    """Train one adapter from the base captioner (or from the adapter cfg.init_adapter, when it exists), validate
    before and after on the valid pairs, save it to out_dir."""
    from cyclepref.models.captioner import Captioner

    torch.manual_seed(cfg.seed)
    captioner = Captioner(local_spec(root, cfg.captioner), device)
    started = start_from(captioner, root / cfg.init_adapter if cfg.init_adapter else None)
    check_max_length(captioner.processor, preference_row(train[0], captioner.prompt), cfg.max_length)
    trainer = make_trainer(captioner, preference_dataset(train, captioner.prompt),
                           preference_dataset(valid, captioner.prompt) if len(valid) else None, cfg, device,
                           work_dir, log_metrics, sft_only)
    before = _eval(trainer) if len(valid) else {}
    result = trainer.train()
    after = _eval(trainer) if len(valid) else {}
    loss_type, loss_weights = objective(cfg, sft_only)
    save_adapter(trainer.model, out_dir, cfg.captioner,
                 {"beta": cfg.beta, "lr": cfg.lr, "steps": result.global_step, "loss_type": loss_type,
                  "loss_weights": loss_weights, "started_from": started})
    return {
        "started_from": started,
        "loss_type": loss_type,
        "loss_weights": loss_weights,
        "steps": int(result.global_step),
        "train_loss": float(result.training_loss),
        "trainable_params": int(sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)),
        "valid_before": before,
        "valid_after": after,
    }


def train_dpo_vlm(cfg: DpoVlm, root: Path, device: str, out_dir: Path, work_dir: Path,
                  log_metrics: Callable[[dict, int], None] | None = None, sft_dir: Path | None = None) -> dict:
    """DPO (+ SFT term) on the selected train pairs into out_dir; with `sft_dir`, the SFT-only baseline beside."""
    from cyclepref.downstream.data import policy_pairs

    train, valid = policy_pairs(root, "i2t", cfg.pairs, cfg.captioner.name, cfg.max_pairs)
    report = {"pairs": cfg.pairs, "train_pairs": len(train), "valid_pairs": len(valid),
              **train_one(cfg, root, device, train, valid, out_dir, work_dir, log_metrics)}
    if sft_dir is not None:
        report["sft_baseline"] = train_one(cfg, root, device, train, valid, sft_dir, work_dir / "sft", sft_only=True)
    return report


def save_adapter(peft_model, out_dir: Path, base: CaptionerSpec, extra: dict) -> Path:
    """The peft adapter (adapter_config.json + adapter_model.safetensors) and the base model it belongs to."""
    with atomic_dir(Path(out_dir)) as tmp:
        peft_model.save_pretrained(str(tmp), selected_adapters=["default"])  # not trl's frozen "ref" copy
        meta = {"kind": "dpo_vlm", "base": base.model_dump(mode="json"), **extra}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return Path(out_dir)


def apply_adapter(captioner, adapter: Path, merge: bool = True):
    """Load a dpo_vlm adapter into a Captioner's model in place (merged into the weights by default)."""
    from peft import PeftModel

    from cyclepref.models import load_failed

    try:
        model = PeftModel.from_pretrained(captioner.model, str(adapter))
    except Exception as err:
        raise load_failed(str(adapter), err) from err
    captioner.model = (model.merge_and_unload() if merge else model).eval()
    return captioner


def load_dpo_captioner(spec: CaptionerSpec, adapter: Path, device: str = "cpu"):
    """The base captioner with the DPO adapter: generates like any Captioner."""
    from cyclepref.models.captioner import Captioner

    return apply_adapter(Captioner(spec, device), adapter)
