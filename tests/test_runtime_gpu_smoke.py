"""bench/gpu.sh and bench/gpu.py, run on CPU at tiny sizes (`--smoke`), so that the script prepared for a lent GPU
machine does not fail on first contact: every model and arm is measured, and without diffusers (as on that machine
when its wheels were not carried) the diffusers rows are skipped while the others still run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = ["BLIP-large reward model", "UNet SD1.5-size 512px", "LLaVA-1.5-7B-shaped captioner",
          "MMDiT SD3-medium-size 1024px"]
BLOCK = """import importlib.abc, runpy, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {"diffusers", "open_clip", "trl"}:
            raise ImportError(f"No module named {name!r} (blocked as on the GPU machine)")
sys.meta_path.insert(0, Block())
sys.argv = ["bench/gpu.py", *sys.argv[1:]]
runpy.run_path("bench/gpu.py", run_name="__main__")
"""


def _env(tmp_path: Path) -> dict:
    env = {**os.environ, "OUT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return env


def test_gpu_sh_smoke_measures_every_model_and_arm(tmp_path):
    done = subprocess.run(["bash", "bench/gpu.sh", "--smoke"], cwd=ROOT, env=_env(tmp_path), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads((tmp_path / "gpu_results.json").read_text())["rows"]
    measured = {(r["model"], r["arm"], r["batch"]) for r in rows if r["throughput"]}
    for model in MODELS:
        arms = ["fp32 eager", "bf16 sdpa"] + ([] if model.startswith("LLaVA") else ["bf16 sdpa compile"])
        for arm in arms:
            assert {(model, arm, b) for b in (1, 2 if not model.startswith("BLIP") else 4)} <= measured, (model, arm)
    assert all(r["throughput"] > 0 for r in rows if r["throughput"] is not None)
    table = (tmp_path / "gpu_table.txt").read_text()
    assert all(model in table for model in MODELS)
    llava = [r for r in rows if r["model"].startswith("LLaVA")]
    assert [r["note"].split(" ")[0] for r in llava] == ["eager", "eager", "sdpa", "sdpa"]


def test_without_diffusers_the_other_rows_still_run(tmp_path):
    out = tmp_path / "rows.json"
    done = subprocess.run([sys.executable, "-c", BLOCK, "--smoke", "--out", str(out)], cwd=ROOT, env=_env(tmp_path),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    skipped = {r["model"] for r in rows if r["note"].startswith("skipped")}
    assert skipped == {"unet", "sd3"}
    assert {r["model"] for r in rows if r["throughput"]} == {MODELS[0], MODELS[2]}
