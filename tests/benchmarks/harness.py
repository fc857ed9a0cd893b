"""Side-by-side benchmark of the model-management configurations (DESIGN.md §5).

One entry point, `run_benchmark(BenchOptions)`, serves the CPU proxy, the CUDA
run and the dry run in the default test suite. Per run:

1. build random-weight SDXL-layout models ONCE on the target device (`models.py`):
   two bases (`bench_base`, `bench_base2`) and a refiner, plus an LCM-shaped LoRA
   written as `sdxl_lcm_lora.safetensors` (the Extreme Speed file);
2. for each configuration in turn: real flag path (`args_manager.parse_args` ->
   `settings_from_args` -> `model_management.configure`), every module put on that
   configuration's offload device (as after loading a file), a fresh
   `CatalogueState(max_checkpoints=8)` and `adopt_checkpoint` of the three in-memory
   checkpoints under the file ids of empty placeholder files, so requests resolve
   them by name and no disk reload is ever part of a measurement;
3. each scenario: an uncounted warm-up (one pass over the scenario's distinct requests:
   1, 2 for the switch scenarios, 5 for `fooocus_session`), then N counted requests
   through `Pipeline.process_request` (`fooocus_session`: N rounded up to whole rounds of
   its 5 modes); every number comes from the request's report.

`fooocus_session` is a user's session through Fooocus's input-image modes: text to image,
Vary (Subtle), Upscale (2x), Image Prompt, Inpaint (a box mask), each a request, on
tiny input-image networks written for `bench_base`'s UNet (`tests/helpers/
input_image_files.py`) and a deterministic random input picture of side/2 x side/2.

Two comparisons ride along in the same run:

* the peer: diffusers' own `StableDiffusionXLPipeline` on copies of `bench_base`'s
  modules (the same random weights), the LCM LoRA loaded and fused, the steady
  Extreme Speed request (same size, steps, seed), before any configuration patches
  anything; every configuration's steady total is also given as a ratio to it;
* compiled vs eager: `resident --compile-unet` (inductor on CUDA, aot_eager on the
  CPU) runs the `steady` and `lora_switch` scenarios; per-step time and the
  recompilations of the counted requests (switches included) come from the reports.

Run from the repo root: `python -m tests.benchmarks.harness --size mid --device cpu`.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import threading
import gc
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from PIL import Image

import args_manager
from ldm_patched.modules import model_management
from ldm_patched.modules.checkpoint import load_tokenizers
from ldm_patched.modules.file_version import FileVersion
from modules import config as config_module
from modules import compiled_unet, core, flags
from tests.benchmarks import models
from tests.helpers import input_image_files, pipelines

REPO_ROOT = Path(__file__).resolve().parents[2]
LORA_FILE = flags.LCM_LORA.file_name
CHECKPOINTS = {"bench_base.safetensors": ("base", 0), "bench_base2.safetensors": ("base", 1),
               "bench_refiner.safetensors": ("refiner", 0)}

# Configuration -> Fooocus flags (upstream default, upstream's best flag, ours).
CONFIGURATIONS: dict[str, list[str]] = {
    "conservative": [],
    "conservative --always-gpu": ["--always-gpu"],
    "resident": ["--keep-models-resident"],
    "resident --compile-unet": ["--keep-models-resident", "--compile-unet"],
    "resident --max-batch 1": ["--keep-models-resident", "--max-batch", "1"],
}
BASELINE = "conservative"
COMPILED = "resident --compile-unet"
EAGER = "resident"
UNBATCHED = "resident --max-batch 1"
THROUGHPUT = "throughput"
SCENARIOS = ("steady", "lora_switch", "base_switch", "refiner", "fooocus_session", THROUGHPUT)
SESSION = "fooocus_session"
# fooocus_session's cycle, in order; each counted request is labelled with its mode.
SESSION_MODES = ("text-to-image", "vary", "upscale", "image prompt", "inpaint")
MODE_KEY = "_bench_mode"   # a label in the harness's request dicts, removed before the pipeline sees them
INPUT_IMAGE_FOLDERS = ("upscale_models", "controlnet", "clip_vision", "inpaint")
# The compiled configuration runs what compares it with eager (per-step time, switches);
# every extra scenario would only add compiles of more modules and shapes.
CONFIGURATION_SCENARIOS: dict[str, tuple[str, ...]] = {COMPILED: ("steady", "lora_switch"),
                                                        UNBATCHED: (THROUGHPUT,)}
# Throughput compares UNet batches with one image at a time, both resident.
SCENARIO_CONFIGURATIONS: dict[str, tuple[str, ...]] = {THROUGHPUT: (EAGER, UNBATCHED)}
# throughput: concurrent clients, each sending its requests one after another, per performance.
THROUGHPUT_CLIENTS = 4
THROUGHPUT_PERFORMANCES = (flags.Performance.EXTREME_SPEED, flags.Performance.SPEED)
PEER = "diffusers StableDiffusionXLPipeline"
TIMINGS = ("total", "model_management", "text_encode", "sampling", "vae_decode", "save_images", "input_image",
           "other")
# The report's input-image stages, summed as `input_image` (0 for text to image).
INPUT_IMAGE_STAGES = ("upscale", "vae_encode", "image_prompt")
COUNTS = ("bytes_to_device", "bytes_to_offload", "weights_patched", "weights_restored", "weights_from_variants",
          "models_loaded", "models_unloaded", "lora_files_read", "text_encodes")
# LoRA files parsed in the file cache during `steady` (the LCM one and small others): ledger
# queries must not grow with what is cached (issue 19: under 1 ms of management with 50).
CACHED_LORA_FILES = 50
PROMPT = "a photograph of an astronaut riding a horse on the moon, detailed, sharp focus"
NEGATIVE = "blurry, low quality"


@dataclass
class BenchOptions:
    size: str = "mid"
    device: str = "cpu"
    repeats: int = 10                       # counted requests per scenario (after one warm-up pass;
                                            # fooocus_session: rounded up to whole rounds of its modes)
    out_dir: Path | None = None             # default: $BENCH_OUT or <repo>/bench_out
    seed: int = 1234
    scenarios: tuple[str, ...] = SCENARIOS
    configurations: tuple[str, ...] = tuple(CONFIGURATIONS)
    lora_rank: int | None = None            # default: the size's
    side: int | None = None                 # default: the size's
    speed_steps: int | None = None          # default: the size's
    peer: bool = True                       # run diffusers' pipeline as the peer row
    compile_backend: str | None = None      # default: inductor on CUDA, aot_eager on the CPU

    def spec(self) -> models.SizeSpec:
        return models.SIZES[self.size]

    def output_dir(self) -> Path:
        return Path(self.out_dir or os.environ.get("BENCH_OUT") or REPO_ROOT / "bench_out")

    def backend(self) -> str:
        return self.compile_backend or ("inductor" if self.device == "cuda" else "aot_eager")

    def request_side(self) -> int:
        return self.side or self.spec().side


def runs(name: str, scenario: str) -> bool:
    """Whether configuration `name` runs `scenario`."""
    return (scenario in CONFIGURATION_SCENARIOS.get(name, SCENARIOS)
            and name in SCENARIO_CONFIGURATIONS.get(scenario, CONFIGURATIONS))


# -- flags -> settings --------------------------------------------------------------------

def configuration_flags(name: str, device: str) -> list[str]:
    """The command-line flags of a configuration on `device`.

    On a CPU run `--always-cpu` picks the CPU even where CUDA exists; `--always-gpu`
    is dropped there (the two exclude each other, and without a GPU it changes
    nothing: settings_from_args gives VRAMState.DISABLED, offload device = CPU)."""
    wanted = list(CONFIGURATIONS[name])
    if device == "cpu":
        return ["--always-cpu"] + [f for f in wanted if f != "--always-gpu"]
    return wanted


def compile_settings_for(name: str, options: BenchOptions) -> compiled_unet.CompileSettings:
    """--compile-unet configurations, with the run's backend; the others run eager."""
    wanted = configuration_flags(name, options.device)
    if "--compile-unet" in wanted:
        wanted += ["--compile-backend", options.backend()]
    return compiled_unet.settings_from_args(args_manager.parse_args(wanted))


