"""Reward training: data plan, learnability, exact resume, Combo validation, early stopping, failures."""

from __future__ import annotations

import json

import pytest
import torch
from accelerate import Accelerator

from cyclepref.config import TrainReward
from cyclepref.reward.data import ListPairSet, PairCollator
from cyclepref.reward.model import RewardModel
from cyclepref.reward.synthetic import SyntheticPairSource, colour_pairs
from cyclepref.reward.train import (
    Schedule,
    checkpoints,
    combine,
    epoch_order,
    read_state,
    shard,
    train_variant,
    validate,
)


def config(backbone: str, variant: str, **kw) -> TrainReward:
    base = dict(
        model={"path": backbone, "max_length": 16},
        variants=[variant],
        lr={variant: 2e-3},
        weight_decay={variant: 0.0},
        epochs=2,
        batch_size=16,
        grad_accum=1,
        validations_per_epoch=1,
        patience=100,
    )
    return TrainReward(**(base | kw))


@pytest.fixture(scope="module")
def backbone(zoo) -> str:
    return str(zoo / "tiny-blip-itm")


def test_plan_is_deterministic_cycles_the_shorter_task_and_shards_without_loss():
    a = epoch_order(5, 12, seed=0, epoch=0, task="t2i")
    assert a == epoch_order(5, 12, seed=0, epoch=0, task="t2i")
    assert a != epoch_order(5, 12, seed=0, epoch=1, task="t2i")
    assert sorted(a[:5]) == sorted(a[5:10]) == list(range(5)) and len(a) == 12
    order = epoch_order(10, 10, 0, 0, "i2t")
    shards = [shard(order, world=4, rank=r, batch_size=2) for r in range(4)]
    seen = [i for s in shards for batch in s for i in batch]
    assert len(seen) == 12 and set(seen) == set(range(10))
    assert {len(s) for s in shards} == {2}
    sched = Schedule.of({"i2t": 100, "t2i": 30}, world=2, batch_size=8, grad_accum=2, validations=4)
    assert (sched.length, sched.micro_batches, sched.steps, sched.validate_after) == (100, 7, 4, (1, 2, 3, 4))
    assert Schedule.of({"i2t": 10}, 1, 8, 1, 4).validate_after == (1, 2)


def test_combined_loss_uses_both_tasks():
    losses = {"i2t": torch.tensor(0.4), "t2i": torch.tensor(0.7)}
    assert combine(losses, 0.5).item() == pytest.approx(0.9)
    assert combine({"t2i": torch.tensor(0.7)}, 0.5).item() == pytest.approx(0.7)


def test_tiny_model_learns_a_synthetic_preference_to_90_percent_held_out(backbone, tmp_path):
    source = SyntheticPairSource({"train": 128, "valid": 32, "test": 128})
    logged = []
    result = train_variant(
        "i2t", config(backbone, "i2t"), source, tmp_path / "out", tmp_path / "work", resume=None,
        log_metrics=lambda m, step: logged.append((step, m)),
    )
    assert result.steps == 16 and [h["step"] for h in result.history] == [8, 16]
    assert [s for s, _ in logged] == list(range(1, 17))
    assert {"train/loss", "train/acc_i2t", "train/lr"} <= set(logged[0][1])
    assert "val/loss" in logged[7][1] and "val/loss" not in logged[6][1]
    assert logged[-1][1]["train/lr"] < logged[0][1]["train/lr"]
    best = RewardModel.from_pretrained(result.best_dir)
    assert best.metadata["variant"] == "i2t" and best.metadata["step"] == result.best_step
    test = {"i2t": source.pairs("i2t", "test")}
    held_out = validate(best, test, PairCollator(best.processor, best.max_length), 64, Accelerator(cpu=True))
    assert held_out["i2t"]["acc"] >= 0.9, held_out


