"""Small-GPU benchmark (issue 20): SDXL under VRAM budgets of 4, 6 and 8 GB, half the UNet, and
whole, in the conservative (default) and resident policies; s/step and total per request.

One base checkpoint of random weights (`models.py`) is built once on the device and adopted
afresh by each configuration (as `harness.install_configuration` does). On CUDA the
configurations come from the real flags (`--vram-budget GB`, `--keep-models-resident`);
"whole" is no budget flag (everything fits an H100/H200). On the CPU proxy (`mid` models,
256x256) the budgets are scaled: the same share of the UNet stays resident as SDXL's would
under that budget (budget - the UNet stage's working memory, times proxy UNet / SDXL UNet,
plus the proxy's working memory), with NORMAL_VRAM on the CPU, where a streamed layer is
brought in as a copy for its forward (no bus: the proxy measures the mechanism's bookkeeping
and copies, not PCIe).

Per row: the UNet's placement (bytes resident and streamed), s/step (sampling / steps) and
total per request (medians of the counted requests), bytes streamed per request, and the
per-step overhead against the same policy's "whole" row. Every row's image must equal the
whole row's (same seed): the check that the numbers are of the same work.

    python -m tests.benchmarks.lowvram --device cpu      # CPU proxy
    python -m tests.benchmarks.lowvram --device cuda     # SDXL size
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

import args_manager
from ldm_patched.modules import model_management
from ldm_patched.modules.checkpoint import load_tokenizers
from ldm_patched.modules.file_version import FileVersion
from ldm_patched.modules.model_patcher import ModelPatcher
from modules import flags
from tests.benchmarks import models
from tests.benchmarks.harness import NEGATIVE, PROMPT, REPO_ROOT, bench_folders, machine_info
from tests.helpers import pipelines

GIB = 1024 ** 3
BUDGETS: tuple[str, ...] = ("4", "6", "8", "half_unet", "whole")   # GB, or a named budget
POLICIES = ("conservative", "resident")
CHECKPOINT = "bench_lowvram.safetensors"
# SDXL's fp16 UNet (2.567 B parameters): what the proxy budgets are scaled from.
SDXL_UNET_BYTES = 2 * 2_567_463_684


@dataclass
class LowVramOptions:
    device: str = "cpu"
    size: str | None = None        # default: sdxl on CUDA, mid on the CPU
    repeats: int = 3               # counted requests per row, after one warm-up
    seed: int = 1234
    out_dir: Path | None = None
    budgets: tuple[str, ...] = BUDGETS
    policies: tuple[str, ...] = POLICIES

    def spec(self) -> models.SizeSpec:
        return models.SIZES[self.size or ("sdxl" if self.device == "cuda" else "mid")]

    def output_dir(self) -> Path:
        return Path(self.out_dir or os.environ.get("BENCH_OUT") or REPO_ROOT / "bench_out") / "lowvram"


def unet_working_bytes(side: int, dtype: torch.dtype) -> int:
    return model_management.working_memory_bytes("unet", side, side, 1, dtype)


def budget_bytes(budget: str, unet_bytes: int, options: LowVramOptions, dtype: torch.dtype) -> int | None:
    """The device budget of a row (None: the default, everything fits)."""
    side = options.spec().side
    working = unet_working_bytes(side, dtype)
    if budget == "whole":
        return None if options.device == "cuda" else 64 * GIB
    if budget == "half_unet":   # the stated target: half the UNet resident, beside its working memory
        return unet_bytes // 2 + working
    gigabytes = float(budget) * GIB
    if options.device == "cuda":
        return int(gigabytes)
    sdxl_share = (gigabytes - unet_working_bytes(1024, torch.float16)) / SDXL_UNET_BYTES
    return int(max(sdxl_share, 0.0) * unet_bytes) + working


def settings_for(policy: str, budget: int | None, options: LowVramOptions) -> model_management.MemorySettings:
    """CUDA: the flags a user passes. CPU proxy: NORMAL_VRAM on the CPU (no flag gives that: on a
    CPU-only machine nothing streams)."""
    if options.device == "cuda":
        flags_ = (["--keep-models-resident"] if policy == "resident" else []) + \
            (["--vram-budget", f"{budget / GIB:.3f}"] if budget is not None else [])
        return model_management.settings_from_args(args_manager.parse_args(flags_))
    budget = budget if budget is not None else 64 * GIB
    return model_management.MemorySettings(
        policy=model_management.Policy(policy), vram_state=model_management.VRAMState.NORMAL_VRAM,
        device=torch.device("cpu"), budget_bytes=budget, total_bytes=budget)


def request(options: LowVramOptions) -> dict[str, Any]:
    spec = options.spec()
    return {"prompt": PROMPT, "negative_prompt": NEGATIVE, "performance": flags.Performance.SPEED.value,
            "steps": spec.speed_steps, "width": spec.side, "height": spec.side, "seed": options.seed,
            "image_number": 1, "base_model": CHECKPOINT, "loras": [], "refiner_model": flags.NONE_NAME,
            "sampler": flags.DEFAULT_SAMPLER, "scheduler": flags.DEFAULT_SCHEDULER, "guidance_scale": 4.0}


def run_row(policy: str, budget: str, options: LowVramOptions, parts: dict, tokenizers: tuple,
            folders: dict[str, Path], unet_bytes: int, dtype: torch.dtype) -> dict[str, Any]:
    nbytes = budget_bytes(budget, unet_bytes, options, dtype)
    manager = model_management.configure(settings_for(policy, nbytes, options))
    for module in parts.values():
        if module is not None:
            module.to(manager.offload_device())
    pipeline = pipelines.install()
    pipeline.catalogue.adopt_checkpoint(FileVersion.of(str(folders["checkpoints"] / CHECKPOINT)), "base", parts, tokenizers)
    reports = []
    for _ in range(1 + options.repeats):   # the first is the warm-up
        result = pipelines.process_request(request(options))
        if "error" in result.report:
            raise RuntimeError(f"benchmark request failed: {result.report['error']}")
        reports.append(result)
    counted = [r.report for r in reports[1:]]
    unet = next(m for m in counted[-1]["vram"]["models"] if m["name"].endswith(":unet"))
    median = lambda values: statistics.median(values)  # noqa: E731
    return {"policy": policy, "budget": budget, "budget_bytes": manager.settings.budget_bytes,
            "unet": unet, "steps": counted[-1]["steps"],
            "step_s": median([r["timings_ms"]["sampling"] / r["steps"] / 1000 for r in counted]),
            "total_s": median([r["timings_ms"]["total"] / 1000 for r in counted]),
            "bytes_streamed": median([r["model_management"]["bytes_streamed"] for r in counted]),
            "bytes_to_device": median([r["model_management"]["bytes_to_device"] for r in counted]),
            "image": pipelines.pixels(reports[-1].images[0])}


def run_lowvram_benchmark(options: LowVramOptions, log: Callable[[str], None] = print) -> dict[str, Any]:
    out = options.output_dir()
    out.mkdir(parents=True, exist_ok=True)
    spec, device = options.spec(), torch.device(options.device)
    document: dict[str, Any] = {"machine": machine_info(options.device), "size": spec.name, "rows": []}
    with tempfile.TemporaryDirectory(prefix="fooocus_lowvram_") as tmp, \
            bench_folders(Path(tmp), side=spec.side) as folders:
        manager = model_management.configure(settings_for("conservative", None, options))
        dtypes = models.Dtypes(unet=manager.dtype_for("unet"), text_encoder=manager.dtype_for("text_encoder"),
                               vae=manager.dtype_for("vae", manager.vae_device()))
        parts = models.build_checkpoint(spec, device, dtypes, options.seed)
        (folders["checkpoints"] / CHECKPOINT).touch()   # placeholder: only its file id is used
        unet_bytes = ModelPatcher(parts["unet"], device, device).model_size()
        document["unet_bytes"] = unet_bytes
        tokenizers = load_tokenizers()
        try:
            for policy in options.policies:
                for budget in options.budgets:
                    row = run_row(policy, budget, options, parts, tokenizers, folders, unet_bytes, dtypes.unet)
                    document["rows"].append(row)
                    log(f"[lowvram] {policy} {budget}: UNet {row['unet']['placement']} "
                        f"({row['unet']['resident_bytes'] / GIB:.2f} GiB resident), {row['step_s']:.3f} s/step, "
                        f"{row['total_s']:.2f} s total, {row['bytes_streamed'] / GIB:.2f} GiB streamed")
        finally:
            model_management.get_manager().unload_all()
    add_overheads(document["rows"])
    write_outputs(document, out)
    log(markdown_table(document))
    return document


def add_overheads(rows: list[dict[str, Any]]) -> None:
    """Per-step time against the same policy's whole row, and whether the image is the same."""
    whole = {r["policy"]: r for r in rows if r["budget"] == "whole"}
    for row in rows:
        base = whole.get(row["policy"])
        if base is not None:
            row["step_overhead"] = row["step_s"] / base["step_s"] - 1.0
            row["same_image_as_whole"] = bool(np.array_equal(row["image"], base["image"]))


