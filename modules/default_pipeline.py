"""The pipeline: one request (or a batch of compatible ones) end to end.

`Pipeline` runs requests through their stages: resolve, patch, encode, sample, decode,
save. What outlives a request (loaded checkpoints, parsed LoRA files, the patchers of
recent LoRA sets, encoded prompts, standalone VAEs, input-image models) is its
`catalogue` (`modules/model_catalogue.py`). The worker thread owns it
(`modules/runtime.py` makes the process's one); nothing else touches its state, so it
needs no locks.

Nothing here moves or patches weights: `core` asks `model_management.load_models_gpu`
for that before each stage.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import datetime
import logging
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from ldm_patched.modules import model_management, telemetry
from ldm_patched.modules.checkpoint import CheckpointError
from ldm_patched.modules.lora import LoraError
from ldm_patched.modules.model_patcher import ModelPatcher
from modules import config as config_module
from modules import (controlnet, core, flags, freeu, guidance, history_log, image_inputs, image_output, ip_adapter,
                     parameters, preprocessors, presets, sdxl_styles, upscaler, wildcards)
from modules import inpaint as inpaint_mod
from modules.generation_request import (DEMO_CHECKPOINT_NAME, MAX_IMAGES, MAX_SEED, MAX_SIDE, GenerationRequest,
                                        check_cost, check_lora_weight, check_prompt_tokens, model_name, preset_config,
                                        resolve_checkpoint, resolve_lora, scrub_paths, split_lora_tags)
from modules.model_catalogue import LoadedCheckpoint, ModelCatalogue, PatchedModels, joined_conditioning
from modules.task_types import BatchKey, ProgressEvent, RequestError, RequestResult, StopRequested, TaskControl

log = logging.getLogger("fooocus_resident.pipeline")

PREVIEW_EVERY = 2   # steps between two live previews
INPUT_IMAGE_SIZE = "field 'input_image' (its size sets the working size)"
# Request fields that make it an input-image request (those run alone, not in a shared batch).
INPUT_IMAGE_FIELDS = ("input_image", "uov_method", "inpaint_mask", "outpaint_selections", "image_prompts")


def latent_preview(latents: torch.Tensor) -> np.ndarray:
    """A cheap look at latents (1, C, h, w): the first three channels, each stretched
    to 0..255 over its own range. No VAE involved: a rough idea of composition only."""
    x = latents[0, :3].detach().float().cpu()
    if x.shape[0] < 3:
        x = x[:1].expand(3, *x.shape[1:])
    low = x.amin(dim=(1, 2), keepdim=True)
    span = (x.amax(dim=(1, 2), keepdim=True) - low).clamp_min(1e-6)
    return ((x - low) / span * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


# -- one request's bookkeeping ------------------------------------------------------------

@dataclass
class RequestProgress:
    """What a request has finished so far: a retry after an out-of-memory goes on from here
    instead of making (and saving) the finished images again."""

    writes: list = field(default_factory=list)       # futures of committed image files
    next_image: int = 0
    patchers: list[ModelPatcher] = field(default_factory=list)   # what the request needs resident


@dataclass
class RequestRun:
    """One request's control, progress callback, report and measurements, shared by its stages."""

    control: TaskControl | None
    progress: Callable[[ProgressEvent], None] | None
    report: dict[str, Any]
    stage_ms: dict[str, float] = field(default_factory=lambda: {
        "text_encode": 0.0, "sampling": 0.0, "vae_decode": 0.0, "save_images": 0.0})
    counts: dict[str, int] = field(default_factory=lambda: {"text_encodes": 0, "oom_retries": 0})
    done: RequestProgress = field(default_factory=RequestProgress)

    def event(self, stage: str, message: str, index: int = 0, count: int = 1,
              step: int = 0, steps: int = 1, image: str | None = None, images: int = 1) -> None:
        if self.progress is not None:
            self.progress(ProgressEvent(index, count, step, steps, message, stage=stage, image=image, images=images))

    def timed(self, name: str) -> "_stage":
        self.stage_ms.setdefault(name, 0.0)
        return _stage(self.stage_ms, name)

    def check_stop(self) -> None:
        """Raise StopRequested when the request's Stop was asked: the polling point of its own
        long stages (upscaling, VAE encode tile by tile)."""
        if self.control is not None and self.control.stop.is_set():
            raise StopRequested()


@dataclass
class RequestPlan:
    """Stage 1, resolve: everything a request decided before loading anything."""

    cfg: config_module.Config
    req: GenerationRequest
    prompt: str                           # without its <lora:...> tags
    tag_loras: list[tuple[str, float]]
    settings: flags.PerformanceSettings
    sampler: str
    scheduler: str
    cfg_scale: float
    steps: int
    prompts: sdxl_styles.PromptOptions
    image_texts: list[sdxl_styles.ImageTexts]   # per image, before Fooocus V2's expansion
    seed: int
    inputs: image_inputs.ImageInputs

    @property
    def image_count(self) -> int:
        return self.req.image_number


@dataclass
class RequestModels:
    """Stage 2, patch: the checkpoints, their patchers with this request's LoRA set, the VAE."""

    base: LoadedCheckpoint
    refiner: LoadedCheckpoint | None
    patched: PatchedModels
    vae: ModelPatcher
    lora_paths: list[tuple[str, float]]
    unet: ModelPatcher          # what samples: the LoRA set's UNet, plus the inpaint patch when used

    def refiner_unet(self) -> ModelPatcher | None:
        return None if self.refiner is None else (self.patched.refiner_unet or self.refiner.unet)

    def refiner_clip(self) -> ModelPatcher | None:
        return None if self.refiner is None else (self.patched.refiner_clip or self.refiner.clip)

    def needed(self) -> list[ModelPatcher]:
        """What the request keeps resident (an out-of-memory retry frees everything else)."""
        extra = [] if self.refiner is None else [self.refiner_unet(), self.refiner_clip()]
        return [self.unet, self.patched.clip, *extra, self.vae]


@dataclass
class ImageSource:
    """Stage 3b: what sampling starts from. Text to image: noise at the request's size.
    From an input image (vary, upscale, inpaint): its latents, the denoise strength, the
    latent mask to repaint, and how a decoded image becomes the saved one."""

    width: int
    height: int
    init_latents: torch.Tensor | None = None
    denoise: float = 1.0
    mask: torch.Tensor | None = None
    finish: Callable[[np.ndarray], np.ndarray] = lambda pixels: pixels
    direct: np.ndarray | None = None     # an image that needs no sampling (Upscale (Fast 2x))
    head: tuple | None = None            # inpaint head: (patcher, UNet-space latent, latent mask)
    image_prompts: ip_adapter.PreparedImagePrompts | None = None
    controls: controlnet.ControlSet | None = None   # PyraCanny/CPDS image prompts
    previews: list[np.ndarray] | None = None        # Debug Preprocessors: these are the result
    start_latents: torch.Tensor | None = None       # where sampling starts when not init_latents


