"""Champion / challenger: the pure decision, the alias moves in a real MLflow registry, scoring through the pyfunc."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow import MlflowClient

from cyclepref.config import Retrain
from flows import lineage
from flows.pipeline import PipelineResult, StageOutcome
from flows.retrain import CHALLENGER, CHAMPION, PREVIOUS, decide, decision_markdown, promote, zero_shot_floor

ROOT = Path(__file__).resolve().parents[1]
NAME = "cyclereward"
MARGIN = 0.02
PAIRS = 200


def _outcomes(correct: int, start: int = 0) -> np.ndarray:
    """Per-pair outcomes on PAIRS pairs: right on pairs start .. start + correct - 1, wrong elsewhere."""
    out = np.zeros(PAIRS)
    out[start:start + correct] = 1.0
    return out


@pytest.mark.parametrize(
    ("challenger", "champion", "margin", "present", "promoted", "reason"),
    [
        (_outcomes(120), None, MARGIN, True, True, "clears the floor"),
        (_outcomes(67), None, MARGIN, True, False, "does not clear the floor"),
        (_outcomes(108), None, MARGIN, True, False, "does not clear the floor"),
        (_outcomes(110), _outcomes(120), MARGIN, True, False, "worse"),
        (_outcomes(120), _outcomes(120), MARGIN, True, False, "tie"),
        (_outcomes(120, start=40), _outcomes(120), MARGIN, True, False, "tie"),
        (_outcomes(101, start=40), _outcomes(100), 0.0, True, False, "inside the noise"),
        (_outcomes(130), _outcomes(120), 0.1, True, False, "not more than margin"),
        (_outcomes(180), _outcomes(120), MARGIN, True, True, "beats champion"),
        (None, _outcomes(120), MARGIN, False, False, "benchmark missing"),
        (None, None, MARGIN, False, False, "benchmark missing"),
    ],
    ids=["first", "first-below-random", "first-inside-the-noise-of-random", "worse", "identical", "same-accuracy", "noise", "below-margin", "clearly-better", "no-bench",
         "no-bench-no-champion"],
)
def test_decide(challenger, champion, margin, present, promoted, reason):
    decision = decide(challenger, champion, margin, present)
    assert decision.promote is promoted
    assert reason in decision.reason


def test_a_win_inside_the_noise_is_not_promoted_though_its_gain_beats_the_margin():
    decision = decide(_outcomes(101, start=40), _outcomes(100), 0.0, True)
    c = decision.comparison
    assert not decision.promote
    assert (c.challenger, c.champion, c.pairs) == (0.505, 0.5, PAIRS)
    assert c.gain == pytest.approx(0.005) and c.low < 0 < c.high
    assert "on 200 pairs, gain +0.0050" in decision.reason and f"lower bound {c.low:+.4f}" in decision.reason


def test_a_significant_gain_below_the_margin_is_not_promoted():
    decision = decide(_outcomes(130), _outcomes(120), 0.1, True)
    assert decision.comparison.low > 0 and decision.comparison.gain == pytest.approx(0.05)
    assert not decision.promote and "gain 0.0500 not more than margin 0.1" in decision.reason


def test_a_clearly_better_challenger_is_promoted_with_its_interval():
    decision = decide(_outcomes(180), _outcomes(120), MARGIN, True)
    c = decision.comparison
    assert decision.promote
    assert c.gain == pytest.approx(0.3) and 0.2 < c.low < 0.3 < c.high <= 0.4 and c.mcnemar_p < 1e-15


def test_confidence_sets_how_far_above_zero_the_interval_must_be():
    challenger, champion = _outcomes(125), _outcomes(120)
    assert decide(challenger, champion, 0.0, True, confidence=0.95).promote
    assert not decide(challenger, champion, 0.0, True, confidence=0.999).promote


def test_decide_rejects_bad_inputs():
    with pytest.raises(ValueError, match="margin"):
        decide(_outcomes(120), _outcomes(100), -0.1, True)
    with pytest.raises(ValueError, match="challenger"):
        decide(None, _outcomes(100), MARGIN, True)
    with pytest.raises(ValueError, match="same length"):
        decide(_outcomes(120), _outcomes(100)[:-1], MARGIN, True)


# ---------------------------------------------------------------- registry


class Registry:
    """A pipeline run, train_reward runs with one logged model each, and a fake scorer per registered version."""

    def __init__(self, client: MlflowClient, root: Path):
        self.client, self.root = client, root
        self.exp = lineage.experiment_id(client)
        self.by_model: dict[str, np.ndarray] = {}
        self.evaluated: list[str] = []
        self.backbone = _outcomes(100)

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

    def trained(self, outcomes: np.ndarray) -> PipelineResult:
        """A pipeline whose train_reward run logged a combo model with the given per-pair benchmark outcomes."""
        train, variant = self.train_runs()
        model = self.client.create_logged_model(self.exp, name="reward_model", source_run_id=variant)
        self.client.finalize_logged_model(model.model_id, "READY")
        self.by_model[model.model_id] = outcomes
        return self.rerun(train)

    def rerun(self, train_run: str) -> PipelineResult:
        """A later pipeline where DVC skipped train_reward: its outputs still come from `train_run`."""
        parent = self.client.create_run(self.exp, run_name="pipeline").info.run_id
        outcome = StageOutcome("train_reward", "skipped", 0.5, 1, "child", train_run, "hash")
        return PipelineResult(parent, self.exp, "flowtest", ["train_reward"], [outcome])

    def evaluate(self, uri: str, bench: Path, tasks: tuple[str, ...], batch_size: int) -> np.ndarray:
        name, ref = uri.removeprefix("models:/").replace("@", "/").split("/")
        if ref.isdigit():
            version = self.client.get_model_version(name, ref)
        else:
            version = self.client.get_model_version_by_alias(name, ref)
        self.evaluated.append(str(version.version))
        return self.by_model[version.source.removeprefix("models:/")]

    def floor(self, root: Path, bench: Path, tasks: tuple[str, ...], batch_size: int) -> dict[str, np.ndarray]:
        self.evaluated.append("backbone")
        return {"backbone zero-shot": self.backbone}

    def aliases(self) -> dict[str, str]:
        return {k: str(v) for k, v in self.client.get_registered_model(NAME).aliases.items()}


@pytest.fixture
def registry(mlflow_uri, tmp_path) -> Registry:
    return Registry(MlflowClient(mlflow_uri), tmp_path)


def _benchmark(path: Path) -> Path:
    """PAIRS pairs of both tasks (never decoded: the registry's evaluate is a lookup)."""
    i2t = {"task": "i2t", "image": "images/a.png", "chosen": "a red square", "rejected": "a blue square"}
    t2i = {"task": "t2i", "prompt": "a red square", "chosen": "images/a.png", "rejected": "images/b.png"}
    rows = [{"id": f"p{i}", **(i2t if i % 2 else t2i)} for i in range(PAIRS)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cfg(root: Path, benchmark: str = "bench.jsonl") -> Retrain:
    _benchmark(root / "bench.jsonl")
    return Retrain(registered_model=NAME, benchmark=benchmark, margin=MARGIN)


def _promote(registry: Registry, result: PipelineResult, cfg: Retrain, **kwargs):
    return promote(registry.client, result, cfg, registry.root, evaluate=registry.evaluate, floor=registry.floor,
                   **kwargs)


def test_first_model_becomes_champion_when_it_clears_the_floor(registry):
    out = _promote(registry, registry.trained(_outcomes(120)), _cfg(registry.root))
    assert out.decision.promote and out.champion_version is None and out.challenger_version == "1"
    assert registry.aliases() == {CHAMPION: "1", CHALLENGER: "1"}
    assert registry.evaluated == ["1", "backbone"]
    assert "vs random" in out.decision.reason and "vs backbone zero-shot" in out.decision.reason
    tags = registry.client.get_model_version(NAME, "1").tags
    assert tags["cyclepref.decision"] == "promoted" and tags["cyclepref.champion_before"] == "none"
    assert tags["cyclepref.challenger_accuracy"] == "0.600000" and tags["cyclepref.benchmark_pairs"] == "200"
    assert float(tags["cyclepref.gain"]) == pytest.approx(0.1) and float(tags["cyclepref.gain_low"]) > 0
    run_tags = registry.client.get_run(out.pipeline_run_id).data.tags
    assert run_tags["retrain.decision"] == "promoted" and run_tags["retrain.challenger_version"] == "1"


@pytest.mark.parametrize(("first", "backbone"), [(_outcomes(67), _outcomes(40)), (_outcomes(130), _outcomes(128, start=10))],
                         ids=["below-random", "not-above-the-backbone-zero-shot"])
def test_a_first_model_below_the_floor_is_never_champion(registry, first, backbone):
    registry.backbone = backbone
    out = _promote(registry, registry.trained(first), _cfg(registry.root))
    assert not out.decision.promote and "does not clear the floor" in out.decision.reason
    assert registry.aliases() == {CHALLENGER: "1"}
    assert registry.client.get_model_version(NAME, "1").tags["cyclepref.decision"] == "kept"


def test_the_benchmark_is_recorded_relative_to_the_project(registry):
    import hashlib

    out = _promote(registry, registry.trained(_outcomes(120)), _cfg(registry.root))
    tags = registry.client.get_model_version(NAME, out.challenger_version).tags
    assert tags["cyclepref.benchmark"] == "bench.jsonl"
    digest = hashlib.sha256((registry.root / "bench.jsonl").read_bytes()).hexdigest()
    assert tags["cyclepref.benchmark_digest"] == digest


@pytest.mark.parametrize(
    ("outcomes", "margin", "promoted"),
    [
        (_outcomes(110), MARGIN, False),
        (_outcomes(120, start=40), MARGIN, False),
        (_outcomes(121, start=40), 0.0, False),
        (_outcomes(130), 0.1, False),
        (_outcomes(180), MARGIN, True),
    ],
    ids=["worse", "tie", "better-inside-the-noise", "significant-but-below-margin", "clearly-better"],
)
def test_challenger_against_champion(registry, outcomes, margin, promoted):
    cfg = _cfg(registry.root).model_copy(update={"margin": margin})
    _promote(registry, registry.trained(_outcomes(120)), cfg)
    out = _promote(registry, registry.trained(outcomes), cfg)
    assert out.decision.promote is promoted
    assert (out.challenger_accuracy, out.champion_accuracy, out.champion_version) == (outcomes.mean(), 0.60, "1")
    assert registry.evaluated == ["1", "backbone", "2", "1"]
    if promoted:
        assert registry.aliases() == {CHAMPION: "2", CHALLENGER: "2", PREVIOUS: "1"}
    else:
        assert registry.aliases() == {CHAMPION: "1", CHALLENGER: "2"}
    c = out.decision.comparison
    tags = registry.client.get_model_version(NAME, "2").tags
    assert tags["cyclepref.decision"] == ("promoted" if promoted else "kept")
    assert float(tags["cyclepref.gain"]) == pytest.approx(outcomes.mean() - 0.6, abs=1e-6)
    assert (tags["cyclepref.gain_low"], tags["cyclepref.gain_high"]) == (f"{c.low:.6f}", f"{c.high:.6f}")
    assert tags["cyclepref.benchmark_pairs"] == "200"
    run_tags = registry.client.get_run(out.pipeline_run_id).data.tags
    assert run_tags["retrain.gain_low"] == tags["cyclepref.gain_low"]


def test_decision_markdown_shows_accuracies_gain_interval_and_pairs(registry):
    cfg = _cfg(registry.root)
    _promote(registry, registry.trained(_outcomes(120)), cfg)
    out = _promote(registry, registry.trained(_outcomes(180)), cfg)
    c = out.decision.comparison
    text = decision_markdown(out)
    assert "| challenger | 2 | 90.00% |" in text and "| champion before | 1 | 60.00% |" in text
    assert "on the same 200 pairs: +30.00 points" in text
    assert f"95% paired-bootstrap interval [{100 * c.low:+.2f}, {100 * c.high:+.2f}] points" in text


def test_outcomes_not_aligned_with_the_benchmark_fail_before_any_alias(registry):
    cfg = _cfg(registry.root)
    with pytest.raises(ValueError, match="expected 200 outcomes"):
        _promote(registry, registry.trained(_outcomes(120)[:-1]), cfg)
    assert registry.client.get_registered_model(NAME).aliases == {}


def test_missing_benchmark_never_promotes(registry):
    cfg = _cfg(registry.root)
    _promote(registry, registry.trained(_outcomes(120)), cfg)
    out = _promote(registry, registry.trained(_outcomes(198)), cfg.model_copy(update={"benchmark": "absent.jsonl"}))
    assert not out.decision.promote and "benchmark missing" in out.decision.reason
    assert out.challenger_accuracy is None and registry.evaluated == ["1", "backbone"]
    assert registry.aliases() == {CHAMPION: "1", CHALLENGER: "2"}
    assert registry.client.get_model_version(NAME, "2").tags["cyclepref.benchmark_pairs"] == "0"


def test_missing_benchmark_without_champion_promotes_nothing(registry):
    out = _promote(registry, registry.trained(_outcomes(180)), _cfg(registry.root, benchmark="absent.jsonl"))
    assert not out.decision.promote
    assert registry.aliases() == {CHALLENGER: "1"}


def test_skipped_training_reuses_the_version_and_rollback_alias_survives(registry):
    cfg = _cfg(registry.root)
    _promote(registry, registry.trained(_outcomes(120)), cfg)
    second = registry.trained(_outcomes(180))
    _promote(registry, second, cfg)
    train_run = second.outcomes[0].producer_run_id
    again = _promote(registry, registry.rerun(train_run), cfg)
    assert again.challenger_version == "2" and not again.decision.promote
    assert "already the champion" in again.decision.reason
    assert registry.evaluated == ["1", "backbone", "2", "1"]
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
    from cyclepref.reward.evaluate import BackboneScorer, RewardScorer, evaluate_pairset, pair_outcomes
    from cyclepref.reward.model import RewardModel
    from cyclepref.reward.pyfunc import log_reward_model
    from flows.retrain import benchmark_outcomes

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
    out = promote(client, registry.rerun(train), cfg, tmp_path, floor=lambda *args: {})

    scorer = RewardScorer("m", RewardModel.from_pretrained(tmp_path / "reward"))
    by_task = load_benchmark(bench)
    accuracy = {t: evaluate_pairset(pairset, [scorer], 4)["m"] for t, pairset in by_task.items()}
    direct = [pair_outcomes(*scorer.score([s.example(i) for i in range(len(s))])) for s in by_task.values()]
    assert list(by_task) == ["i2t", "t2i"] and sum(a.n for a in accuracy.values()) == 12
    pooled = sum(a.accuracy * a.n for a in accuracy.values()) / 12
    assert out.challenger_accuracy == pytest.approx(pooled)
    assert out.decision.promote is (out.decision.comparison.low > 0) and "vs random" in out.decision.reason
    outcomes = benchmark_outcomes(f"models:/{NAME}/1", bench, ("i2t", "t2i"), 4)
    assert outcomes.shape == (12,) and outcomes.mean() == pytest.approx(pooled)
    assert outcomes.tolist() == np.concatenate(direct).tolist()
    assert benchmark_outcomes(f"models:/{NAME}/1", bench, ("t2i",), 4).tolist() == direct[1].tolist()

    params = yaml.safe_load((ROOT / "configs/tiny.yaml").read_text())
    params["train_reward"]["model"] |= {"path": str(backbone), "max_length": 16}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    floors = zero_shot_floor(tmp_path, bench, ("i2t", "t2i"), 4)
    assert list(floors) == ["backbone zero-shot ITC", "backbone zero-shot ITM"]
    for head, zero_shot in zip(("itc", "itm"), floors.values()):
        scorer = BackboneScorer(head, str(backbone), head)
        expected = [pair_outcomes(*scorer.score([s.example(i) for i in range(len(s))])) for s in by_task.values()]
        assert zero_shot.tolist() == np.concatenate(expected).tolist()
    assert floors["backbone zero-shot ITC"].tolist() != floors["backbone zero-shot ITM"].tolist()


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


def _sandbox_outcomes(records: list[dict], judge) -> np.ndarray:
    return np.array([judge(r) for r in records], dtype=np.float64)


def test_promotion_on_the_committed_sandbox_benchmark(registry):
    """On the frozen ground-truth benchmark the default profile promotes on: a challenger that ranks every pair as the
    ground truth does is promoted over raw cycle consistency as champion; an identical challenger is not."""
    bench = Path(__file__).resolve().parents[1] / "data/benchmarks/sandbox/pairs.jsonl"
    records = [json.loads(line) for line in bench.read_text().splitlines()]
    assert {r["task"] for r in records} == {"i2t", "t2i"} and len(records) >= 200
    assert all(r["meta"]["chosen_f1"] > r["meta"]["rejected_f1"] for r in records)
    cycle = _sandbox_outcomes(records, lambda r: float(np.sign(r["chosen_cycle_score"] - r["rejected_cycle_score"])
                                                       + 1) / 2)
    oracle = np.ones(len(records))
    registry.backbone = np.full(len(records), 0.5)
    cfg = Retrain(registered_model=NAME, benchmark=str(bench), margin=MARGIN)
    _promote(registry, registry.trained(cycle), cfg)
    same = _promote(registry, registry.trained(cycle.copy()), cfg)
    assert not same.decision.promote and registry.aliases()[CHAMPION] == "1"
    better = _promote(registry, registry.trained(oracle), cfg)
    assert better.decision.promote and registry.aliases()[CHAMPION] == "3"
    assert better.decision.comparison.low > 0


# ---------------------------------------------------------------- people move aliases; decisions are kept


def test_a_rollback_made_as_the_ui_makes_it_is_what_the_next_round_compares_against(registry):
    cfg = _cfg(registry.root)
    _promote(registry, registry.trained(_outcomes(120)), cfg)
    _promote(registry, registry.trained(_outcomes(180)), cfg)
    assert registry.aliases()[CHAMPION] == "2"
    registry.client.set_registered_model_alias(NAME, CHAMPION, "1")
    registry.evaluated.clear()
    out = _promote(registry, registry.trained(_outcomes(150)), cfg)
    assert out.champion_version == "1" and registry.evaluated == ["3", "1"]
    assert out.decision.promote and out.champion_accuracy == pytest.approx(0.6)
    assert registry.aliases() == {CHAMPION: "3", CHALLENGER: "3", PREVIOUS: "1"}


def test_a_manual_promotion_is_obeyed_and_a_worse_challenger_never_replaces_it(registry):
    cfg = _cfg(registry.root)
    _promote(registry, registry.trained(_outcomes(120)), cfg)
    _promote(registry, registry.trained(_outcomes(110)), cfg)
    registry.client.set_registered_model_alias(NAME, CHAMPION, "2")
    out = _promote(registry, registry.trained(_outcomes(100)), cfg)
    assert out.champion_version == "2" and not out.decision.promote
    assert registry.aliases()[CHAMPION] == "2"


def test_an_alias_moved_while_the_round_runs_is_left_where_the_person_put_it(registry):
    cfg = _cfg(registry.root)
    _promote(registry, registry.trained(_outcomes(120)), cfg)
    result = registry.trained(_outcomes(190))
    registry.client.set_registered_model_alias(NAME, CHAMPION, "1")
    out = _promote(registry, result, cfg, champion=None)
    assert not out.decision.promote and "was moved to 1 during the round" in out.decision.reason
    assert registry.aliases() == {CHAMPION: "1", CHALLENGER: "2"}


def test_decisions_are_append_only_across_rounds(registry):
    cfg = _cfg(registry.root)
    _promote(registry, registry.trained(_outcomes(120)), cfg)
    second = registry.trained(_outcomes(180))
    promoted = _promote(registry, second, cfg, extra_tags={"cyclepref.data.pool_md5": "aaa.dir"})
    again = _promote(registry, registry.rerun(second.outcomes[0].producer_run_id), cfg,
                     extra_tags={"cyclepref.data.pool_md5": "bbb.dir"})
    assert not again.decision.promote and again.challenger_version == "2"
    tags = registry.client.get_model_version(NAME, "2").tags
    assert tags["cyclepref.decision"] == "promoted" and float(tags["cyclepref.gain"]) == pytest.approx(0.3)
    assert tags["cyclepref.data.pool_md5"] == "aaa.dir" and tags["cyclepref.benchmark_pairs"] == "200"
    rounds = {k.removeprefix("cyclepref.round."): json.loads(v) for k, v in tags.items()
              if k.startswith("cyclepref.round.")}
    assert set(rounds) == {promoted.pipeline_run_id, again.pipeline_run_id}
    assert rounds[promoted.pipeline_run_id]["decision"] == "promoted"
    assert rounds[again.pipeline_run_id]["decision"] == "kept"
    assert rounds[again.pipeline_run_id]["data.pool_md5"] == "bbb.dir"
    first_run = registry.client.get_run(promoted.pipeline_run_id).data.tags
    assert first_run["retrain.decision"] == "promoted" and first_run["retrain.data.pool_md5"] == "aaa.dir"
