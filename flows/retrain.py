"""The retraining flow, one round: champion -> ingest -> pipeline -> register -> compare -> promote -> record.

0. Take the repository's round lock (flows.pool: a second trigger while a round runs fails at once) and read alias
   `champion` of the reward model and of every policy (`retrain.policies`): what the round compares against and
   what the policies train from, whatever a person set in the UI. flows.policy materialises each policy champion
   into its stage's `init_adapter` folder (`dvc add`ed; none: the base model).
1. Optionally move new raw inputs from params `retrain.watch_dir` into a new batch of the pool
   (`prepare_inputs.pool`, a folder no stage writes) as one journaled transaction (cyclepref.ingest), and `dvc add`
   the batch (flows.pool), so no checkout deletes it; prepare_inputs reads every batch beside its `path`.
2. Run the pipeline flow (DVC reruns what the new inputs or changed params invalidate).
3. Register the reward model that train_reward logged for `retrain.variant` (a new version, or the existing version
   when DVC skipped training), tagged with its lineage (DVC stage hash, git commit, data digest) and linked to the
   DPO adapters' logged models, and what the stages in `retrain.adapters` produced. `cyclepref register` (after
   `make run`) does this step and the decision (steps 4-5) for the outputs dvc.lock records (`register_and_decide`).
4. Score the challenger and the champion with their MLflow pyfuncs on the frozen benchmark (`retrain.benchmark`),
   pair by pair. `decide` runs a paired test on those same pairs: it promotes only when the lower bound of the
   paired-bootstrap interval (level `retrain.confidence`, `retrain.bootstrap_samples` resamples of the pairs) of the
   challenger's accuracy gain over the champion is above 0 and the mean gain is more than `retrain.margin`, so a win
   inside the noise keeps the champion. Without a champion the challenger must clear the floor: the same interval
   above 0 against random (0.5 a pair) and against the reward backbone's zero-shot ITC and ITM outcomes
   (`zero_shot_floor`).
5. Only then move aliases: `challenger` -> the new version; on promotion `previous-champion` -> the old champion
   (for rollback) and `champion` -> the new version, unless a person moved `champion` during the round. Any failure
   before step 5 (a failed gate, a stage error, a kill) leaves aliases untouched.
5b. The policies (flows.policy): register the adapters dpo_vlm / diffusion_dpo trained from their champions, score
   each with its champion (the base model before the first promotion) on `retrain.policy_benchmark` (per-scene
   ground-truth F1), the same `decide` and alias moves.
6. Record, append-only: the decision and the round's data version (pool md5 in dvc.lock, dvc.lock digest, git
   commit) as parent-run tags, a per-round version tag `cyclepref.round.<run id>` (the version's unsuffixed
   decision tags keep the first decision about it; policies: retrain.<policy>.* run tags), a markdown artifact with
   the round's decision table (reward model and policies) and a row of reports/retrain_rounds.{json,md} with the
   round's time.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from cyclepref.ingest import ingest_inputs
from cyclepref.stats import mcnemar_p, paired_bootstrap
from flows import lineage
from flows.pipeline import PipelineResult, pipeline, stage_plan
from flows.pool import data_version, refuse_stage_outputs, round_lock, stop_on_signals, track_batches

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


RANDOM = "random"


def clears_floor(challenger: np.ndarray, floors: dict[str, np.ndarray], confidence: float, n_boot: int) -> Decision:
    """A first champion must beat every floor (per-pair outcomes on the same pairs: random = 0.5 a pair, the reward
    backbone's zero-shot outcomes) with the lower bound of its paired-bootstrap gain above 0."""
    lines, worst = [], None
    for name, base in floors.items():
        c = compare(challenger, base, confidence, n_boot)
        lines.append(f"vs {name}: {c.describe().replace('champion', name)}")
        if worst is None or c.low < worst[1].low:
            worst = (name, c)
    name, c = worst
    if c.low <= 0:
        return Decision(False, f"no champion yet, and the challenger does not clear the floor ({'; '.join(lines)})", c)
    return Decision(True, f"no champion yet: the challenger clears the floor and becomes champion ({'; '.join(lines)})",
                    c)


def decide(
    challenger: np.ndarray | None,
    champion: np.ndarray | None,
    margin: float,
    benchmark_present: bool,
    confidence: float = 0.95,
    n_boot: int = 10000,
    floors: dict[str, np.ndarray] | None = None,
) -> Decision:
    """Promote the challenger only when the benchmark exists and, on the same pairs, either (no champion yet) the
    paired-bootstrap interval of its gain over every floor lies above 0 (random, 0.5 a pair, always; `floors` adds
    others, e.g. the reward backbone zero-shot), or the interval of its accuracy gain over the champion lies above 0
    and the mean gain is more than `margin`. Outcomes are per-pair arrays aligned by pair; gains within 1e-9 of 0 or
    of the margin count as ties."""
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    if not benchmark_present:
        return Decision(False, "benchmark missing (or without pairs of the variant's tasks): nothing was compared")
    if challenger is None:
        raise ValueError("the benchmark is present, so the challenger's per-pair outcomes are required")
    if champion is None:
        bases = {RANDOM: np.full(len(challenger), 0.5), **(floors or {})}
        return clears_floor(np.asarray(challenger, dtype=np.float64), bases, confidence, n_boot)
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
    seconds: float = 0.0
    metric: str = "accuracy"
    policies: dict[str, RetrainResult] = field(default_factory=dict)
    versus_base: Comparison | None = None


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


def register_and_decide(client, root: Path, cfg, evaluate=None, floor=None) -> tuple[Registration, RetrainResult]:
    """`cyclepref register` (after `make run`): register the current reward model, then take the same champion
    decision as a retraining round (the floor when there is no champion yet, else the paired test), recorded as a
    round `register-<time>`."""
    reg = register_current(client, root, cfg)
    champion = alias_version(client, cfg.registered_model, CHAMPION)
    round_id = f"register-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{uuid.uuid4().hex[:8]}"
    out = challenge(client, cfg, root, reg.version, champion, round_id, evaluate or benchmark_outcomes,
                    floor or zero_shot_floor)
    record_decision(client, out, None, {})
    return reg, out


def alias_version(client, name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def apply_decision(client, name: str, challenger: str, champion: str | None, decision: Decision) -> Decision:
    """Move the aliases; the only place where the flows write aliases. `champion` is the version the round read at
    its start: when a person moved the alias since, it is left where they put it and the decision says so."""
    client.set_registered_model_alias(name, CHALLENGER, challenger)
    if not decision.promote or challenger == champion:
        return decision
    now = alias_version(client, name, CHAMPION)
    if now != champion:
        return Decision(False, f"{decision.reason}; but alias {CHAMPION} was moved to {now} during the round (read "
                               f"{champion} at its start): left as it was set", decision.comparison)
    if champion is not None:
        client.set_registered_model_alias(name, PREVIOUS, champion)
    client.set_registered_model_alias(name, CHAMPION, challenger)
    return decision


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
    c, v = r.decision.comparison, r.versus_base

    def number(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.6f}"

    base = {} if v is None else {"cyclepref.versus_base_gain": number(v.gain),
                                 "cyclepref.versus_base_low": number(v.low),
                                 "cyclepref.versus_base_high": number(v.high)}
    return base | {
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
        "cyclepref.metric": r.metric,
    }


def zero_shot_floor(root: Path, bench: Path, tasks: tuple[str, ...], batch_size: int) -> dict[str, np.ndarray]:
    """The reward backbone's zero-shot per-pair outcomes on the benchmark: the BLIP checkpoint train_reward starts
    from (params `train_reward.model.path`), scoring each pair by its contrastive cosine (ITC) and by its image-text
    matching head (ITM), as evaluate_reward's backbone baselines do. A reward model that does not beat both has
    learned nothing its backbone did not know."""
    from cyclepref import runtime
    from cyclepref.config import load_params
    from cyclepref.reward.benchmarks import load_benchmark
    from cyclepref.reward.evaluate import BackboneScorer, pairset_outcomes

    path = load_params(root / "params.yaml").train_reward.model.path
    backbone = str(root / path) if (root / path).exists() else path
    pairsets = [s for t, s in load_benchmark(bench).items() if t in tasks]
    floors = {}
    for head in ("itc", "itm"):
        scorer = BackboneScorer(f"backbone zero-shot {head.upper()}", backbone, head, runtime.device())
        floors[scorer.name] = np.concatenate([pairset_outcomes(s, scorer, batch_size) for s in pairsets])
    return floors


UNREAD = "unread"


def promote(
    client,
    result: PipelineResult,
    cfg,
    root: Path,
    evaluate=benchmark_outcomes,
    floor=zero_shot_floor,
    champion: str | None = UNREAD,
    extra_tags: dict[str, str] | None = None,
) -> RetrainResult:
    """Register the pipeline's reward model, compare it with the champion and move the aliases (steps 3-5).
    `champion`: the version the round read from the alias at its start (read here when not given).
    `evaluate(model_uri, benchmark, tasks, batch_size) -> per-pair outcomes` scores one registered version;
    `floor(root, benchmark, tasks, batch_size) -> {name: per-pair outcomes}` the floors of a first champion."""
    name = cfg.registered_model
    if champion == UNREAD:
        champion = alias_version(client, name, CHAMPION)
    train_run = producer_run(result, REWARD_STAGE)
    model = reward_model(client, train_run, cfg.variant)
    tags = {"cyclepref.pipeline_run_id": result.parent_run_id,
            **reward_tags(client, train_run, model, cfg.variant, result.outcome(REWARD_STAGE).lock_hash)}
    challenger = str(register(client, name, model, tags).version)
    link_adapters(client, root, name, challenger)
    out = challenge(client, cfg, root, challenger, champion, result.parent_run_id, evaluate, floor)
    record_decision(client, out, result.parent_run_id, extra_tags or {})
    return out


def challenge(client, cfg, root: Path, challenger: str, champion: str | None, round_id: str, evaluate,
              floor) -> RetrainResult:
    """Score `challenger` (and `champion`, or the floors without one) on the benchmark, decide, move the aliases."""
    name = cfg.registered_model
    bench = (root / cfg.benchmark).resolve()
    tasks = benchmark_tasks(cfg.variant)
    pairs = benchmark_pairs(bench, tasks)
    challenger_out = champion_out = None
    if champion == challenger:
        decision = Decision(False, f"version {challenger} is already the champion (no new reward model)")
    else:
        floors = {}
        if pairs:
            challenger_out, champion_out = score_versions(evaluate, cfg, bench, pairs, challenger, champion)
            floors = floor(root, bench, tasks, cfg.batch_size) if champion is None else {}
        decision = decide(challenger_out, champion_out, cfg.margin, pairs > 0, cfg.confidence, cfg.bootstrap_samples,
                          floors)
    decision = apply_decision(client, name, challenger, champion, decision)
    return RetrainResult(
        round_id, name, challenger, champion, mean_or_none(challenger_out), mean_or_none(champion_out),
        cfg.benchmark, decision, pairs=0 if challenger_out is None else len(challenger_out),
        benchmark_digest=benchmark_digest(bench),
    )


ROUND_TAG = "cyclepref.round."


def record_decision(client, out: RetrainResult, run_id: str | None, extra: dict[str, str],
                    prefix: str = "retrain.") -> None:
    """Append-only: the round's decision (and `extra`, e.g. its data version) as one tag `cyclepref.round.<round>`
    on the challenger's version and as `prefix`* tags on the round's run (retrain.* for the reward model,
    retrain.<policy>.* for a policy); the version's unsuffixed `cyclepref.decision*` tags keep the first decision
    made about it."""
    tags = {**decision_tags(out), **extra}
    name, version = out.registered_model, out.challenger_version
    present = client.get_model_version(name, version).tags
    for key, value in tags.items():
        if key not in present:
            client.set_model_version_tag(name, version, key, value)
        if run_id:
            client.set_tag(run_id, f"{prefix}{key.removeprefix('cyclepref.')}", value)
    summary = {k.removeprefix("cyclepref."): v for k, v in tags.items() if k != "cyclepref.decision_reason"}
    client.set_model_version_tag(name, version, f"{ROUND_TAG}{out.pipeline_run_id}", json.dumps(summary))
    if run_id:
        client.set_tag(run_id, f"{prefix}challenger_version", version)


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
def ingest_task(root: str, watch_dir: str, pool: str) -> dict[str, int]:
    """Ingest watch_dir into a new pool batch and `dvc add` it (after repairing what an interrupted round left)."""
    path = Path(root)
    track_batches(path, path / pool)
    counts = ingest_inputs(path / watch_dir, path / pool)
    track_batches(path, path / pool)
    return counts


@task(name="register-and-promote", cache_policy=NO_CACHE, persist_result=False)
def promote_task(result: PipelineResult, root: str, champion: str | None) -> RetrainResult:
    from cyclepref.config import load_params

    path = Path(root)
    params = load_params(path / "params.yaml")
    cfg = params.retrain
    client = lineage.client(path)
    adapters = register_adapters(client, result, cfg.adapters)
    out = promote(client, result, cfg, path, champion=champion,
                  extra_tags=data_version(path, params.prepare_inputs.pool))
    out.adapters = adapters
    return out


@task(name="policies-register-and-promote", cache_policy=NO_CACHE, persist_result=False)
def policies_task(result: PipelineResult, root: str, champions: dict, started: dict) -> dict[str, RetrainResult]:
    """flows.policy steps 2-3: register, score and promote every policy of `retrain.policies`."""
    from cyclepref.config import load_params
    from flows.policy import promote_policies

    path = Path(root)
    return promote_policies(lineage.client(path), result, load_params(path / "params.yaml"), path, champions,
                            started)


ROUNDS_REPORT = "reports/retrain_rounds"


def decision_row(r: RetrainResult) -> dict:
    c = r.decision.comparison
    return {
        "challenger": r.challenger_version, "champion_before": r.champion_version,
        "accuracy": r.challenger_accuracy, "champion_accuracy": r.champion_accuracy,
        "gain": getattr(c, "gain", None), "low": getattr(c, "low", None), "high": getattr(c, "high", None),
        "pairs": r.pairs, "promoted": r.decision.promote, "reason": r.decision.reason,
        "versus_base": None if r.versus_base is None else {
            "champion": r.challenger_version if r.decision.promote else r.champion_version,
            "f1": r.versus_base.challenger, "base": r.versus_base.champion, "gain": r.versus_base.gain,
            "low": r.versus_base.low, "high": r.versus_base.high},
    }


def round_row(r: RetrainResult, trigger: str, started: str, seconds: float, data: dict[str, str]) -> dict:
    """One round: the reward model's decision and every policy's (`metric` F1: per-scene ground truth)."""
    return {
        "round": r.pipeline_run_id, "started_utc": started, "seconds": round(seconds, 1), "trigger": trigger,
        "ingested": r.ingested, "pool_batches": data.get("cyclepref.data.pool_batches"),
        "pool_md5": data.get("cyclepref.data.pool_md5"),
        "reward": decision_row(r),
        "policies": {name: {"registered_model": p.registered_model, "metric": p.metric, **decision_row(p)}
                     for name, p in r.policies.items()},
    }


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def _pts(x) -> str:
    return "n/a" if x is None else f"{100 * x:+.2f}"


def versus_base_text(v: dict | None) -> str:
    if v is None:
        return ""
    return (f" (champion v{v['champion']} vs base: {_pct(v['f1'])} vs {_pct(v['base'])}, {_pts(v['gain'])} "
            f"[{_pts(v['low'])}, {_pts(v['high'])}])")


def policy_cell(row: dict) -> str:
    """A round's policy decisions in one cell: name, challenger, metric vs champion (base), gain, promoted."""
    parts = []
    for name, p in (row.get("policies") or {}).items():
        parts.append(
            f"{name} v{p['challenger']} {p['metric']} {_pct(p['accuracy'])} vs "
            f"{'v' + p['champion_before'] if p['champion_before'] else 'base'} {_pct(p['champion_accuracy'])}: "
            f"{_pts(p['gain'])} [{_pts(p['low'])}, {_pts(p['high'])}] {'promoted' if p['promoted'] else 'kept'}"
            + (versus_base_text(p.get("versus_base")) if p["champion_before"] else "")
        )
    return "; ".join(parts) or "none"


def rounds_markdown(rows: list[dict]) -> str:
    lines = ["# Retraining rounds", "", "Reward model (pairwise accuracy) and policies (per-scene ground-truth F1) on "
             "their frozen benchmarks (gain in points, 95% paired-bootstrap interval); one row per round, appended "
             "by the retraining flow.", "",
             "| started (UTC) | seconds | ingested images / texts / quarantined | pool batches | challenger | "
             "accuracy | champion before | gain [interval] | promoted | policies |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        w, i = row["reward"], row["ingested"] or {}
        lines.append(
            f"| {row['started_utc']} | {row['seconds']} | {i.get('images', 0)} / {i.get('texts', 0)} / "
            f"{i.get('quarantined', 0)} | {row['pool_batches']} | {w['challenger']} | {_pct(w['accuracy'])} | "
            f"{w['champion_before'] or 'none'} ({_pct(w['champion_accuracy'])}) | {_pts(w['gain'])} "
            f"[{_pts(w['low'])}, {_pts(w['high'])}] | {'yes' if w['promoted'] else 'no'} | {policy_cell(row)} |"
        )
    return "\n".join(lines) + "\n"


def append_round(root: Path, row: dict) -> list[dict]:
    """Append one row to reports/retrain_rounds.json (rows of earlier rounds are never rewritten) and regenerate
    reports/retrain_rounds.md from all rows."""
    from cyclepref.atomic import atomic_path

    path = root / f"{ROUNDS_REPORT}.json"
    rows = json.loads(path.read_text()) if path.exists() else []
    rows.append(row)
    for out, text in ((path, json.dumps(rows, indent=1) + "\n"), (path.with_suffix(".md"), rounds_markdown(rows))):
        with atomic_path(out) as tmp:
            tmp.write_text(text)
    return rows


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
    """One round: ingest -> pipeline -> register -> champion/challenger on the frozen benchmark -> aliases. At most
    one round per repository at a time (RoundRunning otherwise); SIGTERM / SIGINT end the stage processes."""
    path = Path(root).resolve()
    with round_lock(path), stop_on_signals():
        return run_round(path, ingest, trigger, stage_timeout_s, stage_retries, retry_delay_s)


def run_round(path: Path, ingest: bool, trigger: str, stage_timeout_s, stage_retries, retry_delay_s) -> RetrainResult:
    from prefect.artifacts import create_markdown_artifact

    from cyclepref.config import load_params, require

    started, clock = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), time.perf_counter()
    params = load_params(path / "params.yaml")
    cfg = require(params.retrain, "retrain")
    from flows.policy import decision_table, materialise_champions, read_champions

    client = lineage.client(path)
    champion = alias_version(client, cfg.registered_model, CHAMPION)
    policy_champions = read_champions(client, cfg)
    get_run_logger().info("champions at the start of the round: reward model %s, policies %s", champion or "none",
                          policy_champions or "none")
    pool = params.prepare_inputs.pool
    refuse_stage_outputs(path, params)
    if cfg.stages:
        stage_plan(path, targets=cfg.stages)
    started_from = materialise_champions(client, path, params, policy_champions)
    ingested: dict[str, int] = {}
    if ingest and cfg.watch_dir:
        ingested = ingest_task(str(path), cfg.watch_dir, pool)
        get_run_logger().info("ingested %s", ingested)
    else:
        track_batches(path, path / pool)
    result = pipeline(
        root=str(path), trigger=trigger, stage_timeout_s=stage_timeout_s, stage_retries=stage_retries,
        retry_delay_s=retry_delay_s, targets=cfg.stages or None,
    )
    out = promote_task(result, str(path), champion)
    out.policies = policies_task(result, str(path), policy_champions, started_from)
    out.ingested = ingested
    out.seconds = seconds = time.perf_counter() - clock
    client.set_tag(result.parent_run_id, "retrain.seconds", f"{seconds:.1f}")
    append_round(path, round_row(out, trigger, started, seconds, data_version(path, pool)))
    text = (decision_markdown(out) + "\n## The round's decisions\n\n" + decision_table(out, out.policies)
            + f"\nRound time: {seconds:.1f} s.\n")
    create_markdown_artifact(text, key="retrain-decision", description="Champion / challenger decision")
    client.log_text(result.parent_run_id, text, "retrain_decision.md")
    return out