@dataclass(eq=False)
class BatchJob:
    """One request of a batch (a request alone is a batch of one): its run, what its own
    stages decided, and what it takes part in of the stages it shares with the others."""

    request: dict
    run: RequestRun
    started: float = field(default_factory=time.perf_counter)
    plan: RequestPlan | None = None
    models: RequestModels | None = None
    source: ImageSource | None = None
    positive_texts: list[str] = field(default_factory=list)
    stage_sets: dict[str, list[core.UNetStage]] = field(default_factory=dict)
    prepared: bool = False       # its own stages (resolve .. encode) are done
    ended: bool = False          # failed or stopped: takes no part in further batches
    skipped: list[int] = field(default_factory=list)
    announced: list[str] = field(default_factory=list)
    images: list[str] = field(default_factory=list)
    counters: telemetry.MoveCounters = field(default_factory=telemetry.MoveCounters)   # its share
    unet: core.UNetCalls = field(default_factory=core.UNetCalls)   # the UNet calls its rows were in
    batched_with: int = 1        # the most images a UNet batch of its images held

    @property
    def report(self) -> dict[str, Any]:
        return self.run.report

    @property
    def count(self) -> int:
        return 1 if self.source is not None and self.source.direct is not None else self.plan.image_count

    def waiting(self) -> list[int]:
        """Indices of its images still to sample."""
        if not self.prepared or self.ended or self.source.previews is not None:
            return []
        return list(range(self.run.done.next_image, self.count))

    def sampling_key(self) -> tuple:
        """What its images must share with others' to be in the same UNet batch."""
        plan, models, source = self.plan, self.models, self.source
        switch = plan.req.switch_step(plan.steps) if models.refiner is not None else None
        image_input = (source.init_latents is not None or source.mask is not None or source.head is not None
                       or source.image_prompts is not None or source.controls is not None)
        return (id(models.unet), id(models.refiner_unet()), id(models.vae), source.width, source.height,
                plan.sampler, plan.scheduler, plan.steps, plan.cfg_scale, switch,
                sampling_guidance(plan.req, plan.settings), debug_key(plan.req), id(source) if image_input else None)

    def check_stop(self) -> bool:
        """True (and the job ends, stopped) when its Stop was asked."""
        control = self.run.control
        if control is not None and control.stop.is_set() and not self.ended:
            self.ended = True
            self.report["stopped"] = True
        return self.ended

    def take_skip(self) -> bool:
        control = self.run.control
        if control is None or not control.skip.is_set():
            return False
        control.skip.clear()
        return True

    def announce(self, wait: bool) -> None:
        """Tell the page about images written since the last call (from the worker thread only)."""
        run, steps = self.run, self.plan.steps
        if self.plan.req.disable_intermediate_results and not wait:   # as upstream: all at the end
            return
        for write in run.done.writes[len(self.announced):]:
            if not (wait or write.done()) or write.exception() is not None:
                return
            self.announced.append(write.result().path)
            run.event("saving", f"Saved image {len(self.announced)}/{self.count}", len(self.announced) - 1,
                      self.count, steps, steps, image=self.announced[-1])

    def charge(self, counters: telemetry.MoveCounters) -> None:
        self.counters = self.counters.plus(counters)


# -- the pipeline ----------------------------------------------------------------------

