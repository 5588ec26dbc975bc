"""Load the authors' released CycleReward checkpoints (ImageReward-style BLIP key layout) into RewardModel, and
register one as an MLflow model version (`cyclepref import-checkpoint`).

Source (hjbahng/cyclereward at 36e10773d1385ed57d3cecf15a352d48705fd0fe; the model moved from cycle_reward/ to
cyclereward/): cyclereward/model.py `CycleReward` = `blip` (cyclereward/blip/blip_pretrain.py BLIP_Pretrain:
visual_encoder, text_encoder, vision_proj, text_proj) + `mlp.layers` (Linear, GELU, ... Linear); utils.py save_model
writes the bare state dict with torch.save; the released files are CycleReward-Combo.pth, CycleReward-I2T.pth,
CycleReward-T2I.pth (GitHub release v1.0.0, cyclereward/model.py _MODELS), which `cyclereward()` reads back with
torch.load + load_state_dict(strict=False). The ViT key names are those of cyclereward/blip/vit.py (salesforce/BLIP
models/vit.py). Not confirmed: the layout of the Hugging Face uploads carolineec/CycleReward-*
(PyTorchModelHubMixin); a safetensors file in the .pth layout loads as well.

The released state dicts name the BLIP backbone `blip.*` (timm-style ViT `blip.visual_encoder.*`, the BLIP "med"
BERT `blip.text_encoder.*`, `blip.vision_proj`, `blip.text_proj`) and the head `mlp.layers.{0,2,4,6,8}` (Linear
layers with GELU between). `AUTHORS_TO_OURS` maps every key to transformers' BLIP names used by RewardModel; a key
that matches no rule, a key of ours that stays unfilled, or a shape mismatch raises AuthorsCheckpointError. The
only known-benign difference is the text position-id buffer (med.py registers it persistent, so it is in the
authors' state dicts; transformers recomputes it): it may be present or absent. Unlike the authors' strict=False,
every other missing or unexpected key is listed in full and the load refused. A leading `module.` (a
DistributedDataParallel save) is stripped.

The backbone size is read from the tensors (layers, widths, image size from pos_embed and the patch size); head
counts and the tokenizer come from a template BLIP ITM checkpoint (`backbone`, e.g.
Salesforce/blip-itm-large-coco); images are read with the authors' transform at the checkpoint's image size
(model.reward_image_processor). BLIP's ViT uses LayerNorm eps 1e-6, which the converted config records.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from cyclepref.models import load_failed, locate
from cyclepref.reward.model import RewardModel, reward_image_processor

V = r"blip\.visual_encoder\."
VO = "vision_model."
AUTHORS_TO_OURS: list[tuple[re.Pattern[str], str]] = [
    (re.compile(rf"^{V}cls_token$"), f"{VO}embeddings.class_embedding"),
    (re.compile(rf"^{V}pos_embed$"), f"{VO}embeddings.position_embedding"),
    (re.compile(rf"^{V}patch_embed\.proj\.(weight|bias)$"), rf"{VO}embeddings.patch_embedding.\1"),
    (re.compile(rf"^{V}blocks\.(\d+)\.norm1\.(weight|bias)$"), rf"{VO}encoder.layers.\1.layer_norm1.\2"),
    (re.compile(rf"^{V}blocks\.(\d+)\.norm2\.(weight|bias)$"), rf"{VO}encoder.layers.\1.layer_norm2.\2"),
    (re.compile(rf"^{V}blocks\.(\d+)\.attn\.qkv\.(weight|bias)$"), rf"{VO}encoder.layers.\1.self_attn.qkv.\2"),
    (re.compile(rf"^{V}blocks\.(\d+)\.attn\.proj\.(weight|bias)$"), rf"{VO}encoder.layers.\1.self_attn.projection.\2"),
    (re.compile(rf"^{V}blocks\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)$"), rf"{VO}encoder.layers.\1.mlp.\2.\3"),
    (re.compile(rf"^{V}norm\.(weight|bias)$"), rf"{VO}post_layernorm.\1"),
    (re.compile(r"^blip\.text_encoder\.(.+)$"), r"text_encoder.\1"),
    (re.compile(r"^blip\.(vision_proj|text_proj)\.(weight|bias)$"), r"\1.\2"),
    (re.compile(r"^mlp\.layers\.(\d+)\.(weight|bias)$"), r"head.layers.\1.\2"),
]
IGNORED = {"blip.text_encoder.embeddings.position_ids"}


class AuthorsCheckpointError(ValueError):
    """A state dict that does not match the authors' layout or our model; the message lists the offending keys."""


