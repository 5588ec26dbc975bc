"""External preference benchmarks in one pair format, and converters from published layouts.

Pair format: a jsonl file, one pair per line, images as files (paths relative to the jsonl's directory, never leaving
it):
  {"id": "...", "task": "i2t", "image": "images/<file>", "chosen": "<caption>", "rejected": "<caption>"}
  {"id": "...", "task": "t2i", "prompt": "<text>", "chosen": "images/<file>", "rejected": "images/<file>"}
Optional keys: "group" (the shared input; default: the image / prompt), "chosen_cycle_score",
"rejected_cycle_score" and "cycle_direction" ("higher" | "lower") when raw cycle scores are known, "meta" (any).

Converters (`python -m cyclepref.reward.benchmarks {detailcaps,genai-bench} SRC OUT`) read the published
parquet files (a file or a directory searched recursively) and write OUT/pairs.jsonl plus content-addressed
images under OUT/images/:
- DetailCaps-4870 (foundation-multimodal-models/DetailCaps-4870): per image (`binary` bytes, `image` id) the
  captions of the models named in `GPT4_Eval` (a JSON object model -> score; columns CogVLM, ShareCaptioner,
  LLaVA_v15); every pair of captions with different scores becomes an I2T pair preferring the higher score.
  Rows without GPT4_Eval are skipped and counted.
- GenAI-Bench image generation (TIGER-Lab/GenAI-Bench, config image_generation): `prompt`, `left_image`,
  `right_image`, `vote_type`; leftvote / rightvote become T2I pairs, tievote / bothbad_vote are skipped and
  counted (a pairwise accuracy needs a preferred side).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cyclepref.paths import OutsideRoot, inside
from cyclepref.reward import Task
from cyclepref.reward.data import PairExample, decode
from cyclepref.scoring import oriented

TASKS: tuple[Task, ...] = ("i2t", "t2i")


class BenchmarkFormatError(ValueError):
    """A pairs file line that does not follow the pair format; the message names file and line."""


@dataclass
class JsonlPairSet:
    """The pairs of one task from a pairs jsonl; images are read from files when an example is requested."""

    task: Task
    records: list[dict]
    base: Path

    def __len__(self) -> int:
        return len(self.records)

    def example(self, index: int) -> PairExample:
        r = self.records[index]
        if self.task == "i2t":
            return PairExample(
                r["id"], "i2t", r.get("group", r["image"]), decode(inside(self.base, r["image"])), None, r["chosen"],
                r["rejected"],
            )
        return PairExample(
            r["id"], "t2i", r.get("group", r["prompt"]), None, r["prompt"], decode(inside(self.base, r["chosen"])),
            decode(inside(self.base, r["rejected"])),
        )

    def cycle_scores(self) -> tuple[np.ndarray, np.ndarray] | None:
        keys = ("chosen_cycle_score", "rejected_cycle_score", "cycle_direction")
        if not self.records or not all(all(k in r for k in keys) for r in self.records):
            return None
        chosen = np.array([oriented([r["chosen_cycle_score"]], r["cycle_direction"])[0] for r in self.records])
        rejected = np.array([oriented([r["rejected_cycle_score"]], r["cycle_direction"])[0] for r in self.records])
        return chosen, rejected


REQUIRED = {"i2t": ("id", "image", "chosen", "rejected"), "t2i": ("id", "prompt", "chosen", "rejected")}
IMAGE_KEYS = {"i2t": ("image",), "t2i": ("chosen", "rejected")}
"""Image paths must resolve inside the pairs file's directory."""


