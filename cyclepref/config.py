"""Typed schema of the params file (params.yaml and configs/*.yaml).

One section per DVC stage; each stage reads only its own section (and dvc.yaml lists only those keys as params),
so a change to one stage's settings invalidates that stage and what follows it, nothing else.
Runtime settings (device, workers, timeouts) are deliberately absent: they come from the environment
(see `cyclepref.runtime`) so that moving between CPU and GPU never invalidates the DVC cache.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    model_validator,
)

from cyclepref.world.params import WorldTraining

DType = Literal["float32", "float16", "bfloat16"]
Beta = Annotated[float, Field(ge=0.0, lt=1.0)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelRef(Section):
    """A model named by a Hugging Face hub id or a local directory, plus the settings the paper used for it."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$", description="Short stable id used in tables.")
    path: str = Field(min_length=1, description="Hub id (org/name) or a local directory written by save_pretrained.")
    revision: str | None = Field(None, description="Hub revision (commit hash); ignored for local directories.")
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
PolicyPairs = Literal["all", "beats_policy"]


class T2ISpec(ModelRef):
    """A diffusers text-to-image pipeline (G: text -> image)."""

    family: T2IFamily
    steps: int = Field(gt=0, le=1000, description="Denoising steps (paper: 50; FLUX.1-schnell: 4).")
    guidance: float = Field(ge=0.0, description="Classifier-free guidance scale (paper: 7.5; FLUX-schnell: 0).")
    height: int = Field(gt=0, multiple_of=8)
    width: int = Field(gt=0, multiple_of=8)
    max_sequence_length: int | None = Field(
        None, gt=0, le=512, description="T5 prompt tokens (SD3, FLUX); None = the pipeline's default "
        "(FLUX.1-schnell: 256, its model card's value).",
    )


class ImageMetricSpec(Section):
    """Image similarity for the I2T cycle: similarity(original, reconstruction)."""

    kind: Literal["open_clip", "dreamsim", "lpips"]
    path: str = Field(description="open_clip: directory or hf-hub id; dreamsim: weights directory; lpips: net name.")
    revision: str | None = Field(None, description="Hub revision (commit hash) of an hf-hub: open_clip model.")


class TextMetricSpec(Section):
    """Text similarity for the T2I cycle: similarity(prompt, back-caption)."""

    kind: Literal["sbert"] = "sbert"
    path: str = Field(description="sentence-transformers directory or hub id (paper: all-MiniLM-L6-v2).")
    revision: str | None = Field(None, description="Hub revision (commit hash); ignored for local directories.")


class BootstrapModels(Section):
    """Builds the offline tiny model zoo (data/models/<name>) from configs. Empty `build` builds nothing."""

    seed: NonNegativeInt = 0
    build: list[Literal["llava", "blip", "sd", "sd3", "blip_itm", "open_clip", "sbert"]] = Field(
        default_factory=list
    )
    image_size: int = Field(32, gt=0, multiple_of=8, description="Native resolution of the tiny vision towers.")


class WorldScenes(Section):
    """How many scenes of one part of the world are drawn, and from which seed."""

    n: int = Field(gt=0)
    seed: NonNegativeInt = 0


class WorldBenchmark(WorldScenes):
    """The frozen ground-truth benchmark (make_benchmark): held-out scenes, candidates from every world model
    (captioners greedy; text-to-image models once per seed), raw cycle scores from the last of each ladder."""

    seeds: list[NonNegativeInt] = Field(default_factory=lambda: [0, 1], min_length=1)
    max_new_tokens: int = Field(48, gt=0, description="Captioning budget of the world captioners.")
    steps: int = Field(10, gt=0, description="Denoising steps of the world text-to-image models.")
    guidance: float = Field(3.0, ge=0.0)
    sbert: str = Field("data/zoo/all-MiniLM-L6-v2", description="T2I cycle similarity (sentence-transformers).")


class World(Section):
    """The sandbox world (cyclepref.world): its pipeline inputs, its frozen benchmark and its trained models."""

    inputs: WorldScenes = Field(description="Scenes rendered into the pipeline's input folder (make_world).")
    inputs_dir: str = Field("data/world/inputs", description="Where make_world writes images, texts and scenes.")
    benchmark: WorldBenchmark
    train: WorldTraining


class PrepareInputs(Section):
    """Reads the raw inputs, normalises them and quarantines bad ones."""

    source: Literal["folder", "dci", "hf_datasets"] = Field(description="Input layout, see cyclepref.inputs.")
    path: str = Field(description="Folder / DCI root / saved datasets directory.")
    pool: str = Field(
        "data/pool",
        min_length=1,
        description="The pool of inputs that arrived later (the retraining flow's ingest, DVC-tracked batches): every "
        "batch folder in it is read beside `path`, whatever the source. No stage writes it.",
    )
    texts_file: str | None = Field(
        None, description="folder source: jsonl ({file, prompt, caption} per line) or txt, relative to `path`."
    )
    dci_text: Literal["summary", "short_caption"] = Field(
        "summary",
        description="dci source, the T2I input text: summary = the sDCI summary of complete/<file> that fits 77 CLIP "
        "tokens (the paper); short_caption = annotations/<file> short_caption (the authors' generate.py).",
    )
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
    seeds: list[NonNegativeInt] = Field(min_length=1)
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


