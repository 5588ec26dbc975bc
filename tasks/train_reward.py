"""Stage train_reward: Bradley-Terry training of one reward model per variant (i2t | t2i | combo).

Reads the pairs through cyclepref.reward.data (pipeline tables, whose gates cyclepref.stage checks, or the exported
datasets). Outputs: data/reward/<variant>/model/ (best by validation loss), reports/reward/train.json,
reports/metrics/train_reward_<variant>.json (DVC metric).
Resume checkpoints live in data/work/reward/<variant>/ (not a DVC output), so a rerun after an interruption
continues where it stopped. One MLflow child run per variant: metrics every step, the model as a pyfunc, the
training config and the data digest. Data-parallel training: CYCLEPREF_TRAIN_PROCESSES=N (cyclepref.runtime) makes
this command relaunch itself under torchrun with N processes and wait for them; rank 0 writes the outputs and
tracks, so the stage stays one DVC stage with locked outputs.
"""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

from cyclepref import metrics, stage, store
from cyclepref.config import Params, load_params, require
from cyclepref.reward import REPORTS, WORK_DIR, model_dir


def _log_to_mlflow(metrics: dict[str, float], step: int) -> None:
    import mlflow

    mlflow.log_metrics(metrics, step=step)


def _input_example(source, tasks):
    import io

    import pandas as pd

    task = tasks[0]
    e = source.pairs(task, "valid").example(0)
    image, text = (e.image, e.chosen) if task == "i2t" else (e.chosen, e.prompt)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return pd.DataFrame({"image": [buf.getvalue()], "text": [text]})


def run(params: Params, root: Path) -> dict:
    import mlflow
    from accelerate import Accelerator

    from cyclepref import runtime
    from cyclepref.reward import VARIANT_TASKS
    from cyclepref.reward.data import open_source
    from cyclepref.reward.pyfunc import log_reward_model
    from cyclepref.reward.train import fingerprint_body, train_variant

    cfg = require(params.train_reward, "train_reward")
    source = open_source(cfg.data, root)
    accelerator = Accelerator(cpu=runtime.device() == "cpu")
    tracked = accelerator.is_main_process and mlflow.active_run() is not None
    report: dict[str, dict] = {}
    for variant in cfg.variants:
        tags = {"cyclepref.stage": "train_reward", "cyclepref.variant": variant,
                "cyclepref.profile": params.profile}
        ctx = mlflow.start_run(run_name=f"train_reward/{variant}", nested=True, tags=tags) if tracked else None
        with ctx if ctx is not None else nullcontext():
            result = train_variant(
                variant, cfg, source, root / model_dir(variant), root / WORK_DIR / variant,
                resume="auto", log_metrics=_log_to_mlflow if tracked else None, accelerator=accelerator,
            )
            best = next(h for h in result.history if h["step"] == result.best_step)
            report[variant] = {
                "best_val_loss": result.best_loss,
                "best_step": result.best_step,
                "steps": result.steps,
                "stopped_early": result.stopped_early,
                **{k: v for k, v in best.items() if k.startswith("val_acc_") or k.startswith("val_loss_")},
            }
            if tracked:
                mlflow.log_params({"data_digest": result.data_digest, "fingerprint": result.fingerprint,
                                   "processes": accelerator.num_processes})
                mlflow.log_dict(fingerprint_body(variant, cfg), "train_config.json")
                mlflow.log_dict({"history": result.history, "resumed_from": result.resumed_from}, "history.json")
                mlflow.log_metrics({"best_val_loss": result.best_loss, "best_step": result.best_step})
                log_reward_model(result.best_dir, input_example=_input_example(source, VARIANT_TASKS[variant]))
    if accelerator.is_main_process:
        store.write_json(report, root / REPORTS["train"])
        metrics.write_parts(root, "train_reward", metrics.train_reward(report), metrics.VARIANTS)
    summary: dict = {"variants": len(cfg.variants)}
    for variant, r in report.items():
        summary[f"{variant}_best_val_loss"] = round(r["best_val_loss"], 6)
    return summary


def launch_command(processes: int) -> list[str]:
    """torchrun running this stage in `processes` processes on this machine (a free rendezvous port)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
            "-m", "tasks.train_reward"]


def relaunch(processes: int) -> int:
    """Run the stage under torchrun and return its exit code (the first failing rank's)."""
    from cyclepref import runtime

    device = runtime.device()
    if device.startswith("cuda"):
        import torch

        if processes > torch.cuda.device_count():
            print(f"train_reward: CYCLEPREF_TRAIN_PROCESSES={processes} but {torch.cuda.device_count()} GPU(s) "
                  "are visible; use at most one process per GPU", file=sys.stderr)
            return 2
    env = os.environ | {"CYCLEPREF_DEVICE": device}
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.run(launch_command(processes), env=env, check=False).returncode


def main() -> None:
    from cyclepref import runtime

    processes = runtime.train_processes()
    if processes > 1 and "LOCAL_RANK" not in os.environ:
        raise SystemExit(relaunch(processes))
    if int(os.environ.get("RANK", "0")) != 0:
        run(load_params(Path.cwd() / "params.yaml"), Path.cwd())
        return
    stage.main("train_reward", run)


if __name__ == "__main__":
    main()
