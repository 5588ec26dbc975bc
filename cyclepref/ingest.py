"""Ingestion of new raw inputs into the pool (the retraining flow's first step): watch_dir -> pool/<stamp>/.

The pool (params `prepare_inputs.pool`) is the data home of inputs that arrive after a run: no stage writes it, every
batch is one folder `<stamp>/` holding the images (relative paths kept), `texts.jsonl` ("file" relative to the batch)
and `ingest.json` (counts and quarantine reasons). The flows track each batch with `dvc add`, so no checkout deletes
it; prepare_inputs reads every batch beside `prepare_inputs.path`.

What cannot be ingested safely is quarantined, never copied: an image or texts file (a symlink too) that resolves
outside watch_dir or is not a regular file, a file name that is not UTF-8, a texts line that is not UTF-8, JSON or an
object, a row whose "file" leaves watch_dir or names a quarantined image. Reasons go to
watch_dir/.ingested/<stamp>/quarantine.jsonl and into the counts; the rest is prepare_inputs' to judge.

One transaction per batch, journaled in watch_dir/.ingesting/:
1. claim: the journal `<stamp>.json` (the entries to take) is written atomically, then each entry is renamed into
   `.ingesting/<stamp>/` (the original moves; nothing is read outside watch_dir);
2. stage: the batch is built in a staging folder beside the pool (`.<pool>.staging-<stamp>`);
3. commit: one rename, staging -> pool/<stamp>;
4. archive: `.ingesting/<stamp>` -> `.ingested/<stamp>` (one rename), then the journal is removed.
Every run first replays the batches its journals list (finishing the claim, skipping the build when pool/<stamp>
exists) and removes stale staging folders, so a retry after a failure or a kill at any point yields exactly one copy
of every input. One ingest at a time per watch folder (the retraining flow holds the round lock).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from cyclepref.inputs import IMAGE_SUFFIXES, InvalidInput, Quarantined, TextRow, read_texts
from cyclepref.paths import OutsideRoot, display, inside, relative_key

TEXTS = "texts.jsonl"
DONE = ".ingested"
CLAIMED = ".ingesting"
QUARANTINE_FILE = "quarantine.jsonl"
BATCH_RECORD = "ingest.json"
HIDDEN = (DONE, CLAIMED)


def ingest_inputs(watch_dir: Path, pool: Path) -> dict[str, int]:
    """Move new raw inputs from `watch_dir` into a new batch of `pool` (after replaying unfinished batches); counts
    of images, text rows and quarantined items over every batch this call completed."""
    watch_dir, pool = Path(watch_dir), Path(pool)
    totals = _counts(0, 0, 0)
    if not watch_dir.is_dir():
        return totals
    remove_stale_staging(pool)
    claimed = watch_dir / CLAIMED
    for unwritten in claimed.glob("*.json.tmp"):
        unwritten.unlink()
    stamps = sorted(p.stem for p in claimed.glob("*.json"))
    for stamp in [*stamps, None]:
        if stamp is None:
            entries = _new_entries(watch_dir)
            if not entries:
                break
            stamp = _stamp(watch_dir, pool)
            _write_journal(claimed / f"{stamp}.json", entries)
        for key, n in _complete(watch_dir, pool, stamp).items():
            totals[key] += n
    return totals


def _counts(images: int, texts: int, quarantined: int) -> dict[str, int]:
    return {"images": images, "texts": texts, "quarantined": quarantined}


def remove_stale_staging(pool: Path) -> list[Path]:
    """Remove the staging folders an interrupted ingest left beside `pool`; the removed paths."""
    stale = sorted(pool.parent.glob(f".{pool.name}.staging-*")) if pool.parent.is_dir() else []
    for path in stale:
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    return stale


def _stamp(watch_dir: Path, pool: Path) -> str:
    base = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    stamp, n = base, 1
    taken = (pool / stamp, watch_dir / DONE / stamp, watch_dir / CLAIMED / stamp, watch_dir / CLAIMED / f"{stamp}.json")
    while any(p.exists() for p in taken):
        stamp, n = f"{base}-{n}", n + 1
        taken = (pool / stamp, watch_dir / DONE / stamp, watch_dir / CLAIMED / stamp,
                 watch_dir / CLAIMED / f"{stamp}.json")
    return stamp


def _new_entries(watch_dir: Path) -> list[str]:
    """Relative paths (os.fsdecode form) of what the next batch takes: entries with an image suffix that are not
    directories (files, symlinks, FIFOs...) anywhere under watch_dir, and a top-level texts.jsonl of any kind."""
    found = []
    for top, dirs, files in os.walk(watch_dir, followlinks=False):
        rel_top = Path(top).relative_to(watch_dir)
        if rel_top == Path("."):
            dirs[:] = [d for d in dirs if d not in HIDDEN]
        names = files + [d for d in dirs if (Path(top) / d).is_symlink()]
        for name in names:
            rel = (rel_top / name).as_posix()
            if rel == TEXTS or Path(name).suffix.lower() in IMAGE_SUFFIXES:
                found.append(rel)
    if (watch_dir / TEXTS).is_symlink() and TEXTS not in found:
        found.append(TEXTS)
    return sorted(found)


def _write_journal(path: Path, entries: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"entries": entries}))
    os.replace(tmp, path)


def _complete(watch_dir: Path, pool: Path, stamp: str) -> dict[str, int]:
    """Steps 1-4 for the batch `stamp`, each skipped when an earlier run already did it."""
    journal = watch_dir / CLAIMED / f"{stamp}.json"
    done = watch_dir / DONE / stamp
    if done.exists():
        journal.unlink()
        return _counts(0, 0, 0)
    claimed = watch_dir / CLAIMED / stamp
    _claim(watch_dir, claimed, json.loads(journal.read_text())["entries"])
    batch = pool / stamp
    record = json.loads((batch / BATCH_RECORD).read_text()) if batch.exists() else _build(claimed, pool, stamp)
    if record["quarantined"]:
        lines = "".join(json.dumps(q) + "\n" for q in record["quarantined"])
        (claimed / QUARANTINE_FILE).write_text(lines)
    done.parent.mkdir(parents=True, exist_ok=True)
    os.replace(claimed, done)
    journal.unlink()
    return _counts(record["images"], record["texts"], len(record["quarantined"]))


def _claim(watch_dir: Path, claimed: Path, entries: list[str]) -> None:
    """Rename every journal entry still in watch_dir into `claimed` (same relative path); folders it empties go."""
    claimed.mkdir(parents=True, exist_ok=True)
    for rel in entries:
        src, dst = watch_dir / rel, claimed / rel
        if os.path.lexists(src) and not os.path.lexists(dst):
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.rename(src, dst)
            _remove_empty_parents(src.parent, watch_dir)


def _remove_empty_parents(folder: Path, stop: Path) -> None:
    while folder != stop and folder.is_relative_to(stop):
        try:
            folder.rmdir()
        except OSError:
            return
        folder = folder.parent


def _build(claimed: Path, pool: Path, stamp: str) -> dict:
    """Build the batch from the claimed originals in a staging folder and rename it to pool/<stamp> (only when it
    holds an image or a text row); the batch record."""
    images, bad = _classify(claimed)
    rows, quarantined = _texts(claimed, bad)
    quarantined = [Quarantined(display(rel), reason) for rel, reason in bad.items()] + quarantined
    record = {"stamp": stamp, "images": len(images), "texts": len(rows),
              "quarantined": [{"source": q.source, "reason": q.reason} for q in quarantined]}
    if not (images or rows):
        return record
    pool.mkdir(parents=True, exist_ok=True)
    staging = pool.parent / f".{pool.name}.staging-{stamp}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    for rel in images:
        (staging / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(inside(claimed, rel), staging / rel)
    if rows:
        (staging / TEXTS).write_bytes(b"".join(_jsonl_line(r) for r in rows))
    (staging / BATCH_RECORD).write_text(json.dumps(record, indent=1) + "\n")
    os.replace(staging, pool / stamp)
    return record


def _classify(claimed: Path) -> tuple[list[str], dict[str, str]]:
    """Relative paths of the claimed images to copy, and {relative path: reason} of those that must not be read."""
    good, bad = [], {}
    for rel in _new_entries(claimed):
        if rel == TEXTS:
            continue
        reason = _unsafe(claimed, rel)
        if reason:
            bad[rel] = reason
        else:
            good.append(rel)
    return good, bad


def _unsafe(root: Path, rel: str) -> str | None:
    """Why `root/rel` may not be read (None when it is a regular file inside root with a UTF-8 name)."""
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        return "file name is not valid UTF-8 (DVC cannot track it): rename it and drop it again"
    if (root / rel).is_symlink():
        try:
            (root / rel).resolve(strict=True)
        except RuntimeError:
            return "symbolic link loop: cannot be resolved; remove the link"
        except OSError:
            return "dangling symbolic link: cannot be resolved; remove the link or restore its target"
    try:
        resolved = inside(root, rel)
    except OutsideRoot as err:
        return str(err).replace(display(root), "the watch folder")
    return None if resolved.is_file() else "not a regular file (broken link, FIFO or device?)"


def _texts(claimed: Path, bad_images: dict[str, str]) -> tuple[list[dict], list[Quarantined]]:
    """The claimed texts.jsonl's rows with "file" checked, and what was quarantined (the whole file when unsafe)."""
    if not os.path.lexists(claimed / TEXTS):
        return [], []
    reason = _unsafe(claimed, TEXTS)
    if reason:
        return [], [Quarantined(TEXTS, reason)]
    rows, quarantined = read_texts(claimed / TEXTS)
    kept = []
    for row in rows:
        try:
            kept.append(_checked(row, claimed, bad_images))
        except InvalidInput as err:
            quarantined.append(Quarantined(row.where, str(err)))
    return kept, quarantined


