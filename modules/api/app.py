"""The REST routes together, and how they join the page's server.

``launch.py`` passes ``app_kwargs(ctx)`` to Gradio's ``launch`` (its ``app_kwargs``): our routes become the
first routes of the FastAPI app Gradio makes (``app_kwargs={"routes": ...}``), so they
share its port, process and worker while Gradio keeps its own login, ``allowed_paths`` and
upload limit for the page. ``build_app`` makes a plain FastAPI app of the same routes
(tests). OpenAPI: ``/openapi.json`` (our routes only) and ``/docs``, a page that lists them
with their schemas; both need the same credentials as the routes.
"""

from __future__ import annotations

import html
import json
import mimetypes
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from starlette.routing import BaseRoute

from modules import config as config_module
from modules.api import auth, common, fooocus_api, jobs, openai_images, sdapi
from modules.api.context import ApiContext, ApiOptions, ApiSettings
from modules.async_worker import Worker

TITLE = "Fooocus-Resident REST APIs"
VERSION = "1"


def make_context(settings: ApiSettings, worker: Callable[[], Worker],
                 config: Callable[[], config_module.Config] = config_module.get_config) -> ApiContext:
    book = jobs.JobBook(worker, lambda: config().max_job_history, on_finished=jobs.WebhookSender())
    return ApiContext(settings=settings, worker=worker, config=config, jobs=book, options=ApiOptions())


def _files_router(ctx: ApiContext, principal: Callable[..., auth.Principal], route_class: type) -> APIRouter:
    api = APIRouter(route_class=route_class, tags=["Results"])

    @api.get(jobs.FILES_ROUTE + "/{job_id}/{index}", summary="An image of one of your jobs",
             response_class=FileResponse)
    async def job_file(job_id: str, index: int, caller: auth.Principal = Depends(principal)):
        job = ctx.jobs.get(job_id, caller.owner)
        if job is None or not 0 <= index < len(job.images):
            raise common.ApiError(404, f"no image {index} of a job {job_id!r} of yours")
        path = job.images[index]
        return FileResponse(path, media_type=mimetypes.guess_type(path)[0] or "application/octet-stream")

    return api


def api_routes(ctx: ApiContext) -> list[BaseRoute]:
    """Every REST route, the OpenAPI schema and its page included."""
    def principal(request: Request) -> auth.Principal:
        return auth.authenticate(request, ctx.settings)

    route_class = common.route_class(ctx.settings.max_body_bytes)
    routers = [fooocus_api.router(ctx, principal, route_class), sdapi.router(ctx, principal, route_class),
               openai_images.router(ctx, principal, route_class), _files_router(ctx, principal, route_class)]
    routes: list[BaseRoute] = [route for router in routers for route in router.routes]
    docs = APIRouter(route_class=route_class)
    schema: dict[str, Any] = {}

    def openapi() -> dict:
        if not schema:
            schema.update(get_openapi(title=TITLE, version=VERSION, routes=routes,
                                      description="Fooocus-API, AUTOMATIC1111 sdapi and OpenAI images routes"))
        return schema

    @docs.get("/openapi.json", include_in_schema=False)
    async def openapi_json(caller: auth.Principal = Depends(principal)):
        return JSONResponse(openapi())

    @docs.get("/docs", include_in_schema=False)
    async def docs_page(caller: auth.Principal = Depends(principal)):
        return HTMLResponse(docs_html(openapi()))

    return routes + list(docs.routes)


def docs_html(schema: dict) -> str:
    """Every route with its summary and the schemas of its body and answer (no script, no
    CDN: the page works on a machine without internet)."""
    components = schema.get("components", {}).get("schemas", {})

    def ref_name(content: dict) -> str:
        body = next(iter(content.values()), {}).get("schema", {})
        ref = body.get("$ref") or body.get("items", {}).get("$ref", "")
        return ref.rsplit("/", 1)[-1] if ref else ("multipart form" if "multipart/form-data" in content else "")

    rows = []
    for path, methods in schema.get("paths", {}).items():
        for method, op in methods.items():
            body = ref_name(op.get("requestBody", {}).get("content", {}))
            answer = ref_name(op.get("responses", {}).get("200", {}).get("content", {}))
            params = ", ".join(p["name"] for p in op.get("parameters", []))
            rows.append(f"<tr><td><code>{method.upper()}</code></td><td><code>{html.escape(path)}</code></td>"
                        f"<td>{html.escape(', '.join(op.get('tags', [])))}</td>"
                        f"<td>{html.escape(op.get('summary', ''))}</td><td>{html.escape(params)}</td>"
                        f"<td>{html.escape(body)}</td><td>{html.escape(answer)}</td></tr>")
    models = "".join(f"<details><summary><code>{html.escape(name)}</code></summary><pre>"
                     f"{html.escape(json.dumps(model, indent=2))}</pre></details>"
                     for name, model in sorted(components.items()))
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{TITLE}</title><style>"
            "body{font-family:sans-serif;margin:2em}td{padding:2px 8px;border-bottom:1px solid #ddd}"
            f"</style></head><body><h1>{TITLE}</h1><p>The machine-readable schema is "
            "<a href='/openapi.json'>/openapi.json</a> (Swagger UI and other tools read it).</p>"
            "<table><tr><th>Method</th><th>Route</th><th>API</th><th>What</th><th>Query</th><th>Body</th>"
            f"<th>Answer</th></tr>{''.join(rows)}</table><h2>Schemas</h2>{models}</body></html>")


def build_app(ctx: ApiContext) -> FastAPI:
    """A FastAPI app of the REST routes alone (tests; ``app_kwargs`` serves them with the page)."""
    return FastAPI(routes=api_routes(ctx), openapi_url=None, docs_url=None, redoc_url=None)


def app_kwargs(ctx: ApiContext) -> dict[str, Any]:
    """The FastAPI keywords (Gradio's ``launch(app_kwargs=...)``) that put the REST routes
    first on the app Gradio makes."""
    return {"routes": api_routes(ctx), "openapi_url": None}
