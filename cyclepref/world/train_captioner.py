"""A ladder of LLaVA captioners for the sandbox: one training run, saved at increasing steps.

The model is transformers' LlavaForConditionalGeneration with a LlavaProcessor (CLIP vision tower, Llama language
model, a byte-level BPE trained on the world's captions), so the pipeline loads it exactly as it loads a hub LLaVA.
Teacher forcing on "USER: <image>\\n<instruction> ASSISTANT: <canonical caption></s>", loss on the caption only.
"""

from __future__ import annotations

from pathlib import Path

import torch

from cyclepref.models import tokenizers as tk
from cyclepref.models.formats import CLIP_MEAN, CLIP_STD, DETAILED, LLAVA_CHAT_TEMPLATE
from cyclepref.world.data import training_examples
from cyclepref.world.optimise import optimise
from cyclepref.world.scene import IMAGE_SIZE, POSITION_SYNONYMS, SIZE_SYNONYMS, TEMPLATES

PATCH = 8


def _corpus(captions: list[str]) -> list[str]:
    words = [w for ws in (*SIZE_SYNONYMS.values(), *POSITION_SYNONYMS.values()) for w in ws]
    return [DETAILED, "USER: ASSISTANT:", *TEMPLATES, " ".join(words), *captions]


def build(captions: list[str], seed: int):
    from transformers import CLIPImageProcessor, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tok = tk.build_bpe_tokenizer(_corpus(captions), vocab_size=384)
    tok.chat_template = LLAVA_CHAT_TEMPLATE
    config = LlavaConfig(
        vision_config=dict(model_type="clip_vision_model", image_size=IMAGE_SIZE, projection_dim=64, hidden_size=64,
                           intermediate_size=128, num_hidden_layers=3, num_attention_heads=4, patch_size=PATCH),
        text_config=dict(model_type="llama", vocab_size=len(tok), hidden_size=96, intermediate_size=192,
                         num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=256, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
        setattr(model.generation_config, key, getattr(tok, key))
    ip = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                            image_mean=CLIP_MEAN, image_std=CLIP_STD)
    processor = LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=PATCH,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=LLAVA_CHAT_TEMPLATE)
    return model, processor


def encode(processor, images, captions: list[str]) -> dict[str, torch.Tensor]:
    """Inputs and labels for teacher forcing: labels are -100 except on the caption and its end token."""
    tok = processor.tokenizer
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": DETAILED}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
    tok.padding_side = "right"
    batch = processor(images=list(images), text=[f"{prompt} {c}{tok.eos_token}" for c in captions],
                      return_tensors="pt", padding=True)
    n_prompt = processor(images=[images[0]], text=[prompt], return_tensors="pt")["input_ids"].shape[1]
    labels = batch["input_ids"].clone()
    labels[:, :n_prompt] = -100
    labels[batch["attention_mask"] == 0] = -100
    batch["labels"] = labels
    tok.padding_side = "left"
    return dict(batch)


def train(out: Path, steps: list[int], seed: int, n_scenes: int, batch_size: int, lr: float,
          log=print) -> list[float]:
    """Train once; save the model at each step in `steps` to out/step-<k>. Returns the loss of every step."""
    examples = list(training_examples(n_scenes, seed))
    images = [e[0] for e in examples]
    captions = [e[1] for e in examples]
    model, processor = build(captions, seed)
    data = encode(processor, images, captions)
    model.train()
    gen = torch.Generator().manual_seed(seed)

    def step_loss(step: int) -> torch.Tensor:
        idx = torch.randint(0, len(images), (batch_size,), generator=gen)
        batch = {k: v[idx] for k, v in data.items()}
        keep = batch["attention_mask"].sum(0) > 0
        return model(**{k: (v[:, keep] if v.dim() == 2 else v) for k, v in batch.items()}).loss

    def save(step: int) -> None:
        if step in steps:
            model.eval()
            model.save_pretrained(out / f"step-{step}")
            processor.save_pretrained(out / f"step-{step}")
            model.train()

    return optimise(model.parameters(), max(steps), lr, step_loss, "captioner", log, after_step=save)