class QualityLimits(Section):
    """Worst acceptable cycle score of the *preferred* candidate, per metric, in the metric's own units.

    The comparison follows the metric's direction (cyclepref.scoring.DIRECTIONS): for a distance ("lower") a pair is
    kept only when preferred <= limit, for a similarity ("higher") only when preferred >= limit. None: no limit.
    """

    dreamsim: float | None = Field(0.7, ge=0.0, le=2.0, description="DreamSim distance of the preferred (paper: 0.7).")
    sbert: float | None = Field(0.4, ge=-1.0, le=1.0, description="SBERT similarity of the preferred (paper: 0.4).")
    open_clip: float | None = Field(
        None,
        ge=-1.0,
        le=1.0,
        description="CLIP image cosine of the preferred. None: the paper sets no limit for its CLIP ablation, and a "
        "fixed cosine has no common meaning across CLIP models (the tiny random CLIP of the default profile gives "
        "values anywhere in [-1, 1]); the near-tie gap still removes uninformative pairs.",
    )
    lpips: float | None = Field(
        None,
        ge=0.0,
        description="LPIPS distance of the preferred. None: the paper's LPIPS ablation gives no limit, and LPIPS is "
        "not on DreamSim's scale, so DreamSim's 0.7 does not carry over.",
    )


class PairSplit(Section):
    """Train / valid / test shares, assigned per input by a salted hash of input_id (stable when inputs are added)."""

    train: float = Field(0.9, ge=0.0, le=1.0)
    valid: float = Field(0.05, ge=0.0, le=1.0)
    test: float = Field(0.05, ge=0.0, le=1.0)
    salt: str = Field("cyclepref", description="Changing the salt reshuffles every input's split.")

    @model_validator(mode="after")
    def _sums_to_one(self) -> PairSplit:
        total = self.train + self.valid + self.test
        if abs(total - 1.0) > 1e-9:
            raise ValueError(f"split shares must sum to 1, got {self.train} + {self.valid} + {self.test} = {total}")
        return self


class BuildPairs(Section):
    """Preference pairs from cycle scores (PAPER.md §3): every unordered pair of an input's candidates."""

    tasks: list[Literal["i2t", "t2i"]] = Field(default_factory=lambda: ["i2t", "t2i"], min_length=1)
    tie_gap: float = Field(0.005, ge=0.0, description="Near-ties |s_a - s_b| < tie_gap (metric units) are dropped.")
    quality_limits: QualityLimits = Field(default_factory=QualityLimits)
    dedupe_texts: bool = Field(
        True,
        description="I2T: candidates of one input with equal captions (ignoring case and surrounding white space) "
        "are merged into the one with the smallest candidate_id before pairing, so no (image, preferred text, "
        "rejected text) triple appears twice. Pairs of equal captions are dropped either way (§3 rule 1).",
    )
    split: PairSplit = Field(default_factory=PairSplit)

    @model_validator(mode="after")
    def _unique_tasks(self) -> BuildPairs:
        _require_unique(list(self.tasks), "build_pairs.tasks")
        return self


class InputsGate(Section):
    """Thresholds of gate `inputs` (data/prepared/inputs.parquet and its quarantine)."""

    min_rows: int = Field(1, ge=0)
    max_quarantined_fraction: float = Field(0.5, ge=0.0, le=1.0, description="Quarantined / (kept + quarantined).")
    min_image_side: int = Field(16, gt=0)
    max_text_chars: int = Field(2000, gt=0)


class CandidatesGate(Section):
    """Thresholds of gates `i2t_candidates` and `t2i_candidates`."""

    min_rows: int = Field(1, ge=0)
    max_missing_fraction: float = Field(
        0.0, ge=0.0, le=1.0, description="Share of expected (input, model[, seed]) candidates that are absent."
    )
    max_empty_text_fraction: float = Field(0.0, ge=0.0, le=1.0, description="I2T: share of empty captions.")
    max_quarantined_fraction: float = Field(
        0.5, ge=0.0, le=1.0, description="I2T: share of captions quarantined (empty after cleaning)."
    )
    max_duplicate_text_fraction: float = Field(
        0.5, ge=0.0, le=1.0, description="I2T warning: share of captions repeating another caption of the same input."
    )


class ReconstructionsGate(Section):
    """Thresholds of gates `i2t_reconstructions` and `t2i_reconstructions`."""

    min_rows: int = Field(1, ge=0)
    max_missing_fraction: float = Field(
        0.0, ge=0.0, le=1.0, description="Share of distinct captions (I2T) / candidate images (T2I) not reconstructed."
    )
    max_empty_text_fraction: float = Field(0.0, ge=0.0, le=1.0, description="T2I: share of empty back-captions.")


class ScoresGate(Section):
    """Thresholds of gates `i2t_scores` and `t2i_scores`."""

    min_rows: int = Field(1, ge=0)
    max_missing_fraction: float = Field(0.0, ge=0.0, le=1.0, description="Share of candidates without a score.")
    min_score_std: float = Field(1e-6, ge=0.0, description="A smaller standard deviation means a collapsed scorer.")
    max_tied_input_fraction: float = Field(
        0.5, ge=0.0, le=1.0, description="Warning: share of inputs whose candidates all have the same score."
    )


class PairsGate(Section):
    """Thresholds of gate `pairs`."""

    tasks: list[Literal["i2t", "t2i"]] = Field(default_factory=lambda: ["i2t", "t2i"])
    min_pairs: int = Field(1, ge=0, description="Minimum number of pairs of each task in `tasks`.")


