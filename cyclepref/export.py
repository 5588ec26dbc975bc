"""Export of the pairs as a Hugging Face `datasets` directory with CyclePrefDB-style columns and a dataset card.

Layout (loadable with `datasets.load_dataset(<dir>, "i2t")` / `"t2i"`, or pushed to the Hub as is):

    <dir>/README.md                          dataset card: YAML configs, provenance (profile, models, pair rule and
                                             thresholds), counts, statistics and the licence
    <dir>/i2t/<split>-<k>-of-<n>.parquet     image, preferred_text, rejected_text, ...
    <dir>/t2i/<split>-<k>-of-<n>.parquet     prompt, preferred_image, rejected_image, ...
    <dir>/_manifest.json                     every file's size and sha256, row counts

Images are embedded in every row (datasets.Image: PNG bytes), or, with `embed_images: false` (paper scale: one input
image appears in up to 55 pairs), written once as <dir>/images/{inputs,candidates}/<id>.png with the image columns
holding that path relative to <dir>. Splits without pairs get no file (`datasets` cannot read an empty parquet file)
and are listed with 0 pairs in the card.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import yaml

from cyclepref import store
from cyclepref.config import ExportDataset
from cyclepref.pairs import SPLITS

COMMON = [
    ("preferred_score", "float64"),
    ("rejected_score", "float64"),
    ("margin", "float64"),
    ("preferred_model", "string"),
    ("rejected_model", "string"),
    ("metric", "string"),
    ("direction", "string"),
    ("split", "string"),
    ("pair_id", "string"),
    ("input_id", "string"),
    ("preferred_id", "string"),
    ("rejected_id", "string"),
]
COLUMNS = {
    "i2t": [("image", "image"), ("preferred_text", "string"), ("rejected_text", "string"), *COMMON],
    "t2i": [("prompt", "string"), ("preferred_image", "image"), ("rejected_image", "image"), *COMMON],
}
"""Export columns per task (CyclePrefDB-I2T: image, preferred_text, rejected_text; -T2I: prompt, preferred_image,
rejected_image), followed by scores, models, split and the ids that link back to the pipeline's tables."""
TASK_CATEGORIES = {"i2t": "image-to-text", "t2i": "text-to-image"}


class ExportError(ValueError):
    """Pairs that reference an input or candidate the export cannot find."""


def features(task: str, embed_images: bool = True):
    """The `datasets.Features` of one task's export (image columns: datasets.Image, or path strings)."""
    import datasets

    def feature(kind: str):
        if kind == "image":
            return datasets.Image() if embed_images else datasets.Value("string")
        return datasets.Value(kind)

    return datasets.Features({name: feature(kind) for name, kind in COLUMNS[task]})


