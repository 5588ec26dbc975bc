"""Profile checks beyond the schema.

- Sections: which params sections the stages of dvc.yaml read, read from dvc.yaml itself (each stage's `params:`
  list, foreach stages expanded), so a profile is checked against exactly the stages `dvc repro` will run.
- Pinned models: every hub model carries a revision that is a commit hash (a `revision` key, or `@<commit>` after an
  `hf-hub:` id), so that the item keys name exact weights and a changed hub repository never goes unnoticed. A local
  directory needs none: its item key is the hash of its files.
- Pinned datasets: every entry of `datasets` (published data: DetailCaps, GenAI-Bench, CyclePrefDB, DCI) carries its
  pin, a commit hash for a hub dataset or a sha256 for an archive URL (`unpinned_datasets`).
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from pydantic import BaseModel

from cyclepref.config import Params, ParamsError

PARAMS_FILE = "params.yaml"
COMMIT = re.compile(r"^[0-9a-f]{40}$")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
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
    """Raise ParamsError naming every section the stages read that the profile `source` lacks, and every input path
    of a stage's section that dvc.yaml does not list among its deps."""
    missing = missing_sections(params, dvc_file, stages)
    if missing:
        lines = [f"  {section}: read by {', '.join(users)}" for section, users in missing.items()]
        raise ParamsError(f"{source}: missing section(s) that the stages of {dvc_file} read:\n" + "\n".join(lines))
    undeclared = [line for line in undeclared_inputs(params, dvc_file)
                  if stages is None or line.split(":", 1)[0] in stages]
    if undeclared:
        raise ParamsError(f"{source}: stage inputs missing from deps:\n" + "\n".join(f"  {u}" for u in undeclared))


def is_hub_id(path: str, root: Path) -> bool:
    """Loaders read `path` as a hub id when it has the form org/name and neither it nor its first component exists
    locally (`models/captioner-typo` beside a local `models/` folder is a local path that is missing)."""
    local = Path(root) / path
    return HUB_ID.match(path) is not None and not local.exists() and not local.parent.is_dir()


def unpinned_models(section: object, where: str, root: Path) -> list[str]:
    """`key: why` for every hub model under `section` (a params section, list or value) without a commit hash."""
    found: list[str] = []
    if isinstance(section, BaseModel):
        fields = type(section).model_fields
        path, revision = getattr(section, "path", None), getattr(section, "revision", "")
        pinned = COMMIT.match(revision or "")
        if "revision" in fields and isinstance(path, str) and is_hub_id(path, root) and not pinned:
            found.append(f"{where}: hub model {path} needs `revision: <40-hex commit hash>` (got {revision!r}); "
                         f"if it is meant as a local directory: {path} not found")
        for name in fields:
            found += unpinned_models(getattr(section, name), f"{where}.{name}", root)
    elif isinstance(section, list | tuple):
        for i, value in enumerate(section):
            found += unpinned_models(value, f"{where}[{i}]", root)
    elif isinstance(section, str) and section.startswith("hf-hub:"):
        if not COMMIT.match(section.partition("@")[2]):
            found.append(f"{where}: {section} needs a commit: hf-hub:<org/name>@<40-hex commit hash>")
    return found


def require_pinned(params: Params, source: str, root: Path, sections: set[str] | None = None) -> None:
    """Raise ParamsError naming every hub model of the profile (or of `sections`) without a commit hash."""
    names = sorted(sections) if sections is not None else list(type(params).model_fields)
    found = [line for name in names for line in unpinned_models(getattr(params, name, None), name, root)]
    if found:
        raise ParamsError(f"{source}: unpinned hub model(s):\n" + "\n".join(f"  {line}" for line in found))


