"""External preference benchmarks in one pair format, and converters from published layouts.

Pair format: a jsonl file, one pair per line, images as files (paths relative to the jsonl's directory, never leaving
it):
  {"id": "...", "task": "i2t", "image": "images/<file>", "chosen": "<caption>", "rejected": "<caption>"}
  {"id": "...", "task": "t2i", "prompt": "<text>", "chosen": "images/<file>", "rejected": "images/<file>"}
Optional keys: "group" (the shared input; default: the image / prompt), "chosen_cycle_score",
"rejected_cycle_score" and "cycle_direction" ("higher" | "lower") when raw cycle scores are known, "meta" (any).

Converters (`python -m cyclepref.reward.benchmarks {detailcaps,genai-bench,genai-arena} SRC OUT`) write
OUT/pairs.jsonl plus content-addressed images under OUT/images/:
- detailcaps: DetailCaps-4870 (I2T; the paper's detailed-caption benchmark), the single file DetailCaps-4870.parquet
  (split test) of the Hub dataset foundation-multimodal-models/DetailCaps-4870. Confirmed columns (dataset card;
  EvolvingLMMs-Lab/lmms-eval lmms_eval/tasks/detailcaps/utils.py): `source` (origin dataset), `image` (identifier:
  path, url or item id), `binary` (encoded image bytes), `GT_Caption_GPT4O`, `GT_Caption_GPT4V`,
  `GT_Caption_Gemini15Pro` (references). The card says the file also holds the captions of LLaVA-1.5, CogVLM and
  ShareCaptioner with their GPT-4 quality scores, but no public source seen here names those columns: the converter
  assumes DETAILCAPS_MODELS caption columns and a `GPT4_Eval` JSON object {model: score} (NOT CONFIRMED) and stops
  with the columns it found when they are absent. Every two captions of an image with different scores make an I2T
  pair preferring the higher score.
- genai-bench: GenAI-Bench image generation with human alignment ratings (Lin et al.; the benchmark of the paper's
  VQAScore / CLIPScore baselines), in the layout that linzhiqiu/t2v_metrics dataset.py `GenAIBench_Image` reads
  (commit 6ecb74f92028f42c7e64546d3a71e98c8c73068f), the same for both releases: zhiqiulin/GenAI-Bench-527 and
  BaiqiL/GenAI-Bench-1600 each publish genai_image.json and one <model>.zip per model, unzipped in place:
  SRC/genai_image.json = {<prompt_idx>: {"prompt": str, "models": {<model>: [<rating>, ...]}, ...}} and
  SRC/<model>/<prompt_idx>.jpeg (models DALLE_3, SDXL_Turbo, DeepFloyd_I_XL_v1, Midjourney_6, SDXL_2_1,
  SDXL_Base; the converter takes them from the json). A folder that was not unzipped is read from SRC/<model>.zip
  (member <model>/<idx>.jpeg or <idx>.jpeg; members are read, never extracted). A model's score for a prompt is the
  mean of its ratings (as GenAIBench_Image.evaluate_scores does). Two outputs:
  pairs.jsonl, the project's pair rule: for every prompt, every two models with ratings and an image, whose means
  differ, make a T2I pair preferring the higher mean; equal means are skipped and counted;
  ratings.jsonl, one line per rated image ({"id", "prompt", "image", "model", "prompt_idx", "human"}), for the
  reference metric of t2v_metrics (`tie_calibrated_accuracy`): pairwise accuracy with tie calibration over all
  image pairs of the benchmark, not grouped by prompt (`GenAIBench_Image.correlation` -> `calc_metric(...,
  "pairwise_acc_with_tie_optimization")` -> tau_optimization.py acc_23, Deutsch et al. 2023). Numbers comparable
  with published GenAI-Bench accuracies are the reference metric; the pair-rule accuracy is the project's own.
  Not confirmed: which release the paper evaluated on (the paper profile uses 527, the set of the VQAScore paper
  whose baselines it lists).
- genai-arena: TIGER-Lab/GenAI-Bench (GenAI-Arena votes, not the benchmark above), config image_generation, whose
  only split is named train (TIGER-AI-Lab/GenAI-Bench genaibench inference.py): `vote_type` in leftvote / rightvote /
  tievote / bothbad_vote (confirmed there), `prompt`, `left_image`, `right_image` (the left_/right_ key prefixes are
  confirmed, the exact names are from the dataset viewer, not a source seen here), optional `left_model`,
  `right_model`. Decisive votes become T2I pairs; ties and both-bad votes are skipped and counted.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
from collections import Counter
from collections.abc import Iterator, Sequence
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

    for f in _parquet_files(src):
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


DETAILCAPS_CONFIRMED = ("source", "image", "binary")
DETAILCAPS_MODELS = ("CogVLM", "ShareCaptioner", "LLaVA_v15")
DETAILCAPS_SCORES = "GPT4_Eval"
"""Assumed, not confirmed by a public source (see the module docstring)."""


def _parquet_files(src: Path) -> list[Path]:
    files = sorted(src.rglob("*.parquet")) if src.is_dir() else [src]
    if not files or not files[0].exists():
        raise FileNotFoundError(f"{src}: no parquet files")
    return files


def check_detailcaps_columns(src: Path) -> None:
    """Every DetailCaps parquet file has the confirmed columns, the score column and at least two caption columns."""
    import pyarrow.parquet as pq

    for f in _parquet_files(src):
        have = set(pq.ParquetFile(f).schema_arrow.names)
        missing = [c for c in DETAILCAPS_CONFIRMED if c not in have]
        if missing:
            raise ValueError(f"{f}: not DetailCaps-4870: no column(s) {missing} (found {sorted(have)})")
        captions = [m for m in DETAILCAPS_MODELS if m in have]
        if DETAILCAPS_SCORES not in have or len(captions) < 2:
            raise ValueError(
                f"{f}: no GPT-4 score column {DETAILCAPS_SCORES!r} or fewer than two of the caption columns "
                f"{list(DETAILCAPS_MODELS)} (these names are assumed, not confirmed; found {sorted(have)})"
            )


def convert_detailcaps(src: str | Path, out: str | Path) -> dict:
    """DetailCaps-4870 parquet -> I2T pairs ranked by the GPT4_Eval score of each caption."""
    check_detailcaps_columns(Path(src))
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
            m: s for m, v in (evals or {}).items()
            if m in DETAILCAPS_MODELS and isinstance(row.get(m), str) and (s := _score(v)) is not None
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


def _mean_rating(value: object) -> float | None:
    ratings = value if isinstance(value, list) else [value]
    numbers = [r for r in ratings if isinstance(r, int | float) and not isinstance(r, bool)]
    return float(np.mean(numbers)) if numbers and len(numbers) == len(ratings) else None


def tie_calibrated_accuracy(human: Sequence[float], metric: Sequence[float]) -> tuple[float, float]:
    """t2v_metrics' "pairwise_acc_with_tie_optimization" (tau_optimization.py, acc_23) over all pairs i < j:
    accuracy(eps) = (concordant pairs with |m_i - m_j| > eps + pairs tied in the human score with |m_i - m_j| <= eps)
    / all pairs, where concordant = the human and the metric differences are non-zero with the same sign; the metric
    tie threshold eps is chosen among 0 and the pairs' |m_i - m_j| to maximise it. Returns (accuracy, eps)."""
    h, m = np.asarray(human, dtype=float), np.asarray(metric, dtype=float)
    if h.shape != m.shape or h.ndim != 1 or len(h) < 2:
        raise ValueError("tie_calibrated_accuracy needs two equal-length vectors of at least two scores")
    concordant, human_ties = [], []
    for i in range(len(h) - 1):
        dh, dm = h[i + 1:] - h[i], m[i + 1:] - m[i]
        concordant.append(np.abs(dm[(dh * dm) > 0]))
        human_ties.append(np.abs(dm[dh == 0]))
    conc, ties = np.sort(np.concatenate(concordant)), np.sort(np.concatenate(human_ties))
    total = len(h) * (len(h) - 1) // 2
    eps = np.concatenate([[0.0], ties])
    correct = len(conc) - np.searchsorted(conc, eps, side="right") + np.searchsorted(ties, eps, side="right")
    best = int(np.argmax(correct))
    return float(correct[best] / total), float(eps[best])


