"""Run by tests/test_engine.py inside `unshare --net` (Ray must never start on the host network): the same batches
through the local engine and through a local Ray instance with two worker actors; prints the comparison as JSON."""

import json
import os
import sys
from pathlib import Path

import numpy as np

from cyclepref.config import CaptionerSpec, T2ISpec
from cyclepref.engine import map_batches
from cyclepref.inputs import decode_image

zoo = Path(sys.argv[1])
photos = sorted((Path(sys.argv[2])).glob("*.jpg"))[:6]
caption = CaptionerSpec(name="c", path=str(zoo / "tiny-llava"), family="llava", max_new_tokens=8)
render = T2ISpec(name="g", path=str(zoo / "tiny-sd"), family="sd", steps=2, guidance=7.5, height=32, width=32)
image_batches = [{"images": [p.read_bytes() for p in photos[i : i + 2]]} for i in range(0, 6, 2)]
prompt_batches = [{"prompts": [f"prompt {i}", f"prompt {i + 1}"], "seeds": [i, i + 1]} for i in range(0, 6, 2)]


def run() -> tuple[list, list]:
    return (list(map_batches("caption", caption, "cpu", iter(image_batches))),
            list(map_batches("render", render, "cpu", iter(prompt_batches))))


local = run()
os.environ["CYCLEPREF_ENGINE"] = "ray"
os.environ["CYCLEPREF_RAY_WORKERS"] = "2"
import ray  # noqa: E402

ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
remote = run()
ray.shutdown()
diff = max(
    int(np.abs(np.asarray(decode_image(a), int) - np.asarray(decode_image(b), int)).max())
    for la, ra in zip(local[1], remote[1]) for a, b in zip(la, ra)
)
print(json.dumps({"captions_equal": local[0] == remote[0], "n_captions": sum(map(len, remote[0])),
                  "n_images": sum(map(len, remote[1])), "max_pixel_diff": diff}))
