"""Preference pairs for the reward model, behind one small interface.

A `PairSource` gives, per task ("i2t" | "t2i") and split ("train" | "valid" | "test"), a `PairSet`: a sized
collection of decoded `PairExample`s plus, when known, the raw cycle scores of each pair. Sources:

- `TablePairSource`: the pipeline's tables (cyclepref.tables.PATHS; a table is a parquet file or a directory of
  shards): PAIRS joined with the inputs (I2T image, T2I prompt) and the task's candidates (I2T caption text,
  T2I image). Only the rows of the requested split are
  read; image bytes of those rows are held in memory (fine for the default profile; at paper scale train from the
  exported datasets, which are memory-mapped).
- `HFPairSource`: exported `datasets` directories: the export stage's layout (cyclepref.export: parquet shards
  with one config per task, I2T columns image / preferred_text / rejected_text, T2I prompt / preferred_image /
  rejected_image), a save_to_disk directory, or the same with columns chosen / rejected. Splits are a
  DatasetDict's keys ("valid" may be named "validation"; a split without pairs has no file and reads as empty) or
  a `split` column. preferred_score / rejected_score / direction (or chosen_score / ...) carry the cycle scores.
- `ListPairSet`: examples already in memory (synthetic data, tests, benchmarks).

`PairCollator` turns examples of one or both tasks into one model batch in which each I2T image is encoded once
for its two captions, and each T2I prompt is read against its two images.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image

from cyclepref.paths import inside
from cyclepref.reward import Task
from cyclepref.reward.model import image_pixels
from cyclepref.scoring import oriented

SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class PairExample:
    """I2T: `image` with chosen / rejected captions. T2I: `prompt` with chosen / rejected images.
    `group` names the shared input (all pairs of one input share it)."""

    pair_id: str
    task: Task
    group: str
    image: Image.Image | None
    prompt: str | None
    chosen: Image.Image | str
    rejected: Image.Image | str


class PairSet(Protocol):
    task: Task

    def __len__(self) -> int: ...

    def example(self, index: int) -> PairExample: ...

    def cycle_scores(self) -> tuple[np.ndarray, np.ndarray] | None:
        """Oriented (higher = better) raw cycle scores of (chosen, rejected) per pair, or None when unknown."""
        ...


class PairSource(Protocol):
    def pairs(self, task: Task, split: str) -> PairSet: ...

    def digest(self) -> str:
        """A content digest of everything this source reads."""
        ...


def decode(data: object, root: Path | None = None) -> Image.Image:
    """An RGB image from PNG/JPEG bytes, a datasets image dict ({bytes, path}), a path or a PIL image.

    With `root` (the directory of the dataset that names the path), a path is read relative to `root` and only
    when it resolves inside it (cyclepref.paths.inside); without, a path is opened as given."""
    if isinstance(data, Image.Image):
        return data.convert("RGB")
    if isinstance(data, dict):
        data = data.get("bytes") or data.get("path")
    if isinstance(data, bytes | bytearray):
        return Image.open(io.BytesIO(data)).convert("RGB")
    if isinstance(data, str | Path):
        path = inside(root, data) if root is not None else data
        with Image.open(path) as im:
            return im.convert("RGB")
    raise TypeError(f"cannot decode an image from {type(data).__name__}")


@dataclass
class ListPairSet:
    """Examples held in memory; `cycle` = oriented (chosen, rejected) scores when known."""

    task: Task
    examples: list[PairExample]
    cycle: tuple[np.ndarray, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.examples)

    def example(self, index: int) -> PairExample:
        return self.examples[index]

    def cycle_scores(self) -> tuple[np.ndarray, np.ndarray] | None:
        return self.cycle


# ---------------------------------------------------------------- pipeline tables


@dataclass
class TablePairSet:
    task: Task
    pair_ids: list[str]
    input_ids: list[str]
    chosen_ids: list[str]
    rejected_ids: list[str]
    inputs: dict[str, object]
    candidates: dict[str, object]
    scores: tuple[np.ndarray, np.ndarray]

    def __len__(self) -> int:
        return len(self.pair_ids)

    def example(self, index: int) -> PairExample:
        inp = self.inputs[self.input_ids[index]]
        ch, rj = self.candidates[self.chosen_ids[index]], self.candidates[self.rejected_ids[index]]
        if self.task == "i2t":
            return PairExample(self.pair_ids[index], "i2t", self.input_ids[index], decode(inp), None, ch, rj)
        return PairExample(self.pair_ids[index], "t2i", self.input_ids[index], None, inp, decode(ch), decode(rj))

    def cycle_scores(self) -> tuple[np.ndarray, np.ndarray]:
        return self.scores


class TablePairSource:
    """PAIRS + inputs + candidates tables under `root` (paths from cyclepref.tables.PATHS)."""

    def __init__(self, root: Path = Path(".")):
        from cyclepref.tables import PATHS

        self.root = Path(root)
        self.paths = {k: self.root / PATHS[k] for k in ("pairs", "inputs", "i2t_candidates", "t2i_candidates")}
        self._pairs = None
        self._digest: str | None = None

    def _pair_table(self):
        from cyclepref import store
        from cyclepref.tables import PAIRS

        if self._pairs is None:
            self._pairs = store.read_table(self.paths["pairs"], PAIRS).to_pylist()
        return self._pairs

    def _lookup(self, key: str, id_col: str, value_col: str, ids: set[str]) -> dict[str, object]:
        import pyarrow.parquet as pq

        path = self.paths[key]
        if not path.exists():
            raise FileNotFoundError(f"{path}: table not found (has the stage that writes it run? try `dvc repro`)")
        if not ids:
            return {}
        table = pq.read_table(path, columns=[id_col, value_col], filters=[(id_col, "in", sorted(ids))])
        found = dict(zip(table.column(id_col).to_pylist(), table.column(value_col).to_pylist(), strict=True))
        missing = sorted(ids - found.keys())
        if missing:
            raise ValueError(
                f"{path}: {len(missing)} id(s) referenced by {self.paths['pairs']} are missing: {missing[:5]}"
            )
        empty = sorted(k for k, v in found.items() if v is None)
        if empty:
            raise ValueError(f"{path}: column {value_col!r} is null for {len(empty)} referenced row(s): {empty[:5]}")
        return found

    def pairs(self, task: Task, split: str) -> TablePairSet:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r} (expected one of {SPLITS})")
        rows = sorted(
            (r for r in self._pair_table() if r["task"] == task and r["split"] == split), key=lambda r: r["pair_id"]
        )
        inputs_col, cand_key, cand_col = ("image", "i2t_candidates", "text") if task == "i2t" else (
            "prompt", "t2i_candidates", "image")
        inputs = self._lookup("inputs", "input_id", inputs_col, {r["input_id"] for r in rows})
        cand_ids = {r["preferred_id"] for r in rows} | {r["rejected_id"] for r in rows}
        candidates = self._lookup(cand_key, "candidate_id", cand_col, cand_ids)
        chosen = np.array([oriented([r["preferred_score"]], r["direction"])[0] for r in rows], dtype=np.float64)
        rejected = np.array([oriented([r["rejected_score"]], r["direction"])[0] for r in rows], dtype=np.float64)
        return TablePairSet(
            task,
            [r["pair_id"] for r in rows],
            [r["input_id"] for r in rows],
            [r["preferred_id"] for r in rows],
            [r["rejected_id"] for r in rows],
            inputs,
            candidates,
            (chosen, rejected),
        )

    def digest(self) -> str:
        from cyclepref.store import file_digest

        if self._digest is None:
            h = hashlib.sha256()
            for name, path in sorted(self.paths.items()):
                files = sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
                for f in files:
                    h.update(f"{name}/{f.name}={file_digest(f) if f.exists() else 'absent'}\n".encode())
            self._digest = h.hexdigest()
        return self._digest


# ---------------------------------------------------------------- exported datasets


COLUMN_NAMES = {
    "i2t": (("image", "preferred_text", "rejected_text"), ("image", "chosen", "rejected")),
    "t2i": (("prompt", "preferred_image", "rejected_image"), ("prompt", "chosen", "rejected")),
}
SCORE_NAMES = (("preferred_score", "rejected_score", "direction"), ("chosen_score", "rejected_score", "direction"))


@dataclass
class HFPairSet:
    """Rows of an exported dataset; `columns` = (shared input, chosen, rejected) column names. Image paths (an
    export with `embed_images: false`) are relative to `root`, the dataset directory."""

    task: Task
    dataset: object
    name: str
    columns: tuple[str, str, str]
    root: Path

    def __len__(self) -> int:
        return len(self.dataset)

    def example(self, index: int) -> PairExample:
        row = self.dataset[index]
        shared, ch, rj = (row[c] for c in self.columns)
        pid = str(row.get("pair_id") or f"{self.name}[{index}]")
        if self.task == "i2t":
            group = str(row.get("input_id") or _content_key(shared))
            return PairExample(pid, "i2t", group, decode(shared, self.root), None, ch, rj)
        group = str(row.get("input_id") or hashlib.sha256(shared.encode()).hexdigest()[:16])
        return PairExample(pid, "t2i", group, None, shared, decode(ch, self.root), decode(rj, self.root))

    def cycle_scores(self) -> tuple[np.ndarray, np.ndarray] | None:
        names = next((n for n in SCORE_NAMES if set(n) <= set(self.dataset.column_names)), None)
        if names is None:
            return None
        sub = self.dataset.select_columns(list(names))
        ch, rj, dirs = (sub[c] for c in names)
        chosen = np.array([oriented([c], d)[0] for c, d in zip(ch, dirs, strict=True)], dtype=np.float64)
        rejected = np.array([oriented([r], d)[0] for r, d in zip(rj, dirs, strict=True)], dtype=np.float64)
        return chosen, rejected


def _content_key(image: object) -> str:
    data = image.get("bytes") if isinstance(image, dict) else image
    if isinstance(data, bytes | bytearray):
        return hashlib.sha256(data).hexdigest()[:16]
    return str(image.get("path") if isinstance(image, dict) else id(image))


def _load_dataset_dir(path: Path, task: Task):
    """A save_to_disk directory, or a dataset directory of data files (parquet shards, optionally with a card that
    defines one config per task) read with datasets.load_dataset."""
    import datasets

    if (path / "dataset_dict.json").exists() or (path / "state.json").exists():
        return datasets.load_from_disk(str(path))
    configs = datasets.get_dataset_config_names(str(path))
    return datasets.load_dataset(str(path), name=task if task in configs else None)


class HFPairSource:
    """Pairs exported with `datasets` save_to_disk: one directory per task."""

    def __init__(self, i2t_path: str | Path | None, t2i_path: str | Path | None):
        self.paths: dict[str, Path | None] = {
            "i2t": Path(i2t_path) if i2t_path else None,
            "t2i": Path(t2i_path) if t2i_path else None,
        }

    def _load(self, task: Task, split: str):
        """(dataset, column names), or None when the dataset has no such split (a split without pairs)."""
        import datasets

        path = self.paths[task]
        if path is None:
            raise ValueError(f"hf_datasets source: no {task}_path configured, but {task} pairs were requested")
        if not path.exists():
            raise FileNotFoundError(f"{path}: exported {task} pairs not found (run the export_dataset stage)")
        ds = _load_dataset_dir(path, task)
        if isinstance(ds, datasets.DatasetDict):
            names = [split] + (["validation"] if split == "valid" else [])
            hit = next((n for n in names if n in ds), None)
            if hit is None:
                return None
            ds = ds[hit]
        elif "split" in ds.column_names:
            ds = ds.filter(lambda s: s == split, input_columns="split")
        else:
            raise ValueError(f"{path}: a single Dataset without a 'split' column; cannot select split {split!r}")
        columns = next((c for c in COLUMN_NAMES[task] if set(c) <= set(ds.column_names)), None)
        if columns is None:
            expected = " or ".join(str(list(c)) for c in COLUMN_NAMES[task])
            raise ValueError(f"{path}: {task} pairs need columns {expected}; found {ds.column_names}")
        image_cols = columns[:1] if task == "i2t" else columns[1:]
        for col in image_cols:
            if isinstance(ds.features[col], datasets.Image):
                ds = ds.cast_column(col, datasets.Image(decode=False))
        return ds, columns

    def pairs(self, task: Task, split: str) -> PairSet:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r} (expected one of {SPLITS})")
        loaded = self._load(task, split)
        if loaded is None:
            return ListPairSet(task, [])
        path = self.paths[task]
        return HFPairSet(task, loaded[0], f"{path.name}/{task}/{split}", loaded[1], path)

    def digest(self) -> str:
        from cyclepref.store import file_digest

        h = hashlib.sha256()
        for task, path in sorted(self.paths.items()):
            if path is None or not path.exists():
                h.update(f"{task}=absent\n".encode())
                continue
            files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
            for f in files:
                h.update(f"{task}/{f.relative_to(path)}={file_digest(f)}\n".encode())
        return h.hexdigest()


def open_source(spec, root: Path = Path(".")) -> PairSource:
    """The pair source a params `RewardData` section names."""
    if spec.source == "tables":
        return TablePairSource(root)
    return HFPairSource(
        root / spec.i2t_path if spec.i2t_path else None, root / spec.t2i_path if spec.t2i_path else None
    )


# ---------------------------------------------------------------- batches


@dataclass
class PairBatch:
    """One model call: rewards[chosen[t]] vs rewards[rejected[t]] are the pairs of task t."""

    pixel_values: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    image_index: torch.Tensor
    chosen: dict[str, torch.Tensor] = field(default_factory=dict)
    rejected: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return max((len(v) for v in self.chosen.values()), default=0)

    def to(self, device) -> PairBatch:
        return PairBatch(
            self.pixel_values.to(device),
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.image_index.to(device),
            {k: v.to(device) for k, v in self.chosen.items()},
            {k: v.to(device) for k, v in self.rejected.items()},
        )


class PairCollator:
    """Examples of one or both tasks -> one PairBatch (picklable, for DataLoader workers)."""

    def __init__(self, processor, max_length: int):
        self.processor, self.max_length = processor, max_length

    def __call__(self, parts: dict[str, Sequence[PairExample]]) -> PairBatch:
        images: list[Image.Image] = []
        texts: list[str] = []
        image_index: list[int] = []
        chosen: dict[str, torch.Tensor] = {}
        rejected: dict[str, torch.Tensor] = {}
        for task, examples in parts.items():
            b, img0, txt0 = len(examples), len(images), len(texts)
            if task == "i2t":
                images += [e.image for e in examples]
                texts += [e.chosen for e in examples] + [e.rejected for e in examples]
                image_index += list(range(img0, img0 + b)) * 2
            else:
                images += [e.chosen for e in examples] + [e.rejected for e in examples]
                texts += [e.prompt for e in examples] * 2
                image_index += list(range(img0, img0 + 2 * b))
            chosen[task] = torch.arange(txt0, txt0 + b)
            rejected[task] = torch.arange(txt0 + b, txt0 + 2 * b)
        tok = self.processor.tokenizer(
            texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        pixels = image_pixels(self.processor.image_processor, images)
        return PairBatch(pixels, tok["input_ids"], tok["attention_mask"], torch.tensor(image_index), chosen, rejected)


class MicroBatches(torch.utils.data.Dataset):
    """Item m = the collated micro-batch m of a fixed plan ({task: (pair set, [[indices of batch 0], ...])})."""

    def __init__(self, plan: dict[str, tuple[PairSet, list[list[int]]]], collate: PairCollator):
        counts = {len(batches) for _, batches in plan.values()}
        if len(counts) > 1:
            raise ValueError(f"every task needs the same number of micro-batches, got {counts}")
        self.plan, self.collate = plan, collate
        self.count = counts.pop() if counts else 0

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, m: int) -> PairBatch:
        return self.collate({t: [s.example(i) for i in batches[m]] for t, (s, batches) in self.plan.items()})