class Pipeline:
    """The request stages, on the models of its `catalogue` (what outlives a request).

    `config` gives the process's settings (config.txt + environment); a request's preset
    is laid over it. Image files are encoded and committed on `writer`, one thread, while
    the next image samples."""

    def __init__(self, config: Callable[[], config_module.Config] = config_module.get_config,
                 writer: concurrent.futures.Executor | None = None) -> None:
        self.config = config
        self.catalogue = ModelCatalogue()
        self.writer = writer or concurrent.futures.ThreadPoolExecutor(max_workers=1,
                                                                      thread_name_prefix="image-writer")

    @property
    def manager(self) -> model_management.ModelManager:
        return model_management.get_manager()

    # -- one request ----------------------------------------------------------------------

    def process_request(self, request: dict, control: TaskControl | None = None,
                        progress: Callable[[ProgressEvent], None] | None = None) -> RequestResult:
        """Run one request (a batch of one); bad input and failures come back as report["error"]."""
        return self.process_batch([request], [control], [progress])[0]

    def process_batch(self, requests: list[dict], controls: list[TaskControl | None] | None = None,
                      progresses: list[Callable[[ProgressEvent], None] | None] | None = None) -> list[RequestResult]:
        """Run requests together (the worker joins those of one `batch_key`): each one's own
        stages up to encoding, then all their images in shared UNet batches, decoded together
        and saved per request. Each gets its own result and report; one's bad input, Stop or
        Skip leaves the others' images as they would be alone.

        An out-of-memory in a batch of several images retries them in halves; with one image it
        frees what the requests do not need and retries once; a second one fails them, saying
        what they needed and what the budget is."""
        manager = self.manager
        manager.begin_request()
        compile_mark = core.UNET_COMPILER.mark()
        controls = controls or [None] * len(requests)
        progresses = progresses or [None] * len(requests)
        jobs = [BatchJob(request, RequestRun(control, progress, {"mode": manager.settings.policy.value, "seed": -1}))
                for request, control, progress in zip(requests, controls, progresses)]
        for attempt in (1, 2):
            oom = None
            try:
                self._run(jobs)
            except torch.OutOfMemoryError as error:
                oom = str(error).splitlines()[0] if str(error) else "out of memory"
            except Exception as error:  # a shared stage failed: every job still going reports it
                for job in jobs:
                    if not job.ended:
                        self._end_with(job, error)
            if oom is None:
                break
            # Here, outside the `except`, the traceback and the activations it held are gone.
            self._after_out_of_memory(jobs, oom, last=attempt == 2)
        before_end = telemetry.snapshot()
        summary = manager.end_request()
        jobs[0].charge(telemetry.snapshot().minus(before_end))   # the trim after the batch
        compiled = core.UNET_COMPILER.report_since(compile_mark)   # ran compiled? compiled?
        return [self._result(job, jobs, summary, compiled) for job in jobs]

    def _end_with(self, job: BatchJob, error: Exception) -> None:
        """A job's stages failed with `error`: it becomes the job's error (the others go on)."""
        job.ended = True
        if isinstance(error, (RequestError, CheckpointError, LoraError, config_module.ConfigError, ValueError)):
            job.report["error"] = str(error)   # ValueError: unknown sampler/scheduler, bad aspect ratio...
        else:  # keep serving whatever went wrong
            log.error("request failed", exc_info=error)
            job.report["error"] = f"internal error: {type(error).__name__}: {error}"

    def _result(self, job: BatchJob, jobs: list[BatchJob], summary: model_management.RequestSummary,
                compiled: dict) -> RequestResult:
        report = job.report
        report["compile"] = compiled
        if "error" in report:
            images = []
            report["error"] = self._client_error(report["error"])
        elif report.get("stopped"):
            images = _finished_writes(job.run.done.writes)   # a Stop keeps the images already done
        else:
            images = job.images
        if "error" not in report and job.plan is not None and job.plan.req.generate_image_grid:
            images = images + self._image_grid(job.plan, images, report)
        report["unet_calls"] = job.unet.calls
        report["unet_rows_per_call"] = {str(rows): calls for rows, calls in sorted(job.unet.rows.items())}
        if len(jobs) > 1:
            # Shared stages (sampling, VAE decode, their model management) are split by each
            # request's share of a batch's images; bytes and counts of shared loads are the first's.
            report["batch"] = {"requests": len(jobs), "position": jobs.index(job),
                               "images_per_unet_batch": job.batched_with, "shared_times": "split by images"}
        self._finish_report(job.run, summary, job.counters, job.started, images)
        return RequestResult(images=images, report=report)

    def _after_out_of_memory(self, jobs: list[BatchJob], message: str, last: bool) -> None:
        manager = self.manager
        needed = manager.request_peak_bytes()
        budget = manager.effective_budget
        manager.recover_from_oom(keep_loaded=[p for job in jobs for p in job.run.done.patchers])
        gib = model_management.GIB
        for job in (j for j in jobs if not j.ended):
            job.report["out_of_memory"] = {"message": message, "needed_bytes": needed, "budget_bytes": budget,
                                           "effective_budget_bytes": manager.effective_budget}
            if not last:
                job.run.counts["oom_retries"] += 1
                continue
            job.ended = True
            job.report["error"] = (f"out of memory on {manager.device} twice: the request needed about "
                                   f"{needed / gib:.2f} GB (models, patches and working memory) with a budget of "
                                   f"{budget / gib:.2f} GB; the effective budget is now "
                                   f"{manager.effective_budget / gib:.2f} GB. Try a smaller size or fewer images")

    def _client_error(self, message: str) -> str:
        try:
            return scrub_paths(message, self.config())
        except Exception:   # a config that cannot load: the message as it is
            return message

    def batch_key(self, request: dict) -> BatchKey | None:
        """What a queued request must share with others to join their batch (the worker asks,
        on its thread): the resident set (checkpoint, refiner, VAE, LoRA set with weights),
        size, sampler, scheduler, steps, cfg, refiner switch, sharpness and ADM. None: it runs
        alone (input images, or an input error its own run will report)."""
        if any(request.get(name) not in (None, "", [], flags.UOV_DISABLED) for name in INPUT_IMAGE_FIELDS):
            return None
        try:
            plan = self._resolve(dict(request), RequestRun(None, None, {}))
            cfg, req, settings = plan.cfg, plan.req, plan.settings
            refiner = (req.refiner_model if req.refiner_model not in ("", flags.NONE_NAME)
                       and settings.refiner_enabled and req.refines(plan.steps) else None)
            key = (resolve_checkpoint(req.base_model, cfg),
                   None if refiner is None else (resolve_checkpoint(refiner, cfg), req.switch_step(plan.steps)),
                   req.vae,
                   tuple((resolve_lora(name, cfg), weight) for name, weight in req.loras + plan.tag_loras),
                   None if settings.lora is None else (settings.lora.file_name, settings.lora.weight),
                   req.width, req.height, plan.sampler, plan.scheduler, plan.steps, plan.cfg_scale,
                   sampling_guidance(req, settings), debug_key(req))
        except Exception:   # its own run reports what is wrong with it
            return None
        if not core.batchable(plan.sampler):
            return None
        manager = self.manager
        per_image = model_management.working_memory_bytes("unet", req.width, req.height, 1,
                                                          manager.dtype_for("unet"))
        return BatchKey(key, plan.image_count, manager.largest_batch([], per_image, MAX_IMAGES))

    def _run(self, jobs: list[BatchJob]) -> None:
        """The stages of the requests, in order: each one's own, then their images together."""
        for job in jobs:
            if job.ended or job.prepared:
                continue
            before = telemetry.snapshot()
            try:
                self._prepare(job)
            except torch.OutOfMemoryError:
                raise
            except StopRequested:   # stopped in its own stages: nothing of it was made yet
                job.ended = True
                job.report["stopped"] = True
            except Exception as error:
                self._end_with(job, error)
            finally:
                job.charge(telemetry.snapshot().minus(before))
        self._generate([job for job in jobs if not job.ended])

    def _prepare(self, job: BatchJob) -> None:
        """One request's own stages: resolve, patch, image source, prompts, encode."""
        run = job.run
        plan = job.plan = job.plan or self._resolve(job.request, run)   # a retry keeps the seed it drew
        run.event("loading", loading_message(plan), count=plan.image_count)
        models = job.models = self._patch(plan, run)
        job.source = self._image_source(plan, models, run)
        if job.source.previews is not None:   # Debug Preprocessors: the preprocessed images, nothing sampled
            job.images = self._save_previews(plan, job.source.previews, run)
        elif job.source.direct is not None:   # Upscale (Fast 2x): nothing to sample, no prompt to encode
            job.positive_texts = plan.image_texts[:1]
        else:
            job.positive_texts = self._positive_texts(plan, run)
            run.event("encoding", "Encoding the prompt", count=plan.image_count)
            job.stage_sets = self._encode(plan, models, job.positive_texts, run)
        job.prepared = True

    def _resolve(self, request: dict, run: RequestRun) -> RequestPlan:
        """Stage 1: parse and check the request, decide the mode's settings and the seed."""
        cfg = preset_config(request, self.config())
        req = GenerationRequest.from_dict(request, cfg)
        prompt, tag_loras = split_lora_tags(req.prompt)
        if len(req.loras) + len(tag_loras) > cfg.max_loras_per_request:
            raise RequestError(f"{len(req.loras) + len(tag_loras)} LoRAs (field 'loras' and <lora:...> tags in "
                               f"field 'prompt'); at most {cfg.max_loras_per_request} (config key "
                               f"max_loras_per_request)")
        for name, weight in tag_loras:
            check_lora_weight(weight, f"field 'prompt': tag <lora:{name}>", cfg)
        settings = flags.performance_settings(req.performance)
        sampler = settings.sampler or req.sampler
        scheduler = settings.scheduler or req.scheduler
        try:
            core.make_scheduler(sampler, scheduler)  # fail on unknown names before loading anything
        except ValueError as error:   # the message names the field (sampler or scheduler)
            raise RequestError(str(error)) from None
        library = sdxl_styles.get_library(cfg.path_styles)
        prompts = sdxl_styles.PromptOptions(prompt=prompt, negative_prompt=req.negative_prompt,
                                            styles=tuple(sdxl_styles.check_names(req.styles, library)),
                                            library=library, wildcards=wildcards.WildcardFolder(cfg.path_wildcards),
                                            wildcards_in_order=req.read_wildcards_in_order)
        if isinstance(request.get("preset"), str) and request["preset"]:   # its model files, when allowed
            failed = presets.download_models(cfg)
            if failed:
                run.report["warnings"] = failed
        inputs = image_inputs.parse(request, cfg)
        steps = req.steps or settings.steps
        if inputs.mode == "uov" and "Upscale" in inputs.uov_method and not req.steps:
            steps = flags.UOV_STEPS[req.performance]
        if not inputs.mode:   # from an input image the working size is known later (_image_source)
            check_cost(req.width, req.height, steps, req.image_number, cfg)
        seed = req.seed if req.seed >= 0 else random.randint(0, MAX_SEED - MAX_IMAGES)
        plan = RequestPlan(
            cfg=cfg, req=req, prompt=prompt, tag_loras=tag_loras, settings=settings,
            sampler=sampler, scheduler=scheduler,
            cfg_scale=settings.cfg_scale if settings.cfg_scale is not None else req.guidance_scale,
            steps=steps, prompts=prompts, inputs=inputs, seed=seed,
            # Each image's wildcards, arrays and Random Style come from its own seed, as upstream.
            image_texts=[sdxl_styles.image_texts(prompts, req.image_seed(seed, i), i)
                         for i in range(req.image_number)])
        run.report.update(seed=plan.seed, performance=str(req.performance), sampler=sampler, scheduler=scheduler,
                          steps=plan.steps, cfg=plan.cfg_scale, width=req.width, height=req.height,
                          image_number=req.image_number, styles=list(req.styles))
        if isinstance(request.get("preset"), str) and request["preset"]:
            run.report["preset"] = request["preset"]
        run.report.update(inputs.describe())
        return plan

    def _patch(self, plan: RequestPlan, run: RequestRun) -> RequestModels:
        """Stage 2: the checkpoints, the LoRA set's patchers and the VAE (nothing moves yet)."""
        cfg, req, report = plan.cfg, plan.req, run.report
        base = self.catalogue.get_checkpoint(resolve_checkpoint(req.base_model, cfg))
        if base.kind != "base":
            raise RequestError(f"field 'base_model': {model_name(base.file.path, cfg.path_checkpoints)} is an "
                               f"SDXL refiner; choose it as refiner_model")
        user_loras = [(resolve_lora(name, cfg), weight) for name, weight in req.loras + plan.tag_loras]
        perf_loras, perf_note = self.catalogue.performance_lora(plan.settings, base, cfg)
        refiner = self._refiner(plan, base, report)
        lora_paths = user_loras + perf_loras
        patched = self.catalogue.patched_models(base, lora_paths, refiner)
        report.update(base_model=model_name(base.file.path, cfg.path_checkpoints),
                      loras=[{**entry, "file": model_name(path, cfg.path_loras)}
                             for entry, (path, _) in zip(patched.loras, lora_paths)])
        if refiner is not None:
            report["refiner_loras"] = patched.refiner_loras
        if patched.warnings:
            report["warnings"] = list(patched.warnings)
        if perf_note:
            report["performance_lora"] = perf_note
        check_prompt_tokens("prompt", plan.prompt, base.tokenizers, cfg)
        check_prompt_tokens("negative_prompt", req.negative_prompt, base.tokenizers, cfg)
        models = RequestModels(base=base, refiner=refiner, patched=patched,
                               vae=self._vae(req, base, refiner, cfg, report), lora_paths=lora_paths,
                               unet=self._inpaint_unet(plan, patched.unet, report))
        run.done.patchers = models.needed()
        return models

    def _inpaint_unet(self, plan: RequestPlan, unet: ModelPatcher, report: dict) -> ModelPatcher:
        """Inpaint with upstream's patch file (models/inpaint) when it is there: the LoRA set's
        UNet plus the patch, a content-identified patch set like any LoRA (resident mode keeps
        it and reaches it by diff). Without the file, inpainting works by latent blending alone."""
        if plan.inputs.mode != "inpaint" or plan.inputs.inpaint.debug_preprocessor:
            return unet
        engine = plan.inputs.inpaint.engine   # "None": upstream's engine off, blending alone
        path = (None if engine not in inpaint_mod.PATCH_FILES
                else self._optional_file(plan.cfg.path_inpaint, inpaint_mod.PATCH_FILES[engine]))
        if path is None:
            report["inpaint_patch"] = None
            return unet
        patched = unet.clone()
        patched.add_patches(self.catalogue.state.inpaint.patches(path, unet.model), inpaint_mod.PATCH_STRENGTH)
        # The parsed patch file stays in host memory for the next inpaint: on the host ledger.
        self.manager.register_cache("inpaint_patches", model_management.HOST, self.catalogue.state.inpaint.nbytes)
        report["inpaint_patch"] = os.path.basename(path)
        return patched

    @staticmethod
    def _optional_file(folder: Path, name: str) -> str | None:
        path = Path(folder) / name
        return str(path) if path.is_file() else None

    def _refiner(self, plan: RequestPlan, base: LoadedCheckpoint, report: dict) -> LoadedCheckpoint | None:
        req = plan.req
        if not (req.refiner_model and req.refiner_model != flags.NONE_NAME and plan.settings.refiner_enabled
                and req.refines(plan.steps)):
            return None
        refiner = self.catalogue.get_checkpoint(resolve_checkpoint(req.refiner_model, plan.cfg, "refiner_model"))
        if refiner is base:
            # As upstream: the base as its own refiner would only swap LoRA patches mid-sampling.
            report["refiner_model"] = "disabled: the refiner is the base model"
            return None
        report["refiner_model"] = model_name(refiner.file.path, plan.cfg.path_checkpoints)
        return refiner

    def _vae(self, req: GenerationRequest, base: LoadedCheckpoint, refiner: LoadedCheckpoint | None,
             cfg: config_module.Config, report: dict) -> ModelPatcher:
        if req.vae not in ("", flags.DEFAULT_VAE, flags.NONE_NAME):
            report["vae"] = req.vae
            return self.catalogue.get_vae(req.vae, cfg)
        vae = base.vae or (refiner.vae if refiner is not None else None)
        if vae is None:
            raise RequestError(f"{report['base_model']} has no VAE: choose one from the VAE folder "
                               f"(config key path_vae; request field 'vae')")
        return vae

    def _positive_texts(self, plan: RequestPlan, run: RequestRun) -> list[sdxl_styles.ImageTexts]:
        """Per image: its texts, with the Fooocus V2 expansion of that image's prompt and seed
        when the style asks for it (as upstream, the expansion is the last text). The report
        lists what each image's prompt became."""
        texts = plan.image_texts
        if plan.prompts.expansion:
            from modules import expansion
            expander = expansion.get_expansion(plan.cfg.path_fooocus_expansion, plan.cfg.downloads)
            with run.timed("prompt_expansion"):
                texts = [t.expanded(expander(t.prompt, req_seed(plan, i))) for i, t in enumerate(texts)]
            run.report["prompt_expansions"] = [t.expansion for t in texts]
        run.report["prompts"] = [{"prompt": t.log_prompt, "negative_prompt": t.log_negative_prompt,
                                  "styles": list(t.styles), "full_prompt": list(t.positive),
                                  "full_negative_prompt": list(t.negative)} for t in texts]
        return texts

    def _encode(self, plan: RequestPlan, models: RequestModels, positive_texts: list[sdxl_styles.ImageTexts],
                run: RequestRun) -> dict[sdxl_styles.ImageTexts, list[core.UNetStage]]:
        """Stage 3: every different text of the images once, in one text-encoder batch for the
        base and one for the refiner; each image's texts are then joined as upstream
        (`joined_conditioning`). At guidance 1 (the distilled modes) sampling never reads the
        negative, so it is not encoded (as upstream)."""
        folders, limit = plan.cfg.path_embeddings, int(plan.cfg.max_conditioning_cache_mb * 2 ** 20)
        images = list(dict.fromkeys(positive_texts[run.done.next_image:]))
        guided = plan.cfg_scale > 1.0
        texts = list(dict.fromkeys(s for t in images for s in (*t.positive, *(t.negative if guided else ()))))

        def encoded(clip: ModelPatcher, tokenizers: tuple) -> dict[str, core.Conditioning]:
            return dict(zip(texts, self.catalogue.encode_many(clip, tokenizers, texts, run.counts, folders, limit,
                                                              plan.req.clip_skip)))

        def conditionings(image: sdxl_styles.ImageTexts,
                          by_text: dict[str, core.Conditioning]) -> tuple[core.Conditioning, core.Conditioning | None]:
            positive = joined_conditioning([by_text[s] for s in image.positive], image.positive_top_k)
            return positive, (joined_conditioning([by_text[s] for s in image.negative], image.negative_top_k)
                              if guided else None)

        stage_sets: dict[sdxl_styles.ImageTexts, list[core.UNetStage]] = {}
        with run.timed("text_encode"):
            base = encoded(models.patched.clip, models.base.tokenizers)
            refined = None if models.refiner is None else encoded(models.refiner_clip(), models.refiner.tokenizers)
            for image in images:
                stages = [core.UNetStage(models.unet, *conditionings(image, base))]
                if refined is not None:
                    stages.append(core.UNetStage(models.refiner_unet(), *conditionings(image, refined),
                                                 refiner=models.refiner.kind == "refiner"))
                stage_sets[image] = stages
        return stage_sets

    # -- input images -------------------------------------------------------------------

    def _image_source(self, plan: RequestPlan, models: RequestModels, run: RequestRun) -> ImageSource:
        """Stage 3b: where sampling starts (noise, or an input image's latents) and the
        image prompts it follows. Every extra network loads through the registry."""
        inputs, req = plan.inputs, plan.req
        if inputs.mode == "uov":
            source = self._vary_or_upscale(plan, models, run)
        elif inputs.mode == "inpaint":
            source = self._inpaint(plan, models, run)
        else:
            source = ImageSource(req.width, req.height)
        if source.previews is not None:   # Debug Inpaint Preprocessing: nothing more to prepare
            pass
        elif inputs.image_prompts and source.direct is None and inputs.control.debug_preprocessors:
            source.previews = preprocessor_previews(inputs, source.width, source.height)
        elif source.direct is None:
            if inputs.adapter_prompts:
                source.image_prompts = self._prepare_image_prompts(plan, models, run)
            if inputs.control_prompts:
                source.controls = self._prepare_controls(plan, models, source, run)
        if inputs.mode:
            run.report.update(width=source.width, height=source.height)
        return source

    def _vary_or_upscale(self, plan: RequestPlan, models: RequestModels, run: RequestRun) -> ImageSource:
        """Vary: the image at its shape ceil, re-diffused at 0.5 / 0.85. Upscale: the 4x
        upscaler, Lanczos to 1.5x / 2x, re-diffused at 0.382 (Fast 2x: not re-diffused)."""
        inputs, cfg = plan.inputs, plan.cfg
        image = inputs.image
        height, width = image.shape[:2]
        net = None
        if "Upscale" in inputs.uov_method:
            path = self._required_file(cfg.path_upscale_models, upscaler.DEFAULT_UPSCALER, "path_upscale_models",
                                       upscaler.DEFAULT_UPSCALER_URL, cfg)
            try:
                net = self.catalogue.state.upscalers.get(path)
            except upscaler.UpscalerError as error:
                raise RequestError(f"field 'uov_method': {error}") from None
            run.done.patchers.append(net)
            run.report["upscaler"] = os.path.basename(path)
        uov = upscaler.uov_plan(inputs.uov_method, width, height,
                                model_scale=net.model.scale if net is not None else 4, side=cfg.image_input_side)
        if max(uov.target) > MAX_SIDE:
            raise RequestError(f"field 'input_image': {inputs.uov_method} of a {width}x{height} image makes "
                               f"{uov.target[0]}x{uov.target[1]}; at most {MAX_SIDE} pixels per side")
        if uov.diffuse:
            check_cost(*uov.latent_size, plan.steps, plan.image_count, cfg, INPUT_IMAGE_SIZE)
        with run.timed("upscale"):
            pixels = upscaler.prepare_image(uov, image, net, run.check_stop)
        if not uov.diffuse:
            return ImageSource(pixels.shape[1], pixels.shape[0], direct=pixels)
        width, height = uov.latent_size
        with run.timed("vae_encode"):
            latents = core.encode(models.vae, pixels, run.check_stop)
        return ImageSource(width, height, init_latents=latents, denoise=inputs.uov_denoise(uov.denoise))

    def _inpaint(self, plan: RequestPlan, models: RequestModels, run: RequestRun) -> ImageSource:
        """Inpaint / outpaint, as upstream: the crop around the mask generated at about
        1024 px, started from the pre-filled crop, the mask's outside kept by latent
        blending, the inpaint head when its file is there, then pasted back."""
        inputs, cfg, options = plan.inputs, plan.cfg, plan.inputs.inpaint
        image, mask = inputs.image, None
        height, width = image.shape[:2]
        try:
            if inputs.mask is not None:
                mask = inpaint_mod.mask_from_image(inputs.mask, width, height)
                mask = inpaint_mod.erode_or_dilate(mask, options.erode_or_dilate)   # before any invert, as upstream
            if options.invert_mask:
                mask = inpaint_mod.invert_mask(np.zeros((height, width), np.uint8) if mask is None else mask)
            if inputs.outpaint:
                image, mask = inpaint_mod.outpaint_canvas(image, mask, inputs.outpaint)
            if mask is None:
                raise RequestError("field 'inpaint_mask' is required to inpaint")
            job = inpaint_mod.prepare(image, mask, respective_field=inputs.inpaint_respective_field,
                                      strength=inputs.inpaint_strength, outpaint=bool(inputs.outpaint),
                                      side=cfg.image_input_side)
        except inpaint_mod.InpaintInputError as error:
            raise RequestError(f"field '{error.field}': {error.reason}") from None
        crop_h, crop_w = job.size
        if options.debug_preprocessor:   # upstream shows the prepared crop and its mask instead of generating
            mask_rgb = np.repeat(job.mask[..., None], 3, axis=2)
            return ImageSource(crop_w, crop_h, previews=[job.fill_pixels, mask_rgb])
        check_cost(crop_w, crop_h, plan.steps, plan.image_count, cfg, INPUT_IMAGE_SIZE)
        with run.timed("vae_encode"):
            latents = core.encode(models.vae, job.fill_pixels, run.check_stop)
        latent_mask = inpaint_mod.latent_mask(job.mask, *latents.shape[-2:]).to(latents)
        source = ImageSource(crop_w, crop_h, init_latents=latents, denoise=job.strength, mask=latent_mask,
                             finish=job.paste)
        if options.disable_initial_latent:   # upstream: an empty latent to start from; the outside still kept
            source.start_latents = torch.zeros_like(latents)
        head_path = self._optional_file(cfg.path_inpaint, inpaint_mod.HEAD_FILE)
        if head_path is not None and models.unet is not models.patched.unet:   # the head goes with the patch
            head = self.catalogue.state.inpaint.head(head_path)
            run.done.patchers.append(head)
            with run.timed("vae_encode"):
                head_latent = core.encode(models.vae, job.head_pixels, run.check_stop)
            source.head = (head, head_latent, latent_mask)
            run.report["inpaint_head"] = os.path.basename(head_path)
        run.report["output_size"] = [int(job.image.shape[1]), int(job.image.shape[0])]
        return source

    def _prepare_image_prompts(self, plan: RequestPlan, models: RequestModels,
                               run: RequestRun) -> ip_adapter.PreparedImagePrompts:
        """IP-Adapter Plus: each image's tokens (cached by content) and their K/V for every
        cross-attention layer, computed once per request; no UNet weight changes."""
        cfg = plan.cfg
        ip_path = self._required_file(cfg.path_controlnet, ip_adapter.IP_ADAPTER_FILE, "path_controlnet",
                                      ip_adapter.IP_ADAPTER_URL, cfg)
        clip_path = self._required_file(cfg.path_clip_vision, ip_adapter.CLIP_VISION_FILE, "path_clip_vision",
                                        ip_adapter.CLIP_VISION_URL, cfg)
        try:
            adapter = self.catalogue.state.image_prompts.get(ip_path, clip_path)
            run.done.patchers += [adapter.ip, adapter.clip]
            with run.timed("image_prompt"):
                tokens = adapter.image_tokens([p.image for p in plan.inputs.adapter_prompts])
                prompts = [ip_adapter.ImagePrompt(t, p.weight, p.stop)
                           for t, p in zip(tokens, plan.inputs.adapter_prompts)]
                prepared = adapter.prepare(models.unet.model, prompts)
        except ip_adapter.ImagePromptError as error:
            raise RequestError(f"field 'image_prompts': {error}") from None
        run.report["image_prompt_signature"] = prepared.signature
        return prepared

    def _prepare_controls(self, plan: RequestPlan, models: RequestModels, source: ImageSource,
                          run: RequestRun) -> controlnet.ControlSet:
        """PyraCanny / CPDS: each image fitted to the generation's size and preprocessed (unless
        Skip Preprocessors), and the ControlNet of its type built for this checkpoint (once per
        file version; a clone per LoRA set carries the request's LoRA patches). Nothing is
        merged into the UNet: the residuals join its calls while sampling."""
        cfg, options = plan.cfg, plan.inputs.control
        controls, described = [], []
        for prompt in plan.inputs.control_prompts:
            name, url = CONTROLNET_FILES[prompt.kind]
            path = self._required_file(cfg.path_controlnet, name, "path_controlnet", url, cfg)
            try:
                patcher = self.catalogue.state.controlnets.get(path, models.base.unet, models.unet)
            except controlnet.ControlNetError as error:
                raise RequestError(f"field 'image_prompts': {error}") from None
            with run.timed("controlnet_preprocess"):
                hint = preprocessors.control_hint(prompt.image, prompt.kind, source.width, source.height,
                                                  options.canny_low, options.canny_high, options.skip_preprocessors)
            controls.append(controlnet.PreparedControl(patcher, controlnet.hint_tensor(hint), prompt.weight,
                                                       prompt.stop))
            described.append({"type": prompt.kind, "file": name, "stop": prompt.stop, "weight": prompt.weight})
        manager = self.manager
        host = manager.normalize(model_management.HOST)
        if host != manager.device:   # built or evicted ControlNets wait in host memory: on its ledger
            manager.register_cache("controlnets", host, lambda: self.catalogue.state.controlnets.idle_bytes_on(host, manager))
        control_set = controlnet.ControlSet(controls, options.softness)
        run.done.patchers += control_set.patchers()
        run.report["controlnets"] = described
        return control_set

    def _save_previews(self, plan: RequestPlan, previews: list[np.ndarray], run: RequestRun) -> list[str]:
        """Debug Preprocessors: the preprocessed image prompts as PNG files in the temp folder
        (no metadata, not in the image log), as upstream shows them instead of generating."""
        folder = plan.cfg.temp_root / datetime.date.today().strftime("%Y-%m-%d")
        stem = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S") + "_preprocessed"
        paths = [image_output.save(image, None, "png", folder, folder, f"{stem}_{i}").path
                 for i, image in enumerate(previews)]
        run.report["preprocessed_images"] = len(paths)
        return paths

    def _image_grid(self, plan: RequestPlan, images: list[str], report: dict) -> list[str]:
        """Upstream's "Generate Image Grid for Each Batch": the request's images in one more
        image, after them (a PNG in the temp folder: no metadata, not in the image log, as
        upstream shows it in the gallery only); none for one image or images of other sizes."""
        try:
            pixels = []
            for path in images:
                with Image.open(path) as image:
                    pixels.append(np.asarray(image.convert("RGB")))
            wall = image_output.grid(pixels)
            if wall is None:
                return []
            folder = plan.cfg.temp_root / datetime.date.today().strftime("%Y-%m-%d")
            stem = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S") + "_grid"
            path = image_output.save(wall, None, "png", folder, folder, stem).path
        except Exception as error:   # the images are made: a grid that fails is a warning
            log.exception("building the image grid failed")
            report["warnings"] = report.get("warnings", []) + [f"no image grid: {type(error).__name__}: {error}"]
            return []
        rows, columns = image_output.grid_shape(len(pixels))
        report["image_grid"] = {"image": model_name(path, (plan.cfg.temp_root,)), "rows": rows, "columns": columns,
                                "size": [int(wall.shape[1]), int(wall.shape[0])]}
        return [path]

    def _required_file(self, folder: Path, name: str, key: str, url: str | None,
                       cfg: config_module.Config) -> str:
        """A model file the request cannot do without: from its folder, downloaded when
        downloads are allowed, else an error naming the file and the folder's config key."""
        path = Path(folder) / name
        if path.is_file():
            return str(path)
        if url and cfg.downloads:
            from modules import model_downloader
            path.parent.mkdir(parents=True, exist_ok=True)
            if model_downloader.download_file(url, path):
                return str(path)
        raise RequestError(f"model file {name} is not in its folder (config key {key})"
                           + (f"; download it from {url}" if url else ""))

    # -- images ---------------------------------------------------------------------------

    def _generate(self, jobs: list[BatchJob]) -> None:
        """Stages 4-6 for every image of `jobs`: sampled together in UNet batches (as many
        images as the ledger has working memory for, at most --max-batch), decoded together,
        saved per job on the writer thread while the next batch samples; finished files are
        announced to each job's page as they land. An out-of-memory in a batch of several
        images retries them in halves."""
        for job in jobs:
            if job.source.direct is not None:
                self._save_direct(job)
        limit: int | None = None   # lowered by an out-of-memory
        while True:
            before = telemetry.snapshot()
            batch = self._next_batch(jobs, limit)
            if not batch:
                break
            oom = None
            try:
                self._sample_decode_save(batch)
            except torch.OutOfMemoryError as error:
                if len(batch) == 1:
                    raise
                oom = str(error).splitlines()[0] if str(error) else "out of memory"
            finally:
                _charge_shared(batch, telemetry.snapshot().minus(before))
            if oom is not None:   # outside the `except`: the activations it held are gone
                limit = len(batch) // 2
                self._halve_after_out_of_memory(batch, oom)
        for job in jobs:
            if not job.ended and job.source.previews is None:   # previews: the images are already there
                job.images = self._finish_images(job)

    def _next_batch(self, jobs: list[BatchJob], limit: int | None) -> list[tuple[BatchJob, int]]:
        """The next UNet batch: (job, image index) of the first waiting job and of the others
        that can share its UNet call, in order, as many as fit."""
        for job in jobs:
            job.check_stop()
        waiting = [job for job in jobs if job.waiting()]
        if not waiting:
            return []
        lead = waiting[0]
        mates = [job for job in waiting if job.sampling_key() == lead.sampling_key()]
        images = [(job, index) for job in mates for index in job.waiting()]
        cap = min(n for n in (len(images), limit, lead.plan.cfg.max_batch,
                              None if core.batchable(lead.plan.sampler) else 1) if n)
        if cap == 1:   # nothing to size: the sampling stage's own load is the only one
            return images[:1]
        size = core.unet_batch_size(lead.models.unet, lead.source.width, lead.source.height, cap)
        return images[:size]

    def _sample_decode_save(self, batch: list[tuple[BatchJob, int]]) -> None:
        """One UNet batch: its images sampled together, the ones not dropped decoded together,
        each saved by its own job."""
        jobs = list(dict.fromkeys(job for job, _ in batch))
        lead = batch[0][0]
        models, source = lead.models, lead.source
        shared = {"sampling": 0.0, "vae_decode": 0.0}
        calls = core.UNET_CALLS.mark()
        latents = self._sample(batch, shared)
        calls = core.UNET_CALLS.since(calls)
        finished = [(job, index, x) for (job, index), x in zip(batch, latents) if x is not None]
        for job in jobs:
            job.unet.add(calls)
            job.batched_with = max(job.batched_with, len(batch))
            mine = [index for j, index, _ in finished if j is job]
            if mine:
                job.run.event("decoding", _images_text("Decoding", mine, job.count), mine[0], job.count,
                              job.plan.steps, job.plan.steps, images=len(mine))

        def interrupt() -> None:
            """Polled before each VAE call or tile: once every job of the batch is stopped, no more."""
            if all([job.check_stop() for job in jobs]):
                raise StopRequested()

        try:
            with _stage(shared, "vae_decode"):
                pixels = (core.decode_batch(models.vae, [x for _, _, x in finished], source.width, source.height,
                                            interrupt) if finished else [])
                pixels = [job.source.finish(image) for (job, _, _), image in zip(finished, pixels)]
        except StopRequested:   # every job of the batch has ended, stopped: nothing of this batch is kept
            return
        for (job, index, _), image in zip(finished, pixels):
            if job.check_stop():   # stopped while the batch decoded: its images of this batch are dropped
                continue
            job.run.done.writes.append(self.writer.submit(
                save_image, image, self._image_parameters(job.plan, job.positive_texts[index], index, job.run),
                job.plan.cfg, job.plan.req.output_format))
        for job in jobs:
            share = sum(1 for j, _ in batch if j is job) / len(batch)
            for name, ms in shared.items():
                job.run.stage_ms[name] += ms * share
            if not job.ended:
                job.run.done.next_image = max(index for j, index in batch if j is job) + 1
                job.announce(wait=False)

    def _sample(self, batch: list[tuple[BatchJob, int]], shared_ms: dict[str, float]) -> list[torch.Tensor | None]:
        """Stage 4: the batch's latents, each image with its own seed; each job's Stop and
        Skip are honoured between steps (its rows leave the batch; None for those)."""
        lead = batch[0][0]
        plan, models, source = lead.plan, lead.models, lead.source
        tweaks = sampling_guidance(plan.req, plan.settings)
        images = [core.BatchImage(req_seed(job.plan, index), job.stage_sets[job.positive_texts[index]])
                  for job, index in batch]
        for job in dict.fromkeys(job for job, _ in batch):
            job.report["guidance"] = asdict(tweaks)
        switch = plan.req.switch_step(plan.steps) if models.refiner is not None else None
        shape = (tuple(source.init_latents.shape) if source.init_latents is not None
                 else core.latent_shape(models.unet, models.vae, source.width, source.height))
        with _stage(shared_ms, "sampling"), contextlib.ExitStack() as extras:
            if plan.req.freeu is not None:   # upstream applies FreeU to the base UNet only
                extras.enter_context(freeu.applied(models.unet.model, freeu.FreeU(*plan.req.freeu)))
            if source.image_prompts is not None:
                extras.enter_context(ip_adapter.applied(models.unet.model, source.image_prompts))
            if source.controls is not None:
                extras.enter_context(controlnet.applied(models.unet.model, source.controls))
            if source.head is not None:
                head, head_latent, head_mask = source.head
                extras.enter_context(inpaint_mod.head_applied(models.unet, head, head_latent, head_mask,
                                                              load_with=[models.unet]))
            return core.sample_batch(images, sampler=plan.sampler, scheduler=plan.scheduler, steps=plan.steps,
                                     cfg=plan.cfg_scale, width=source.width, height=source.height, shape=shape,
                                     switch_step=switch, callback=_step_callback(batch), guidance=tweaks,
                                     init_latents=source.init_latents, denoise=source.denoise, mask=source.mask,
                                     swap=plan.req.refiner_swap_method,
                                     start_latents=source.start_latents)

    def _halve_after_out_of_memory(self, batch: list[tuple[BatchJob, int]], message: str) -> None:
        """A batch of several images ran out of memory: free what its jobs do not need; the
        next batches hold half as many images."""
        jobs = list(dict.fromkeys(job for job, _ in batch))
        manager = self.manager
        manager.recover_from_oom(keep_loaded=[p for job in jobs for p in job.run.done.patchers])
        for job in jobs:
            job.run.counts["oom_batch_halvings"] = job.run.counts.get("oom_batch_halvings", 0) + 1
            job.report["out_of_memory"] = {"message": message, "batch_images": len(batch),
                                           "effective_budget_bytes": manager.effective_budget}

    def _save_direct(self, job: BatchJob) -> None:
        """An image that needs no sampling (Upscale (Fast 2x)) is saved as it is."""
        plan, run = job.plan, job.run
        if run.done.next_image == 0:
            run.done.writes.append(self.writer.submit(save_image, job.source.direct, self._image_parameters(
                plan, job.positive_texts[0], 0, run), plan.cfg, plan.req.output_format))
            run.done.next_image = 1

    def _finish_images(self, job: BatchJob) -> list[str]:
        """Wait for the job's files; its report gets the seeds made and skipped."""
        plan, run, report = job.plan, job.run, job.report
        steps, count = plan.steps, job.count
        run.event("saving", "Saving images", count - 1, count, steps, steps)
        with run.timed("save_images"):   # only the part that did not overlap: waiting for the commits
            saved = [write.result() for write in run.done.writes]
        job.announce(wait=True)
        report["seeds"] = [req_seed(plan, i) for i in range(count) if i not in job.skipped]
        if job.skipped:
            report["skipped"] = [req_seed(plan, i) for i in job.skipped]
        report["output_format"] = plan.req.output_format
        warnings = sorted({s.warning for s in saved if s.warning})
        if warnings:
            report["warnings"] = report.get("warnings", []) + warnings
        return [s.path for s in saved]

    def _image_parameters(self, plan: RequestPlan, texts: sdxl_styles.ImageTexts, index: int,
                          run: RequestRun) -> parameters.ImageMetadata:
        """What the image file's metadata records (upstream's fields: enough to make it again)."""
        req, report, cfg = plan.req, run.report, plan.cfg
        tweaks = sampling_guidance(req, plan.settings)
        loras = [(entry["file"], entry["weight"]) for entry in report.get("loras", [])]
        refiner = report.get("refiner_model")
        refiner = None if not refiner or refiner.startswith("disabled") else refiner
        files = {}
        if req.metadata_scheme == "a1111":   # its hashes need the files
            named = [("base_model", report["base_model"], cfg.path_checkpoints),
                     ("refiner_model", refiner, cfg.path_checkpoints),
                     *((parameters.stem(name), name, cfg.path_loras) for name, _ in loras)]
            files = {role: config_module.resolve_model_file(name, folders) for role, name, folders in named if name}
        return parameters.image_metadata(
            texts, expansion=plan.prompts.expansion, performance=str(req.performance), steps=plan.steps,
            width=report.get("width", req.width), height=report.get("height", req.height),
            guidance_scale=plan.cfg_scale, sharpness=tweaks.sharpness,
            adm=(tweaks.adm_positive, tweaks.adm_negative, tweaks.adm_end), base_model=report["base_model"],
            refiner_model=refiner, refiner_switch=req.refiner_switch, sampler=plan.sampler,
            scheduler=plan.scheduler, vae=req.vae, seed=req_seed(plan, index), loras=loras,
            scheme=req.metadata_scheme, save=req.save_metadata_to_images, model_files=files,
            # what sampling used, as upstream records it: the distilled modes run adaptive cfg 1.0
            adaptive_cfg=1.0 if tweaks.adaptive_cfg is None else tweaks.adaptive_cfg, clip_skip=req.clip_skip,
            overwrite_switch=req.overwrite_switch, refiner_swap_method=req.refiner_swap_method, freeu=req.freeu)

    def _finish_report(self, run: RequestRun, summary: model_management.RequestSummary,
                       counters: telemetry.MoveCounters, started: float, images: list[str]) -> None:
        report, counts = run.report, run.counts
        report["timings_ms"] = {"total": round((time.perf_counter() - started) * 1000, 3),
                                "model_management": round(counters.management_seconds * 1000, 3),
                                **{k: round(v, 3) for k, v in run.stage_ms.items()}}
        report["model_management"] = {**counters.as_report(), "text_encodes": counts["text_encodes"],
                                      "over_budget": summary.over_budget, "oom_retries": counts["oom_retries"],
                                      "oom_batch_halvings": counts.get("oom_batch_halvings", 0),
                                      "switch": _switch_served(counters),
                                      "conditioning_cache_bytes": self.catalogue.state.conditions_bytes()}
        report["vram"] = {"budget_bytes": summary.budget_bytes, "resident_bytes": summary.resident_bytes,
                          "peak_allocated_bytes": summary.peak_allocated_bytes,
                          "effective_budget_bytes": summary.effective_budget_bytes,
                          "host_resident_bytes": summary.host_resident_bytes,
                          # per model the request used: whole, partial or streamed, and the bytes of each part
                          "models": summary.placements}
        cfg = self.config()   # the images by name in their folder (outputs/<day>/...), no server path
        report["images"] = [model_name(path, (cfg.path_outputs, cfg.temp_root)) for path in images]
        mm = report["model_management"]
        print(f"[Fooocus-Resident] {report['mode']}: {len(images)} image(s) in "
              f"{report['timings_ms']['total']:.0f} ms; model management "
              f"{report['timings_ms']['model_management']:.1f} ms, "
              f"{mm['bytes_to_device'] / 2**20:.1f} MiB to device, {mm['bytes_to_offload'] / 2**20:.1f} MiB "
              f"offloaded, {mm['models_loaded']} loaded, {mm['weights_patched']} weights patched, "
              f"{mm['weights_restored']} restored, {mm['lora_files_read']} LoRA files read"
              + (f", {mm['bytes_streamed'] / 2**20:.1f} MiB streamed" if mm["bytes_streamed"] else "")
              + (f"; error: {report['error']}" if "error" in report else ""))

    # -- status and shutdown --------------------------------------------------------------

    def model_status(self) -> dict:
        """The registry plus the catalogue's caches, as JSON-able data (`/model_status`)."""
        status = self.manager.status()
        status.update(self.catalogue.status())
        from modules import expansion
        status["prompt_expansion"] = expansion.status()
        return status

    def demo_model_in_use(self) -> str | None:
        names = self.catalogue.checkpoint_names()
        cfg = self.config()
        files = config_module.list_model_files(cfg.path_checkpoints)
        real = [f for f in files if os.path.basename(f) != DEMO_CHECKPOINT_NAME]
        if DEMO_CHECKPOINT_NAME in names or (files and not real):
            return (f"The built-in demo checkpoint ({DEMO_CHECKPOINT_NAME}) has random weights and draws noise. "
                    f"Put a real SDXL checkpoint (.safetensors) into the checkpoints folder (config key "
                    f"path_checkpoints).")
        return None

    def flush_writer(self) -> None:
        """Wait for every queued image file to be committed (shutdown)."""
        self.writer.submit(lambda: None).result()


