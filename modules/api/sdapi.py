"""The AUTOMATIC1111 ``/sdapi/v1`` subset that webuiapi, Open WebUI and SillyTavern call.

Mapping onto our request: ``prompt`` (``<lora:name:weight>`` tags work as in Fooocus),
``negative_prompt``, ``styles`` (our styles), ``seed``, ``steps``, ``cfg_scale``, ``width``,
``height``, ``batch_size`` x ``n_iter`` images, ``sampler_name`` + ``scheduler`` (A1111's
names, e.g. "Euler a" or "DPM++ 2M Karras", onto our sampler and scheduler), and from
``override_settings``: ``sd_model_checkpoint``, ``sd_vae``, ``samples_format``,
``CLIP_stop_at_last_layers`` (2-12: our ``clip_skip``; 1, A1111's default, keeps the
penultimate layer, which is also what A1111 itself gives SDXL at 1). A field
that is not sent keeps our config's default (so an omitted ``steps`` is the performance
mode's, not A1111's 50). img2img: ``init_images[0]`` with ``denoising_strength`` is a Vary
at that denoise (the output is sized as Vary sizes it; ``width``/``height`` are not used);
with ``mask`` it is an inpaint at that strength.

Fields A1111 clients always send are accepted and ignored where that changes nothing they
asked for (``eta``, ``s_*``, ``hr_*`` with ``enable_hr`` false, ``send_images``,
``save_images``...); refused (422, naming the field) where ignoring would mislead
(``enable_hr``, ``restore_faces``, ``tiling``, ``subseed_strength``, ``script_name``, an
enabled ``alwayson_scripts`` entry, ``inpainting_mask_invert``...).
"""

import io
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from modules import config as config_module
from modules import flags
from modules.api import common, jobs
from modules.api.auth import Principal
from modules.api.context import ApiContext

NAMES = {"clip_skip": "override_settings.CLIP_stop_at_last_layers", "guidance_scale": "cfg_scale", "image_number": "batch_size", "sampler": "sampler_name",
         "base_model": "override_settings.sd_model_checkpoint", "vae": "override_settings.sd_vae",
         "output_format": "override_settings.samples_format", "input_image": "init_images",
         "inpaint_mask": "mask", "overwrite_vary_strength": "denoising_strength",
         "inpaint_strength": "denoising_strength"}

# A1111 sampler name -> (our sampler, the scheduler "automatic" means for it, aliases),
# from A1111's sampler tables (sd_samplers_kdiffusion and friends).
SAMPLERS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "DPM++ 2M": ("dpmpp_2m", "karras", ("k_dpmpp_2m",)),
    "DPM++ SDE": ("dpmpp_sde_gpu", "karras", ("k_dpmpp_sde",)),
    "DPM++ 2M SDE": ("dpmpp_2m_sde_gpu", "exponential", ("k_dpmpp_2m_sde",)),
    "DPM++ 2S a": ("dpmpp_2s_ancestral", "karras", ("k_dpmpp_2s_a",)),
    "DPM++ 3M SDE": ("dpmpp_3m_sde_gpu", "exponential", ("k_dpmpp_3m_sde",)),
    "Euler a": ("euler_ancestral", "normal", ("k_euler_a", "k_euler_ancestral")),
    "Euler": ("euler", "normal", ("k_euler",)),
    "LMS": ("lms", "normal", ("k_lms",)),
    "Heun": ("heun", "normal", ("k_heun",)),
    "DPM2": ("dpm_2", "karras", ("k_dpm_2",)),
    "DPM2 a": ("dpm_2_ancestral", "karras", ("k_dpm_2_a",)),
    "DPM fast": ("dpm_fast", "normal", ("k_dpm_fast",)),
    "DPM adaptive": ("dpm_adaptive", "normal", ("k_dpm_ad",)),
    "Restart": ("restart", "karras", ("restart",)),
    "DDIM": ("ddim", "normal", ("ddim",)),
    "DDPM": ("ddpm", "normal", ("ddpm",)),
    "UniPC": ("uni_pc", "normal", ("unipc",)),
    "LCM": ("lcm", "lcm", ("k_lcm",)),
}
# A1111 scheduler name -> (label, ours); "automatic" is the sampler's own.
SCHEDULERS: dict[str, tuple[str, str | None]] = {
    "automatic": ("Automatic", None), "uniform": ("Uniform", "normal"), "karras": ("Karras", "karras"),
    "exponential": ("Exponential", "exponential"), "polyexponential": ("Polyexponential", "polyexponential"),
    "sgm_uniform": ("SGM Uniform", "sgm_uniform"), "kl_optimal": ("KL Optimal", "kl_optimal"),
    "align_your_steps": ("Align Your Steps", "align_your_steps"), "simple": ("Simple", "simple"),
    "normal": ("Normal", "normal"), "ddim": ("DDIM", "ddim_uniform"), "beta": ("Beta", "beta"),
}
# Option keys A1111 clients send with a value that is the only one we implement.
_ONLY_SETTING: dict[str, Any] = {}


