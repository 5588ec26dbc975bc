"""Typed schema of the params file (params.yaml and configs/*.yaml).

One section per DVC stage; each stage reads only its own section (and dvc.yaml lists only those keys as params),
so a change to one stage's settings invalidates that stage and what follows it, nothing else.
Runtime settings (device, workers, timeouts) are deliberately absent: they come from the environment
(see `cyclepref.runtime`) so that moving between CPU and GPU never invalidates the DVC cache.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

DType = Literal["float32", "float16", "bfloat16"]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelRef(Section):
    """A model named by a Hugging Face hub id or a local directory, plus the settings the paper used for it."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$", description="Short stable id used in tables.")
    path: str = Field(min_length=1, description="Hub id (org/name) or a local directory written by save_pretrained.")
    revision: str | None = Field(None, description="Hub revision; ignored for local directories.")
    dtype: DType = Field("float32", description="Weights dtype on the accelerator; CPU always runs float32.")
    trust_remote_code: bool = Field(False, description="Allow code from the model repository (InternVL needs it).")


CaptionerFamily = Literal["llava", "llava_next", "llava_onevision", "qwen2_vl", "internvl", "blip2", "blip"]


class CaptionerSpec(ModelRef):
    """A captioning VLM (F: image -> text)."""

    family: CaptionerFamily
    prompt: str | None = Field(
        None, description="Instruction; None = the paper's instruction for the family (cyclepref.models.captioner)."
    )
    max_new_tokens: int = Field(77, gt=0, le=4096, description="Greedy decoding budget (paper: 77).")


T2IFamily = Literal["sd", "sdxl", "sd3", "flux"]


class T2ISpec(ModelRef):
    """A diffusers text-to-image pipeline (G: text -> image)."""

    family: T2IFamily
    steps: int = Field(gt=0, le=1000, description="Denoising steps (paper: 50; FLUX.1-schnell: 4).")
    guidance: float = Field(ge=0.0, description="Classifier-free guidance scale (paper: 7.5; FLUX-schnell: 0).")
    height: int = Field(gt=0, multiple_of=8)
    width: int = Field(gt=0, multiple_of=8)


class ImageMetricSpec(Section):
    """Image similarity for the I2T cycle: similarity(original, reconstruction)."""

    kind: Literal["open_clip", "dreamsim", "lpips"]
    path: str = Field(description="open_clip: directory or hf-hub id; dreamsim: weights directory; lpips: net name.")


class TextMetricSpec(Section):
    """Text similarity for the T2I cycle: similarity(prompt, back-caption)."""

    kind: Literal["sbert"] = "sbert"
    path: str = Field(description="sentence-transformers directory or hub id (paper: all-MiniLM-L6-v2).")


class BootstrapModels(Section):
    """Builds the offline tiny model zoo (data/models/<name>) from configs. Empty `build` builds nothing."""

    seed: int = 0
    build: list[Literal["llava", "blip", "sd", "sd3", "blip_itm", "open_clip", "sbert"]] = Field(
        default_factory=list
    )
    image_size: int = Field(32, gt=0, multiple_of=8, description="Native resolution of the tiny vision towers.")


class PrepareInputs(Section):
    """Reads the raw inputs, normalises them and quarantines bad ones."""

    source: Literal["folder", "dci", "hf_datasets"] = Field(description="Input layout, see cyclepref.inputs.")
    path: str = Field(description="Folder / DCI root / saved datasets directory.")
    texts_file: str | None = Field(
        None, description="folder source: jsonl ({file, prompt, caption} per line) or txt, relative to `path`."
    )
    dci_text: Literal["summary", "short_caption"] = Field("summary", description="dci source: the T2I input text.")
    hf_image_column: str = "image"
    hf_text_column: str = "text"
    hf_split: str | None = None
    split: str = Field("all", description="dci source: a key of splits.json (train, valid, test) or 'all'.")
    min_side: int = Field(16, gt=0, description="Images with a smaller side are quarantined.")
    max_pixels: int = Field(100_000_000, gt=0, description="Images with more pixels are quarantined.")
    max_text_chars: int = Field(2000, gt=0, description="Longer texts are quarantined.")
    limit: int | None = Field(None, gt=0, description="Keep the first N inputs (by id) after validation.")


class GenerateI2T(Section):
    """I2T forward: every captioner captions every input image."""

    captioners: list[CaptionerSpec] = Field(min_length=1)
    batch_size: int = Field(8, gt=0)


class ReconstructI2T(Section):
    """I2T backward: the text-to-image model renders every distinct cleaned caption."""

    model: T2ISpec
    batch_size: int = Field(4, gt=0)


class ScoreI2T(Section):
    """I2T score: image similarity between the input image and each reconstruction."""

    metric: ImageMetricSpec
    batch_size: int = Field(16, gt=0)


class GenerateT2I(Section):
    """T2I forward: every text-to-image model renders every prompt once per seed."""

    models: list[T2ISpec] = Field(min_length=1)
    seeds: list[int] = Field(min_length=1)
    batch_size: int = Field(4, gt=0)

    @model_validator(mode="after")
    def _unique_seeds(self) -> GenerateT2I:
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct, got {self.seeds}")
        return self


class ReconstructT2I(Section):
    """T2I backward: the captioner describes every candidate image."""

    captioner: CaptionerSpec
    batch_size: int = Field(8, gt=0)


class ScoreT2I(Section):
    """T2I score: text similarity between the prompt and each back-caption."""

    metric: TextMetricSpec
    batch_size: int = Field(64, gt=0)


class Params(Section):
    """The whole params file. Sections are added stage by stage; unknown top-level keys are rejected."""

    profile: str = Field(description="Name of this profile, recorded with every run.")
    bootstrap_models: BootstrapModels
    prepare_inputs: PrepareInputs
    generate_i2t: GenerateI2T | None = None
    reconstruct_i2t: ReconstructI2T | None = None
    score_i2t: ScoreI2T | None = None
    generate_t2i: GenerateT2I | None = None
    reconstruct_t2i: ReconstructT2I | None = None
    score_t2i: ScoreT2I | None = None

    @model_validator(mode="after")
    def _unique_model_names(self) -> Params:
        if self.generate_i2t is not None:
            _require_unique([c.name for c in self.generate_i2t.captioners], "generate_i2t.captioners")
        if self.generate_t2i is not None:
            _require_unique([m.name for m in self.generate_t2i.models], "generate_t2i.models")
        return self


def _require_unique(names: list[str], where: str) -> None:
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"{where}: model names must be unique, repeated: {', '.join(dupes)}")


class ParamsError(ValueError):
    """A params file that does not match the schema; the message names every bad key and why."""


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"{source}: {err.error_count()} invalid setting(s)"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        got = e.get("input")
        shown = "" if isinstance(got, dict | list) or got is None else f" (got {got!r})"
        lines.append(f"  {loc}: {e['msg']}{shown}")
    return "\n".join(lines)


def parse_params(data: object, source: str = "<params>") -> Params:
    if not isinstance(data, dict):
        raise ParamsError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return Params.model_validate(data)
    except ValidationError as err:
        raise ParamsError(_format_errors(err, source)) from None


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"{path}: params file not found (run from the project root or pass its path)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML: {err}") from None
    return parse_params(data, str(path))


def require(section: Section | None, name: str) -> Section:
    """Return a stage's section or fail with a message naming the missing key."""
    if section is None:
        raise ParamsError(f"params: section '{name}' is required by stage {name} but missing from the profile")
    return section