# -- helpers ------------------------------------------------------------------------------

def loading_message(plan: RequestPlan) -> str:
    """What the loading stage says: the models this request asks for, by file name."""
    req = plan.req
    text = f"Loading {os.path.basename(req.base_model)}"
    if req.refiner_model and req.refiner_model != flags.NONE_NAME:
        text += f" and refiner {os.path.basename(req.refiner_model)}"
    loras = len(req.loras) + len(plan.tag_loras)
    return text + (f" with {loras} LoRA{'s' if loras > 1 else ''}" if loras else "")


CONTROLNET_FILES = {flags.PYRACANNY: (controlnet.CANNY_FILE, controlnet.CANNY_URL),
                    flags.CPDS: (controlnet.CPDS_FILE, controlnet.CPDS_URL)}


def preprocessor_previews(inputs: image_inputs.ImageInputs, width: int, height: int) -> list[np.ndarray]:
    """What each image prompt's preprocessor makes of it (Debug Preprocessors): a control's
    hint at the generation's size; an ImagePrompt's image as the CLIP encoder sees it."""
    options, previews = inputs.control, []
    for prompt in inputs.image_prompts:
        if prompt.kind == flags.IMAGE_PROMPT:
            previews.append(upscaler.resize_lanczos(prompt.image, (ip_adapter.CLIP_SIZE, ip_adapter.CLIP_SIZE)))
        else:
            previews.append(preprocessors.control_hint(prompt.image, prompt.kind, width, height, options.canny_low,
                                                       options.canny_high, options.skip_preprocessors))
    return previews