def _ours() -> tuple[set[str], set[str]]:
    from modules.core import SAMPLERS as OUR_SAMPLERS, SCHEDULERS as OUR_SCHEDULERS

    return set(OUR_SAMPLERS), set(OUR_SCHEDULERS)


def supported_samplers(ours: set[str]) -> list[str]:
    return [name for name, (sampler, _, _) in SAMPLERS.items() if sampler in ours]


def supported_schedulers(ours: set[str]) -> list[str]:
    return [name for name, (_, scheduler) in SCHEDULERS.items() if scheduler is None or scheduler in ours]


def _scheduler_of(name: str | None, ours: set[str]) -> str | None:
    """Our scheduler for an A1111 scheduler name or label; None for automatic/absent."""
    if name in (None, ""):
        return None
    wanted = name.strip().casefold()
    found = [our for key, (label, our) in SCHEDULERS.items() if wanted in (key, label.casefold())]
    if not found or (found[0] is not None and found[0] not in ours):
        raise common.ApiError(422, f"field 'scheduler': unknown or unsupported scheduler {name!r}; available: "
                                   f"{', '.join(supported_schedulers(ours))}")
    return found[0]


def _sampler_entry(text: str) -> tuple[str, str | None] | None:
    """(A1111 sampler name, the scheduler its name carries) for a name, alias or old
    name with a scheduler suffix ("DPM++ 2M Karras")."""
    folded = text.casefold()
    for name, (_, _, aliases) in SAMPLERS.items():
        if folded == name.casefold() or folded in aliases:
            return name, None
        for suffix in ("karras", "exponential"):
            if folded == f"{name.casefold()} {suffix}":
                return name, suffix
    return None


def sampler_and_scheduler(sampler_name: str | None, scheduler_name: str | None,
                          ours: tuple[set[str], set[str]] | None = None) -> tuple[str | None, str | None]:
    """(our sampler, our scheduler) for an A1111 sampler name ("Euler a", "k_euler_a",
    "DPM++ 2M Karras" with its scheduler in the name, or one of our own names) and scheduler
    (a name or label; "automatic" is the sampler's own). None: not sent, config's default."""
    our_samplers, our_schedulers = ours or _ours()
    scheduler = _scheduler_of(scheduler_name, our_schedulers)
    if sampler_name in (None, ""):
        return None, scheduler
    text = sampler_name.strip()
    if text in our_samplers:
        return text, scheduler
    entry = _sampler_entry(text)
    if entry is None or SAMPLERS[entry[0]][0] not in our_samplers:
        raise common.ApiError(422, f"field 'sampler_name': unknown or unsupported sampler {sampler_name!r}; "
                                   f"available: {', '.join(supported_samplers(our_samplers))}")
    name, suffixed = entry
    sampler, own, _ = SAMPLERS[name]
    chosen = scheduler or suffixed or own
    if chosen not in our_schedulers:
        raise common.ApiError(422, f"field 'scheduler': {chosen!r} (for {name}) is not available; choose one "
                                   f"of {', '.join(supported_schedulers(our_schedulers))}")
    return sampler, chosen


