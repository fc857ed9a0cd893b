"""Where a resident LoRA switch spends its time (DESIGN.md §5 target: under 30 ms on an H100).

Drives `ModelManager.load_models` directly on one UNet (no pipeline around it), times
switch-on (patch every LCM key) and switch-off (restore them) with a device
synchronize around each, then profiles one switch-on: Python functions by own time
and the number of device kernels it launches.

    python -m tests.benchmarks.profile_lora_switch --size sdxl --device cuda
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import tempfile
import time
from pathlib import Path

import torch

import args_manager
from ldm_patched.modules import model_management
from ldm_patched.modules.lora import LoraFileCache, match_lora, unet_lora_names
from ldm_patched.modules.model_patcher import ModelPatcher
from tests.benchmarks import models


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_load(manager: model_management.ModelManager, patcher: ModelPatcher, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    manager.load_models([patcher])
    _sync(device)
    return (time.perf_counter() - start) * 1000


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(models.SIZES), default="sdxl")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    parser.add_argument("--switches", type=int, default=6)
    args = parser.parse_args(argv)
    device, spec = torch.device(args.device), models.SIZES[args.size]
    flags = ["--keep-models-resident"] + (["--always-cpu"] if args.device == "cpu" else [])
    manager = model_management.configure(model_management.settings_from_args(args_manager.parse_args(flags)))
    unet = models.build_checkpoint(spec, device, models.Dtypes(manager.dtype_for("unet"), torch.float32,
                                                               torch.float32), seed=0)["unet"]
    plain = ModelPatcher(unet, device, torch.device("cpu"), name="unet")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "lora.safetensors"
        keys = models.write_lcm_shaped_lora(unet, path, spec.lora_rank,
                                            torch.float16 if device.type == "cuda" else torch.float32)
        match = match_lora(LoraFileCache().get(str(path)), {"unet": (unet_lora_names(unet), unet)})
    lcm = plain.clone()
    lcm.add_patches(match.patches["unet"], 1.0)
    manager.load_models([plain])
    for _ in range(2):   # warm-up: backups, cached factors, allocator
        manager.load_models([lcm])
        manager.load_models([plain])
    on, off = [], []
    for _ in range(args.switches):
        on.append(_timed_load(manager, lcm, device))
        off.append(_timed_load(manager, plain, device))
    print(f"{args.size} on {args.device}: {keys} LoRA keys; switch-on median {statistics.median(on):.1f} ms "
          f"{[round(t, 1) for t in on]}; switch-off median {statistics.median(off):.1f} ms {[round(t, 1) for t in off]}")
    _profile_python(manager, lcm, plain, device)
    _profile_kernels(manager, lcm, plain, device)
    return 0


def _profile_python(manager, lcm: ModelPatcher, plain: ModelPatcher, device: torch.device) -> None:
    profiler = cProfile.Profile()
    _sync(device)
    profiler.enable()
    manager.load_models([lcm])
    _sync(device)
    profiler.disable()
    manager.load_models([plain])
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(18)
    print(text.getvalue())


def _profile_kernels(manager, lcm: ModelPatcher, plain: ModelPatcher, device: torch.device) -> None:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        manager.load_models([lcm])
        _sync(device)
    manager.load_models([plain])
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=14))


if __name__ == "__main__":
    raise SystemExit(main())