class _ModelImages:
    """The images of one GenAI-Bench model: SRC/<model>/<idx>.jpeg, or members of SRC/<model>.zip."""

    def __init__(self, src: Path, model: str):
        import zipfile

        self.src, self.model, self.zip = src, model, None
        archive = src / f"{model}.zip"
        if not (src / model).is_dir() and archive.is_file():
            self.zip = zipfile.ZipFile(archive)
            self.members = set(self.zip.namelist())

    def read(self, idx: str) -> bytes | None:
        if self.zip is not None:
            name = next((n for n in (f"{self.model}/{idx}.jpeg", f"{idx}.jpeg") if n in self.members), None)
            return self.zip.read(name) if name else None
        try:
            image = inside(self.src, f"{self.model}/{idx}.jpeg")
        except OutsideRoot:
            return None
        return image.read_bytes() if image.is_file() else None


def _rated_images(images: dict[str, _ModelImages], src: Path, idx: str, models: dict,
                  stats: Counter) -> dict[str, tuple[float, bytes]]:
    """model -> (mean rating, image bytes) for the models of one prompt that have both."""
    rated = {}
    for model, ratings in sorted(models.items()):
        mean = _mean_rating(ratings)
        if model not in images:
            images[model] = _ModelImages(src, model)
        data = images[model].read(str(idx)) if mean is not None else None
        if mean is None or data is None:
            stats["skipped_unrated_or_missing_images"] += 1
            continue
        rated[model] = (mean, data)
    return rated


