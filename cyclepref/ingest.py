"""Ingestion of new raw inputs (the retraining flow's first step): watch_dir -> inputs_dir/incoming/<stamp>/.

Images anywhere under watch_dir are copied with their relative paths; the rows of watch_dir/texts.jsonl are appended
to inputs_dir/<texts_file> with "file" rewritten to the copied path. What cannot be ingested safely is quarantined:
an image (or symlink) that resolves outside watch_dir, a line that is not UTF-8, JSON or an object, a row whose
"file" leaves watch_dir or names a quarantined image. Reasons go to watch_dir/.ingested/<stamp>/quarantine.jsonl and
into the counts; everything else (unreadable images, empty texts) is prepare_inputs' to judge.

Atomic: the copies and the new texts file are staged beside inputs_dir and renamed into place only when complete;
the originals move to watch_dir/.ingested/<stamp>/ after that. A failure leaves inputs_dir as it was and the watch
directory untouched, so the next run ingests everything once.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from cyclepref.inputs import IMAGE_SUFFIXES, InvalidInput, Quarantined, TextRow, read_texts
from cyclepref.paths import OutsideRoot, display, inside, relative_key

TEXTS = "texts.jsonl"
DONE = ".ingested"
QUARANTINE_FILE = "quarantine.jsonl"


def ingest_inputs(watch_dir: Path, inputs_dir: Path, texts_file: str | None) -> dict[str, int]:
    """Move new raw inputs from `watch_dir` into `inputs_dir`; counts of images, text rows and quarantined items."""
    watch_dir, inputs_dir = Path(watch_dir), Path(inputs_dir)
    if not watch_dir.is_dir():
        return _counts(0, 0, 0)
    images, bad_images = _new_images(watch_dir)
    texts = watch_dir / TEXTS
    if not images and not bad_images and not texts.exists():
        return _counts(0, 0, 0)
    if texts.exists() and (texts_file is None or not texts_file.endswith(".jsonl")):
        raise ValueError(f"{texts}: new texts need prepare_inputs.texts_file to be a .jsonl file, got {texts_file!r}")
    stamp = _stamp(inputs_dir)
    dest = f"incoming/{stamp}"
    rows, quarantined = read_texts(texts) if texts.exists() else ([], [])
    kept = []
    for row in rows:
        try:
            kept.append(_rewrite(row, watch_dir, dest, bad_images))
        except InvalidInput as err:
            quarantined.append(Quarantined(row.where, str(err)))
    target = inside(inputs_dir, texts_file) if texts.exists() else None
    _commit(watch_dir, inputs_dir, dest, images, kept, target)
    quarantined = [Quarantined(display(rel), reason) for rel, reason in bad_images.items()] + quarantined
    originals = [watch_dir / rel for rel in [*images, *bad_images]] + ([texts] if texts.exists() else [])
    _archive(watch_dir, stamp, originals, quarantined)
    return _counts(len(images), len(kept), len(quarantined))


def _counts(images: int, texts: int, quarantined: int) -> dict[str, int]:
    return {"images": images, "texts": texts, "quarantined": quarantined}


def _stamp(inputs_dir: Path) -> str:
    base = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    stamp, n = base, 1
    while (inputs_dir / "incoming" / stamp).exists():
        stamp, n = f"{base}-{n}", n + 1
    return stamp


def _new_images(watch_dir: Path) -> tuple[list[str], dict[str, str]]:
    """Relative paths of the image files to copy, and {relative path: reason} of those that must not be read."""
    good, bad = [], {}
    for p in sorted(watch_dir.rglob("*")):
        rel = p.relative_to(watch_dir)
        if DONE in rel.parts or p.suffix.lower() not in IMAGE_SUFFIXES or not (p.is_symlink() or p.is_file()):
            continue
        try:
            resolved = inside(watch_dir, rel)
        except OutsideRoot as err:
            bad[rel.as_posix()] = str(err)
            continue
        if resolved.is_file():
            good.append(rel.as_posix())
        else:
            bad[rel.as_posix()] = "not a regular file (broken link?)"
    return good, bad


def _rewrite(row: TextRow, watch_dir: Path, dest: str, bad_images: dict[str, str]) -> dict:
    """The row with "file" pointing at its copy under `dest`; InvalidInput when the file may not be read."""
    data = dict(row.data)
    file = data.get("file")
    if file is None:
        return data
    if not isinstance(file, str):
        raise InvalidInput(f"'file' has wrong type {type(file).__name__} (expected a relative path string)")
    try:
        key = relative_key(file)
        inside(watch_dir, key)
    except OutsideRoot as err:
        raise InvalidInput(str(err)) from None
    if key in bad_images:
        raise InvalidInput(f"its image {key} was quarantined ({bad_images[key]})")
    data["file"] = f"{dest}/{key}"
    return data


def _commit(
    watch_dir: Path, inputs_dir: Path, dest: str, images: list[str], rows: list[dict], texts_target: Path | None
) -> None:
    """Stage the copies and the extended texts file beside inputs_dir, then rename them into place."""
    inputs_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{inputs_dir.name}.ingest-", dir=inputs_dir.parent))
    try:
        files = staging / "files"
        for rel in images:
            (files / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(watch_dir / rel, files / rel)
        texts = staging / TEXTS
        if texts_target is not None:
            _extended_texts(texts_target, rows, texts)
        if images:
            (inputs_dir / "incoming").mkdir(exist_ok=True)
            os.replace(files, inputs_dir / dest)
        if texts_target is not None:
            os.replace(texts, texts_target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _extended_texts(current: Path, rows: list[dict], out: Path) -> None:
    """`current` (when it exists, newline-terminated) followed by `rows`, written to `out`."""
    data = current.read_bytes() if current.exists() else b""
    if data and not data.endswith(b"\n"):
        data += b"\n"
    out.write_bytes(data + b"".join(_jsonl_line(r) for r in rows))


def _jsonl_line(row: dict) -> bytes:
    """One UTF-8 JSON line; text that is not valid Unicode stays \\u-escaped for prepare_inputs to judge."""
    try:
        return (json.dumps(row, ensure_ascii=False) + "\n").encode()
    except UnicodeEncodeError:
        return (json.dumps(row) + "\n").encode()


def _archive(watch_dir: Path, stamp: str, originals: list[Path], quarantined: list[Quarantined]) -> None:
    """Move the originals to watch_dir/.ingested/<stamp>/ and list what was quarantined there."""
    done = watch_dir / DONE / stamp
    done.mkdir(parents=True, exist_ok=True)
    for src in originals:
        target = done / src.relative_to(watch_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(src, target)
    if quarantined:
        lines = "".join(json.dumps({"source": q.source, "reason": q.reason}) + "\n" for q in quarantined)
        (done / QUARANTINE_FILE).write_text(lines)