def _checked(row: TextRow, root: Path, bad_images: dict[str, str]) -> dict:
    """The row, its "file" in normal form; InvalidInput when the file may not be read."""
    data = dict(row.data)
    file = data.get("file")
    if file is None:
        return data
    if not isinstance(file, str):
        raise InvalidInput(f"'file' has wrong type {type(file).__name__} (expected a relative path string)")
    try:
        key = relative_key(file)
        inside(root, key)
    except OutsideRoot as err:
        raise InvalidInput(str(err).replace(display(root), "the watch folder")) from None
    if key in bad_images:
        raise InvalidInput(f"its image {key} was quarantined ({bad_images[key]})")
    data["file"] = key
    return data


def _jsonl_line(row: dict) -> bytes:
    """One UTF-8 JSON line; text that is not valid Unicode stays \\u-escaped for prepare_inputs to judge."""
    try:
        return (json.dumps(row, ensure_ascii=False) + "\n").encode()
    except UnicodeEncodeError:
        return (json.dumps(row) + "\n").encode()


def pool_batches(pool: Path) -> list[Path]:
    """The committed batches of a pool, oldest first (hidden entries and DVC/git files left out)."""
    if not pool.is_dir():
        return []
    return sorted(p for p in pool.iterdir() if not p.name.startswith(".") and p.is_dir() and not p.is_symlink())
