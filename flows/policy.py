"""The policies in the retraining loop: each round trains the champion captioner (dpo_vlm) and the champion
text-to-image model (diffusion_dpo) further on the round's pairs, registers the results and promotes them only when
they beat their champion on the frozen ground-truth benchmark (params `retrain.policies`, `retrain.policy_benchmark`).

1. At the start of the round (flows.retrain.run_round) read alias `champion` of every policy's registered model, as
   a person may have set it in the MLflow UI, and materialise it: the version's adapter files, plus champion.json
   naming it, into the stage's `init_adapter` folder (e.g. data/champions/captioner/adapter), `dvc add`ed so that
   dvc.lock records which champion the stage started from and `dvc repro` reproduces it. No champion: the folder is
   removed, and the stage trains from the base model ("the first round's champion is the base model").
2. After the pipeline register the adapter the stage logged as a version of the policy's registered model (the
   existing version when DVC skipped the stage), tagged with the round, the stage, its base model and the champion it
   started from.
3. Score the challenger and the champion read at step 1 (the base model without one) on the benchmark
   (cyclepref.downstream.policy_bench: per-scene attribute F1; one model load, every adapter applied in turn) and
   decide with flows.retrain.decide, the reward model's paired test (margin, confidence, bootstrap samples of
   `retrain`); move aliases with flows.retrain.apply_decision (never over an alias a person moved during the round);
   record the decision append-only (version tags, `retrain.<policy>.*` tags on the round's run).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from cyclepref.atomic import atomic_dir
from cyclepref.downstream import CHAMPION_FILE
from flows import lineage
from flows.pipeline import PipelineResult
from flows.retrain import (
    CHAMPION,
    Decision,
    RetrainResult,
    alias_version,
    apply_decision,
    benchmark_digest,
    compare,
    decide,
    logged_models,
    mean_or_none,
    producer_run,
    record_decision,
    register,
    run_and_children,
)

METRIC = "F1"

# evaluate(stage, base model spec, adapter folders (None = the base model), benchmark path) -> per-input outcomes
Evaluate = Callable[[str, object, list, Path], list]


def init_folder(params, stage: str) -> str:
    """The folder the stage continues training from (its `init_adapter`)."""
    return getattr(params, stage).init_adapter


def base_spec(params, stage: str):
    section = getattr(params, stage)
    return section.captioner if stage == "dpo_vlm" else section.model


def read_champions(client, cfg) -> dict[str, str | None]:
    """Policy name -> the version alias `champion` names now (None: none yet, the base model)."""
    return {name: alias_version(client, p.registered_model, CHAMPION) for name, p in cfg.policies.items()}


def download_version(client, name: str, version: str, dest: Path) -> Path:
    """The files of a registered version (a logged adapter model or an artifact directory) into `dest`."""
    import mlflow

    mlflow.set_tracking_uri(client.tracking_uri)
    source = client.get_model_version(name, version).source
    uri = source if source.startswith("models:/") else f"models:/{name}/{version}"
    mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dest))
    return dest


def fill_champion(client, folder: Path, name: str, version: str | None) -> bool:
    """Make `folder` hold the champion `version` of `name` (removed when None); True when it changed."""
    dvc_file = folder.with_name(folder.name + ".dvc")
    if version is None:
        changed = folder.exists() or dvc_file.exists()
        shutil.rmtree(folder, ignore_errors=True)
        dvc_file.unlink(missing_ok=True)
        return changed
    want = {"registered_model": name, "version": version}
    marker = folder / CHAMPION_FILE
    if marker.exists() and json.loads(marker.read_text()) == want:
        return False
    with atomic_dir(folder) as tmp:
        download_version(client, name, version, tmp)
        (tmp / CHAMPION_FILE).write_text(json.dumps(want, sort_keys=True) + "\n")
    return True


def materialise_champions(client, root: Path, params, champions: dict[str, str | None]) -> dict[str, str]:
    """Step 1: every policy's champion into its stage's init_adapter folder, `dvc add`ed; policy -> what the stage
    starts from ("<model> version <n>" or "base")."""
    cfg, started, tracked = params.retrain, {}, []
    for name, policy in cfg.policies.items():
        folder = root / init_folder(params, policy.stage)
        version = champions.get(name)
        fill_champion(client, folder, policy.registered_model, version)
        started[name] = "base" if version is None else f"{policy.registered_model} version {version}"
        if version is not None:
            tracked.append(str(folder.relative_to(root)))
    if tracked and (root / ".dvc").is_dir():
        subprocess.run([sys.executable, "-m", "dvc", "--wait-for-lock", "add", "-q", *tracked], cwd=root, check=True,
                       capture_output=True, text=True)
    return started


def adapter_model(client, run_id: str, stage: str):
    """The adapter the stage's run logged (tasks.<stage>: logged model `<stage>_adapter`)."""
    models = [m for m in logged_models(client, run_and_children(client, run_id)) if m.name == f"{stage}_adapter"]
    if not models:
        raise LookupError(f"stage {stage} (run {run_id}) logged no model '{stage}_adapter'")
    return models[-1]


def register_policy(client, result: PipelineResult, params, name: str, started: str) -> str:
    """Step 2: the stage's adapter as a version of the policy's registered model (existing when already there)."""
    policy = params.retrain.policies[name]
    run_id = producer_run(result, policy.stage)
    base = base_spec(params, policy.stage)
    tags = {"cyclepref.policy": name, "cyclepref.stage": policy.stage,
            "cyclepref.pipeline_run_id": result.parent_run_id,
            "cyclepref.base_model": f"{base.name} ({base.path})", "cyclepref.started_from": started,
            "cyclepref.dvc_stage_hash": result.outcome(policy.stage).lock_hash or "unknown"}
    return str(register(client, policy.registered_model, adapter_model(client, run_id, policy.stage), tags).version)


