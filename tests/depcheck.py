"""Stage dependencies from import closures: every project module (cyclepref/, tasks/, flows/) that a stage's entry
point imports, directly or through other project modules, at any depth and inside functions too, must be one of the
stage's DVC deps; a listed module the stage does not import is an error as well (a spurious rerun), and so is a
listed project directory holding a module it does not import.

The entry point is the module of the stage's `python -m <module> [item]` command in dvc.yaml (the one place that
declares a stage: name, entry point, params sections, deps). A module-level string DYNAMIC_IMPORTS in the entry module
("pkg.mod_{item}") names the module it imports by the stage's item (train_world@<model> imports its trainer only).
Package __init__ modules count like any other module: they run on import.

    python tests/depcheck.py        prints, per stage, the modules to add to or remove from dvc.yaml
"""

from __future__ import annotations

import ast
import sys
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("cyclepref", "tasks", "flows")


def module_file(root: Path, name: str) -> Path | None:
    base = root.joinpath(*name.split("."))
    for f in (base / "__init__.py", base.with_suffix(".py")):
        if f.is_file():
            return f
    return None


def _named(node: ast.AST, package: str) -> set[str]:
    if isinstance(node, ast.Import):
        return {a.name for a in node.names}
    if isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            parts = package.split(".")[: len(package.split(".")) - node.level + 1]
            base = ".".join([*parts, base] if base else parts)
        return {base} | {f"{base}.{a.name}" for a in node.names}
    return set()


@cache
def direct_imports(root: Path, name: str, item: str | None = None) -> frozenset[str]:
    """Project modules `name` imports (with their parent packages), DYNAMIC_IMPORTS formatted with `item`."""
    path = module_file(root, name)
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    named: set[str] = set()
    for node in ast.walk(tree):
        named |= _named(node, package)
        if (item is not None and isinstance(node, ast.Assign) and len(node.targets) == 1
                and getattr(node.targets[0], "id", None) == "DYNAMIC_IMPORTS" and isinstance(node.value, ast.Constant)):
            named.add(node.value.value.format(item=item))
    found = set()
    for full in named:
        parts = full.split(".")
        if parts[0] in PACKAGES:
            found |= {".".join(parts[:i]) for i in range(1, len(parts) + 1)
                      if module_file(root, ".".join(parts[:i])) is not None}
    return frozenset(found)


def closure(root: Path, entry: str, item: str | None = None) -> set[str]:
    """Files (relative to root) of every project module the entry module imports, itself and its packages included."""
    seen: set[str] = set()
    parts = entry.split(".")
    todo = [(entry, item)] + [(".".join(parts[:i]), None) for i in range(1, len(parts))]
    while todo:
        name, it = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo += [(m, None) for m in direct_imports(root, name, it) if m not in seen]
    return {module_file(root, m).relative_to(root).as_posix() for m in seen}


def entry_of(cmd: str) -> tuple[str, str | None]:
    words = cmd.split()
    if words[:2] != ["python", "-m"] or len(words) not in (3, 4):
        raise ValueError(f"stage command is not `python -m <module> [item]`: {cmd!r}")
    return words[2], (words[3] if len(words) == 4 else None)


def check_stage(root: Path, cmd: str, deps: list[str]) -> tuple[list[str], list[str]]:
    """(missing, unused): project modules imported but not listed; listed modules or directories not imported."""
    entry, item = entry_of(cmd)
    imported = closure(root, entry, item)
    code = [d.rstrip("/") for d in deps if d.split("/")[0] in PACKAGES]
    covered = {f for f in imported if any(f == d or f.startswith(d + "/") for d in code)}
    unused = []
    for d in code:
        target = root / d
        files = ([p.relative_to(root).as_posix() for p in target.rglob("*.py")] if target.is_dir() else [d])
        if any(f not in imported for f in files):
            unused.append(d)
    return sorted(imported - covered), sorted(unused)


def stages(root: Path) -> dict[str, tuple[str, list[str]]]:
    """Every stage of dvc.yaml (foreach expanded, params interpolated by DVC itself): name -> (cmd, deps)."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        return {s.addressing: (s.cmd, [d.def_path for d in s.deps]) for s in repo.index.stages}


def report(root: Path = ROOT) -> dict[str, tuple[list[str], list[str]]]:
    """Stage -> (missing, unused) for every stage with a problem. The items of a foreach stage share one deps
    template (DVC cannot give items different lists), so a dep is unused only when no item of the group imports it."""
    checked = {name: check_stage(root, cmd, deps) for name, (cmd, deps) in stages(root).items()}
    groups: dict[str, list[str]] = {}
    for name in checked:
        groups.setdefault(name.split("@")[0], []).append(name)
    out = {}
    for members in groups.values():
        unused_by_all = set.intersection(*(set(checked[m][1]) for m in members))
        for m in members:
            missing, unused = checked[m][0], sorted(d for d in checked[m][1] if d in unused_by_all)
            if missing or unused:
                out[m] = (missing, unused)
    return out


if __name__ == "__main__":
    problems = report()
    for name, (missing, unused) in problems.items():
        print(f"{name}:\n  add:    {', '.join(missing) or '-'}\n  remove: {', '.join(unused) or '-'}")
    sys.exit(1 if problems else 0)
