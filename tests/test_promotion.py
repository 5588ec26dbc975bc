"""Champion / challenger: the pure decision, the alias moves in a real MLflow registry, scoring through the pyfunc."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from cyclepref.config import Retrain
from flows import lineage
from flows.pipeline import PipelineResult, StageOutcome
from flows.retrain import CHALLENGER, CHAMPION, PREVIOUS, decide, promote

NAME = "cyclereward"
MARGIN = 0.02


@pytest.mark.parametrize(
    ("challenger", "champion", "present", "promoted", "reason"),
    [
        (0.60, None, True, True, "no champion yet"),
        (0.55, 0.60, True, False, "worse"),
        (0.60, 0.60, True, False, "tie"),
        (0.61, 0.60, True, False, "not more than margin"),
        (0.62, 0.60, True, False, "not more than margin"),
        (0.63, 0.60, True, True, "beats champion"),
        (None, 0.60, False, False, "benchmark missing"),
        (None, None, False, False, "benchmark missing"),
    ],
)
def test_decide(challenger, champion, present, promoted, reason):
    decision = decide(challenger, champion, MARGIN, present)
    assert decision.promote is promoted
    assert reason in decision.reason


def test_decide_rejects_bad_inputs():
    with pytest.raises(ValueError, match="margin"):
        decide(0.6, 0.5, -0.1, True)
    with pytest.raises(ValueError, match="challenger"):
        decide(None, 0.5, MARGIN, True)


def test_zero_margin_promotes_any_strict_improvement_but_not_a_tie():
    assert decide(0.6001, 0.6, 0.0, True).promote
    assert not decide(0.6, 0.6, 0.0, True).promote


# ---------------------------------------------------------------- registry


class Registry:
    """A pipeline run, train_reward runs with one logged model each, and a fake scorer per registered version."""

    def __init__(self, client: MlflowClient, root: Path):
        self.client, self.root = client, root
        self.exp = lineage.experiment_id(client)
        self.accuracy: dict[str, float] = {}
        self.by_model: dict[str, float] = {}
        self.evaluated: list[str] = []

    def train_runs(self) -> tuple[str, str]:
        """A train_reward stage run (child of a pipeline run) and its combo variant run, as train_reward logs them."""
        parent = self.client.create_run(self.exp, run_name="pipeline").info.run_id
        train = self.client.create_run(
            self.exp, run_name="train_reward", tags={"mlflow.parentRunId": parent, "cyclepref.stage": "train_reward"}
        ).info.run_id
        variant = self.client.create_run(
            self.exp, run_name="train_reward/combo", tags={"mlflow.parentRunId": train, "cyclepref.variant": "combo"}
        ).info.run_id
        return train, variant

    def trained(self, accuracy: float) -> PipelineResult:
        """A pipeline whose train_reward run logged a combo model of the given benchmark accuracy."""
        train, variant = self.train_runs()
        model = self.client.create_logged_model(self.exp, name="reward_model", source_run_id=variant)
        self.client.finalize_logged_model(model.model_id, "READY")
        self.by_model[model.model_id] = accuracy
        return self.rerun(train)

    def rerun(self, train_run: str) -> PipelineResult:
        """A later pipeline where DVC skipped train_reward: its outputs still come from `train_run`."""
        parent = self.client.create_run(self.exp, run_name="pipeline").info.run_id
        outcome = StageOutcome("train_reward", "skipped", 0.5, 1, "child", train_run, "hash")
        return PipelineResult(parent, self.exp, "flowtest", ["train_reward"], [outcome])

    def evaluate(self, uri: str, bench: Path, tasks: tuple[str, ...], batch_size: int) -> float:
        name, ref = uri.removeprefix("models:/").replace("@", "/").split("/")
        if ref.isdigit():
            version = self.client.get_model_version(name, ref)
        else:
            version = self.client.get_model_version_by_alias(name, ref)
        self.evaluated.append(str(version.version))
        return self.by_model[version.source.removeprefix("models:/")]

    def aliases(self) -> dict[str, str]:
        return {k: str(v) for k, v in self.client.get_registered_model(NAME).aliases.items()}


@pytest.fixture
def registry(mlflow_uri, tmp_path) -> Registry:
    return Registry(MlflowClient(mlflow_uri), tmp_path)


def _benchmark(path: Path) -> Path:
    rows = [
        {"id": "p1", "task": "i2t", "image": "images/a.png", "chosen": "a red square", "rejected": "a blue square"},
        {"id": "p2", "task": "t2i", "prompt": "a red square", "chosen": "images/a.png", "rejected": "images/b.png"},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(root: Path, benchmark: str = "bench.jsonl") -> Retrain:
    _benchmark(root / "bench.jsonl")
    return Retrain(registered_model=NAME, benchmark=benchmark, margin=MARGIN)


def _promote(registry: Registry, result: PipelineResult, cfg: Retrain):
    return promote(registry.client, result, cfg, registry.root, evaluate=registry.evaluate)


def test_first_model_becomes_champion(registry):
    out = _promote(registry, registry.trained(0.60), _cfg(registry.root))
    assert out.decision.promote and out.champion_version is None and out.challenger_version == "1"
    assert registry.aliases() == {CHAMPION: "1", CHALLENGER: "1"}
    assert registry.evaluated == ["1"]
    tags = registry.client.get_model_version(NAME, "1").tags
    assert tags["cyclepref.decision"] == "promoted" and tags["cyclepref.champion_before"] == "none"
    assert tags["cyclepref.challenger_accuracy"] == "0.600000"
    run_tags = registry.client.get_run(out.pipeline_run_id).data.tags
    assert run_tags["retrain.decision"] == "promoted" and run_tags["retrain.challenger_version"] == "1"


@pytest.mark.parametrize(
    ("accuracy", "promoted"),
    [(0.55, False), (0.60, False), (0.61, False), (0.65, True)],
    ids=["worse", "tie", "better-by-less-than-margin", "better-by-more-than-margin"],
)
def test_challenger_against_champion(registry, accuracy, promoted):
    cfg = _cfg(registry.root)
    _promote(registry, registry.trained(0.60), cfg)
    out = _promote(registry, registry.trained(accuracy), cfg)
    assert out.decision.promote is promoted
    assert (out.challenger_accuracy, out.champion_accuracy, out.champion_version) == (accuracy, 0.60, "1")
    assert registry.evaluated == ["1", "2", "1"]
    if promoted:
        assert registry.aliases() == {CHAMPION: "2", CHALLENGER: "2", PREVIOUS: "1"}
    else:
        assert registry.aliases() == {CHAMPION: "1", CHALLENGER: "2"}
    decision = registry.client.get_model_version(NAME, "2").tags["cyclepref.decision"]
    assert decision == ("promoted" if promoted else "kept")


def test_missing_benchmark_never_promotes(registry):
    cfg = _cfg(registry.root)
    _promote(registry, registry.trained(0.60), cfg)
    out = _promote(registry, registry.trained(0.99), cfg.model_copy(update={"benchmark": "absent.jsonl"}))
    assert not out.decision.promote and "benchmark missing" in out.decision.reason
    assert out.challenger_accuracy is None and registry.evaluated == ["1"]
    assert registry.aliases() == {CHAMPION: "1", CHALLENGER: "2"}


def test_missing_benchmark_without_champion_promotes_nothing(registry):
    out = _promote(registry, registry.trained(0.9), _cfg(registry.root, benchmark="absent.jsonl"))
    assert not out.decision.promote
    assert registry.aliases() == {CHALLENGER: "1"}


def test_skipped_training_reuses_the_version_and_rollback_alias_survives(registry):
    cfg = _cfg(registry.root)
    _promote(registry, registry.trained(0.60), cfg)
    second = registry.trained(0.70)
    _promote(registry, second, cfg)
    train_run = second.outcomes[0].producer_run_id
    again = _promote(registry, registry.rerun(train_run), cfg)
    assert again.challenger_version == "2" and not again.decision.promote
    assert "already the champion" in again.decision.reason
    assert registry.evaluated == ["1", "2", "1"]
    assert len(registry.client.search_model_versions(f"name = '{NAME}'")) == 2
    assert registry.aliases() == {CHAMPION: "2", CHALLENGER: "2", PREVIOUS: "1"}


# ---------------------------------------------------------------- scoring through the pyfunc


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _colour_benchmark(out: Path) -> Path:
    from cyclepref.reward.benchmarks import PairWriter
    from cyclepref.reward.synthetic import colour_pairs

    writer = PairWriter(out)
    for e in colour_pairs("i2t", 6, seed=3).examples:
        writer.write({"id": e.pair_id, "task": "i2t", "image": writer.image(_png(e.image)), "chosen": e.chosen,
                      "rejected": e.rejected})
    for e in colour_pairs("t2i", 6, seed=3).examples:
        writer.write({"id": e.pair_id, "task": "t2i", "prompt": e.prompt, "chosen": writer.image(_png(e.chosen)),
                      "rejected": writer.image(_png(e.rejected))})
    return writer.close()


def test_registered_pyfunc_is_scored_on_the_benchmark(mlflow_uri, tmp_path):
    import mlflow

    from cyclepref.models import zoo
    from cyclepref.reward.benchmarks import load_benchmark
    from cyclepref.reward.evaluate import RewardScorer, evaluate_pairset
    from cyclepref.reward.model import RewardModel
    from cyclepref.reward.pyfunc import log_reward_model
    from flows.retrain import benchmark_accuracy

    backbone = zoo.build("blip_itm", tmp_path / "zoo", seed=0, image_size=32)
    model = RewardModel.from_backbone(str(backbone), seed=0, max_length=16)
    model.save_pretrained(tmp_path / "reward")
    bench = _colour_benchmark(tmp_path / "bench")

    client = MlflowClient(mlflow_uri)
    registry = Registry(client, tmp_path)
    train, variant_run = registry.train_runs()
    with mlflow.start_run(run_id=variant_run):
        log_reward_model(tmp_path / "reward")

    cfg = Retrain(registered_model=NAME, benchmark=str(bench), batch_size=4)
    out = promote(client, registry.rerun(train), cfg, tmp_path)

    correct, total = 0.0, 0
    for pairset in load_benchmark(bench).values():
        acc = evaluate_pairset(pairset, [RewardScorer("m", RewardModel.from_pretrained(tmp_path / "reward"))], 4)["m"]
        correct, total = correct + acc.accuracy * acc.n, total + acc.n
    assert total == 12
    assert out.decision.promote and out.challenger_accuracy == pytest.approx(correct / total)
    assert benchmark_accuracy(f"models:/{NAME}@{CHAMPION}", bench, ("i2t", "t2i"), 4) == pytest.approx(correct / total)


def test_dpo_adapters_are_registered_once_per_producing_run(registry, tmp_path):
    import mlflow

    from flows.retrain import register_adapters

    run = registry.client.create_run(registry.exp, run_name="dpo_vlm", tags={"cyclepref.stage": "dpo_vlm"})
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    with mlflow.start_run(run_id=run.info.run_id):
        mlflow.log_artifacts(str(adapter), artifact_path="adapter")
    executed = StageOutcome("dpo_vlm", "executed", 1.0, 1, run.info.run_id, run.info.run_id, "h")
    result = PipelineResult("parent", registry.exp, "flowtest", ["dpo_vlm"], [executed])
    adapters = {"dpo_vlm": "cyclepref-dpo-vlm", "diffusion_dpo": "cyclepref-diffusion-dpo"}

    assert register_adapters(registry.client, result, adapters) == {"dpo_vlm": ["1"]}
    assert register_adapters(registry.client, result, adapters) == {"dpo_vlm": ["1"]}
    version = registry.client.get_model_version("cyclepref-dpo-vlm", "1")
    assert version.run_id == run.info.run_id and version.source.endswith("/adapter")
    assert version.tags["cyclepref.stage"] == "dpo_vlm"
    assert registry.client.get_registered_model("cyclepref-dpo-vlm").aliases == {}
