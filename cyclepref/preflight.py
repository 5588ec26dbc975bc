"""Preflight: before DVC hashes anything, look at every path a stage of dvc.yaml depends on (its deps, `${...}` filled
in from the active params, foreach stages expanded) for entries DVC cannot hash or would hang on: a file name that is
not UTF-8, a symbolic link loop, a dangling link, a FIFO, socket or device. Nothing is opened or followed out of the
scanned folder; one line per offending entry says what it is and how to fix it.

Run by `cyclepref repro`, the Prefect pipeline flow and `cyclepref profile check` (exit 2 on any finding).
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

import yaml

from cyclepref.config import Params, ParamsError
from cyclepref.paths import OutsideRoot, display, relative_key, special_kind
from cyclepref.profiles import _expand, _foreach


class PreflightError(ParamsError):
    """Entries under the stages' deps that DVC cannot hash; the message has one line per entry."""


def stage_dep_paths(dvc_file: str | Path, params: Params) -> list[str]:
    """Every dep of every stage in `dvc_file` (foreach stages expanded, `${a.b}` filled in from `params`), once."""
    data = yaml.safe_load(Path(dvc_file).read_text()) or {}
    values = params.model_dump()
    found: set[str] = set()
    for stage in (data.get("stages") or {}).values():
        if "foreach" in stage:
            deps = stage.get("do", {}).get("deps", [])
            found |= {_expand(d, k, item) for k, item in _foreach(stage["foreach"]) for d in deps}
        else:
            found |= set(stage.get("deps", []))
    return sorted({_fill(d, values) for d in found if isinstance(d, str)})


def _fill(text: str, values: dict) -> str:
    def value(m: re.Match) -> str:
        v: object = values
        for part in m.group(1).split("."):
            v = v.get(part) if isinstance(v, dict) else None
        return m.group(0) if v is None else str(v)

    return re.sub(r"\$\{\s*([\w.\-]+)\s*\}", value, text)


def entry_problem(path: Path) -> tuple[str, str] | None:
    """(what is wrong, the fix) for one directory entry that DVC cannot hash, else None. Reads only its metadata."""
    if not _utf8(path.name):
        return "file name is not valid UTF-8 (DVC fails on it)", "rename it to a UTF-8 name or move it out"
    if path.is_symlink():
        try:
            os.stat(path)
        except OSError as err:
            target = display(os.readlink(path))
            if err.errno == errno.ELOOP:
                return f"symbolic link loop (-> {target})", "remove the link"
            return f"dangling symbolic link (-> {target})", "remove the link or restore its target"
    kind = special_kind(path)
    if kind not in (None, "a directory"):
        return f"{kind}, not a regular file (DVC would hang or fail reading it)", "remove it"
    return None


def _utf8(name: str) -> bool:
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def scan(root: Path, dep: str) -> list[str]:
    """`<path>: <what>; fix: <fix>` for the dep `dep` (relative to root) and every entry under it, symlinked
    folders not entered."""
    top = Path(root) / dep
    if not top.is_symlink() and not top.exists():
        return []
    found = []
    for path, problem in [(top, entry_problem(top)), *_walk(top)]:
        if problem is not None:
            found.append(f"{display(path.relative_to(root))}: {problem[0]}; fix: {problem[1]}")
    return found


def _walk(top: Path) -> list[tuple[Path, tuple[str, str] | None]]:
    if top.is_symlink() or not top.is_dir():
        return []
    out: list[tuple[Path, tuple[str, str] | None]] = []

    def unreadable(err: OSError) -> None:
        out.append((Path(err.filename), (f"folder cannot be listed ({err.strerror})",
                                         "give the user running the pipeline read access, or remove it")))

    for base, dirs, files in os.walk(top, followlinks=False, onerror=unreadable):
        out += [(Path(base) / name, entry_problem(Path(base) / name)) for name in sorted(dirs + files)]
    return out


def problems(root: Path, dvc_file: str | Path, params: Params) -> list[str]:
    """Every offending entry under the deps of the stages of `dvc_file` (none outside root is looked at; a dvc.yaml
    that cannot be read is left to DVC to report)."""
    try:
        deps = stage_dep_paths(dvc_file, params)
    except (OSError, yaml.YAMLError, AttributeError, TypeError):
        return []
    found: list[str] = []
    for dep in deps:
        try:
            key = relative_key(dep)
        except OutsideRoot:
            continue
        if "${" not in key:
            found += scan(Path(root), key)
    return found


def require_clean(root: Path, dvc_file: str | Path, params: Params) -> None:
    """Raise PreflightError with one line per entry under a stage's deps that DVC cannot hash."""
    found = problems(root, dvc_file, params)
    if found:
        lines = "\n".join(f"  {line}" for line in found)
        raise PreflightError(f"preflight: {len(found)} entr{'y' if len(found) == 1 else 'ies'} under the stages' "
                             f"deps that DVC cannot hash:\n{lines}")
