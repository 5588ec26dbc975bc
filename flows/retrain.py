"""The retraining flow: ingest new inputs -> pipeline -> register -> compare challenger and champion -> promote.

1. Optionally move new raw inputs from params `retrain.watch_dir` into `prepare_inputs.path` (a folder source),
   atomically, quarantining what may not be read (cyclepref.ingest).
2. Run the pipeline flow (DVC reruns what the new inputs or changed params invalidate).
3. Register the reward model that train_reward logged for `retrain.variant` (a new version, or the existing version
   when DVC skipped training), tagged with its lineage (DVC stage hash, git commit, data digest) and linked to the
   DPO adapters' logged models, and what the stages in `retrain.adapters` produced. `cyclepref register` (after
   `make run`) does this step alone, for the outputs dvc.lock records (`register_current`).
4. Score the challenger and the current `champion` with their MLflow pyfuncs on the frozen benchmark
   (`retrain.benchmark`), pair by pair. `decide` runs a paired test on those same pairs: it promotes only when the
   lower bound of the paired-bootstrap interval (level `retrain.confidence`, `retrain.bootstrap_samples` resamples of
   the pairs) of the challenger's accuracy gain over the champion is above 0 and the mean gain is more than
   `retrain.margin`, so a win inside the noise keeps the champion. Without a champion the challenger is promoted.
5. Only then move aliases: `challenger` -> the new version; on promotion `previous-champion` -> the old champion
   (for rollback) and `champion` -> the new version. The decision (accuracies, gain, its interval, number of pairs)
   is recorded as model version tags, parent run tags and a markdown artifact. Any failure before step 5 (a failed
   gate, a stage error) leaves aliases untouched.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from cyclepref.ingest import ingest_inputs
from cyclepref.stats import mcnemar_p, paired_bootstrap
from flows import lineage
from flows.pipeline import PipelineResult, pipeline

CHAMPION, CHALLENGER, PREVIOUS = "champion", "challenger", "previous-champion"
REWARD_STAGE = "train_reward"
ADAPTER_STAGES = ("dpo_vlm", "diffusion_dpo")
TIE_TOLERANCE = 1e-9
BOOTSTRAP_SEED = 0


@dataclass(frozen=True)
class Comparison:
    """Challenger minus champion on the same benchmark pairs: accuracies, the mean gain, its paired-bootstrap
    interval at `confidence` and the exact McNemar p-value."""

    challenger: float
    champion: float
    gain: float
    low: float
    high: float
    confidence: float
    pairs: int
    mcnemar_p: float

    def describe(self) -> str:
        return (
            f"challenger {self.challenger:.4f} vs champion {self.champion:.4f} on {self.pairs} pairs, gain "
            f"{self.gain:+.4f} ({100 * self.confidence:g}% interval [{self.low:+.4f}, {self.high:+.4f}])"
        )


def compare(challenger: np.ndarray, champion: np.ndarray, confidence: float, n_boot: int) -> Comparison:
    """Paired comparison of two per-pair outcome arrays aligned by pair (1 right, 0 wrong, 0.5 tie)."""
    gain, low, high = paired_bootstrap(challenger, champion, n_boot, BOOTSTRAP_SEED, confidence)
    return Comparison(
        float(np.mean(challenger)), float(np.mean(champion)), gain, low, high, confidence, len(challenger),
        mcnemar_p(challenger, champion),
    )


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    comparison: Comparison | None = None


def judge(c: Comparison, margin: float) -> Decision:
    """Promote only when the gain's interval lies above 0 and the mean gain is more than `margin`."""
    if abs(c.gain) <= TIE_TOLERANCE:
        return Decision(False, f"{c.describe()}: tie", c)
    if c.gain < 0:
        return Decision(False, f"{c.describe()}: challenger is worse", c)
    if c.low <= 0:
        return Decision(False, f"{c.describe()}: gain inside the noise (lower bound {c.low:+.4f} is not above 0)", c)
    if c.gain <= margin + TIE_TOLERANCE:
        return Decision(False, f"{c.describe()}: significant, but gain {c.gain:.4f} not more than margin {margin}", c)
    return Decision(True, f"{c.describe()}: challenger beats champion, lower bound above 0, gain > margin {margin}", c)


