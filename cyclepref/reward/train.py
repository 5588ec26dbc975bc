"""Bradley-Terry training of the reward model (PAPER.md §4), with accelerate for one or many devices.

Data order is an explicit plan, not a sampler: for epoch e each task's pairs are permuted with a seed derived from
(seed, e, task, cycle); in Combo the shorter task is cycled to the longer one's length. The order is padded to a
multiple of the number of processes W and process r takes every W-th pair, then cuts its share into micro-batches of
`batch_size / W` (`batch_size` is the global micro-batch), so micro-batch m of all processes together holds the same
pairs as micro-batch m of one process, and the trained model does not depend on W (up to floating-point reduction
order; a pair count that is not a multiple of W repeats up to W-1 pairs in the last micro-batch). `grad_accum`
micro-batches make one optimizer step. Dropout draws from the torch generator seeded by (seed, rank). Because the
plan is a pure function of (seed, epoch, world size), resuming at micro-batch m reads exactly the batches an
uninterrupted run reads, and no DistributedSampler (or its clash with shuffle=True) is involved.

Validation runs `validations_per_epoch` times per epoch on all valid pairs of the variant's tasks (Combo: the
combined loss, both tasks). The best model by validation loss is kept; training stops early after `patience`
validations without an improvement larger than `min_delta`. Resume checkpoints (model, optimizer, scheduler, RNG,
loop state and a hard-linked copy of the best model) are written at every validation or every `checkpoint_every`
steps; a run resumes from the newest one whose fingerprint (config, data digest, world size) matches.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from cyclepref.reward import VARIANT_TASKS
from cyclepref.reward.data import MicroBatches, PairBatch, PairCollator, PairSet, PairSource
from cyclepref.reward.model import Regularisation, RewardModel
from cyclepref.store import atomic_dir

log = logging.getLogger("cyclepref.reward")

MetricsLogger = Callable[[dict[str, float], int], None]


# ---------------------------------------------------------------- loss


def bradley_terry(rewards: torch.Tensor, batch: PairBatch) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per task: (mean -log sigmoid(r_chosen - r_rejected), accuracy = share with r_chosen > r_rejected)."""
    out = {}
    for task, idx in batch.chosen.items():
        margin = rewards[idx] - rewards[batch.rejected[task]]
        out[task] = (-F.logsigmoid(margin).mean(), (margin > 0).float().mean())
    return out


def combine(losses: dict[str, torch.Tensor], combo_ratio: float) -> torch.Tensor:
    """I2T, T2I: the task's loss. Combo: loss_i2t * ratio + loss_t2i."""
    if set(losses) == {"i2t", "t2i"}:
        return losses["i2t"] * combo_ratio + losses["t2i"]
    (loss,) = losses.values()
    return loss


def regularisation(model_cfg) -> Regularisation:
    """The dropout / drop-path settings of a RewardBackbone params section."""
    return Regularisation(
        text_dropout=model_cfg.text_dropout,
        text_attention_dropout=model_cfg.text_attention_dropout,
        vision_attention_dropout=model_cfg.vision_attention_dropout,
        drop_path_rate=model_cfg.drop_path_rate,
    )


# ---------------------------------------------------------------- data plan


def _derived_seed(*parts: object) -> int:
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little") & (2**63 - 1)


def epoch_order(n: int, length: int, seed: int, epoch: int, task: str) -> list[int]:
    """Indices 0..n-1 in this epoch's order, cycled (a new permutation per cycle) to `length`."""
    if n == 0:
        raise ValueError(f"no {task} training pairs")
    order: list[int] = []
    cycle = 0
    while len(order) < length:
        g = torch.Generator().manual_seed(_derived_seed(seed, epoch, task, cycle))
        order += torch.randperm(n, generator=g).tolist()
        cycle += 1
    return order[:length]


def shard(order: list[int], world: int, rank: int, batch_size: int) -> list[list[int]]:
    """This process's micro-batches: the order padded (wrapping) to a multiple of `world`, every world-th item."""
    padded = order + [order[i % len(order)] for i in range((-len(order)) % world)]
    mine = padded[rank::world]
    return [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]


