"""Input loaders and the prepare_inputs logic.

Sources (params `prepare_inputs.source`):
- folder: every image file under `path` (sorted, recursive); optional `texts_file` (relative to `path`) jsonl with
  {"file": <relative path>, "prompt": <T2I input text>, "caption": <human detailed caption>, "id": <optional>} per
  line. Without an image, a jsonl/txt prompts file is also a folder source's `texts_file` (lines with "prompt" but no
  "file" become text-only inputs); a .txt texts file holds one prompt per line.
- dci: the DCI release (facebookresearch/DCI) under its `densely_captioned_images/` root, see DCI_LAYOUT.
- hf_datasets: a directory written by `datasets.Dataset(Dict).save_to_disk` with an image and a text column.

DCI_LAYOUT (confirmed from facebookresearch/DCI, dataset/densely_captioned_images/dataset/: config.py names the
paths, dense_image.py reads them, impl.py reads the splits; reproduction/crowdsourcing/prepare/collate_data.py and
gen_alternate_summaries.py write `complete/`):
- `photos/<image>`: the photographs; `<image>` is the entry's "image" value.
- `annotations/<file>.json`: {"image", "short_caption", "extra_caption", "mask_data", "mask_keys"} per photo.
- `complete/<file>.json`: the same entry plus "summaries" and "negatives" (only for entries that have LLM
  summaries). "summaries" is a dict keyed by caption key: "base" is the whole-image summary, "m-<idx>-sc" the
  per-mask ones. Each value is a string, or a list of strings (the first is the collated summary, the rest
  Llama-2 alternates added by gen_alternate_summaries.py). collate_data.py asserts every collated summary fits
  77 CLIP tokens (openai/clip-vit-base-patch32 tokenizer, start and end tokens counted).
- `splits.json`: {"train": [<file>, ...], "valid": [...], "test": [...]}, names of `complete/` (= `annotations/`)
  files.
The T2I input text (params `prepare_inputs.dci_text`):
- summary: `summaries["base"]` of `complete/<file>`, the first candidate that fits 77 CLIP tokens (the paper's sDCI
  summaries; PAPER.md §2). An entry without `complete/` file or without a fitting summary is quarantined.
- short_caption: `short_caption` of `annotations/<file>`, what the authors' released generate.py `load_dci` uses
  (hjbahng/cyclereward, generate.py).
Either way the human caption is short_caption + extra_caption. Not confirmed: whether every alternate summary fits
77 tokens (hence the check), and the file names inside the release tarball beyond what the loader code reads.
The release archive (DCI_ARCHIVE_URL, extracted beside `densely_captioned_images/`): when `dci.tar.gz` is kept there,
the loader first checks it against DCI_ARCHIVE_SHA256, the digest DCI's download script publishes
(dataset/densely_captioned_images/dataset/scripts/download.py, changed in commit 5e8939319b91a68bf02a1cc78472e522e78a25d0
"Update download.py checksum"; the first release's digest 9caff10c... no longer matches the served file).

Every raw item becomes either a normalised input or a quarantine record (source, reason; a texts line is named
`<file>:<line>`), so raw items = inputs + quarantined, always. Paths named by data or found under the folder are read
only when they resolve inside it (cyclepref.paths). Images: EXIF orientation applied, 16-bit grey scaled to 8 bits,
alpha composited on BACKGROUND, CMYK / palette converted, animations reduced to their first frame, each change named
in the `note` column; stored as RGB PNG bytes; an entry named like an image that is no regular file (a directory,
FIFO, socket or device) is quarantined without being opened. Texts: NFC-normalised, control characters (Cc), format
characters (Cf: bidi overrides, zero-width spaces) and ANSI escape sequences removed (counted in the note), white space
collapsed; a texts row's keys other than TEXT_ROW_KEYS are ignored and named in the note. Ids: a row's "id" when given, else the content hash; of several valid items
with the same content or the same id, KEEP_RULE decides which one is kept and the others are quarantined.
"""