def convert_genai_bench(src: str | Path, out: str | Path) -> dict:
    """GenAI-Bench (527 or 1600 prompts) images with human alignment ratings -> T2I pairs of one prompt preferring
    the higher mean rating (pairs.jsonl) and the rated images for the reference metric (ratings.jsonl)."""
    src = Path(src)
    meta = src / "genai_image.json"
    if not meta.is_file():
        raise FileNotFoundError(f"{meta} not found (GenAI-Bench: genai_image.json beside one folder or zip per model)")
    prompts = json.loads(meta.read_text())
    if not isinstance(prompts, dict):
        raise ValueError(f"{meta}: expected an object keyed by prompt index")
    writer = PairWriter(Path(out))
    ratings = open(Path(out) / "ratings.jsonl.tmp", "w")
    stats: Counter[str] = Counter()
    images: dict[str, _ModelImages] = {}
    for idx in sorted(prompts):
        stats["prompts"] += 1
        entry = prompts[idx]
        prompt = entry.get("prompt") if isinstance(entry, dict) else None
        if not isinstance(prompt, str) or not prompt.strip():
            stats["skipped_no_prompt"] += 1
            continue
        rated = _rated_images(images, src, idx, entry.get("models") or {}, stats)
        names = {model: writer.image(data) for model, (_, data) in rated.items()}
        for model, (mean, _) in rated.items():
            ratings.write(json.dumps({"id": f"genai-{idx}:{model}", "prompt": prompt.strip(), "image": names[model],
                                      "model": model, "prompt_idx": str(idx), "human": mean}, sort_keys=True) + "\n")
            stats["rated_images"] += 1
        for a, b in itertools.combinations(sorted(rated), 2):
            if rated[a][0] == rated[b][0]:
                stats["skipped_tied_pairs"] += 1
                continue
            good, bad = (a, b) if rated[a][0] > rated[b][0] else (b, a)
            writer.write({
                "id": f"genai-{idx}:{good}>{bad}", "task": "t2i", "group": f"genai-{idx}", "prompt": prompt.strip(),
                "chosen": names[good], "rejected": names[bad],
                "meta": {"chosen_model": good, "rejected_model": bad, "chosen_mean_rating": rated[good][0],
                         "rejected_mean_rating": rated[bad][0]},
            })
    ratings.close()
    (Path(out) / "ratings.jsonl.tmp").replace(Path(out) / "ratings.jsonl")
    writer.close()
    return {"pairs": writer.count, **stats}