class Txt2ImgRequest(BaseModel):
    """POST /sdapi/v1/txt2img. Unknown fields are accepted and ignored."""

    model_config = ConfigDict(extra="allow")

    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] = Field(default_factory=list, description="our style names (/sdapi/v1/prompt-styles)")
    seed: int = Field(-1, ge=-1)
    subseed: int = -1
    subseed_strength: float = Field(0.0, description="variation seeds are not supported: only 0")
    sampler_name: str | None = Field(None, description="A1111's name, e.g. 'Euler a' or 'DPM++ 2M Karras'")
    sampler_index: str | None = Field(None, description="old name of sampler_name")
    scheduler: str | None = Field(None, description="e.g. 'automatic', 'karras'")
    batch_size: int = Field(1, ge=1, le=32)
    n_iter: int = Field(1, ge=1, le=32)
    steps: int | None = Field(None, ge=1, le=200, description="omitted: the performance mode's steps")
    cfg_scale: float | None = Field(None, ge=0.0, le=30.0)
    width: int | None = Field(None, ge=64, le=4096)
    height: int | None = Field(None, ge=64, le=4096)
    restore_faces: bool | None = Field(None, description="not supported: only false")
    tiling: bool | None = Field(None, description="not supported: only false")
    enable_hr: bool = Field(False, description="hires fix is not supported: only false")
    denoising_strength: float | None = Field(None, description="txt2img: only for hires fix, not used")
    override_settings: dict[str, Any] = Field(default_factory=dict,
                                              description="sd_model_checkpoint, sd_vae, samples_format are used")
    override_settings_restore_afterwards: bool = True
    script_name: str | None = Field(None, description="scripts are not supported: empty only")
    script_args: list[Any] = Field(default_factory=list)
    alwayson_scripts: dict[str, Any] = Field(default_factory=dict, description="only disabled entries")
    send_images: bool = True
    save_images: bool = False


class Img2ImgRequest(Txt2ImgRequest):
    """POST /sdapi/v1/img2img: a Vary at denoising_strength, or an inpaint with ``mask``."""

    init_images: list[str] = Field(min_length=1, max_length=1, description="one base64 image")
    denoising_strength: float = Field(0.75, gt=0.0, le=1.0)
    mask: str | None = Field(None, description="base64; white repaints")
    resize_mode: int = 0
    inpainting_mask_invert: int = Field(0, description="not supported: only 0")
    mask_blur: int | None = None
    inpainting_fill: int | None = None
    inpaint_full_res: bool | int | None = None
    include_init_images: bool = False


class ImagesResponse(BaseModel):
    images: list[str] = Field(description="base64 images")
    parameters: dict[str, Any]
    info: str = Field(description="JSON text: seeds, sizes, infotexts, and fooocus_report (ours)")


# -- their body -> our request -----------------------------------------------------------------

_ONLY_FALSE = ("restore_faces", "tiling", "enable_hr")


def _refusals(body: Txt2ImgRequest) -> None:
    for key in _ONLY_FALSE:
        if getattr(body, key):
            raise common.ApiError(422, f"field '{key}': not supported here; send false")
    if body.subseed_strength:
        raise common.ApiError(422, "field 'subseed_strength': variation seeds are not supported; send 0")
    if body.script_name:
        raise common.ApiError(422, f"field 'script_name': scripts are not supported ({body.script_name!r})")
    for name, script in body.alwayson_scripts.items():
        args = script.get("args") if isinstance(script, dict) else None
        if args and args[0] not in (False, None) and args != [{}]:
            raise common.ApiError(422, f"field 'alwayson_scripts.{name}': extensions are not supported; "
                                       f"leave it out or disabled")
    if body.batch_size * body.n_iter > 32:
        raise common.ApiError(422, f"field 'batch_size': batch_size x n_iter is "
                                   f"{body.batch_size * body.n_iter}; at most 32 images")


def _settings(overrides: dict[str, Any], cfg: config_module.Config, out: dict) -> list[str]:
    """override_settings onto the request; returns the keys it ignored."""
    ignored = []
    for key, value in overrides.items():
        if key == "sd_model_checkpoint":
            out["base_model"] = common.checkpoint_name(value, cfg, "override_settings.sd_model_checkpoint")
        elif key == "sd_vae":
            out["vae"] = flags.DEFAULT_VAE if value in (None, "", "Automatic", "None") else value
        elif key == "samples_format":
            out["output_format"] = "jpeg" if value == "jpg" else value
        elif key == "CLIP_stop_at_last_layers":
            if value != 1:   # 1: A1111's default; for SDXL it conditions on the penultimate layer, as ours does
                out["clip_skip"] = value
        elif key in _ONLY_SETTING:
            if value != _ONLY_SETTING[key]:
                raise common.ApiError(422, f"field 'override_settings.{key}': only {_ONLY_SETTING[key]} here")
        else:
            ignored.append(key)
    return ignored