def image_path(kind: str, ids: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray | pa.Array:
    """Relative path of each image written once under images/ ("inputs" or "candidates")."""
    return pc.binary_join_element_wise(f"images/{kind}/", ids, ".png", "")


def _positions(keys: pa.ChunkedArray, ids: pa.ChunkedArray, what: str) -> pa.Array:
    """Row of each key in `ids`; every key must be found."""
    index = pc.index_in(keys, value_set=ids.combine_chunks())
    if index.null_count:
        missing = pc.filter(keys, pc.is_null(index)).unique().to_pylist()
        raise ExportError(f"{len(missing)} {what} not found, e.g. {missing[:3]}")
    return index.combine_chunks() if isinstance(index, pa.ChunkedArray) else index


def _images(values: pa.ChunkedArray, rows: pa.Array, type_: pa.DataType) -> pa.Array:
    data = values.take(rows).combine_chunks()
    if data.null_count:
        raise ExportError(f"{data.null_count} pair(s) reference a row without an image")
    return pa.StructArray.from_arrays([data, pa.nulls(len(data), pa.string())], fields=list(type_))


class _TaskSource:
    """Where each pair's input and candidates sit in the input / candidate tables (looked up once per task)."""

    def __init__(self, task: str, pairs: pa.Table, inputs: pa.Table, candidates: pa.Table):
        self.task, self.pairs, self.inputs, self.candidates = task, pairs, inputs, candidates
        self.input_rows = _positions(pairs.column("input_id"), inputs.column("input_id"), "input ids")
        ids = candidates.column("candidate_id")
        self.preferred_rows = _positions(pairs.column("preferred_id"), ids, "preferred candidates")
        self.rejected_rows = _positions(pairs.column("rejected_id"), ids, "rejected candidates")

    def rows(self, start: int, length: int, schema: pa.Schema, embed_images: bool) -> pa.Table:
        """Export rows start .. start + length of this task's pairs."""
        pairs = self.pairs.slice(start, length)
        inp, pref, rej = (r.slice(start, length) for r in (self.input_rows, self.preferred_rows, self.rejected_rows))
        if self.task == "i2t":
            text = self.candidates.column("text")
            image = (_images(self.inputs.column("image"), inp, schema.field("image").type) if embed_images
                     else image_path("inputs", pairs.column("input_id")))
            head = {"image": image, "preferred_text": text.take(pref), "rejected_text": text.take(rej)}
        else:
            head = {"prompt": self.inputs.column("prompt").take(inp)}
            for side, rows in (("preferred", pref), ("rejected", rej)):
                name = f"{side}_image"
                head[name] = (_images(self.candidates.column("image"), rows, schema.field(name).type) if embed_images
                              else image_path("candidates", pairs.column(f"{side}_id")))
        return pa.table({**head, **{name: pairs.column(name) for name, _ in COMMON}}, schema=schema)

    def write_images(self, out_dir: Path, batch: int) -> list[Path]:
        """Each image that this split's pairs use, written once as images/<kind>/<id>.png."""
        if self.task == "i2t":
            kind, table, used = "inputs", self.inputs, pc.unique(self.input_rows)
        else:
            kind, table = "candidates", self.candidates
            used = pc.unique(pa.concat_arrays([self.preferred_rows, self.rejected_rows]))
        ids, data = table.column("input_id" if kind == "inputs" else "candidate_id"), table.column("image")
        (out_dir / "images" / kind).mkdir(parents=True, exist_ok=True)
        written = []
        for start in range(0, len(used), batch):
            rows = used.slice(start, batch)
            for name, png in zip(ids.take(rows).to_pylist(), data.take(rows).to_pylist(), strict=True):
                if png is None:
                    raise ExportError(f"{kind} {name} has no image")
                path = out_dir / "images" / kind / f"{name}.png"
                path.write_bytes(png)
                written.append(path)
        return written


def write_export(
    out_dir: str | Path,
    pairs: pa.Table,
    inputs: pa.Table,
    candidates: dict[str, pa.Table],
    cfg: ExportDataset,
    stats: dict | None = None,
    provenance: dict | None = None,
) -> dict:
    """Write the export directory atomically (temporary directory, then swapped in); returns the counts.

    candidates: per task present in `pairs`, i2t -> table with candidate_id and text (the i2t scores or candidates
    table), t2i -> table with candidate_id and image (the t2i candidates table).
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = store.temp_dir(out_dir)
    try:
        counts, files = {}, []
        for task in sorted(set(pairs.column("task").to_pylist())):
            schema = features(task, cfg.embed_images).arrow_schema
            counts[task] = {}
            for split in SPLITS:
                mask = pc.and_(pc.equal(pairs.column("task"), task), pc.equal(pairs.column("split"), split))
                source = _TaskSource(task, pairs.filter(mask), inputs, candidates[task])
                rows = source.pairs.num_rows
                counts[task][split] = {"pairs": rows, "inputs": len(pc.unique(source.pairs.column("input_id")))}
                n = -(-rows // cfg.rows_per_shard)
                for k in range(n):
                    path = tmp / task / f"{split}-{k:05d}-of-{n:05d}.parquet"
                    path.parent.mkdir(parents=True, exist_ok=True)
                    shard = source.rows(k * cfg.rows_per_shard, cfg.rows_per_shard, schema, cfg.embed_images)
                    pq.write_table(shard, path, compression="zstd")
                    files.append(path)
                if not cfg.embed_images:
                    files += source.write_images(tmp, cfg.rows_per_shard)
        card = tmp / "README.md"
        card.write_text(dataset_card(cfg, counts, stats, provenance))
        store.write_manifest(tmp, [*files, card], counts=counts)
        _swap_in(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return counts


def _swap_in(tmp: Path, out_dir: Path) -> None:
    old = out_dir.with_name(f".{out_dir.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if out_dir.exists():
        out_dir.rename(old)
    tmp.rename(out_dir)
    if old.exists():
        shutil.rmtree(old)


def _size_category(n: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < limit:
            return name
    return "1M<n<10M"


def provenance(params) -> dict:
    """What produced the pairs, for the card: the profile, every model by name and path, the pair rule's settings."""

    def models(specs) -> dict[str, str]:
        return {m.name: m.path for m in specs}

    out: dict = {"profile": params.profile, "inputs": params.prepare_inputs.path}
    if params.generate_i2t is not None:
        out["i2t"] = {"forward": models(params.generate_i2t.captioners),
                      "backward": models([params.reconstruct_i2t.model]) if params.reconstruct_i2t else {},
                      "metric": params.score_i2t.metric.kind if params.score_i2t else None}
    if params.generate_t2i is not None:
        out["t2i"] = {"forward": models(params.generate_t2i.models), "seeds": list(params.generate_t2i.seeds),
                      "backward": models([params.reconstruct_t2i.captioner]) if params.reconstruct_t2i else {},
                      "metric": params.score_t2i.metric.kind if params.score_t2i else None}
    if params.build_pairs is not None:
        out["rule"] = params.build_pairs.model_dump(mode="json")
    return out


def _provenance_section(p: dict) -> list[str]:
    lines = ["## Provenance", "", f"- profile `{p['profile']}`, inputs `{p['inputs']}`"]
    for task, what in (("i2t", "captioners"), ("t2i", "text-to-image models")):
        if task in p:
            t = p[task]
            forward = ", ".join(f"`{n}` ({path})" for n, path in t["forward"].items())
            backward = ", ".join(f"`{n}` ({path})" for n, path in t["backward"].items())
            seeds = f", seeds {t['seeds']}" if "seeds" in t else ""
            lines.append(f"- {task}: forward {what} {forward}{seeds}; backward {backward}; similarity `{t['metric']}`")
    rule = p.get("rule")
    if rule:
        limits = ", ".join(f"{k} {v}" for k, v in rule["quality_limits"].items() if v is not None) or "none"
        split = rule["split"]
        lines += [
            "",
            "Pair rule (PAPER.md §3): every unordered pair of an input's candidates; the candidate with the better "
            "cycle score (in the metric's direction) is `preferred`. Dropped: pairs of equal texts, near-ties "
            f"(|score difference| < {rule['tie_gap']} metric units), and pairs whose preferred candidate is worse "
            f"than the quality limit ({limits}). Split by input (hash with salt `{split['salt']}`): "
            f"train {split['train']}, valid {split['valid']}, test {split['test']}.",
        ]
    return [*lines, ""]


MEANING = (
    "What the numbers mean: a pair's `margin` is |preferred score - rejected score| in the metric's own units (a "
    "confidence, not a probability); a model's win rate is the share of its pairs in which it was preferred."
)


def _licence_section(cfg: ExportDataset) -> list[str]:
    lines = ["## Licence", "", f"`{cfg.license}`."]
    if cfg.license_note:
        lines.append(cfg.license_note)
    if cfg.license == "other":
        lines.append("The inputs keep their own licences and the generated texts and images the terms of the models "
                     "listed under Provenance.")
    return [*lines, ""]


def dataset_card(
    cfg: ExportDataset, counts: dict[str, dict], stats: dict | None = None, provenance: dict | None = None
) -> str:
    """README.md: YAML header (configs per task with the non-empty splits), provenance, counts, statistics and the
    licence."""
    total = sum(c["pairs"] for per_split in counts.values() for c in per_split.values())
    configs = []
    for task, per_split in counts.items():
        files = [{"split": s, "path": f"{task}/{s}-*.parquet"} for s in SPLITS if per_split[s]["pairs"]]
        if files:
            configs.append({"config_name": task, "data_files": files})
    header = {
        "pretty_name": cfg.name,
        "license": cfg.license,
        "task_categories": [TASK_CATEGORIES[t] for t in counts],
        "size_categories": [_size_category(total)],
        "tags": ["preference", "cycle-consistency", "synthetic"],
        "configs": configs,
    }
    lines = [
        "---",
        yaml.safe_dump(header, sort_keys=False).rstrip(),
        "---",
        "",
        f"# {cfg.name}",
        "",
        "Preference pairs derived from cycle consistency (Bahng et al., *Cycle Consistency as Reward*, ICCV 2025),",
        "built by the cyclepref pipeline. For an image (I2T) or a prompt (T2I), two candidates are compared by how",
        "well their reconstruction matches the input; the better one is `preferred`.",
        "",
        "```python",
        "from datasets import load_dataset",
        "",
        f'pairs = load_dataset("<this directory>", "{next(iter(counts), "i2t")}")',
        "```",
        "",
        "## Columns",
        "",
    ]
    for task in counts:
        lines.append(f"- `{task}`: " + ", ".join(f"`{name}`" for name, _ in COLUMNS[task]))
    lines += ["", "## Counts", "", "| task | split | pairs | inputs |", "|---|---|---|---|"]
    for task, per_split in counts.items():
        for split in SPLITS:
            lines.append(f"| {task} | {split} | {per_split[split]['pairs']} | {per_split[split]['inputs']} |")
    lines += ["", f"Total: {total} pairs.", ""]
    if provenance:
        lines += _provenance_section(provenance)
    if stats:
        lines += [*_stats_section(stats), MEANING, ""]
    lines += _licence_section(cfg)
    return "\n".join(lines) + "\n"


def _stats_section(stats: dict) -> list[str]:
    lines = ["## Construction and statistics", "", f"Near-tie gap: {stats.get('tie_gap')} (metric units).", ""]
    for task, s in stats.get("tasks", {}).items():
        m = s["margin"]
        lines += [
            f"### {task}",
            "",
            f"- metric `{s['metric']}` ({s['direction']} is better), quality limit of the preferred: "
            f"{'none' if s['quality_limit'] is None else s['quality_limit']}",
            f"- {s['inputs']} inputs, {s['candidates']} candidates, {s['considered']} candidate pairs considered; "
            f"dropped: {s['dropped_equal_text']} equal texts, {s['dropped_near_tie']} near-ties, "
            f"{s['dropped_low_quality']} below the quality limit; {s['merged_duplicate_texts']} duplicate captions "
            f"merged; {s['pairs']} pairs kept (survival {s['survival']:.1%})",
            f"- margin: mean {m['mean']:.4g}, median {m['median']:.4g}, p10 {m['p10']:.4g}, p90 {m['p90']:.4g}",
            "",
            "| model | wins | losses | win rate | mean margin won |",
            "|---|---|---|---|---|",
        ]
        for model, ms in s["models"].items():
            lines.append(
                f"| {model} | {ms['wins']} | {ms['losses']} | {ms['win_rate']:.1%} | {ms['mean_margin_won']:.4g} |"
            )
        lines.append("")
    return lines