def load_benchmark(path: str | Path) -> dict[Task, JsonlPairSet]:
    """The pairs of a pairs jsonl, per task (tasks without pairs are absent)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: benchmark pairs file not found (convert with cyclepref.reward.benchmarks)")
    by_task: dict[str, list[dict]] = {t: [] for t in TASKS}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise BenchmarkFormatError(f"{path}:{n}: not valid JSON ({err.msg})") from None
        task = rec.get("task") if isinstance(rec, dict) else None
        if task not in TASKS:
            raise BenchmarkFormatError(f"{path}:{n}: 'task' must be one of {TASKS}, got {task!r}")
        missing = [k for k in REQUIRED[task] if not isinstance(rec.get(k), str) or not rec[k]]
        if missing:
            raise BenchmarkFormatError(f"{path}:{n}: {task} pair needs non-empty string(s) {missing}")
        for key in IMAGE_KEYS[task]:
            try:
                inside(path.parent, rec[key])
            except OutsideRoot as err:
                raise BenchmarkFormatError(f"{path}:{n}: {key}: {err}") from None
        by_task[task].append(rec)
    return {t: JsonlPairSet(t, recs, path.parent) for t, recs in by_task.items() if recs}


# ---------------------------------------------------------------- writing


class PairWriter:
    """Writes OUT/pairs.jsonl and content-addressed OUT/images/<sha256[:20]>.<ext> (each image once)."""

    def __init__(self, out: Path):
        self.out = Path(out)
        (self.out / "images").mkdir(parents=True, exist_ok=True)
        self._file = open(self.out / "pairs.jsonl.tmp", "w")
        self.count = 0

    def image(self, data: object) -> str:
        raw = _image_bytes(data)
        if raw is None:
            raise ValueError("missing image bytes")
        im = decode(raw)
        ext = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}.get(_format(raw), "png")
        name = f"images/{hashlib.sha256(raw).hexdigest()[:20]}.{ext}"
        target = self.out / name
        if not target.exists():
            if ext == "png" and _format(raw) != "PNG":
                im.save(target, format="PNG")
            else:
                target.write_bytes(raw)
        return name

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record, ensure_ascii=False, sort_keys=True) + "\n")
        self.count += 1

    def close(self) -> Path:
        self._file.close()
        final = self.out / "pairs.jsonl"
        (self.out / "pairs.jsonl.tmp").replace(final)
        return final


def _image_bytes(data: object) -> bytes | None:
    if isinstance(data, dict):
        data = data.get("bytes")
    return bytes(data) if isinstance(data, bytes | bytearray) and data else None


def _format(raw: bytes) -> str:
    from io import BytesIO

    from PIL import Image

    with Image.open(BytesIO(raw)) as im:
        return im.format or ""


def _parquet_rows(src: Path, columns: list[str] | None = None) -> Iterator[dict]:
    import pyarrow.parquet as pq

    files = sorted(src.rglob("*.parquet")) if src.is_dir() else [src]
    if not files or not files[0].exists():
        raise FileNotFoundError(f"{src}: no parquet files")
    for f in files:
        pf = pq.ParquetFile(f)
        have = set(pf.schema_arrow.names)
        if columns is not None and not set(columns) <= have:
            raise ValueError(f"{f}: expected columns {columns}, found {sorted(have)}")
        for batch in pf.iter_batches(batch_size=64, columns=columns):
            yield from batch.to_pylist()


# ---------------------------------------------------------------- converters


def _score(value: object) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


def convert_detailcaps(src: str | Path, out: str | Path) -> dict:
    """DetailCaps-4870 parquet -> I2T pairs ranked by the GPT4_Eval score of each caption."""
    writer = PairWriter(Path(out))
    stats: Counter[str] = Counter()
    for row in _parquet_rows(Path(src)):
        stats["rows"] += 1
        raw_eval = row.get("GPT4_Eval")
        if raw_eval is None:
            stats["skipped_no_eval"] += 1
            continue
        try:
            evals = json.loads(raw_eval) if isinstance(raw_eval, str) else raw_eval
        except json.JSONDecodeError:
            stats["skipped_bad_eval"] += 1
            continue
        scored = {
            m: s for m, v in (evals or {}).items() if isinstance(row.get(m), str) and (s := _score(v)) is not None
        }
        if len(scored) < 2:
            stats["skipped_fewer_than_two_scored_captions"] += 1
            continue
        try:
            image = writer.image(row.get("binary"))
        except Exception:
            stats["skipped_unreadable_image"] += 1
            continue
        ident = str(row.get("image") or image)
        for a, b in itertools.combinations(sorted(scored), 2):
            if scored[a] == scored[b]:
                stats["skipped_tied_pairs"] += 1
                continue
            good, bad = (a, b) if scored[a] > scored[b] else (b, a)
            writer.write({
                "id": f"{ident}:{good}>{bad}", "task": "i2t", "group": ident, "image": image,
                "chosen": row[good].strip(), "rejected": row[bad].strip(),
                "meta": {"chosen_model": good, "rejected_model": bad, "chosen_gpt4_score": scored[good],
                         "rejected_gpt4_score": scored[bad], "source": row.get("source")},
            })
    writer.close()
    return {"pairs": writer.count, **stats}


VOTES = {"leftvote": ("left", "right"), "rightvote": ("right", "left")}


def convert_genai_bench(src: str | Path, out: str | Path) -> dict:
    """GenAI-Bench image_generation parquet -> T2I pairs from decisive human votes."""
    writer = PairWriter(Path(out))
    stats: Counter[str] = Counter()
    for n, row in enumerate(_parquet_rows(Path(src))):
        stats["rows"] += 1
        vote = row.get("vote_type")
        if vote not in VOTES:
            stats[f"skipped_{vote}"] += 1
            continue
        prompt = row.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            stats["skipped_no_prompt"] += 1
            continue
        good, bad = VOTES[vote]
        try:
            chosen, rejected = writer.image(row.get(f"{good}_image")), writer.image(row.get(f"{bad}_image"))
        except Exception:
            stats["skipped_unreadable_image"] += 1
            continue
        writer.write({
            "id": f"genai-{n}", "task": "t2i", "prompt": prompt.strip(), "chosen": chosen, "rejected": rejected,
            "meta": {"vote_type": vote, "chosen_model": row.get(f"{good}_model"),
                     "rejected_model": row.get(f"{bad}_model")},
        })
    writer.close()
    return {"pairs": writer.count, **stats}


CONVERTERS = {"detailcaps": convert_detailcaps, "genai-bench": convert_genai_bench}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Convert a published benchmark to the cyclepref pair format.")
    parser.add_argument("layout", choices=sorted(CONVERTERS))
    parser.add_argument("src", type=Path, help="parquet file or directory of the published benchmark")
    parser.add_argument("out", type=Path, help="output directory (pairs.jsonl + images/)")
    args = parser.parse_args(argv)
    print(json.dumps(CONVERTERS[args.layout](args.src, args.out), indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
