"""The policies in the retraining loop (issue 20 points 3-4), in a real MLflow registry and a git + DVC project:
the stage adapters are registered as versions of their own models, compared with their champion (the base model
before the first promotion) by the reward model's paired test and promoted only when better; a champion a person
sets with MlflowClient (as the UI does) is what the next round trains from (materialised and `dvc add`ed) and
compares against; the decision table reaches the run tags and the rounds report. The per-input outcomes come from a
stand-in evaluator that reads them from the registered adapter files, so the test sees exactly which versions were
downloaded and compared."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from flow_projects import ROOT, init_repo
from mlflow import MlflowClient

from cyclepref.config import parse_params
from flows import lineage
from flows.pipeline import PipelineResult, StageOutcome
from flows.policy import decision_table, materialise_champions, promote_policies, read_champions
from flows.retrain import CHALLENGER, CHAMPION, PREVIOUS, round_row, rounds_markdown

SCENES = 100
POLICIES = {"captioner": ("dpo_vlm", "cyclepref-captioner"), "t2i": ("diffusion_dpo", "cyclepref-t2i")}
INIT = {"dpo_vlm": "data/champions/captioner/adapter", "diffusion_dpo": "data/champions/t2i/adapter"}


def _f1(right: int) -> list[float]:
    """Per-scene outcomes: 1 on the first `right` scenes, 0.2 elsewhere."""
    return [1.0] * right + [0.2] * (SCENES - right)


BASE = _f1(50)


def _params():
    raw = yaml.safe_load((ROOT / "configs/tiny.yaml").read_text())
    for stage, folder in INIT.items():
        raw[stage]["init_adapter"] = folder
    raw["retrain"] |= {"registered_model": "cyclereward", "margin": 0.02, "bootstrap_samples": 2000,
                       "policy_benchmark": "bench.jsonl",
                       "policies": {n: {"stage": s, "registered_model": m} for n, (s, m) in POLICIES.items()}}
    return parse_params(raw)


class Loop:
    """Rounds of the policy part of the retraining flow: fake stage runs log adapters whose files carry their
    per-scene outcomes; the evaluator records what it was given."""

    def __init__(self, client: MlflowClient, root: Path):
        self.client, self.root, self.params = client, root, _params()
        self.exp = lineage.experiment_id(client)
        self.compared: list[tuple[str, list[str]]] = []
        (root / "bench.jsonl").write_text("{}\n")
        self.n = 0

    def adapter(self, stage: str, outcomes: list[float]) -> str:
        """A stage run that logged `<stage>_adapter` (files: adapter_config.json, outcomes.json, label)."""
        self.n += 1
        run = self.client.create_run(self.exp, run_name=stage, tags={"cyclepref.stage": stage}).info.run_id
        folder = self.root / f"logged-{self.n}"
        folder.mkdir()
        (folder / "adapter_config.json").write_text("{}")
        (folder / "outcomes.json").write_text(json.dumps(outcomes))
        (folder / "label").write_text(f"adapter-{self.n}")
        model = self.client.create_logged_model(self.exp, name=f"{stage}_adapter", source_run_id=run)
        self.client.log_model_artifacts(model.model_id, str(folder))
        self.client.finalize_logged_model(model.model_id, "READY")
        return run

    def evaluate(self, stage: str, spec, folders: list, bench: Path) -> list:
        self.compared.append((stage, ["base" if f is None else (f / "label").read_text() for f in folders]))
        return [BASE if f is None else json.loads((f / "outcomes.json").read_text()) for f in folders]

    def round(self, captioner: list[float], t2i: list[float], before_promotion=None) -> dict:
        """One round: champions read and materialised, the stages' adapters, then registration and decisions."""
        champions = read_champions(self.client, self.params.retrain)
        started = materialise_champions(self.client, self.root, self.params, champions)
        runs = {"dpo_vlm": self.adapter("dpo_vlm", captioner), "diffusion_dpo": self.adapter("diffusion_dpo", t2i)}
        parent = self.client.create_run(self.exp, run_name="pipeline").info.run_id
        outcomes = [StageOutcome(s, "executed", 1.0, 1, r, r, f"hash-{r}") for s, r in runs.items()]
        result = PipelineResult(parent, self.exp, "flowtest", list(runs), outcomes)
        if before_promotion:
            before_promotion()
        self.compared.clear()
        out = promote_policies(self.client, result, self.params, self.root, champions, started, self.evaluate)
        return {"champions": champions, "started": started, "out": out, "run": parent}

    def aliases(self, policy: str) -> dict[str, str]:
        name = POLICIES[policy][1]
        return {k: str(v) for k, v in self.client.get_registered_model(name).aliases.items()}


@pytest.fixture
def loop(mlflow_uri, tmp_path) -> Loop:
    return Loop(MlflowClient(mlflow_uri), init_repo(tmp_path / "project"))