def _charge_shared(batch: list[tuple[BatchJob, int]], counters: telemetry.MoveCounters) -> None:
    """A shared stage's model management: its time split by each job's share of the batch's
    images, its bytes and counts on the first job (whole numbers do not split)."""
    jobs = list(dict.fromkeys(job for job, _ in batch))
    for job in jobs:
        share = sum(1 for j, _ in batch if j is job) / len(batch)
        whole = counters if job is jobs[0] else telemetry.MoveCounters()
        job.charge(dataclasses.replace(whole, management_seconds=counters.management_seconds * share))


def _images_text(verb: str, indices: list[int], count: int) -> str:
    """'Sampling image 2/4' or, for several, 'Sampling images 1-3/4'."""
    if len(indices) == 1:
        return f"{verb} image {indices[0] + 1}/{count}"
    return f"{verb} images {indices[0] + 1}-{indices[-1] + 1}/{count}"


def _step_callback(batch: list[tuple[BatchJob, int]]) -> core.StepCallback:
    """Between two steps of a UNet batch, for each job in it: a Stop drops all its rows, a
    Skip its first image's; otherwise its page hears the step (one event for its images,
    with a preview of the first every PREVIEW_EVERY steps)."""
    positions: dict[BatchJob, list[int]] = {}
    for position, (job, _) in enumerate(batch):
        positions.setdefault(job, []).append(position)

    def on_step(step: int, total: int, estimates: dict[int, torch.Tensor]) -> list[int]:
        dropped: list[int] = []
        for job, mine in positions.items():
            live = [p for p in mine if p in estimates]
            if not live:
                continue
            if job.check_stop():
                dropped += live
                continue
            count = job.count
            if job.take_skip():   # Skip: its first unfinished image is dropped
                first = live.pop(0)
                dropped.append(first)
                job.skipped.append(batch[first][1])
                index = batch[first][1]
                job.run.event("skipped", f"Skipped image {index + 1}/{count}", index, count, total, total)
                if not live:
                    continue
            job.announce(wait=False)
            if job.run.progress is not None:
                indices = [batch[p][1] for p in live]
                preview = (latent_preview(estimates[live[0]]) if not job.plan.req.disable_preview
                           and (step % PREVIEW_EVERY == 0 or step == total) else None)
                job.run.progress(ProgressEvent(indices[0], count, step, total,
                                               f"{_images_text('Sampling', indices, count)}, step {step}/{total}",
                                               preview=preview, images=len(indices)))
        return dropped

    return on_step