def configuration_args(name: str, device: str):
    return args_manager.parse_args(configuration_flags(name, device))


def settings_for(name: str, device: str) -> model_management.MemorySettings:
    settings = model_management.settings_from_args(configuration_args(name, device))
    if settings.device.type != torch.device(device).type:
        raise RuntimeError(f"configuration {name!r} resolved to {settings.device}, not {device}")
    return settings


# -- set-up --------------------------------------------------------------------------------

@dataclass
class BuiltModels:
    """Models built once per run; re-adopted by each configuration."""

    checkpoints: dict[str, tuple[str, dict[str, torch.nn.Module | None]]]
    tokenizers: tuple
    lora_keys: int
    lora_bytes: int
    parameters: dict[str, int]
    dtypes: models.Dtypes
    cached_loras: list[Path]   # read into the LoRA file cache before `steady` (with the LCM file: 50)

    def modules(self) -> Iterator[torch.nn.Module]:
        for _, parts in self.checkpoints.values():
            yield from (m for m in parts.values() if m is not None)


def build_models(options: BenchOptions, folders: dict[str, Path]) -> BuiltModels:
    spec, device = options.spec(), torch.device(options.device)
    manager = model_management.configure(settings_for(BASELINE, options.device))
    dtypes = models.Dtypes(unet=manager.dtype_for("unet"), text_encoder=manager.dtype_for("text_encoder"),
                           vae=manager.dtype_for("vae", manager.vae_device()))
    checkpoints = {}
    for name, (kind, seed) in CHECKPOINTS.items():
        parts = models.build_checkpoint(spec, device, dtypes, options.seed + seed, refiner=kind == "refiner")
        checkpoints[name] = (kind, parts)
        (folders["checkpoints"] / name).touch()   # placeholder: only its file id is used
    lora_path = folders["loras"] / LORA_FILE
    factor_dtype = torch.float16 if device.type == "cuda" else torch.float32
    keys = models.write_lcm_shaped_lora(checkpoints["bench_base.safetensors"][1]["unet"], lora_path,
                                        options.lora_rank or spec.lora_rank, factor_dtype)
    cached = models.write_cached_loras(checkpoints["bench_base.safetensors"][1]["unet"], folders["loras"],
                                       CACHED_LORA_FILES - 1, factor_dtype)
    # fooocus_session's networks (upscaler, IP-Adapter + CLIP vision, inpaint patch + head),
    # shaped for bench_base's UNet; the builders read only its shapes (any device) and
    # write float32 CPU tensors, as the loaders cast to the configuration's dtypes.
    if SESSION in options.scenarios:
        input_image_files.write_all(folders, checkpoints["bench_base.safetensors"][1]["unet"])
    return BuiltModels(checkpoints=checkpoints, tokenizers=load_tokenizers(), lora_keys=keys,
                       lora_bytes=lora_path.stat().st_size, dtypes=dtypes, cached_loras=cached,
                       parameters={n: models.parameter_count(p) for n, (_, p) in checkpoints.items()})


