"""Import the public CyclePrefDB files into this pipeline's tables, so that build_pairs and every stage after it can
train on the published data instead of regenerating it.

Layouts read (one directory per task), per split train / valid / test, the first file found of:
- `<split>.jsonl`: the Hub datasets carolineec/CyclePrefDB-I2T and carolineec/CyclePrefDB-T2I. Confirmed: the file
  pages of train.jsonl and valid.jsonl of both (I2T valid.jsonl 1.63 MB, T2I valid.jsonl 1.86 MB); no page of a
  test.jsonl was seen (a test file is read when present). The I2T dataset card (commit 435d914 of the card) says
  each record gives the path to its reconstructed images in a field named "reconstr..." (the stored copy is cut
  there); the reconstructions themselves are carolineec/CyclePrefDB-I2T-Reconstructions (.tar / split .tar.gz).
- `<split>_rankings.json`: a JSON list, as the authors' make_dataset.py writes it (hjbahng/cyclereward at
  36e10773d1385ed57d3cecf15a352d48705fd0fe, confirmed).
- `<split>.json`: a JSON list, the name the authors' train code reads (dataset/dataset.py, confirmed).

Per-input records (one per input with all its candidates and their cycle scores; the Hub files' sizes fit this, about
4-5 KB a record), the fields make_dataset.py writes and dataset/dataset.py pairs up (confirmed there):

    I2T: {"input": "<image path>", "generations": ["<caption>", ...], "scores": [<DreamSim distance>, ...]}
    T2I: {"input": "<prompt>", "generations": ["<image path>", ...], "scores": [<SBERT similarity>, ...]}

Not confirmed: the field names inside the Hub jsonl files (the card's field list is not in any stored copy seen here
beyond the reconstruction field) and the image paths they hold; hence the aliases: input = image | prompt |
real_image | real_text; generations = candidates; scores = dreamsim | sbert_score | sbert (the per-item keys of
generate.py's results); the card's reconstruction paths = reconstructions | reconstruction | recons (optional, a
list aligned with "generations"; checked for its length, not read: the published scores are used as they are).
Optional "models": [<model name>, ...] aligned with "generations" (without it: "generation-<k>", by position). A
record with none of the input keys stops the import with the keys it has. Pairs are then built by the project's
own rule (build_pairs), not the authors' thresholds.

Per-pair records, the dicts dataset/dataset.py `make_data` builds (DATA_KEY_MAPPING, confirmed there):

    I2T: {"image": "<image path>", "preferred_text": "<caption>", "rejected_text": "<caption>"}
    T2I: {"prompt": "<prompt>", "preferred_image": "<image path>", "rejected_image": "<image path>"}

carry no scores, so they cannot go through build_pairs: `--pairs-out DIR` writes them in the pair format of
cyclepref.reward.benchmarks (DIR/<task>/pairs.jsonl + images/), usable as an evaluate_reward benchmark. A directory
of per-pair records imported without --pairs-out stops with that hint.

Image paths are resolved against `images_root` (default: the directory of the file, where the extracted archives
go) and must stay inside it (an image path that leads out is quarantined).

Written (under `root`, at the pipeline's paths): inputs and quarantine (prepared like prepare_inputs: RGB PNG,
content-hash ids), i2t/t2i candidates, i2t/t2i scores (metric dreamsim / sbert). The published split is not kept:
build_pairs assigns its own split by input. Then:

    python -m cyclepref.cycleprefdb --i2t <dir> --t2i <dir>
    python -m tasks.gate i2t_scores && python -m tasks.gate t2i_scores
    dvc repro --downstream build_pairs
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from cyclepref import inputs as inp
from cyclepref import store
from cyclepref.config import PrepareInputs
from cyclepref.cycle import I2T_QUARANTINE, text_key
from cyclepref.paths import OutsideRoot, inside
from cyclepref.workstore import key_of
from cyclepref.scoring import DIRECTIONS
from cyclepref.tables import I2T_CANDIDATES, PATHS, SCORES, T2I_CANDIDATES

SPLIT_FILES = ("train", "valid", "test")
SPLIT_NAMES = ("{}.jsonl", "{}_rankings.json", "{}.json")
"""Hub files, the authors' make_dataset.py output, the authors' train-code input."""
METRICS = {"i2t": "dreamsim", "t2i": "sbert"}
INPUT_KEYS = ("input", "image", "prompt", "real_image", "real_text")
GENERATION_KEYS = ("generations", "candidates")
SCORE_KEYS = ("scores", "dreamsim", "sbert_score", "sbert")
RECONSTRUCTION_KEYS = ("reconstructions", "reconstruction", "recons")
PAIR_KEYS = {"i2t": ("image", "preferred_text", "rejected_text"), "t2i": ("prompt", "preferred_image", "rejected_image")}
"""dataset/dataset.py DATA_KEY_MAPPING: (input, preferred, rejected) of a per-pair record."""
SOURCE_TAG = "cycleprefdb"


class CyclePrefDBError(ValueError):
    """A CyclePrefDB file that does not have the documented layout."""


@dataclass
class Imported:
    """The pipeline tables built from one or both CyclePrefDB tasks."""

    inputs: dict[str, inp.PreparedInput] = field(default_factory=dict)
    quarantined: list[inp.Quarantined] = field(default_factory=list)
    candidates: dict[str, list[dict]] = field(default_factory=lambda: {"i2t": [], "t2i": []})
    scores: dict[str, list[dict]] = field(default_factory=lambda: {"i2t": [], "t2i": []})


def _pick(row: dict, keys: tuple[str, ...], where: str) -> object:
    for k in keys:
        if k in row:
            return row[k]
    raise CyclePrefDBError(f"{where}: none of the keys {list(keys)} (has {sorted(row)})")


def iter_records(path: Path) -> Iterator[tuple[str, dict]]:
    """(where, record) for each record of a .jsonl or .json file."""
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        if not isinstance(data, list):
            raise CyclePrefDBError(f"{path}: expected a JSON list of records")
        yield from ((f"{path.name}[{i}]", r) for i, r in enumerate(data))
        return
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                yield f"{path.name}:{n}", json.loads(line)
            except json.JSONDecodeError as err:
                raise CyclePrefDBError(f"{path}:{n}: not valid JSON ({err.msg})") from None


def split_files(directory: Path) -> list[Path]:
    """Per split, the first of SPLIT_NAMES that exists."""
    files = []
    for split in SPLIT_FILES:
        found = [directory / name.format(split) for name in SPLIT_NAMES if (directory / name.format(split)).exists()]
        files += found[:1]
    if not files:
        raise CyclePrefDBError(
            f"{directory}: no train/valid/test file ({', '.join(n.format('<split>') for n in SPLIT_NAMES)})"
        )
    return files


def _models(row: dict, n: int, where: str) -> list[str]:
    names = row.get("models") or row.get("model_names") or [f"generation-{k}" for k in range(n)]
    if len(names) != n:
        raise CyclePrefDBError(f"{where}: {len(names)} models for {n} generations")
    return [str(m) for m in names]


def _seeds(models: list[str]) -> list[int]:
    """The k-th generation of a model gets seed k (T2I: one model, several seeds)."""
    seen: dict[str, int] = {}
    out = []
    for m in models:
        out.append(seen.get(m, 0))
        seen[m] = out[-1] + 1
    return out


def _image_item(source: str, root: Path, relative: object) -> inp.RawItem:
    """An image named by a record, read only when it resolves inside `root`."""
    try:
        return inp.RawItem(source, image=inside(root, str(relative)))
    except OutsideRoot as err:
        return inp.RawItem(source, image=None, problem=str(err))


def _candidate(
    task: str, base: dict, record: inp.PreparedInput, generation: object, where: str, root: Path,
    prepare: PrepareInputs,
) -> dict:
    """One candidate row: i2t the cleaned caption and its text_key, t2i the image normalised to PNG."""
    if task == "i2t":
        from cyclepref.models.captioner import clean_caption

        text = clean_caption(str(generation))
        if not text:
            raise inp.InvalidInput("empty caption")
        return {**base, "prompt": "", "raw_text": str(generation), "text": text,
                "text_key": text_key(record.input_id, text)}
    image = inp.validate(_image_item(where, root, generation), prepare).image
    return {**base, "prompt": record.prompt, "image": image}


def read_task(
    task: str,
    directory: str | Path,
    images_root: str | Path | None = None,
    prepare: PrepareInputs | None = None,
    into: Imported | None = None,
) -> Imported:
    """Read one task's CyclePrefDB files; bad inputs and candidates are quarantined with the reason."""
    directory = Path(directory)
    prepare = prepare or PrepareInputs(source="folder", path=str(directory))
    out = into or Imported()
    metric = METRICS[task]
    for path in split_files(directory):
        root = Path(images_root) if images_root else path.parent
        for where, row in iter_records(path):
            source = f"{SOURCE_TAG}-{task}/{where}"
            if is_pair_record(task, row):
                raise CyclePrefDBError(f"{where}: a per-pair record ({', '.join(PAIR_KEYS[task])}) has no scores; "
                                       "convert the directory with --pairs-out DIR")
            raw_input = _pick(row, INPUT_KEYS, where)
            generations = list(_pick(row, GENERATION_KEYS, where))
            scores = list(_pick(row, SCORE_KEYS, where))
            if len(scores) != len(generations):
                raise CyclePrefDBError(f"{where}: {len(scores)} scores for {len(generations)} generations")
            recons = next((row[k] for k in RECONSTRUCTION_KEYS if k in row), None)
            if recons is not None and (not isinstance(recons, list) or len(recons) != len(generations)):
                raise CyclePrefDBError(f"{where}: reconstructions must be a list of {len(generations)} paths")
            item = _image_item(source, root, raw_input) if task == "i2t" else inp.RawItem(
                source, image=None, prompt=raw_input
            )
            try:
                record = inp.validate(item, prepare)
            except inp.InvalidInput as err:
                out.quarantined.append(inp.Quarantined(source, str(err)))
                continue
            if record.input_id in out.inputs:
                out.quarantined.append(inp.Quarantined(source, f"duplicate input ({record.input_id})"))
                continue
            out.inputs[record.input_id] = record
            models = _models(row, len(generations), where)
            rows = zip(generations, scores, models, _seeds(models), strict=True)
            for k, (gen, score, model, seed) in enumerate(rows):
                what = f"{source}#generation{k}"
                if not isinstance(score, int | float) or not math.isfinite(score):
                    out.quarantined.append(inp.Quarantined(what, f"score {score!r} is not a finite number"))
                    continue
                prompt = "" if task == "i2t" else record.prompt
                cid = key_of(record.input_id, model, prompt, seed, SOURCE_TAG)
                base = {"candidate_id": cid, "input_id": record.input_id, "model": model, "seed": seed,
                        "gen_hash": SOURCE_TAG}
                try:
                    candidate = _candidate(task, base, record, gen, what, root, prepare)
                except inp.InvalidInput as err:
                    out.quarantined.append(inp.Quarantined(what, str(err)))
                    continue
                out.candidates[task].append(candidate)
                out.scores[task].append(
                    {"task": task, "input_id": record.input_id, "candidate_id": cid, "model": model,
                     "text": candidate.get("text"), "score": float(score), "metric": metric,
                     "direction": DIRECTIONS[metric]}
                )
    return out


