"""Runtime settings: read from the environment, never from params, so switching CPU <-> GPU keeps the DVC cache.

CYCLEPREF_DEVICE   cpu | cuda | cuda:N | auto (default: cuda when available)
CYCLEPREF_ENGINE   local (default) | ray  — where the GPU stages run their batches
CYCLEPREF_CAPTION_BACKEND  transformers (default) | vllm — captioning backend (vllm needs GPUs)
CYCLEPREF_MLFLOW_URI  tracking URI (default: sqlite:///mlflow.db in the project root)
CYCLEPREF_TRAIN_PROCESSES  N (default 1) — `python -m tasks.train_reward` (the DVC stage's cmd) relaunches itself
                   under torchrun with N data-parallel processes (one per GPU on cuda; gloo on cpu); rank 0 alone
                   writes the outputs and logs to MLflow. train_reward.batch_size is the global micro-batch, split
                   over the N processes, so the trained model does not depend on N.
"""

from __future__ import annotations

import os


def device() -> str:
    want = os.environ.get("CYCLEPREF_DEVICE", "auto")
    if want != "auto":
        return want
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def torch_dtype(name: str, device_name: str):
    """The params dtype on an accelerator; float32 on CPU (half precision is slow or unsupported there)."""
    import torch

    if device_name == "cpu":
        return torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


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
