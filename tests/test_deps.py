"""dvc.yaml's code deps are the stages' import closures, so `dvc repro` never calls stale outputs up to date."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import depcheck as dc

ROOT = Path(__file__).resolve().parents[1]


def test_every_stage_lists_exactly_the_modules_it_imports():
    problems = dc.report(ROOT)
    assert problems == {}, "\n".join(
        f"{stage}: add {missing or '-'}, remove {unused or '-'}" for stage, (missing, unused) in problems.items()
    )


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def test_closure_follows_lazy_relative_and_dynamic_imports(tmp_path):
    _write(tmp_path, {
        "cyclepref/__init__.py": "",
        "cyclepref/a.py": "def f():\n    from . import b\n",
        "cyclepref/b.py": "from cyclepref.sub.c import x\n",
        "cyclepref/sub/__init__.py": "",
        "cyclepref/sub/c.py": "x = 1\n",
        "cyclepref/unused.py": "",
        "cyclepref/train_one.py": "",
        "cyclepref/train_two.py": "",
        "tasks/__init__.py": "",
        "tasks/s.py": "import cyclepref.a\nDYNAMIC_IMPORTS = 'cyclepref.train_{item}'\n",
    })
    assert dc.closure(tmp_path, "tasks.s", "one") == {
        "tasks/__init__.py", "tasks/s.py", "cyclepref/__init__.py", "cyclepref/a.py", "cyclepref/b.py",
        "cyclepref/sub/__init__.py", "cyclepref/sub/c.py", "cyclepref/train_one.py",
    }
    deps = ["tasks/s.py", "cyclepref/a.py", "cyclepref/unused.py", "cyclepref/sub", "data/x"]
    missing, unused = dc.check_stage(tmp_path, "python -m tasks.s one", deps)
    assert missing == ["cyclepref/__init__.py", "cyclepref/b.py", "cyclepref/train_one.py", "tasks/__init__.py"]
    assert unused == ["cyclepref/unused.py"]
    missing, unused = dc.check_stage(tmp_path, "python -m tasks.s one", [*deps, "cyclepref"])
    assert missing == ["tasks/__init__.py"] and unused == ["cyclepref", "cyclepref/unused.py"]


def _status(project: Path) -> dict[str, set[str]]:
    out = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=project, check=True,
                         capture_output=True, text=True).stdout
    changed: dict[str, set[str]] = {}
    for stage, entries in json.loads(out or "{}").items():
        for entry in entries:
            if isinstance(entry, dict):
                changed.setdefault(stage, set()).update(
                    path for path, what in entry.get("changed deps", {}).items() if what == "modified")
    return changed


@pytest.mark.slow
def test_editing_a_shared_module_makes_exactly_its_importers_stale(tmp_path):
    """A copy of the project (code, dvc.yaml, dvc.lock, params): after an edit of cyclepref/workstore.py (item keys
    and seeds), `dvc status` names it as a modified dep of every stage that imports it and of no other."""
    project = tmp_path / "p"
    for package in dc.PACKAGES:
        shutil.copytree(ROOT / package, project / package, ignore=shutil.ignore_patterns("__pycache__"))
    (project / ".dvc").mkdir()
    for name in (".dvc/config", "dvc.yaml", "dvc.lock", "params.yaml"):
        shutil.copy(ROOT / name, project / name)
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    before = _status(project)
    with (project / "cyclepref/workstore.py").open("a") as f:
        f.write("\n# an edit\n")
    after = _status(project)
    newly = {stage for stage, paths in after.items() if "cyclepref/workstore.py" in paths - before.get(stage, set())}
    importers = {name for name, (cmd, _) in dc.stages(ROOT).items()
                 if "cyclepref/workstore.py" in dc.closure(ROOT, *dc.entry_of(cmd))}
    assert {"generate_i2t", "score_t2i", "make_benchmark", "best_of_n"} <= importers
    assert not any(s.startswith("train_world@") for s in importers)
    assert newly == importers


@pytest.mark.parametrize("profile", ["params.yaml", "configs/tiny.yaml", "configs/paper.yaml"])
def test_every_input_a_profile_names_is_a_dep_of_the_stage_reading_it(profile):
    from cyclepref.config import load_params
    from cyclepref.profiles import undeclared_inputs

    assert undeclared_inputs(load_params(ROOT / profile), ROOT / "dvc.yaml") == []


def test_a_stage_input_outside_its_deps_is_refused():
    import yaml

    from cyclepref.config import ParamsError, parse_params
    from cyclepref.profiles import require_sections

    data = yaml.safe_load((ROOT / "configs/paper.yaml").read_text())
    data["train_reward"]["data"]["t2i_path"] = "data/cycleprefdb/t2i"
    data["evaluate_reward"]["benchmarks"][0]["path"] = "elsewhere/pairs.jsonl"
    params = parse_params(data, "paper.yaml")
    with pytest.raises(ParamsError) as err:
        require_sections(params, ROOT / "dvc.yaml", "paper.yaml")
    assert "train_reward: train_reward.data.t2i_path = data/cycleprefdb/t2i" in str(err.value)
    assert "evaluate_reward: evaluate_reward.benchmarks[0].path = elsewhere/pairs.jsonl" in str(err.value)
    require_sections(params, ROOT / "dvc.yaml", "paper.yaml", ["dpo_vlm"])