class Gates(Section):
    """Data-quality gates, one section per gate (dvc.yaml stage gate@<name> reads gates.<name>)."""

    inputs: InputsGate = Field(default_factory=InputsGate)
    i2t_candidates: CandidatesGate = Field(default_factory=CandidatesGate)
    i2t_reconstructions: ReconstructionsGate = Field(default_factory=ReconstructionsGate)
    t2i_candidates: CandidatesGate = Field(default_factory=CandidatesGate)
    t2i_reconstructions: ReconstructionsGate = Field(default_factory=ReconstructionsGate)
    i2t_scores: ScoresGate = Field(default_factory=ScoresGate)
    t2i_scores: ScoresGate = Field(default_factory=ScoresGate)
    pairs: PairsGate = Field(default_factory=PairsGate)


class ExportDataset(Section):
    """Hugging Face `datasets` export of the pairs (parquet shards per task and split plus a dataset card)."""

    name: str = Field("cyclepref", min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$", description="Dataset name.")
    rows_per_shard: int = Field(2000, gt=0, description="Pairs per parquet shard.")
    license: str = Field(
        "other",
        min_length=1,
        description="Card licence id (Hugging Face licence ids: cc-by-4.0, cc0-1.0, other, ...), chosen for the "
        "inputs and the models that generated the pairs; `other` says their own terms apply.",
    )
    license_note: str | None = Field(None, description="A sentence on the licence for the card (why, whose terms).")
    embed_images: bool = Field(
        True,
        description="True: PNG bytes in every row (datasets.Image). False: each image written once under images/ "
        "and the image columns hold its relative path (paper scale: an input image is in up to 55 pairs).",
    )


RewardVariant = Literal["i2t", "t2i", "combo"]


class RewardBackbone(Section):
    """The reward model (PAPER.md §4): a BLIP image-text matching backbone plus the MLP head."""

    path: str = Field(min_length=1, description="BLIP ITM checkpoint: hub id or local directory (save_pretrained).")
    revision: str | None = Field(None, description="Hub revision (commit hash); ignored for local directories.")
    head_widths: list[PositiveInt] | None = Field(
        None,
        min_length=1,
        description="Hidden widths of the MLP head. None: the paper's 1024, 128, 64, 16 scaled by the backbone's "
        "text hidden size / 768 (at least 8 each), i.e. exactly the paper's head on a 768-wide text encoder.",
    )
    head_init: Literal["random", "itm"] = Field(
        "random",
        description="random: the paper's seeded Xavier-uniform head. itm: the head starts as the backbone's "
        "image-text matching score (match minus no-match logit on the same [CLS] embedding, exactly), so training "
        "starts at the backbone's zero-shot accuracy instead of chance (a deviation; every hidden width >= 2).",
    )
    fix_rate: float = Field(0.7, ge=0.0, le=1.0, description="Share of text layers and ViT blocks frozen (paper 0.7).")
    max_length: int = Field(128, gt=0, description="Text tokens (paper: 128).")
    image_size: int | None = Field(
        None,
        gt=0,
        description="Input resolution in px; None = the checkpoint's. Another size resamples the ViT position "
        "embeddings once (bicubic), e.g. 224 (the paper's) on a 384-px BLIP ITM checkpoint. Images are resized "
        "(bicubic, shorter side) and centre-cropped to it, as the authors did.",
    )
    text_dropout: float = Field(
        0.0, ge=0.0, lt=1.0,
        description="Dropout of the text encoder's hidden states (BlipTextConfig.hidden_dropout_prob; authors, "
        "BLIP med_config: 0.1). Training only.",
    )
    text_attention_dropout: float = Field(
        0.0, ge=0.0, lt=1.0,
        description="Dropout of the text encoder's attention probabilities (attention_probs_dropout_prob; "
        "authors: 0.1). Training only.",
    )
    vision_attention_dropout: float = Field(
        0.0, ge=0.0, lt=1.0,
        description="Dropout of the ViT's attention probabilities (BlipVisionConfig.attention_dropout; authors: 0).",
    )
    drop_path_rate: float = Field(
        0.0, ge=0.0, lt=1.0,
        description="Stochastic depth of the ViT blocks, rising linearly from 0 (first block) to this (last block) "
        "(BLIP's ViT-L, as the authors trained: 0.1). Training only.",
    )

    @model_validator(mode="after")
    def _itm_head_widths(self) -> RewardBackbone:
        if self.head_init == "itm" and self.head_widths is not None and min(self.head_widths) < 2:
            raise ValueError(
                f"head_init 'itm' carries the ITM score through a +z / -z unit pair per hidden layer: every "
                f"head width must be >= 2, got {self.head_widths}"
            )
        return self


class RewardData(Section):
    """Where preference pairs come from: the pipeline tables or exported `datasets` directories."""

    source: Literal["tables", "hf_datasets"] = "tables"
    i2t_path: str | None = Field(None, description="hf_datasets: I2T pairs (save_to_disk or parquet dataset dir).")
    t2i_path: str | None = Field(None, description="hf_datasets: T2I pairs (save_to_disk or parquet dataset dir).")

    @model_validator(mode="after")
    def _paths(self) -> RewardData:
        if self.source == "hf_datasets" and not (self.i2t_path or self.t2i_path):
            raise ValueError("source hf_datasets needs i2t_path and/or t2i_path")
        return self


class TrainReward(Section):
    """Bradley-Terry training of the reward model; one model per variant (PAPER.md §4)."""

    model: RewardBackbone
    data: RewardData = Field(default_factory=RewardData)
    variants: list[RewardVariant] = Field(min_length=1, description="i2t, t2i and/or combo; each is trained.")
    seed: NonNegativeInt = 0
    epochs: int = Field(2, gt=0)
    batch_size: int = Field(
        1024, gt=0,
        description="Pairs per micro-batch over all processes (paper: 128 per GPU x 8 GPUs = 1024); each of the N "
        "training processes (runtime setting CYCLEPREF_TRAIN_PROCESSES) takes batch_size / N, so the result does "
        "not depend on N.",
    )
    grad_accum: int = Field(2, gt=0, description="Micro-batches per optimizer step (paper: 2, so 2048 pairs a step).")
    lr: dict[RewardVariant, PositiveFloat] = Field(
        description="Peak learning rate per variant (paper: 2e-5, T2I 3e-5).")
    weight_decay: dict[RewardVariant, NonNegativeFloat] = Field(
        description="AdamW weight decay per variant (paper: 0, T2I 1e-4).")
    betas: tuple[Beta, Beta] = Field((0.9, 0.999), description="AdamW betas, each in [0, 1).")
    eps: float = Field(1e-8, gt=0.0)
    combo_ratio: float = Field(1.0, ge=0.0, description="Combo loss = loss_i2t * ratio + loss_t2i.")
    validations_per_epoch: int = Field(4, gt=0)
    patience: int = Field(5, gt=0, description="Stop after this many validations without improvement.")
    min_delta: float = Field(0.001, ge=0.0, description="An improvement must lower validation loss by more than this.")
    max_grad_norm: float | None = Field(None, gt=0.0, description="Gradient clipping; None = off (paper: off).")
    checkpoint_every: int | None = Field(
        None, gt=0, description="Optimizer steps between resume checkpoints; None = at every validation."
    )
    keep_checkpoints: int = Field(1, gt=0, description="Resume checkpoints kept (newest first).")

    @model_validator(mode="after")
    def _per_variant(self) -> TrainReward:
        _require_unique(list(self.variants), "train_reward.variants")
        for key in ("lr", "weight_decay"):
            missing = [v for v in self.variants if v not in getattr(self, key)]
            if missing:
                raise ValueError(f"{key} has no value for variant(s) {missing}")
        return self


class RewardModelEntry(Section):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")
    path: str = Field(min_length=1, description="A RewardModel directory (e.g. data/reward/combo/model).")


class RewardBenchmark(Section):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")
    path: str = Field(min_length=1, description="Pairs jsonl in the pair format of cyclepref.reward.benchmarks.")
    dataset: str | None = Field(None, description="The `datasets` entry (pinned published data) it is converted from.")


class DatasetPin(Section):
    """Published data the profile reads, pinned like models: a Hugging Face dataset at a commit, or an archive URL
    with its sha256 (cyclepref.profiles.unpinned_datasets refuses either without its pin)."""

    hub: str | None = Field(None, description="Hugging Face dataset id (org/name).")
    revision: str | None = Field(None, description="hub: the dataset repository's 40-hex commit hash.")
    url: str | None = Field(None, description="An archive's download URL.")
    sha256: str | None = Field(None, description="url: the archive's sha256, as its publisher gives it.")

    @model_validator(mode="after")
    def _one_source(self) -> DatasetPin:
        if (self.hub is None) == (self.url is None):
            raise ValueError("a dataset is either `hub` (with `revision`) or `url` (with `sha256`)")
        return self


class RewardBaseline(Section):
    """A zero-shot scorer reported beside the reward models: an open_clip model's CLIPScore (`clip`), or a BLIP ITM
    checkpoint's matching head (`blip_itm`) or contrastive cosine (`blip_itc`), e.g. the reward model's backbone."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")
    kind: Literal["clip", "blip_itm", "blip_itc"]
    path: str = Field(min_length=1)


class EvaluateReward(Section):
    """Pairwise accuracy (95% Wilson interval) of reward models and baselines on the test split and benchmarks."""

    models: list[RewardModelEntry] = Field(min_length=1)
    data: RewardData = Field(default_factory=RewardData)
    split: Literal["train", "valid", "test"] = "test"
    fit_splits: list[Literal["train", "valid"]] = Field(
        default_factory=list, description="Further pipeline splits to score (fit to the teacher: on the pipeline's "
        "splits the labels are the cycle comparison, so accuracy there is agreement with the teacher).")
    benchmarks: list[RewardBenchmark] = Field(default_factory=list)
    clip: str | None = Field(None, description="open_clip model for the CLIPScore baseline; None = no CLIPScore.")
    baselines: list[RewardBaseline] = Field(
        default_factory=list, description="More zero-shot scorers beside the reward models (the backbone's ITC and "
        "ITM, an upper-bound judge).")
    batch_size: int = Field(32, gt=0)
    seed: NonNegativeInt = Field(0, description="Seed of the random baseline.")

    @model_validator(mode="after")
    def _unique_names(self) -> EvaluateReward:
        _require_unique([m.name for m in self.models], "evaluate_reward.models")
        _require_unique([b.name for b in self.benchmarks], "evaluate_reward.benchmarks")
        _require_unique([m.name for m in self.models] + [b.name for b in self.baselines]
                        + ["clipscore", "random", "cycle"], "evaluate_reward scorer names")
        clash = sorted({b.name for b in self.benchmarks} & {"train", "valid", "test"})
        if clash:
            raise ValueError(f"benchmark names {clash} clash with split names (they share the report's sections)")
        return self


class ScaleAblation(Section):
    """The paper's two data ablations on the sandbox (cyclepref.reward.scale, `make scale`): benchmark accuracy of
    the reward model against the number of training pairs (nested subsets, drawn by input) and against the number of
    candidate captioners (I2T pairs whose two captions both come from the first k captioners of `captioners`)."""

    pairs: list[PositiveInt] = Field(min_length=2, description="Training pairs (I2T + T2I) of each combo run.")
    include_all: bool = Field(True, description="Add a run on every training pair.")
    captioners: list[str] = Field(
        default_factory=list, description="Captioner names in the order they join the candidate pool.")
    captioner_counts: list[PositiveInt] = Field(
        default_factory=list, description="k for the I2T runs on the first k captioners' pairs.")
    pair_budget: PositiveInt = Field(
        description="Pairs shown per run: epochs = pair_budget / training pairs, clamped to [min_epochs, "
        "max_epochs], so small sets are not starved of steps and large ones still see every pair twice.")
    min_epochs: PositiveInt = 2
    max_epochs: PositiveInt = 12
    valid_pairs: PositiveInt = Field(description="Validation pairs per task (the first inputs of the seeded order).")
    seed: NonNegativeInt = 0
    benchmark: str = Field(min_length=1, description="The frozen benchmark (pairs.jsonl) every run is scored on.")
    out: str = Field("reports/scale", description="Report directory (ablation.json, ablation.md, ablation.svg).")

    @model_validator(mode="after")
    def _captioners(self) -> ScaleAblation:
        _require_unique(list(self.captioners), "scale_ablation.captioners")
        too_many = [k for k in self.captioner_counts if k < 2 or k > len(self.captioners)]
        if too_many:
            raise ValueError(f"scale_ablation.captioner_counts {too_many}: each k needs 2 <= k <= "
                             f"{len(self.captioners)} (the listed captioners)")
        if self.min_epochs > self.max_epochs:
            raise ValueError("scale_ablation: min_epochs > max_epochs")
        return self


DownstreamTask = Literal["i2t", "t2i"]
ModelJudge = Literal["reward", "cycle", "clipscore"]
VerifierKind = Literal["reward", "cycle", "clipscore", "random"]
EvaluatorKind = Literal["reward", "cycle", "clipscore", "ground_truth"]
DPO_VLM_FAMILIES = ("llava", "llava_next", "llava_onevision", "qwen2_vl")


class LoraSpec(Section):
    """A LoRA adapter (peft.LoraConfig): rank, scale alpha / r, dropout and the modules it wraps."""

    r: int = Field(8, gt=0)
    alpha: float = Field(16.0, gt=0.0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | str = Field(
        min_length=1, description="Module names, or one regex matched against full module names (peft)."
    )


class BestOfN(Section):
    """Best-of-N (PAPER.md §6): per held-out input, sample max(n) candidates once (per-item seeds); for each N and
    verifier pick the best of the first N; report the evaluator's mean score of the picks against N, with a
    bootstrap interval over inputs. Verifier `random` scores each candidate by a number seeded from its key (the
    plain-sampling baseline). Evaluator `ground_truth` is the attribute F1 of the pick against the sandbox's true
    scene of the input (`truth`); `second_evaluator` (a model) is reported beside it."""

    tasks: list[DownstreamTask] = Field(default_factory=lambda: ["i2t", "t2i"], min_length=1)
    n: list[PositiveInt] = Field(min_length=1, description="Increasing candidate counts, e.g. [1, 2, 4, 8, 16].")
    captioner: CaptionerSpec | None = Field(None, description="i2t: the sampled captioner.")
    temperature: float = Field(1.0, ge=0.0, description="i2t sampling temperature; 0 = greedy decoding.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="i2t nucleus sampling mass.")
    t2i_model: T2ISpec | None = Field(None, description="t2i: the text-to-image model; one image per seed.")
    verifiers: list[VerifierKind] = Field(default_factory=lambda: ["reward", "cycle", "clipscore"], min_length=1)
    evaluator: EvaluatorKind = Field(
        "reward",
        description="Scores the picks: ground_truth where the inputs have true scenes (needs `truth`); a model "
        "evaluator favours the verifier of the same kind.",
    )
    truth: str | None = Field(
        None, description="Sandbox input folder holding scenes.jsonl (e.g. data/world/inputs); evaluator ground_truth."
    )
    second_evaluator: ModelJudge | None = Field(None, description="A model evaluator reported beside (model-judged).")
    confidence: float = Field(0.95, gt=0.0, lt=1.0, description="Confidence of the intervals.")
    bootstrap_samples: int = Field(10000, gt=0, description="Resamples of the inputs per interval.")
    reward_model: str = Field("data/reward/combo/model", description="A RewardModel directory (train_reward).")
    clip: str | None = Field(None, description="open_clip model for CLIPScore (directory or hf-hub: id).")
    heldout_splits: list[Literal["train", "valid", "test"]] = Field(
        default_factory=lambda: ["test", "valid"],
        min_length=1,
        description="Held-out inputs = inputs with pairs in these splits of data/pairs (all inputs when none).",
    )
    max_inputs: int | None = Field(None, gt=0, description="Keep the first N held-out inputs (by input_id).")
    batch_size: int = Field(8, gt=0)

    @model_validator(mode="after")
    def _consistent(self) -> BestOfN:
        if any(b <= a for a, b in zip(self.n, self.n[1:], strict=False)) or self.n[0] < 1:
            raise ValueError(f"n must be positive and strictly increasing, got {self.n}")
        _require_unique(list(self.tasks), "best_of_n.tasks")
        _require_unique(list(self.verifiers), "best_of_n.verifiers")
        if "i2t" in self.tasks and self.captioner is None:
            raise ValueError("task i2t needs best_of_n.captioner")
        if "t2i" in self.tasks and self.t2i_model is None:
            raise ValueError("task t2i needs best_of_n.t2i_model")
        if "clipscore" in {*self.verifiers, self.evaluator, self.second_evaluator} and self.clip is None:
            raise ValueError("the clipscore verifier needs best_of_n.clip")
        _check_evaluators(self, "best_of_n")
        return self


class DpoVlm(Section):
    """DPO of a LLaVA-family captioner on the I2T pairs (trl DPOTrainer, LoRA through peft; PAPER.md §6).

    Prompt = the input image + the captioner's instruction in its chat template; chosen / rejected = the preferred /
    rejected caption. The reference is the same network with the adapter disabled."""

    captioner: CaptionerSpec
    lora: LoraSpec
    beta: float = Field(0.1, gt=0.0)
    lr: float = Field(gt=0.0)
    epochs: float = Field(1.0, gt=0.0)
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps (overrides epochs).")
    batch_size: int = Field(8, gt=0, description="Pairs per device per micro-batch.")
    grad_accum: int = Field(1, gt=0)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    warmup_ratio: float = Field(0.0, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    max_length: int | None = Field(
        None,
        gt=0,
        description="Token budget of prompt + caption. None (recommended): no truncation. trl counts the image "
        "placeholder tokens (576 for LLaVA-1.5) inside the prompt, so a budget below the prompt length cuts image "
        "tokens and breaks the image features; a budget that low is rejected.",
    )
    max_pairs: int | None = Field(None, gt=0, description="Use the first N train pairs (by pair_id).")
    sft_weight: float = Field(
        1.0, ge=0.0, description="Weight of the SFT (negative log-likelihood) term on the chosen caption beside the "
        "sigmoid DPO loss (trl loss_type [sigmoid, sft]; RPO / DPO+NLL, PAPER.md 8); 0 = pure DPO.")
    pairs: PolicyPairs = Field(
        "all", description="all: every train pair; beats_policy: only pairs whose chosen caption has a better "
        "cycle score than the policy's own caption of that input (the policy must be one of the I2T candidates).")
    sft_baseline: bool = Field(
        True, description="Also train an SFT-only adapter on the same chosen captions (evaluate_downstream reports it "
        "beside DPO, so 'DPO does not help' and 'nothing can be learned from these pairs' are told apart).")
    gradient_checkpointing: bool = False
    init_adapter: str | None = Field(
        None,
        description="A peft LoRA adapter of this captioner (a dpo_vlm adapter folder, relative to the project root) "
        "to continue training instead of a fresh LoRA: the retraining flow fills it with the captioner policy's "
        "champion (retrain.policies). None, or a path that does not exist (no champion yet): the base model. The "
        "reference is then the champion (trl copies the loaded adapter as a frozen 'ref' adapter: iterative DPO), "
        "and the adapter's own LoRA settings replace `lora`.",
    )
    seed: NonNegativeInt = 0

    @model_validator(mode="after")
    def _family(self) -> DpoVlm:
        if self.captioner.family not in DPO_VLM_FAMILIES:
            raise ValueError(f"dpo_vlm needs a chat VLM family {DPO_VLM_FAMILIES}, got {self.captioner.family!r}")
        return self


class DiffusionDpo(Section):
    """Diffusion-DPO (Wallace et al. 2023; PAPER.md §6) of a UNet text-to-image pipeline on the T2I pairs, with LoRA;
    the reference is the same UNet with the adapter disabled."""

    model: T2ISpec
    lora: LoraSpec
    beta: float = Field(2500.0, gt=0.0, description="KL weight (SD1.5: 2500-5000).")
    lr: float = Field(gt=0.0)
    epochs: int = Field(1, gt=0)
    max_steps: int | None = Field(None, gt=0, description="Stop after this many optimizer steps (overrides epochs).")
    batch_size: int = Field(4, gt=0, description="Pairs per micro-batch.")
    grad_accum: int = Field(1, gt=0)
    weight_decay: float = Field(1e-2, ge=0.0, description="AdamW weight decay (diffusers' Diffusion-DPO: 1e-2).")
    max_grad_norm: float | None = Field(1.0, gt=0.0)
    resolution: int | None = Field(None, gt=0, multiple_of=8, description="Training side; None = model.height.")
    max_pairs: int | None = Field(None, gt=0, description="Use the first N train pairs (by pair_id).")
    sft_weight: float = Field(
        1.0, ge=0.0, description="Weight of the denoising (SFT) loss on the preferred image beside the Diffusion-DPO "
        "loss; 0 = pure Diffusion-DPO.")
    pairs: PolicyPairs = Field(
        "all", description="all: every train pair; beats_policy: only pairs whose preferred image has a better cycle "
        "score than the mean of the policy's own images of that prompt (the policy must be a T2I candidate model).")
    sft_baseline: bool = Field(
        True, description="Also train an SFT-only adapter (denoising loss on the preferred images), reported beside.")
    init_adapter: str | None = Field(
        None,
        description="A diffusion_dpo adapter folder (diffusers LoRA weights, relative to the project root) to "
        "continue training instead of a fresh LoRA: the retraining flow fills it with the text-to-image policy's "
        "champion (retrain.policies). None, or a path that does not exist (no champion yet): the base model. The "
        "reference stays the base UNet (the adapter disabled), and the adapter's own LoRA settings replace `lora`.",
    )
    seed: NonNegativeInt = 0

    @model_validator(mode="after")
    def _family(self) -> DiffusionDpo:
        if self.model.family != "sd":
            raise ValueError(f"diffusion_dpo supports the UNet family 'sd', got {self.model.family!r}")
        return self


class EvaluateDownstream(Section):
    """Before / after comparison of the DPO-trained captioner (i2t) and text-to-image model (t2i) on held-out inputs,
    with bootstrap intervals over inputs of before, after and the paired difference. Evaluator `ground_truth`: the
    attribute F1 of greedy captions / generated images against the sandbox's true scenes (`truth`); a model
    evaluator (the reward model favours the DPO models) may be reported beside as `second_evaluator`."""

    tasks: list[DownstreamTask] = Field(default_factory=lambda: ["i2t", "t2i"], min_length=1)
    evaluator: EvaluatorKind = "reward"
    truth: str | None = Field(
        None, description="Sandbox input folder holding scenes.jsonl (e.g. data/world/inputs); evaluator ground_truth."
    )
    second_evaluator: ModelJudge | None = Field(None, description="A model evaluator reported beside (model-judged).")
    seeds: list[NonNegativeInt] = Field(
        default_factory=lambda: [0],
        min_length=1,
        description="t2i: images per held-out prompt, one per seed (mixed into the per-item key); the per-prompt "
        "mean over seeds is the input's score, so more seeds give a tighter interval.",
    )
    confidence: float = Field(0.95, gt=0.0, lt=1.0, description="Confidence of the intervals.")
    bootstrap_samples: int = Field(10000, gt=0, description="Resamples of the inputs per interval.")
    reward_model: str = Field("data/reward/combo/model", description="A RewardModel directory (train_reward).")
    clip: str | None = Field(None, description="open_clip model, for evaluator clipscore.")
    heldout_splits: list[Literal["train", "valid", "test"]] = Field(
        default_factory=lambda: ["test", "valid"],
        min_length=1,
        description="Held-out inputs = inputs with pairs in these splits of data/pairs (all inputs when none).",
    )
    max_inputs: int | None = Field(None, gt=0, description="Keep the first N held-out inputs (by input_id).")
    batch_size: int = Field(8, gt=0)

    @model_validator(mode="after")
    def _consistent(self) -> EvaluateDownstream:
        _require_unique(list(self.tasks), "evaluate_downstream.tasks")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"evaluate_downstream.seeds must be distinct, got {self.seeds}")
        if "clipscore" in {self.evaluator, self.second_evaluator} and self.clip is None:
            raise ValueError("evaluator clipscore needs evaluate_downstream.clip")
        _check_evaluators(self, "evaluate_downstream")
        return self


def _check_evaluators(section: BestOfN | EvaluateDownstream, name: str) -> None:
    if section.evaluator == "ground_truth" and section.truth is None:
        raise ValueError(f"evaluator ground_truth needs {name}.truth (the sandbox input folder with scenes.jsonl)")
    if section.evaluator != "ground_truth" and section.truth is not None:
        raise ValueError(f"{name}.truth is read only by evaluator ground_truth (evaluator is {section.evaluator!r})")
    if section.second_evaluator == section.evaluator:
        raise ValueError(f"{name}.second_evaluator repeats the evaluator {section.evaluator!r}")


POLICY_STAGES = {"dpo_vlm": "i2t", "diffusion_dpo": "t2i"}


class Policy(Section):
    """A policy the retraining flow trains, registers and promotes each round (flows/policy.py): the DPO stage that
    trains it from its champion (the stage's `init_adapter` folder) and its MLflow registered model."""

    stage: Literal["dpo_vlm", "diffusion_dpo"] = Field(description="dpo_vlm (captioner) or diffusion_dpo (t2i).")
    registered_model: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")


class Retrain(Section):
    """The retraining flow (flows/retrain.py): which reward model is registered, the frozen benchmark that compares the
    new version (alias `challenger`) with the current `champion` pair by pair, and what a challenger must win by: a
    paired-bootstrap interval of its accuracy gain above 0 and a mean gain above the margin.
    Not a DVC stage: changing these keys invalidates nothing."""

    registered_model: str = Field(
        "cyclereward", min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$", description="MLflow registered model name."
    )
    variant: RewardVariant = Field("combo", description="The train_reward variant that is registered and compared.")
    benchmark: str = Field(
        min_length=1,
        description="Frozen pairs jsonl (cyclepref.reward.benchmarks format, human preference labels); the pairs of "
        "the variant's tasks are scored. A missing file means no promotion.",
    )
    margin: float = Field(
        0.01,
        ge=0.0,
        le=1.0,
        description="The challenger replaces the champion only when its pairwise accuracy exceeds the champion's by "
        "more than this (a fraction: 0.01 = one point) on the same benchmark pairs, and the gain is significant.",
    )
    confidence: float = Field(
        0.95,
        ge=0.5,
        le=0.999,
        description="Level of the paired-bootstrap interval of the challenger's accuracy gain over the champion; the "
        "challenger is promoted only when the interval's lower bound is above 0.",
    )
    bootstrap_samples: int = Field(
        10000, ge=100, description="Bootstrap resamples of the benchmark pairs for that interval (seed 0)."
    )
    batch_size: int = Field(32, gt=0, description="Pairs per forward pass when scoring the benchmark.")
    watch_dir: str | None = Field(
        None,
        description="New raw inputs (images and an optional texts.jsonl) dropped here are moved into "
        "prepare_inputs.path before the pipeline runs; None: no ingestion.",
    )
    adapters: dict[str, str] = Field(
        default_factory=dict,
        description="DVC stage -> registered model name: the models logged by that stage's runs (e.g. dpo_vlm, "
        "diffusion_dpo LoRA adapters) are registered as new versions; no alias is moved.",
    )
    policies: dict[str, Policy] = Field(
        default_factory=dict,
        description="name -> policy: each round registers the stage's adapter as a version of the policy's model, "
        "scores it and its champion (the base model before the first promotion) on `policy_benchmark` and promotes "
        "it with the same paired test as the reward model. Empty: no policy in the loop.",
    )
    policy_benchmark: str | None = Field(
        None,
        description="The frozen ground-truth benchmark of the policies (a sandbox pairs.jsonl, "
        "cyclepref.downstream.policy_bench): every scene's image is captioned and its prompt rendered, each judged "
        "by attribute F1 against the scene. Required when `policies` is not empty.",
    )
    stages: list[str] = Field(
        default_factory=list,
        description="The DVC stages a round runs, with everything upstream of them (`dvc repro STAGE...`): what its "
        "decisions need. Must name train_reward, every policy's stage and every stage of `adapters`. Empty: the "
        "whole pipeline. The stages left out (reports, Best-of-N) stay stale until the next `cyclepref pipeline`.",
    )

    @model_validator(mode="after")
    def _round_stages(self) -> Retrain:
        needed = ["train_reward", *(p.stage for p in self.policies.values()), *self.adapters]
        missing = [s for s in needed if self.stages and s not in self.stages]
        if missing:
            raise ValueError(f"retrain.stages leaves out {', '.join(missing)}, which the round's decisions need")
        return self

    @model_validator(mode="after")
    def _policies(self) -> Retrain:
        if self.policies and not self.policy_benchmark:
            raise ValueError("retrain.policies needs retrain.policy_benchmark (the frozen ground-truth benchmark)")
        stages = [p.stage for p in self.policies.values()]
        names = [p.registered_model for p in self.policies.values()]
        if len(set(stages)) < len(stages) or len(set(names)) < len(names) or self.registered_model in names:
            raise ValueError("retrain.policies: one policy per stage, each with its own registered model (not the "
                             "reward model's)")
        return self


class Params(Section):
    """The whole params file. Sections are added stage by stage; unknown top-level keys are rejected."""

    profile: str = Field(description="Name of this profile, recorded with every run.")
    world: World | None = None
    bootstrap_models: BootstrapModels
    prepare_inputs: PrepareInputs
    generate_i2t: GenerateI2T | None = None
    reconstruct_i2t: ReconstructI2T | None = None
    score_i2t: ScoreI2T | None = None
    generate_t2i: GenerateT2I | None = None
    reconstruct_t2i: ReconstructT2I | None = None
    score_t2i: ScoreT2I | None = None
    build_pairs: BuildPairs | None = None
    gates: Gates | None = None
    export_dataset: ExportDataset | None = None
    train_reward: TrainReward | None = None
    evaluate_reward: EvaluateReward | None = None
    best_of_n: BestOfN | None = None
    dpo_vlm: DpoVlm | None = None
    diffusion_dpo: DiffusionDpo | None = None
    evaluate_downstream: EvaluateDownstream | None = None
    retrain: Retrain | None = None
    scale_ablation: ScaleAblation | None = None
    datasets: dict[str, DatasetPin] | None = None

    @model_validator(mode="after")
    def _benchmark_datasets(self) -> Params:
        named = [b.dataset for b in (self.evaluate_reward.benchmarks if self.evaluate_reward else [])]
        unknown = sorted({d for d in named if d is not None and d not in (self.datasets or {})})
        if unknown:
            raise ValueError(f"evaluate_reward.benchmarks name dataset(s) not in `datasets`: {', '.join(unknown)}")
        return self

    @model_validator(mode="after")
    def _policy_stages(self) -> Params:
        for name, policy in (self.retrain.policies if self.retrain else {}).items():
            section = getattr(self, policy.stage)
            if section is None or section.init_adapter is None:
                raise ValueError(f"retrain.policies.{name}: stage {policy.stage} needs its section with "
                                 "init_adapter (the folder the flow fills with the policy's champion)")
        return self

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
