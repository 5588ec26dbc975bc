"""Model adapters (captioners, text-to-image pipelines, similarity metrics) and the offline tiny model zoo."""

from __future__ import annotations

import os
from pathlib import Path


class ModelLoadError(RuntimeError):
    """A model that could not be loaded; the message names the path and the cause."""


def locate(path: str) -> str:
    """A local directory (as given); anything else is passed on as a hub id."""
    p = Path(path)
    if p.exists():
        if not p.is_dir():
            raise ModelLoadError(f"{path}: expected a model directory, found a file")
        return str(p)
    if p.parent.is_dir() and path.count("/") == 1:
        raise ModelLoadError(
            f"{path}: no such local model directory (read as a local path: its folder {p.parent} exists); "
            "build the offline zoo with `dvc repro bootstrap_models` or fix the path in params"
        )
    if path.startswith((".", "/")) or path.count("/") != 1:
        raise ModelLoadError(
            f"{path}: no such local model directory, and it is not a hub id (org/name); "
            "build the offline zoo with `dvc repro bootstrap_models` or fix the path in params"
        )
    return path


def local_spec(root: Path, spec):
    """A model spec whose path, relative to the project root, names a local directory, made loadable from the
    working directory: relative when the root is (under) it, so that saved configs name the model the same way on
    every checkout; absolute otherwise. A hub id is returned unchanged."""
    p = Path(root) / spec.path
    if not p.exists():
        return spec
    try:
        path = p.resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        path = p.resolve()
    return spec.model_copy(update={"path": str(path)})


def load_failed(path: str, err: Exception) -> ModelLoadError:
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    hint = " (HF_HUB_OFFLINE=1: hub ids must already be in the local cache)" if offline and not Path(path).exists() else ""
    return ModelLoadError(f"could not load model from {path}{hint}: {type(err).__name__}: {err}")


def fingerprint(path: str, revision: str | None = None, memo_file: Path | None = None) -> str:
    """Identity of a model's weights for item keys: for a local directory, a hash of every file's content (file
    hashes memoised by size and mtime in `memo_file`); for a hub id, the id and revision."""
    import hashlib
    import json

    p = Path(path)
    if not p.is_dir():
        return f"{path}@{revision or 'default'}"
    memo: dict = {}
    if memo_file is not None and memo_file.exists():
        try:
            memo = json.loads(memo_file.read_text())
        except json.JSONDecodeError:
            memo = {}
    h = hashlib.sha256()
    changed = False
    for f in sorted(q for q in p.rglob("*") if q.is_file()):
        st = f.stat()
        tag = f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        digest = memo.get(tag)
        if digest is None:
            fh = hashlib.sha256()
            with open(f, "rb") as fp:
                for block in iter(lambda: fp.read(1 << 20), b""):
                    fh.update(block)
            digest = memo[tag] = fh.hexdigest()
            changed = True
        h.update(f"{f.relative_to(p).as_posix()}:{digest}\n".encode())
    if memo_file is not None and changed:
        memo_file.parent.mkdir(parents=True, exist_ok=True)
        memo_file.write_text(json.dumps(memo))
    return h.hexdigest()[:16]