def to_request(body: Txt2ImgRequest, cfg: config_module.Config,
               resolve: Callable[[Any, str], Any]) -> tuple[dict, list[str]]:
    """(our request dict, override keys ignored) for a txt2img or img2img body."""
    _refusals(body)
    sent = body.model_fields_set
    out: dict[str, Any] = {"prompt": body.prompt, "image_number": body.batch_size * body.n_iter}
    for key in ("negative_prompt", "styles", "seed", "steps"):
        if key in sent and getattr(body, key) is not None:
            out[key] = getattr(body, key)
    if body.cfg_scale is not None:
        out["guidance_scale"] = body.cfg_scale
    sampler, scheduler = sampler_and_scheduler(body.sampler_name or body.sampler_index, body.scheduler)
    out.update({k: v for k, v in (("sampler", sampler), ("scheduler", scheduler)) if v is not None})
    ignored = _settings(body.override_settings, cfg, out)
    if isinstance(body, Img2ImgRequest):
        _img2img(body, out, resolve)
    else:
        out.update({k: getattr(body, k) for k in ("width", "height") if getattr(body, k) is not None})
    return out, ignored


def _img2img(body: Img2ImgRequest, out: dict, resolve: Callable[[Any, str], Any]) -> None:
    if body.inpainting_mask_invert:
        raise common.ApiError(422, "field 'inpainting_mask_invert': not supported; send 0 (white repaints)")
    out["input_image"] = resolve(body.init_images[0], "init_images")
    if body.mask:
        out.update(inpaint_mask=resolve(body.mask, "mask"), inpaint_strength=body.denoising_strength)
    else:
        out.update(uov_method=flags.VARY_STRONG, overwrite_vary_strength=body.denoising_strength)


# -- our job -> their answer -------------------------------------------------------------------

def info_text(body: Txt2ImgRequest, job: jobs.ApiJob, ignored: list[str]) -> str:
    report = job.report
    seeds = job.seeds()
    sampler = body.sampler_name or body.sampler_index or report.get("sampler")
    lines = [f"{body.prompt}\nNegative prompt: {body.negative_prompt}\nSteps: {report.get('steps')}, "
             f"Sampler: {sampler}, Schedule type: {report.get('scheduler')}, CFG scale: {report.get('cfg')}, "
             f"Seed: {seed}, Size: {report.get('width')}x{report.get('height')}, Model: {report.get('base_model')}"
             for seed in seeds]
    return json.dumps({
        "prompt": body.prompt, "all_prompts": [body.prompt] * len(seeds), "negative_prompt": body.negative_prompt,
        "all_negative_prompts": [body.negative_prompt] * len(seeds), "seed": seeds[0] if seeds else report.get("seed"),
        "all_seeds": seeds, "subseed": -1, "all_subseeds": [-1] * len(seeds), "subseed_strength": 0,
        "width": report.get("width"), "height": report.get("height"), "sampler_name": sampler,
        "scheduler": report.get("scheduler"), "cfg_scale": report.get("cfg"), "steps": report.get("steps"),
        "batch_size": len(seeds), "restore_faces": False, "sd_model_name": Path(str(report.get("base_model"))).stem,
        "sd_model_hash": None, "denoising_strength": getattr(body, "denoising_strength", None),
        "styles": body.styles, "infotexts": lines, "index_of_first_image": 0, "ignored_settings": ignored,
        "interrupted": job.stopped, "version": "fooocus-resident", "fooocus_report": report})


def images_response(body: Txt2ImgRequest, job: jobs.ApiJob, ignored: list[str]) -> ImagesResponse:
    parameters = body.model_dump(mode="json")
    for key in ("init_images", "mask"):
        if key in parameters:
            parameters[key] = None   # as A1111: the images are not echoed back
    images = [jobs.file_base64(path) for path in job.images] if body.send_images else []
    return ImagesResponse(images=images, parameters=parameters, info=info_text(body, job, ignored))


# -- routes ------------------------------------------------------------------------------------