@contextmanager
def bench_folders(root: Path, side: int | None = None) -> Iterator[dict[str, Path]]:
    """checkpoints/loras/outputs and the input-image model folders under `root`, made the
    process's config for the run; `side`: config key image_input_side (the run's request
    side, so Vary, Upscale and Inpaint work at the size text to image does)."""
    folders = {name: root / name for name in ("checkpoints", "loras", "outputs", *INPUT_IMAGE_FOLDERS)}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    config_file = root / "config.txt"
    config: dict[str, Any] = {f"path_{n}": str(p) for n, p in folders.items()}
    if side is not None:
        config["image_input_side"] = side
    config_file.write_text(json.dumps(config))
    previous_env, previous_pipeline = os.environ.get("config_path"), pipelines.current()
    os.environ["config_path"] = str(config_file)
    config_module.reload_config()
    try:
        yield folders
    finally:
        if previous_env is None:
            os.environ.pop("config_path", None)
        else:
            os.environ["config_path"] = previous_env
        config_module.reload_config()
        pipelines.install(previous_pipeline)


def install_configuration(name: str, options: BenchOptions, built: BuiltModels,
                          folders: dict[str, Path]) -> model_management.ModelManager:
    """configure() (it unloads everything), then every module on the new offload device
    and the three checkpoints adopted afresh: each configuration starts the same way."""
    manager = model_management.configure(settings_for(name, options.device))
    core.configure_compile(compile_settings_for(name, options))
    offload = manager.offload_device()
    for module in built.modules():
        module.to(offload)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    pipeline = pipelines.install()
    # --max-batch reaches the pipeline through its config, as launch's flags do.
    cfg = dataclasses.replace(config_module.get_config(), max_batch=configuration_args(name, options.device).max_batch)
    pipeline.config = lambda: cfg
    pipeline.catalogue.state.max_checkpoints = 8
    for file_name, (kind, parts) in built.checkpoints.items():
        pipeline.catalogue.adopt_checkpoint(FileVersion.of(str(folders["checkpoints"] / file_name)), kind,
                                  parts, built.tokenizers)
    return manager


# -- scenarios ------------------------------------------------------------------------------

def fill_lora_cache(built: BuiltModels) -> None:
    """Parse the small LoRA files into the pipeline's file cache (no request, nothing counted)."""
    files = pipelines.current().catalogue.state.lora_files
    for path in built.cached_loras:
        files.get(str(path))


def base_request(options: BenchOptions, performance: flags.Performance,
                 base: str = "bench_base.safetensors") -> dict[str, Any]:
    spec = options.spec()
    request = {"prompt": PROMPT, "negative_prompt": NEGATIVE, "performance": performance.value,
               "width": options.side or spec.side, "height": options.side or spec.side, "seed": options.seed,
               "image_number": 1, "base_model": base, "loras": [], "refiner_model": flags.NONE_NAME,
               "sampler": flags.DEFAULT_SAMPLER, "scheduler": flags.DEFAULT_SCHEDULER, "guidance_scale": 4.0}
    if performance is flags.Performance.SPEED:
        request["steps"] = options.speed_steps or spec.speed_steps
    return request


def scenario_cycle(scenario: str, options: BenchOptions) -> list[dict[str, Any]]:
    """The distinct requests a scenario repeats, in order."""
    xs, speed = flags.Performance.EXTREME_SPEED, flags.Performance.SPEED
    if scenario == "steady":
        return [base_request(options, xs)]
    if scenario == "lora_switch":   # the LCM LoRA goes on and off every request
        return [base_request(options, xs), base_request(options, speed)]
    if scenario == "base_switch":
        return [base_request(options, xs, "bench_base.safetensors"),
                base_request(options, xs, "bench_base2.safetensors")]
    if scenario == "refiner":
        return [{**base_request(options, speed), "refiner_model": "bench_refiner.safetensors",
                 "refiner_switch": 0.5}]
    if scenario == SESSION:
        return session_cycle(options)
    raise ValueError(f"unknown scenario {scenario!r}; known: {', '.join(SCENARIOS)}")