def test_resume_from_a_mid_epoch_checkpoint_equals_an_uninterrupted_run(backbone, tmp_path):
    source = SyntheticPairSource({"train": 40, "valid": 8, "test": 8})
    cfg = config(backbone, "combo", lr={"combo": 1e-3}, weight_decay={"combo": 0.01}, batch_size=4,
                 grad_accum=2, checkpoint_every=1, keep_checkpoints=100, combo_ratio=0.5)
    full = train_variant("combo", cfg, source, tmp_path / "a" / "out", tmp_path / "a" / "work", resume=None)
    steps = [read_state(c) for c in checkpoints(tmp_path / "a" / "work")]
    mid = next(c for c, s in zip(checkpoints(tmp_path / "a" / "work"), steps, strict=True) if s.step == 3)
    assert read_state(mid).epoch == 0 and read_state(mid).micro == 6
    resumed = train_variant("combo", cfg, source, tmp_path / "b" / "out", tmp_path / "b" / "work", resume=mid)
    assert resumed.resumed_from == str(mid) and resumed.steps == full.steps == 10
    final_a, final_b = full.model.state_dict(), resumed.model.state_dict()
    for name in final_a:
        assert torch.equal(final_a[name], final_b[name]), name
    assert resumed.history == full.history
    assert (tmp_path / "a/out/model.safetensors").read_bytes() == (tmp_path / "b/out/model.safetensors").read_bytes()
    for entry in full.history:
        assert entry["val_loss"] == pytest.approx(0.5 * entry["val_loss_i2t"] + entry["val_loss_t2i"], rel=1e-6)


def test_auto_resume_continues_and_a_changed_config_starts_fresh(backbone, tmp_path):
    source = SyntheticPairSource({"train": 16, "valid": 4, "test": 4})
    cfg = config(backbone, "t2i", lr={"t2i": 1e-3}, batch_size=8, keep_checkpoints=1)
    work = tmp_path / "work"
    first = train_variant("t2i", cfg, source, tmp_path / "out", work)
    assert first.resumed_from is None and first.steps == 4
    again = train_variant("t2i", cfg, source, tmp_path / "out", work)
    assert again.resumed_from is not None and again.steps == 4 and again.history == first.history
    changed = config(backbone, "t2i", lr={"t2i": 5e-4}, batch_size=8)
    fresh = train_variant("t2i", changed, source, tmp_path / "out", work)
    assert fresh.resumed_from is None
    with pytest.raises(ValueError, match="checkpoint of another config"):
        train_variant("t2i", cfg, source, tmp_path / "out", tmp_path / "w2", resume=checkpoints(work)[-1])


def test_changed_backbone_weights_start_fresh(backbone, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    source = SyntheticPairSource({"train": 16, "valid": 4, "test": 4})
    copy = tmp_path / "backbone"
    shutil.copytree(backbone, copy)
    cfg = config(str(copy), "t2i", lr={"t2i": 1e-3}, batch_size=8)
    work = tmp_path / "work"
    assert train_variant("t2i", cfg, source, tmp_path / "out", work).resumed_from is None
    weights = next(copy.glob("*.safetensors"))
    state = load_file(weights)
    name = next(iter(state))
    state[name] = state[name] + 1.0
    save_file(state, weights, metadata={"format": "pt"})
    assert train_variant("t2i", cfg, source, tmp_path / "out", work).resumed_from is None


def test_early_stopping_keeps_the_best_and_stops(backbone, tmp_path):
    source = SyntheticPairSource({"train": 32, "valid": 8, "test": 8})
    cfg = config(backbone, "i2t", lr={"i2t": 1e-12}, batch_size=4, validations_per_epoch=4, patience=2, epochs=5)
    result = train_variant("i2t", cfg, source, tmp_path / "out", tmp_path / "work", resume=None)
    assert result.stopped_early and result.steps == 6 and result.best_step == 2
    assert [h["improved"] for h in result.history] == [True, False, False]
    meta = json.loads((result.best_dir / "reward_config.json").read_text())["metadata"]
    assert meta["step"] == 2


def test_head_init_itm_reaches_training_and_the_fingerprint(backbone, tmp_path):
    from transformers import BlipForImageTextRetrieval

    from cyclepref.reward.train import fingerprint, fingerprint_body

    source = SyntheticPairSource({"train": 16, "valid": 4, "test": 4})
    plain = config(backbone, "i2t", lr={"i2t": 1e-12}, batch_size=8, epochs=1)
    itm = config(backbone, "i2t", model={"path": backbone, "max_length": 16, "head_init": "itm"},
                 lr={"i2t": 1e-12}, batch_size=8, epochs=1)
    assert "head_init" not in fingerprint_body("i2t", plain)["model"]  # the old fingerprints stay valid
    assert fingerprint_body("i2t", itm)["model"]["head_init"] == "itm"
    assert fingerprint("i2t", plain, "d", 1) != fingerprint("i2t", itm, "d", 1)
    result = train_variant("i2t", itm, source, tmp_path / "out", tmp_path / "work", resume=None)
    first = result.model.head.layers[0]
    head = BlipForImageTextRetrieval.from_pretrained(backbone, dtype=torch.float32).itm_head
    torch.testing.assert_close(first.weight[0].detach(), (head.weight[1] - head.weight[0]).detach())


def test_missing_validation_pairs_fail_with_the_fix(backbone, tmp_path):
    class NoValid(SyntheticPairSource):
        def pairs(self, task, split):
            return ListPairSet(task, []) if split == "valid" else super().pairs(task, split)

    with pytest.raises(ValueError, match="no i2t pairs in split 'valid'.*build_pairs.split"):
        train_variant("i2t", config(backbone, "i2t"), NoValid({"train": 4, "test": 4}), tmp_path / "o", tmp_path / "w")


def test_collator_encodes_each_i2t_image_once_and_reads_t2i_prompts_twice(backbone):
    model = RewardModel.from_backbone(backbone, max_length=16)
    i2t, t2i = colour_pairs("i2t", 3, 0), colour_pairs("t2i", 2, 0)
    batch = PairCollator(model.processor, 16)({"i2t": i2t.examples, "t2i": t2i.examples})
    assert batch.pixel_values.shape[0] == 3 + 4
    assert batch.input_ids.shape[0] == 6 + 4
    assert batch.image_index.tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 5, 6]
    assert batch.chosen["i2t"].tolist() == [0, 1, 2] and batch.rejected["i2t"].tolist() == [3, 4, 5]
    assert batch.chosen["t2i"].tolist() == [6, 7] and batch.rejected["t2i"].tolist() == [8, 9]
    assert torch.equal(batch.input_ids[6], batch.input_ids[8])