def is_pair_record(task: str, row: dict) -> bool:
    return all(k in row for k in PAIR_KEYS[task][1:])


def convert_pair_records(task: str, directory: str | Path, out: str | Path,
                         images_root: str | Path | None = None) -> dict[str, int]:
    """Per-pair records of one task -> OUT/pairs.jsonl + OUT/images/ in the pair format of
    cyclepref.reward.benchmarks; a record with an unreadable or outside image is skipped and counted."""
    from cyclepref.reward.benchmarks import PairWriter

    writer = PairWriter(Path(out))
    counts = {"pairs": 0, "skipped": 0}
    source_key, good_key, bad_key = PAIR_KEYS[task]
    for path in split_files(Path(directory)):
        root = Path(images_root) if images_root else path.parent
        for where, row in iter_records(path):
            if not is_pair_record(task, row) or source_key not in row:
                raise CyclePrefDBError(f"{where}: not a per-pair {task} record ({', '.join(PAIR_KEYS[task])}); "
                                       f"has {sorted(row)}")
            try:
                if task == "i2t":
                    fields = {"image": writer.image(inside(root, str(row["image"])).read_bytes()),
                              "chosen": str(row[good_key]).strip(), "rejected": str(row[bad_key]).strip()}
                else:
                    fields = {"prompt": str(row["prompt"]).strip(),
                              "chosen": writer.image(inside(root, str(row[good_key])).read_bytes()),
                              "rejected": writer.image(inside(root, str(row[bad_key])).read_bytes())}
            except (OutsideRoot, OSError, ValueError):
                counts["skipped"] += 1
                continue
            writer.write({"id": f"{SOURCE_TAG}-{task}/{where}", "task": task, **fields})
    writer.close()
    counts["pairs"] = writer.count
    return counts


