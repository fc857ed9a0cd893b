"""mrhan1993/Fooocus-API's REST routes, on our worker.

Its request fields map one to one onto our request dict; a field the client did not send
is left out, so our config's defaults apply exactly as for ``/generate`` (the same
parameters give the same pixels). Fields we have no feature for are accepted at their
default and refused (422, naming the field) when set to something we would silently not
do (NSFW blackout, custom outpaint distances, "Upscale (Custom)", FaceSwap...); ``save_name``
is accepted and not used. ``save_meta``, ``meta_scheme`` and ``read_wildcards_in_order`` are
our ``save_metadata_to_images``, ``metadata_scheme`` and ``read_wildcards_in_order``. The
Developer Debug sampling fields (``adaptive_cfg``,
``clip_skip``, ``refiner_swap_method``, ``freeu_*``, ``disable_seed_increment``, ``disable_preview``,
``disable_intermediate_results``, ``generate_image_grid``) and inpaint fields (``inpaint_engine``,
``inpaint_erode_or_dilate``, ``invert_mask_checkbox``, ``inpaint_disable_initial_latent``,
``debugging_inpaint_preprocessor``) and the Control tab's (``controlnet_softness``, the Canny
thresholds, ``skipping_cn_preprocessor``, ``debugging_cn_preprocessor``) carry over under their
own names.

v1 image routes take multipart uploads (``input_image``, ``input_mask``, ``cn_img1..4``,
``loras`` and ``advanced_params`` as JSON text); v2 routes take JSON with base64 images.
Sync calls answer ``[{base64, url, seed, finish_reason}]``; ``async_process`` answers a job
(``job_id, job_type, job_stage, job_progress, job_status, job_step_preview, job_result``,
plus ``job_report``: our per-request report) to follow with ``query-job``.
"""

import json
from collections.abc import Callable
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.datastructures import UploadFile

from modules import config as config_module
from modules import flags, input_image_page
from modules.api import common, jobs
from modules.api.auth import Principal
from modules.api.context import ApiContext

# Our field -> theirs, for error messages.
NAMES = {"styles": "style_selections", "performance": "performance_selection",
         "aspect_ratio": "aspect_ratios_selection", "seed": "image_seed", "base_model": "base_model_name",
         "refiner_model": "refiner_model_name", "output_format": "save_extension", "inpaint_mask": "input_mask",
         "sampler": "advanced_params.sampler_name", "scheduler": "advanced_params.scheduler_name",
         "steps": "advanced_params.overwrite_step", "width": "advanced_params.overwrite_width",
         "height": "advanced_params.overwrite_height", "vae": "advanced_params.vae_name",
         "metadata_scheme": "meta_scheme", "save_metadata_to_images": "save_meta",
         "overwrite_switch": "advanced_params.overwrite_switch",
         **{f"adm_scaler_{k}": f"advanced_params.adm_scaler_{k}" for k in ("positive", "negative", "end")},
         **{k: f"advanced_params.{k}" for k in ("overwrite_vary_strength", "overwrite_upscale_strength",
                                                "inpaint_strength", "inpaint_respective_field")}}
_SAME = ("prompt", "negative_prompt", "image_number", "sharpness", "guidance_scale", "refiner_switch",
         "read_wildcards_in_order")
_RENAMED = {"style_selections": "styles", "aspect_ratios_selection": "aspect_ratio", "image_seed": "seed",
            "base_model_name": "base_model", "refiner_model_name": "refiner_model",
            "save_meta": "save_metadata_to_images", "meta_scheme": "metadata_scheme"}
_ADVANCED_SAME = ("adm_scaler_positive", "adm_scaler_negative", "adm_scaler_end", "overwrite_vary_strength",
                  "overwrite_upscale_strength", "inpaint_strength", "inpaint_respective_field",
                  "inpaint_erode_or_dilate", "invert_mask_checkbox", "inpaint_engine",
                  "inpaint_disable_initial_latent", "debugging_inpaint_preprocessor",
                  # Developer Debug Mode: the same request fields (modules/generation_request.py)
                  "adaptive_cfg", "clip_skip", "refiner_swap_method", "freeu_enabled", "freeu_b1", "freeu_b2",
                  "freeu_s1", "freeu_s2", "disable_seed_increment", "disable_preview", "disable_intermediate_results",
                  "generate_image_grid",
                  # its Control tab (image prompts of type PyraCanny / CPDS)
                  "controlnet_softness", "canny_low_threshold", "canny_high_threshold", "skipping_cn_preprocessor",
                  "debugging_cn_preprocessor")