def _local_paths(value: object, where: str) -> list[tuple[str, str]]:
    """(key, path) for every string under `value` stored in a field named path / *_path / clip that names a local
    file or directory: it has a `/`, is no `hf-hub:` id, and is no hub id where a model is meant (a section with a
    `revision`, or a `clip`)."""
    if isinstance(value, BaseModel):
        found = []
        fields = type(value).model_fields
        for name in fields:
            field = getattr(value, name)
            if isinstance(field, str) and (name in ("path", "clip") or name.endswith("_path")):
                model = name == "clip" or "revision" in fields
                if "/" in field and not field.startswith("hf-hub:") and not (model and HUB_ID.match(field)):
                    found.append((f"{where}.{name}", field))
            else:
                found += _local_paths(field, f"{where}.{name}")
        return found
    if isinstance(value, list | tuple):
        return [p for i, v in enumerate(value) for p in _local_paths(v, f"{where}[{i}]")]
    return []


def stage_deps(dvc_file: str | Path, params: Params) -> dict[str, list[str]]:
    """stage name -> its deps as written in dvc.yaml, `${a.b}` filled in from `params` (foreach stages left out)."""
    data = yaml.safe_load(Path(dvc_file).read_text()) or {}
    values = params.model_dump()

    def fill(m: re.Match) -> str:
        value: object = values
        for part in m.group(1).split("."):
            value = value.get(part) if isinstance(value, dict) else None
        return str(value)

    return {name: [re.sub(r"\$\{\s*([\w.\-]+)\s*\}", fill, d) for d in stage.get("deps", [])]
            for name, stage in (data.get("stages") or {}).items() if "foreach" not in stage}


def undeclared_inputs(params: Params, dvc_file: str | Path) -> list[str]:
    """`stage: key = path` for every local file or directory a stage's own params section names that is not among
    the stage's deps in dvc.yaml: a new version of it would leave the stage's outputs stale."""
    found = []
    for stage, deps in stage_deps(dvc_file, params).items():
        for key, path in _local_paths(getattr(params, stage, None), stage):
            norm = path.rstrip("/")
            if not any(norm == d.rstrip("/") or norm.startswith(d.rstrip("/") + "/") for d in deps):
                found.append(f"{stage}: {key} = {path} is not among its deps in {dvc_file}")
    return found


SHA256 = re.compile(r"^[0-9a-f]{64}$")


def unpinned_datasets(params: Params) -> list[str]:
    """`datasets.<name>: why` for every published dataset of the profile without its pin."""
    found = []
    for name, pin in sorted((params.datasets or {}).items()):
        if pin.hub is not None and not COMMIT.match(pin.revision or ""):
            found.append(f"datasets.{name}: hub dataset {pin.hub} needs `revision: <40-hex commit hash>` "
                         f"(got {pin.revision!r})")
        if pin.url is not None and not SHA256.match(pin.sha256 or ""):
            found.append(f"datasets.{name}: {pin.url} needs `sha256: <64-hex digest>` (got {pin.sha256!r})")
    return found


def require_pinned_datasets(params: Params, source: str) -> None:
    """Raise ParamsError naming every published dataset of the profile without its pin."""
    found = unpinned_datasets(params)
    if found:
        raise ParamsError(f"{source}: unpinned dataset(s):\n" + "\n".join(f"  {line}" for line in found))


def stage_outs(dvc_file: str | Path) -> set[str]:
    """Every output path of the stages of `dvc_file` (foreach stages expanded), as written there."""
    data = yaml.safe_load(Path(dvc_file).read_text()) or {}
    found: set[str] = set()
    for stage in (data.get("stages") or {}).values():
        if "foreach" in stage:
            outs = (stage.get("do") or {}).get("outs") or []
            found |= {_expand(_out_path(o), k, item) for k, item in _foreach(stage["foreach"]) for o in outs}
        else:
            found |= {_out_path(o) for o in stage.get("outs") or []}
    return {o.rstrip("/") for o in found}


def _out_path(entry: object) -> str:
    return next(iter(entry)) if isinstance(entry, dict) else str(entry)


def model_paths(value: object, where: str) -> list[tuple[str, str]]:
    """(key, path) for every model named by a path: the `path` of a section with a `revision` (models, metrics,
    backbones) or of a reward model entry, and every `clip`."""
    if isinstance(value, BaseModel):
        fields = type(value).model_fields
        found = []
        for name in fields:
            field = getattr(value, name)
            entry = "revision" in fields or type(value).__name__.endswith("ModelEntry")
            if isinstance(field, str) and (name == "clip" or (name == "path" and entry)):
                found.append((f"{where}.{name}", field))
            else:
                found += model_paths(field, f"{where}.{name}")
        return found
    if isinstance(value, list | tuple):
        return [p for i, v in enumerate(value) for p in model_paths(v, f"{where}[{i}]")]
    return []


