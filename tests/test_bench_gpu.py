"""bench/gpu.py's FLOP accounting and MFU arithmetic, and bench/paper_cost.py's use of a device run's results, on CPU:
FlopCounterMode's counts of a Linear, an attention block and a diffusers UNet down block against their analytic
counts (2 x multiply-adds of every matrix product and convolution), also through torch.compile."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


gpu = _load("gpu")
paper_cost = _load("paper_cost")


class Attention(nn.Module):
    """Multi-head self-attention: q, k, v and output projections around scaled_dot_product_attention."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(width, width) for _ in range(4))

    def forward(self, x):
        b, n, d = x.shape

        def split(t):
            return t.view(b, n, self.heads, d // self.heads).transpose(1, 2)

        y = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
        return self.o(y.transpose(1, 2).reshape(b, n, d))


def test_linear_flops_are_twice_its_multiply_adds():
    layer = nn.Linear(48, 24)
    x = torch.randn(5, 48)
    assert gpu.count_flops(lambda: layer(x)) == 2 * 5 * 48 * 24


@pytest.mark.parametrize("batch,tokens,width,heads", [(2, 10, 32, 4), (1, 7, 16, 2)])
def test_attention_block_flops_are_projections_plus_scores_and_mixing(batch, tokens, width, heads):
    block = Attention(width, heads)
    x = torch.randn(batch, tokens, width)
    projections = 4 * 2 * batch * tokens * width * width
    scores_and_mixing = 2 * (2 * batch * heads * tokens * tokens * (width // heads))
    assert gpu.count_flops(lambda: block(x)) == projections + scores_and_mixing


def test_unet_down_block_flops_are_its_convolutions_and_time_projection():
    from diffusers.models.unets.unet_2d_blocks import DownBlock2D

    b, cin, cout, temb, side = 2, 8, 16, 32, 12
    block = DownBlock2D(in_channels=cin, out_channels=cout, temb_channels=temb, num_layers=1, resnet_groups=4,
                        add_downsample=True, downsample_padding=1).eval()
    x, t = torch.randn(b, cin, side, side), torch.randn(b, temb)
    conv1 = 2 * b * side * side * cout * cin * 9
    time_proj = 2 * b * temb * cout
    conv2 = 2 * b * side * side * cout * cout * 9
    shortcut = 2 * b * side * side * cout * cin
    down = 2 * b * (side // 2) * (side // 2) * cout * cout * 9
    with torch.no_grad():
        assert gpu.count_flops(lambda: block(x, t)) == conv1 + time_proj + conv2 + shortcut + down


def test_compiled_code_is_counted_like_the_eager_code():
    block = Attention(32, 4)
    x = torch.randn(2, 9, 32)
    compiled = torch.compile(block, backend="eager")
    compiled(x)
    assert gpu.count_flops(lambda: compiled(x)) == gpu.count_flops(lambda: block(x)) > 0


def test_a_row_reports_counted_flops_tflops_and_mfu_against_the_measured_peak(tmp_path):
    layer = nn.Linear(256, 256)
    x = torch.randn(128, 256)
    peaks = {"matmul_tflops": 0.5, "copy_tb_s": 0.02}
    b = gpu.Bench("cpu", gpu.SMOKE_SIZES, None, 60, 0.01, "eager", peaks, str(tmp_path / "r.json"), True, 2)
    row = b.measure("reward scoring", "linear", gpu.FP32, 128, lambda: layer(x), 128, "rows/s", "s",
                    weight_bytes=256 * 256 * 4)
    assert row.flops_per_call == 2 * 128 * 256 * 256
    seconds = row.ms_per_call / 1000
    assert row.throughput == pytest.approx(128 / seconds, rel=0.01)
    assert row.tflops == pytest.approx(row.flops_per_call / seconds / 1e12, rel=0.01, abs=1e-3)
    assert row.mfu == pytest.approx(row.flops_per_call / seconds / 1e12 / 0.5, rel=0.01, abs=1e-4)
    assert row.bw_util == pytest.approx(256 * 256 * 4 / seconds / 0.02e12, rel=0.01, abs=1e-4)
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["peaks"] == peaks and saved["rows"][0]["flops_per_call"] == row.flops_per_call


def test_rows_without_budget_are_skipped_not_run(tmp_path):
    peaks = {"matmul_tflops": 1.0, "copy_tb_s": 1.0}
    b = gpu.Bench("cpu", gpu.SMOKE_SIZES, None, 0, 0.01, "eager", peaks, None, True, 2)
    calls = []
    assert b.measure("captioning", "m", gpu.BF16, 4, lambda: calls.append(1), 4, "tokens/s", "s") is None
    assert calls == [] and b.rows[0].note.startswith("skipped:") and b.rows[0].throughput is None


def test_rows_are_ordered_reward_denoising_captioning_first():
    rows = [gpu.Row(section, "m", "a", 1, None, "", None, None, None, None, None, None)
            for section in ("similarity", "captioning", "text-to-image", "diffusion denoising", "reward scoring")]
    assert [r.section for r in gpu.ordered(rows)] == list(gpu.SECTIONS)


def _row(section, model, arm, batch, ms, unit="u", throughput=1.0):
    return {"section": section, "model": model, "arm": arm, "batch": batch, "ms_per_call": ms, "unit": unit,
            "throughput": throughput}


RESULTS = {"device": "NVIDIA H100 80GB HBM3", "rows": [
    _row("diffusion denoising", "SD1.5 UNet 512 px", "paper", 8, 100.0),
    _row("diffusion denoising", "SD1.5 UNet 512 px", "bf16 sdpa", 8, 80.0),
    _row("diffusion denoising", "SD1.5 UNet 512 px", "bf16 sdpa", 1, 20.0),
    _row("text-to-image", "SD1.5 UNet 512 px pipeline", "paper", 8, 4 * 100.0 + 800.0, "img/s (4 steps + ...)"),
    _row("diffusion denoising", "SD3-medium MMDiT 1024 px", "bf16 sdpa", 8, 1000.0),
    _row("captioning", "LLaVA-1.5-7B captioner", "bf16 sdpa", 16, 3200.0, throughput=385.0),
    {**_row("captioning", "LLaVA-1.5-7B captioner", "bf16 sdpa compile", 16, None), "throughput": None},
]}


def test_paper_cost_takes_measured_throughputs_and_marks_them():
    table = {name: (hours, source) for name, hours, source in paper_cost.rows(RESULTS)}
    sd_hours, sd_source = table["generate_t2i: SD1.5 (512 px, 50 steps)"]
    per_image = 50 * 0.080 / 8 + 0.800 / 8
    assert sd_hours == pytest.approx(7600 * 3 * per_image / 3600)
    assert sd_source.startswith("measured on NVIDIA H100 80GB HBM3") and "bf16 sdpa" in sd_source
    sd3_hours, sd3_source = table["reconstruct_i2t: SD3-medium, <= 83,600 captions"]
    assert sd3_hours == pytest.approx(7600 * 11 * 50 * 1.0 / 8 / 3600)
    assert "pipeline rest not measured" in sd3_source
    llava_hours, _ = table["generate_i2t: LLaVA-1.5-7B"]
    assert llava_hours == pytest.approx(7600 * 3.2 / 16 / 3600)
    assert table["generate_t2i: SDXL (1024 px, 50 steps)"][1].startswith("published:")
    assert table["generate_i2t: LLaVA-1.5-13B"][1].startswith("estimate (FLOPs)")
    published = {name: hours for name, hours, _ in paper_cost.rows(None)}
    assert published["generate_t2i: SD1.5 (512 px, 50 steps)"] != sd_hours


def test_paper_cost_rewrites_the_readme_table_between_its_markers(tmp_path):
    results = tmp_path / "gpu_results.json"
    results.write_text(json.dumps(RESULTS))
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nbefore\n{paper_cost.BEGIN}\nold table\n{paper_cost.END}\nafter\n")
    table = paper_cost.main(["--results", str(results), "--write-readme", str(readme)])
    text = readme.read_text()
    assert text == f"# x\n\nbefore\n{paper_cost.BEGIN}\n{table}\n{paper_cost.END}\nafter\n"
    assert "measured on NVIDIA H100 80GB HBM3" in text and "old table" not in text
    readme.write_text("no markers\n")
    with pytest.raises(SystemExit):
        paper_cost.main(["--results", str(results), "--write-readme", str(readme)])


def test_the_table_keeps_every_model_name_whole():
    names = ["SD3-medium MMDiT 1024 px pipeline", "BLIP-large reward model", "LLaVA-1.5-7B captioner"]
    rows = [gpu.Row("text-to-image", name, "paper", 2, 1.0, "images/s", 10.0, 10**9, 0.1, 0.01, None, 1.0)
            for name in names]
    peaks = {"matmul_dtype": "bfloat16", "matmul_n": 8192, "matmul_tflops": 10.0, "copy_tb_s": 1.0}
    text = gpu.table(rows, peaks, "cpu")
    assert all(name in text for name in names)