NAMES.update({key: f"advanced_params.{key}" for key in _ADVANCED_SAME})
# Advanced fields we have no feature for: accepted at these values (upstream's defaults).
_ONLY_AT = {"black_out_nsfw": False, "debugging_dino": False, "dino_erode_or_dilate": 0,
            "debugging_enhance_masks_checkbox": False}
UOV_METHODS = tuple(m for m in flags.UOV_METHODS if m != flags.UOV_DISABLED)


class Lora(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    enabled: bool = True
    model_name: str
    weight: float = 0.5


class AdvancedParams(BaseModel):
    """Upstream's advanced_params; unknown keys are ignored, as upstream does."""

    model_config = ConfigDict(extra="allow")

    disable_preview: bool = Field(False, description="no job_step_preview")
    adm_scaler_positive: float = Field(1.5, ge=0.1, le=3.0)
    adm_scaler_negative: float = Field(0.8, ge=0.1, le=3.0)
    adm_scaler_end: float = Field(0.3, ge=0.0, le=1.0)
    disable_intermediate_results: bool = Field(False, description="finished images only at the end")
    disable_seed_increment: bool = Field(False, description="every image uses image_seed")
    adaptive_cfg: float = Field(7.0, ge=1.0, le=30.0, description="CFG mimicking from TSNR above this scale")
    clip_skip: int = Field(2, ge=1, le=12, description="CLIP layer from the end that conditions (2: penultimate)")
    sampler_name: str | None = Field(None, description="one of /sdapi/v1/samplers' aliases or ours, e.g. dpmpp_2m_sde_gpu")
    scheduler_name: str | None = Field(None, description="e.g. karras")
    overwrite_step: int = Field(-1, ge=-1, le=200, description="-1: the performance mode's steps")
    overwrite_switch: int = Field(-1, ge=-1, le=200, description="the step the refiner takes over at; -1: refiner_switch")
    overwrite_width: int = Field(-1, ge=-1, le=4096)
    overwrite_height: int = Field(-1, ge=-1, le=4096)
    overwrite_vary_strength: float = Field(-1, ge=-1, le=1.0, description="Vary's denoise; -1: 0.5 / 0.85")
    overwrite_upscale_strength: float = Field(-1, ge=-1, le=1.0, description="Upscale's denoise; -1: 0.382")
    mixing_image_prompt_and_vary_upscale: bool = Field(False, description="image prompts always combine")
    mixing_image_prompt_and_inpaint: bool = Field(False, description="image prompts always combine")
    refiner_swap_method: Literal["joint", "separate", "vae"] = "joint"
    controlnet_softness: float = Field(0.25, ge=0.0, le=1.0, description="weakens PyraCanny/CPDS on fine detail")
    canny_low_threshold: int = Field(64, ge=1, le=255)
    canny_high_threshold: int = Field(128, ge=1, le=255)
    skipping_cn_preprocessor: bool = Field(False, description="the image prompts are already edge/structure maps")
    debugging_cn_preprocessor: bool = Field(False, description="return the preprocessed image prompts instead")
    inpaint_engine: str = Field("v2.6", description="which inpaint patch file: None, v1, v2.5, v2.6")
    inpaint_strength: float = Field(1.0, ge=0.0, le=1.0)
    inpaint_respective_field: float = Field(0.618, ge=0.0, le=1.0)
    vae_name: str | None = Field(None, description="a file in models/vae, or 'Default (model)'")
    freeu_enabled: bool = False
    freeu_b1: float = Field(1.01, ge=0.0, le=2.0)
    freeu_b2: float = Field(1.02, ge=0.0, le=2.0)
    freeu_s1: float = Field(0.99, ge=0.0, le=4.0)
    freeu_s2: float = Field(0.95, ge=0.0, le=4.0)
    black_out_nsfw: bool = Field(False, description="not supported (needs a safety checker): only false")
    invert_mask_checkbox: bool = Field(False, description="repaint what the mask leaves")
    inpaint_erode_or_dilate: int = Field(0, ge=-64, le=64, description="grow (+) or shrink (-) the mask, pixels")
    inpaint_disable_initial_latent: bool = Field(False, description="start from an empty latent")
    debugging_inpaint_preprocessor: bool = Field(False, description="return the prepared crop and mask")
    generate_image_grid: bool = Field(False, description="one more image: the batch's images as a grid (seed -1)")


class CommonRequest(BaseModel):
    """POST /v1/generation/text-to-image (and the base of every generation body)."""

    model_config = ConfigDict(protected_namespaces=())

    prompt: str = ""
    negative_prompt: str = Field("", description="omitted: config default_prompt_negative")
    style_selections: list[str] = Field(default_factory=list, description="omitted: config default_styles")
    performance_selection: flags.Performance = flags.Performance.SPEED
    aspect_ratios_selection: str = Field("1152*896", description="'W*H'; omitted: config default_aspect_ratio")
    image_number: int = Field(1, ge=1, le=32)
    image_seed: int = Field(-1, ge=-1, description="-1: random")
    sharpness: float = Field(2.0, ge=0.0, le=30.0)
    guidance_scale: float = Field(4.0, ge=1.0, le=30.0)
    base_model_name: str = Field("", description="a file in models/checkpoints; omitted: the default model")
    refiner_model_name: str = "None"
    refiner_switch: float = Field(0.8, ge=0.1, le=1.0)
    loras: list[Lora] = Field(default_factory=list, description="omitted: config default_loras")
    advanced_params: AdvancedParams = Field(default_factory=AdvancedParams)
    save_meta: bool = Field(True, description="parameters in the image files (none with --disable-metadata)")
    meta_scheme: str = "fooocus"
    save_extension: Literal["png", "jpg", "jpeg", "webp"] = "png"
    save_name: str = Field("", description="accepted, not used")
    read_wildcards_in_order: bool = False
    require_base64: bool = False
    async_process: bool = False
    webhook_url: str | None = Field("", description="used only under the operator's --webhook-allow prefixes")


class ImagePromptJson(BaseModel):
    cn_img: str | None = Field(None, description="base64 image (or a /api/v1/files URL of your own results)")
    cn_stop: float | None = Field(None, ge=0, le=1, description="0 or null: 0.5")
    cn_weight: float | None = Field(None, ge=0, le=2, description="0 or null: 0.6")
    cn_type: Literal["ImagePrompt", "FaceSwap", "PyraCanny", "CPDS"] = "ImagePrompt"


class Text2ImgRequestWithPrompt(CommonRequest):
    image_prompts: list[ImagePromptJson] = Field(default_factory=list)


class ImgUpscaleOrVaryRequestJson(Text2ImgRequestWithPrompt):
    uov_method: Literal[UOV_METHODS] = flags.UPSCALE_2   # type: ignore[valid-type]
    upscale_value: float | None = Field(None, description="only for 'Upscale (Custom)', which is not supported")
    input_image: str


class ImgInpaintOrOutpaintRequestJson(Text2ImgRequestWithPrompt):
    input_image: str
    input_mask: str | None = None
    inpaint_additional_prompt: str | None = ""
    outpaint_selections: list[Literal["Left", "Right", "Top", "Bottom"]] = Field(default_factory=list)
    outpaint_distance_left: int = Field(-1, description="custom distances are not supported: -1 or 0")
    outpaint_distance_right: int = -1
    outpaint_distance_top: int = -1
    outpaint_distance_bottom: int = -1


class ImgPromptRequestJson(ImgInpaintOrOutpaintRequestJson):
    input_image: str | None = None
    image_prompts: list[ImagePromptJson]


class GeneratedImageResult(BaseModel):
    base64: str | None = Field(description="the image as base64 when require_base64")
    url: str | None = Field(description="the image on /api/v1/files (with your credentials)")
    seed: str
    finish_reason: Literal["SUCCESS", "QUEUE_IS_FULL", "USER_CANCEL", "ERROR"]


class AsyncJobResponse(BaseModel):
    job_id: str
    job_type: str
    job_stage: Literal["WAITING", "RUNNING", "SUCCESS", "ERROR"]
    job_progress: int
    job_status: str | None = None
    job_step_preview: str | None = None
    job_result: list[GeneratedImageResult] | None = None
    job_report: dict | None = Field(None, description="ours: the request's report (model management, timings)")


class JobQueueInfo(BaseModel):
    running_size: int = Field(description="requests queued or running on the server, every client's")
    finished_size: int = Field(description="your finished jobs in the history")
    last_job_id: str | None = Field(description="your last job")


class JobHistoryInfo(BaseModel):
    job_id: str
    job_type: str
    job_stage: str
    is_finished: bool
    in_queue_mills: int
    start_mills: int
    finish_mills: int


class JobHistoryResponse(BaseModel):
    queue: list[JobHistoryInfo] = []
    history: list[JobHistoryInfo] = []


class AllModelNamesResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    model_filenames: list[str]
    lora_filenames: list[str]


class StopResponse(BaseModel):
    msg: str
    stopped: list[str] = Field(default_factory=list, description="ours: the ids of the jobs stopped")


# -- their body -> our request -----------------------------------------------------------

def _refuse(field: str, why: str) -> common.ApiError:
    return common.ApiError(422, f"field '{field}': {why}")


def _advanced(params: AdvancedParams, out: dict) -> None:
    sent = params.model_fields_set
    for key, value in _ONLY_AT.items():
        if key in sent and getattr(params, key, value) != value:
            raise _refuse(f"advanced_params.{key}", f"not supported here; only {json.dumps(value)}")
    for key in _ADVANCED_SAME:
        if key in sent:
            out[key] = getattr(params, key)
    for theirs, ours in (("sampler_name", "sampler"), ("scheduler_name", "scheduler"), ("vae_name", "vae")):
        if getattr(params, theirs):
            out[ours] = getattr(params, theirs)
    for theirs, ours in (("overwrite_step", "steps"), ("overwrite_width", "width"), ("overwrite_height", "height")):
        if getattr(params, theirs) > 0:
            out[ours] = getattr(params, theirs)
    if params.overwrite_switch > 0:
        out["overwrite_switch"] = params.overwrite_switch


def _image_prompts(prompts: list[ImagePromptJson], resolve: Callable[[Any, str], Any]) -> list[list]:
    out = []
    for index, prompt in enumerate(prompts):
        if not prompt.cn_img:
            continue   # an empty slot, as upstream clients send four
        out.append([resolve(prompt.cn_img, f"image_prompts[{index}].cn_img"), prompt.cn_stop or None,
                    prompt.cn_weight or None, prompt.cn_type])
    return out


def to_request(body: CommonRequest, resolve: Callable[[Any, str], Any]) -> dict:
    """Our request dict for a Fooocus-API body (only the fields it sent); ``resolve`` turns
    an image field's value into what our parser takes (our own file URLs into base64)."""
    sent = body.model_fields_set
    out: dict[str, Any] = {"prompt": body.prompt}
    for key in _SAME:
        if key in sent:
            out[key] = getattr(body, key)
    for theirs, ours in _RENAMED.items():
        if theirs in sent:
            out[ours] = getattr(body, theirs)
    if "performance_selection" in sent:
        out["performance"] = body.performance_selection.value
    if "loras" in sent:
        out["loras"] = [[lora.model_name, lora.weight] for lora in body.loras if lora.enabled]
    if "save_extension" in sent:
        out["output_format"] = "jpeg" if body.save_extension == "jpg" else body.save_extension
    _advanced(body.advanced_params, out)
    if isinstance(body, Text2ImgRequestWithPrompt):
        out["image_prompts"] = _image_prompts(body.image_prompts, resolve)
    if isinstance(body, ImgUpscaleOrVaryRequestJson):
        out.update(input_image=resolve(body.input_image, "input_image"), uov_method=body.uov_method)
    if isinstance(body, ImgInpaintOrOutpaintRequestJson):
        _inpaint(body, out, resolve)
    return out


def _inpaint(body: ImgInpaintOrOutpaintRequestJson, out: dict, resolve: Callable[[Any, str], Any]) -> None:
    for side in ("left", "right", "top", "bottom"):
        if getattr(body, f"outpaint_distance_{side}") > 0:
            raise _refuse(f"outpaint_distance_{side}", "custom outpaint distances are not supported; "
                                                       "-1 or 0 (30 % of the side, as Fooocus)")
    if not body.input_image:
        return   # the image-prompt route without an image to inpaint
    out["input_image"] = resolve(body.input_image, "input_image")
    if body.input_mask:
        out["inpaint_mask"] = resolve(body.input_mask, "input_mask")
    out["outpaint_selections"] = list(body.outpaint_selections)
    out["prompt"] = input_image_page.inpaint_prompt(out["prompt"], body.inpaint_additional_prompt or "")


# -- our job -> their answers ------------------------------------------------------------------

def image_results(job: jobs.ApiJob, require_base64: bool) -> list[GeneratedImageResult]:
    if job.images:
        return [GeneratedImageResult(base64=jobs.file_base64(path) if require_base64 else None,
                                     url=job.image_url(index), seed=str(seed), finish_reason="SUCCESS")
                for index, (path, seed) in enumerate(zip(job.images, job.seeds()))]
    reason = "USER_CANCEL" if job.stopped else "ERROR"
    return [GeneratedImageResult(base64=None, url=None, seed="", finish_reason=reason)]


def job_response(job: jobs.ApiJob, step_preview: bool = False) -> AsyncJobResponse:
    progress = job.task.progress
    status = job.error or progress.text
    return AsyncJobResponse(
        job_id=job.id, job_type=job.job_type, job_stage=job.stage,
        job_progress=100 if job.finished else int(progress.percent), job_status=status,
        job_step_preview=jobs.preview_png(job) if step_preview else None,
        job_result=image_results(job, job.require_base64) if job.finished else None,
        job_report=job.report if job.finished else None)


def _history_info(job: jobs.ApiJob) -> JobHistoryInfo:
    return JobHistoryInfo(job_id=job.id, job_type=job.job_type, job_stage=job.stage, is_finished=job.finished,
                          **job.timings())


# -- v1 multipart forms ----------------------------------------------------------------------

_JSON_FIELDS = ("loras", "advanced_params")
_LIST_FIELDS = ("style_selections", "outpaint_selections")


async def form_body(http_request: Request, model: type[CommonRequest], limit: int) -> CommonRequest:
    """A v1 multipart body as the v2 JSON model (uploads as base64): one set of fields and checks."""
    form = await http_request.form(max_files=8, max_fields=200, max_part_size=limit)
    data: dict[str, Any] = {}
    prompts: dict[int, dict[str, Any]] = {}
    for key in form.keys():
        values = form.getlist(key)
        value = values[-1]
        if isinstance(value, UploadFile):
            value = await common.upload_base64(value, key, limit)
            if value is None:
                continue
        if key in _JSON_FIELDS:
            data[key] = _json_field(key, value)
        elif key in _LIST_FIELDS:
            data[key] = [part.strip() for v in values if isinstance(v, str) for part in v.split(",") if part.strip()]
        elif key[:-1] in ("cn_img", "cn_stop", "cn_weight", "cn_type") and key[-1] in "1234":
            prompts.setdefault(int(key[-1]), {})[key[:-1]] = value
        else:
            data[key] = value
    if prompts:
        data["image_prompts"] = [prompts[i] for i in sorted(prompts) if prompts[i].get("cn_img")]
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise RequestValidationError([{**e, "loc": ("body", *e["loc"])} for e in error.errors()]) from None


def _json_field(key: str, value: Any) -> Any:
    if value in (None, ""):
        return [] if key == "loras" else {}
    try:
        return json.loads(value)
    except (TypeError, ValueError) as error:
        raise _refuse(key, f"not valid JSON text ({error})") from None


def multipart_schema(model: type[BaseModel], files: tuple[str, ...]) -> dict:
    """The OpenAPI request body of a v1 route: the model's fields as form fields, images as files."""
    properties: dict[str, Any] = {}
    for name, schema in model.model_json_schema()["properties"].items():
        if name in files:
            properties[name] = {"type": "string", "format": "binary"}
        elif name in _JSON_FIELDS or name in _LIST_FIELDS or "$ref" in json.dumps(schema):
            properties[name] = {"type": "string", "description": f"{name}: JSON text" if name in _JSON_FIELDS
                                else f"{name}: comma-separated"}
        else:
            properties[name] = schema
    if "image_prompts" in properties:
        del properties["image_prompts"]
        for i in range(1, 5):
            properties.update({f"cn_img{i}": {"type": "string", "format": "binary"},
                               f"cn_stop{i}": {"type": "number"}, f"cn_weight{i}": {"type": "number"},
                               f"cn_type{i}": {"type": "string", "default": flags.IMAGE_PROMPT}})
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {
        "schema": {"type": "object", "properties": properties}}}}}


