"""Item-level work stores and sharded stage outputs.

DVC deletes a stage's declared outputs before it reruns the stage, so finished items are kept in a work store
under data/work/<stage>/ (not a DVC output): one parquet chunk per finished batch, each row carrying its item key.
A rerun skips keys already in the store (resume after a crash, or an incremental run after adding a model) and
the stage then publishes its output from the store: the rows of the current plan in key order, in shards of a
fixed size. The published bytes therefore depend only on the plan and the item results, not on which run
computed which item.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from cyclepref import store


def key_of(*parts: object) -> str:
    """A stable 16-hex-digit key of the parts (order matters, types are stringified)."""
    h = hashlib.sha256()
    for p in parts:
        h.update(repr(p).encode())
        h.update(b"\x1f")
    return h.hexdigest()[:16]


def seed_of(key: str) -> int:
    """A per-item generator seed derived from the item key (independent of item order and batch)."""
    return int(key[:15], 16)


class WorkStore:
    """Finished items of one stage, keyed by the `key` column of `schema`."""

    def __init__(self, root: Path, schema: pa.Schema, key: str):
        if key not in schema.names:
            raise ValueError(f"work store key {key!r} is not a column of its schema")
        self.root, self.schema, self.key = Path(root), schema, key
        self.root.mkdir(parents=True, exist_ok=True)
        self._index: dict[str, tuple[Path, int]] | None = None

    def _chunks(self) -> list[Path]:
        return sorted(self.root.glob("chunk-*.parquet"))

    def index(self) -> dict[str, tuple[Path, int]]:
        """key -> (chunk file, row) for every finished item."""
        if self._index is None:
            idx: dict[str, tuple[Path, int]] = {}
            for chunk in self._chunks():
                try:
                    keys = pq.read_table(chunk, columns=[self.key]).column(0).to_pylist()
                except (OSError, pa.ArrowInvalid):
                    chunk.unlink()
                    continue
                for row, k in enumerate(keys):
                    idx.setdefault(k, (chunk, row))
            self._index = idx
        return self._index

    def todo(self, keys: Iterable[str]) -> list[str]:
        done = self.index()
        return [k for k in keys if k not in done]

    def add(self, rows: pa.Table) -> None:
        """Persist one finished batch atomically."""
        if rows.num_rows == 0:
            return
        path = self.root / f"chunk-{uuid.uuid4().hex}.parquet"
        store.write_table(rows, path, self.schema)
        idx = self.index()
        for row, k in enumerate(rows.column(self.key).to_pylist()):
            idx.setdefault(k, (path, row))

    def rows(self, keys: Sequence[str]) -> pa.Table:
        """The stored rows for `keys`, in that order (reads only the chunks that hold them)."""
        idx = self.index()
        missing = [k for k in keys if k not in idx]
        if missing:
            raise KeyError(f"{self.root}: {len(missing)} item(s) not computed, e.g. {missing[:3]}")
        chunks = sorted({idx[k][0] for k in keys})
        tables = [store.conform(pq.read_table(c), self.schema, str(c)) for c in chunks]
        offsets, total = {}, 0
        for c, t in zip(chunks, tables, strict=True):
            offsets[c] = total
            total += t.num_rows
        combined = pa.concat_tables(tables) if tables else self.schema.empty_table()
        return combined.take(pa.array([offsets[idx[k][0]] + idx[k][1] for k in keys], type=pa.int64()))


def run_batches(
    keys: Sequence[str],
    work: WorkStore,
    batch_size: int,
    compute: Callable[[list[list[str]]], Iterable[pa.Table]],
    desc: str,
) -> int:
    """Compute the unfinished keys in batches (in the given order) and persist each finished batch as soon as it
    arrives. `compute` maps the list of key batches to an iterable of result tables in the same order (lazily, so
    an engine can keep several batches in flight). Returns the number of items computed."""
    from tqdm.auto import tqdm

    todo = work.todo(keys)
    batches = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
    disable = os.environ.get("CYCLEPREF_PROGRESS", "1") == "0"
    with tqdm(total=len(todo), desc=desc, unit="item", disable=disable or not todo, leave=False) as bar:
        for batch, rows in zip(batches, compute(batches), strict=True):
            work.add(rows)
            bar.update(len(batch))
    return len(todo)


def each(compute_one: Callable[[list[str]], pa.Table]) -> Callable[[list[list[str]]], Iterator[pa.Table]]:
    """`compute` for run_batches from a one-batch function, applied in the calling process."""
    return lambda batches: (compute_one(b) for b in batches)


def publish(
    keys: Sequence[str],
    out_dir: Path,
    schema: pa.Schema,
    rows_per_shard: int,
    make_rows: Callable[[list[str]], pa.Table],
) -> list[Path]:
    """Write the output table for `keys` (in that order) as out_dir/part-NNNNN.parquet shards, built shard by
    shard with `make_rows(keys_of_shard)` so memory stays bounded. Old shards are removed first."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("part-*.parquet"):
        old.unlink()
    paths = []
    for i, start in enumerate(range(0, max(len(keys), 1), rows_per_shard)):
        part = list(keys[start : start + rows_per_shard])
        table = make_rows(part) if part else schema.empty_table()
        paths.append(store.write_table(table, out_dir / f"part-{i:05d}.parquet", schema))
    return paths


def read_shards(out_dir: Path, schema: pa.Schema, columns: list[str] | None = None) -> pa.Table:
    parts = sorted(Path(out_dir).glob("part-*.parquet"))
    if not parts:
        raise FileNotFoundError(f"{out_dir}: no shards (has the stage that writes it run? try `dvc repro`)")
    tables = [store.conform(pq.read_table(p), schema, str(p)) for p in parts]
    table = pa.concat_tables(tables)
    return table.select(columns) if columns else table