def _write(table: pa.Table, path: Path, schema: pa.Schema, rows_per_shard: int = 500) -> list[Path]:
    """One parquet file, or (a path without .parquet: an image table) part-NNNNN.parquet shards in that directory."""
    if path.suffix == ".parquet":
        return [store.write_table(table, path, schema)]
    starts = range(0, max(table.num_rows, 1), rows_per_shard)
    return [
        store.write_table(table.slice(start, rows_per_shard), path / f"part-{k:05d}.parquet", schema)
        for k, start in enumerate(starts)
    ]


def write_tables(imported: Imported, root: str | Path) -> dict[str, int]:
    """Write the imported tables at the pipeline's paths under `root`, each output directory with its manifest;
    returns the row counts."""
    root = Path(root)
    records = sorted(imported.inputs.values(), key=lambda r: r.input_id)
    written = {
        "inputs": _write(inp.inputs_table(records), root / PATHS["inputs"], inp.INPUTS_SCHEMA),
        "quarantine": _write(inp.quarantine_table(imported.quarantined), root / PATHS["quarantine"],
                             inp.QUARANTINE_SCHEMA),
    }
    counts = {"inputs": len(records), "quarantined": len(imported.quarantined)}
    for task, schema in (("i2t", I2T_CANDIDATES), ("t2i", T2I_CANDIDATES)):
        if not imported.scores[task]:
            continue
        candidates = pa.Table.from_pylist(imported.candidates[task], schema)
        written[f"{task}_candidates"] = _write(candidates, root / PATHS[f"{task}_candidates"], schema)
        written[f"{task}_scores"] = _write(pa.Table.from_pylist(imported.scores[task], SCORES),
                                           root / PATHS[f"{task}_scores"], SCORES)
        counts[f"{task}_candidates"] = candidates.num_rows
    if "i2t_candidates" in written:
        written["i2t_quarantine"] = _write(I2T_QUARANTINE.empty_table(), root / PATHS["i2t_quarantine"],
                                           I2T_QUARANTINE)
    directories: dict[Path, list[Path]] = {}
    for files in written.values():
        for f in files:
            directories.setdefault(f.parent, []).append(f)
    for directory, files in directories.items():
        store.write_manifest(directory, files, source=SOURCE_TAG)
    return counts