def test_first_round_compares_each_policy_with_its_base_model_and_promotes_only_the_better(loop):
    first = loop.round(captioner=_f1(80), t2i=_f1(49))
    assert first["champions"] == {"captioner": None, "t2i": None}
    assert first["started"] == {"captioner": "base", "t2i": "base"}
    assert not (loop.root / INIT["dpo_vlm"]).exists()
    assert loop.compared == [("dpo_vlm", ["base", "adapter-1"]), ("diffusion_dpo", ["base", "adapter-2"])]
    cap, t2i = first["out"]["captioner"], first["out"]["t2i"]
    assert cap.decision.promote and "against the base model" in cap.decision.reason
    assert cap.challenger_accuracy == pytest.approx(np.mean(_f1(80))) and cap.champion_version is None
    assert not t2i.decision.promote and "worse" in t2i.decision.reason
    assert cap.versus_base.gain == cap.decision.comparison.gain and t2i.versus_base is None
    assert loop.aliases("captioner") == {CHAMPION: "1", CHALLENGER: "1"}
    assert loop.aliases("t2i") == {CHALLENGER: "1"}
    version = loop.client.get_model_version("cyclepref-captioner", "1").tags
    assert version["cyclepref.started_from"] == "base" and version["cyclepref.stage"] == "dpo_vlm"
    assert version["cyclepref.base_model"].startswith("tiny-llava") and version["cyclepref.metric"] == "F1"
    tags = loop.client.get_run(first["run"]).data.tags
    assert tags["retrain.captioner.decision"] == "promoted" and tags["retrain.t2i.decision"] == "kept"
    assert tags["retrain.captioner.challenger_version"] == "1" and "retrain.decision" not in tags
    table = decision_table(None, first["out"])
    assert "| captioner | cyclepref-captioner | 1 | base | F1 | 84.00% | 60.00% | +24.00" in table
    assert table.count("| no |") == 1
    assert table.splitlines()[-1].endswith("| no | n/a |")


def test_a_champion_set_as_the_ui_sets_it_is_what_the_next_round_trains_from_and_compares_against(loop):
    loop.round(captioner=_f1(70), t2i=_f1(70))
    loop.round(captioner=_f1(95), t2i=_f1(95))
    assert loop.aliases("captioner")[CHAMPION] == "2" and loop.aliases("t2i")[CHAMPION] == "2"
    loop.client.set_registered_model_alias("cyclepref-captioner", CHAMPION, "1")  # what the MLflow UI calls

    third = loop.round(captioner=_f1(85), t2i=_f1(85))
    assert third["champions"] == {"captioner": "1", "t2i": "2"}
    assert third["started"] == {"captioner": "cyclepref-captioner version 1", "t2i": "cyclepref-t2i version 2"}
    folder = loop.root / INIT["dpo_vlm"]
    assert (folder / "label").read_text() == "adapter-1"
    assert json.loads((folder / "champion.json").read_text()) == {"registered_model": "cyclepref-captioner",
                                                                  "version": "1"}
    assert (folder.parent / "adapter.dvc").exists() and (loop.root / INIT["diffusion_dpo"] / "label").read_text() \
        == "adapter-4"
    assert loop.compared == [("dpo_vlm", ["adapter-1", "adapter-5", "base"]),
                             ("diffusion_dpo", ["adapter-4", "adapter-6", "base"])]
    cap, t2i = third["out"]["captioner"], third["out"]["t2i"]
    assert cap.champion_version == "1" and cap.champion_accuracy == pytest.approx(np.mean(_f1(70)))
    assert cap.decision.promote and not t2i.decision.promote
    assert cap.versus_base.gain == pytest.approx(np.mean(_f1(85)) - np.mean(BASE)) and cap.versus_base.low > 0
    assert t2i.versus_base.challenger == pytest.approx(np.mean(_f1(95)))
    tags = loop.client.get_run(third["run"]).data.tags
    assert float(tags["retrain.captioner.versus_base_gain"]) == pytest.approx(0.8 * 35 / SCENES)
    assert loop.aliases("captioner") == {CHAMPION: "3", CHALLENGER: "3", PREVIOUS: "1"}
    assert loop.client.get_model_version("cyclepref-captioner", "3").tags["cyclepref.started_from"] == \
        "cyclepref-captioner version 1"

    loop.client.delete_registered_model_alias("cyclepref-t2i", CHAMPION)  # back to the base model
    fourth = loop.round(captioner=_f1(85), t2i=_f1(60))
    assert fourth["started"]["t2i"] == "base" and not (loop.root / INIT["diffusion_dpo"]).exists()
    assert loop.compared[-1] == ("diffusion_dpo", ["base", "adapter-8"])
    t2i = fourth["out"]["t2i"]
    assert t2i.decision.promote and t2i.versus_base == t2i.decision.comparison