def decide(
    challenger: np.ndarray | None,
    champion: np.ndarray | None,
    margin: float,
    benchmark_present: bool,
    confidence: float = 0.95,
    n_boot: int = 10000,
) -> Decision:
    """Promote the challenger only when the benchmark exists and either there is no champion yet, or, on the same
    pairs, the paired-bootstrap interval of its accuracy gain lies above 0 and the mean gain is more than `margin`.
    Outcomes are per-pair arrays aligned by pair; gains within 1e-9 of 0 or of the margin count as ties."""
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    if not benchmark_present:
        return Decision(False, "benchmark missing (or without pairs of the variant's tasks): nothing was compared")
    if challenger is None:
        raise ValueError("the benchmark is present, so the challenger's per-pair outcomes are required")
    if champion is None:
        accuracy, n = float(np.mean(challenger)), len(challenger)
        return Decision(True, f"no champion yet: the challenger ({accuracy:.4f} on {n} pairs) becomes champion")
    return judge(compare(challenger, champion, confidence, n_boot), margin)


@dataclass
class RetrainResult:
    pipeline_run_id: str
    registered_model: str
    challenger_version: str
    champion_version: str | None
    challenger_accuracy: float | None
    champion_accuracy: float | None
    benchmark: str
    decision: Decision
    pairs: int = 0
    benchmark_digest: str = "absent"
    ingested: dict[str, int] = field(default_factory=dict)
    adapters: dict[str, list[str]] = field(default_factory=dict)


# ---------------------------------------------------------------- registry


def producer_run(result: PipelineResult, stage: str) -> str:
    outcome = result.outcome(stage)
    if outcome is None:
        raise LookupError(f"stage {stage} is not in this pipeline ({', '.join(result.stages)})")
    if outcome.producer_run_id is None:
        raise LookupError(
            f"stage {stage} was skipped and no MLflow run produced its outputs (lock hash {outcome.lock_hash}) in "
            "this tracking store; rerun it (`dvc repro --force --single-item "
            f"{stage}`, with CYCLEPREF_MLFLOW_URI pointing at this store) and run the flow again"
        )
    return outcome.producer_run_id


def logged_models(client, run_ids: list[str]) -> list:
    """The MLflow logged models whose source run is one of `run_ids`, oldest first."""
    exp = lineage.experiment_id(client)
    found = []
    for run_id in run_ids:
        found += client.search_logged_models([exp], filter_string=f"source_run_id = '{run_id}'")
    return sorted(found, key=lambda m: m.creation_timestamp)


def run_and_children(client, run_id: str) -> list[str]:
    return [run_id, *(r.info.run_id for r in lineage.children(client, run_id))]


def reward_model(client, train_run_id: str, variant: str):
    """The logged reward model of `variant` from a train_reward run (its per-variant child runs, or the run itself)."""
    kids = lineage.children(client, train_run_id)
    variants = [r.info.run_id for r in kids if r.data.tags.get("cyclepref.variant") == variant]
    models = logged_models(client, variants or [train_run_id])
    if not models:
        raise LookupError(f"train_reward run {train_run_id} logged no model for variant {variant}")
    return models[-1]


