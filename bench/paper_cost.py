"""GPU-hours per stage for the paper profile (7,600 images, 11 captioners, 4 text-to-image models x 3 seeds). Prints the
README's cost table.

Without a device run, two kinds of figure, each row says which:
- published: end-to-end seconds per image published for the same model and settings (A100-80GB);
- estimate (FLOPs): 2 x parameters x tokens per item (the vision tower's and the language model's separately;
  attention added for the diffusion transformers), at an assumed 40% of the A100's 312 TFLOP/s dense bf16 peak (NVIDIA A100
  datasheet). Prefill and decode are counted alike, which assumes large-batch offline serving (vLLM); HF generate
  at small batches decodes several times slower.
With a device run's gpu_results.json (bench/gpu.sh; default: bench/gpu_results.json when present) the rows that
bench measured take its throughputs instead, marked `measured on <device>`: the fastest measured arm at the stage's
batch size; the text-to-image rows add the pipeline's per-image rest (text encoding, VAE decoding, PNG) measured by
the text-to-image row to 50 measured denoising steps. `--write-readme` replaces the README's table.
    python bench/paper_cost.py [--results gpu_results.json] [--write-readme]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

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
    "SD1.5 (512 px, 50 steps)": (1.59, f"published: {FAL}"),
    "SDXL (1024 px, 50 steps)": (5.93, f"published: {FAL}"),
    "SD3-medium (1024 px, 50 steps)": (SD3, "estimate (FLOPs): 2B MMDiT, 4,096 image + 333 text tokens, CFG"),
    "FLUX.1-schnell (1024 px, 4 steps)": (FLUX, "estimate (FLOPs): 12B transformer, 4,096 + 256 tokens, no CFG"),
}


def reward_training_hours() -> float:
    """Bradley-Terry training of the three variants (2 epochs; 398K I2T and 468K T2I pairs, PAPER.md section 3):
    ViT-L/16 at 224 px (303M, 197 tokens) per image, BERT-base with cross-attention (~140M, 128 tokens) per text;
    training = forward x (1 + 2 x 0.31 trainable share)."""
    image, text, train = 2 * 0.303e9 * 197, 2 * 0.14e9 * 128, 1 + 2 * 0.31
    i2t_pair, t2i_pair = (image + 2 * text) * train, (2 * image + text) * train
    flops = 2 * (398e3 * i2t_pair + 468e3 * t2i_pair + 468e3 * (i2t_pair + t2i_pair))
    return flops / EFFECTIVE / 3600


def published_rows() -> list[tuple[str, float, str]]:
    caption_h = {m: IMAGES * caption_seconds(s) / 3600 for m, s in CAPTIONERS_SPEC.items()}
    out = [("generate_i2t: " + m, h, "estimate (FLOPs): " + CAPTIONERS_SPEC[m][5]) for m, h in caption_h.items()]
    out.append((RECONSTRUCT_I2T, IMAGES * CAPTIONERS * SD3 / 3600,
                "estimate (FLOPs, as generate_t2i SD3); identical captions are rendered once"))
    out += [(f"generate_t2i: {m}", T2I_IMAGES_PER_MODEL * s / 3600, src) for m, (s, src) in T2I_SPEC.items()]
    out.append(("reconstruct_t2i: LLaVA-1.5-13B, 91,200 images",
                4 * T2I_IMAGES_PER_MODEL * caption_seconds(CAPTIONERS_SPEC["LLaVA-1.5-13B"]) / 3600,
                "estimate (FLOPs): as generate_i2t LLaVA-1.5-13B"))
    out.append(("score_i2t + score_t2i: DreamSim, SBERT", 0.05,
                "estimate (FLOPs): 3 x ViT-B/16 per image; MiniLM: minutes"))
    out.append(("train_reward: I2T, T2I, Combo (2 epochs each)", reward_training_hours(),
                "estimate (FLOPs): see docstring"))
    return out


RECONSTRUCT_I2T = "reconstruct_i2t: SD3-medium, <= 83,600 captions"
# cost row -> (bench model, items of the stage); the bench measures each at the stage's batch size (its largest)
T2I_MEASURED = {
    "generate_t2i: SD1.5 (512 px, 50 steps)": ("SD1.5 UNet 512 px", T2I_IMAGES_PER_MODEL),
    "generate_t2i: SD3-medium (1024 px, 50 steps)": ("SD3-medium MMDiT 1024 px", T2I_IMAGES_PER_MODEL),
    RECONSTRUCT_I2T: ("SD3-medium MMDiT 1024 px", IMAGES * CAPTIONERS),
}
CAPTION_MEASURED = {"generate_i2t: LLaVA-1.5-7B": ("LLaVA-1.5-7B captioner", IMAGES)}
STEPS = 50


def _measured(rows: list[dict], section: str, model: str) -> list[dict]:
    return [r for r in rows if r["section"] == section and r["model"] == model and r["ms_per_call"]]


def _fastest(rows: list[dict], section: str, model: str, batch: int | None = None) -> dict | None:
    """The fastest arm's row of `model` at `batch` (default: the largest batch measured, the stage's)."""
    found = _measured(rows, section, model)
    batch = batch if batch is not None else max((r["batch"] for r in found), default=None)
    found = [r for r in found if r["batch"] == batch]
    return min(found, key=lambda r: r["ms_per_call"]) if found else None


def t2i_seconds(rows: list[dict], model: str) -> tuple[float, str] | None:
    """Seconds per image at 50 steps: the fastest arm's denoiser call x 50 / batch, plus the rest of the pipeline
    per image (the text-to-image row at k steps minus k denoiser calls of its own arm) when measured."""
    best = _fastest(rows, "diffusion denoising", model)
    if best is None:
        return None
    batch = best["batch"]
    seconds = STEPS * best["ms_per_call"] / 1000 / batch
    note = f"{STEPS} x denoiser ({best['arm']}, batch {batch}, CFG)"
    render = _fastest(rows, "text-to-image", f"{model} pipeline", batch)
    same = render and next((r for r in rows if r["section"] == "diffusion denoising" and r["model"] == model
                            and r["batch"] == batch and r["arm"] == render["arm"] and r["ms_per_call"]), None)
    if render and same:
        steps = int(render["unit"].split("(")[1].split()[0])
        rest = max(0.0, render["ms_per_call"] - steps * same["ms_per_call"]) / 1000 / batch
        seconds += rest
        note += f" + pipeline rest {rest:.2f} s/img ({render['arm']})"
    else:
        note += "; pipeline rest not measured"
    return seconds, note


def measured_rows(results: dict) -> dict[str, tuple[float, str]]:
    """Cost rows -> (GPU-hours, source) from a gpu_results.json (bench/gpu.py)."""
    rows, device = results["rows"], results["device"]
    out: dict[str, tuple[float, str]] = {}
    for name, (model, items) in T2I_MEASURED.items():
        got = t2i_seconds(rows, model)
        if got is not None:
            out[name] = (items * got[0] / 3600, f"measured on {device}: {got[1]}")
    for name, (model, items) in CAPTION_MEASURED.items():
        best = _fastest(rows, "captioning", model)
        if best is not None:
            seconds = best["ms_per_call"] / 1000 / best["batch"]
            out[name] = (items * seconds / 3600, f"measured on {device}: {best['arm']}, batch {best['batch']}, "
                         f"{best['throughput']:.0f} tokens/s (transformers generate)")
    return out


def rows(results: dict | None = None) -> list[tuple[str, float, str]]:
    """The cost table's rows: published estimates, replaced by measured ones where `results` has them."""
    measured = measured_rows(results) if results else {}
    return [(name, *measured.get(name, (hours, source))) for name, hours, source in published_rows()]


