"""What the three APIs share: error answers, the route class, image fields, and running a
request as a job (checked first, queued, awaited; cancelled when a sync client goes away).

Errors have one shape on every route, readable by each API's clients::

    {"detail": <message, or FastAPI's list of problems>,
     "error": {"message": ..., "type": ..., "param": <the field>, "code": null}}

``detail`` is what Fooocus-API and A1111 clients print; ``error`` is OpenAI's. A body that
fails a route's schema answers 422 naming the field as the client spelled it; so does a
request our parser refuses (its field names are translated back to the client's).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import anyio
from fastapi import Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException   # what Starlette's body limit raises

from modules import config as config_module
from modules.api.jobs import FILES_ROUTE, ApiJob, JobBook, file_base64, report_status
from modules.async_worker import QueueFull

log = logging.getLogger(__name__)
DISCONNECT_POLL_S = 0.25   # how often a waiting sync request looks whether its client is still there
_ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                429: "rate_limit_error", 500: "server_error"}
_FIELD = re.compile(r"field '([A-Za-z_][A-Za-z0-9_.]*)((?:\[\d+\])?)'")


class ApiError(Exception):
    """An answer other than 200, with the message (and the field) the client gets."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers
        self.param = param if param is not None else field_in(message)

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.message, self.status, self.param), self.status, headers=self.headers)