def missing_models(params: Params, root: Path, dvc_file: str | Path | None = None) -> list[str]:
    """`key: local model path P not found` for every local model path of the profile that does not exist under root,
    unless a stage of `dvc_file` writes it and has not run yet (a hub id or an `hf-hub:` id is no local path)."""
    outs = stage_outs(dvc_file) if dvc_file is not None and Path(dvc_file).exists() else set()
    found = []
    for name in type(params).model_fields:
        for key, path in model_paths(getattr(params, name, None), name):
            if path.startswith("hf-hub:") or "/" not in path or is_hub_id(path, root) or (Path(root) / path).exists():
                continue
            norm = path.rstrip("/")
            if any(norm == o or norm.startswith(o + "/") and not (Path(root) / o).exists() for o in outs):
                continue
            found.append(f"{key}: local model path {path} not found (no such directory under {root}, and no stage "
                         f"writes it); fix the path or build the model first")
    return found


def stage_outputs(dvc_file: str | Path, params: Params) -> dict[str, list[str]]:
    """stage name -> the paths of its outs, metrics and plots in dvc.yaml, `${a.b}` filled in from `params`
    (a foreach stage over a list once per item, `${item}` filled in)."""
    data = yaml.safe_load(Path(dvc_file).read_text()) or {}
    values = params.model_dump()

    def fill(text: str, item: object) -> str:
        def value(m: re.Match) -> str:
            found: object = {"item": item, **values}
            for part in m.group(1).split("."):
                found = found.get(part) if isinstance(found, dict) else None
            return str(found)

        return re.sub(r"\$\{\s*([\w.\-]+)\s*\}", value, text)

    out: dict[str, list[str]] = {}
    for name, stage in (data.get("stages") or {}).items():
        body, items = (stage.get("do") or {}, stage["foreach"]) if "foreach" in stage else (stage, [None])
        for item in items if isinstance(items, list) else [None]:
            label = name if item is None else f"{name}@{item}"
            for key in ("outs", "metrics", "plots"):
                for entry in body.get(key) or []:
                    path = next(iter(entry)) if isinstance(entry, dict) else entry
                    out.setdefault(label, []).append(fill(str(path), item).rstrip("/"))
    return out


def ingest_targets_in_outputs(params: Params, dvc_file: str | Path) -> list[str]:
    """One line for each folder the retraining flow writes (prepare_inputs.pool, retrain.watch_dir, the policies'
    champion folders <stage>.init_adapter) that is, lies inside or holds a stage's output: a `dvc checkout` or `dvc repro` of that stage would delete what was ingested."""
    targets = {"prepare_inputs.pool": params.prepare_inputs.pool if params.prepare_inputs else None}
    if params.retrain is not None and params.retrain.watch_dir:
        targets["retrain.watch_dir"] = params.retrain.watch_dir
    for policy in (params.retrain.policies if params.retrain else {}).values():
        targets[f"{policy.stage}.init_adapter"] = getattr(params, policy.stage).init_adapter
    found = []
    for key, target in targets.items():
        if not target:
            continue
        norm = target.rstrip("/")
        for stage, outs in stage_outputs(dvc_file, params).items():
            for out in outs:
                if norm == out or norm.startswith(out + "/") or out.startswith(norm + "/"):
                    found.append(f"{key} = {target} overlaps {out}, an output of stage {stage}: a DVC checkout would "
                                 "delete what is ingested there; use a folder no stage writes (e.g. data/pool)")
    return found


def require_ingest_home(params: Params, dvc_file: str | Path, source: str) -> None:
    found = ingest_targets_in_outputs(params, dvc_file)
    if found:
        raise ParamsError(f"{source}: retraining target inside a stage output:\n" + "\n".join(f"  {f}" for f in found))
