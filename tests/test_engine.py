"""The Ray engine gives the same results, in order, as the local one (run inside a network namespace)."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _netns_ok() -> bool:
    if not shutil.which("unshare"):
        return False
    res = subprocess.run(["unshare", "--net", "true"], capture_output=True)
    return res.returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray not installed (pip install cyclepref[ray])")
@pytest.mark.skipif(not _netns_ok(), reason="needs `unshare --net` (root): Ray must not start on the host network")
def test_ray_engine_matches_local(zoo):
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    script = f"ip link set lo up && exec {sys.executable} {ROOT / 'tests/ray_job.py'} {zoo} {ROOT / 'data/inputs/images'}"
    res = subprocess.run(["unshare", "--net", "sh", "-c", script], env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out == {**out, "captions_equal": True, "n_captions": 6, "n_images": 6}
    assert out["max_pixel_diff"] <= 2


def test_unknown_engine_is_rejected(monkeypatch):
    from cyclepref import runtime

    monkeypatch.setenv("CYCLEPREF_ENGINE", "spark")
    with pytest.raises(ValueError, match="CYCLEPREF_ENGINE must be"):
        runtime.engine()