def error_body(message: str, status: int, param: str | None = None, detail: Any = None) -> dict:
    return {"detail": message if detail is None else detail,
            "error": {"message": message, "type": _ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": None}}


def field_in(message: str) -> str | None:
    """The first field a message names ("field 'x' must...")."""
    match = _FIELD.search(message)
    return match.group(1) if match else None


def rename_fields(message: str, names: Mapping[str, str]) -> str:
    """Our parser's field names in a message, as this API's clients call them."""
    return _FIELD.sub(lambda m: f"field '{names.get(m.group(1), m.group(1))}{m.group(2)}'", message)


def _location(loc: tuple | list) -> str:
    parts = [p for p in loc][1:] if loc and loc[0] in ("body", "query", "path", "header", "form") else list(loc)
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def validation_response(error: RequestValidationError) -> JSONResponse:
    """FastAPI's problems as JSON (without the offending input, which may be a whole image)."""
    problems = [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
                for e in error.errors()]
    fields = [None if p["type"] == "json_invalid" else _location(p["loc"]) for p in problems]
    message = "; ".join(f"field '{f}': {p['msg']}" if f else f"the body: {p['msg']}" for f, p in zip(fields, problems))
    return JSONResponse(error_body(message or "invalid request", 422, fields[0] if fields else None,
                                   detail=problems), 422)


def route_class(max_body_bytes: int) -> type[APIRoute]:
    """The APIRoute our routers use: bodies over ``max_body_bytes`` are refused as they
    arrive (413, Starlette's body limit), schema problems and ApiErrors get the shared
    error shape."""

    class ApiRoute(APIRoute):
        def __init__(self, *args: Any, max_body_size: int | None = None, **kwargs: Any) -> None:
            super().__init__(*args, max_body_size=max_body_size or max_body_bytes, **kwargs)

        def get_route_handler(self):
            handler = super().get_route_handler()

            async def run(request: Request) -> Response:
                try:
                    return await handler(request)
                except RequestValidationError as error:
                    return validation_response(error)
                except ApiError as error:
                    return error.response()
                except HTTPException as error:
                    if error.status_code == 413:   # the body limit, met while reading a chunked body
                        return ApiError(413, f"the request body is over {megabytes(max_body_bytes)} "
                                             f"(see --max-upload-size)").response()
                    raise

            return run

    return ApiRoute


def megabytes(size: int) -> str:
    return f"{size / 2 ** 20:.3g} MB"


def checkpoint_name(value: Any, cfg: config_module.Config, field: str) -> str:
    """A checkpoint as clients name it (A1111's "x.safetensors [hash]", "x" without its
    extension, "sub/x.safetensors") -> its name in the checkpoints folder; 422 naming
    ``field`` when there is none."""
    if not isinstance(value, str) or not value.strip():
        raise ApiError(422, f"field '{field}' must be a checkpoint name")
    text = value.strip()
    if text.endswith("]") and " [" in text:
        text = text[:text.rindex(" [")]
    names = config_module.list_model_files(cfg.path_checkpoints)
    if text in names:
        return text
    by_stem = [n for n in names if str(Path(n).with_suffix("")) == text or Path(n).stem == text]
    if len(by_stem) == 1:
        return by_stem[0]
    raise ApiError(422, f"field '{field}': no checkpoint {value!r} in the checkpoints folder (config key "
                        f"path_checkpoints); see /sdapi/v1/sd-models or /v1/models")


# -- image fields ------------------------------------------------------------------------------

_OWN_FILE = re.compile(r"^(?:https?://[^/]+)?" + re.escape(FILES_ROUTE) + r"/([0-9a-f]{32})/(\d+)$")


def own_file_or_value(value: Any, owner: str, jobs: JobBook, field: str) -> Any:
    """An image field's value, with a URL of our own file route (an earlier result of
    this caller) replaced by that image as base64; other values go to the parser as they are."""
    if not isinstance(value, str):
        return value
    match = _OWN_FILE.match(value.strip())
    if match is None:
        if value.strip().lower().startswith(("http://", "https://")):
            raise ApiError(422, f"field '{field}': only URLs of this server's {FILES_ROUTE} route are "
                                f"read (no downloads); send the image as base64")
        return value
    job = jobs.get(match.group(1), owner)
    index = int(match.group(2))
    if job is None or index >= len(job.images):
        raise ApiError(422, f"field '{field}': no image {index} of job {match.group(1)} for this caller")
    return file_base64(job.images[index])


async def upload_base64(upload: UploadFile | None, field: str, limit: int) -> str | None:
    """A multipart upload as base64 (None when the field was not sent)."""
    if upload is None:
        return None
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise ApiError(413, f"field '{field}': the upload is over {megabytes(limit)} (see --max-upload-size)")
    return base64.b64encode(data).decode("ascii") if data else None


# -- running a request as a job -------------------------------------------------------------

def check(request: dict, cfg, names: Mapping[str, str]) -> None:
    """Refuse (422) what the parser would refuse, before queueing; messages name the
    client's fields and no server path."""
    from modules.config import ConfigError
    from modules.core import SAMPLERS, SCHEDULERS   # what the sampling code implements
    from modules.generation_request import check_request, scrub_paths
    from modules.sdxl_styles import StyleError
    from modules.task_types import RequestError

    try:
        check_request(request, cfg, SAMPLERS, SCHEDULERS)
    except (RequestError, StyleError, ConfigError, ValueError) as error:
        raise ApiError(422, rename_fields(scrub_paths(str(error), cfg), names)) from None


async def submit(ctx, request: dict, owner: str, job_type: str, http_request: Request,
                 names: Mapping[str, str], **details: Any) -> ApiJob:
    """Check, then queue; a full queue (or this caller's full share) is 429. A request that
    names no checkpoint gets the one a client chose for every API request (A1111 options)."""
    if ctx.options.checkpoint and not request.get("base_model"):
        request["base_model"] = ctx.options.checkpoint
    await anyio.to_thread.run_sync(check, request, ctx.config(), names)
    try:
        return ctx.jobs.submit(request, owner, job_type, base_url=str(http_request.base_url), **details)
    except QueueFull as error:
        raise ApiError(429, str(error)) from None


async def wait(job: ApiJob, http_request: Request, jobs: JobBook) -> None:
    """Await a sync job; a client that goes away (or a cancelled handler) stops it."""
    done = asyncio.wrap_future(job.task.future)
    try:
        while not done.done():
            await asyncio.wait({done}, timeout=DISCONNECT_POLL_S)
            if not done.done() and await http_request.is_disconnected():
                log.info("API job %s: its client disconnected; stopping it", job.id)
                jobs.stop(job)
                return
    except asyncio.CancelledError:
        jobs.stop(job)
        raise


async def run(ctx, request: dict, owner: str, job_type: str, http_request: Request,
              names: Mapping[str, str]) -> ApiJob:
    """A sync request: its finished job, or an ApiError for a failed request."""
    job = await submit(ctx, request, owner, job_type, http_request, names)
    await wait(job, http_request, ctx.jobs)
    failed(job, names)
    return job


def failed(job: ApiJob, names: Mapping[str, str]) -> None:
    """Raise the HTTP error a finished job's report calls for (nothing for success or a stop)."""
    status = report_status(job.report)
    if status != 200:
        raise ApiError(status, rename_fields(str(job.report["error"]), names))