def score(client, policy, spec, versions: list[str | None], bench: Path, evaluate: Evaluate) -> list[np.ndarray]:
    """Per-input outcomes of each version (None = the base model), their adapters downloaded once each."""
    with tempfile.TemporaryDirectory(prefix="cyclepref-policy-") as tmp:
        folders = [None if v is None else download_version(client, policy.registered_model, v, Path(tmp) / v)
                   for v in versions]
        outs = [np.asarray(o, dtype=np.float64) for o in evaluate(policy.stage, spec, folders, bench)]
    if len({o.shape for o in outs}) != 1 or outs[0].ndim != 1:
        raise ValueError(f"{bench}: outcomes of {versions} are not aligned per input: {[o.shape for o in outs]}")
    return outs


def challenge_policy(client, params, root: Path, name: str, challenger: str, champion: str | None, round_id: str,
                     evaluate: Evaluate) -> RetrainResult:
    """Step 3: challenger against the champion (the base model without one) on the benchmark; decide; aliases."""
    cfg, policy = params.retrain, params.retrain.policies[name]
    bench = root / cfg.policy_benchmark
    challenger_out = champion_out = base_out = None
    if challenger == champion:
        decision = Decision(False, f"version {challenger} is already the champion (the stage did not rerun)")
    elif not bench.exists():
        decision = decide(None, None, cfg.margin, False)
    else:
        versions = [champion, challenger] + ([None] if champion is not None else [])
        outs = score(client, policy, base_spec(params, policy.stage), versions, bench, evaluate)
        champion_out, challenger_out = outs[:2]
        base_out = outs[2] if champion is not None else champion_out
        decision = decide(challenger_out, champion_out, cfg.margin, True, cfg.confidence, cfg.bootstrap_samples)
        if champion is None:
            decision = Decision(decision.promote, f"against the base model: {decision.reason}", decision.comparison)
    decision = apply_decision(client, policy.registered_model, challenger, champion, decision)
    kept = challenger_out if decision.promote else champion_out
    return RetrainResult(
        round_id, policy.registered_model, challenger, champion, mean_or_none(challenger_out),
        mean_or_none(champion_out), cfg.policy_benchmark, decision,
        pairs=0 if challenger_out is None else len(challenger_out), benchmark_digest=benchmark_digest(bench),
        metric=METRIC, versus_base=None if kept is None or kept is base_out else compare(
            kept, base_out, cfg.confidence, cfg.bootstrap_samples),
    )


def benchmark_f1(root: Path, batch_size: int) -> Evaluate:
    """The real evaluator: per-scene ground-truth F1 of the base model and each adapter (one model load)."""

    def evaluate(stage: str, spec, adapters: list, bench: Path) -> list:
        from cyclepref import runtime
        from cyclepref.downstream.policy_bench import load_policy_benchmark, policy_outcomes
        from cyclepref.models import local_spec

        return policy_outcomes(stage, local_spec(root, spec), adapters, load_policy_benchmark(bench),
                               runtime.device(), batch_size)

    return evaluate


def promote_policies(client, result: PipelineResult, params, root: Path, champions: dict[str, str | None],
                     started: dict[str, str], evaluate: Evaluate | None = None) -> dict[str, RetrainResult]:
    """Steps 2-3 for every policy whose stage is in this pipeline; policy -> its round result."""
    evaluate = evaluate or benchmark_f1(root, params.retrain.batch_size)
    out = {}
    for name, policy in params.retrain.policies.items():
        if result.outcome(policy.stage) is None:
            continue
        challenger = register_policy(client, result, params, name, started.get(name, "base"))
        out[name] = challenge_policy(client, params, root, name, challenger, champions.get(name),
                                     result.parent_run_id, evaluate)
        record_decision(client, out[name], result.parent_run_id, {}, prefix=f"retrain.{name}.")
    return out


def decision_table(reward: RetrainResult | None, policies: dict[str, RetrainResult]) -> str:
    """The round's decisions: the reward model and every policy, one row each."""

    def pct(x) -> str:
        return "n/a" if x is None else f"{100 * x:.2f}%"

    lines = ["| model | registered model | challenger | champion before | metric | challenger | champion | "
             "gain [interval] (points) | promoted | champion after vs base (points) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    rows = ([("reward", reward)] if reward else []) + list(policies.items())
    for label, r in rows:
        c = r.decision.comparison
        gain = "n/a" if c is None else f"{100 * c.gain:+.2f} [{100 * c.low:+.2f}, {100 * c.high:+.2f}]"
        before = r.champion_version or ("base" if r.metric == METRIC else "none")
        v = r.versus_base
        base = "n/a" if v is None else f"{100 * v.gain:+.2f} [{100 * v.low:+.2f}, {100 * v.high:+.2f}]"
        lines.append(f"| {label} | {r.registered_model} | {r.challenger_version} | {before} | {r.metric} | "
                     f"{pct(r.challenger_accuracy)} | {pct(r.champion_accuracy)} | {gain} | "
                     f"{'yes' if r.decision.promote else 'no'} | {base} |")
    return "\n".join(lines) + "\n"
