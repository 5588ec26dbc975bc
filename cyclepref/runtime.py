"""Runtime settings: read from the environment, never from params, so switching CPU <-> GPU keeps the DVC cache.

CYCLEPREF_DEVICE   cpu | cuda | cuda:N | auto (default: cuda when available)
CYCLEPREF_ENGINE   local (default) | ray  — where the GPU stages run their batches
CYCLEPREF_CAPTION_BACKEND  transformers (default) | vllm — captioning backend (vllm needs GPUs)
CYCLEPREF_MLFLOW_URI  tracking URI (default: sqlite:///mlflow.db in the project root)
CYCLEPREF_TRAIN_PROCESSES  N (default 1) — `python -m tasks.train_reward` (the DVC stage's cmd) relaunches itself
                   under torchrun with N data-parallel processes (one per GPU on cuda; gloo on cpu); rank 0 alone
                   writes the outputs and logs to MLflow. train_reward.batch_size is the global micro-batch, split
                   over the N processes, so the trained model does not depend on N.

The GPU fast path (all runtime settings; none changes a DVC params hash):
CYCLEPREF_PRECISION   params (default: the model's params dtype on an accelerator, float32 on CPU)
                      | half (the family's half precision, HALF_PRECISION) | float32 | bfloat16 | float16
                      float16 is refused for the families in FP16_OVERFLOWS.
CYCLEPREF_ATTENTION   auto (default: what transformers picks, SDPA where the architecture has it) | sdpa | eager
                      | flash_attention_2; families without an SDPA path (NO_SDPA) stay eager.
CYCLEPREF_COMPILE     0 (default) | 1: torch.compile the model's hot module (compile_parts; place: the forward)
CYCLEPREF_COMPILE_MODE  torch.compile mode (default: default); CYCLEPREF_COMPILE_BACKEND (default: inductor)
CYCLEPREF_BATCH_SIZE  N (every stage) or "stage=N,stage=N": overrides the stage's params batch_size
"""

from __future__ import annotations

import os


def device() -> str:
    want = os.environ.get("CYCLEPREF_DEVICE", "auto")
    if want != "auto":
        return want
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


PRECISIONS = ("params", "half", "float32", "bfloat16", "float16")
ATTENTIONS = ("auto", "sdpa", "eager", "flash_attention_2")
HALF_PRECISION = {
    "llava": "bfloat16",
    "llava_next": "bfloat16",
    "llava_onevision": "bfloat16",
    "qwen2_vl": "bfloat16",
    "internvl": "bfloat16",
    "blip2": "bfloat16",
    "blip": "float16",
    "blip_itm": "bfloat16",
    "sd": "float16",
    "sdxl": "bfloat16",
    "sd3": "bfloat16",
    "flux": "bfloat16",
}
FP16_OVERFLOWS = {
    "blip2": "its flan-t5-xxl language model was trained in bfloat16 and overflows in float16 (google/flan-t5-xxl "
    "model card)",
    "sdxl": "the SDXL VAE produces NaNs in float16 (madebyollin/sdxl-vae-fp16-fix model card)",
    "flux": "the T5 text encoder's activations overflow in float16 unless clipped (diffusers Flux docs, PR #9097)",
}
NO_SDPA = {"blip", "blip_itm", "internvl"}  # InternVL2's remote code picks its own attention (use_flash_attn)


def _choice(name: str, default: str, allowed: tuple[str, ...]) -> str:
    value = os.environ.get(name, "") or default
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
    return value


def precision() -> str:
    return _choice("CYCLEPREF_PRECISION", "params", PRECISIONS)


def attention() -> str:
    return _choice("CYCLEPREF_ATTENTION", "auto", ATTENTIONS)


def compile_enabled() -> bool:
    return _choice("CYCLEPREF_COMPILE", "0", ("0", "1")) == "1"


