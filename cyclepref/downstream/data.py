"""Held-out inputs, preference pairs, local model paths and atomic output directories for the downstream stages."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image

from cyclepref import store
from cyclepref.inputs import INPUTS_SCHEMA, decode_image
from cyclepref.tables import PATHS


@dataclass(frozen=True)
class HeldOut:
    """Held-out inputs of one task, sorted by input_id; `images` (i2t) or `prompts` (t2i) aligned with ids."""

    task: str
    input_ids: list[str]
    images: list[Image.Image]
    prompts: list[str]
    source: str

    def __len__(self) -> int:
        return len(self.input_ids)


def heldout_ids(root: Path, splits: list[str]) -> set[str]:
    """Inputs that have a pair (of either task) in one of `splits`; splits are assigned per input."""
    path = Path(root) / PATHS["pairs"]
    if not path.exists():
        raise FileNotFoundError(f"{path}: pairs not found (run `dvc repro build_pairs`)")
    t = pq.read_table(path, columns=["input_id", "split"])
    t = t.filter(pc.is_in(t.column("split"), value_set=pa.array(list(splits), pa.string())))
    return set(t.column("input_id").to_pylist())


def heldout_inputs(root: Path, task: str, splits: list[str], max_inputs: int | None = None) -> HeldOut:
    """The inputs of `task` held out from training (pairs in `splits`); all inputs of the task when none is."""
    need = "image" if task == "i2t" else "prompt"
    inputs = store.read_table(Path(root) / PATHS["inputs"], INPUTS_SCHEMA)
    inputs = inputs.filter(pc.is_valid(inputs.column(need))).sort_by("input_id")
    wanted = heldout_ids(root, splits)
    ids = inputs.column("input_id").to_pylist()
    keep = [i for i, k in enumerate(ids) if k in wanted]
    source = f"inputs with pairs in {'+'.join(splits)}"
    if not keep:
        keep = list(range(len(ids)))
        source = f"all inputs (no pairs in {'+'.join(splits)})"
    if max_inputs is not None:
        keep = keep[:max_inputs]
    rows = inputs.take(keep)
    images = [decode_image(b) for b in rows.column("image").to_pylist()] if task == "i2t" else []
    prompts = rows.column("prompt").to_pylist() if task == "t2i" else []
    return HeldOut(task, rows.column("input_id").to_pylist(), images, prompts, source)


class PairList(Sequence):
    """The first `n` pairs of a PairSet as a sequence of PairExamples, decoded on access (nothing is held twice)."""

    def __init__(self, pairset, n: int | None = None):
        self.pairset = pairset
        self.n = len(pairset) if n is None else min(n, len(pairset))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self.pairset.example(i) for i in range(*index.indices(self.n))]
        if not -self.n <= index < self.n:
            raise IndexError(index)
        return self.pairset.example(index % self.n)


def pair_examples(root: Path, task: str, split: str, max_pairs: int | None = None) -> PairList:
    """PairExamples of one task and split (cyclepref.reward.data), ordered by pair_id, optionally the first N."""
    from cyclepref.reward.data import TablePairSource

    return PairList(TablePairSource(Path(root)).pairs(task, split), max_pairs)


