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
