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
    """Pairs of a PairSet (all, or those at `indices`) as a sequence of PairExamples, decoded on access (nothing is
    held twice); `n` keeps the first n of them."""

    def __init__(self, pairset, n: int | None = None, indices: Sequence[int] | None = None):
        self.pairset = pairset
        self.indices = list(range(len(pairset)) if indices is None else indices)[:n]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self.pairset.example(self.indices[i]) for i in range(*index.indices(len(self)))]
        return self.pairset.example(self.indices[index])


def policy_scores(root: Path, task: str, policy: str) -> dict[str, float]:
    """input_id -> the mean oriented cycle score (higher = better) of the policy's own candidates of that input."""
    from cyclepref.scoring import oriented

    t = pq.read_table(Path(root) / PATHS[f"{task}_scores"], columns=["input_id", "model", "score", "direction"])
    t = t.filter(pc.equal(t.column("model"), policy)).to_pydict()
    if not t["input_id"]:
        raise ValueError(
            f"pairs: beats_policy needs the policy {policy!r} among the {task} candidate models (its own outputs and "
            "their cycle scores); add it to the candidates or set pairs: all"
        )
    sums: dict[str, list[float]] = {}
    for i, s, d in zip(t["input_id"], t["score"], t["direction"], strict=True):
        sums.setdefault(i, []).append(float(oriented([s], d)[0]))
    return {i: sum(v) / len(v) for i, v in sums.items()}


def beats_policy(pairset, scores: dict[str, float]) -> list[int]:
    """Indices of the pairs whose chosen candidate scores strictly better than the policy's own on that input."""
    chosen, _ = pairset.cycle_scores()
    return [i for i, (inp, c) in enumerate(zip(pairset.input_ids, chosen, strict=True))
            if inp in scores and c > scores[inp]]


def policy_pairs(root: Path, task: str, mode: str, policy: str,
                 max_pairs: int | None = None) -> tuple[PairList, PairList]:
    """The train and valid pairs a DPO stage learns from and validates on: all of them, or (mode beats_policy) those
    whose chosen candidate beats the policy's own output by the pipeline's cycle score. ValueError when no train
    pair is left."""
    from cyclepref.reward.data import TablePairSource

    source = TablePairSource(Path(root))
    scores = policy_scores(root, task, policy) if mode == "beats_policy" else None
    train, valid = (source.pairs(task, split) for split in ("train", "valid"))
    selected = [PairList(s, n, None if scores is None else beats_policy(s, scores))
                for s, n in ((train, max_pairs), (valid, None))]
    if not len(selected[0]):
        raise ValueError(f"{root}: no {task} train pairs selected (pairs: {mode}; dvc repro build_pairs; check "
                         "build_pairs.split)")
    return selected[0], selected[1]


def pair_examples(root: Path, task: str, split: str, max_pairs: int | None = None) -> PairList:
    """PairExamples of one task and split (cyclepref.reward.data), ordered by pair_id, optionally the first N."""
    from cyclepref.reward.data import TablePairSource

    return PairList(TablePairSource(Path(root)).pairs(task, split), max_pairs)


