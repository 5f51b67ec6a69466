"""The benchmark's GPU mode: the teacher's training step at the scale a GPU is for.

    python -m pipeline.tools.bench gpu                  # r50_vit_b16, 512×512, batch 16, bf16, channels-last
    python -m pipeline.tools.bench gpu --compile        # the same network through torch.compile
    python -m pipeline.tools.bench gpu --device cpu --preset tiny --image-size 64   # the code path, anywhere

The step is the teacher stage's own (`train.recipes.Teacher`: weak view, cross-entropy,
AdamW) run by `train.loop.train_steps`, the loop of every stage, with the network in channels-last
and, on a GPU, under bf16 autocast. After warm-up steps (and compilation) it times two runs:
- `data_path`: each step draws its batch from uint8 images and masks held in host memory (how a
  stage's worker holds its shard), copies it to the device and augments it there;
- `model_only`: one batch already on the device, no augmentation: what the network alone does.
Each gives images/s, peak device memory, GPU utilisation (NVML, sampled while the timed steps
run) and model FLOP utilisation (MFU): the FLOPs of one forward and backward pass (torch's
FlopCounterMode, attention as its matrix products) × steps/s ÷ the device's dense bf16 peak.

It needs torch, timm, omegaconf and pyarrow, not Ray, MLflow or DVC, so it runs on a bare GPU machine;
torch is imported where it is used, so that writing the README's table needs none of them.
Image contents are random: no op in the step depends on them, and only the shape sets the time.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import yaml

GPU_JSON = Path("reports/gpu_bench.json")
MODEL_PRESETS = Path(__file__).resolve().parents[2] / "conf" / "model"
TARGETS = {"mfu": 0.40, "gpu_utilisation": 90.0}
# Dense bf16 tensor-core peaks from NVIDIA's data sheets, TFLOP/s, matched against
# torch.cuda.get_device_name in this order (the first name that is contained wins).
BF16_PEAK_TFLOPS = (("H200 NVL", 835.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4),
                    ("H200", 989.4), ("H800", 989.4), ("A100", 312.0), ("L40S", 362.0), ("L40", 181.0),
                    ("L4", 121.0))


def peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of a GPU by its name, or None for a device not in the table."""
    return next((peak for key, peak in BF16_PEAK_TFLOPS if key in device_name), None)


def step_flops(model: torch.nn.Module, step) -> float:
    """FLOPs of one forward and backward pass of `step()`'s first loss (no optimizer step)."""
    from contextlib import nullcontext

    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from pipeline.models.transunet import mixed_precision

    device = next(model.parameters()).device
    # torch's FLOP table knows the GPU's fused attention kernels but not the CPU's: there, the
    # math path's matrix products are counted instead (on a GPU it would keep every attention
    # matrix for the backward, gigabytes at 512²).
    attention = sdpa_kernel(SDPBackend.MATH) if device.type == "cpu" else nullcontext()
    with attention, FlopCounterMode(display=False) as counter:
        with mixed_precision(device):
            loss = next(iter(step().values()))
        loss.backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


class UtilisationSampler:
    """GPU utilisation (% of time a kernel ran, as nvidia-smi reports it) sampled in a thread;
    `error` says why there is none where NVML cannot be read (no nvidia-ml-py, a container
    without the driver's library)."""

    def __init__(self, device: torch.device, interval: float = 0.1):
        self.device, self.interval = device, interval
        self.samples: list[int] = []
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        import torch

        while not self._stop.wait(self.interval):
            try:
                self.samples.append(torch.cuda.utilization(self.device))
            except Exception as err:  # whatever NVML raises, the timing goes on without it
                self.error = f"{type(err).__name__}: {err}"
                return

    def __enter__(self) -> UtilisationSampler:
        if self.device.type == "cuda":
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def mean(self) -> float | None:
        return sum(self.samples) / len(self.samples) if self.samples else None