def load_ratings(path: str | Path) -> list[dict]:
    """The rated images of a ratings.jsonl (see convert_genai_bench); image paths must stay inside its directory."""
    path = Path(path)
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise BenchmarkFormatError(f"{path}:{n}: not valid JSON ({err.msg})") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("human"), int | float) or not all(
                isinstance(rec.get(k), str) and rec[k] for k in ("id", "prompt", "image")):
            raise BenchmarkFormatError(f"{path}:{n}: a rating needs string id, prompt, image and a number human")
        try:
            inside(path.parent, rec["image"])
        except OutsideRoot as err:
            raise BenchmarkFormatError(f"{path}:{n}: image: {err}") from None
        out.append(rec)
    return out


def ratings_pairset(path: str | Path) -> JsonlPairSet:
    """The rated images as T2I examples whose chosen and rejected image are the same file, so that any pair scorer
    gives each image its score (the chosen score)."""
    records = [{**r, "chosen": r["image"], "rejected": r["image"]} for r in load_ratings(path)]
    return JsonlPairSet("t2i", records, Path(path).parent)


def reference_accuracies(path: str | Path, scorers, batch_size: int) -> dict[str, dict]:
    """Every scorer's t2v_metrics reference accuracy on the rated images of a ratings.jsonl:
    {scorer: {"pairwise_acc_tie_calibrated", "epsilon", "images"}}."""
    from cyclepref.reward.evaluate import pairset_scores

    pairset = ratings_pairset(path)
    human = [r["human"] for r in pairset.records]
    out = {}
    for name, (scores, _) in pairset_scores(pairset, scorers, batch_size).items():
        acc, eps = tie_calibrated_accuracy(human, scores)
        out[name] = {"pairwise_acc_tie_calibrated": acc, "epsilon": eps, "images": len(human)}
    return out


def reference_markdown(reference: dict[str, dict[str, dict]]) -> str:
    """Markdown tables of reference_accuracies per benchmark (empty when there is none)."""
    lines = []
    for bench, by_scorer in reference.items():
        lines += [f"## {bench} / t2i, reference metric (t2v_metrics pairwise accuracy with tie calibration, all "
                  "image pairs)", "", "| scorer | accuracy | epsilon | images |", "|---|---|---|---|"]
        lines += [f"| {name} | {100 * r['pairwise_acc_tie_calibrated']:.2f} | {r['epsilon']:.4g} | {r['images']} |"
                  for name, r in by_scorer.items()]
        lines.append("")
    return "\n".join(lines) + ("\n" if lines else "")


VOTES = {"leftvote": ("left", "right"), "rightvote": ("right", "left")}


def convert_genai_arena(src: str | Path, out: str | Path) -> dict:
    """TIGER-Lab GenAI-Bench (GenAI-Arena) image_generation parquet -> T2I pairs from decisive human votes."""
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
            "id": f"genai-arena-{n}", "task": "t2i", "prompt": prompt.strip(), "chosen": chosen, "rejected": rejected,
            "meta": {"vote_type": vote, "chosen_model": row.get(f"{good}_model"),
                     "rejected_model": row.get(f"{bad}_model")},
        })
    writer.close()
    return {"pairs": writer.count, **stats}


CONVERTERS = {"detailcaps": convert_detailcaps, "genai-bench": convert_genai_bench, "genai-arena": convert_genai_arena}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Convert a published benchmark to the cyclepref pair format.")
    parser.add_argument("layout", choices=sorted(CONVERTERS))
    parser.add_argument("src", type=Path, help="the published files: a parquet file or directory (detailcaps, "
                        "genai-arena), the GenAI-Bench folder with genai_image.json (genai-bench)")
    parser.add_argument("out", type=Path, help="output directory (pairs.jsonl + images/)")
    args = parser.parse_args(argv)
    print(json.dumps(CONVERTERS[args.layout](args.src, args.out), indent=2, sort_keys=True))


if __name__ == "__main__":
    main()
