"""GPU-hours per stage for the paper profile (7,600 images, 11 captioners, 4 text-to-image models x 3 seeds), from
published figures; no GPU measurement (none was lent to this project). Prints the README's cost table.

Two kinds of figure, each row says which:
- measured: end-to-end seconds per image published for the same model and settings (A100-80GB);
- FLOPs: 2 x parameters x tokens per item (the vision tower's and the language model's separately; attention added
  for the diffusion transformers), at an assumed 40% of the A100's 312 TFLOP/s dense bf16 peak (NVIDIA A100
  datasheet). Prefill and decode are counted alike, which assumes large-batch offline serving (vLLM); HF generate
  at small batches decodes several times slower.
    python bench/paper_cost.py
"""

from __future__ import annotations

A100_PEAK = 312e12
MFU = 0.40
EFFECTIVE = A100_PEAK * MFU
IMAGES, CAPTIONERS, T2I_IMAGES_PER_MODEL = 7600, 11, 7600 * 3
NEW, PROMPT = 77, 20

FAL = "fal-ai/stable-diffusion-benchmarks README (A100-80GB SXM, fp16, SDPA, 50 steps, batch 1)"

# name: (vision params, vision tokens, language params, language tokens, GPUs per worker on 80-GB cards, source)
CAPTIONERS_SPEC = {
    "BLIP-2 flan-t5-xxl": (1.0e9, 257, 5.5e9, 32 + 6 + NEW, 1, "ViT-g 1B; T5-XXL encoder / decoder 5.5B each"),
    "LLaVA-1.5-7B": (0.30e9, 577, 6.7e9, 576 + PROMPT + NEW, 1, "CLIP ViT-L/14-336: 576 image tokens"),
    "LLaVA-1.5-13B": (0.30e9, 577, 13.0e9, 576 + PROMPT + NEW, 1, "as 7B"),
    "LLaVA-1.6-Mistral-7B": (0.30e9, 5 * 577, 7.2e9, 2880 + PROMPT + NEW, 1, "anyres: up to 5 x 576 image tokens"),
    "LLaVA-1.6-34B": (0.30e9, 5 * 577, 34.4e9, 2880 + PROMPT + NEW, 2, "Yi-34B; as above"),
    "LLaVA-OneVision-0.5B": (0.40e9, 10 * 729, 0.5e9, 7290 + PROMPT + NEW, 1, "SigLIP; anyres-max-9: 10 x 729"),
    "LLaVA-OneVision-7B": (0.40e9, 10 * 729, 7.6e9, 7290 + PROMPT + NEW, 1, "Qwen2-7B; as above"),
    "InternVL2-2B": (0.30e9, 7 * 1025, 1.8e9, 7 * 256 + PROMPT + NEW, 1, "6 tiles + thumbnail, 256 tokens each"),
    "InternVL2-8B": (0.30e9, 7 * 1025, 7.7e9, 7 * 256 + PROMPT + NEW, 1, "as 2B"),
    "InternVL2-26B": (5.9e9, 7 * 1025, 19.9e9, 7 * 256 + PROMPT + NEW, 1, "InternViT-6B + InternLM2-20B"),
    "InternVL2-40B": (5.9e9, 7 * 1025, 34.4e9, 7 * 256 + PROMPT + NEW, 2, "InternViT-6B + Yi-34B"),
}


def caption_seconds(spec) -> float:
    vis_p, vis_t, llm_p, llm_t = spec[:4]
    return 2 * (vis_p * vis_t + llm_p * llm_t) / EFFECTIVE


def dit_seconds(params: float, tokens: int, layers: int, width: int, steps: int, cfg: bool) -> float:
    """A diffusion transformer: 2 x params x tokens plus 4 n^2 d attention per layer, per call; x2 with CFG."""
    per_call = 2 * params * tokens + layers * 4 * tokens**2 * width
    return per_call * steps * (2 if cfg else 1) / EFFECTIVE