def _finished_writes(writes: list[concurrent.futures.Future]) -> list[str]:
    paths = []
    for write in writes:
        try:
            paths.append(write.result().path)
        except Exception:
            log.exception("writing an image failed")
    return paths


def sampling_guidance(req: GenerationRequest, settings: flags.PerformanceSettings) -> guidance.Guidance:
    """Sharpness and ADM scaling of a request; the distilled modes turn both off, as upstream."""
    if settings.is_distilled:
        return guidance.Guidance(sharpness=settings.sharpness or 0.0)
    return guidance.Guidance(sharpness=req.sharpness, adm_positive=req.adm_scaler_positive,
                             adm_negative=req.adm_scaler_negative, adm_end=req.adm_scaler_end,
                             adaptive_cfg=req.adaptive_cfg)


def req_seed(plan: RequestPlan, index: int) -> int:
    """Image `index`'s seed (the same for all with disable_seed_increment)."""
    return plan.req.image_seed(plan.seed, index)


def debug_key(req: GenerationRequest) -> tuple:
    """The Developer Debug fields that change sampling, for the batch keys: requests with
    other values never share a UNet batch (overwrite_switch is in the keys' refiner switch step)."""
    return (req.clip_skip, req.disable_seed_increment, req.refiner_swap_method, req.freeu)


