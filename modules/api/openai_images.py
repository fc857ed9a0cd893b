"""OpenAI's image generation route and its model list, for ``openai.OpenAI(base_url=...)``.

``POST /v1/images/generations``: ``prompt``; ``n`` (1-10) images; ``size`` "WxH" (multiples
of 8) or "auto" (our default size); ``model`` a checkpoint file name with or without its
extension (omitted: the default model); ``response_format`` ``b64_json`` (the default) or
``url`` (our authenticated file route); ``output_format`` png, jpeg or webp. ``quality``,
``style``, ``moderation``, ``user`` and ``output_compression`` are accepted and not used;
``background: transparent``, ``stream`` and ``partial_images`` are refused. Our own
request fields in ``EXTENSIONS`` may ride along (the openai client's ``extra_body``), e.g.
``{"steps": 8, "seed": 1, "performance": "Extreme Speed"}``. The answer carries our
per-request ``report`` beside OpenAI's fields. ``GET /v1/models`` lists the checkpoints
as models.
"""

import os
import re
import time
from collections.abc import Callable
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from modules import config as config_module
from modules.api import common, jobs
from modules.api.auth import Principal
from modules.api.context import ApiContext

NAMES = {"base_model": "model", "image_number": "n", "width": "size", "height": "size"}
# Our request fields a client may add (openai's extra_body); the parser checks them as for /generate.
EXTENSIONS = ("negative_prompt", "seed", "steps", "performance", "guidance_scale", "sampler", "scheduler",
              "styles", "loras", "sharpness")
_SIZE = re.compile(r"^\s*(\d+)\s*[x×]\s*(\d+)\s*$")


class ImageGenerationRequest(BaseModel):
    model_config = ConfigDict(extra="allow", protected_namespaces=())

    prompt: str = Field(max_length=32000)
    model: str | None = Field(None, description="a checkpoint, with or without extension; omitted: the default")
    n: int | None = Field(1, ge=1, le=10)
    size: str | None = Field(None, description="'WxH' (multiples of 8) or 'auto'")
    response_format: Literal["url", "b64_json"] | None = None
    output_format: Literal["png", "jpeg", "webp"] | None = None
    background: Literal["transparent", "opaque", "auto"] | None = Field(None, description="not transparent")
    quality: str | None = Field(None, description="accepted, not used")
    style: str | None = Field(None, description="accepted, not used")
    stream: bool | None = Field(None, description="not supported: only false")
    partial_images: int | None = Field(None, description="not supported: only 0")
    user: str | None = None


class ImageData(BaseModel):
    b64_json: str | None = None
    url: str | None = None
    revised_prompt: str | None = None


class ImagesResponse(BaseModel):
    created: int
    data: list[ImageData]
    output_format: str | None = None
    size: str | None = None
    background: str | None = None
    report: dict = Field(description="ours: the request's report (model management, timings)")


def to_request(body: ImageGenerationRequest, cfg: config_module.Config) -> dict:
    if body.background == "transparent":
        raise common.ApiError(422, "field 'background': transparent backgrounds are not supported")
    if body.stream:
        raise common.ApiError(422, "field 'stream': streaming is not supported; send false")
    if body.partial_images:
        raise common.ApiError(422, "field 'partial_images': not supported; send 0")
    out: dict[str, Any] = {"prompt": body.prompt, "image_number": body.n or 1}
    if body.size not in (None, "", "auto"):
        match = _SIZE.match(body.size)
        if match is None:
            raise common.ApiError(422, f"field 'size' must be 'WIDTHxHEIGHT' or 'auto', got {body.size!r}")
        out["width"], out["height"] = int(match.group(1)), int(match.group(2))
    if body.model:
        out["base_model"] = common.checkpoint_name(body.model, cfg, "model")
    if body.output_format:
        out["output_format"] = body.output_format
    out.update({k: v for k, v in (body.model_extra or {}).items() if k in EXTENSIONS})
    return out


def router(ctx: ApiContext, principal: Callable[..., Principal], route_class: type) -> APIRouter:
    api = APIRouter(prefix="/v1", route_class=route_class, tags=["OpenAI images"])
    Caller = Depends(principal)

    @api.post("/images/generations", response_model=ImagesResponse, response_model_exclude_none=True,
              summary="Generate images")
    async def generations(body: ImageGenerationRequest, http_request: Request, caller: Principal = Caller):
        cfg = ctx.config()
        job = await common.run(ctx, to_request(body, cfg), caller.owner, jobs.TEXT_TO_IMAGE, http_request, NAMES)
        report = job.report
        if body.response_format == "url":
            data = [ImageData(url=job.image_url(i)) for i in range(len(job.images))]
        else:
            data = [ImageData(b64_json=jobs.file_base64(path)) for path in job.images]
        return ImagesResponse(created=int(time.time()), data=data, report=report,
                              output_format=body.output_format or cfg.default_output_format,
                              size=f"{report.get('width')}x{report.get('height')}", background=body.background)

    @api.get("/models", summary="The checkpoints, as OpenAI models")
    async def models(caller: Principal = Caller) -> dict:
        cfg = ctx.config()
        data = []
        for name in config_module.list_model_files(cfg.path_checkpoints):
            try:
                created = int(os.stat(config_module.resolve_model_file(name, cfg.path_checkpoints)).st_mtime)
            except (FileNotFoundError, OSError):
                continue   # removed while listing
            data.append({"id": name, "object": "model", "created": created, "owned_by": "fooocus-resident"})
        return {"object": "list", "data": data}

    return api
