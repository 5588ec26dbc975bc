"""Where a stage's model batches run: in the stage process (local, the default) or on a Ray cluster.

A stage hands `map_batches` a model kind, the model's spec and an iterator of payloads (one batch each) and gets
the results back in the same order, so the stage persists every finished batch in its work store either way
(resume works the same on Ray). Local: the model is loaded once, on the first payload. Ray (CYCLEPREF_ENGINE=ray):
one long-lived worker actor per GPU (or CYCLEPREF_RAY_WORKERS actors), each loading the model once; the driver
connects to RAY_ADDRESS when set, else starts a local Ray instance.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from itertools import islice
from pathlib import Path

from pydantic import BaseModel

from cyclepref import runtime


def _build(kind: str, spec: dict, device: str):
    from cyclepref.config import CaptionerSpec, T2ISpec

    if kind == "caption":
        from cyclepref.models.captioner import make_captioner

        return make_captioner(CaptionerSpec.model_validate(spec), device)
    if kind == "render":
        from cyclepref.models.t2i import TextToImage

        return TextToImage(T2ISpec.model_validate(spec), device)
    raise ValueError(f"unknown model kind {kind!r} (caption | render)")


class Worker:
    """A model of one kind, loaded once, applied to payloads.

    caption: {"images": [PNG bytes]} -> [raw caption]
    render:  {"prompts": [str], "seeds": [int]} -> [PNG bytes]
    """

    def __init__(self, kind: str, spec: dict, device: str):
        self.kind, self.model = kind, _build(kind, spec, device)

    def run(self, payload: dict) -> list:
        from cyclepref.inputs import decode_image, png_bytes

        if self.kind == "caption":
            images = [decode_image(b) for b in payload["images"]]
            return self.model.caption(images, batch_size=len(images))
        images = self.model.generate(payload["prompts"], payload["seeds"], batch_size=len(payload["prompts"]))
        return [png_bytes(im) for im in images]


def map_batches(kind: str, spec: BaseModel, device: str, payloads: Iterable[dict]) -> Iterator[list]:
    """Results of `kind` on each payload, in payload order, on the runtime engine."""
    spec_json = spec.model_dump(mode="json")
    if runtime.engine() == "ray":
        if Path(spec_json["path"]).exists():
            spec_json["path"] = str(Path(spec_json["path"]).resolve())
        yield from _ray_map(kind, spec_json, payloads)
        return
    worker = None
    for payload in payloads:
        if worker is None:
            worker = Worker(kind, spec_json, device)
        yield worker.run(payload)


def _ray_map(kind: str, spec: dict, payloads: Iterable[dict]) -> Iterator[list]:
    try:
        import ray
        from ray.util import ActorPool
    except ImportError as err:
        raise RuntimeError("CYCLEPREF_ENGINE=ray needs `pip install cyclepref[ray]`") from err
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {k: v for k, v in os.environ.items() if k.startswith(("HF_", "CYCLEPREF_"))}})
    gpus = int(ray.cluster_resources().get("GPU", 0))
    n = int(os.environ.get("CYCLEPREF_RAY_WORKERS", gpus or 1))
    remote = ray.remote(num_gpus=1 if gpus else 0, num_cpus=1)(Worker)
    pool = ActorPool([remote.remote(kind, spec, "cuda" if gpus else "cpu") for _ in range(n)])
    it = iter(payloads)
    while window := list(islice(it, 4 * n)):
        yield from pool.map(lambda actor, p: actor.run.remote(p), window)