def _listing(keys: list[str]) -> str:
    """Every key, so that nothing is dropped unseen (the authors' own load_state_dict(strict=False) would)."""
    return ", ".join(keys) + (f" ({len(keys)} in all)" if len(keys) > 1 else "")


def map_authors_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename every key; unknown keys (and two keys mapping to one name) raise."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        key = key.removeprefix("module.")
        if key in IGNORED:
            continue
        for pattern, target in AUTHORS_TO_OURS:
            if pattern.match(key):
                name = pattern.sub(target, key)
                if name in out:
                    raise AuthorsCheckpointError(f"two checkpoint keys map to {name}")
                out[name] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise AuthorsCheckpointError(f"unknown key(s) in the authors' checkpoint: {_listing(sorted(unknown))}")
    return out


def check_against(mapped: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor]) -> None:
    """Our model must receive exactly its own keys with its own shapes."""
    missing = sorted(set(expected) - set(mapped))
    unexpected = sorted(set(mapped) - set(expected))
    if missing or unexpected:
        raise AuthorsCheckpointError(
            f"checkpoint does not fit the model: missing {_listing(missing) or 'none'}; "
            f"unexpected {_listing(unexpected) or 'none'}"
        )
    bad = [
        f"{k} {tuple(mapped[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items() if mapped[k].shape != v.shape
    ]
    if bad:
        raise AuthorsCheckpointError(f"shape mismatch (checkpoint vs model): {_listing(bad)}")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A .safetensors file, or a torch file loaded with weights_only (optionally nested under state_dict/model)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for nested in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(nested), dict) and len(state) <= 3:
            state = state[nested]
    if not isinstance(state, dict):
        raise AuthorsCheckpointError(f"{path}: expected a state dict, got {type(state).__name__}")
    return state


def _count(state: Mapping[str, torch.Tensor], pattern: str) -> int:
    found = {int(m.group(1)) for k in state if (m := re.match(pattern, k))}
    return max(found) + 1 if found else 0


def infer_blip_config(state: Mapping[str, torch.Tensor], template):
    """The template BlipConfig with sizes read from the authors' tensors."""
    config = template.__class__.from_dict(template.to_dict())
    vc, tc = config.vision_config, config.text_config
    try:
        cls_token = state["blip.visual_encoder.cls_token"]
        patch = state["blip.visual_encoder.patch_embed.proj.weight"]
        pos = state["blip.visual_encoder.pos_embed"]
        words = state["blip.text_encoder.embeddings.word_embeddings.weight"]
        positions = state["blip.text_encoder.embeddings.position_embeddings.weight"]
        fc1 = state["blip.visual_encoder.blocks.0.mlp.fc1.weight"]
        inter = state["blip.text_encoder.encoder.layer.0.intermediate.dense.weight"]
        cross_key = state["blip.text_encoder.encoder.layer.0.crossattention.self.key.weight"]
        vision_proj = state["blip.vision_proj.weight"]
    except KeyError as err:
        raise AuthorsCheckpointError(f"not the authors' BLIP layout: key {err} is missing") from None
    grid = math.isqrt(pos.shape[1] - 1)
    if grid * grid != pos.shape[1] - 1:
        raise AuthorsCheckpointError(f"pos_embed has {pos.shape[1]} positions, not 1 + a square grid")
    vc.hidden_size = cls_token.shape[-1]
    vc.patch_size = patch.shape[-1]
    vc.image_size = grid * patch.shape[-1]
    vc.intermediate_size = fc1.shape[0]
    vc.num_hidden_layers = _count(state, r"blip\.visual_encoder\.blocks\.(\d+)\.")
    vc.layer_norm_eps = 1e-6
    tc.vocab_size, tc.hidden_size = words.shape
    tc.max_position_embeddings = positions.shape[0]
    tc.intermediate_size = inter.shape[0]
    tc.encoder_hidden_size = cross_key.shape[1]
    tc.num_hidden_layers = _count(state, r"blip\.text_encoder\.encoder\.layer\.(\d+)\.")
    config.image_text_hidden_size = vision_proj.shape[0]
    for name, c in (("vision", vc), ("text", tc)):
        if c.hidden_size % c.num_attention_heads:
            raise AuthorsCheckpointError(
                f"{name} width {c.hidden_size} is not a multiple of the template's {c.num_attention_heads} heads; "
                "use a template BLIP checkpoint of the same size"
            )
    return config


