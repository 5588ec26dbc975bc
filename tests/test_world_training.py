"""The world models' training code (stage train_world), run for a few steps: the loss falls and a rerun with the
same seed writes byte-identical weights. The committed sandbox weights come from the same functions, longer."""

import hashlib
from pathlib import Path

import numpy as np
import pytest

from cyclepref.world import train_blip, train_captioner, train_clip, train_t2i


def _digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*.safetensors"))}


def _falls(losses: list[float], k: int = 5) -> bool:
    return np.mean(losses[-k:]) < np.mean(losses[:k])


RUNS = {
    "captioner": lambda out: train_captioner.train(out, steps=[10, 30], seed=0, n_scenes=200, batch_size=16,
                                                   lr=1e-3, log=lambda m: None),
    "clip": lambda out: train_clip.train(out, steps=30, seed=0, n_scenes=200, batch_size=32, lr=1e-3,
                                         log=lambda m: None),
    "t2i": lambda out: train_t2i.train(out, vae_steps=30, steps=[10, 30], seed=0, n_scenes=200, batch_size=8,
                                       lr=1e-3, vae_lr=1e-3, log=lambda m: None),
    "blip": lambda out: train_blip.train(out, steps=40, seed=0, n_scenes=200, batch_size=16, lr=5e-4,
                                         log=lambda m: None),
}


@pytest.mark.parametrize("model", sorted(RUNS))
def test_training_lowers_the_loss_and_is_reproducible(model, tmp_path):
    first = RUNS[model](tmp_path / "a")
    curves = first if isinstance(first, dict) else {model: first}
    for name, losses in curves.items():
        assert _falls(losses), f"{name}: loss did not fall: {losses[:5]} ... {losses[-5:]}"
    second = RUNS[model](tmp_path / "b")
    assert second == first
    a, b = _digests(tmp_path / "a"), _digests(tmp_path / "b")
    assert a and a == b


def test_the_one_loop_steps_warms_up_clips_and_calls_the_hook():
    import torch

    from cyclepref.world.optimise import optimise

    w = torch.nn.Parameter(torch.tensor([3.0, -4.0]))
    seen, logged = [], []
    losses = optimise([w], 60, 0.1, lambda step: (w ** 2).sum(), "toy", logged.append, warmup=10,
                      max_grad_norm=1.0, after_step=seen.append)
    assert len(losses) == 60 and losses[0] == 25.0 and losses[-1] < 1.0
    assert seen == list(range(1, 61)) and logged == [f"toy step 50: loss {np.mean(losses[:50]):.5f}"]
    v = torch.nn.Parameter(torch.tensor([3.0, -4.0]))
    optimise([v], 1, 0.1, lambda step: (v ** 2).sum(), "toy", warmup=10)
    # step 1 of a 10-step warm-up: AdamW moves each weight by lr / 10 (sign of the gradient)
    assert v.detach().tolist() == pytest.approx([3.0 - 0.01, -4.0 + 0.01], abs=1e-6)


@pytest.mark.parametrize("model", sorted(RUNS))
def test_every_world_trainer_runs_the_one_loop(model, tmp_path, monkeypatch):
    import importlib

    from cyclepref.world import optimise as loop

    module = importlib.import_module(f"cyclepref.world.train_{model}")
    calls = []

    def recording(params, steps, lr, step_loss, name, log=print, **kw):
        calls.append((name, steps))
        return loop.optimise(params, min(steps, 2), lr, step_loss, name, log, **kw)

    monkeypatch.setattr(module, "optimise", recording)
    small = {"captioner": lambda out: module.train(out, steps=[2], seed=0, n_scenes=20, batch_size=4, lr=1e-3,
                                                   log=lambda m: None),
             "clip": lambda out: module.train(out, steps=2, seed=0, n_scenes=20, batch_size=4, lr=1e-3,
                                              log=lambda m: None),
             "t2i": lambda out: module.train(out, vae_steps=2, steps=[2], seed=0, n_scenes=20, batch_size=4, lr=1e-3,
                                             vae_lr=1e-3, log=lambda m: None),
             "blip": lambda out: module.train(out, steps=2, seed=0, n_scenes=20, batch_size=4, lr=5e-4,
                                              log=lambda m: None)}
    small[model](tmp_path)
    expected = {"captioner": [("captioner", 2)], "clip": [("clip", 2)], "t2i": [("vae", 2), ("t2i", 2)],
                "blip": [("blip", 2)]}
    assert calls == expected[model]


def test_judges_trained_on_alt_text_go_beside_the_dense_ones(tmp_path, monkeypatch):
    from cyclepref.world.params import WorldOneModelTraining
    from tasks import train_world

    seen = []

    def fake_train(out, texts, **kw):
        seen.append((out.relative_to(tmp_path).as_posix(), texts))
        return [1.0]

    monkeypatch.setattr(train_clip, "train", fake_train)
    cfg = WorldOneModelTraining(scenes=10, steps=1, texts=["dense", "alt"])
    curves = train_world._train("clip", cfg, 0, tmp_path / "clip", None)
    assert seen == [("clip", "dense"), ("clip/alt", "alt")] and set(curves) == {"clip", "clip-alt"}


def test_a_killed_text_to_image_run_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path, monkeypatch):
    from cyclepref.world import optimise as loop

    real = loop.optimise
    kw = {"vae_steps": 4, "steps": [4, 12], "seed": 0, "n_scenes": 40, "batch_size": 4, "lr": 1e-3,
          "vae_lr": 1e-3}

    def often(params, steps, lr, step_loss, name, log=print, **k):
        return real(params, steps, lr, step_loss, name, log, **k, **({"resume_every": 5} if name == "t2i" else {}))

    def killed_at_7(params, steps, lr, step_loss, name, log=print, **k):
        if name != "t2i":
            return often(params, steps, lr, step_loss, name, log, **k)
        often(params, 7, lr, step_loss, name, log, **k)
        raise KeyboardInterrupt

    train_t2i.train(tmp_path / "straight", log=lambda m: None, **kw)
    resume, out = tmp_path / "resume", tmp_path / "resumed"
    monkeypatch.setattr(train_t2i, "optimise", killed_at_7)
    with pytest.raises(KeyboardInterrupt):
        train_t2i.train(out, log=lambda m: None, resume=resume, **kw)
    assert (resume / "state.pt").exists() and (resume / "step-4").is_dir()
    logged = []
    monkeypatch.setattr(train_t2i, "optimise", often)
    train_t2i.train(out, log=logged.append, resume=resume, **kw)
    assert f"resumed from {resume / 'state.pt'} at step 5" in logged
    assert _digests(out) == _digests(tmp_path / "straight") and len(_digests(out)) == 6