def markdown_table(document: dict[str, Any]) -> str:
    lines = ["| policy | budget | UNet | resident GiB | streamed GiB | s/step | overhead/step | total s "
             "| streamed GiB/request | same image |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in document["rows"]:
        budget = {"half_unet": "½ UNet", "whole": "whole"}.get(r["budget"], f"{r['budget']} GB")
        lines.append(f"| {r['policy']} | {budget} ({r['budget_bytes'] / GIB:.2f} GiB) | {r['unet']['placement']} "
                     f"| {r['unet']['resident_bytes'] / GIB:.2f} | {r['unet']['streamed_bytes'] / GIB:.2f} "
                     f"| {r['step_s']:.3f} | {r.get('step_overhead', 0) * 100:+.0f} % | {r['total_s']:.2f} "
                     f"| {r['bytes_streamed'] / GIB:.2f} | {'yes' if r.get('same_image_as_whole') else 'NO'} |")
    return "\n".join(lines)


def write_outputs(document: dict[str, Any], out: Path) -> None:
    rows = [{k: v for k, v in r.items() if k != "image"} for r in document["rows"]]
    (out / "results.json").write_text(json.dumps({**document, "rows": rows}, indent=1, default=str))
    (out / "results.md").write_text(markdown_table(document) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--size", choices=sorted(models.SIZES), default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    run_lowvram_benchmark(LowVramOptions(device=args.device, size=args.size, repeats=args.repeats, out_dir=args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
