"""What a client of the reward model sees: the MLflow scoring server's answers to good and bad rows, and the
`cyclepref score` output."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from cyclepref.cli import app


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory) -> Path:
    from cyclepref.models import zoo
    from cyclepref.reward.model import RewardModel

    root = tmp_path_factory.mktemp("reward")
    backbone = zoo.build("blip_itm", root / "zoo", seed=0, image_size=32)
    return RewardModel.from_backbone(str(backbone), seed=0, max_length=16).save_pretrained(root / "model")


def _png(colour: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def server(reward_dir, mlflow_uri):
    """The app `mlflow models serve` runs, on the logged reward model, in process."""
    import mlflow
    from fastapi.testclient import TestClient
    from mlflow.pyfunc import scoring_server

    from cyclepref import tracking
    from cyclepref.reward.pyfunc import log_reward_model

    mlflow.set_experiment(experiment_id=tracking.experiment_id(mlflow.MlflowClient()))
    with mlflow.start_run():
        info = log_reward_model(reward_dir)
    return TestClient(scoring_server.init(mlflow.pyfunc.load_model(info.model_uri)))


def _invoke(server, rows: list[list]) -> tuple[int, dict]:
    data = [[None if image is None else base64.b64encode(image).decode(), text] for image, text in rows]
    body = {"dataframe_split": {"columns": ["image", "text"], "data": data}}
    response = server.post("/invocations", json=body, headers={"Content-Type": "application/json"})
    return response.status_code, response.json()


def test_good_rows_are_scored(server):
    status, body = _invoke(server, [[_png("red"), "a red square"], [_png("blue"), "a red square"]])
    assert status == 200 and len(body["predictions"]) == 2


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ([b"not an image at all", "a red square"],
         "row 1: image is not a PNG or JPEG file (19 bytes); the formats accepted are PNG, JPEG"),
        ([_png("blue"), None], "row 1: text is null; every row needs a non-empty text"),
        ([_png("blue"), "   "], "row 1: text is empty; every row needs a non-empty text"),
    ],
    ids=["not-an-image", "null-text", "empty-text"],
)
def test_a_bad_row_gets_one_line_naming_it_and_no_stack_trace(server, row, message):
    status, body = _invoke(server, [[_png("red"), "a red square"], row])
    assert status == 400
    assert body["message"] == message and body["error_code"] == "INVALID_PARAMETER_VALUE"
    assert "stack_trace" not in body and "Traceback" not in json.dumps(body)


def test_score_prints_a_header_or_json(reward_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "red.png").write_bytes(_png("red"))
    (tmp_path / "blue.png").write_bytes(_png("blue"))
    args = ["score", "-m", str(reward_dir), "red.png", "blue.png", "-t", "a red\nsquare"]
    tsv = CliRunner().invoke(app, args)
    assert tsv.exit_code == 0, tsv.output
    header, *lines = tsv.stdout.strip().splitlines()
    assert header == "score\timage\ttext"
    assert [line.split("\t")[1:] for line in lines] == [["red.png", "a red square"], ["blue.png", "a red square"]]
    scores = [float(line.split("\t")[0]) for line in lines]

    as_json = CliRunner().invoke(app, [*args, "--format", "json"])
    rows = [json.loads(line) for line in as_json.stdout.strip().splitlines()]
    assert [r["image"] for r in rows] == ["red.png", "blue.png"]
    assert [r["score"] for r in rows] == pytest.approx(scores, abs=1e-6)


def test_score_input_errors_are_one_line_with_exit_2(reward_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "batch.jsonl").write_text('{"image": "red.png", "text": "a"}\nnot json\n')
    cases = {
        "bad-line": ["score", "-m", str(reward_dir), "--jsonl", "batch.jsonl"],
        "no-file": ["score", "-m", str(reward_dir), "--jsonl", "missing.jsonl"],
        "format": ["score", "-m", str(reward_dir), "red.png", "-t", "a", "--format", "xml"],
    }
    for name, args in cases.items():
        out = CliRunner().invoke(app, args)
        assert out.exit_code == 2, name
        assert len(out.output.strip().splitlines()) == 1 and "Traceback" not in out.output, name
    assert "batch.jsonl:2: not valid JSON" in CliRunner().invoke(app, cases["bad-line"]).output
