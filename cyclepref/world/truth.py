"""Ground truth of the sandbox's pipeline inputs, and the quality of captions and images against it.

The sandbox input folder holds `scenes.jsonl` ({"file", "objects"} per image) beside the images; an input's truth
is the scene of the file it was prepared from (`source` column of data/prepared/inputs.parquet). Inputs that arrived
in the input pool (`cyclepref arrivals`, then a retraining round's ingest) carry their scene in their texts.jsonl row
(`objects`), read from each pool batch under the source name prepare_inputs gives them (`<pool>/<batch>/<file>`).
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
from PIL import Image

from cyclepref.world.parse import Parsed, as_parsed, f1, parse_caption, parse_image
from cyclepref.world.scene import scene_from_record

SCENES_FILE = "scenes.jsonl"
TEXTS_FILE = "texts.jsonl"


def load_scenes(path: Path) -> dict[str, Parsed]:
    """file -> objects, from a scenes.jsonl."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return {r["file"]: as_parsed(scene_from_record(r["objects"])) for r in rows}


def pool_scenes(pool: Path) -> dict[str, Parsed]:
    """`<pool>/<batch>/<file>` -> objects, for the pool's texts.jsonl rows that carry their scene (`objects`)."""
    out = {}
    for texts in sorted(Path(pool).glob(f"*/{TEXTS_FILE}")):
        for line in texts.read_text().splitlines():
            row = json.loads(line) if line.strip() else {}
            if isinstance(row, dict) and "objects" in row and "file" in row:
                out[f"{Path(pool).name}/{texts.parent.name}/{row['file']}"] = as_parsed(scene_from_record(row["objects"]))
    return out


def load_truth(inputs_dir: Path, prepared_inputs: Path, pool: Path | None = None) -> dict[str, Parsed]:
    """input_id -> true objects, for every prepared input whose source file has a scene (the sandbox inputs, and the
    pool's arrivals when `pool` is given)."""
    scenes_path = Path(inputs_dir) / SCENES_FILE
    if not scenes_path.exists():
        raise FileNotFoundError(f"{scenes_path}: no ground truth (the sandbox writes it with `dvc repro make_world`)")
    scenes = load_scenes(scenes_path) | (pool_scenes(pool) if pool is not None else {})
    table = pq.read_table(prepared_inputs, columns=["input_id", "source"]).to_pydict()
    return {i: scenes[s] for i, s in zip(table["input_id"], table["source"], strict=True) if s in scenes}


def caption_quality(text: str, truth: Parsed) -> float:
    """Attribute-level F1 of the objects a caption names against the true objects."""
    return f1(parse_caption(text), truth)


def image_quality(image: Image.Image, truth: Parsed) -> float:
    """Attribute-level F1 of the objects the image parser finds against the objects a prompt asks for."""
    return f1(parse_image(image), truth)
