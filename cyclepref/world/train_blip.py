"""The sandbox's pretrained BLIP: a BlipForImageTextRetrieval trained with image-text matching on world data.

It stands where the paper's BLIP checkpoint stands: a backbone that has seen images with their captions, from which
train_reward starts. As in BLIP pretraining, an image-text contrastive loss (ITC) aligns the unimodal encoders and an
image-text matching loss (ITM) teaches the cross-attending text encoder to tell an image's own caption (or a
paraphrase) from another scene's caption drawn from the same batch; it never sees a preference or a cycle score.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from cyclepref.models import tokenizers as tk
from cyclepref.models.formats import CLIP_MEAN, CLIP_STD
from cyclepref.world.data import alt_text_examples, training_examples, zero_unused_rows
from cyclepref.world.optimise import optimise
from cyclepref.world.scene import IMAGE_SIZE

MAX_LENGTH = 64
ITC_TEMPERATURE = 0.07


def build(seed: int):
    from transformers import BlipConfig, BlipForImageTextRetrieval, BlipImageProcessor, BlipProcessor

    tok = tk.build_blip_tokenizer()
    config = BlipConfig(
        vision_config=dict(image_size=IMAGE_SIZE, patch_size=8, hidden_size=64, intermediate_size=128,
                           num_hidden_layers=3, num_attention_heads=4, initializer_range=0.02),
        text_config=dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, max_position_embeddings=128, encoder_hidden_size=64,
                         bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id, sep_token_id=tok.sep_token_id),
        projection_dim=64,
        image_text_hidden_size=64,
    )
    torch.manual_seed(seed)
    model = BlipForImageTextRetrieval(config)
    ip = BlipImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, image_mean=CLIP_MEAN, image_std=CLIP_STD)
    return model, BlipProcessor(image_processor=ip, tokenizer=tok)


def itc_loss(model, pixels, ids, mask) -> torch.Tensor:
    """Symmetric contrastive loss of the batch's image and text projections (the i-th text belongs to image i)."""
    sim = model(input_ids=ids, attention_mask=mask, pixel_values=pixels, use_itm_head=False).itm_score
    target = torch.arange(sim.shape[0])
    return (F.cross_entropy(sim / ITC_TEMPERATURE, target) + F.cross_entropy(sim.T / ITC_TEMPERATURE, target)) / 2


def train(out: Path, steps: int, seed: int, n_scenes: int, batch_size: int, lr: float, log=print,
          texts: str = "dense") -> list[float]:
    """ITC + ITM: each image with its own text (ITM label 1) and with a shifted in-batch text (label 0)."""
    examples = list(training_examples(n_scenes, seed) if texts == "dense" else alt_text_examples(n_scenes, seed))
    model, processor = build(seed)
    pixels = processor.image_processor([e[0] for e in examples], return_tensors="pt")["pixel_values"]
    texts = [processor.tokenizer([e[k] for e in examples], padding="max_length", max_length=MAX_LENGTH,
                                 truncation=True, return_tensors="pt") for k in (1, 2)]
    gen = torch.Generator().manual_seed(seed)
    model.train()

    def step_loss(step: int) -> torch.Tensor:
        idx = torch.randint(0, len(examples), (batch_size,), generator=gen)
        which = int(torch.randint(0, 2, (1,), generator=gen))
        shift = int(torch.randint(1, batch_size, (1,), generator=gen))
        text_idx = torch.cat([idx, idx.roll(shift)])
        ids, mask = texts[which]["input_ids"][text_idx], texts[which]["attention_mask"][text_idx]
        keep = mask.sum(0) > 0
        ids, mask = ids[:, keep], mask[:, keep]
        logits = model(input_ids=ids, attention_mask=mask, pixel_values=pixels[idx].repeat(2, 1, 1, 1),
                       use_itm_head=True).itm_score
        labels = torch.cat([torch.ones(batch_size), torch.zeros(batch_size)]).long()
        return F.cross_entropy(logits, labels) + itc_loss(model, pixels[idx], ids[:batch_size], mask[:batch_size])

    losses = optimise(model.parameters(), steps, lr, step_loss, "blip", log, weight_decay=0.01)
    model.eval()
    zero_unused_rows(model.text_encoder.get_input_embeddings(),
                     torch.cat([t["input_ids"] for t in texts]).flatten().tolist())
    model.half().save_pretrained(out)
    processor.save_pretrained(out)
    return losses
