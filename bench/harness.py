"""Side-by-side timing that a busy machine cannot fool easily.

`compare(arms)` times two or more ways of doing the same work in one process: one warm-up call per arm (which also
sizes it: an arm is called `inner` times per sample so that a sample lasts at least `min_s` seconds), then `repeats`
rounds in which the arms run back to back, the order reversed every round (A B, B A, ...), so that a load change
hits every arm; garbage is collected before every sample, so that no arm pays for the other's. A ratio is computed
per round from the two arms' samples of that round, and reported as its median, min, max and spread (max - min);
the machine's load average is recorded before and after.

Rounds of one process share its state (memory layout, which core it got, a neighbour's load at that minute), so
their spread understates how far a second run can land. `pool(blocks)` merges the same comparison measured in
several processes at different times: the interval it reports is over every round of every process, and the
per-process medians are kept beside it.
"""

from __future__ import annotations

import gc
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def machine() -> dict:
    """What the numbers were measured on."""
    info = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "load_average_1_5_15": load_average(),
    }
    try:
        import torch

        info.update(torch=torch.__version__, torch_threads=torch.get_num_threads(),
                    cuda=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
    except ImportError:
        pass
    model = next((line.split(":", 1)[1].strip() for line in _read("/proc/cpuinfo").splitlines()
                  if line.startswith("model name")), None)
    if model:
        info["cpu_model"] = model
    return info


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def reset_peak_rss() -> bool:
    """Reset this process's peak resident set size (Linux: `5` into /proc/self/clear_refs)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def rss_mib(field: str = "VmRSS") -> float | None:
    """This process's resident set size (VmRSS) or its peak since the last reset (VmHWM), MiB."""
    for line in _read("/proc/self/status").splitlines():
        if line.startswith(field + ":"):
            return round(int(line.split()[1]) / 1024, 1)
    return None


def _timed(fn: Callable[[], object], inner: int) -> float:
    gc.collect()
    started = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - started) / inner


def summary(values: list[float], digits: int = 4) -> dict:
    return {
        "median": round(statistics.median(values), digits),
        "min": round(min(values), digits),
        "max": round(max(values), digits),
        "spread": round(max(values) - min(values), digits),
    }


def compare(arms: dict[str, Callable[[], object]], ratio: tuple[str, str], repeats: int = 5,
            min_s: float = 1.0, memory: bool = False) -> dict:
    """Seconds per call of every arm (median, min, max over rounds) and the ratio slow / fast per round, where
    ratio = (slow arm, fast arm) names. With memory=True, each arm's peak RSS during its warm-up call is recorded,
    with the RSS before it (the models already loaded) and the difference."""
    load_before = load_average()
    inner, peaks = {}, {}
    for name, fn in arms.items():
        if memory:
            before = rss_mib()
            reset_peak_rss()
        warm = _timed(fn, 1)
        if memory:
            peak = rss_mib("VmHWM")
            peaks[name] = {"before": before, "peak": peak, "added": round(peak - before, 1)}
        inner[name] = max(1, math.ceil(min_s / max(warm, 1e-6)))
    samples: dict[str, list[float]] = {name: [] for name in arms}
    names = list(arms)
    for round_ in range(repeats):
        for name in names if round_ % 2 == 0 else names[::-1]:
            samples[name].append(_timed(arms[name], inner[name]))
    slow, fast = ratio
    ratios = [s / f for s, f in zip(samples[slow], samples[fast], strict=True)]
    out = {
        "seconds_per_call": {name: summary(v, 5) for name, v in samples.items()},
        "calls_per_sample": inner,
        "repeats": repeats,
        "ratio": {"of": f"{slow} / {fast}", **summary(ratios, 3)},
        "samples": {name: [round(x, 6) for x in v] for name, v in samples.items()},
        "rounds": [round(x, 4) for x in ratios],
        "load_average_before": load_before,
        "load_average_after": load_average(),
    }
    if memory:
        out["peak_rss_mib"] = peaks
    return out


def pool(blocks: list[dict]) -> dict:
    """One comparison measured by `compare` in several processes, as one block: seconds per call and the ratio over
    every round of every process, each process's ratio median (`process_medians`) and its calls per sample; other
    keys (peak memory, a benchmark's own extras) as the first process measured them."""
    first = blocks[0]
    samples = {name: [x for b in blocks for x in b["samples"][name]] for name in first["samples"]}
    rounds = [x for b in blocks for x in b["rounds"]]
    return first | {
        "seconds_per_call": {name: summary(v, 5) for name, v in samples.items()},
        "calls_per_sample": [b["calls_per_sample"] for b in blocks],
        "repeats": sum(b["repeats"] for b in blocks),
        "processes": len(blocks),
        "ratio": {"of": first["ratio"]["of"], **summary(rounds, 3),
                  "process_medians": [b["ratio"]["median"] for b in blocks]},
        "samples": samples,
        "rounds": rounds,
        "load_average_before": [b["load_average_before"] for b in blocks],
        "load_average_after": [b["load_average_after"] for b in blocks],
    }


def pool_trees(trees: list[dict]) -> dict:
    """Merge result trees of the same benchmark from several processes: every `compare` block pooled, any other
    value taken from the first tree."""
    merged = {}
    for key, value in trees[0].items():
        if isinstance(value, dict) and "rounds" in value and "ratio" in value:
            merged[key] = pool([t[key] for t in trees])
        elif isinstance(value, dict):
            merged[key] = pool_trees([t[key] for t in trees])
        else:
            merged[key] = value
    return merged


def agree(first: dict, second: dict) -> bool:
    """Two measurements of one ratio agree when each one's median lies within the other's [min, max]."""
    return first["min"] <= second["median"] <= first["max"] and second["min"] <= first["median"] <= second["max"]


def ratios(results: dict, prefix: str = "") -> dict[str, dict]:
    """Every `ratio` block in a results tree, by its dotted path."""
    found = {}
    for key, value in results.items():
        if not isinstance(value, dict):
            continue
        path = f"{prefix}{key}"
        if key == "ratio" and "median" in value:
            found[prefix.rstrip(".")] = value
        else:
            found.update(ratios(value, path + "."))
    return found