from __future__ import annotations

import codecs
import functools
import hashlib
import io
import json
import re
import unicodedata
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image, ImageOps

from cyclepref.config import PrepareInputs
from cyclepref.paths import OutsideRoot, display, inside, relative_key, special_kind

SUFFIX_FORMATS = {
    ".jpg": {"JPEG", "MPO"},
    ".jpeg": {"JPEG", "MPO"},
    ".png": {"PNG"},
    ".webp": {"WEBP"},
    ".bmp": {"BMP", "DIB"},
    ".gif": {"GIF"},
    ".tif": {"TIFF"},
    ".tiff": {"TIFF"},
}
IMAGE_SUFFIXES = set(SUFFIX_FORMATS)
BACKGROUND = (255, 255, 255)
"""Transparent pixels are composited on white."""
KEEP_RULE = "the item with more text (prompt, caption) is kept, on a tie the first source in sort order"
ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
ANSI_ESCAPE = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)?|[@-Z\\-_])")

INPUTS_SCHEMA = pa.schema(
    [
        pa.field("input_id", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("image", pa.binary(), nullable=True),
        pa.field("width", pa.int32(), nullable=True),
        pa.field("height", pa.int32(), nullable=True),
        pa.field("prompt", pa.string(), nullable=True),
        pa.field("caption", pa.string(), nullable=True),
        pa.field("note", pa.string(), nullable=True),
    ]
)
"""note: what normalisation changed beyond the routine (e.g. "CMYK converted to RGB"), "; "-separated, else null."""

QUARANTINE_SCHEMA = pa.schema(
    [
        pa.field("source", pa.string(), nullable=False),
        pa.field("reason", pa.string(), nullable=False),
    ]
)


@dataclass(frozen=True)
class RawItem:
    """One item as read from a source, before validation. `image` is a path (already contained), raw bytes, a PIL
    image or None; `row` is the texts line that described it; `problem` a reason found while loading."""

    source: str
    image: object | None
    prompt: object | None = None
    caption: object | None = None
    id: object | None = None
    row: str | None = None
    problem: str | None = None
    ignored: tuple[str, ...] = ()


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
    note: str | None = None
    content: str = ""


@dataclass(frozen=True)
class TextRow:
    where: str
    data: dict


class InvalidInput(ValueError):
    pass


# ---------------------------------------------------------------- texts files


def read_texts(path: Path) -> tuple[list[TextRow], list[Quarantined]]:
    """The rows of a texts file (.jsonl objects, or .txt prompts), each named `<file>:<line>`; a line that is not
    UTF-8, not JSON or not an object is quarantined with the reason instead."""
    if not path.is_file():
        raise FileNotFoundError(f"texts file {path} not found (prepare_inputs.texts_file)")
    rows, bad = [], []
    for n, raw in enumerate(path.read_bytes().split(b"\n"), 1):
        where = f"{display(path.name)}:{n}"
        try:
            text = _decode_line(raw.removeprefix(codecs.BOM_UTF8) if n == 1 else raw)
            if not text.strip():
                continue
            rows.append(TextRow(where, {"prompt": text} if path.suffix == ".txt" else _json_object(text)))
        except InvalidInput as err:
            bad.append(Quarantined(where, str(err)))
    return rows, bad


def _decode_line(raw: bytes) -> str:
    try:
        return raw.removesuffix(b"\r").decode("utf-8")
    except UnicodeDecodeError as err:
        raise InvalidInput(f"not valid UTF-8 (byte 0x{raw[err.start]:02x} at column {err.start + 1})") from None


def _json_object(text: str) -> dict:
    try:
        row = json.loads(text, object_pairs_hook=_unique_keys)
    except json.JSONDecodeError as err:
        raise InvalidInput(f"not valid JSON ({err.msg} at column {err.colno})") from None
    except RecursionError:
        raise InvalidInput("not valid JSON (nested too deeply)") from None
    if not isinstance(row, dict):
        raise InvalidInput(f"expected a JSON object, got a JSON {_json_kind(row)}")
    return row


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    keys = [k for k, _ in pairs]
    repeated = sorted({k for k in keys if keys.count(k) > 1})
    if repeated:
        raise InvalidInput(f"key(s) {repeated} given twice in one object")
    return dict(pairs)


def _json_kind(value: object) -> str:
    kinds = {list: "array", str: "string", bool: "boolean", int: "number", float: "number", type(None): "null"}
    return kinds.get(type(value), type(value).__name__)


# ---------------------------------------------------------------- loaders


def iter_folder(root: Path, texts_file: str | None) -> Iterator[RawItem]:
    """Images under `root` (with texts from `texts_file`, relative to root, when given) and text-only rows."""
    if not root.is_dir():
        raise FileNotFoundError(f"input folder {root} not found (prepare_inputs.path)")
    rows, bad = read_texts(_texts_path(root, texts_file)) if texts_file else ([], [])
    yield from (RawItem(q.source, None, problem=q.reason) for q in bad)
    by_file: dict[str, TextRow] = {}
    text_only: list[TextRow] = []
    for row in rows:
        if row.data.get("file") is None:
            text_only.append(row)
            continue
        try:
            key = _file_key(row.data["file"])
        except InvalidInput as err:
            yield RawItem(row.where, None, problem=str(err))
            continue
        if key in by_file:
            yield RawItem(row.where, None, problem=f"second row for file {key} (first: {by_file[key].where})")
            continue
        by_file[key] = row
    found = [p.relative_to(root).as_posix() for p in _image_files(root)]
    for rel in found:
        yield _image_item(root, rel, by_file.get(rel))
    for key in sorted(by_file.keys() - set(found)):
        yield _image_item(root, key, by_file[key])
    for row in text_only:
        d = row.data
        yield RawItem(row.where, None, d.get("prompt", d.get("text")), d.get("caption"), d.get("id"), row.where,
                      ignored=_unknown_keys(d, TEXT_ROW_KEYS))


TEXT_ROW_KEYS = frozenset({"file", "prompt", "caption", "id"})
"""The keys a texts row is read for; a text-only row may give its prompt as "text" instead."""


def _unknown_keys(data: dict, known: frozenset[str]) -> tuple[str, ...]:
    prompt_alias = {"text"} if "file" not in data and "prompt" not in data else set()
    return tuple(sorted(k for k in data if k not in known | prompt_alias))


def _texts_path(root: Path, texts_file: str) -> Path:
    try:
        return inside(root, texts_file)
    except OutsideRoot as err:
        raise ValueError(f"prepare_inputs.texts_file: {err}") from None


def _file_key(value: object) -> str:
    if not isinstance(value, str):
        raise InvalidInput(f"'file' has wrong type {type(value).__name__} (expected a relative path string)")
    try:
        return relative_key(value)
    except OutsideRoot as err:
        raise InvalidInput(str(err)) from None


def _image_files(root: Path) -> list[Path]:
    """Every entry with an image suffix under root: files, symlinks (broken ones too), and the directories, FIFOs,
    sockets and devices named like images (they are quarantined, never silently skipped); symlinked folders are not
    entered."""
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def _image_item(root: Path, rel: str, row: TextRow | None) -> RawItem:
    d = row.data if row else {}
    item = RawItem(display(rel), None, d.get("prompt"), d.get("caption"), d.get("id"), row.where if row else None,
                   ignored=_unknown_keys(d, TEXT_ROW_KEYS))
    try:
        return replace(item, image=inside(root, rel))
    except OutsideRoot as err:
        return replace(item, problem=str(err))


CLIP_TOKENS = 77
"""CLIP's text context, start and end tokens included (the sDCI summaries fit it)."""


@functools.cache
def _clip_tokenizer():
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


def clip_token_length(text: str) -> int:
    """Tokens of `text` under CLIP's BPE (open_clip ships the openai vocabulary), start and end tokens counted."""
    return len(_clip_tokenizer().encode(text)) + 2


def dci_summary(entry: dict) -> str:
    """The whole-image sDCI summary of a `complete/` entry: the first of summaries["base"] that fits CLIP_TOKENS."""
    summaries = entry.get("summaries")
    if not isinstance(summaries, dict):
        raise InvalidInput("no 'summaries' dict in the complete/ entry")
    base = summaries.get("base")
    candidates = base if isinstance(base, list) else [base]
    texts = [t for t in candidates if isinstance(t, str) and t.strip()]
    for text in texts:
        if clip_token_length(text) <= CLIP_TOKENS:
            return text
    raise InvalidInput(f"no summaries['base'] text fits {CLIP_TOKENS} CLIP tokens ({len(texts)} given)")


DCI_ARCHIVE_URL = "https://dl.fbaipublicfiles.com/densely_captioned_images/dci.tar.gz"
DCI_ARCHIVE_SHA256 = "d865c244150168d3f25daaad0bf5b70b2123cf3e83ca7b0e207d5b26943c5fc7"


def verify_dci_archive(path: Path, expected: str = DCI_ARCHIVE_SHA256) -> None:
    """Raise ValueError unless the archive's sha256 is the one DCI's download script publishes."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != expected:
        raise ValueError(f"{path}: sha256 {digest.hexdigest()}, but DCI's download script publishes {expected} "
                         f"for {DCI_ARCHIVE_URL}: not the DCI release")


def iter_dci(root: Path, text: str, split: str) -> Iterator[RawItem]:
    """The DCI release (DCI_LAYOUT): summaries from complete/, short captions from annotations/; the release
    archive is verified first when it is kept beside the extracted folder."""
    archive = root.parent / DCI_ARCHIVE_URL.rsplit("/", 1)[1]
    if archive.is_file():
        verify_dci_archive(archive, DCI_ARCHIVE_SHA256)
    folder = "complete" if text == "summary" else "annotations"
    photos, entries = root / "photos", root / folder
    for d in (photos, entries):
        if not d.is_dir():
            raise FileNotFoundError(f"DCI layout: {d} not found (expected photos/, {folder}/, splits.json)")
    if split == "all":
        names = sorted(p.name for p in entries.glob("*.json"))
    else:
        splits_file = root / "splits.json"
        if not splits_file.exists():
            raise FileNotFoundError(f"DCI layout: {splits_file} not found (needed for split={split!r})")
        splits = json.loads(splits_file.read_text())
        if split not in splits:
            raise ValueError(f"{splits_file}: no split {split!r} (has {sorted(splits)})")
        names = sorted(str(n) for n in splits[split])
    for name in names:
        yield _dci_item(photos, entries, name, text)


def _dci_item(photos: Path, entries: Path, name: str, text: str) -> RawItem:
    source = f"{entries.name}/{display(name)}"
    try:
        entry = json.loads(inside(entries, name).read_text())
    except (OSError, ValueError) as err:
        return RawItem(source, None, problem=f"entry unreadable: {err}")
    if not isinstance(entry, dict):
        return RawItem(source, None, problem="entry unreadable: expected a JSON object")
    caption = " ".join(s for s in (entry.get("short_caption"), entry.get("extra_caption")) if isinstance(s, str))
    try:
        prompt = dci_summary(entry) if text == "summary" else entry.get("short_caption")
    except InvalidInput as err:
        return RawItem(source, None, None, caption or None, problem=str(err))
    image = entry.get("image")
    if not isinstance(image, str) or not image:
        return RawItem(source, None, prompt, caption or None, problem="entry has no 'image' path")
    item = RawItem(f"photos/{display(image)}", None, prompt, caption or None)
    try:
        return replace(item, image=inside(photos, image))
    except OutsideRoot as err:
        return replace(item, problem=str(err))


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
        item = RawItem(f"{path.name}[{i}]", None, prompt=row.get(text_column))
        try:
            yield replace(item, image=_hf_image(path, row.get(image_column)))
        except OutsideRoot as err:
            yield replace(item, problem=str(err))


def _hf_image(root: Path, value: object) -> object:
    """Image bytes or a decoded image as they are; a path (a string or a dict without bytes) contained in root."""
    if isinstance(value, dict) and not value.get("bytes"):
        value = value.get("path")
    return inside(root, value) if isinstance(value, str) else value


def iter_source(cfg: PrepareInputs, root: Path = Path(".")) -> Iterator[RawItem]:
    """The items of the configured source, then those of every batch in the pool."""
    path = root / cfg.path
    if cfg.source == "folder":
        items = iter_folder(path, cfg.texts_file)
    elif cfg.source == "dci":
        items = iter_dci(path, cfg.dci_text, cfg.split)
    else:
        items = iter_hf_datasets(path, cfg.hf_image_column, cfg.hf_text_column, cfg.hf_split)
    yield from items
    yield from iter_pool(root / cfg.pool)


POOL_TEXTS = "texts.jsonl"


def iter_pool(pool: Path) -> Iterator[RawItem]:
    """Every batch folder of the pool (cyclepref.ingest writes them) as a folder source with texts.jsonl; sources
    are named `<pool>/<batch>/<file>`. A missing pool holds nothing; a symlinked batch is quarantined, not read."""
    if not pool.is_dir():
        return
    for batch in sorted(p for p in pool.iterdir() if not p.name.startswith(".") and p.is_dir()):
        where = f"{display(pool.name)}/{display(batch.name)}"
        if batch.is_symlink():
            yield RawItem(where, None, problem="pool batch is a symbolic link (not read)")
            continue
        texts = POOL_TEXTS if (batch / POOL_TEXTS).exists() or (batch / POOL_TEXTS).is_symlink() else None
        for item in iter_folder(batch, texts):
            row = f"{where}/{item.row}" if item.row else None
            yield replace(item, source=f"{where}/{item.source}", row=row)


# ---------------------------------------------------------------- images


def _open_image(image: object) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, dict) and "bytes" in image:
        image = image["bytes"]
    if isinstance(image, Path):
        data = _read_file(image)
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
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as err:
        raise InvalidInput(f"image too large (decompression bomb guard): {err}") from None
    except Image.UnidentifiedImageError:
        raise InvalidInput("not an image (cannot identify image file)") from None
    except Exception as err:
        raise InvalidInput(f"unreadable image: {err}") from None
    return img


def _read_file(path: Path) -> bytes:
    if not path.exists():
        raise InvalidInput("file not found")
    if not path.is_file():
        kind = special_kind(path)
        raise InvalidInput(f"not a regular file: {kind} named like an image" if kind else "not a regular file")
    if path.stat().st_size == 0:
        raise InvalidInput("empty file (0 bytes)")
    return path.read_bytes()


def normalise(img: Image.Image) -> tuple[Image.Image, list[str]]:
    """RGB image and notes of what was changed beyond EXIF orientation: first frame of an animation, 16-bit grey
    scaled to 8 bits, CMYK or palette converted, alpha composited on BACKGROUND."""
    notes = []
    frames = getattr(img, "n_frames", 1)
    if frames > 1:
        notes.append(f"animated ({frames} frames): first frame kept")
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        img = _grey_to_8bit(img)
        notes.append("16-bit grey scaled to 8 bits")
    if img.mode == "CMYK":
        notes.append("CMYK converted to RGB")
    elif img.mode == "P":
        notes.append("palette converted to RGB")
    if img.mode in ("RGBA", "LA", "La", "RGBa", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        if rgba.getchannel("A").getextrema()[0] < 255:
            notes.append("alpha composited on white")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (*BACKGROUND, 255)), rgba)
    return img.convert("RGB"), notes


def normalise_image(img: Image.Image) -> Image.Image:
    """`normalise` without the notes."""
    return normalise(img)[0]


def _grey_to_8bit(img: Image.Image) -> Image.Image:
    """16-bit grey (I;16*, or I holding 0..65535) -> L by value / 257; float grey in [0, 1] -> L by value * 255."""
    a = np.asarray(img).astype(np.float64)
    low, high = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if img.mode == "F":
        if low < 0.0 or high > 1.0:
            raise InvalidInput(f"float image values {low:g}..{high:g} outside 0..1")
        return Image.fromarray(np.round(a * 255.0).astype(np.uint8), "L")
    if low < 0 or high > 65535:
        raise InvalidInput(f"32-bit image values {low:g}..{high:g} outside the 16-bit range")
    return Image.fromarray(np.round(a / 257.0).astype(np.uint8), "L")


def load_image(image: object, max_pixels: int) -> tuple[Image.Image, list[str]]:
    """Open and normalise; any failure of a hostile or broken file becomes InvalidInput with the reason."""
    Image.MAX_IMAGE_PIXELS = max_pixels
    img = _open_image(image)
    try:
        rgb, notes = normalise(img)
    except InvalidInput:
        raise
    except Exception as err:
        raise InvalidInput(f"unreadable image: {type(err).__name__}: {err}") from None
    return rgb, _extension_note(image, img.format) + notes


def _extension_note(image: object, fmt: str | None) -> list[str]:
    if not isinstance(image, Path) or fmt is None:
        return []
    suffix = image.suffix.lower()
    return [] if fmt in SUFFIX_FORMATS.get(suffix, {fmt}) else [f"{fmt} content in a {suffix} file"]


# ---------------------------------------------------------------- texts and ids


def clean_text(value: object, field: str, max_chars: int, notes: list[str] | None = None) -> str | None:
    """NFC-normalised text without control characters (Cc), format characters (Cf: bidi overrides, zero-width
    spaces) or ANSI escapes, white space collapsed; removals are noted."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidInput(f"{field} has wrong type {type(value).__name__} (expected a string)")
    if any(0xD800 <= ord(c) <= 0xDFFF for c in value):
        raise InvalidInput(f"{field} is not valid Unicode (lone surrogate)")
    nfc = unicodedata.normalize("NFC", value)
    text = ANSI_ESCAPE.sub("", nfc)
    formats = sorted({f"U+{ord(c):04X}" for c in text if unicodedata.category(c) == "Cf"})
    n_formats = sum(unicodedata.category(c) == "Cf" for c in text)
    text = "".join(c for c in text if c.isspace() or unicodedata.category(c) not in ("Cc", "Cf"))
    removed = len(nfc) - len(text) - n_formats
    text = " ".join(text.split())
    if not text:
        kinds = [kind for kind, n in (("control", removed), ("format", n_formats)) if n]
        raise InvalidInput(f"{field} is empty" + (f" after removing {' and '.join(kinds)} characters" if kinds else ""))
    if len(text) > max_chars:
        raise InvalidInput(f"{field} too long ({len(text)} > {max_chars} characters)")
    if removed and notes is not None:
        notes.append(f"{removed} control character(s) and escape codes removed from {field}")
    if n_formats and notes is not None:
        notes.append(f"{n_formats} format character(s) ({', '.join(formats)}) removed from {field}")
    return text


def explicit_id(value: object) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise InvalidInput(f"id has wrong type {type(value).__name__} (expected a string or an integer)")
    text = str(value)
    if not ID_PATTERN.fullmatch(text):
        raise InvalidInput(f"id {text[:40]!r} is not 1-128 of A-Z a-z 0-9 . _ - (starting with a letter or digit)")
    return text


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def content_id(image: bytes | None, prompt: str | None) -> str:
    """Stable content hash: sha256 of the normalised content (pixels, else prompt), 16 hex digits."""
    h = hashlib.sha256()
    if image is not None:
        h.update(b"image\0" + hashlib.sha256(image).digest())
    if prompt is not None and image is None:
        h.update(b"prompt\0" + prompt.encode())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------- validation and duplicates


def validate(item: RawItem, cfg: PrepareInputs) -> PreparedInput:
    if item.problem:
        raise InvalidInput(item.problem)
    notes: list[str] = [f"unknown key(s) {list(item.ignored)} ignored"] if item.ignored else []
    prompt = clean_text(item.prompt, "prompt", cfg.max_text_chars, notes)
    caption = clean_text(item.caption, "caption", cfg.max_text_chars, notes)
    given_id = explicit_id(item.id)
    data = width = height = None
    if item.image is not None:
        img, image_notes = load_image(item.image, cfg.max_pixels)
        width, height = img.size
        if min(width, height) < cfg.min_side:
            raise InvalidInput(f"image too small ({width}x{height}, min side {cfg.min_side})")
        data = png_bytes(img)
        notes = image_notes + notes
    elif prompt is None:
        raise InvalidInput("neither an image nor a prompt")
    content = content_id(data, prompt)
    note = "; ".join(notes) or None
    return PreparedInput(given_id or content, item.source, data, width, height, prompt, caption, note, content)


def _preference(r: PreparedInput) -> tuple[int, str]:
    return -((r.prompt is not None) + (r.caption is not None)), r.source


def resolve_duplicates(records: list[PreparedInput]) -> tuple[list[PreparedInput], list[Quarantined]]:
    """Of records with the same content or the same input_id, keep one by KEEP_RULE; quarantine the others."""
    kept: list[PreparedInput] = []
    dropped: list[Quarantined] = []
    by_content: dict[str, PreparedInput] = {}
    by_id: dict[str, PreparedInput] = {}
    for r in sorted(records, key=_preference):
        if r.content in by_content:
            first = by_content[r.content]
            dropped.append(Quarantined(r.source, f"duplicate of {first.source} ({first.input_id}): {KEEP_RULE}"))
        elif r.input_id in by_id:
            first = by_id[r.input_id]
            dropped.append(Quarantined(r.source, f"duplicate id {r.input_id!r} (kept {first.source}): {KEEP_RULE}"))
        else:
            kept.append(r)
            by_content[r.content] = by_id[r.input_id] = r
    return kept, dropped


def prepare(items: Iterator[RawItem], cfg: PrepareInputs) -> tuple[list[PreparedInput], list[Quarantined]]:
    """Validate every item and resolve duplicates; every item ends up in exactly one of the two lists."""
    valid: list[PreparedInput] = []
    quarantined: list[Quarantined] = []
    for item in items:
        try:
            valid.append(validate(item, cfg))
        except InvalidInput as err:
            row = f" ({item.row})" if item.row and item.row != item.source else ""
            quarantined.append(Quarantined(item.source, f"{err}{row}"))
    kept, duplicates = resolve_duplicates(valid)
    return sorted(kept, key=lambda r: r.input_id), quarantined + duplicates


def apply_limit(records: list[PreparedInput], limit: int | None) -> tuple[list[PreparedInput], int]:
    """The first `limit` records (by input_id) and how many were left out."""
    if limit is None:
        return records, 0
    return records[:limit], max(len(records) - limit, 0)


def inputs_table(records: list[PreparedInput]) -> pa.Table:
    cols = {f.name: [getattr(r, f.name) for r in records] for f in INPUTS_SCHEMA}
    return pa.table(cols, schema=INPUTS_SCHEMA)


def quarantine_table(records: list[Quarantined]) -> pa.Table:
    return pa.table(
        {"source": [q.source for q in records], "reason": [q.reason for q in records]}, schema=QUARANTINE_SCHEMA
    )


def decode_image(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")