def router(ctx: ApiContext, principal: Callable[..., Principal], route_class: type) -> APIRouter:
    api = APIRouter(prefix="/sdapi/v1", route_class=route_class, tags=["AUTOMATIC1111 sdapi"])
    Caller = Depends(principal)

    async def generate(body: Txt2ImgRequest, job_type: str, http_request: Request, caller: Principal):
        def resolve(value: Any, field: str) -> Any:
            return common.own_file_or_value(value, caller.owner, ctx.jobs, field)

        request, ignored = to_request(body, ctx.config(), resolve)
        job = await common.run(ctx, request, caller.owner, job_type, http_request, NAMES)
        return images_response(body, job, ignored)

    @api.post("/txt2img", response_model=ImagesResponse, summary="Text to image")
    async def txt2img(body: Txt2ImgRequest, http_request: Request, caller: Principal = Caller):
        return await generate(body, jobs.TEXT_TO_IMAGE, http_request, caller)

    @api.post("/img2img", response_model=ImagesResponse, summary="Vary (init image) or inpaint (with mask)")
    async def img2img(body: Img2ImgRequest, http_request: Request, caller: Principal = Caller):
        kind = jobs.INPAINT_OR_OUTPAINT if body.mask else jobs.UPSCALE_OR_VARY
        return await generate(body, kind, http_request, caller)

    @api.get("/sd-models", summary="Checkpoints")
    async def sd_models(caller: Principal = Caller) -> list[dict]:
        return [{"title": name, "model_name": str(Path(name).with_suffix("")), "hash": None, "sha256": None,
                 "filename": name, "config": None}
                for name in config_module.list_model_files(ctx.config().path_checkpoints)]

    @api.get("/loras", summary="LoRAs (use as <lora:name:weight> in the prompt)")
    async def loras(caller: Principal = Caller) -> list[dict]:
        return [{"name": str(Path(name).with_suffix("")), "alias": Path(name).stem, "path": name, "metadata": {}}
                for name in config_module.list_model_files(ctx.config().path_loras, (".safetensors",))]

    @api.get("/samplers", summary="Samplers, by A1111's names")
    async def samplers(caller: Principal = Caller) -> list[dict]:
        return [{"name": name, "aliases": [SAMPLERS[name][0], *SAMPLERS[name][2]],
                 "options": {"scheduler": SAMPLERS[name][1]}} for name in supported_samplers(_ours()[0])]

    @api.get("/schedulers", summary="Schedulers, by A1111's names")
    async def schedulers(caller: Principal = Caller) -> list[dict]:
        return [{"name": name, "label": SCHEDULERS[name][0], "aliases": None, "default_rho": -1,
                 "need_inner_model": False} for name in supported_schedulers(_ours()[1])]

    @api.get("/sd-vae", summary="VAEs")
    async def sd_vae(caller: Principal = Caller) -> list[dict]:
        return [{"model_name": name, "filename": name}
                for name in config_module.list_model_files(ctx.config().path_vae)]

    @api.get("/prompt-styles", summary="Our styles")
    async def prompt_styles(caller: Principal = Caller) -> list[dict]:
        from modules import sdxl_styles

        library = sdxl_styles.get_library(ctx.config().path_styles)
        return [{"name": s.name, "prompt": s.prompt, "negative_prompt": s.negative_prompt}
                for s in library.styles.values()]

    @api.get("/scripts", summary="Scripts: none")
    async def scripts(caller: Principal = Caller) -> dict:
        return {"txt2img": [], "img2img": []}

    @api.get("/options", summary="The options API clients read")
    async def get_options(caller: Principal = Caller) -> dict:
        cfg = ctx.config()
        names = config_module.list_model_files(cfg.path_checkpoints)
        current = ctx.options.checkpoint or cfg.default_model or (names[0] if names else "")
        return {"sd_model_checkpoint": current, "sd_checkpoint_hash": None,
                "sd_vae": "Automatic" if cfg.default_vae == flags.DEFAULT_VAE else cfg.default_vae,
                "samples_format": cfg.default_output_format, "CLIP_stop_at_last_layers": 1}

    @api.post("/options", summary="sd_model_checkpoint: the default checkpoint of every API request")
    async def set_options(body: dict[str, Any], caller: Principal = Caller) -> None:
        if "sd_model_checkpoint" in body:
            ctx.options.set_checkpoint(common.checkpoint_name(body["sd_model_checkpoint"], ctx.config(),
                                                       "sd_model_checkpoint"))
        return None

    def current_job(caller: Principal) -> jobs.ApiJob | None:
        mine = [job for job in ctx.jobs.of(caller.owner) if not job.finished]
        running = [job for job in mine if job.stage == jobs.RUNNING]
        return (running or mine or [None])[0]

    @api.get("/progress", summary="Your running job's progress and preview")
    async def progress(skip_current_image: bool = False, caller: Principal = Caller) -> dict:
        job = current_job(caller)
        if job is None:
            return {"progress": 0.0, "eta_relative": 0.0, "state": _state(0, None), "current_image": None,
                    "textinfo": None, "current_task": None}
        snap = job.task.progress
        return {"progress": snap.percent / 100.0, "eta_relative": 0.0,
                "state": _state(len([j for j in ctx.jobs.of(caller.owner) if not j.finished]), job),
                "current_image": None if skip_current_image else jobs.preview_png(job),
                "textinfo": snap.text, "current_task": job.id}

    @api.post("/interrupt", summary="Stop your jobs")
    async def interrupt(caller: Principal = Caller) -> None:
        for job in ctx.jobs.of(caller.owner):
            if not job.finished:
                ctx.jobs.stop(job)

    @api.post("/skip", summary="Skip the image your running job samples")
    async def skip(caller: Principal = Caller) -> None:
        job = current_job(caller)
        if job is not None:
            ctx.jobs.skip(job)

    @api.post("/refresh-checkpoints", summary="Folders are read on every call: nothing to do")
    async def refresh_checkpoints(caller: Principal = Caller) -> None:
        return None

    @api.post("/refresh-loras", summary="Folders are read on every call: nothing to do")
    async def refresh_loras(caller: Principal = Caller) -> None:
        return None

    @api.post("/unload-checkpoint", summary="Unload every model (waits for a running request)")
    async def unload_checkpoint(caller: Principal = Caller) -> dict:
        import asyncio

        from modules import resident_memory

        return await asyncio.wrap_future(ctx.worker().call(resident_memory.free_memory))

    @api.get("/memory", summary="Memory, from our ledgers (not torch's allocator)")
    async def memory(caller: Principal = Caller) -> dict:
        return memory_answer(await anyio.to_thread.run_sync(ctx.worker().status_snapshot))

    @api.post("/png-info", summary="Generation parameters in an image")
    async def png_info(body: dict[str, Any], caller: Principal = Caller) -> dict:
        return png_info_answer(body.get("image"))

    return api