SD3 = dit_seconds(2.03e9, 4096 + 333, 24, 1536, 50, cfg=True)
FLUX = dit_seconds(11.9e9, 4096 + 256, 57, 3072, 4, cfg=False)
T2I_SPEC = {
    "SD1.5 (512 px, 50 steps)": (1.59, f"measured: {FAL}"),
    "SDXL (1024 px, 50 steps)": (5.93, f"measured: {FAL}"),
    "SD3-medium (1024 px, 50 steps)": (SD3, "FLOPs: 2B MMDiT, 4,096 image + 333 text tokens, CFG"),
    "FLUX.1-schnell (1024 px, 4 steps)": (FLUX, "FLOPs: 12B transformer, 4,096 + 256 tokens, no CFG"),
}


def reward_training_hours() -> float:
    """Bradley-Terry training of the three variants (2 epochs; 398K I2T and 468K T2I pairs, PAPER.md section 3):
    ViT-L/16 at 224 px (303M, 197 tokens) per image, BERT-base with cross-attention (~140M, 128 tokens) per text;
    training = forward x (1 + 2 x 0.31 trainable share)."""
    image, text, train = 2 * 0.303e9 * 197, 2 * 0.14e9 * 128, 1 + 2 * 0.31
    i2t_pair, t2i_pair = (image + 2 * text) * train, (2 * image + text) * train
    flops = 2 * (398e3 * i2t_pair + 468e3 * t2i_pair + 468e3 * (i2t_pair + t2i_pair))
    return flops / EFFECTIVE / 3600


def rows() -> list[tuple[str, float, str]]:
    caption_h = {m: IMAGES * caption_seconds(s) / 3600 for m, s in CAPTIONERS_SPEC.items()}
    out = [("generate_i2t: " + m, h, "FLOPs: " + CAPTIONERS_SPEC[m][5]) for m, h in caption_h.items()]
    out.append(("reconstruct_i2t: SD3-medium, <= 83,600 captions", IMAGES * CAPTIONERS * SD3 / 3600,
                "FLOPs (as generate_t2i SD3); identical captions are rendered once"))
    out += [(f"generate_t2i: {m}", T2I_IMAGES_PER_MODEL * s / 3600, src) for m, (s, src) in T2I_SPEC.items()]
    out.append(("reconstruct_t2i: LLaVA-1.5-13B, 91,200 images",
                4 * T2I_IMAGES_PER_MODEL * caption_seconds(CAPTIONERS_SPEC["LLaVA-1.5-13B"]) / 3600,
                "FLOPs: as generate_i2t LLaVA-1.5-13B"))
    out.append(("score_i2t + score_t2i: DreamSim, SBERT", 0.05, "FLOPs: 3 x ViT-B/16 per image; MiniLM: minutes"))
    out.append(("train_reward: I2T, T2I, Combo (2 epochs each)", reward_training_hours(), "FLOPs: see docstring"))
    return out


def wall_hours(gpu_hours: float, gpus: int, per_worker: int = 1) -> float:
    """Wall time on the Ray engine: one model worker per `per_worker` GPUs, items split evenly; model loads and the
    last uneven batch are left out (minutes per model)."""
    return gpu_hours / (max(gpus // per_worker, 1) * per_worker)


def _hours(value: float) -> str:
    return f"{value:,.0f}" if value >= 10 else f"{value:.2f}"


def markdown() -> str:
    table = rows()
    lines = ["| stage: model | A100-80GB GPU-hours | 8 GPUs, wall h | 64 GPUs, wall h | source |",
             "|---|---|---|---|---|"]
    for name, hours, source in table:
        per = next((s[4] for m, s in CAPTIONERS_SPEC.items() if name.endswith(m)), 1)
        cells = [hours, wall_hours(hours, 8, per), wall_hours(hours, 64, per)]
        lines.append(f"| {name} | " + " | ".join(_hours(c) for c in cells) + f" | {source} |")
    total = sum(h for _, h, _ in table)
    lines.append(f"| **total** | **{total:,.0f}** | **{total / 8:,.1f}** | **{total / 64:,.1f}** | |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown())
