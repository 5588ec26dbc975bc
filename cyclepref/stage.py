"""The common frame of a stage entry point: load params, open the MLflow run, run, log and print the summary."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from cyclepref.config import Params, ParamsError, load_params
from cyclepref.models import ModelLoadError
from cyclepref.profiles import require_pinned, require_pinned_datasets, require_sections, stage_deps, stage_sections

DVC_FILE = "dvc.yaml"
PROJECT_DVC_FILE = Path(__file__).resolve().parents[1] / DVC_FILE

log = logging.getLogger("cyclepref")


def main(stage: str, run: Callable[[Params, Path], dict], params_path: str = "params.yaml") -> dict:
    """Run `run(params, root)` for one stage inside its MLflow run; exit 2 with one line on a params error, including
    a section that dvc.yaml lists for this stage but the profile lacks, a hub model of its sections without a commit
    hash, a published dataset of the profile without its pin, or a model that fails to load; exit 1 naming the gate
    unless the gate of every gated table the stage reads (its deps in dvc.yaml) passed on that table as it is now."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    log.setLevel(os.environ.get("CYCLEPREF_LOG_LEVEL", "INFO"))
    root = Path.cwd()
    try:
        params = load_params(root / params_path)
        if (root / DVC_FILE).exists():
            require_sections(params, root / DVC_FILE, params_path, [stage])
            require_pinned(params, params_path, root, stage_sections(root / DVC_FILE).get(stage, set()))
        require_pinned_datasets(params, params_path)
    except ParamsError as err:
        print(f"{stage}: {' '.join(str(err).split())}", file=sys.stderr)
        raise SystemExit(2) from None
    require_gates(stage, root, params)
    from cyclepref.tracking import stage_run

    started = time.perf_counter()
    try:
        with stage_run(stage, getattr(params, stage, None), params.profile) as mlrun:
            summary = run(params, root)
            summary["seconds"] = round(time.perf_counter() - started, 2)
            summary.update(peak_memory())
            import mlflow

            mlflow.log_metrics({k: float(v) for k, v in summary.items() if isinstance(v, int | float)})
            summary["mlflow_run_id"] = mlrun.info.run_id
    except (ParamsError, ModelLoadError) as err:
        print(f"{stage}: {' '.join(str(err).split())}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"{stage}: " + ", ".join(f"{k}={v}" for k, v in summary.items() if k != "mlflow_run_id"))
    return summary


def require_gates(stage: str, root: Path, params: Params) -> None:
    """Exit 1 naming the gate unless every gated table among the stage's deps passed its gate as it is now. The deps
    come from root/dvc.yaml; a root without one (a stage run outside a DVC project) is held to the project's own
    dvc.yaml for the tables that exist under it."""
    from cyclepref.gatecheck import GateFailed, require_read

    dvc_file = root / DVC_FILE if (root / DVC_FILE).exists() else PROJECT_DVC_FILE
    if not dvc_file.exists():
        return
    try:
        require_read(stage, root, stage_deps(dvc_file, params).get(stage, []), only_present=dvc_file != root / DVC_FILE)
    except GateFailed as err:
        raise SystemExit(f"{stage}: {err}") from None


def peak_memory() -> dict[str, float]:
    """This process's peak resident set (MiB; VmHWM, which starts afresh at exec, else ru_maxrss) and, when the
    stage used CUDA, the peak GPU memory torch allocated."""
    out: dict[str, float] = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                out["peak_rss_mib"] = round(int(line.split()[1]) / 1024, 1)
    except OSError:
        import resource

        scale = 1 if sys.platform == "darwin" else 1024
        out["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20, 1)
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        out["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out