def import_cycleprefdb(
    root: str | Path,
    i2t: str | Path | None = None,
    t2i: str | Path | None = None,
    images_root: str | Path | None = None,
) -> dict[str, int]:
    """Read the given task directories and write the pipeline tables under `root`."""
    if i2t is None and t2i is None:
        raise CyclePrefDBError("give at least one of the I2T and T2I directories")
    imported = Imported()
    for task, directory in (("i2t", i2t), ("t2i", t2i)):
        if directory is not None:
            read_task(task, directory, images_root, into=imported)
    return write_tables(imported, root)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--i2t", type=Path, help="directory with the CyclePrefDB-I2T files")
    parser.add_argument("--t2i", type=Path, help="directory with the CyclePrefDB-T2I files")
    parser.add_argument("--images-root", type=Path, help="resolve image paths here (default: beside each file)")
    parser.add_argument("--root", type=Path, default=Path("."), help="project root to write the tables under")
    parser.add_argument("--pairs-out", type=Path, help="per-pair records: write DIR/<task>/pairs.jsonl instead")
    args = parser.parse_args(argv)
    try:
        if args.pairs_out is not None:
            counts = {f"{task}_{k}": v for task, d in (("i2t", args.i2t), ("t2i", args.t2i)) if d is not None
                      for k, v in convert_pair_records(task, d, args.pairs_out / task, args.images_root).items()}
        else:
            counts = import_cycleprefdb(args.root, args.i2t, args.t2i, args.images_root)
    except (CyclePrefDBError, FileNotFoundError) as err:
        raise SystemExit(f"cycleprefdb: {err}") from None
    print("cycleprefdb: " + ", ".join(f"{k}={v}" for k, v in counts.items()))


if __name__ == "__main__":
    main()
