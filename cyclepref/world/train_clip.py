"""The sandbox CLIP: an open_clip CLIP trained contrastively on world images and their captions / paraphrases.

Saved in open_clip's hub layout (open_clip_config.json + open_clip_model.safetensors) and loaded by the pipeline
through `local-dir:`, as a hub CLIP would be. It is the I2T cycle's image similarity and the CLIPScore baseline.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cyclepref.models.formats import CLIP_MEAN, CLIP_STD
from cyclepref.world.data import alt_text_examples, training_examples, zero_unused_rows
from cyclepref.world.optimise import optimise
from cyclepref.world.scene import IMAGE_SIZE

CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": IMAGE_SIZE, "layers": 3, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 3},
}
PREPROCESS = {"mean": CLIP_MEAN, "std": CLIP_STD, "interpolation": "bicubic", "resize_mode": "shortest"}


def save(model, out: Path) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    (out / "open_clip_config.json").write_text(json.dumps({"model_cfg": CONFIG, "preprocess_cfg": PREPROCESS}, indent=2))
    save_file({k: v.detach().half().contiguous() for k, v in model.state_dict().items()},
              out / "open_clip_model.safetensors")


def train(out: Path, steps: int, seed: int, n_scenes: int, batch_size: int, lr: float, log=print,
          texts: str = "dense") -> list[float]:
    import open_clip

    examples = list(training_examples(n_scenes, seed) if texts == "dense" else alt_text_examples(n_scenes, seed))
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(**json.loads(json.dumps(CONFIG)))
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    mean, std = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    pixels = torch.from_numpy(np.stack([np.asarray(e[0]) for e in examples])).permute(0, 3, 1, 2).float() / 255
    pixels = (pixels - mean) / std
    texts = [tokenizer([e[1] for e in examples]), tokenizer([e[2] for e in examples])]
    gen = torch.Generator().manual_seed(seed)
    model.train()

    def step_loss(step: int) -> torch.Tensor:
        idx = torch.randint(0, len(examples), (batch_size,), generator=gen)
        which = torch.randint(0, 2, (batch_size,), generator=gen)
        tokens = torch.where(which[:, None] == 0, texts[0][idx], texts[1][idx])
        img = F.normalize(model.encode_image(pixels[idx]), dim=-1)
        txt = F.normalize(model.encode_text(tokens), dim=-1)
        logits = model.logit_scale.exp() * img @ txt.T
        target = torch.arange(batch_size)
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2

    def clamp_temperature(step: int) -> None:
        with torch.no_grad():
            model.logit_scale.clamp_(0, 4.6052)

    losses = optimise(model.parameters(), steps, lr, step_loss, "clip", log, weight_decay=0.1,
                      after_step=clamp_temperature)
    model.eval()
    zero_unused_rows(model.token_embedding, torch.cat(texts).flatten().tolist())
    save(model, out)
    return losses
