"""git.dirty says whether the source differs from the commit, not whether the pipeline rewrote its own outputs; the
registered version's lineage is also a table in its description; the CLI prints its version."""

from __future__ import annotations

import subprocess

from flow_projects import GIT, init_repo
from typer.testing import CliRunner

from cyclepref.tracking import git_state, pipeline_outputs
from flows import lineage

DVC_YAML = """stages:
  gate:
    foreach: [inputs, pairs]
    do:
      cmd: python gate.py ${item}
      deps: [gate.py]
      outs:
        - reports/dq/${item}.json: {cache: false}
      metrics:
        - reports/metrics/gate_${item}.json: {cache: false}
  train:
    cmd: python train.py
    deps: [train.py]
    outs: [data/model, reports/train.md]
"""


def test_a_run_rewriting_its_tracked_outputs_leaves_the_checkout_clean(tmp_path):
    root = tmp_path / "p"
    root.mkdir()
    (root / "dvc.yaml").write_text(DVC_YAML)
    for name in ("gate.py", "train.py", "reports/dq/inputs.json", "reports/metrics/gate_inputs.json",
                 "reports/train.md", "dvc.lock"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("committed\n")
    init_repo(root)
    assert git_state(root)["git.dirty"] == "false"
    assert {"dvc.lock", "reports/dq/*.json", "reports/metrics/gate_*.json", "data/model"} <= set(
        pipeline_outputs(root))
    for name in ("reports/dq/inputs.json", "reports/metrics/gate_inputs.json", "reports/train.md", "dvc.lock"):
        (root / name).write_text("rewritten by a run\n")
    (root / "reports/dq/pairs.json").write_text("new output\n")
    (root / "data/model").mkdir(parents=True)
    (root / "data/model/weights.bin").write_text("x")
    assert git_state(root)["git.dirty"] == "false"
    (root / "train.py").write_text("edited source\n")
    assert git_state(root)["git.dirty"] == "true"
    subprocess.run([*GIT, "commit", "-qam", "edit"], cwd=root, check=True)
    assert git_state(root)["git.dirty"] == "false"
    (root / "new_module.py").write_text("untracked source\n")
    assert git_state(root)["git.dirty"] == "true"


def test_version_description_is_a_short_lineage_table():
    tags = {"cyclepref.train_run_id": "abc", "git.commit": "0123", "git.dirty": "false", "cyclepref.variant": "combo",
            "cyclepref.adapter.dpo_vlm": "models:/m-1", "other": "x"}
    text = lineage.version_description(tags)
    assert text.splitlines() == [
        "| lineage | value |", "|---|---|", "| trained by run | `abc` |", "| variant | `combo` |",
        "| git commit | `0123` |", "| source changed since the commit | `false` |",
        "| adapter of dpo_vlm | `models:/m-1` |"]


def test_cli_version():
    from importlib.metadata import version

    from cyclepref.cli import app

    done = CliRunner().invoke(app, ["--version"])
    assert done.exit_code == 0 and done.output.strip() == f"cyclepref {version('cyclepref')}"


def test_import_checkpoint_help_keeps_each_help_text_on_one_line_at_80_columns():
    from cyclepref.cli import app

    done = CliRunner().invoke(app, ["import-checkpoint", "--help"], env={"COLUMNS": "80", "TERM": "dumb"})
    assert done.exit_code == 0
    assert "An authors' CycleReward-*.pth state dict." in done.output
    assert not any(line.rstrip(" │").endswith("e.g.") for line in done.output.splitlines())
