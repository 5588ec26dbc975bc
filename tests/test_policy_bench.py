"""The policies' frozen ground-truth benchmark (cyclepref.downstream.policy_bench): the committed sandbox benchmark's
scenes parse back exactly into the scenes they were drawn from, and the world models score per scene with one model
load, base and adapters on the same inputs and seeds (so two models' outcomes are paired)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from cyclepref.config import load_params
from cyclepref.downstream.policy_bench import load_policy_benchmark, policy_outcomes

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "data/benchmarks/sandbox/pairs.jsonl"


def test_the_committed_benchmark_scenes_are_their_true_scenes():
    from cyclepref.world import benchmark as bm
    from cyclepref.world.data import scenes

    b = load_params(ROOT / "params.yaml").world.benchmark
    _, prompts, truths = bm.scene_inputs(scenes("benchmark", b.n, b.seed), b.seed)
    bench = load_policy_benchmark(BENCH)
    numbers = [int(s.removeprefix("scene-")) for s in bench.scenes]
    assert len(numbers) == bench.size("i2t") == bench.size("t2i") == b.n
    assert bench.truths == [truths[k] for k in numbers]
    assert [bench.prompts[s] for s in bench.scenes] == [prompts[k] for k in numbers]


def _small(tmp_path: Path, scenes: int) -> Path:
    """The benchmark's rows of its first `scenes` scenes, with their images."""
    keep = {f"scene-{k}" for k in range(scenes)}
    rows = [json.loads(line) for line in BENCH.read_text().splitlines()]
    rows = [r for r in rows if r["group"] in keep]
    for r in rows:
        for key in ("image", "chosen", "rejected") if r["task"] == "t2i" else ("image",):
            if key in r:
                (tmp_path / r[key]).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(BENCH.parent / r[key], tmp_path / r[key])
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path / "pairs.jsonl"


@pytest.mark.parametrize("stage", ["dpo_vlm", "diffusion_dpo"])
def test_the_world_policies_score_per_scene_the_same_way_twice(tmp_path, stage, monkeypatch):
    from cyclepref.models import local_spec
    from flows.policy import base_spec

    monkeypatch.chdir(ROOT)
    params = load_params(ROOT / "params.yaml")
    bench = load_policy_benchmark(_small(tmp_path, 6))
    first, again = policy_outcomes(stage, local_spec(ROOT, base_spec(params, stage)), [None, None], bench, "cpu", 8)
    assert first.shape == (6,) and np.all((first >= 0) & (first <= 1)) and first.mean() > 0.2
    assert first.tolist() == again.tolist()
