"""bench/gpu.sh and bench/gpu.py, run on CPU at tiny sizes (`--smoke`), so that the script prepared for a lent GPU
machine does not fail on first contact: every row and arm is measured through the project's adapters and batch
functions with FLOPs and MFU, without the packages that machine lacks (open_clip, trl, dvc, mlflow, prefect, ...), and
without diffusers (its wheels not carried) the diffusion rows are skipped while the others still run."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ABSENT = ("open_clip", "trl", "dvc", "mlflow", "prefect", "great_expectations", "ray", "vllm", "dreamsim", "lpips")
SITECUSTOMIZE = """import importlib.abc, importlib.util, sys
BLOCKED = {blocked!r}
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {{name!r}} (absent on the GPU machine)", name=name)
sys.meta_path.insert(0, Block())
_find_spec = importlib.util.find_spec
def find_spec(name, package=None):
    return None if name.split(".")[0] in BLOCKED else _find_spec(name, package)
importlib.util.find_spec = find_spec
"""
"""Installed as sitecustomize: importing a blocked package fails and importlib.util.find_spec (which libraries use
to probe optional packages) answers None, as for a package that is not installed."""
FP32, PAPER, BF16, COMPILE = "fp32 eager", "paper", "bf16 sdpa", "bf16 sdpa compile"
EXPECTED = {  # (section, model): (arms, batches) measured by a full smoke run
    ("reward scoring", "BLIP-large reward model"): ((FP32, BF16, COMPILE), (3, 1)),
    ("diffusion denoising", "SD1.5 UNet 512 px"): ((FP32, PAPER, BF16, COMPILE), (2, 1)),
    ("diffusion denoising", "SD3-medium MMDiT 1024 px"): ((FP32, PAPER, BF16, COMPILE), (2, 1)),
    ("captioning", "LLaVA-1.5-7B captioner"): ((FP32, PAPER, BF16, COMPILE), (2, 1)),
    ("text-to-image", "SD1.5 UNet 512 px pipeline"): ((PAPER,), (2,)),
    ("text-to-image", "SD3-medium MMDiT 1024 px pipeline"): ((PAPER,), (2,)),
    ("similarity", "SBERT all-MiniLM-L6-v2"): ((PAPER, BF16), (4, 1)),
}
SECTIONS = ["reward scoring", "diffusion denoising", "captioning", "text-to-image", "similarity"]


def _env(tmp_path: Path, blocked: tuple[str, ...]) -> dict:
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE.format(blocked=set(blocked)))
    env = {**os.environ, "OUT": str(tmp_path), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(site), "BUDGET_S": "3600"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return env


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_gpu_sh_smoke_measures_every_row_through_the_adapters_without_the_absent_packages(tmp_path):
    done = subprocess.run(["bash", "bench/gpu.sh", "--smoke"], cwd=ROOT, env=_env(tmp_path, ABSENT),
                          capture_output=True, text=True, timeout=3500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_results.json").read_text())
    peaks, rows = result["peaks"], result["rows"]
    assert peaks["matmul_tflops"] > 0 and peaks["copy_tb_s"] > 0 and result["device"] == "cpu (smoke)"
    assert [SECTIONS.index(r["section"]) for r in rows] == sorted(SECTIONS.index(r["section"]) for r in rows)
    assert rows[0]["section"] == "reward scoring"
    measured = {(r["section"], r["model"], r["arm"], r["batch"]): r for r in rows if r["throughput"]}
    for (section, model), (arms, batches) in EXPECTED.items():
        for arm in arms:
            for batch in batches:
                assert (section, model, arm, batch) in measured, (section, model, arm, batch)
    for r in measured.values():
        assert r["flops_per_call"] > 0 and r["stage"], r
        achieved = r["flops_per_call"] / (r["ms_per_call"] / 1000) / 1e12
        assert r["mfu"] == pytest.approx(achieved / peaks["matmul_tflops"], rel=0.02, abs=2e-4)
        if r["arm"] == FP32 or (r["arm"] == PAPER and r["section"] != "similarity"):
            assert r["note"].startswith("float32"), r
        elif r["section"] in ("reward scoring", "diffusion denoising", "captioning"):
            assert r["note"].startswith("bfloat16"), r
    notes = {(m[1], m[2]): r["note"] for m, r in measured.items()}
    assert "eager attention" in notes["LLaVA-1.5-7B captioner", FP32]
    assert "sdpa attention" in notes["LLaVA-1.5-7B captioner", BF16]
    assert notes["SD1.5 UNet 512 px", FP32].endswith("; AttnProcessor")
    assert notes["SD1.5 UNet 512 px", BF16].endswith("; AttnProcessor2_0")
    table = (tmp_path / "gpu_table.txt").read_text()
    assert "MFU %" in table and "TFLOP/s" in table and all(model in table for _, model in EXPECTED)


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_without_diffusers_the_other_rows_still_run(tmp_path):
    out = tmp_path / "rows.json"
    args = ["--smoke", "--runs", "reward,sd,similarity", "--arms", "fp32 eager,paper", "--budget-s", "100000"]
    done = subprocess.run([sys.executable, "bench/gpu.py", *args, "--out", str(out)], cwd=ROOT,
                          env=_env(tmp_path, (*ABSENT, "diffusers")), capture_output=True, text=True, timeout=1700)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    skipped = [r for r in rows if r["throughput"] is None]
    assert [(r["section"], r["model"]) for r in skipped] == [("diffusion denoising", "sd")]
    assert "diffusers" in skipped[0]["note"]
    assert {(r["section"], r["arm"]) for r in rows if r["throughput"]} == {("reward scoring", "fp32 eager"),
                                                                           ("similarity", "paper")}


def _gpu_module():
    spec = importlib.util.spec_from_file_location("bench_gpu_calls", ROOT / "bench" / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_rows_call_the_stages_batch_functions(monkeypatch, tmp_path):
    from cyclepref import engine
    from cyclepref.models.similarity import TextSimilarity
    from cyclepref.reward.evaluate import RewardScorer

    calls: dict[str, int] = {}

    def counting(owner, name, key):
        original = getattr(owner, name)

        def wrapper(self, *args, **kwargs):
            calls[key] = calls.get(key, 0) + 1
            return original(self, *args, **kwargs)

        monkeypatch.setattr(owner, name, wrapper)

    counting(engine.Worker, "run", "worker")
    counting(RewardScorer, "score", "reward")
    counting(TextSimilarity, "embed", "similarity")
    gpu = _gpu_module()
    kinds = []
    build = engine._build
    monkeypatch.setattr(engine, "_build", lambda kind, spec, device: kinds.append(kind) or build(kind, spec, device))
    rows = gpu.main(["--smoke", "--runs", "reward,captioner,render-sd,similarity", "--arms", "fp32 eager,paper",
                     "--min-s", "0", "--budget-s", "100000", "--out", str(tmp_path / "r.json")])
    assert all(r.throughput for r in rows)
    assert [(r.section, r.arm, r.batch) for r in rows] == [
        ("reward scoring", "fp32 eager", 3), ("reward scoring", "fp32 eager", 1),
        ("captioning", "fp32 eager", 2), ("captioning", "fp32 eager", 1), ("captioning", "paper", 2),
        ("captioning", "paper", 1), ("text-to-image", "paper", 2), ("similarity", "paper", 4),
        ("similarity", "paper", 1)]
    assert kinds == ["caption", "caption", "render"]
    assert calls["worker"] == 4 * 2 + 2 and calls["reward"] == 2 * 2 and calls["similarity"] == 2 * 2 + 1
