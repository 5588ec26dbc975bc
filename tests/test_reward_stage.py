"""Stages train_reward and evaluate_reward on pipeline tables, the `cyclepref score` CLI, and serving the logged
pyfunc with `mlflow models serve` over HTTP."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys

import httpx
import mlflow
import pandas as pd
import pytest
import torch
from fixtures.pipeline_tables import write_params
from fixtures.reward.tables import write_reward_tables
from servers import free_port, wait_until_up
from PIL import Image
from typer.testing import CliRunner

from cyclepref import stage
from cyclepref.cli import app
from cyclepref.reward import REPORTS, model_dir
from cyclepref.reward.model import RewardModel
from cyclepref.reward.pyfunc import log_reward_model
from cyclepref.reward.synthetic import colour_pairs
from cyclepref.store import table_digest


def write_benchmark(root) -> str:
    """A small pairs jsonl with raw cycle scores (colour pairs of both tasks)."""
    (root / "bench" / "images").mkdir(parents=True)
    lines = []
    for task in ("i2t", "t2i"):
        for i, e in enumerate(colour_pairs(task, 4, seed=9).examples):
            names = {}
            for key in ("image", "chosen", "rejected"):
                value = getattr(e, key)
                if isinstance(value, Image.Image):
                    names[key] = f"images/{task}-{i}-{key}.png"
                    value.save(root / "bench" / names[key])
            rec = {"id": e.pair_id, "task": task, "chosen_cycle_score": 0.9, "rejected_cycle_score": 0.4,
                   "cycle_direction": "higher"}
            if task == "i2t":
                rec |= {"image": names["image"], "chosen": e.chosen, "rejected": e.rejected}
            else:
                rec |= {"prompt": e.prompt, "chosen": names["chosen"], "rejected": names["rejected"]}
            lines.append(json.dumps(rec))
    (root / "bench" / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    return "bench/pairs.jsonl"


def test_stages_train_evaluate_log_and_score_from_the_registry(zoo, mlflow_uri, tmp_path):
    root = tmp_path
    write_reward_tables(root)
    (root / "reports" / "dq").mkdir(parents=True)
    (root / "reports" / "dq" / "pairs.json").write_text(json.dumps({"success": False, "gate": "pairs",
                                                                     "table": "pairs", "rows": 0, "checks": {}}))
    bench = write_benchmark(root)
    write_params(
        root,
        train_reward={
            "model": {"path": str(zoo / "tiny-blip-itm"), "max_length": 32},
            "variants": ["combo"],
            "lr": {"combo": 1e-3},
            "weight_decay": {"combo": 0.0},
            "epochs": 1,
            "batch_size": 4,
            "grad_accum": 2,
            "validations_per_epoch": 2,
        },
        evaluate_reward={
            "models": [{"name": "combo", "path": model_dir("combo")}],
            "benchmarks": [{"name": "colours", "path": bench}],
            "clip": str(zoo / "tiny-open-clip"),
            "batch_size": 4,
        },
    )
    from tasks import evaluate_reward, train_reward

    with pytest.raises(SystemExit, match="train_reward: gate pairs failed"):
        stage.main("train_reward", train_reward.run)
    digest = table_digest(root / "data/pairs/pairs.parquet")
    (root / "reports" / "dq" / "pairs.json").write_text(json.dumps({"success": True, "digest": digest}))
    summary = stage.main("train_reward", train_reward.run)
    assert (root / model_dir("combo") / "model.safetensors").exists()
    metrics = json.loads((root / REPORTS["train"]).read_text())
    assert metrics["combo"]["best_step"] >= 1 and {"val_acc_i2t", "val_acc_t2i"} <= set(metrics["combo"])

    client = mlflow.MlflowClient()
    child = client.search_runs(
        [client.get_run(summary["mlflow_run_id"]).info.experiment_id],
        f"tags.mlflow.parentRunId = '{summary['mlflow_run_id']}'",
    )[0]
    assert child.info.run_name == "train_reward/combo"
    steps = [m.step for m in client.get_metric_history(child.info.run_id, "train/loss")]
    assert steps == [1, 2] and len(client.get_metric_history(child.info.run_id, "val/loss")) == 2
    assert len(child.data.params["data_digest"]) == 64
    config = mlflow.artifacts.load_dict(f"runs:/{child.info.run_id}/train_config.json")
    assert config["variants"] == ["combo"] and config["lr"] == {"combo": 1e-3}
    logged = mlflow.search_logged_models(experiment_ids=[child.info.experiment_id], output_format="list")
    assert [m.source_run_id for m in logged] == [child.info.run_id]
    info = mlflow.models.get_model_info(logged[0].model_uri)
    assert info.signature.inputs.input_names() == ["image", "text"]
    reqs = mlflow.pyfunc.get_model_dependencies(logged[0].model_uri)
    assert "torch==" in open(reqs).read()

    ev = stage.main("evaluate_reward", evaluate_reward.run)
    report = json.loads((root / REPORTS["eval"]).read_text())
    test = report["test"]
    assert test["i2t"]["pairs"] == 1 and test["t2i"]["pairs"] == 6
    assert set(test["t2i"]) == {"pairs", "combo", "clipscore", "random", "cycle"}
    assert test["t2i"]["cycle"]["accuracy"] == 1.0 and test["t2i"]["cycle"]["n"] == 6
    colours = report["colours"]
    assert colours["i2t"]["pairs"] == colours["t2i"]["pairs"] == 4
    assert 0.0 <= colours["t2i"]["combo"]["ci95_low"] <= colours["t2i"]["combo"]["accuracy"]
    assert "label-agreement reference" in (root / REPORTS["eval_md"]).read_text()
    eval_run = client.get_run(ev["mlflow_run_id"])
    assert "test.t2i.combo.accuracy" in eval_run.data.metrics
    full = mlflow.artifacts.load_dict(f"runs:/{ev['mlflow_run_id']}/eval_report.json")
    assert "label-agreement" in full["notes"]["cycle"]

    version = mlflow.register_model(logged[0].model_uri, "cyclereward-test")
    client.set_registered_model_alias("cyclereward-test", "champion", version.version)
    Image.new("RGB", (30, 30), (200, 30, 30)).save(root / "red.png")
    Image.new("RGB", (30, 30), (30, 30, 200)).save(root / "blue.png")
    out = CliRunner().invoke(
        app, ["score", "--model", "models:/cyclereward-test@champion", "red.png", "blue.png", "--text", "a red square"]
    )
    assert out.exit_code == 0, out.output
    header, *lines = out.stdout.strip().splitlines()
    assert header == "score\timage\ttext"
    printed = [float(line.split("\t")[0]) for line in lines]
    local = RewardModel.from_pretrained(root / model_dir("combo"))
    red, blue = Image.open(root / "red.png").convert("RGB"), Image.open(root / "blue.png").convert("RGB")
    expected = local.score([red, blue], ["a red square"] * 2).tolist()
    assert printed == pytest.approx(expected, abs=1e-5)
    (root / "batch.jsonl").write_text(json.dumps({"image": "blue.png", "text": "a red square", "id": 3}) + "\n")
    out = CliRunner().invoke(app, ["score", "-m", str(root / model_dir("combo")), "--jsonl", "batch.jsonl"])
    assert out.exit_code == 0, out.output
    row = json.loads(out.stdout.strip().splitlines()[-1])
    assert row["id"] == 3 and row["score"] == pytest.approx(expected[1], abs=1e-5)
    bad = CliRunner().invoke(app, ["score", "-m", "x", "red.png", "blue.png", "-t", "a", "-t", "b", "-t", "c"])
    assert bad.exit_code == 2


def png_b64(rgb: tuple[int, int, int]) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), rgb).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


@pytest.mark.slow
def test_logged_pyfunc_serves_scores_over_http(zoo, mlflow_uri, tmp_path):
    model = RewardModel.from_backbone(str(zoo / "tiny-blip-itm"), max_length=32)
    model.save_pretrained(tmp_path / "rm")
    mlflow.set_experiment("reward-serving")
    example = pd.DataFrame({"image": [base64.b64decode(png_b64((1, 2, 3)))], "text": ["a dark square"]})
    with mlflow.start_run():
        info = log_reward_model(tmp_path / "rm", input_example=example)
    served = mlflow.artifacts.download_artifacts(info.model_uri, dst_path=str(tmp_path / "served"))
    port = free_port()
    env = os.environ | {"PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", served, "-h", "127.0.0.1", "-p", str(port),
         "--env-manager", "local", "-w", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_up(proc, f"{url}/ping", tmp_path / "serve.log")
        colours = [(220, 30, 30), (30, 30, 220), (220, 30, 30)]
        texts = ["a red square", "a red square", "a blue square"]
        body = {"dataframe_split": {"columns": ["image", "text"],
                                    "data": [[png_b64(c), t] for c, t in zip(colours, texts, strict=True)]}}
        response = httpx.post(f"{url}/invocations", json=body, timeout=60)
        assert response.status_code == 200, response.text
        scores = [row["score"] for row in response.json()["predictions"]]
        images = [Image.new("RGB", (32, 32), c) for c in colours]
        assert scores == pytest.approx(model.score(images, texts).tolist(), abs=1e-5)
        bad = httpx.post(f"{url}/invocations", json={"dataframe_split": {"columns": ["text"], "data": [["x"]]}})
        assert bad.status_code >= 400
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        log.close()
    assert torch.isfinite(torch.tensor(scores)).all()