def test_the_paper_and_default_profiles_train_with_the_authors_regularisation_and_tiny_without():
    from pathlib import Path

    from cyclepref.config import load_params
    from cyclepref.reward.model import Regularisation
    from cyclepref.reward.train import regularisation

    configs = Path(__file__).resolve().parents[1] / "configs"
    paper = load_params(configs / "paper.yaml").train_reward.model
    assert regularisation(paper) == Regularisation(text_dropout=0.1, text_attention_dropout=0.1,
                                                   vision_attention_dropout=0.0, drop_path_rate=0.1)
    assert paper.image_size == 224
    assert regularisation(load_params(configs / "default.yaml").train_reward.model) == regularisation(paper)
    assert regularisation(load_params(configs / "tiny.yaml").train_reward.model) == Regularisation()


def test_the_global_micro_batch_is_split_over_the_processes_into_the_same_pairs_per_step():
    from cyclepref.reward.train import device_batch

    order = epoch_order(24, 24, seed=3, epoch=0, task="i2t")
    one = shard(order, world=1, rank=0, batch_size=device_batch(8, 1))
    two = [shard(order, world=2, rank=r, batch_size=device_batch(8, 2)) for r in range(2)]
    assert len(one) == len(two[0]) == len(two[1]) == 3
    for m in range(3):
        assert sorted(two[0][m] + two[1][m]) == sorted(one[m])
    assert Schedule.of({"i2t": 24}, 2, device_batch(8, 2), 1, 1).steps == Schedule.of({"i2t": 24}, 1, 8, 1, 1).steps
    with pytest.raises(ValueError, match="not divisible by the 3 training processes"):
        device_batch(8, 3)


def test_train_processes_is_a_runtime_setting(monkeypatch):
    from cyclepref import runtime
    from tasks.train_reward import launch_command

    monkeypatch.delenv("CYCLEPREF_TRAIN_PROCESSES", raising=False)
    assert runtime.train_processes() == 1
    monkeypatch.setenv("CYCLEPREF_TRAIN_PROCESSES", "4")
    assert runtime.train_processes() == 4
    assert launch_command(4)[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4", "-m",
                                     "tasks.train_reward"]
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv("CYCLEPREF_TRAIN_PROCESSES", bad)
        with pytest.raises(ValueError, match="CYCLEPREF_TRAIN_PROCESSES must be a positive integer"):
            runtime.train_processes()