def head_widths_of(state: Mapping[str, torch.Tensor]) -> list[int]:
    """Hidden widths of the authors' head: the output sizes of every mlp Linear but the last."""
    found = sorted({int(m.group(1)) for k in state if (m := re.match(r"mlp\.layers\.(\d+)\.weight$", k))})
    if len(found) < 2:
        raise AuthorsCheckpointError("no reward head (mlp.layers.*) with at least two Linear layers in the checkpoint")
    return [state[f"mlp.layers.{i}.weight"].shape[0] for i in found[:-1]]


def load_authors_checkpoint(
    checkpoint: str | Path, backbone: str, *, revision: str | None = None, fix_rate: float = 0.7, max_length: int = 128
) -> RewardModel:
    """A RewardModel holding the authors' weights (e.g. CycleReward-Combo.pth) on a template BLIP ITM config."""
    from transformers import AutoProcessor, BlipConfig

    state = {k.removeprefix("module."): v for k, v in read_state_dict(checkpoint).items()}
    where = locate(backbone)
    try:
        template = BlipConfig.from_pretrained(where, revision=revision)
        processor = AutoProcessor.from_pretrained(where, revision=revision)
    except Exception as err:
        raise load_failed(backbone, err) from err
    config = infer_blip_config(state, template)
    size = config.vision_config.image_size
    processor.image_processor = reward_image_processor(size)
    model = RewardModel(config, head_widths_of(state), fix_rate, max_length, processor)
    mapped = map_authors_keys(state)
    expected = model.state_dict()
    check_against(mapped, expected)
    model.load_state_dict(mapped, strict=True)
    model.metadata = {"converted_from": str(checkpoint), "template": backbone}
    return model.eval()


def register_authors_checkpoint(
    checkpoint: str | Path, backbone: str, name: str, out_dir: str | Path, *, revision: str | None = None
) -> tuple[str, str]:
    """Convert an authors' checkpoint, save it as a RewardModel directory at `out_dir`, log it as the reward pyfunc
    in one MLflow run of the project's store and register it as a new version of `name`; returns (name, version)."""
    import hashlib

    import mlflow

    from cyclepref import tracking
    from cyclepref.reward.pyfunc import log_reward_model

    checkpoint = Path(checkpoint)
    model = load_authors_checkpoint(checkpoint, backbone, revision=revision)
    digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    model.save_pretrained(out_dir, metadata={**model.metadata, "sha256": digest})
    tracking.use_store()
    mlflow.set_experiment(experiment_id=tracking.experiment_id(mlflow.MlflowClient()))
    tags = {"cyclepref.stage": "import_checkpoint", "cyclepref.checkpoint": checkpoint.name,
            "cyclepref.checkpoint_sha256": digest, "cyclepref.template": backbone}
    with mlflow.start_run(run_name=f"import {checkpoint.name}", tags=tags):
        mlflow.log_params({"head_widths": model.head_widths, "image_size": model.blip_config.vision_config.image_size,
                           "fix_rate": model.fix_rate, "max_length": model.max_length})
        info = log_reward_model(out_dir)
    version = mlflow.register_model(info.model_uri, name, tags=tags)
    return name, str(version.version)
