"""Input loaders and the prepare_inputs logic.

Sources (params `prepare_inputs.source`):
- folder: every image file under `path` (sorted, recursive); optional `texts_file` (relative to `path`) jsonl with
  {"file": <relative path>, "prompt": <T2I input text>, "caption": <human detailed caption>} per line.
  Without an image, a jsonl/txt prompts file is also a folder source's `texts_file` (lines with "prompt" but no
  existing "file" become text-only inputs); a .txt texts file holds one prompt per line.
- dci: the DCI download layout: `photos/<image>`, `annotations/<name>.json` ({"image", "short_caption",
  "extra_caption", "summary": str | [str, ...]}), `splits.json` ({"train": [<annotation file>, ...], ...}).
- hf_datasets: a directory written by `datasets.Dataset(Dict).save_to_disk` with an image and a text column.

Every raw item becomes either a normalised input (RGB, EXIF orientation applied, PNG bytes, id = content hash)
or a quarantine record (source, reason). Nothing is dropped silently.
"""

from __future__ import annotations

import hashlib
import io
import json
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
from PIL import Image, ImageOps

from cyclepref.config import PrepareInputs

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}

INPUTS_SCHEMA = pa.schema(
    [
        pa.field("input_id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("image", pa.binary(), nullable=True),
        pa.field("width", pa.int32(), nullable=True),
        pa.field("height", pa.int32(), nullable=True),
        pa.field("prompt", pa.string(), nullable=True),
        pa.field("caption", pa.string(), nullable=True),
    ]
)

QUARANTINE_SCHEMA = pa.schema(
    [
        pa.field("source", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
    ]
)


@dataclass(frozen=True)
class RawItem:
    """One item as read from a source, before validation. `image` is a path, raw bytes, a PIL image or None."""

    source: str
    image: object | None
    prompt: object | None = None
    caption: object | None = None


@dataclass(frozen=True)
class Quarantined:
    source: str
    reason: str


@dataclass(frozen=True)
class PreparedInput:
    input_id: str
    source: str
    image: bytes | None
    width: int | None
    height: int | None
    prompt: str | None
    caption: str | None


class InvalidInput(ValueError):
    pass


# ---------------------------------------------------------------- loaders


def _read_texts_file(path: Path) -> list[dict]:
    if not path.exists():
        raise FileNotFoundError(f"texts file {path} not found (prepare_inputs.texts_file)")
    if path.suffix == ".txt":
        return [{"prompt": line.strip()} for line in path.read_text().splitlines() if line.strip()]
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{n}: not valid JSON ({err.msg}); fix or remove the line") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{n}: expected a JSON object per line")
        rows.append(row)
    return rows


def iter_folder(root: Path, texts_file: Path | None) -> Iterator[RawItem]:
    """Images under `root` (with texts from `texts_file` when given) and text-only rows of the texts file."""
    if not root.is_dir():
        raise FileNotFoundError(f"input folder {root} not found (prepare_inputs.path)")
    texts = _read_texts_file(texts_file) if texts_file else []
    by_file: dict[str, dict] = {}
    for row in texts:
        if row.get("file") is not None:
            by_file[str(row["file"])] = row
    seen: set[str] = set()
    for p in sorted(root.rglob("*")):
        if not p.is_file() or p.suffix.lower() not in IMAGE_SUFFIXES:
            continue
        rel = p.relative_to(root).as_posix()
        seen.add(rel)
        row = by_file.get(rel, {})
        yield RawItem(source=rel, image=p, prompt=row.get("prompt"), caption=row.get("caption"))
    for n, row in enumerate(texts):
        f = row.get("file")
        if f is None:
            yield RawItem(source=f"{texts_file.name}#{n + 1}", image=None, prompt=row.get("prompt", row.get("text")))
        elif str(f) not in seen:
            yield RawItem(source=str(f), image=root / str(f), prompt=row.get("prompt"), caption=row.get("caption"))


def iter_dci(root: Path, text: str, split: str) -> Iterator[RawItem]:
    """The DCI layout: photos/, annotations/*.json, splits.json."""
    photos, annotations = root / "photos", root / "annotations"
    for d in (photos, annotations):
        if not d.is_dir():
            raise FileNotFoundError(f"DCI layout: {d} not found (expected photos/, annotations/, splits.json)")
    if split == "all":
        names = sorted(p.name for p in annotations.glob("*.json"))
    else:
        splits_file = root / "splits.json"
        if not splits_file.exists():
            raise FileNotFoundError(f"DCI layout: {splits_file} not found (needed for split={split!r})")
        splits = json.loads(splits_file.read_text())
        if split not in splits:
            raise ValueError(f"{splits_file}: no split {split!r} (has {sorted(splits)})")
        names = sorted(splits[split])
    for name in names:
        ann_path = annotations / name
        try:
            ann = json.loads(ann_path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            yield RawItem(source=f"annotations/{name}", image=None, prompt=_Unreadable(f"annotation unreadable: {err}"))
            continue
        summary = ann.get("summary")
        if isinstance(summary, list):
            summary = summary[0] if summary else None
        prompt = summary if text == "summary" else ann.get("short_caption")
        caption = " ".join(s for s in (ann.get("short_caption"), ann.get("extra_caption")) if isinstance(s, str))
        image = ann.get("image")
        yield RawItem(
            source=f"photos/{image}" if image else f"annotations/{name}",
            image=photos / image if image else _Unreadable("annotation has no 'image' key"),
            prompt=prompt,
            caption=caption or None,
        )


def iter_hf_datasets(path: Path, image_column: str, text_column: str, split: str | None) -> Iterator[RawItem]:
    """A `datasets` directory from save_to_disk (Dataset or DatasetDict)."""
    import datasets

    if not path.exists():
        raise FileNotFoundError(f"datasets directory {path} not found (prepare_inputs.path)")
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if split is None:
            if len(ds) != 1:
                raise ValueError(f"{path}: a DatasetDict with splits {list(ds)}; set prepare_inputs.hf_split")
            split = next(iter(ds))
        ds = ds[split]
    cols = ds.column_names
    if image_column not in cols and text_column not in cols:
        raise ValueError(f"{path}: neither {image_column!r} nor {text_column!r} in columns {cols}")
    for i, row in enumerate(ds):
        yield RawItem(source=f"{path.name}[{i}]", image=row.get(image_column), prompt=row.get(text_column))


@dataclass(frozen=True)
class _Unreadable:
    reason: str


def iter_source(cfg: PrepareInputs, root: Path = Path(".")) -> Iterator[RawItem]:
    path = root / cfg.path
    if cfg.source == "folder":
        return iter_folder(path, path / cfg.texts_file if cfg.texts_file else None)
    if cfg.source == "dci":
        return iter_dci(path, cfg.dci_text, cfg.split)
    return iter_hf_datasets(path, cfg.hf_image_column, cfg.hf_text_column, cfg.hf_split)


# ---------------------------------------------------------------- validation / normalisation


def _open_image(image: object) -> Image.Image:
    if isinstance(image, _Unreadable):
        raise InvalidInput(image.reason)
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, dict) and "bytes" in image:
        image = image["bytes"]
    if isinstance(image, Path | str):
        p = Path(image)
        if not p.exists():
            raise InvalidInput("file not found")
        if p.stat().st_size == 0:
            raise InvalidInput("empty file (0 bytes)")
        data = p.read_bytes()
    elif isinstance(image, bytes | bytearray):
        if not image:
            raise InvalidInput("empty image bytes")
        data = bytes(image)
    else:
        raise InvalidInput(f"image has unsupported type {type(image).__name__}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            img.load()
    except Image.DecompressionBombWarning as err:
        raise InvalidInput(f"image too large: {err}") from None
    except Image.DecompressionBombError as err:
        raise InvalidInput(f"image too large: {err}") from None
    except Image.UnidentifiedImageError:
        raise InvalidInput("not an image (cannot identify image file)") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise InvalidInput(f"unreadable image: {err}") from None
    return img


def normalise_image(img: Image.Image) -> Image.Image:
    """Apply EXIF orientation and convert to RGB (transparent pixels composited on white)."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def _clean_text(value: object, field: str, max_chars: int) -> str | None:
    if value is None:
        return None
    if isinstance(value, _Unreadable):
        raise InvalidInput(value.reason)
    if not isinstance(value, str):
        raise InvalidInput(f"{field} has wrong type {type(value).__name__} (expected a string)")
    text = " ".join(value.split())
    if not text:
        raise InvalidInput(f"{field} is empty")
    if len(text) > max_chars:
        raise InvalidInput(f"{field} too long ({len(text)} > {max_chars} characters)")
    return text


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def content_id(image: bytes | None, prompt: str | None) -> str:
    """Stable input id: sha256 of the normalised content (pixels and/or prompt), 16 hex digits."""
    h = hashlib.sha256()
    if image is not None:
        h.update(b"image\0" + hashlib.sha256(image).digest())
    if prompt is not None and image is None:
        h.update(b"prompt\0" + prompt.encode())
    return h.hexdigest()[:16]


def validate(item: RawItem, cfg: PrepareInputs) -> PreparedInput:
    prompt = _clean_text(item.prompt, "prompt", cfg.max_text_chars)
    caption = _clean_text(item.caption, "caption", cfg.max_text_chars)
    data = width = height = None
    if item.image is not None:
        Image.MAX_IMAGE_PIXELS = cfg.max_pixels
        img = normalise_image(_open_image(item.image))
        width, height = img.size
        if min(width, height) < cfg.min_side:
            raise InvalidInput(f"image too small ({width}x{height}, min side {cfg.min_side})")
        data = png_bytes(img)
    elif prompt is None:
        raise InvalidInput("neither an image nor a prompt")
    return PreparedInput(content_id(data, prompt), item.source, data, width, height, prompt, caption)


def prepare(items: Iterator[RawItem], cfg: PrepareInputs) -> tuple[list[PreparedInput], list[Quarantined]]:
    """Validate every item; duplicates by content id are quarantined with the id of the kept item."""
    kept: dict[str, PreparedInput] = {}
    quarantined: list[Quarantined] = []
    for item in items:
        try:
            rec = validate(item, cfg)
        except InvalidInput as err:
            quarantined.append(Quarantined(item.source, str(err)))
            continue
        if rec.input_id in kept:
            quarantined.append(Quarantined(item.source, f"duplicate of {kept[rec.input_id].source} ({rec.input_id})"))
            continue
        kept[rec.input_id] = rec
    records = sorted(kept.values(), key=lambda r: r.input_id)
    if cfg.limit is not None:
        records = records[: cfg.limit]
    return records, quarantined


def inputs_table(records: list[PreparedInput]) -> pa.Table:
    cols = {f.name: [getattr(r, f.name) for r in records] for f in INPUTS_SCHEMA}
    return pa.table(cols, schema=INPUTS_SCHEMA)


def quarantine_table(records: list[Quarantined]) -> pa.Table:
    return pa.table(
        {"source": [q.source for q in records], "reason": [q.reason for q in records]}, schema=QUARANTINE_SCHEMA
    )


def decode_image(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")