def test_an_alias_a_person_moves_during_the_round_is_left_where_they_put_it(loop):
    loop.round(captioner=_f1(70), t2i=_f1(40))
    move = lambda: loop.client.set_registered_model_alias("cyclepref-t2i", CHAMPION, "1")  # noqa: E731
    second = loop.round(captioner=_f1(70), t2i=_f1(90), before_promotion=move)
    t2i = second["out"]["t2i"]
    assert t2i.champion_version is None and "was moved to 1 during the round" in t2i.decision.reason
    assert not t2i.decision.promote and loop.aliases("t2i") == {CHAMPION: "1", CHALLENGER: "2"}


def test_the_rounds_report_carries_the_policies_and_renders_rows_without_them(loop):
    from flows.retrain import Decision, RetrainResult

    out = loop.round(captioner=_f1(80), t2i=_f1(49))["out"]
    reward = RetrainResult("r1", "cyclereward", "4", "3", 0.8, 0.7, "b.jsonl", Decision(True, "better"),
                           policies=out)
    row = round_row(reward, "manual", "2025-01-01T00:00:00Z", 1.0, {})
    assert row["policies"]["captioner"]["promoted"] and row["policies"]["captioner"]["metric"] == "F1"
    assert not row["policies"]["t2i"]["promoted"] and row["policies"]["t2i"]["champion_before"] is None
    old = {k: v for k, v in row.items() if k != "policies"}
    text = rounds_markdown([old, json.loads(json.dumps(row))])
    first, second = text.splitlines()[-2:]
    assert first.endswith("| yes | none |")
    assert "captioner v1 F1 84.00% vs base 60.00%: +24.00" in second and "promoted; t2i v1" in second
    assert second.endswith("kept |") and "vs base:" not in second
    kept = RetrainResult("r2", "cyclereward", "5", "4", 0.8, 0.8, "b.jsonl", Decision(False, "tie"),
                         policies=loop.round(captioner=_f1(60), t2i=_f1(49))["out"])
    text = rounds_markdown([round_row(kept, "manual", "2025-01-02T00:00:00Z", 1.0, {})])
    assert "captioner v2 F1 68.00% vs v1 84.00%: -16.00" in text
    assert "kept (champion v1 vs base: 84.00% vs 60.00%, +24.00 [" in text


def test_policies_need_a_benchmark_their_own_models_round_stages_and_a_champion_folder_outside_outputs(tmp_path):
    from cyclepref.config import ParamsError
    from cyclepref.profiles import ingest_targets_in_outputs

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert set(parse_params(raw).retrain.policies) == {"captioner", "t2i"}
    for change, message in (
        (lambda r: r["retrain"].pop("policy_benchmark"), "needs retrain.policy_benchmark"),
        (lambda r: r["retrain"]["policies"]["t2i"].update(stage="dpo_vlm"), "one policy per stage"),
        (lambda r: r["retrain"]["policies"]["t2i"].update(registered_model="cyclereward"), "its own registered"),
        (lambda r: r["dpo_vlm"].pop("init_adapter"), "stage dpo_vlm needs its section with init_adapter"),
        (lambda r: r["retrain"]["stages"].remove("diffusion_dpo"), "stages leaves out diffusion_dpo, which the round"),
        (lambda r: r["retrain"].update(stages=["dpo_vlm", "diffusion_dpo"]), "leaves out train_reward"),
    ):
        bad = json.loads(json.dumps(raw))
        change(bad)
        with pytest.raises(ParamsError, match=message):
            parse_params(bad)
    inside = json.loads(json.dumps(raw))
    inside["dpo_vlm"]["init_adapter"] = "data/downstream/dpo_vlm/adapter"
    found = ingest_targets_in_outputs(parse_params(inside), ROOT / "dvc.yaml")
    assert found == [f"dpo_vlm.init_adapter = data/downstream/dpo_vlm/adapter overlaps data/downstream/dpo_vlm, an "
                     "output of stage dpo_vlm: a DVC checkout would delete what is ingested there; use a folder no "
                     "stage writes (e.g. data/pool)"]


def test_the_committed_rounds_never_let_a_champion_get_worse():
    """reports/retrain_rounds.json (the committed sandbox run): at least three rounds of 120 arrivals; every promotion
    has its paired interval above 0; each model's champion score never falls from round to round."""
    rows = json.loads((ROOT / "reports/retrain_rounds.json").read_text())
    assert sum(r["ingested"].get("images", 0) == 120 for r in rows) >= 3
    champions: dict[str, float] = {}
    for row in rows:
        for name, d in [("reward", row["reward"]), *row["policies"].items()]:
            if d["promoted"]:
                assert d["low"] > 0 and d["accuracy"] >= champions.get(name, 0.0), (name, d)
                champions[name] = d["accuracy"]
            elif d["champion_before"] is not None:
                assert d["champion_accuracy"] == pytest.approx(champions[name]), (name, d)
    captioner = rows[-1]["policies"]["captioner"]["versus_base"]
    assert captioner["low"] > 0