def device_batch(batch_size: int, world: int) -> int:
    """Pairs per process per micro-batch: the global micro-batch split evenly over the processes."""
    if batch_size % world:
        raise ValueError(
            f"train_reward.batch_size {batch_size} (pairs per micro-batch over all processes) is not divisible by "
            f"the {world} training processes (CYCLEPREF_TRAIN_PROCESSES); choose a multiple of {world}"
        )
    return batch_size // world


@dataclass(frozen=True)
class Schedule:
    """Sizes of one epoch: L pairs per task, M micro-batches per process, S optimizer steps."""

    length: int
    micro_batches: int
    steps: int
    validate_after: tuple[int, ...]

    @classmethod
    def of(cls, sizes: dict[str, int], world: int, batch_size: int, grad_accum: int, validations: int) -> Schedule:
        length = max(sizes.values())
        micro = math.ceil(math.ceil(length / world) / batch_size)
        steps = math.ceil(micro / grad_accum)
        after = tuple(sorted({max(1, round(j * steps / validations)) for j in range(1, validations + 1)}))
        return cls(length, micro, steps, after)


# ---------------------------------------------------------------- state and checkpoints


@dataclass
class TrainState:
    """Loop position and early-stopping state; `micro` = next micro-batch of `epoch` (always a step boundary)."""

    fingerprint: str
    epoch: int = 0
    micro: int = 0
    step: int = 0
    best_loss: float | None = None
    best_step: int | None = None
    bad_validations: int = 0
    stopped_early: bool = False
    history: list[dict] = field(default_factory=list)


@dataclass
class TrainResult:
    variant: str
    model: RewardModel
    best_dir: Path
    best_loss: float
    best_step: int
    steps: int
    stopped_early: bool
    resumed_from: str | None
    history: list[dict]
    data_digest: str
    fingerprint: str


def fingerprint_body(variant: str, cfg) -> dict:
    """The TrainReward settings that shape one variant's training (checkpointing settings excluded), and the
    backbone's weights (a content hash of a local directory, or hub id and revision)."""
    from cyclepref.models import fingerprint as model_fingerprint

    body = cfg.model_dump(mode="json")
    if body["model"].get("head_init") == "random":
        # the setting came later; at its old behaviour it leaves fingerprints and saved metadata as they were
        del body["model"]["head_init"]
    body["backbone_weights"] = model_fingerprint(cfg.model.path, cfg.model.revision)
    body["variants"] = [variant]
    body["lr"] = {variant: cfg.lr[variant]}
    body["weight_decay"] = {variant: cfg.weight_decay[variant]}
    for volatile in ("checkpoint_every", "keep_checkpoints"):
        body.pop(volatile, None)
    return body


