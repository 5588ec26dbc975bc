"""Stages train_reward and evaluate_reward on pipeline tables, the `cyclepref score` CLI, and serving the logged
pyfunc with `mlflow models serve` over HTTP."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import mlflow
import pandas as pd
import pytest
import torch
from fixtures.pipeline_tables import write_params
from fixtures.reward.tables import write_reward_tables
from PIL import Image
from servers import free_port, stop, wait_until_up
from typer.testing import CliRunner

from cyclepref import stage
from cyclepref.cli import app
from cyclepref.reward import REPORTS, model_dir
from cyclepref.reward.model import RewardModel
from cyclepref.reward.pyfunc import MAX_IMAGE_PIXELS, MAX_TEXT_CHARS, log_reward_model
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
    (root / "reports" / "dq").mkdir(parents=True, exist_ok=True)
    (root / "reports" / "dq" / "pairs.json").write_text(json.dumps({"success": False, "gate": "pairs",
                                                                     "table": "pairs", "rows": 0, "checks": {}}))
    bench = write_benchmark(root)
    pairs = [json.loads(line) for line in (root / bench).read_text().splitlines()]
    ratings = [{"id": f"{r['id']}:{side}", "prompt": r["prompt"], "image": r[side], "human": human}
               for r in pairs if r["task"] == "t2i" for side, human in (("chosen", 2.0), ("rejected", 1.0))]
    (root / bench).with_name("ratings.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ratings))
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
            "baselines": [{"name": "backbone-itm", "kind": "blip_itm", "path": str(zoo / "tiny-blip-itm")}],
            "fit_splits": ["train"],
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
    assert set(test["t2i"]) == {"pairs", "combo", "clipscore", "backbone-itm", "random", "cycle"}
    assert set(report["train"]) == {"i2t", "t2i"} and "combo" in report["train"]["t2i"]
    assert test["t2i"]["cycle"]["accuracy"] == 1.0 and test["t2i"]["cycle"]["n"] == 6
    colours = report["colours"]
    assert colours["i2t"]["pairs"] == colours["t2i"]["pairs"] == 4
    assert 0.0 <= colours["t2i"]["combo"]["ci95_low"] <= colours["t2i"]["combo"]["accuracy"]
    assert "label-agreement reference" in (root / REPORTS["eval_md"]).read_text()
    paired = json.loads((root / evaluate_reward.PAIRED).read_text())
    assert set(paired) == {"colours"} and set(paired["colours"]) == {"i2t", "t2i", "both"}
    both = paired["colours"]["both"]["combo"]["random"]
    accuracy = {t: colours[t]["combo"]["accuracy"] - colours[t]["random"]["accuracy"] for t in ("i2t", "t2i")}
    assert both["n"] == 8 and both["gain"] == pytest.approx((accuracy["i2t"] + accuracy["t2i"]) / 2)
    against = paired["colours"]["t2i"]["combo"]
    assert set(against) == {"clipscore", "backbone-itm", "random", "cycle"}
    for other, g in against.items():
        assert g["n"] == 4 and g["ci95_low"] <= g["gain"] <= g["ci95_high"]
        assert g["gain"] == pytest.approx(colours["t2i"]["combo"]["accuracy"] - colours["t2i"][other]["accuracy"])
    assert "## colours / t2i: paired comparisons" in (root / REPORTS["eval_md"]).read_text()
    eval_run = client.get_run(ev["mlflow_run_id"])
    assert "test.t2i.combo.accuracy" in eval_run.data.metrics
    assert "colours.t2i_reference.combo.pairwise_acc_tie_calibrated" in eval_run.data.metrics
    md = (root / REPORTS["eval_md"]).read_text()
    assert "## colours / t2i, reference metric" in md and "| random |" in md.split("reference metric")[1]
    reference = mlflow.artifacts.load_dict(f"runs:/{ev['mlflow_run_id']}/eval_report.json")["reference"]
    assert reference["colours"]["clipscore"]["images"] == 8
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
        assert_refusals_keep_the_server_up(url, body, proc)
    finally:
        stop(proc)
        log.close()
    assert torch.isfinite(torch.tensor(scores)).all()


def assert_refusals_keep_the_server_up(url: str, good: dict, proc: subprocess.Popen) -> None:
    """Each kind of request the served model cannot score gets HTTP 400 and one short line naming the limit, never
    the input; the server answers a good request afterwards."""
    from fixtures.bad_inputs import decompression_bomb

    def b64(data: bytes) -> str:
        return base64.b64encode(data).decode()

    def encoded(img: Image.Image, fmt: str) -> str:
        buf = io.BytesIO()
        img.save(buf, format=fmt)
        return b64(buf.getvalue())

    secret = "a caption that must not come back"
    pixels, chars = f"limit is {MAX_IMAGE_PIXELS} pixels", f"limit is {MAX_TEXT_CHARS} characters"
    cases = [
        (["image", "text"], [b64(decompression_bomb(15000)), "a"], pixels),
        (["image", "text"], [encoded(Image.new("1", (4097, 4097)), "PNG"), "a"], pixels),
        (["image", "text"], [encoded(Image.new("RGB", (8, 8)), "TIFF"), "a"], "PNG, JPEG"),
        (["image", "text"], [png_b64((1, 2, 3)), "word " * 2_000_000], chars),
        (["picture", "caption"], [png_b64((1, 2, 3)), secret], "needs columns image and text"),
    ]
    for columns, row, limit in cases:
        response = httpx.post(f"{url}/invocations", json={"dataframe_split": {"columns": columns, "data": [row]}},
                              timeout=120)
        message = response.json()["message"]
        assert response.status_code == 400 and limit in message, response.text[:500]
        assert "\n" not in message and len(response.text) < 500 and secret not in response.text
    assert httpx.post(f"{url}/invocations", json=good, timeout=60).status_code == 200
    assert proc.poll() is None


def without_key_biases(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Weights without the attention key biases (text `*.self.key.bias`, the key third of the ViT's packed
    `qkv.bias`): parameters whose exact gradient is zero."""
    out = {}
    for name, t in state.items():
        if name.endswith("self.key.bias"):
            continue
        if name.endswith("self_attn.qkv.bias"):
            d = t.numel() // 3
            t = torch.cat([t[:d], t[2 * d :]])
        out[name] = t
    return out