def _state(count: int, job: jobs.ApiJob | None) -> dict:
    snap = job.task.progress if job is not None else None
    return {"skipped": bool(job and job.task.control.skip.is_set()),
            "interrupted": bool(job and job.task.control.stop.is_set()), "job": job.id if job else "",
            "job_count": count, "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(job.created_ms / 1000))
            if job else "", "job_no": 0, "sampling_step": snap.step if snap else 0,
            "sampling_steps": snap.steps if snap else 0}


def memory_answer(status: dict) -> dict:
    """A1111's /memory shape, filled from our ledgers; ``fooocus`` is the whole registry status."""
    def usage(ledger: dict) -> dict:
        total, used = int(ledger.get("budget_bytes") or 0), int(ledger.get("used_bytes") or 0)
        return {"free": max(total - used, 0), "used": used, "total": total}

    device = status.get("device_ledger") or {}
    host = status.get("host") or device
    on_cuda = str(status.get("device", "")).startswith("cuda")
    used = int(device.get("used_bytes") or 0)
    peak = max((status.get("cache_stats") or {}).get("high_water_bytes", {}).values() or [used])
    cuda = ({"system": usage(device), "active": {"current": used, "peak": peak},
             "allocated": {"current": used, "peak": peak}, "reserved": {"current": used, "peak": peak},
             "inactive": {"current": 0, "peak": 0},
             "events": {"retries": 0, "oom": (status.get("cache_stats") or {}).get("out_of_memory", 0)}}
            if on_cuda else {"error": f"no CUDA device: models are on {status.get('device', 'the CPU')}"})
    return {"ram": usage(host), "cuda": cuda, "fooocus": status}


def png_info_answer(image: Any) -> dict:
    """A1111's png-info: the parameters text (a PNG's ``parameters`` chunk, or a JPEG's or
    WebP's EXIF UserComment), the other text chunks, and the request fields in the text:
    ours, upstream Fooocus's in either scheme, or AUTOMATIC1111's own."""
    import base64
    import binascii

    from PIL import Image

    from modules import image_output, parameters

    if not isinstance(image, str) or not image:
        raise common.ApiError(422, "field 'image' must be a base64 image")
    text = image.partition(",")[2] if image.startswith("data:") else image
    try:
        data = base64.b64decode(text, validate=True)
        raw, scheme = image_output.read_metadata(data)
        with Image.open(io.BytesIO(data)) as picture:
            chunks = {k: v for k, v in picture.info.items() if isinstance(k, str) and isinstance(v, str)}
    except (binascii.Error, ValueError, OSError, Image.DecompressionBombError):
        raise common.ApiError(422, "field 'image': not a base64 image") from None
    try:
        fields = parameters.parse_metadata(raw, scheme) if raw else {}
    except parameters.ParameterError:
        fields = {}
    return {"info": raw or "", "items": {k: v for k, v in chunks.items() if k != "parameters"},
            "parameters": fields}
