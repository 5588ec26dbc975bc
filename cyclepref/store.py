"""Tables on disk: schema-checked parquet, written atomically (temporary name, then rename), plus manifests.

Tables are written through pyarrow without pandas metadata and with fixed writer options, so the same rows in
the same order give byte-identical files (resume and reruns are checked against that).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from cyclepref.atomic import atomic_dir, atomic_path, temp_dir, temp_file, umask  # noqa: F401  (re-exported)


class SchemaError(ValueError):
    """A table that does not match its declared schema."""


def conform(table: pa.Table, schema: pa.Schema, name: str) -> pa.Table:
    """Check that `table` has exactly the schema's columns with castable types and no nulls in non-null fields."""
    missing = [f.name for f in schema if f.name not in table.column_names]
    extra = [c for c in table.column_names if c not in schema.names]
    if missing or extra:
        raise SchemaError(f"{name}: columns differ from schema (missing {missing}, unexpected {extra})")
    table = table.select(schema.names)
    try:
        table = table.cast(schema)
    except (ValueError, pa.ArrowNotImplementedError) as err:
        raise SchemaError(f"{name}: cannot cast to schema: {err}") from None
    for field in schema:
        if not field.nullable and table.column(field.name).null_count:
            raise SchemaError(f"{name}: column {field.name!r} has {table.column(field.name).null_count} null(s)")
    return table


def write_table(table: pa.Table, path: str | Path, schema: pa.Schema | None = None) -> Path:
    """Write one parquet file atomically; validate against `schema` when given."""
    path = Path(path)
    if schema is not None:
        table = conform(table, schema, str(path))
    table = table.replace_schema_metadata(None)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd", write_statistics=False, store_schema=True)
    return path


def read_table(path: str | Path, schema: pa.Schema | None = None) -> pa.Table:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: table not found (has the stage that writes it run? try `dvc repro`)")
    table = pq.read_table(path)
    return conform(table, schema, str(path)) if schema is not None else table


def write_json(obj: object, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    return path


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def table_digest(path: str | Path) -> str:
    """sha256 of a table as stored: of the file, or (a sharded table) of its part-*.parquet names and digests."""
    path = Path(path)
    if not path.is_dir():
        if not path.exists():
            raise FileNotFoundError(f"{path}: table not found (has the stage that writes it run? try `dvc repro`)")
        return file_digest(path)
    h = hashlib.sha256()
    for part in sorted(path.glob("part-*.parquet")):
        h.update(f"{part.name}:{file_digest(part)}\n".encode())
    return h.hexdigest()


def write_manifest(out_dir: str | Path, files: list[Path], **extra: object) -> Path:
    """_manifest.json (underscore: parquet dataset readers skip it): every file's size and sha256 plus counts."""
    out_dir = Path(out_dir)
    entries = {
        str(Path(f).relative_to(out_dir)): {"bytes": Path(f).stat().st_size, "sha256": file_digest(f)} for f in files
    }
    return write_json({"files": entries, **extra}, out_dir / "_manifest.json")


def canonical_safetensors(path: str | Path) -> Path:
    """Rewrite a .safetensors file with its JSON header keys sorted (the writer's metadata order is not stable
    across processes), so identical tensors and metadata give identical bytes. Tensor data is not touched."""
    import struct

    path = Path(path)
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    meta = header.pop("__metadata__", None)
    ordered = {"__metadata__": dict(sorted(meta.items()))} if meta is not None else {}
    ordered.update(sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]))
    text = json.dumps(ordered, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with atomic_path(path) as tmp:
        tmp.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n :])
    return path