class _stage:
    """Times a stage, minus the model-management time spent inside it."""

    def __init__(self, stage_ms: dict, name: str) -> None:
        self.stage_ms, self.name = stage_ms, name

    def __enter__(self) -> None:
        from ldm_patched.modules import telemetry
        self.mm_before = telemetry.COUNTERS.management_seconds
        self.start = time.perf_counter()

    def __exit__(self, *exc) -> None:
        from ldm_patched.modules import telemetry
        _synchronize()
        mm = telemetry.COUNTERS.management_seconds - self.mm_before
        self.stage_ms[self.name] += (time.perf_counter() - self.start - mm) * 1000


def _synchronize() -> None:
    device = model_management.get_manager().device
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _switch_served(counters) -> str:
    """How the request reached its patch sets: nothing to do, kept variants, merges, or both."""
    merged = counters.weights_patched - counters.weights_from_variants
    if counters.weights_from_variants and merged:
        return "variants+merge"
    if counters.weights_from_variants:
        return "variants"
    if merged:
        return "merge"
    return "restore" if counters.weights_restored else "none"


# -- outputs ------------------------------------------------------------------------------

def save_image(pixels: np.ndarray, metadata: parameters.ImageMetadata, cfg: config_module.Config,
               fmt: str = "png") -> image_output.SavedImage:
    """The image file under outputs/<date>/ (the temp folder without the image log, or
    when the output folder cannot be written), with the generation parameters in its
    metadata (the size recorded is the one saved) unless --disable-metadata or the request's
    save_metadata_to_images is off. Runs on the writer thread."""
    now = datetime.datetime.now()
    day = now.strftime("%Y-%m-%d")
    fallback = cfg.temp_root / day
    folder = Path(cfg.path_outputs) / day if cfg.image_log else fallback
    metadata = metadata.sized(pixels.shape[1], pixels.shape[0])
    embedded = (image_output.Metadata(metadata.text(image_output.metadata_room(fmt)), metadata.scheme)
                if cfg.metadata and metadata.save else None)
    stem = f"{now.strftime('%Y-%m-%d_%H-%M-%S')}_{metadata.fields['seed']}"
    saved = image_output.save(pixels, embedded, fmt, folder, fallback, stem)
    if cfg.image_log and not saved.warning:   # the history log lists what is in the day's folder
        try:
            history_log.append(str(folder), saved.path, metadata.fields)
        except OSError as error:   # e.g. a symlink planted at log.html: the image stays, the log is skipped
            log.warning("%s: the history log was not written (%s)", folder, error.strerror or error)
            return image_output.SavedImage(saved.path, "the history log could not be written")
    return saved