def registered_version(client, name: str, model):
    """The version of `name` that registers the logged model, or None."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        return None
    for version in client.search_model_versions(f"name = '{name}'"):
        if model.model_id in (getattr(version, "model_id", None), version.source.removeprefix("models:/")):
            return version
    return None


def register(client, name: str, model, tags: dict[str, str]):
    """The registered version of a logged model: the existing one when it was registered before, else a new one."""
    import mlflow

    existing = registered_version(client, name, model)
    if existing is not None:
        return existing
    mlflow.set_tracking_uri(client.tracking_uri)
    return mlflow.register_model(f"models:/{model.model_id}", name, tags=tags)


def reward_tags(client, train_run_id: str, model, variant: str, stage_hash: str | None) -> dict[str, str]:
    """Lineage of a registered reward model: its DVC stage hash, the git commit and data digest it was trained on."""
    train = client.get_run(train_run_id).data
    source = client.get_run(model.source_run_id).data if model.source_run_id else None
    trained_on = source.params.get("data_digest", "unknown") if source else "unknown"
    return {
        "cyclepref.variant": variant,
        "cyclepref.train_run_id": train_run_id,
        "cyclepref.dvc_stage_hash": stage_hash or "unknown",
        "git.commit": train.tags.get("git.commit", "unknown"),
        "git.dirty": train.tags.get("git.dirty", "unknown"),
        "cyclepref.data_digest": trained_on,
    }


def link_adapters(client, root: Path, name: str, version: str) -> dict[str, str]:
    """Link the logged adapter models of the DPO stages whose outputs dvc.lock records to a reward model version:
    a version tag `cyclepref.adapter.<stage>` = models:/<id> and, on each adapter, `cyclepref.reward_model`."""
    linked: dict[str, str] = {}
    for stage in ADAPTER_STAGES:
        digest = lineage.stage_lock_hash(root, stage)
        run_id = lineage.find_producer(client, stage, digest) if digest else None
        if run_id is None:
            continue
        for model in logged_models(client, run_and_children(client, run_id)):
            client.set_logged_model_tags(model.model_id, {"cyclepref.reward_model": f"{name}/{version}",
                                                          "cyclepref.dvc_stage_hash": digest})
            client.set_model_version_tag(name, version, f"cyclepref.adapter.{stage}", f"models:/{model.model_id}")
            linked[stage] = model.model_id
    return linked


@dataclass(frozen=True)
class Registration:
    name: str
    version: str
    created: bool
    train_run_id: str
    adapters: dict[str, str]


def register_current(client, root: Path, cfg) -> Registration:
    """Register the reward model (`cfg.variant`) of the outputs dvc.lock records now: the train_reward run found by
    the stage's lock hash. The same DVC outputs give the same version; no alias moves (that is the retrain flow's
    job). Raises LookupError when no run in this store produced those outputs."""
    digest = lineage.stage_lock_hash(root, REWARD_STAGE)
    if digest is None:
        raise LookupError(f"{root / 'dvc.lock'} has no {REWARD_STAGE} entry: run `make run` (or `dvc repro`) first")
    train_run = lineage.find_producer(client, REWARD_STAGE, digest)
    if train_run is None:
        raise LookupError(
            f"no MLflow run in this store produced the current {REWARD_STAGE} outputs (lock hash {digest[:12]}); "
            f"they came from DVC's cache or a remote. To register them here: `dvc repro --force {REWARD_STAGE}`"
        )
    model = reward_model(client, train_run, cfg.variant)
    created = registered_version(client, cfg.registered_model, model) is None
    tags = reward_tags(client, train_run, model, cfg.variant, digest)
    version = str(register(client, cfg.registered_model, model, tags).version)
    for key, value in tags.items():
        client.set_model_version_tag(cfg.registered_model, version, key, value)
    adapters = link_adapters(client, root, cfg.registered_model, version)
    return Registration(cfg.registered_model, version, created, train_run, adapters)


def alias_version(client, name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def apply_decision(client, name: str, challenger: str, champion: str | None, decision: Decision) -> None:
    """Move the aliases; the only place where the retraining flow writes aliases."""
    client.set_registered_model_alias(name, CHALLENGER, challenger)
    if decision.promote and challenger != champion:
        if champion is not None:
            client.set_registered_model_alias(name, PREVIOUS, champion)
        client.set_registered_model_alias(name, CHAMPION, challenger)


# ---------------------------------------------------------------- evaluation


def benchmark_tasks(variant: str) -> tuple[str, ...]:
    from cyclepref.reward import VARIANT_TASKS

    return VARIANT_TASKS[variant]


def benchmark_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else "absent"


def benchmark_pairs(path: Path, tasks: tuple[str, ...]) -> int:
    from cyclepref.reward.benchmarks import load_benchmark

    if not path.exists():
        return 0
    return sum(len(s) for t, s in load_benchmark(path).items() if t in tasks)


def benchmark_outcomes(model_uri: str, path: Path, tasks: tuple[str, ...], batch_size: int) -> np.ndarray:
    """Per-pair outcomes of a registered reward model (loaded through its MLflow pyfunc) on the benchmark's pairs of
    `tasks`: 1 when the chosen item gets the higher reward, 0 when lower, 0.5 on a tie; the benchmark's tasks in
    order, pairs in file order, so two models' arrays are aligned by pair."""
    from cyclepref.reward.benchmarks import load_benchmark
    from cyclepref.reward.evaluate import RewardScorer, pairset_outcomes
    from cyclepref.reward.pyfunc import load_reward_model

    scorer = RewardScorer("reward", load_reward_model(model_uri))
    parts = [pairset_outcomes(s, scorer, batch_size) for t, s in load_benchmark(path).items() if t in tasks]
    if not parts:
        raise ValueError(f"{path}: no pairs of tasks {tasks}")
    return np.concatenate(parts)