def dtype_name(family: str, params_dtype: str, device_name: str) -> str:
    """The weights dtype of a `family` model: CYCLEPREF_PRECISION, else the params dtype on an accelerator and
    float32 on CPU (half precision is slow there). float16 is refused for the families in FP16_OVERFLOWS."""
    want = precision()
    if want == "params":
        name = "float32" if device_name == "cpu" else params_dtype
    elif want == "half":
        name = HALF_PRECISION.get(family, "bfloat16")
    else:
        name = want
    if name == "float16" and family in FP16_OVERFLOWS:
        raise ValueError(f"float16 is unsafe for the {family!r} family: {FP16_OVERFLOWS[family]}; "
                         "use CYCLEPREF_PRECISION=bfloat16 or float32")
    return name


def torch_dtype(name: str, device_name: str, family: str = ""):
    """The torch dtype for a model whose params dtype is `name` (see dtype_name)."""
    import torch

    return getattr(torch, dtype_name(family, name, device_name))


def load_kwargs(family: str, params_dtype: str = "float32", device_name: str | None = None) -> dict:
    """from_pretrained keyword arguments of the fast path: `dtype`, and `attn_implementation` when one is asked
    for and the family has it (diffusers pipelines take `dtype` only; their default attention is SDPA)."""
    kw = {"dtype": torch_dtype(params_dtype, device_name or device(), family)}
    attn = attention()
    if attn != "auto" and family not in NO_SDPA and family not in ("sd", "sdxl", "sd3", "flux"):
        kw["attn_implementation"] = attn
    return kw


def place(module, family: str, device_name: str | None = None, keep_float: tuple[str, ...] = (),
          params_dtype: str = "float32"):
    """`module` on the device in the family's dtype (dtype_name); the children named in `keep_float` (small heads
    whose inputs are upcast) stay float32; with CYCLEPREF_COMPILE=1 its forward is torch.compile'd."""
    dev = device_name or device()
    module = module.to(dev, torch_dtype(params_dtype, dev, family))
    for name in keep_float:
        getattr(module, name).float()
    return compile_parts(module, "forward")


def compile_parts(owner, *names: str):
    """With CYCLEPREF_COMPILE=1, replace each attribute `names` of `owner` that exists (a module or a method, e.g.
    a pipeline's "unet" / "transformer", a VLM's "forward") by its torch.compile'd version. Returns owner."""
    if not compile_enabled():
        return owner
    import torch

    mode = os.environ.get("CYCLEPREF_COMPILE_MODE") or None
    backend = os.environ.get("CYCLEPREF_COMPILE_BACKEND") or "inductor"
    for name in names:
        part = getattr(owner, name, None)
        if part is not None:
            setattr(owner, name, torch.compile(part, mode=mode, backend=backend))
    return owner


def batch_size(stage: str, params_value: int) -> int:
    """The stage's batch size: CYCLEPREF_BATCH_SIZE ("N" for every stage, or "stage=N,stage=N"), else the params
    value. Items are keyed and seeded one by one, so the batch size is a device setting, not a result."""
    raw = os.environ.get("CYCLEPREF_BATCH_SIZE", "").strip()
    if not raw:
        return params_value
    if "=" not in raw:
        return _positive(raw)
    for part in raw.split(","):
        name, _, value = part.partition("=")
        if name.strip() == stage:
            return _positive(value)
    return params_value


def _positive(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value <= 0:
        raise ValueError(f"CYCLEPREF_BATCH_SIZE needs positive integers, got {raw!r}")
    return value


def engine() -> str:
    value = os.environ.get("CYCLEPREF_ENGINE", "local")
    if value not in ("local", "ray"):
        raise ValueError(f"CYCLEPREF_ENGINE must be 'local' or 'ray', got {value!r}")
    return value


def caption_backend() -> str:
    value = os.environ.get("CYCLEPREF_CAPTION_BACKEND", "transformers")
    if value not in ("transformers", "vllm"):
        raise ValueError(f"CYCLEPREF_CAPTION_BACKEND must be 'transformers' or 'vllm', got {value!r}")
    return value


def train_processes() -> int:
    value = os.environ.get("CYCLEPREF_TRAIN_PROCESSES", "1")
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"CYCLEPREF_TRAIN_PROCESSES must be a positive integer, got {value!r}")
    return int(value)