def session_input_side(options: BenchOptions) -> int:
    """The input picture's side: side/2 (mid 128, sdxl 512), at least 64. Vary keeps an
    input whose shape ceil (a multiple of 64) is already image_input_side, so a 32 px input
    at the tiny size would be re-diffused at 32 px: a 4x4 latent, smaller than the
    sharpness filter's 13-wide window (it fails). Tiny therefore uses 64 (Upscale (2x): 128)."""
    return max(options.request_side() // 2, 64)


def session_cycle(options: BenchOptions) -> list[dict[str, Any]]:
    """fooocus_session: Fooocus's default performance (Speed, steps capped as elsewhere),
    one request per mode of SESSION_MODES. The input is a deterministic random picture of
    side/2 x side/2 (`session_input_side`): Vary generates at its shape ceil clamped to
    image_input_side (= side), Upscale (2x) gives side x side, Inpaint's crop around the
    box is generated at side and pasted back into the input."""
    half = session_input_side(options)
    image = input_image_files.png64(input_image_files.picture(half, half, seed=options.seed))
    mask = input_image_files.png64(input_image_files.box_mask(half, half, (half // 4, half // 4,
                                                                            half // 2, half // 2)))
    extras = {"text-to-image": {},
              "vary": {"input_image": image, "uov_method": "Vary (Subtle)"},
              "upscale": {"input_image": image, "uov_method": "Upscale (2x)"},
              "image prompt": {"image_prompts": [[image, 0.5, 0.6, "ImagePrompt"]]},
              "inpaint": {"input_image": image, "inpaint_mask": mask}}
    speed = base_request(options, flags.Performance.SPEED)
    return [{**speed, **extras[mode], MODE_KEY: mode} for mode in SESSION_MODES]


def counted_requests(scenario: str, options: BenchOptions) -> int:
    """`repeats`; for fooocus_session rounded up to whole rounds, so every mode is counted
    equally often (a dry run with repeats=2 counts one round of 5); for throughput every
    client's requests of every performance."""
    if scenario == THROUGHPUT:
        return THROUGHPUT_CLIENTS * throughput_requests_per_client(options) * len(THROUGHPUT_PERFORMANCES)
    if scenario != SESSION:
        return options.repeats
    modes = len(SESSION_MODES)
    return max(1, -(-options.repeats // modes)) * modes


def scenario_requests(scenario: str, options: BenchOptions) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(uncounted warm-up, counted requests).

    The warm-up is one pass over the cycle (one request; two for the switch scenarios,
    five for fooocus_session), so every model of the scenario has been through its states
    once and the first counted request is already a switch, whatever ran before."""
    cycle = scenario_cycle(scenario, options)
    return [dict(r) for r in cycle], [dict(cycle[i % len(cycle)])
                                      for i in range(counted_requests(scenario, options))]


def run_request(request: dict[str, Any]) -> dict[str, Any]:
    """One request through the pipeline; the benchmark fails on any request error."""
    request = dict(request)
    mode = request.pop(MODE_KEY, None)
    return request_numbers(pipelines.process_request(request), mode)


def request_numbers(result, mode: str | None = None) -> dict[str, Any]:
    """What the benchmark keeps of one request's result (its report; its images' paths)."""
    report = result.report
    if "error" in report:
        raise RuntimeError(f"benchmark request failed: {report['error']}")
    timings = dict(report["timings_ms"])
    timings["input_image"] = sum(timings.get(k, 0.0) for k in INPUT_IMAGE_STAGES)
    # Whatever the stages do not cover: request parsing, end-of-request trim, the report.
    timings["other"] = timings["total"] - sum(timings[k] for k in TIMINGS[1:-1])
    compiled = report["compile"]
    return {"mode": mode, "performance": report["performance"], "base_model": report["base_model"],
            "refiner_model": report.get("refiner_model"), "lora_on": bool(report["loras"]),
            "timings_ms": timings, "steps": report["steps"], "image_size": _image_size(result.images[0]),
            "step_ms": timings["sampling"] / report["steps"], "image": result.images[0],
            "compile": {k: compiled[k] for k in ("ran_compiled", "graphs_compiled", "recompilations",
                                                 "compile_ms")},
            "model_management": {k: int(report["model_management"][k]) for k in COUNTS},
            "unet_calls": int(report["unet_calls"]), "unet_rows_per_call": dict(report["unet_rows_per_call"]),
            "peak_allocated_bytes": int(report["vram"]["peak_allocated_bytes"]),
            "resident_bytes": int(report["vram"]["resident_bytes"])}


def _image_size(path: str) -> list[int]:
    """(width, height) of a written image (its header only); the files go with the run's folder."""
    with Image.open(path) as image:
        return list(image.size)


# -- throughput: concurrent clients through the worker ----------------------------------------

def throughput_requests_per_client(options: BenchOptions) -> int:
    return max(1, -(-options.repeats // THROUGHPUT_CLIENTS))


def throughput_requests(options: BenchOptions, performance: flags.Performance) -> list[list[dict[str, Any]]]:
    """Per client, its requests: the same models and size, each with its own prompt and seed
    (compatible requests: the worker may batch them)."""
    per_client = throughput_requests_per_client(options)
    base = base_request(options, performance)
    return [[{**base, "prompt": f"{PROMPT}, client {k}, request {m}", "seed": options.seed + k * per_client + m}
             for m in range(per_client)] for k in range(THROUGHPUT_CLIENTS)]


def run_throughput(options: BenchOptions, log: Callable[[str], None]) -> dict[str, Any]:
    """THROUGHPUT_CLIENTS client threads submit to the real worker (the configuration's
    pipeline, --max-batch from its flags), each its requests one after another. Per
    performance: one uncounted warm-up request, then a round that starts with every client's
    first request queued (the worker is held until then). Latency: submit to result."""
    from modules.async_worker import Worker

    pipeline = pipelines.current()
    worker = Worker(pipeline_factory=lambda: pipeline, max_batch=pipeline.config().max_batch)
    rounds, requests, warmed = {}, [], []
    try:
        for performance in THROUGHPUT_PERFORMANCES:
            warmed.append(request_numbers(worker.submit(base_request(options, performance)).result()))
            numbers, wall_s, calls = _throughput_round(worker, throughput_requests(options, performance))
            requests += numbers
            rounds[performance.value] = _throughput_summary(numbers, wall_s, calls)
            log(f"[bench]   throughput {performance.value}: {rounds[performance.value]['images_per_s']:.2f} "
                f"images/s, latency p50 {rounds[performance.value]['latency_ms']['p50']:.0f} ms")
    finally:
        worker.shutdown()
    return {**summarize(requests), "per_performance": rounds, "clients": THROUGHPUT_CLIENTS,
            "requests_per_client": throughput_requests_per_client(options), "warmup": warmed,
            "warmup_compile": compile_totals(warmed)}


def _throughput_round(worker, per_client: list[list[dict[str, Any]]]) -> tuple[list[dict[str, Any]], float, int]:
    """(each request's numbers, the round's wall time in s, the UNet calls it made)."""
    held, queued = threading.Event(), threading.Barrier(len(per_client) + 1)
    numbers: list[dict[str, Any]] = []
    lock = threading.Lock()

    def client(requests: list[dict[str, Any]]) -> None:
        for i, request in enumerate(requests):
            submitted = time_ms()
            task = worker.submit(request)
            if i == 0:
                queued.wait()
            result = task.result()
            with lock:
                numbers.append({**request_numbers(result), "latency_ms": time_ms() - submitted})

    worker.call(lambda: held.wait())
    threads = [threading.Thread(target=client, args=(requests,)) for requests in per_client]
    for thread in threads:
        thread.start()
    queued.wait()   # every client's first request is in the queue
    calls = core.UNET_CALLS.mark()
    started = time_ms()
    held.set()
    for thread in threads:
        thread.join()
    return numbers, (time_ms() - started) / 1000, core.UNET_CALLS.since(calls).calls


def _throughput_summary(numbers: list[dict[str, Any]], wall_s: float, unet_calls: int) -> dict[str, Any]:
    latencies = [n["latency_ms"] for n in numbers]
    return {"requests": len(numbers), "images": len(numbers), "wall_s": wall_s,
            "images_per_s": len(numbers) / wall_s if wall_s > 0 else 0.0,
            "latency_ms": {"p50": percentile(latencies, 50), "p95": percentile(latencies, 95)},
            "unet_calls": unet_calls, "steps": numbers[0]["steps"],
            "largest_unet_batch_rows": max(int(rows) for n in numbers for rows in n["unet_rows_per_call"])}


# -- statistics -----------------------------------------------------------------------------

def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), q in [0, 100]."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(requests: list[dict[str, Any]]) -> dict[str, Any]:
    timings = {k: {"median": statistics.median(r["timings_ms"][k] for r in requests),
                   "p90": percentile([r["timings_ms"][k] for r in requests], 90)} for k in TIMINGS}
    counts = {k: {"sum": sum(r["model_management"][k] for r in requests),
                  "median": statistics.median(r["model_management"][k] for r in requests)} for k in COUNTS}
    steps = [r["step_ms"] for r in requests]
    return {"timings_ms": timings, "counts": counts,
            "step_ms": {"median": statistics.median(steps), "p90": percentile(steps, 90)},
            "compile": compile_totals(requests),
            "peak_allocated_bytes": max(r["peak_allocated_bytes"] for r in requests),
            "requests": requests}


def per_mode_summaries(requests: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """fooocus_session's counted requests summarized per mode (their raw numbers stay in
    the scenario's `requests`)."""
    out = {}
    for mode in SESSION_MODES:
        of_mode = [r for r in requests if r["mode"] == mode]
        if of_mode:
            out[mode] = {k: v for k, v in summarize(of_mode).items() if k != "requests"}
            out[mode]["count"] = len(of_mode)
    return out


def compile_totals(requests: list[dict[str, Any]]) -> dict[str, Any]:
    """How many requests ran compiled, and what they compiled (sums)."""
    return {"ran_compiled": sum(r["compile"]["ran_compiled"] for r in requests),
            **{k: sum(r["compile"][k] for r in requests) for k in ("graphs_compiled", "recompilations",
                                                                     "compile_ms")}}


def add_ratios(results: dict[str, dict[str, dict[str, Any]]]) -> None:
    """Median total and median model-management time against the conservative default."""
    for per_config in results.values():
        baseline = per_config.get(BASELINE)
        for summary in per_config.values():
            for metric in ("total", "model_management"):
                ours = summary["timings_ms"][metric]["median"]
                theirs = baseline["timings_ms"][metric]["median"] if baseline else 0.0
                summary[f"ratio_{metric}"] = ours / theirs if theirs > 0 else None


def add_peer_ratios(document: dict[str, Any]) -> None:
    """Each configuration's steady median total against the peer's (same request)."""
    peer = document.get("peer")
    for summary in document["results"].get("steady", {}).values():
        theirs = peer["timings_ms"]["total"]["median"] if peer else 0.0
        summary["ratio_total_vs_peer"] = summary["timings_ms"]["total"]["median"] / theirs if theirs > 0 else None


def add_lora_switch_cost(results: dict[str, dict[str, dict[str, Any]]]) -> None:
    """Switch-on requests' median total minus the steady state's (same request, LoRA already on).

    The report's model-management time does not wait for queued GPU kernels, so on CUDA
    part of a switch can show up in the next stage; the end-to-end difference cannot hide it."""
    for name, summary in results.get("lora_switch", {}).items():
        steady = results.get("steady", {}).get(name)
        switch_on = [r["timings_ms"]["total"] for r in summary["requests"] if r["lora_on"]]
        if steady and switch_on:
            summary["switch_on_extra_ms"] = statistics.median(switch_on) - steady["timings_ms"]["total"]["median"]


# -- the run ----------------------------------------------------------------------------------

def run_benchmark(options: BenchOptions, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Build, run every configuration x scenario, write results.json/results.md; returns the results."""
    out = options.output_dir()
    out.mkdir(parents=True, exist_ok=True)
    document: dict[str, Any] = {"machine": machine_info(options.device), "options": _options_json(options),
                                "results": {}}
    with tempfile.TemporaryDirectory(prefix="fooocus_bench_") as tmp, \
            bench_folders(Path(tmp), side=options.request_side()) as folders:
        built = build_models(options, folders)
        document["models"] = {"parameters": built.parameters, "dtypes": {k: str(v) for k, v in
                                                                          asdict(built.dtypes).items()},
                              "lora": {"file": LORA_FILE, "keys": built.lora_keys, "bytes": built.lora_bytes,
                                       "rank": options.lora_rank or options.spec().lora_rank}}
        log(f"[bench] built {options.size} models on {options.device}: {built.parameters}; "
            f"LoRA {built.lora_keys} keys, {built.lora_bytes / 2**20:.0f} MiB")
        peer_image = None
        if options.peer:   # first: nothing has patched the modules it copies yet
            document["peer"], peer_image = run_peer(options, built, folders["loras"] / LORA_FILE)
            log(f"[bench] peer {PEER}: median total {document['peer']['timings_ms']['total']['median']:.1f} ms")
        try:
            for name in options.configurations:
                _run_configuration(name, options, built, folders, document, log)
                write_outputs(document, out)   # partial results survive a run cut short
            if peer_image is not None:
                compare_with_peer(document, peer_image)
        finally:
            model_management.get_manager().unload_all()
            if any(compile_settings_for(n, options).enabled for n in options.configurations):
                torch._dynamo.reset()   # the run's modules and shapes leave no cache entries behind
            core.configure_compile(compiled_unet.CompileSettings())
    add_ratios(document["results"])
    add_peer_ratios(document)
    add_lora_switch_cost(document["results"])
    write_outputs(document, out)
    log(markdown_table(document))
    return document


def _run_configuration(name: str, options: BenchOptions, built: BuiltModels, folders: dict[str, Path],
                       document: dict[str, Any], log: Callable[[str], None]) -> None:
    manager = install_configuration(name, options, built, folders)
    log(f"[bench] configuration {name!r}: flags {configuration_flags(name, options.device)}, "
        f"policy={manager.settings.policy.value}, vram_state={manager.settings.vram_state.name}, "
        f"budget={manager.settings.budget_bytes / 2**30:.1f} GiB")
    for scenario in (s for s in options.scenarios if runs(name, s)):
        if scenario == THROUGHPUT:
            summary = run_throughput(options, log)
            document["results"].setdefault(scenario, {})[name] = summary
            continue
        warmup, counted = scenario_requests(scenario, options)
        if scenario == "steady":
            fill_lora_cache(built)
        warmed = [run_request(r) for r in warmup]
        summary = summarize([run_request(r) for r in counted])
        if scenario == "steady":
            summary["cached_lora_files"] = len(pipelines.current().catalogue.state.lora_files)
        if scenario == SESSION:   # the modes cost very different amounts: also summarized one by one
            summary["per_mode"] = per_mode_summaries(summary["requests"])
        summary["warmup"] = warmed
        summary["warmup_compile"] = compile_totals(warmed)
        document["results"].setdefault(scenario, {})[name] = summary
        log(f"[bench]   {scenario}: median total {summary['timings_ms']['total']['median']:.1f} ms, "
            f"model management {summary['timings_ms']['model_management']['median']:.2f} ms")


def _options_json(options: BenchOptions) -> dict[str, Any]:
    spec = options.spec()
    return {"size": options.size, "device": options.device, "repeats": options.repeats, "seed": options.seed,
            "scenarios": list(options.scenarios), "configurations": list(options.configurations),
            "flags": {n: configuration_flags(n, options.device) for n in options.configurations},
            "side": options.side or spec.side, "speed_steps": options.speed_steps or spec.speed_steps,
            "counted_requests": {s: counted_requests(s, options) for s in options.scenarios},
            "session_input_side": session_input_side(options),
            "throughput": {"clients": THROUGHPUT_CLIENTS, "requests_per_client": throughput_requests_per_client(options),
                           "performances": [p.value for p in THROUGHPUT_PERFORMANCES]},
            "session_modes": list(SESSION_MODES),
            "peer": options.peer, "compile_backend": options.backend(),
            "extreme_speed_steps": flags.performance_settings(flags.Performance.EXTREME_SPEED).steps}


# -- the peer: diffusers' own pipeline ---------------------------------------------------------

def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_peer(options: BenchOptions, built: BuiltModels, lora_path: Path) -> tuple[dict[str, Any], np.ndarray]:
    """`StableDiffusionXLPipeline` on copies of bench_base's modules (the same weights; the
    copies keep the LoRA fuse away from the modules our configurations patch), the LCM LoRA
    loaded with `load_lora_weights` and fused, then the steady Extreme Speed request: one
    uncounted warm-up and `repeats` counted calls. Returns the summary and the last image."""
    from diffusers import StableDiffusionXLPipeline

    device = torch.device(options.device)
    parts = {k: copy.deepcopy(v).to(device) for k, v in built.checkpoints["bench_base.safetensors"][1].items()}
    settings = flags.performance_settings(flags.Performance.EXTREME_SPEED)
    pipe = StableDiffusionXLPipeline(vae=parts["vae"], text_encoder=parts["text_encoder"],
                                     text_encoder_2=parts["text_encoder_2"], tokenizer=built.tokenizers[0],
                                     tokenizer_2=built.tokenizers[1], unet=parts["unet"],
                                     scheduler=core.make_scheduler(settings.sampler, settings.scheduler))
    pipe.set_progress_bar_config(disable=True)
    _synchronize(device)
    started = time_ms()
    pipe.load_lora_weights(str(lora_path), adapter_name="lcm")
    pipe.fuse_lora()
    pipe.unload_lora_weights()   # the fused weights stay; the adapter layers go
    _synchronize(device)
    setup_ms = time_ms() - started
    side = options.side or options.spec().side

    def once() -> tuple[float, np.ndarray]:
        _synchronize(device)
        begin = time_ms()
        with torch.inference_mode():
            image = pipe(prompt=PROMPT, negative_prompt=NEGATIVE, width=side, height=side,
                         num_inference_steps=settings.steps, guidance_scale=settings.cfg_scale,
                         generator=torch.Generator("cpu").manual_seed(options.seed), output_type="np").images[0]
        _synchronize(device)
        return time_ms() - begin, image

    once()
    counted = [once() for _ in range(options.repeats)]
    totals = [ms for ms, _ in counted]
    summary = {"name": PEER, "steps": settings.steps, "lora_load_and_fuse_ms": setup_ms,
               "timings_ms": {"total": {"median": statistics.median(totals), "p90": percentile(totals, 90)}},
               "requests": [{"total_ms": ms} for ms in totals]}
    image = counted[-1][1]
    del pipe, parts
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return summary, image


def time_ms() -> float:
    return time.perf_counter() * 1000


def compare_with_peer(document: dict[str, Any], peer_image: np.ndarray) -> None:
    """Largest pixel difference (0-255) between the peer's image and ours for the same
    request: the comparison is only fair if both draw the same picture."""
    for name, summary in document["results"].get("steady", {}).items():
        ours = np.asarray(Image.open(summary["requests"][-1]["image"]).convert("RGB")).astype(np.int16)
        theirs = np.round(peer_image * 255).astype(np.int16)
        summary["max_pixel_diff_vs_peer"] = int(np.abs(ours - theirs).max())


# -- machine ----------------------------------------------------------------------------------

def machine_info(device: str) -> dict[str, Any]:
    info = {"cpu": _cpu_model(), "cpu_cores": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "git_commit": _git_commit(), "device": device}
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_bytes=props.total_memory, cuda=torch.version.cuda)
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_commit() -> str:
    """Short HEAD, with '+dirty' for uncommitted changes; $BENCH_GIT_COMMIT where there is no .git."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("BENCH_GIT_COMMIT", "unknown")


# -- output -----------------------------------------------------------------------------------

TABLE_HEADER = ("| scenario | configuration | total ms (med / p90) | model mgmt ms (med / p90) | text enc ms "
                "| sampling ms | VAE ms | save ms | other ms | MiB to device (med / sum) | MiB offloaded (med / sum) "
                "| patched (med / sum) | restored (med / sum) | loaded (med) | peak MiB | total vs cons. "
                "| mgmt vs cons. |")


def _mib(value: float) -> str:
    return f"{value / 2**20:.0f}" if value >= 2**20 or value == 0 else f"{value / 2**20:.2f}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def table_row(scenario: str, name: str, s: dict[str, Any]) -> str:
    t, c = s["timings_ms"], s["counts"]
    cells = [scenario, name,
             f"{t['total']['median']:.1f} / {t['total']['p90']:.1f}",
             f"{t['model_management']['median']:.2f} / {t['model_management']['p90']:.2f}",
             f"{t['text_encode']['median']:.1f}", f"{t['sampling']['median']:.1f}",
             f"{t['vae_decode']['median']:.1f}", f"{t['save_images']['median']:.1f}",
             f"{t['other']['median']:.1f}",
             f"{_mib(c['bytes_to_device']['median'])} / {_mib(c['bytes_to_device']['sum'])}",
             f"{_mib(c['bytes_to_offload']['median'])} / {_mib(c['bytes_to_offload']['sum'])}",
             f"{c['weights_patched']['median']:g} / {c['weights_patched']['sum']}",
             f"{c['weights_restored']['median']:g} / {c['weights_restored']['sum']}",
             f"{c['models_loaded']['median']:g}", _mib(s["peak_allocated_bytes"]),
             _ratio(s.get("ratio_total")), _ratio(s.get("ratio_model_management"))]
    return "| " + " | ".join(cells) + " |"


def markdown_table(document: dict[str, Any]) -> str:
    lines = [TABLE_HEADER, "|" + " --- |" * TABLE_HEADER.count(" | ") + " --- |"]
    for scenario, per_config in document["results"].items():
        for name, summary in per_config.items():
            lines.append(table_row(scenario, name, summary))
    return "\n".join(lines)


def markdown_report(document: dict[str, Any]) -> str:
    m, o, lora = document["machine"], document["options"], document["models"]["lora"]
    where = m.get("gpu") or m["cpu"]
    lines = [f"# Benchmark: {o['size']} models on {o['device']} ({where})", "",
             f"- date {m['date']}, git {m['git_commit']}, torch {m['torch']}, CPU {m['cpu']} x{m['cpu_cores']}",
             f"- requests {o['side']}x{o['side']}, Extreme Speed {o['extreme_speed_steps']} steps (lcm), "
             f"Speed {o['speed_steps']} steps; {o['repeats']} counted requests per scenario after an uncounted warm-up pass",
             f"- parameters per checkpoint {document['models']['parameters']}, dtypes {document['models']['dtypes']}",
             f"- LoRA {lora['file']}: rank {lora['rank']}, {lora['keys']} UNet keys, {lora['bytes'] / 2**20:.0f} MiB",
             "", markdown_table(document), ""]
    switch = {n: s.get("switch_on_extra_ms") for n, s in document["results"].get("lora_switch", {}).items()}
    if any(v is not None for v in switch.values()):
        lines.append("LoRA switch-on, median total minus steady-state median total (ms): "
                     + ", ".join(f"{n} {v:.1f}" for n, v in switch.items() if v is not None))
    lines += ["", *session_table(document), "", *peer_table(document), "", *compile_table(document), "",
              *throughput_table(document)]
    return "\n".join(lines) + "\n"


PEER_HEADER = "| steady, Extreme Speed | total ms (med / p90) | vs peer | max pixel diff vs peer |"
COMPILE_HEADER = ("| scenario | configuration | step ms (med / p90) | sampling ms | requests compiled "
                  "| graphs compiled (warm-up / counted) | recompilations (counted) | compile ms (warm-up) |")


SESSION_HEADER = ("| fooocus_session mode | configuration | total ms (med / p90) | model mgmt ms (med / p90) "
                  "| input-image ms | sampling ms | MiB to device (sum) | MiB offloaded (sum) | loaded (med) "
                  "| patched (med / sum) | from variants (sum) | restored (sum) |")


def session_table(document: dict[str, Any]) -> list[str]:
    """fooocus_session per mode and configuration; counts are per request (med) or over
    the mode's counted requests (sum)."""
    per_config = document["results"].get(SESSION, {})
    lines = [SESSION_HEADER, "|" + " --- |" * SESSION_HEADER.count(" | ") + " --- |"]
    for mode in SESSION_MODES:
        for name, summary in per_config.items():
            s = summary.get("per_mode", {}).get(mode)
            if s is None:
                continue
            t, c = s["timings_ms"], s["counts"]
            lines.append(
                f"| {mode} | {name} | {t['total']['median']:.1f} / {t['total']['p90']:.1f} "
                f"| {t['model_management']['median']:.2f} / {t['model_management']['p90']:.2f} "
                f"| {t['input_image']['median']:.1f} | {t['sampling']['median']:.1f} "
                f"| {_mib(c['bytes_to_device']['sum'])} | {_mib(c['bytes_to_offload']['sum'])} "
                f"| {c['models_loaded']['median']:g} "
                f"| {c['weights_patched']['median']:g} / {c['weights_patched']['sum']} "
                f"| {c['weights_from_variants']['sum']} | {c['weights_restored']['sum']} |")
    return lines if len(lines) > 2 else []


THROUGHPUT_HEADER = ("| throughput | configuration | clients x requests | wall s | images/s | latency p50 / p95 ms "
                     "| UNet calls (steps x requests) | largest UNet batch (rows) | images/s vs --max-batch 1 |")


def throughput_table(document: dict[str, Any]) -> list[str]:
    per_config = document["results"].get(THROUGHPUT, {})
    lines = [THROUGHPUT_HEADER, "|" + " --- |" * THROUGHPUT_HEADER.count(" | ") + " --- |"]
    for performance in (p.value for p in THROUGHPUT_PERFORMANCES):
        unbatched = per_config.get(UNBATCHED, {}).get("per_performance", {}).get(performance)
        for name, summary in per_config.items():
            r = summary["per_performance"][performance]
            ratio = r["images_per_s"] / unbatched["images_per_s"] if unbatched and unbatched["images_per_s"] else None
            lines.append(f"| {performance} | {name} | {summary['clients']} x {summary['requests_per_client']} "
                         f"| {r['wall_s']:.1f} | {r['images_per_s']:.2f} "
                         f"| {r['latency_ms']['p50']:.0f} / {r['latency_ms']['p95']:.0f} "
                         f"| {r['unet_calls']} ({r['steps'] * r['requests']}) | {r['largest_unet_batch_rows']} "
                         f"| {_ratio(ratio)} |")
    return lines if len(lines) > 2 else []


def peer_table(document: dict[str, Any]) -> list[str]:
    peer = document.get("peer")
    if not peer:
        return []
    total = peer["timings_ms"]["total"]
    lines = [PEER_HEADER, "| --- | --- | --- | --- |",
             f"| {PEER} (LCM LoRA fused in {peer['lora_load_and_fuse_ms']:.0f} ms) "
             f"| {total['median']:.1f} / {total['p90']:.1f} | 1.000 | 0 |"]
    for name, s in document["results"].get("steady", {}).items():
        t = s["timings_ms"]["total"]
        diff = s.get("max_pixel_diff_vs_peer")
        lines.append(f"| {name} | {t['median']:.1f} / {t['p90']:.1f} | {_ratio(s.get('ratio_total_vs_peer'))} "
                     f"| {'-' if diff is None else diff} |")
    return lines


def compile_table(document: dict[str, Any]) -> list[str]:
    lines = [COMPILE_HEADER, "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for scenario in CONFIGURATION_SCENARIOS[COMPILED]:
        for name in (EAGER, COMPILED):
            s = document["results"].get(scenario, {}).get(name)
            if s is None:
                continue
            warm, counted = s["warmup_compile"], s["compile"]
            lines.append(f"| {scenario} | {name} | {s['step_ms']['median']:.2f} / {s['step_ms']['p90']:.2f} "
                         f"| {s['timings_ms']['sampling']['median']:.1f} "
                         f"| {counted['ran_compiled']} / {len(s['requests'])} "
                         f"| {warm['graphs_compiled']} / {counted['graphs_compiled']} | {counted['recompilations']} "
                         f"| {warm['compile_ms']:.0f} |")
    return lines if len(lines) > 2 else []


def write_outputs(document: dict[str, Any], out: Path) -> None:
    (out / "results.json").write_text(json.dumps(document, indent=1, default=str))
    if document["results"]:
        (out / "results.md").write_text(markdown_report(document))


# -- command line -------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(models.SIZES), default="mid")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    parser.add_argument("--configurations", nargs="+", choices=list(CONFIGURATIONS), default=list(CONFIGURATIONS))
    parser.add_argument("--no-peer", action="store_true", help="skip diffusers' pipeline")
    parser.add_argument("--compile-backend", default=None,
                        help="backend of the --compile-unet configuration (default: inductor on CUDA, "
                             "aot_eager on the CPU)")
    args = parser.parse_args(argv)
    run_benchmark(BenchOptions(size=args.size, device=args.device, repeats=args.repeats, out_dir=args.out,
                               scenarios=tuple(args.scenarios), configurations=tuple(args.configurations),
                               peer=not args.no_peer, compile_backend=args.compile_backend))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