def score_versions(evaluate, cfg, path: Path, pairs: int, challenger: str, champion: str | None):
    """`evaluate`'s per-pair outcomes of the challenger version and of the champion (None without one), each checked
    to hold one value per benchmark pair of the variant's tasks."""
    tasks = benchmark_tasks(cfg.variant)

    def outcomes(model_uri: str) -> np.ndarray:
        out = np.asarray(evaluate(model_uri, path, tasks, cfg.batch_size), dtype=np.float64)
        if out.shape != (pairs,):
            raise ValueError(
                f"{model_uri}: expected {pairs} outcomes, one per pair of {tasks} in {path}, got shape {out.shape}"
            )
        return out

    name = cfg.registered_model
    challenger_out = outcomes(f"models:/{name}/{challenger}")
    return challenger_out, None if champion is None else outcomes(f"models:/{name}@{CHAMPION}")


def percent(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def gain_line(r: RetrainResult) -> str:
    c = r.decision.comparison
    if c is None:
        return f"Benchmark pairs scored: {r.pairs}; no paired comparison (no champion, or nothing compared)."
    return (
        f"Gain (challenger - champion) on the same {c.pairs} pairs: {100 * c.gain:+.2f} points, "
        f"{100 * c.confidence:g}% paired-bootstrap interval [{100 * c.low:+.2f}, {100 * c.high:+.2f}] points; "
        f"exact McNemar p = {c.mcnemar_p:.4g}."
    )


def decision_markdown(r: RetrainResult) -> str:
    verdict = "PROMOTED" if r.decision.promote else "kept the champion"
    return "\n".join([
        f"# Retraining decision: {verdict}",
        "",
        f"{r.decision.reason}",
        "",
        "| | version | benchmark accuracy |",
        "|---|---|---|",
        f"| challenger | {r.challenger_version} | {percent(r.challenger_accuracy)} |",
        f"| champion before | {r.champion_version or 'none'} | {percent(r.champion_accuracy)} |",
        "",
        gain_line(r),
        "",
        f"Registered model `{r.registered_model}`; benchmark `{r.benchmark}`; "
        f"pipeline MLflow run `{r.pipeline_run_id}`.",
        f"Aliases now: `{CHALLENGER}` -> {r.challenger_version}"
        + (f", `{CHAMPION}` -> {r.challenger_version}" if r.decision.promote else "")
        + (f", `{PREVIOUS}` -> {r.champion_version}" if r.decision.promote and r.champion_version else "")
        + ".",
        f"New inputs ingested: {r.ingested or 'none'}; adapters registered: {r.adapters or 'none'}.",
    ]) + "\n"


def mean_or_none(outcomes: np.ndarray | None) -> float | None:
    return None if outcomes is None else float(outcomes.mean())


def decision_tags(r: RetrainResult) -> dict[str, str]:
    """What a decision records on the challenger's model version (and, as retrain.*, on the parent run)."""
    c = r.decision.comparison

    def number(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.6f}"

    return {
        "cyclepref.decision": "promoted" if r.decision.promote else "kept",
        "cyclepref.decision_reason": r.decision.reason,
        "cyclepref.champion_before": r.champion_version or "none",
        "cyclepref.challenger_accuracy": number(r.challenger_accuracy),
        "cyclepref.champion_accuracy": number(r.champion_accuracy),
        "cyclepref.gain": number(getattr(c, "gain", None)),
        "cyclepref.gain_low": number(getattr(c, "low", None)),
        "cyclepref.gain_high": number(getattr(c, "high", None)),
        "cyclepref.gain_confidence": "n/a" if c is None else f"{c.confidence:g}",
        "cyclepref.mcnemar_p": "n/a" if c is None else f"{c.mcnemar_p:.6g}",
        "cyclepref.benchmark_pairs": str(r.pairs),
        "cyclepref.benchmark": r.benchmark,
        "cyclepref.benchmark_digest": r.benchmark_digest,
    }


def promote(
    client,
    result: PipelineResult,
    cfg,
    root: Path,
    evaluate=benchmark_outcomes,
) -> RetrainResult:
    """Register the pipeline's reward model, compare it with the champion and move the aliases (steps 3-5).
    `evaluate(model_uri, benchmark, tasks, batch_size) -> per-pair outcomes` scores one registered version."""
    name = cfg.registered_model
    train_run = producer_run(result, REWARD_STAGE)
    model = reward_model(client, train_run, cfg.variant)
    tags = {"cyclepref.pipeline_run_id": result.parent_run_id,
            **reward_tags(client, train_run, model, cfg.variant, result.outcome(REWARD_STAGE).lock_hash)}
    challenger = str(register(client, name, model, tags).version)
    link_adapters(client, root, name, challenger)
    champion = alias_version(client, name, CHAMPION)
    bench = (root / cfg.benchmark).resolve()
    pairs = benchmark_pairs(bench, benchmark_tasks(cfg.variant))
    challenger_out = champion_out = None
    if champion == challenger:
        decision = Decision(False, f"version {challenger} is already the champion (no new reward model)")
    else:
        if pairs:
            challenger_out, champion_out = score_versions(evaluate, cfg, bench, pairs, challenger, champion)
        decision = decide(challenger_out, champion_out, cfg.margin, pairs > 0, cfg.confidence, cfg.bootstrap_samples)
    out = RetrainResult(
        result.parent_run_id, name, challenger, champion, mean_or_none(challenger_out), mean_or_none(champion_out),
        cfg.benchmark, decision, pairs=0 if challenger_out is None else len(challenger_out),
        benchmark_digest=benchmark_digest(bench),
    )
    apply_decision(client, name, challenger, champion, decision)
    for key, value in decision_tags(out).items():
        client.set_model_version_tag(name, challenger, key, value)
        client.set_tag(result.parent_run_id, f"retrain.{key.removeprefix('cyclepref.')}", value)
    client.set_tag(result.parent_run_id, "retrain.challenger_version", challenger)
    return out


ADAPTER_ARTIFACT = "adapter"


def register_artifact_dir(client, name: str, run_id: str, artifact_path: str, tags: dict[str, str]):
    """The registered version of a run's artifact directory (e.g. a peft adapter): existing or new."""
    from mlflow.exceptions import MlflowException

    source = f"{client.get_run(run_id).info.artifact_uri}/{artifact_path}"
    try:
        client.create_registered_model(name)
    except MlflowException:
        for version in client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'"):
            if version.source == source:
                return version
    return client.create_model_version(name, source, run_id=run_id, tags=tags)


def register_adapters(client, result: PipelineResult, adapters: dict[str, str]) -> dict[str, list[str]]:
    """Register what the stages in `adapters` (stage -> registered model name) produced: their logged models, or
    else the `adapter` artifact directory of the stage's run. Stages not in this pipeline are left out."""
    out: dict[str, list[str]] = {}
    for stage, name in adapters.items():
        if result.outcome(stage) is None:
            continue
        run_id = producer_run(result, stage)
        tags = {"cyclepref.pipeline_run_id": result.parent_run_id, "cyclepref.stage": stage}
        models = logged_models(client, run_and_children(client, run_id))
        if models:
            out[stage] = [str(register(client, name, m, tags).version) for m in models]
        elif any(a.path == ADAPTER_ARTIFACT for a in client.list_artifacts(run_id)):
            out[stage] = [str(register_artifact_dir(client, name, run_id, ADAPTER_ARTIFACT, tags).version)]
        else:
            raise LookupError(f"stage {stage} (run {run_id}) logged no model and no '{ADAPTER_ARTIFACT}' artifact")
    return out


# ---------------------------------------------------------------- flow


@task(name="ingest-inputs", cache_policy=NO_CACHE, persist_result=False)
def ingest_task(watch_dir: str, inputs_dir: str, texts_file: str | None) -> dict[str, int]:
    return ingest_inputs(Path(watch_dir), Path(inputs_dir), texts_file)


@task(name="register-and-promote", cache_policy=NO_CACHE, persist_result=False)
def promote_task(result: PipelineResult, root: str) -> RetrainResult:
    from cyclepref.config import load_params

    path = Path(root)
    cfg = load_params(path / "params.yaml").retrain
    client = lineage.client(path)
    adapters = register_adapters(client, result, cfg.adapters)
    out = promote(client, result, cfg, path)
    out.adapters = adapters
    return out


@flow(name="cyclepref-retrain", persist_result=False)
@lineage.in_project
def retrain(
    root: str = ".",
    ingest: bool = True,
    trigger: str = "manual",
    stage_timeout_s: float | None = None,
    stage_retries: int | None = None,
    retry_delay_s: float | None = None,
) -> RetrainResult:
    """Ingest -> pipeline -> register -> champion/challenger on the frozen benchmark -> aliases."""
    from prefect.artifacts import create_markdown_artifact

    from cyclepref.config import load_params, require

    path = Path(root).resolve()
    params = load_params(path / "params.yaml")
    cfg = require(params.retrain, "retrain")
    ingested: dict[str, int] = {}
    if ingest and cfg.watch_dir:
        inputs = params.prepare_inputs
        if inputs.source != "folder":
            raise ValueError(f"retrain.watch_dir needs prepare_inputs.source 'folder', got {inputs.source!r}")
        ingested = ingest_task(str(path / cfg.watch_dir), str(path / inputs.path), inputs.texts_file)
        get_run_logger().info("ingested %s", ingested)
    result = pipeline(
        root=str(path), trigger=trigger, stage_timeout_s=stage_timeout_s, stage_retries=stage_retries,
        retry_delay_s=retry_delay_s,
    )
    out = promote_task(result, str(path))
    out.ingested = ingested
    text = decision_markdown(out)
    create_markdown_artifact(text, key="retrain-decision", description="Champion / challenger decision")
    lineage.client(path).log_text(result.parent_run_id, text, "retrain_decision.md")
    return out
