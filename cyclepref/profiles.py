"""Which params sections the stages of dvc.yaml read, read from dvc.yaml itself (each stage's `params:` list, foreach
stages expanded), so a profile is checked against exactly the stages `dvc repro` will run, new ones included."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from cyclepref.config import Params, ParamsError

PARAMS_FILE = "params.yaml"
_TEMPLATE = re.compile(r"\$\{\s*(key|item)(?:\.([\w-]+))?\s*\}")


def stage_sections(dvc_file: str | Path) -> dict[str, set[str]]:
    """stage name (`gate@inputs` for foreach stages) -> the top-level params sections its `params:` list names."""
    data = yaml.safe_load(Path(dvc_file).read_text()) or {}
    out: dict[str, set[str]] = {}
    for name, stage in (data.get("stages") or {}).items():
        if "foreach" in stage:
            for key, item in _foreach(stage["foreach"]):
                out[f"{name}@{key}"] = _sections(stage.get("do", {}).get("params", []), key, item)
        else:
            out[name] = _sections(stage.get("params", []), None, None)
    return out


def _foreach(values: object) -> list[tuple[str, object]]:
    if isinstance(values, dict):
        return [(str(k), v) for k, v in values.items()]
    return [(str(v) if not isinstance(v, dict | list) else str(i), v) for i, v in enumerate(values or [])]


def _sections(entries: list, key: str | None, item: object) -> set[str]:
    keys: list[str] = []
    for entry in entries or []:
        if isinstance(entry, str):
            keys.append(entry)
        elif isinstance(entry, dict):
            keys += [k for file, ks in entry.items() if Path(str(file)).name == PARAMS_FILE for k in ks or []]
    heads = {_expand(k, key, item).split(".", 1)[0] for k in keys}
    return {h for h in heads if "${" not in h}


def _expand(text: str, key: str | None, item: object) -> str:
    def value(m: re.Match) -> str:
        base = key if m.group(1) == "key" else item
        if m.group(2) is not None:
            base = base.get(m.group(2)) if isinstance(base, dict) else None
        return m.group(0) if base is None else str(base)

    return _TEMPLATE.sub(value, text)


def missing_sections(params: Params, dvc_file: str | Path, stages: list[str] | None = None) -> dict[str, list[str]]:
    """section -> the stages (all of dvc.yaml's, or `stages`) that read it, for each section the profile lacks."""
    missing: dict[str, list[str]] = {}
    for stage, sections in stage_sections(dvc_file).items():
        if stages is not None and stage not in stages:
            continue
        for section in sorted(sections):
            if getattr(params, section, None) is None:
                missing.setdefault(section, []).append(stage)
    return missing


def require_sections(params: Params, dvc_file: str | Path, source: str, stages: list[str] | None = None) -> None:
    """Raise ParamsError naming every section the stages read that the profile `source` lacks."""
    missing = missing_sections(params, dvc_file, stages)
    if missing:
        lines = [f"  {section}: read by {', '.join(users)}" for section, users in missing.items()]
        raise ParamsError(f"{source}: missing section(s) that the stages of {dvc_file} read:\n" + "\n".join(lines))
