"""The benchmark's GPU mode: its FLOP count, its peaks and MFU, and its whole path on the CPU
(CI has no GPU; the figures themselves come from a GPU run, see the README)."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

from pipeline.tools import gpu_bench
from pipeline.tools.bench import GPU_README_BEGIN, GPU_README_END, README_BEGIN, README_END, write_readme


def test_the_flop_count_holds_the_forward_and_the_backward_pass():
    """Two linear layers, batch b: forward 2·b·(i·h + h·o); backward the weight gradients of
    both (2·b·i·h + 2·b·h·o) and the input gradient of the second only (2·b·h·o), since the
    input needs none."""
    b, i, h, o = 4, 8, 16, 3
    model = nn.Sequential(nn.Linear(i, h, bias=False), nn.ReLU(), nn.Linear(h, o, bias=False))
    x = torch.randn(b, i)
    flops = gpu_bench.step_flops(model, lambda: {"loss": model(x).square().mean()})
    assert flops == 4 * b * i * h + 6 * b * h * o
    assert all(p.grad is None for p in model.parameters())  # counting leaves no gradient behind


def test_attention_counts_as_its_matrix_products_on_the_cpu_too():
    """q·kᵀ and its product with v, 2·b·h·n²·d FLOPs each forward; the backward gives q, k and v
    their gradients, twice that per product. The CPU's fused attention kernel is not in torch's
    FLOP table, which is why the count takes attention's math path there."""
    b, h, n, d = 2, 3, 5, 4

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v = (nn.Parameter(torch.randn(b, h, n, d)) for _ in range(3))

        def forward(self):
            return nn.functional.scaled_dot_product_attention(self.q, self.k, self.v)

    model = Attention()
    assert gpu_bench.step_flops(model, lambda: {"loss": model().sum()}) == 3 * 2 * (2 * b * h * n * n * d)


@pytest.mark.parametrize(("name", "peak"), [
    ("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H200", 989.4),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA L40S", 362.0), ("NVIDIA L40", 181.0), ("NVIDIA L4", 121.0),
    ("NVIDIA H200 NVL", 835.0), ("Tesla T4", None),
])
def test_the_bf16_peak_is_looked_up_by_device_name(name, peak):
    assert gpu_bench.peak_tflops(name) == peak


def test_the_gpu_mode_runs_on_the_cpu_and_its_mfu_follows_from_its_figures(tmp_path):
    out = tmp_path / "gpu.json"
    gpu_bench.main(["--device", "cpu", "--preset", "tiny", "--image-size", "32", "--batch-size", "4",
                    "--steps", "3", "--warmup", "1", "--peak-tflops", "2.0", "--json", str(out)])
    fig = json.loads(out.read_text())
    assert (fig["device"], fig["preset"], fig["autocast"]) == ("cpu", "tiny", "none")
    assert fig["flops_per_image"] > 1e7
    for name in ("data_path", "model_only"):
        run = fig[name]
        assert run["images_per_s"] > 0 and run["gpu_utilisation"] is None and run["peak_memory_mb"] is None
        steps_per_s = run["images_per_s"] / 4
        assert run["mfu"] == pytest.approx(fig["flops_per_image"] * 4 * steps_per_s / 2.0e12)
    assert fig["data_path_ratio"] == pytest.approx(fig["data_path"]["images_per_s"] / fig["model_only"]["images_per_s"])
    assert not list(tmp_path.glob(".*"))  # written through a temp file, none left


def test_without_a_gpu_the_cuda_mode_stops_before_any_work(tmp_path):
    hidden = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no GPU, also on a machine that has one
    result = subprocess.run([sys.executable, "-m", "pipeline.tools.bench", "gpu", "--json", str(tmp_path / "g.json")],
                            capture_output=True, text=True, env=hidden)
    assert result.returncode == 1 and "sees no CUDA device" in result.stderr
    assert not (tmp_path / "g.json").exists()


def test_the_readme_gets_the_gpu_table_beside_the_cpu_one(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"{README_BEGIN}\ncpu table\n{README_END}\n{GPU_README_BEGIN}\nnot run\n{GPU_README_END}\n")
    run = {"images_per_s": 400.0, "step_ms": 40.0, "tflops_per_s": 404.0, "mfu": 0.408, "gpu_utilisation": 97.0,
           "peak_memory_mb": 20480.0}
    fig = {"date": "2026-12-02", "device": "NVIDIA H100 80GB HBM3", "torch": "2.11.0", "preset": "r50_vit_b16",
           "image_size": 512, "batch_size": 16, "steps": 50, "compile": False, "autocast": "bf16",
           "flops_per_image": 1.01e12, "peak_tflops": 989.4, "data_path": run, "model_only": run,
           "data_path_ratio": 1.0}
    write_readme(None, fig, readme=readme)
    text = readme.read_text()
    assert "cpu table" in text and "not run" not in text  # the CPU block stays as it was
    assert "| data path: host uint8 → device, augmented there | 400.0 | 40.0 | 404.0 | 40.8% | 97% | 20.0 |" in text
    assert "`r50_vit_b16` at 512×512, batch 16, autocast bf16" in text


def test_utilisation_is_the_mean_of_the_samples_taken_while_the_steps_run(monkeypatch):
    readings = iter([40, 80] + [60] * 1000)
    monkeypatch.setattr(torch.cuda, "utilization", lambda device: next(readings))
    with gpu_bench.UtilisationSampler(torch.device("cuda"), interval=0.01) as sampler:
        deadline = time.monotonic() + 10
        while len(sampler.samples) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert sampler.samples[:2] == [40, 80] and sampler.mean() == pytest.approx(sum(sampler.samples) / len(sampler.samples))
    assert sampler.error is None


def test_without_nvml_the_sampler_says_why_and_reports_no_utilisation(monkeypatch):
    def unreadable(device):
        raise RuntimeError("NVML library not found")

    monkeypatch.setattr(torch.cuda, "utilization", unreadable)
    with gpu_bench.UtilisationSampler(torch.device("cuda"), interval=0.01) as sampler:
        time.sleep(0.1)
    assert sampler.mean() is None and sampler.error == "RuntimeError: NVML library not found"