# -- routes ------------------------------------------------------------------------------------

def router(ctx: ApiContext, principal: Callable[..., Principal], route_class: type) -> APIRouter:
    api = APIRouter(route_class=route_class, tags=["Fooocus-API"])
    Caller = Depends(principal)
    answers = list[GeneratedImageResult] | AsyncJobResponse

    async def generate(body: CommonRequest, job_type: str, http_request: Request, caller: Principal):
        def resolve(value: Any, field: str) -> Any:
            return common.own_file_or_value(value, caller.owner, ctx.jobs, field)

        request = to_request(body, resolve)
        if body.async_process:
            webhook = _webhook(body.webhook_url, ctx)
            job = await common.submit(ctx, request, caller.owner, job_type, http_request, NAMES, webhook=webhook,
                                      require_base64=body.require_base64)
            return job_response(job)
        if body.webhook_url:
            raise _refuse("webhook_url", "only used with async_process: true")
        job = await common.run(ctx, request, caller.owner, job_type, http_request, NAMES)
        return image_results(job, body.require_base64)

    def json_route(path: str, model: type[CommonRequest], job_type: str, summary: str) -> None:
        async def endpoint(body: model, http_request: Request, caller: Principal = Caller):  # type: ignore[valid-type]
            return await generate(body, job_type, http_request, caller)

        api.add_api_route(path, endpoint, methods=["POST"], response_model=answers, summary=summary)

    def form_route(path: str, model: type[CommonRequest], job_type: str, files: tuple[str, ...],
                   summary: str) -> None:
        async def endpoint(http_request: Request, caller: Principal = Caller):
            body = await form_body(http_request, model, ctx.settings.max_upload_bytes)
            return await generate(body, job_type, http_request, caller)

        api.add_api_route(path, endpoint, methods=["POST"], response_model=answers, summary=summary,
                          openapi_extra=multipart_schema(model, files))

    json_route("/v1/generation/text-to-image", CommonRequest, jobs.TEXT_TO_IMAGE, "Text to image")
    json_route("/v2/generation/text-to-image-with-ip", Text2ImgRequestWithPrompt, jobs.TEXT_TO_IMAGE,
               "Text to image with image prompts (base64)")
    json_route("/v2/generation/image-upscale-vary", ImgUpscaleOrVaryRequestJson, jobs.UPSCALE_OR_VARY,
               "Upscale or vary (base64 image)")
    json_route("/v2/generation/image-inpaint-outpaint", ImgInpaintOrOutpaintRequestJson, jobs.INPAINT_OR_OUTPAINT,
               "Inpaint or outpaint (base64 images)")
    json_route("/v2/generation/image-prompt", ImgPromptRequestJson, jobs.IMAGE_PROMPT,
               "Image prompts (base64), optionally with inpaint")
    form_route("/v1/generation/image-upscale-vary", ImgUpscaleOrVaryRequestJson, jobs.UPSCALE_OR_VARY,
               ("input_image",), "Upscale or vary (multipart upload)")
    form_route("/v1/generation/image-inpaint-outpaint", ImgInpaintOrOutpaintRequestJson, jobs.INPAINT_OR_OUTPAINT,
               ("input_image", "input_mask"), "Inpaint or outpaint (multipart uploads)")
    form_route("/v1/generation/image-prompt", ImgPromptRequestJson, jobs.IMAGE_PROMPT,
               ("input_image", "input_mask"), "Image prompts cn_img1..4 (multipart uploads)")

    def job_of(job_id: str, caller: Principal) -> jobs.ApiJob:
        job = ctx.jobs.get(job_id, caller.owner)
        if job is None:
            raise common.ApiError(404, f"no job {job_id!r} of yours (unknown, someone else's, or out of the "
                                       f"history)", param="job_id")
        return job

    @api.get("/v1/generation/query-job", response_model=AsyncJobResponse, summary="One of your jobs")
    async def query_job(job_id: str, require_step_preview: bool = False, caller: Principal = Caller):
        return job_response(job_of(job_id, caller), require_step_preview)

    @api.get("/v1/generation/job-queue", response_model=JobQueueInfo, summary="Queue length, your last job")
    async def job_queue(caller: Principal = Caller):
        mine = ctx.jobs.of(caller.owner)
        worker = ctx.worker()
        return JobQueueInfo(running_size=worker.pending() + (worker.current is not None),
                            finished_size=sum(job.finished for job in mine),
                            last_job_id=mine[-1].id if mine else None)

    @api.get("/v1/generation/job-history", response_model=JobHistoryResponse, summary="Your jobs")
    async def job_history(job_id: str | None = None, caller: Principal = Caller):
        mine = [job for job in ctx.jobs.of(caller.owner) if job_id in (None, job.id)]
        return JobHistoryResponse(queue=[_history_info(j) for j in mine if not j.finished],
                                  history=[_history_info(j) for j in mine if j.finished])

    @api.post("/v1/generation/stop", response_model=StopResponse, summary="Stop your jobs (or one, by job_id)")
    async def stop(job_id: str | None = None, caller: Principal = Caller):
        chosen = [job_of(job_id, caller)] if job_id else ctx.jobs.of(caller.owner)
        stopped = [job for job in chosen if not job.finished]
        for job in stopped:
            ctx.jobs.stop(job)
        return StopResponse(msg="success", stopped=[job.id for job in stopped])

    def model_names() -> AllModelNamesResponse:
        cfg = ctx.config()
        return AllModelNamesResponse(model_filenames=config_module.list_model_files(cfg.path_checkpoints),
                                     lora_filenames=config_module.list_model_files(cfg.path_loras))

    @api.get("/v1/engines/all-models", response_model=AllModelNamesResponse, summary="Checkpoints and LoRAs")
    async def all_models(caller: Principal = Caller):
        return model_names()

    @api.post("/v1/engines/refresh-models", response_model=AllModelNamesResponse,
              summary="Checkpoints and LoRAs (folders are read on every call)")
    async def refresh_models(caller: Principal = Caller):
        return model_names()

    @api.get("/v1/engines/styles", response_model=list[str], summary="Style names")
    async def styles(caller: Principal = Caller):
        from modules import sdxl_styles
        return sdxl_styles.style_names(ctx.config().path_styles)

    @api.get("/ping", summary="pong")
    async def ping(caller: Principal = Caller):
        return "pong"

    return api


def _webhook(requested: str | None, ctx: ApiContext) -> str | None:
    """Where an async job's result goes: the request's own webhook_url when the operator
    allows it (refused otherwise, not dropped), else --webhook-url."""
    settings = ctx.settings
    if not requested:
        return settings.webhook_url
    if not jobs.webhook_allowed(requested, settings.webhook_url, settings.webhook_allow):
        raise _refuse("webhook_url", "this server posts results only to the addresses its operator allowed "
                                     "(--webhook-url, --webhook-allow)")
    return requested