def timed_run(model, optimizer, step, steps: int, batch: int, device: torch.device, flops_per_step: float,
              peak: float | None) -> dict:
    """`steps` steps of the stages' loop: images/s, peak device memory, utilisation, MFU."""
    import torch

    from pipeline.train.loop import train_steps, warmup_cosine

    scheduler = warmup_cosine(optimizer, steps)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    with UtilisationSampler(device) as utilisation:
        started = time.perf_counter()
        train_steps(model, optimizer, scheduler, step, steps, device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - started
    steps_per_s = steps / seconds
    return {"images_per_s": steps_per_s * batch, "step_ms": 1000 / steps_per_s,
            "tflops_per_s": flops_per_step * steps_per_s / 1e12,
            "mfu": flops_per_step * steps_per_s / (peak * 1e12) if peak else None,
            "gpu_utilisation": utilisation.mean(), "gpu_utilisation_error": utilisation.error,
            "peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None}


def run(device: str = "cuda", preset: str = "r50_vit_b16", image_size: int = 512, batch_size: int = 16,
        steps: int = 100, warmup: int = 5, compiled: bool = False, classes: int = 19,
        peak: float | None = None) -> dict:
    """Both timed runs on `device`; returns the figures `main` writes as JSON."""
    import torch

    from pipeline.config.params import FinetuneConfig, ModelConfig
    from pipeline.data.augment import to_unit_float
    from pipeline.losses import segmentation_ce
    from pipeline.models.transunet import build_network
    from pipeline.tools.plain import plain_setup
    from pipeline.train.loop import JobConfig, train_steps, warmup_cosine
    from pipeline.train.recipes import Labeled, Teacher
    from pipeline.train.steps import model_input

    target = torch.device(device)
    model_cfg = ModelConfig(**yaml.safe_load((MODEL_PRESETS / f"{preset}.yaml").read_text())["model"])
    job = JobConfig(train=FinetuneConfig(batch_size=batch_size, crop_scale_min=0.25, hflip=True), model=model_cfg,
                    num_classes=classes, cpus_per_worker=torch.get_num_threads(),
                    init_state=build_network(model_cfg, classes).state_dict())
    setup = plain_setup(job, target)
    generator = torch.Generator().manual_seed(0)
    rows = max(4 * batch_size, 64)
    shard = Labeled(image=torch.randint(256, (rows, 3, image_size, image_size), dtype=torch.uint8, generator=generator),
                    mask=torch.randint(classes, (rows, image_size, image_size), dtype=torch.uint8, generator=generator))
    parts = Teacher(labeled=()).build(job, setup, labeled=shard)
    if compiled:
        parts.model.compile()
    x = model_input(to_unit_float(shard.image[:batch_size]), target)
    y = shard.mask[:batch_size].to(target)

    def model_only() -> dict:
        return {"loss": segmentation_ce(parts.model(x), y)}

    flops = step_flops(parts.model, parts.step)
    peak = peak or (peak_tflops(torch.cuda.get_device_name(target)) if target.type == "cuda" else None)
    warm_started = time.perf_counter()
    for warming in (parts.step, model_only):  # compiles (when asked); cuDNN times its algorithms
        train_steps(parts.model, parts.optimizer, warmup_cosine(parts.optimizer, warmup), warming, warmup, target)
    figures = {"device": torch.cuda.get_device_name(target) if target.type == "cuda" else "cpu",
               "torch": torch.__version__, "preset": preset, "image_size": image_size, "batch_size": batch_size,
               "steps": steps, "compile": compiled,
               "autocast": "bf16" if target.type == "cuda" and torch.cuda.is_bf16_supported() else "none",
               "channels_last": True, "warmup_s": time.perf_counter() - warm_started,
               "flops_per_image": flops / batch_size, "peak_tflops": peak}
    for name, step in (("data_path", parts.step), ("model_only", model_only)):
        figures[name] = timed_run(parts.model, parts.optimizer, step, steps, batch_size, target, flops, peak)
    figures["data_path_ratio"] = figures["data_path"]["images_per_s"] / figures["model_only"]["images_per_s"]
    return figures


RUNS = {"data_path": "data path: host uint8 → device, augmented there", "model_only": "model only: one batch on the device"}


def markdown(fig: dict) -> str:
    """The figures as a table, each against its target where it has one."""
    def cell(value, fmt: str, unit: str = "") -> str:
        return "n/a" if value is None else f"{value:{fmt}}{unit}"

    def utilisation(run: dict) -> str:
        error = run.get("gpu_utilisation_error")
        return f"n/a ({error})" if error else cell(run["gpu_utilisation"], ".0f", "%")

    lines = [f"Measured {fig['date']} on {fig['device']} (torch {fig['torch']}) by `python -m pipeline.tools.bench gpu`: "
             f"`{fig['preset']}` at {fig['image_size']}×{fig['image_size']}, batch {fig['batch_size']}, "
             f"autocast {fig['autocast']}, channels-last, torch.compile {'on' if fig['compile'] else 'off'}, "
             f"{fig['steps']} timed steps; {fig['flops_per_image'] / 1e12:.3f} TFLOP per image (forward + backward); "
             f"peak {cell(fig['peak_tflops'], '.0f', ' TFLOP/s')} (`reports/gpu_bench.json`).", "",
             f"| run | images/s | ms/step | TFLOP/s | MFU (target ≥ {TARGETS['mfu']:.0%}) | GPU utilisation "
             f"(target ≥ {TARGETS['gpu_utilisation']:.0f}%) | peak memory GiB |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, label in RUNS.items():
        f = fig[name]
        memory = None if f["peak_memory_mb"] is None else f["peak_memory_mb"] / 1024
        lines.append(f"| {label} | {f['images_per_s']:.1f} | {f['step_ms']:.1f} | {f['tflops_per_s']:.1f} | "
                     f"{cell(f['mfu'], '.1%')} | {utilisation(f)} | {cell(memory, '.1f')} |")
    lines += ["", f"Data path / model only: {fig['data_path_ratio']:.2f}."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.tools.bench gpu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu to try the code path")
    parser.add_argument("--preset", default="r50_vit_b16", choices=sorted(p.stem for p in MODEL_PRESETS.glob("*.yaml")),
                        help="a model preset of conf/model (default r50_vit_b16)")
    parser.add_argument("--image-size", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=100, help="timed steps per run (default 100)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps per run first (default 5)")
    parser.add_argument("--compile", action="store_true", help="run the network through torch.compile")
    parser.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak, for a GPU not in the table")
    parser.add_argument("--json", type=Path, default=GPU_JSON, help=f"where to write the figures (default {GPU_JSON})")
    args = parser.parse_args(argv)
    import torch

    for name in ("image_size", "batch_size", "steps", "warmup"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}: expected a positive integer, got {getattr(args, name)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit(f"error: --device {args.device}: torch {torch.__version__} sees no CUDA device here "
                 "(the GPU mode needs one; --device cpu runs the same code on the CPU)")
    fig = run(args.device, args.preset, args.image_size, args.batch_size, args.steps, args.warmup, args.compile,
              peak=args.peak_tflops)
    fig["date"] = time.strftime("%Y-%m-%d")
    from pipeline.data.atomic import write_text_atomic

    args.json.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(args.json, json.dumps(fig, indent=2) + "\n")
    print(markdown(fig))


if __name__ == "__main__":
    main()