def all_runs(client) -> list:
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def train_project(root: Path, zoo: Path, batch_size: int) -> None:
    """Reward tables that passed gate@pairs and a combo train_reward section (12 train pairs: 3 steps of 4)."""
    write_reward_tables(root)
    (root / "reports" / "dq").mkdir(parents=True, exist_ok=True)
    digest = table_digest(root / "data/pairs/pairs.parquet")
    (root / "reports" / "dq" / "pairs.json").write_text(json.dumps({"success": True, "digest": digest}))
    write_params(root, train_reward={
        "model": {"path": str(zoo / "tiny-blip-itm"), "max_length": 32}, "variants": ["combo"],
        "lr": {"combo": 1e-3}, "weight_decay": {"combo": 0.0}, "epochs": 2, "batch_size": batch_size,
        "grad_accum": 1, "validations_per_epoch": 3, "patience": 100,
    })


@pytest.mark.slow
def test_train_reward_relaunches_in_two_processes_and_equals_one_process_with_the_same_global_batch(
    zoo, mlflow_uri, tmp_path
):
    """CYCLEPREF_TRAIN_PROCESSES=2 on CPU (gloo): each process takes 2 of the 4 pairs of a micro-batch and DDP
    averages the two gradients, which equals one process on all 4 pairs up to the order of float32 sums (about
    1e-7 relative). Tolerance 1e-5 on scores and weights (measured: 1e-7 on scores, 5e-7 on weights after 6 AdamW
    steps), while training moves the weights by more than 100 times that. Attention key biases are left out: their
    exact gradient is zero (softmax ignores a shift shared by all keys), so AdamW turns float noise into lr-sized
    steps there (measured 1e-4) that change no score. Only rank 0 runs the stage wrapper, writes and tracks."""
    client = mlflow.MlflowClient()
    env = os.environ | {"CYCLEPREF_DEVICE": "cpu", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                        "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    models, histories = {}, {}
    for n in (1, 2):
        root = tmp_path / f"processes-{n}"
        root.mkdir()
        train_project(root, zoo, batch_size=4)
        before = {r.info.run_id for r in all_runs(client)}
        done = subprocess.run([sys.executable, "-m", "tasks.train_reward"], cwd=root, capture_output=True, text=True,
                              env=env | {"CYCLEPREF_TRAIN_PROCESSES": str(n)}, timeout=600, check=False)
        assert done.returncode == 0, done.stderr[-4000:]
        assert done.stdout.count("train_reward: variants=1") == 1
        new = [r for r in all_runs(client) if r.info.run_id not in before]
        assert sorted(r.info.run_name for r in new) == ["train_reward", "train_reward/combo"]
        child = next(r for r in new if r.info.run_name == "train_reward/combo")
        assert child.data.params["processes"] == str(n)
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "train/loss")]
        assert steps == list(range(1, 7))
        logged = mlflow.search_logged_models(experiment_ids=[child.info.experiment_id], output_format="list")
        assert [m.source_run_id for m in logged if m.source_run_id == child.info.run_id] == [child.info.run_id]
        models[n] = RewardModel.from_pretrained(root / model_dir("combo"))
        histories[n] = json.loads((root / REPORTS["train"]).read_text())["combo"]
        assert sorted(p.name for p in (root / "data" / "reward").iterdir()) == ["combo"]

    assert histories[1]["best_step"] == histories[2]["best_step"]
    assert histories[2]["best_val_loss"] == pytest.approx(histories[1]["best_val_loss"], abs=1e-5)
    one, two = (without_key_biases(models[n].state_dict()) for n in (1, 2))
    assert max((one[k] - two[k]).abs().max().item() for k in one) < 1e-5
    pairs = colour_pairs("i2t", 6, seed=5)
    images, texts = [e.image for e in pairs.examples], [e.chosen for e in pairs.examples]
    torch.testing.assert_close(models[2].score(images, texts), models[1].score(images, texts), atol=1e-5, rtol=0)
    untrained = RewardModel.from_backbone(str(zoo / "tiny-blip-itm"), max_length=32)
    start = without_key_biases(untrained.state_dict())
    assert max((one[k] - start[k]).abs().max().item() for k in one) > 100 * 1e-5