def fingerprint(variant: str, cfg, data_digest: str, world: int) -> str:
    """What a resume checkpoint must match: the variant's training config, the data and the world size."""
    blob = json.dumps({"config": fingerprint_body(variant, cfg), "data": data_digest, "world": world}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _link_tree(src: Path, dst: Path) -> None:
    """Copy a directory by hard links (no extra disk; a later atomic rewrite of src leaves dst intact)."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        try:
            os.link(f, dst / f.name)
        except OSError:
            shutil.copy2(f, dst / f.name)


def checkpoints(work_dir: Path) -> list[Path]:
    """Complete resume checkpoints, oldest first."""
    root = work_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name.startswith("step-") and (p / "state.json").exists())


def save_checkpoint(
    work_dir: Path, model: RewardModel, optimizer, scheduler, state: TrainState, keep: int
) -> Path:
    path = work_dir / "checkpoints" / f"step-{state.step:08d}"
    with atomic_dir(path) as tmp:
        model.save_pretrained(tmp / "model")
        if (work_dir / "best").exists():
            _link_tree(work_dir / "best", tmp / "best")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save(rng, tmp / "rng.pt")
        (tmp / "state.json").write_text(json.dumps(asdict(state), indent=2) + "\n")
    for old in checkpoints(work_dir)[:-keep]:
        shutil.rmtree(old)
    return path


def read_state(path: Path) -> TrainState:
    return TrainState(**json.loads((path / "state.json").read_text()))


def find_resume(work_dir: Path, expected: str, remove_stale: bool = True) -> Path | None:
    """The newest checkpoint with a matching fingerprint; stale work from another config is removed (by the
    process given remove_stale)."""
    found = checkpoints(work_dir)
    if found and read_state(found[-1]).fingerprint != expected:
        log.info("train_reward: %s holds checkpoints of another config or data; starting fresh", work_dir)
        if remove_stale:
            shutil.rmtree(work_dir)
        return None
    return found[-1] if found else None


# ---------------------------------------------------------------- loop


def _loader(plan: dict[str, tuple[PairSet, list[list[int]]]], collate: PairCollator, start: int, workers: int):
    data = MicroBatches(plan, collate)
    return torch.utils.data.DataLoader(
        data, batch_size=None, sampler=range(start, len(data)), num_workers=workers, persistent_workers=False
    )


def dataloader_workers() -> int:
    """Runtime setting CYCLEPREF_DATALOADER_WORKERS (default 0: load in the training process)."""
    return int(os.environ.get("CYCLEPREF_DATALOADER_WORKERS", "0"))


@torch.no_grad()
def validate(
    model: RewardModel, sets: dict[str, PairSet], collate: PairCollator, batch_size: int, accelerator
) -> dict[str, dict[str, float]]:
    """Mean Bradley-Terry loss and accuracy per task over all pairs (sharded across processes, summed)."""
    model.eval()
    world, rank = accelerator.num_processes, accelerator.process_index
    out = {}
    for task, pairset in sets.items():
        mine = list(range(rank, len(pairset), world))
        batches = [mine[i : i + batch_size] for i in range(0, len(mine), batch_size)]
        totals = torch.zeros(3, device=accelerator.device, dtype=torch.float64)
        for batch in _loader({task: (pairset, batches)}, collate, 0, dataloader_workers()):
            batch = batch.to(accelerator.device)
            rewards = model(batch.pixel_values, batch.input_ids, batch.attention_mask, batch.image_index)
            margin = rewards[batch.chosen[task]] - rewards[batch.rejected[task]]
            totals += torch.stack(
                [-F.logsigmoid(margin).double().sum(), (margin > 0).double().sum(), torch.tensor(len(margin)).double()]
            ).to(totals.device)
        totals = accelerator.reduce(totals, reduction="sum")
        n = totals[2].item()
        out[task] = {"loss": totals[0].item() / n, "acc": totals[1].item() / n, "pairs": n}
    return out


def train_variant(
    variant: str,
    cfg,
    source: PairSource,
    out_dir: Path,
    work_dir: Path,
    *,
    resume: str | Path | None = "auto",
    log_metrics: MetricsLogger | None = None,
    accelerator=None,
) -> TrainResult:
    """Train one variant ("i2t" | "t2i" | "combo") under the TrainReward section `cfg`.

    The best model is written to `out_dir`; `work_dir` holds resume checkpoints and the best-so-far model.
    `resume`: "auto" (newest matching checkpoint in work_dir), a checkpoint directory, or None (fresh start:
    work_dir is cleared).
    """
    from accelerate import Accelerator
    from transformers import get_cosine_schedule_with_warmup

    from cyclepref import runtime

    if variant not in VARIANT_TASKS:
        raise ValueError(f"unknown variant {variant!r} (expected one of {sorted(VARIANT_TASKS)})")
    acc = accelerator or Accelerator(cpu=runtime.device() == "cpu")
    tasks = VARIANT_TASKS[variant]
    train_sets = {t: source.pairs(t, "train") for t in tasks}
    valid_sets = {t: source.pairs(t, "valid") for t in tasks}
    for split, sets in (("train", train_sets), ("valid", valid_sets)):
        empty = [t for t, s in sets.items() if len(s) == 0]
        if empty:
            raise ValueError(
                f"train_reward {variant}: no {'/'.join(empty)} pairs in split {split!r}; "
                "the variant needs both train and valid pairs of its tasks (check build_pairs.split and the inputs)"
            )
    data_digest = source.digest()
    world, rank = acc.num_processes, acc.process_index
    per_device = device_batch(cfg.batch_size, world)
    expected = fingerprint(variant, cfg, data_digest, world)
    sched = Schedule.of({t: len(s) for t, s in train_sets.items()}, world, per_device, cfg.grad_accum,
                        cfg.validations_per_epoch)
    total_steps = sched.steps * cfg.epochs

    mc = cfg.model
    model = RewardModel.from_backbone(
        mc.path, revision=mc.revision, head_widths=mc.head_widths, fix_rate=mc.fix_rate, max_length=mc.max_length,
        image_size=mc.image_size, regularisation=regularisation(mc), seed=cfg.seed, head_init=mc.head_init,
    )
    collate = PairCollator(model.processor, model.max_length)
    torch.manual_seed(_derived_seed(cfg.seed, "train", rank))
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad],
        lr=cfg.lr[variant],
        betas=tuple(cfg.betas),
        eps=cfg.eps,
        weight_decay=cfg.weight_decay[variant],
    )
    scheduler = get_cosine_schedule_with_warmup(optimizer, num_warmup_steps=0, num_training_steps=total_steps)

    if resume == "auto":
        ckpt = find_resume(work_dir, expected, remove_stale=acc.is_main_process)
    else:
        ckpt = Path(resume) if resume else None
        if ckpt is None and acc.is_main_process and work_dir.exists():
            shutil.rmtree(work_dir)
    acc.wait_for_everyone()
    state = TrainState(fingerprint=expected)
    if ckpt is not None:
        state = read_state(ckpt)
        if state.fingerprint != expected:
            raise ValueError(
                f"{ckpt}: checkpoint of another config, data or world size; resume needs the same settings "
                "(remove it, or pass resume=None to start fresh)"
            )
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(ckpt / "model" / "model.safetensors")), strict=True)
        if acc.is_main_process:
            if (ckpt / "best").exists():
                with atomic_dir(work_dir / "best") as tmp:
                    _link_tree(ckpt / "best", tmp)
            elif (work_dir / "best").exists():
                shutil.rmtree(work_dir / "best")
        acc.wait_for_everyone()
        log.info("train_reward %s: resuming from %s (step %d)", variant, ckpt, state.step)

    model, optimizer = acc.prepare(model, optimizer)
    raw: RewardModel = acc.unwrap_model(model)
    if ckpt is not None:
        optimizer.load_state_dict(torch.load(ckpt / "optimizer.pt", map_location=acc.device, weights_only=True))
        scheduler.load_state_dict(torch.load(ckpt / "scheduler.pt", weights_only=True))
        rng = torch.load(ckpt / "rng.pt", weights_only=True)
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])

    meta = {"variant": variant, "data_digest": data_digest, "fingerprint": expected,
            "train_config": fingerprint_body(variant, cfg)}

    def checkpoint() -> None:
        if acc.is_main_process:
            save_checkpoint(work_dir, raw, optimizer, scheduler, state, cfg.keep_checkpoints)
        acc.wait_for_everyone()

    log.info(
        "train_reward %s: %s train pairs, %s valid pairs, %d steps/epoch x %d epochs, %d process(es)",
        variant, {t: len(s) for t, s in train_sets.items()}, {t: len(s) for t, s in valid_sets.items()},
        sched.steps, cfg.epochs, world,
    )
    while state.epoch < cfg.epochs and not state.stopped_early:
        plan = {
            t: (s, shard(epoch_order(len(s), sched.length, cfg.seed, state.epoch, t), world, rank, per_device))
            for t, s in train_sets.items()
        }
        batches = iter(_loader(plan, collate, state.micro, dataloader_workers()))
        while state.micro < sched.micro_batches:
            count = min(cfg.grad_accum, sched.micro_batches - state.micro)
            micro = [next(batches) for _ in range(count)]
            total = sum(b.size for b in micro)
            model.train()
            sums: dict[str, torch.Tensor] = {}
            for j, batch in enumerate(micro):
                batch = batch.to(acc.device)
                weight = batch.size / total
                with acc.no_sync(model) if j < count - 1 else nullcontext():
                    rewards = model(batch.pixel_values, batch.input_ids, batch.attention_mask, batch.image_index)
                    parts = bradley_terry(rewards, batch)
                    loss = combine({t: p[0] for t, p in parts.items()}, cfg.combo_ratio)
                    acc.backward(loss * weight)
                for t, (task_loss, task_acc) in parts.items():
                    for key, value in ((f"train/loss_{t}", task_loss), (f"train/acc_{t}", task_acc)):
                        sums[key] = sums.get(key, 0.0) + value.detach().double() * weight
                sums["train/loss"] = sums.get("train/loss", 0.0) + loss.detach().double() * weight
            if cfg.max_grad_norm is not None:
                acc.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.micro += count
            state.step += 1
            step_in_epoch = math.ceil(state.micro / cfg.grad_accum)
            names = sorted(sums)
            reduced = acc.reduce(torch.stack([sums[k] for k in names]), reduction="mean")
            metrics = {k: float(v) for k, v in zip(names, reduced.tolist(), strict=True)}
            metrics |= {"train/lr": lr, "train/epoch": state.epoch + state.micro / sched.micro_batches}
            if state.micro >= sched.micro_batches:
                state.epoch += 1
                state.micro = 0
            if step_in_epoch in sched.validate_after:
                metrics |= _validate_and_track(raw, valid_sets, collate, cfg, acc, state, work_dir, meta, per_device)
                checkpoint()
            elif cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0:
                checkpoint()
            if log_metrics is not None and acc.is_main_process:
                log_metrics(metrics, state.step)
            if state.stopped_early or state.micro == 0:
                break
    acc.wait_for_everyone()
    if state.best_step is None:
        raise RuntimeError(f"train_reward {variant}: finished without a validation (no best model)")
    if acc.is_main_process:
        with atomic_dir(out_dir) as tmp:
            shutil.copytree(work_dir / "best", tmp, dirs_exist_ok=True)
    acc.wait_for_everyone()
    return TrainResult(
        variant=variant,
        model=raw,
        best_dir=out_dir,
        best_loss=float(state.best_loss),
        best_step=int(state.best_step),
        steps=state.step,
        stopped_early=state.stopped_early,
        resumed_from=str(ckpt) if ckpt else None,
        history=state.history,
        data_digest=data_digest,
        fingerprint=expected,
    )


def _validate_and_track(
    model: RewardModel, valid_sets: dict[str, PairSet], collate: PairCollator, cfg, acc, state: TrainState,
    work_dir: Path,
    meta: dict,
    batch_size: int,
) -> dict[str, float]:
    per_task = validate(model, valid_sets, collate, batch_size, acc)
    val_loss = combine({t: torch.tensor(r["loss"]) for t, r in per_task.items()}, cfg.combo_ratio).item()
    improved = state.best_loss is None or val_loss < state.best_loss - cfg.min_delta
    if improved:
        state.best_loss, state.best_step, state.bad_validations = val_loss, state.step, 0
        if acc.is_main_process:
            model.save_pretrained(work_dir / "best", metadata=meta | {"step": state.step, "val_loss": val_loss})
    else:
        state.bad_validations += 1
        state.stopped_early = state.bad_validations >= cfg.patience
    entry = {"step": state.step, "val_loss": val_loss, "improved": improved}
    for t, r in per_task.items():
        entry |= {f"val_loss_{t}": r["loss"], f"val_acc_{t}": r["acc"]}
    state.history.append(entry)
    log.info("train_reward: step %d validation %s", state.step, entry)
    metrics = {"val/loss": val_loss, "val/best_loss": state.best_loss}
    for t, r in per_task.items():
        metrics |= {f"val/loss_{t}": r["loss"], f"val/acc_{t}": r["acc"]}
    return metrics
