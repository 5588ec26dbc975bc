"""`make bench`: every CPU benchmark, written to bench/results.json and bench/RESULTS.md.

Each comparison benchmark (cycle, reward, pairs) runs in `--processes` fresh interpreters, in passes spread over the
run (cycle, reward, pairs, cycle, reward, pairs, ...), and its rounds are pooled (harness.pool): one process alone
agreed with itself but not with the next run. Torch runs one thread (CYCLEPREF_BENCH_THREADS, default 1): on a
shared 2-core machine two OpenMP threads that lose their core to another process stall each other, and that, not
batching, made earlier single-sample ratios swing by x3. The ratios of the previous results.json are compared with
this run's: two runs agree on a ratio when each run's median lies within the other's [min, max].
    python bench/run_all.py [--processes 5] [--repeats 3] [--out bench/results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

THREADS = os.environ.get("CYCLEPREF_BENCH_THREADS", "1")
for _name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_name] = THREADS
for _name, _value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                      "DVC_NO_ANALYTICS": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true",
                      "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "CYCLEPREF_DEVICE": "cpu",
                      "CYCLEPREF_PROGRESS": "0"}.items():
    os.environ.setdefault(_name, _value)

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
import harness  # noqa: E402

POOLED = ("cycle", "reward", "pairs")


def worker(name: str, repeats: int, out: Path) -> None:
    """One comparison benchmark in this process, its result tree written to `out`."""
    import importlib

    import torch

    torch.set_num_threads(int(THREADS))
    result = importlib.import_module(f"bench_{name}").run(repeats=repeats)
    out.write_text(json.dumps(result) + "\n")


def pooled_benchmarks(processes: int, repeats: int) -> dict:
    """Every comparison benchmark in `processes` fresh interpreters, passes interleaved in time, rounds pooled."""
    trees: dict[str, list[dict]] = {name: [] for name in POOLED}
    with tempfile.TemporaryDirectory(prefix="cyclepref-bench-") as tmp:
        for index in range(processes):
            for name in POOLED:
                out = Path(tmp) / f"{name}-{index}.json"
                print(f"--- {name}, process {index + 1} of {processes}", flush=True)
                subprocess.run([sys.executable, __file__, "--worker", name, "--repeats", str(repeats),
                                "--out", str(out)], check=True)
                trees[name].append(json.loads(out.read_text()))
    return {name: harness.pool_trees(found) for name, found in trees.items()}


def compare_with(previous: dict | None, current: dict) -> dict:
    """ratio path -> this run's and the previous run's median and range, and whether they agree."""
    if not previous:
        return {}
    before, now = harness.ratios(previous.get("benchmarks", {})), harness.ratios(current["benchmarks"])
    return {
        path: {"median": r["median"], "range": [r["min"], r["max"]], "previous_median": before[path]["median"],
               "previous_range": [before[path]["min"], before[path]["max"]], "agree": harness.agree(r, before[path])}
        for path, r in now.items()
        if path in before
    }


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        "# Benchmark results (`make bench`)",
        "",
        f"Run {report['started']} on {m.get('cpu_model', m['machine'])}, {m['cpus']} CPUs, torch {m.get('torch')} "
        f"with {m.get('torch_threads')} thread(s); load average (1, 5, 15 min) at start {m['load_average_1_5_15']}, "
        f"at end {report['load_average_end']}; {report['seconds']:.0f} s in all.",
        "",
        "Each ratio: the two arms run side by side in one process after a warm-up, in alternating order, each sample "
        "at least 1 s (`calls` per sample); ratio per round, median [min, max] over the rounds. Written by "
        "`bench/run_all.py`; the JSON beside this file has every number.",
        f"Each benchmark ran in {report['processes']} fresh processes at different times of the run, "
        f"{report['repeats']} rounds each; median, min and max are over all their rounds, and the medians of the "
        "processes are listed beside them.",
        "",
        "| benchmark | ratio | median | min | max | process medians | s/call (fast arm, median) | "
        "calls per sample (slow / fast, first process) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for path, block in _ratio_blocks(report["benchmarks"]):
        r = block["ratio"]
        fast = r["of"].split(" / ")[1]
        calls = block["calls_per_sample"][0]
        lines.append(
            f"| {path} | {r['of']} | **x{r['median']}** | {r['min']} | {r['max']} | "
            f"{', '.join(str(m) for m in r['process_medians'])} | {block['seconds_per_call'][fast]['median']} | "
            f"{' / '.join(str(calls[a]) for a in r['of'].split(' / '))} |"
        )
    lines += ["", "## Peak memory (resident set, MiB) of each cycle stage's warm-up call", "",
              "| stage | arm | RSS before (models loaded) | peak | added |", "|---|---|---|---|---|"]
    for stage, block in report["benchmarks"]["cycle"]["stages"].items():
        for arm, mem in block.get("peak_rss_mib", {}).items():
            lines.append(f"| {stage} | {arm} | {mem['before']} | {mem['peak']} | {mem['added']} |")
    lines += _overhead_lines(report["benchmarks"]["overhead"])
    agreement = report.get("agreement_with_previous_run")
    if agreement:
        agreed = sum(a["agree"] for a in agreement.values())
        lines += ["", f"## Agreement with the previous run ({report.get('previous_started')})", "",
                  f"{agreed} of {len(agreement)} ratios agree (each median within the other run's [min, max]).", "",
                  "| benchmark | this run | range | previous | previous range | agree |", "|---|---|---|---|---|---|"]
        for path, a in agreement.items():
            lines.append(f"| {path} | x{a['median']} | {a['range']} | x{a['previous_median']} | "
                         f"{a['previous_range']} | {'yes' if a['agree'] else '**no**'} |")
    return "\n".join(lines) + "\n"


def _ratio_blocks(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        if isinstance(value, dict):
            if "ratio" in value and "seconds_per_call" in value:
                yield f"{prefix}{key}", value
            else:
                yield from _ratio_blocks(value, f"{prefix}{key}.")


def _overhead_lines(o: dict) -> list[str]:
    toy, first = o["toy_pipeline"], o["toy_pipeline"]["first_run"]
    lines = ["", "## Orchestration and tracking overhead", "",
             "Process start (median of repeats, s): " + ", ".join(f"{k} {v['median']}"
                                                                  for k, v in o["process_start_s"].items()) + ".",
             "Tiny model loads after imports (s): " + ", ".join(f"{k} {v['median']}"
                                                               for k, v in o["model_load_s"].items()) + ".",
             "",
             f"Toy project of {toy['stages']} real stages ({toy['project']}): `cyclepref repro` took "
             f"{first['cyclepref_repro_wall_s']} s against {round(sum(first['stages_own_seconds'].values()), 2)} s "
             f"of the stages' own work: {first['overhead_s']} s overhead, {first['overhead_per_stage_s']} s per "
             f"stage (process start, imports, params, DVC hashing and dvc.lock, MLflow lineage).",
             "",
             "| stage | process wall s (median) | own s | peak RSS MiB (wait4) | peak RSS MiB (logged to MLflow) |",
             "|---|---|---|---|---|"]
    for stage, p in toy["stage_processes"].items():
        lines.append(f"| {stage} | {p['process_seconds']['median']} | {p['own_seconds']} | {p['peak_rss_mib']} | "
                     f"{p.get('peak_rss_mib_logged')} |")
    noop = toy["prefect_pipeline_noop"]
    est = o["default_pipeline_estimate"]
    lines += ["", f"`dvc repro` with nothing to do: {toy['dvc_repro_noop_s']['median']} s (median; "
                  f"[{toy['dvc_repro_noop_s']['min']}, {toy['dvc_repro_noop_s']['max']}]). Prefect pipeline flow "
                  f"with nothing to do: {noop['seconds']['median']} s ([{noop['seconds']['min']}, "
                  f"{noop['seconds']['max']}]; its temporary server started in {noop['server_start_s']} s).",
              "",
              f"Default pipeline ({est['stages']} stages): about {est['overhead_s']} s of orchestration and tracking "
              f"overhead ({est['how']})."]
    wide = o.get("noop_pipeline")
    if wide:
        lines += ["", f"Nothing to do on {wide['stages']} stages: `cyclepref pipeline` "
                      f"{wide['cyclepref_pipeline_noop_s']['median']} s against `dvc repro` "
                      f"{wide['dvc_repro_noop_s']['median']} s (medians): x{wide['ratio']}, target <= "
                      f"x{wide['target_ratio']}: {'met' if wide['within_target'] else 'MISSED'}."]
        if "cyclepref_pipeline_record_s" in wide:
            r = wide["cyclepref_pipeline_record_s"]
            lines[-1] += (f" With `--record` (a Prefect flow run, an MLflow child run per stage): {r['median']} s "
                          f"([{r['min']}, {r['max']}]).")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3, help="rounds per process")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results.json")
    parser.add_argument("--worker", choices=POOLED, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.repeats, args.out)
    import torch

    torch.set_num_threads(int(THREADS))
    import bench_overhead

    previous = json.loads(args.out.read_text()) if args.out.exists() else None
    started = time.perf_counter()
    report = {"started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "machine": harness.machine(),
              "processes": args.processes, "repeats": args.repeats}
    report["benchmarks"] = pooled_benchmarks(args.processes, args.repeats)
    report["benchmarks"]["overhead"] = bench_overhead.run(repeats=3)
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["load_average_end"] = harness.load_average()
    report["agreement_with_previous_run"] = compare_with(previous, report)
    report["previous_started"] = previous.get("started") if previous else None
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    args.out.with_name("RESULTS.md").write_text(markdown(report))
    print(f"wrote {args.out} and {args.out.with_name('RESULTS.md')} in {report['seconds']:.0f} s")
    disagree = [p for p, a in report["agreement_with_previous_run"].items() if not a["agree"]]
    if disagree:
        print(f"disagree with the previous run: {disagree}")


if __name__ == "__main__":
    main()