def wall_hours(gpu_hours: float, gpus: int, per_worker: int = 1) -> float:
    """Wall time on the Ray engine: one model worker per `per_worker` GPUs, items split evenly; model loads and the
    last uneven batch are left out (minutes per model)."""
    return gpu_hours / (max(gpus // per_worker, 1) * per_worker)


def _hours(value: float) -> str:
    return f"{value:,.0f}" if value >= 10 else f"{value:.2f}"


def markdown(results: dict | None = None) -> str:
    table = rows(results)
    lines = ["| stage: model | GPU-hours (A100-80GB unless measured) | 8 GPUs, wall h | 64 GPUs, wall h | source |",
             "|---|---|---|---|---|"]
    for name, hours, source in table:
        per = next((s[4] for m, s in CAPTIONERS_SPEC.items() if name.endswith(m)), 1)
        cells = [hours, wall_hours(hours, 8, per), wall_hours(hours, 64, per)]
        lines.append(f"| {name} | " + " | ".join(_hours(c) for c in cells) + f" | {source} |")
    total = sum(h for _, h, _ in table)
    lines.append(f"| **total** | **{total:,.0f}** | **{total / 8:,.1f}** | **{total / 64:,.1f}** | |")
    return "\n".join(lines)


BEGIN, END = "<!-- paper_cost table: begin -->", "<!-- paper_cost table: end -->"


def write_readme(readme: Path, table: str) -> None:
    """Replace what lies between the BEGIN and END markers of `readme` with `table`."""
    text = readme.read_text()
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise SystemExit(f"{readme}: needs one {BEGIN!r} line before one {END!r} line")
    head, rest = text.split(BEGIN)
    readme.write_text(f"{head}{BEGIN}\n{table}\n{END}{rest.split(END, 1)[1]}")


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default = Path(__file__).with_name("gpu_results.json")
    parser.add_argument("--results", type=Path, default=default if default.exists() else None,
                        help="gpu_results.json of a device run (default: bench/gpu_results.json when present)")
    parser.add_argument("--write-readme", nargs="?", const=Path(__file__).parents[1] / "README.md", type=Path,
                        default=None, help="replace the README's table (or this file's)")
    args = parser.parse_args(argv)
    results = json.loads(args.results.read_text()) if args.results else None
    if results is not None and results.get("smoke"):
        print(f"note: {args.results} is a --smoke run on CPU, not a device measurement")
    table = markdown(results)
    print(table)
    if args.write_readme:
        write_readme(args.write_readme, table)
    return table


if __name__ == "__main__":
    main()
