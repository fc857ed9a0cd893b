"""The Gradio page (Fooocus's layout) and the API endpoints.

Both the page's Generate button and the ``/generate`` endpoint build one
request dict (DESIGN.md §4) and hand it to the single worker
(``modules.async_worker``), so UI and API requests share one FIFO queue and
one set of resident models.

API (callable with ``gradio_client``):

* ``/generate``: one JSON object in (a hidden ``gr.JSON``), ``[gallery, report]``
  out. ``gallery`` is a hidden ``gr.File(file_count="multiple")``: the client
  downloads the PNGs and gets a list of local file paths; ``report`` is a dict.
* ``/model_status``: no input, the model registry as a dict: a snapshot the
  worker publishes after each task, never read from the live registry here.
* ``/free_memory``: unload every model no request is using (runs on the worker
  thread, so it waits for a running request); returns what it freed.

Jobs belong to their owner. A page's owner is its login with a random token kept
in the browser (``gr.BrowserState``), so a reload finds its running task again and
follows it; an API client's owner is its login, else its address (one owner across
its sessions). Stop and Skip act on the caller's own task only. An API call that is
cancelled or whose client goes away (its result stream dropped or never opened, as
``route_guard`` sees it) stops its task (a queued one never runs); a page that goes
away leaves its task running for ``reconnect_grace_s`` seconds, then stops it.
``launch_options`` installs the route guard on the app Gradio builds.

The page's own events (Generate, Stop, Skip, Refresh, the memory buttons) are
private: not listed in the API and not callable by clients.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import html
import io
import json
import logging
import math
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr

from modules import config as config_module
from modules import debug_page, flags, generation_request, input_image_page, resident_memory, route_guard, t2i_page
from modules.async_worker import AsyncTask, TaskProgress, Worker
from modules.runtime import get_worker

log = logging.getLogger(__name__)

MAX_IMAGE_NUMBER = 32
PROGRESS_POLL_S = 0.1  # how often a page follower looks at its task's progress
CLIENT_POLL_S = 0.5  # how often an API call looks whether its client is still there
RECONNECT_GRACE_S = 60.0  # a page's task outlives the page this long, so a reload can reconnect
MAX_SEED = 2 ** 63 - 1
OUTPUT_FORMATS = ("png", "jpeg", "webp")
CACHE_CLEANUP = (3600, 3600)  # Gradio's temp copies: checked every hour, deleted after an hour
GALLERY_HEIGHT = "60vh"  # the live preview (PAGE_CSS) covers the gallery at this height


def supported_samplers() -> list[str]:
    """Fooocus's sampler names that the sampling code implements, in Fooocus's order."""
    from modules.core import AVAILABLE_SAMPLERS
    return [name for name in flags.SAMPLER_NAMES if name in AVAILABLE_SAMPLERS]


def supported_schedulers() -> list[str]:
    from modules.core import AVAILABLE_SCHEDULERS
    return [name for name in flags.SCHEDULER_NAMES if name in AVAILABLE_SCHEDULERS]


# -- plain values (no Gradio): what the page's controls hold ------------------------------

@dataclass(frozen=True)
class LoraValue:
    enabled: bool
    name: str
    weight: float


@dataclass(frozen=True)
class UIValues:
    """The page's control values; ``to_request`` makes the API request dict from them."""

    prompt: str
    negative_prompt: str
    performance: str
    aspect_ratio: str
    image_number: int
    seed: int
    base_model: str | None
    refiner_model: str | None
    refiner_switch: float
    loras: tuple[LoraValue, ...]
    sampler: str
    scheduler: str
    guidance_scale: float
    vae: str = flags.DEFAULT_VAE
    output_format: str = "png"
    styles: tuple[str, ...] = ()
    sharpness: float = 2.0
    adm_scaler_positive: float = 1.5
    adm_scaler_negative: float = 0.8
    adm_scaler_end: float = 0.3
    input_image: input_image_page.InputImageValues | None = None
    debug: debug_page.DebugValues | None = None           # Developer Debug Mode's tabs
    debug_defaults: debug_page.DebugValues = debug_page.DebugValues()   # what the server takes for them

    def to_request(self) -> dict:
        width, height = flags.parse_aspect_ratio(self.aspect_ratio)
        loras = [[lora.name, float(lora.weight)] for lora in self.loras
                 if lora.enabled and lora.name and lora.name != flags.NONE_NAME]
        request: dict[str, Any] = {
            "prompt": self.prompt or "",
            "negative_prompt": self.negative_prompt or "",
            "performance": self.performance,
            "width": width,
            "height": height,
            "image_number": int(self.image_number),
            "seed": int(self.seed) if self.seed is not None else -1,
            "refiner_model": self.refiner_model or flags.NONE_NAME,
            "refiner_switch": float(self.refiner_switch),
            "loras": loras,
            "sampler": self.sampler,
            "scheduler": self.scheduler,
            "guidance_scale": float(self.guidance_scale),
            "vae": self.vae or flags.DEFAULT_VAE,
            "styles": list(self.styles),
            "sharpness": float(self.sharpness),
            "adm_scaler_positive": float(self.adm_scaler_positive),
            "adm_scaler_negative": float(self.adm_scaler_negative),
            "adm_scaler_end": float(self.adm_scaler_end),
        }
        if self.output_format and self.output_format != "png":
            request["output_format"] = self.output_format
        if self.base_model:
            request["base_model"] = self.base_model
        if self.input_image is not None:
            fields = self.input_image.to_fields()
            request.update(fields)
            request["prompt"] = self.input_image.prompt_for(request["prompt"], fields)
        if self.debug is not None:
            request.update(self.debug.request_fields(self.debug_defaults, request))
        return request


# -- pipeline access (late imports: the pipeline pulls in torch and diffusers) -------------

def _demo_warning() -> str | None:
    from modules import runtime
    return runtime.demo_model_in_use()


def _banner_text(warning: str | None) -> str:
    return f"### ⚠ Demo model\n{warning}" if warning else ""


def allowed_paths(cfg: config_module.Config) -> list[str]:
    """Folders the server may serve files from (images written there, the temp folder used
    without the image log or when the output folder cannot be written, and the styles'
    preview pictures)."""
    return [str(cfg.path_outputs), str(cfg.temp_root), *t2i_page.samples_folders(cfg)]


# -- plain helpers: seeds, labels, locks ----------------------------------------------------

def parse_seed(text: Any, random_seed: bool) -> int:
    """The page's seed box (text, so 64-bit seeds stay exact) -> the request's seed."""
    if random_seed:
        return -1
    value = str(text if text is not None else "").strip()
    try:
        seed = int(value)
    except ValueError:
        raise ValueError(f"Seed must be a whole number from 0 to {MAX_SEED}, got {value!r}") from None
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"Seed must be a whole number from 0 to {MAX_SEED}, got {value}")
    return seed


def aspect_ratio_label(value: str) -> str:
    """'1152*896' -> '1152×896 | 9:7' (upstream's label)."""
    width, height = flags.parse_aspect_ratio(value)
    d = math.gcd(width, height)
    return f"{width}×{height} | {width // d}:{height // d}"


@dataclass(frozen=True)
class LockedControls:
    """What a performance mode imposes on the Advanced controls (None: the user's choice)."""

    sampler: str | None
    scheduler: str | None
    guidance_scale: float | None
    refiner: bool   # False: the mode turns the refiner off
    # True: the mode ignores the negative prompt (cfg 1), sharpness and ADM guidance.
    ignores_guidance_extras: bool = False

    @staticmethod
    def of(performance: str) -> "LockedControls":
        s = flags.performance_settings(performance)
        return LockedControls(s.sampler, s.scheduler, s.cfg_scale, s.refiner_enabled, s.is_distilled)

    @property
    def locks_nothing(self) -> bool:
        return self == LockedControls(None, None, None, True)

    def shown(self, current: Mapping[str, Any]) -> dict[str, Any]:
        """The MODE_VALUES the page shows in this mode, given the controls' ``current`` ones."""
        return {"sampler": self.sampler or current["sampler"], "scheduler": self.scheduler or current["scheduler"],
                "guidance": self.guidance_scale if self.guidance_scale is not None else current["guidance"],
                "refiner": current["refiner"] if self.refiner else flags.NONE_NAME,
                "refiner_switch": current["refiner_switch"]}


# The controls a performance mode may override, as the performance handler reads and restores them.
MODE_VALUES = ("sampler", "scheduler", "guidance", "refiner", "refiner_switch")


def display_report(report: dict) -> dict:
    """The report for the page: seeds as strings, because a browser's JSON numbers
    lose digits above 2^53 (the API returns them as integers)."""
    shown = dict(report)
    for key in ("seed", "skipped", "seeds"):
        value = shown.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            shown[key] = str(value)
        elif isinstance(value, list):
            shown[key] = [str(v) for v in value]
    return shown


def _preview_uri(preview: Any) -> str | None:
    """A small RGB array as a PNG data URI (the page shows it scaled up)."""
    if preview is None:
        return None
    try:
        from PIL import Image
        buffer = io.BytesIO()
        Image.fromarray(preview).save(buffer, format="PNG")
    except Exception:  # a preview is never worth failing a page update for
        return None
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def progress_html(progress: TaskProgress) -> str:
    """Bar + stage text + live preview; the stage picks the style (error and stop differ)."""
    percent = max(0.0, min(100.0, progress.percent))
    stage = progress.stage if progress.stage else "running"
    preview = _preview_uri(progress.preview) if stage == "sampling" else None
    image = (f'<img class="fr-preview" alt="preview" src="{preview}">' if preview else "")
    stages = html.escape(" ".join(progress.stages))
    return (f'<div class="fr-progress fr-stage-{html.escape(stage)}" data-stage="{html.escape(stage)}" '
            f'data-stages="{stages}">'
            f'<progress value="{percent:.1f}" max="100"></progress>'
            f'<div class="fr-progress-text">{percent:.0f}% — {html.escape(progress.text)}</div>{image}</div>')


class Followers:
    """How many pages follow each task; a task nobody follows is stopped after a grace period."""

    def __init__(self, worker: Callable[[], Worker], grace_s: float) -> None:
        self._worker, self._grace_s = worker, grace_s
        self._lock = threading.Lock()
        self._count: dict[int, int] = {}

    def attach(self, task: AsyncTask) -> None:
        with self._lock:
            self._count[task.id] = self._count.get(task.id, 0) + 1

    def detach(self, task: AsyncTask) -> None:
        with self._lock:
            self._count[task.id] = self._count.get(task.id, 1) - 1
            orphan = self._count[task.id] <= 0
            if orphan:
                del self._count[task.id]
        if orphan and not task.done():
            if self._grace_s <= 0:
                self._worker().stop(task)
            else:
                timer = threading.Timer(self._grace_s, self._stop_if_orphan, args=(task,))
                timer.daemon = True
                timer.start()

    def _stop_if_orphan(self, task: AsyncTask) -> None:
        with self._lock:
            followed = self._count.get(task.id, 0) > 0
        if not followed and not task.done():
            log.info("task %d: its page did not come back; stopping it", task.id)
            self._worker().stop(task)


async def wait_for_change(task: AsyncTask, seen_version: int, timeout: float) -> TaskProgress:
    """Async wait for new progress: no thread of Gradio's pool is held while a task runs."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while task.progress.version <= seen_version and not task.done() and loop.time() < deadline:
        await asyncio.sleep(PROGRESS_POLL_S)
    return task.progress


async def task_result(task: AsyncTask, client_gone: Callable[[], bool] = lambda: False,
                      stop: Callable[[AsyncTask], None] | None = None) -> Any:
    """Await a task's result without letting a cancelled caller cancel the task's own future.
    While it runs, a client that is gone (`client_gone`) gets its task stopped (`stop`)."""
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future = loop.create_future()

    def resolve(_: Any) -> None:
        loop.call_soon_threadsafe(lambda: waiter.done() or waiter.set_result(None))

    task.future.add_done_callback(resolve)
    while not waiter.done():
        await asyncio.wait([waiter], timeout=CLIENT_POLL_S)
        if not waiter.done() and stop is not None and client_gone():
            log.info("task %d: its client is gone; stopping it", task.id)
            stop(task)
            stop = None
    return task.result()


def page_owner(username: str | None, token: str | None) -> str | None:
    """Owner key of a page: its login and browser token; a namespace apart from API
    clients, so no value a page sends can name an API client's task, and no other login
    can name this page's."""
    return f"page:{username or ''}:{token}" if token else None


def api_owner(client: str) -> str:
    """Owner key of API jobs: the client (`route_guard.client_key`: login, else address),
    stable across its sessions, so a per-owner queue cap holds however many it opens."""
    return f"api:{client}"


def caller_client(caller: Any) -> str:
    """`route_guard.client_key` of a Gradio request."""
    return route_guard.client_key(getattr(caller, "username", None),
                                  getattr(getattr(caller, "client", None), "host", None))


# The outputs every follow update addresses, in order.
FOLLOW_OUTPUTS = ("progress", "gallery", "report", "banner", "generate", "stop", "skip", "seed")


def _update(**values: Any) -> tuple[Any, ...]:
    return tuple(values.get(name, gr.skip()) for name in FOLLOW_OUTPUTS)


def _running_buttons() -> dict[str, Any]:
    return {"generate": gr.update(visible=False), "stop": gr.update(visible=True),
            "skip": gr.update(visible=True)}


def _idle_buttons() -> dict[str, Any]:
    return {"generate": gr.update(visible=True), "stop": gr.update(visible=False),
            "skip": gr.update(visible=False)}


async def follow_task(task: AsyncTask, worker: Worker, demo_warning: Callable[[], str | None],
                      followers: Followers | None = None) -> AsyncIterator[tuple[Any, ...]]:
    """The page's view of one task: progress, preview and finished images while it runs,
    then its images, report and seed. A page that goes away detaches; with no
    ``followers`` the task is stopped at once."""
    followers = followers or Followers(lambda: worker, 0)
    followers.attach(task)
    snap = task.progress
    shown_images: tuple[str, ...] = ()
    try:
        yield _update(progress=progress_html(snap), gallery=list(snap.images), **_running_buttons())
        shown_images = snap.images
        while not task.done():
            newer = await wait_for_change(task, snap.version, 1.0)
            if newer.version != snap.version and not task.done():
                snap = newer
                gallery = list(snap.images) if snap.images != shown_images else gr.skip()
                shown_images = snap.images
                yield _update(progress=progress_html(snap), gallery=gallery)
    finally:
        followers.detach(task)
    result = task.result()
    text = demo_warning()
    report = result.report if isinstance(result.report, dict) else {}
    seed = report.get("seed")
    yield _update(progress=progress_html(task.progress), gallery=list(result.images),
                  report=display_report(report), banner=gr.update(value=_banner_text(text), visible=bool(text)),
                  seed=str(seed) if isinstance(seed, int) and seed >= 0 else gr.skip(), **_idle_buttons())


# -- auth -------------------------------------------------------------------------------------

def read_auth_file(path: Path) -> list[tuple[str, str]]:
    """Upstream's auth.json: a list of {"user": ..., "pass": ...}. Errors name the file and entry."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise ValueError(f"{path}: not a readable JSON file ({error})") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a list of {{\"user\", \"pass\"}} objects")
    pairs = []
    for i, entry in enumerate(data):
        if (not isinstance(entry, dict) or not isinstance(entry.get("user"), str) or not entry["user"]
                or not isinstance(entry.get("pass"), str) or not entry["pass"]):
            raise ValueError(f"{path}: entry {i} must be {{\"user\": \"...\", \"pass\": \"...\"}} (non-empty)")
        pairs.append((entry["user"], entry["pass"]))
    return pairs


def auth_pairs(cli_auth: tuple[str, str] | None, auth_file: Path | None) -> list[tuple[str, str]]:
    """Logins from --auth and auth.json together; empty means no login."""
    pairs = [cli_auth] if cli_auth else []
    if auth_file is not None and auth_file.is_file():
        pairs += read_auth_file(auth_file)
    return pairs


# -- page assets ------------------------------------------------------------------------------

PAGE_CSS = """
#fr-gallery { min-height: 46vh; }
/* The rows share the gallery's height (200 px each at least, then it scrolls): one result is drawn whole. */
#fr-gallery .grid-container { height: 100%; box-sizing: border-box; grid-template-rows: none;
                              grid-auto-rows: minmax(200px, 1fr); }
#fr-gallery .thumbnail-lg { aspect-ratio: auto; }
/* The live preview lies over the gallery (the bottom of #fr-main-view) instead of taking room above it. */
#fr-main-view { position: relative; }
#fr-progress { position: static !important; }
.fr-progress progress { width: 100%; height: 10px; accent-color: var(--color-accent); }
.fr-progress-text { font-size: var(--text-md); margin-top: 2px; }
.fr-stage-error progress { accent-color: #d33; }
.fr-stage-error .fr-progress-text { color: #d33; font-weight: 600; }
.fr-stage-stopped progress { accent-color: #d80; }
.fr-stage-stopped .fr-progress-text { color: #b60; font-weight: 600; }
.fr-stage-finished progress { accent-color: #2a2; }
.fr-preview { position: absolute; left: 0; bottom: 0; width: 100%; height: __GALLERY_HEIGHT__; margin: 0;
               object-fit: contain; image-rendering: pixelated; z-index: 5; pointer-events: none;
               background: var(--block-background-fill); border-radius: var(--block-radius); }
.fr-lora-row { flex-wrap: wrap !important; align-items: end; }
.fr-lora-row > * { min-width: 0 !important; }
.fr-lora-row .fr-lora-name { flex: 3 1 180px !important; }
.fr-lora-row .fr-lora-weight { flex: 2 1 140px !important; }
.fr-lora-row .fr-lora-enable { flex: 0 0 auto !important; }
.fr-mem-row { display: flex; gap: 8px; align-items: center; margin: 4px 0; flex-wrap: wrap; }
.fr-mem-label { width: 56px; }
.fr-mem-bar { flex: 1 1 120px; height: 12px; background: var(--block-background-fill);
              border: 1px solid var(--border-color-primary); border-radius: 6px; overflow: hidden; }
.fr-mem-bar > div { height: 100%; background: var(--color-accent); }
.fr-mem-bar.fr-over > div { background: #d33; }
.fr-mem-table { width: 100%; font-size: var(--text-sm); }
.fr-mem-table td { overflow-wrap: anywhere; }
.fr-mem-warning { color: #d33; font-weight: 600; }
#fr-generate-col { min-width: 110px !important; }
/* Upstream's "Input Image" / "Advanced" are small inline boxes under the prompt, not half-row cards. */
.fr-check-row { gap: 16px !important; justify-content: flex-start !important; flex-direction: row !important;
                flex-wrap: nowrap !important; }
.fr-check-row > * { flex: 0 0 auto !important; min-width: 0 !important; width: auto !important; margin: 0 !important;
                    border: none !important; box-shadow: none !important; background: none !important; }
/* Dropdown values stop before the arrow instead of running under it. */
input[role="combobox"] { padding-right: calc(2 * var(--size-5) + 4px) !important; text-overflow: ellipsis; }
/* A style's preview picture follows the mouse over the Styles list (upstream's hover preview). */
#fr-style-samples-holder { display: none !important; }
#fr-style-preview { position: fixed; display: none; width: 128px; height: 128px; pointer-events: none; z-index: 100;
                    background-size: cover; background-position: center; border: 1px solid lightgrey;
                    border-radius: 5px; transform: translate(-140px, 20px); }
#fr-style-preview.fr-lower { transform: translate(-140px, -140px); }
@media (max-width: 480px) {
  input[role="combobox"] { font-size: 11px; }
  .gradio-container { padding-left: 6px !important; padding-right: 6px !important; }
  #fr-memory .block, #fr-memory .form { padding: 2px !important; border: none !important; }
}
/* On a phone each resident model is a small card: its cells stacked, each under its column's name. */
@media (max-width: 600px) {
  .fr-mem-table thead { display: none; }
  .fr-mem-table, .fr-mem-table tbody, .fr-mem-table tr { display: block; width: 100%; }
  .fr-mem-table tr { border: none; border-top: 1px solid var(--border-color-primary); padding: 4px 0; }
  .fr-mem-table td { display: flex; gap: 8px; padding: 1px 4px; border: none; }
  .fr-mem-table td::before { content: attr(data-label); flex: 0 0 80px; font-weight: 600; white-space: nowrap; }
}
""".replace("__GALLERY_HEIGHT__", GALLERY_HEIGHT)

# Ctrl+Enter generates (as upstream); --theme picks light or dark.
PAGE_JS = """
() => {
  document.addEventListener('keydown', (e) => {
    if ((e.ctrlKey || e.metaKey) && e.key === 'Enter') {
      const button = document.getElementById('generate_button');
      if (button && button.offsetParent !== null) { e.preventDefault(); button.click(); }
    }
  });
  // Hover preview of a style: its samples/<name>.jpg, when a styles folder has one.
  const preview = document.createElement('div');
  preview.id = 'fr-style-preview';
  document.body.appendChild(preview);
  document.addEventListener('mouseover', (e) => {
    const label = e.target.closest ? e.target.closest('#fr-styles label') : null;
    let url = null;
    if (label) {
      const holder = document.getElementById('fr-style-samples');
      let samples = {};
      try { samples = JSON.parse((holder && holder.dataset.samples) || '{}'); } catch (err) { samples = {}; }
      const input = label.querySelector('input');
      url = samples[((input && input.getAttribute('title')) || label.textContent || '').trim()] || null;
    }
    preview.style.display = url ? 'block' : 'none';
    preview.style.backgroundImage = url ? `url("${url}")` : '';
  });
  document.addEventListener('mousemove', (e) => {
    if (preview.style.display !== 'block') return;
    preview.style.left = `${e.clientX}px`;
    preview.style.top = `${e.clientY}px`;
    preview.classList.toggle('fr-lower', e.clientY > window.innerHeight / 2);
  });
  const theme = '__THEME__';
  if (theme === 'dark' || theme === 'light') {
    const url = new URL(window.location.href);
    if (url.searchParams.get('__theme') !== theme) {
      url.searchParams.set('__theme', theme);
      window.location.replace(url.href);
    }
  }
}
"""


def launch_options(app: gr.Blocks, cfg: config_module.Config, theme: str | None = None) -> dict[str, Any]:
    """The ``app.launch`` keywords that belong to the app: css, js, the route guard, and
    enough of Gradio's slots that no job waits in Gradio's queue in front of the worker's.

    Every job's Gradio event holds a slot while it waits for the worker, so with fewer
    slots than jobs the rest wait in Gradio's (unbounded) queue where the worker's
    max_queue_length never sees them. Twice the queue length covers the jobs plus the
    pages following them and the quick events; Gradio's own queue is bounded too."""
    guard: route_guard.RouteGuard = app.route_guard  # type: ignore[attr-defined]
    return {"css": PAGE_CSS, "js": PAGE_JS.replace("__THEME__", theme or ""),
            "max_threads": gradio_slots(getattr(app, "queue_length", cfg.max_queue_length)),
            "app_kwargs": route_guard.app_kwargs(guard)}


def gradio_slots(queue_length: int) -> int:
    """Gradio events that may run at once (`max_threads`): see `launch_options`."""
    return 2 * queue_length + 16


# -- the page ------------------------------------------------------------------------------

@dataclass
class LoraSlot:
    enabled: gr.Checkbox
    name: gr.Dropdown
    weight: gr.Slider


@dataclass
class ImagePromptControls:
    image: gr.Image
    stop: gr.Slider
    weight: gr.Slider
    kind: gr.Radio


@dataclass
class ControlTabControls:
    """Developer Debug Mode's "Control" tab (upstream's labels): how image prompts mix with
    the other input-image tabs and the PyraCanny/CPDS options."""

    mixing_vary_upscale: gr.Checkbox
    mixing_inpaint: gr.Checkbox
    softness: gr.Slider
    canny_low: gr.Slider
    canny_high: gr.Slider
    skip_preprocessors: gr.Checkbox
    debug_preprocessors: gr.Checkbox

    def components(self) -> set[gr.components.Component]:
        return {self.mixing_vary_upscale, self.mixing_inpaint, self.softness, self.canny_low, self.canny_high,
                self.skip_preprocessors, self.debug_preprocessors}

    def values(self, data: Mapping[Any, Any]) -> input_image_page.ControlValues:
        return input_image_page.ControlValues(
            mixing_vary_upscale=bool(data[self.mixing_vary_upscale]), mixing_inpaint=bool(data[self.mixing_inpaint]),
            softness=float(data[self.softness]), canny_low=int(data[self.canny_low]),
            canny_high=int(data[self.canny_high]), skip_preprocessors=bool(data[self.skip_preprocessors]),
            debug_preprocessors=bool(data[self.debug_preprocessors]))


def _control_tab() -> ControlTabControls:
    """The "Control" tab's controls, with upstream's labels, ranges and defaults."""
    return ControlTabControls(
        debug_preprocessors=gr.Checkbox(label="Debug Preprocessors", value=False, elem_id="fr-debug-preprocessors",
                                        info="Show what the preprocessors make of the image prompts (nothing "
                                             "is generated)."),
        skip_preprocessors=gr.Checkbox(label="Skip Preprocessors", value=False, elem_id="fr-skip-preprocessors",
                                       info="The image prompts are already edge or structure maps."),
        mixing_vary_upscale=gr.Checkbox(label="Mixing Image Prompt and Vary/Upscale", value=False,
                                        elem_id="fr-mixing-uov"),
        mixing_inpaint=gr.Checkbox(label="Mixing Image Prompt and Inpaint", value=False, elem_id="fr-mixing-inpaint"),
        softness=gr.Slider(0.0, 1.0, value=input_image_page.CONTROLNET_SOFTNESS, step=0.001,
                           label="Softness of ControlNet", elem_id="fr-controlnet-softness",
                           info="Weakens the ControlNet on the fine details more than on the layout (0: off)."),
        canny_low=gr.Slider(1, 255, value=input_image_page.CANNY_LOW, step=1, label="Canny Low Threshold",
                            elem_id="fr-canny-low"),
        canny_high=gr.Slider(1, 255, value=input_image_page.CANNY_HIGH, step=1, label="Canny High Threshold",
                             elem_id="fr-canny-high"))


@dataclass
class DebugControls:
    """Developer Debug Mode's Debug Tools, Inpaint and FreeU controls (and the inpaint
    panel's invert box), by request field (``debug_page.DebugValues``'s names)."""

    by_field: dict[str, gr.components.Component]
    defaults: debug_page.DebugValues

    def components(self) -> set[gr.components.Component]:
        return set(self.by_field.values())

    def values(self, data: Mapping[Any, Any]) -> debug_page.DebugValues:
        kinds = {name: type(getattr(self.defaults, name)) for name in self.by_field}
        return dataclasses.replace(self.defaults, **{
            name: kinds[name](data[component]) for name, component in self.by_field.items()})


def _debug_tools_tab(d: debug_page.DebugValues) -> dict[str, Any]:
    """Upstream's "Debug Tools" tab, less what our Advanced tab already shows (sampler,
    scheduler, VAE, ADM) and what is refused here (Black Out NSFW: no safety checker)."""
    low, high = debug_page.STEP_RANGE
    side_low, side_high = debug_page.SIDE_RANGE
    return {
        "refiner_swap_method": gr.Dropdown(list(generation_request.REFINER_SWAP_METHODS), value=d.refiner_swap_method,
                                           label="Refiner swap method", elem_id="fr-refiner-swap-method"),
        "adaptive_cfg": gr.Slider(1.0, 30.0, value=d.adaptive_cfg, step=0.01, label="CFG Mimicking from TSNR",
                                  elem_id="fr-adaptive-cfg",
                                  info="Below the Guidance Scale, the strong guidance's result is pulled "
                                       "towards this weaker one's noise level (acts only when it is lower)."),
        "clip_skip": gr.Slider(1, 12, value=d.clip_skip, step=1, label="CLIP Skip", elem_id="fr-clip-skip",
                               info="Which CLIP layer from the end gives the prompt's features (1: the last "
                                    "one; 2, the usual SDXL choice, the one before)."),
        "generate_image_grid": gr.Checkbox(label="Generate Image Grid for Each Batch", value=d.generate_image_grid,
                                           elem_id="fr-generate-image-grid",
                                           info="With two or more images, one more: all of them in a grid."),
        "steps": gr.Slider(low, high, value=d.steps, step=1, label="Forced Overwrite of Sampling Step",
                           elem_id="fr-overwrite-step", info="-1: the performance mode's steps."),
        "overwrite_switch": gr.Slider(low, high, value=d.overwrite_switch, step=1,
                                      label="Forced Overwrite of Refiner Switch Step", elem_id="fr-overwrite-switch",
                                      info="-1: from Refiner Switch At."),
        "overwrite_width": gr.Slider(side_low, side_high, value=d.overwrite_width, step=1,
                                     label="Forced Overwrite of Generating Width", elem_id="fr-overwrite-width",
                                     info="-1: the aspect ratio's; else rounded down to a multiple of 8."),
        "overwrite_height": gr.Slider(side_low, side_high, value=d.overwrite_height, step=1,
                                      label="Forced Overwrite of Generating Height", elem_id="fr-overwrite-height",
                                      info="-1: the aspect ratio's; else rounded down to a multiple of 8."),
        "overwrite_vary_strength": gr.Slider(-1, 1.0, value=d.overwrite_vary_strength, step=0.001,
                                             label='Forced Overwrite of Denoising Strength of "Vary"',
                                             elem_id="fr-overwrite-vary-strength",
                                             info="Negative: the Vary method's own strength."),
        "overwrite_upscale_strength": gr.Slider(-1, 1.0, value=d.overwrite_upscale_strength, step=0.001,
                                                label='Forced Overwrite of Denoising Strength of "Upscale"',
                                                elem_id="fr-overwrite-upscale-strength",
                                                info="Negative: the Upscale method's own strength."),
        "disable_preview": gr.Checkbox(label="Disable Preview", value=d.disable_preview, elem_id="fr-disable-preview",
                                       info="No live picture while sampling."),
        "disable_intermediate_results": gr.Checkbox(label="Disable Intermediate Results",
                                                    value=d.disable_intermediate_results,
                                                    elem_id="fr-disable-intermediate-results",
                                                    info="Show only the final images, not each as it finishes."),
        "disable_seed_increment": gr.Checkbox(label="Disable seed increment", value=d.disable_seed_increment,
                                              elem_id="fr-disable-seed-increment",
                                              info="Every image of the batch gets the same seed."),
        "read_wildcards_in_order": gr.Checkbox(label="Read wildcards in order", value=d.read_wildcards_in_order,
                                               elem_id="fr-read-wildcards-in-order"),
        "save_metadata_to_images": gr.Checkbox(label="Save Metadata to Images", value=d.save_metadata_to_images,
                                               elem_id="fr-save-metadata",
                                               info="Each image file carries the parameters that made it "
                                                    "(Load parameters reads them back)."),
        "metadata_scheme": gr.Radio(list(flags.METADATA_SCHEMES), value=d.metadata_scheme, label="Metadata Scheme",
                                    visible=d.save_metadata_to_images,
                                    elem_id="fr-metadata-scheme",
                                    info="fooocus: Fooocus's own fields; a1111: the text AUTOMATIC1111 and "
                                         "Civitai read. Input images are not recorded."),
    }


def _debug_inpaint_tab(d: debug_page.DebugValues) -> dict[str, Any]:
    low, high = debug_page.ERODE_RANGE
    return {
        "debugging_inpaint_preprocessor": gr.Checkbox(label="Debug Inpaint Preprocessing",
                                                      value=d.debugging_inpaint_preprocessor,
                                                      elem_id="fr-debug-inpaint-preprocessor",
                                                      info="Show the prepared area and mask (nothing is generated)."),
        "inpaint_disable_initial_latent": gr.Checkbox(label="Disable initial latent in inpaint",
                                                      value=d.inpaint_disable_initial_latent,
                                                      elem_id="fr-inpaint-disable-initial-latent"),
        "inpaint_engine": gr.Dropdown(list(flags.INPAINT_ENGINE_VERSIONS), value=d.inpaint_engine,
                                      label="Inpaint Engine", elem_id="fr-inpaint-engine",
                                      info="Which Fooocus inpaint patch the UNet gets (None: no patch)."),
        "inpaint_erode_or_dilate": gr.Slider(low, high, value=d.inpaint_erode_or_dilate, step=1,
                                             label="Mask Erode or Dilate", elem_id="fr-inpaint-erode-or-dilate",
                                             info="Grows (positive) or shrinks (negative) the repainted area by "
                                                  "this many pixels, before any invert."),
    }


def _freeu_tab(d: debug_page.DebugValues) -> dict[str, Any]:
    b_low, b_high = debug_page.FREEU_B_RANGE
    s_low, s_high = debug_page.FREEU_S_RANGE
    return {
        "freeu_enabled": gr.Checkbox(label="Enabled", value=d.freeu_enabled, elem_id="fr-freeu-enabled"),
        "freeu_b1": gr.Slider(b_low, b_high, value=d.freeu_b1, step=0.01, label="B1", elem_id="fr-freeu-b1"),
        "freeu_b2": gr.Slider(b_low, b_high, value=d.freeu_b2, step=0.01, label="B2", elem_id="fr-freeu-b2"),
        "freeu_s1": gr.Slider(s_low, s_high, value=d.freeu_s1, step=0.01, label="S1", elem_id="fr-freeu-s1"),
        "freeu_s2": gr.Slider(s_low, s_high, value=d.freeu_s2, step=0.01, label="S2", elem_id="fr-freeu-s2"),
    }


@dataclass
class DebugPanel:
    """The Developer Debug Mode box and the column of tabs it shows."""

    enabled: gr.Checkbox
    column: gr.Column
    by_field: dict[str, Any]        # Debug Tools, Inpaint and FreeU controls by request field
    control: ControlTabControls
    defaults: debug_page.DebugValues   # the controls' initial values: what the server takes for them


def _debug_panel(cfg: config_module.Config) -> DebugPanel:
    """Upstream's Developer Debug Mode: a box, and under it the Debug Tools, Control,
    Inpaint and FreeU tabs (hidden until the box is ticked; their values count either way)."""
    defaults, initial = debug_page.DebugValues.defaults(cfg), debug_page.DebugValues.initial(cfg)
    shown = cfg.default_developer_debug_mode_checkbox
    enabled = gr.Checkbox(label="Developer Debug Mode", value=shown, container=False, elem_id="fr-debug-mode")
    by_field: dict[str, Any] = {}
    with gr.Column(visible=shown, elem_id="fr-debug-column") as column:
        with gr.Tabs(elem_id="fr-debug-tabs", overflow_behavior="wrap"):
            with gr.Tab("Debug Tools", elem_id="fr-debug-tools-tab"):
                by_field.update(_debug_tools_tab(initial))
            with gr.Tab("Control", elem_id="fr-control-tab"):
                control = _control_tab()
            with gr.Tab("Inpaint", elem_id="fr-debug-inpaint-tab"):
                by_field.update(_debug_inpaint_tab(initial))
            with gr.Tab("FreeU", elem_id="fr-freeu-tab"):
                by_field.update(_freeu_tab(initial))
    return DebugPanel(enabled, column, by_field, control, defaults)


@dataclass
class InputImageControls:
    """The Input Image panel (upstream's layout); ``tab`` is a hidden textbox the tabs
    set in the browser, so the request follows the tab shown when Generate is pressed."""

    enabled: gr.Checkbox
    tab: gr.Textbox
    uov_image: gr.Image
    uov_method: gr.Radio
    image_prompts: list[ImagePromptControls]
    inpaint_canvas: gr.ImageMask
    inpaint_mask_upload: gr.Image
    outpaint: gr.CheckboxGroup
    inpaint_strength: gr.Slider
    inpaint_respective_field: gr.Slider
    invert_mask: gr.Checkbox                    # "Invert Mask When Generating": a debug field, read there
    inpaint_method: gr.Dropdown                 # presets the inpaint options (its change event)
    inpaint_additional_prompt: gr.Textbox
    control: ControlTabControls | None = None   # in the Advanced column, built after the panel

    def components(self) -> set[gr.components.Component]:
        out: set[gr.components.Component] = {
            self.enabled, self.tab, self.uov_image, self.uov_method, self.inpaint_canvas,
            self.inpaint_mask_upload, self.outpaint, self.inpaint_strength, self.inpaint_respective_field,
            self.inpaint_additional_prompt}
        for slot in self.image_prompts:
            out |= {slot.image, slot.stop, slot.weight, slot.kind}
        if self.control is not None:
            out |= self.control.components()
        return out

    def values(self, data: Mapping[Any, Any]) -> input_image_page.InputImageValues:
        return input_image_page.InputImageValues(
            enabled=bool(data[self.enabled]),
            tab=data[self.tab] or input_image_page.TAB_UOV,
            uov_image=data[self.uov_image],
            uov_method=data[self.uov_method],
            image_prompts=tuple(input_image_page.ImagePromptSlot(
                data[s.image], float(data[s.stop]), float(data[s.weight]), data[s.kind] or flags.IMAGE_PROMPT)
                for s in self.image_prompts),
            inpaint_canvas=data[self.inpaint_canvas],
            inpaint_mask_upload=data[self.inpaint_mask_upload],
            outpaint=tuple(data[self.outpaint] or ()),
            inpaint_strength=float(data[self.inpaint_strength]),
            inpaint_respective_field=float(data[self.inpaint_respective_field]),
            inpaint_additional_prompt=data[self.inpaint_additional_prompt] or "",
            control=(self.control.values(data) if self.control is not None
                     else input_image_page.ControlValues()),
        )


@dataclass
class Controls:
    """The page's input components, in one place."""

    prompt: gr.Textbox
    negative_prompt: gr.Textbox
    performance: gr.Radio
    aspect_ratio: gr.Radio
    image_number: gr.Slider
    seed: gr.Textbox
    random_seed: gr.Checkbox
    base_model: gr.Dropdown
    refiner_model: gr.Dropdown
    refiner_switch: gr.Slider
    loras: list[LoraSlot] = field(default_factory=list)
    sampler: gr.Dropdown | None = None
    scheduler: gr.Dropdown | None = None
    guidance_scale: gr.Slider | None = None
    vae: gr.Dropdown | None = None
    output_format: gr.Radio | None = None
    styles: gr.CheckboxGroup | None = None
    sharpness: gr.Slider | None = None
    adm: tuple[gr.Slider, gr.Slider, gr.Slider] | None = None   # positive, negative, end
    input_image: InputImageControls | None = None
    debug: DebugControls | None = None

    def components(self) -> set[gr.components.Component]:
        out: set[gr.components.Component] = {
            self.prompt, self.negative_prompt, self.performance, self.aspect_ratio, self.image_number,
            self.seed, self.random_seed, self.base_model, self.refiner_model, self.refiner_switch,
        }
        for slot in self.loras:
            out |= {slot.enabled, slot.name, slot.weight}
        for extra in (self.sampler, self.scheduler, self.guidance_scale, self.vae, self.output_format):
            assert extra is not None
            out.add(extra)
        out |= {c for c in (self.styles, self.sharpness, *(self.adm or ())) if c is not None}
        if self.input_image is not None:
            out |= self.input_image.components()
        if self.debug is not None:
            out |= self.debug.components()
        return out

    def values(self, data: Mapping[Any, Any]) -> UIValues:
        """Read a Gradio ``{component: value}`` mapping (set-style inputs)."""
        assert self.sampler is not None and self.scheduler is not None and self.guidance_scale is not None
        return UIValues(
            prompt=data[self.prompt],
            negative_prompt=data[self.negative_prompt],
            performance=data[self.performance],
            aspect_ratio=data[self.aspect_ratio],
            image_number=int(data[self.image_number]),
            seed=parse_seed(data[self.seed], bool(data[self.random_seed])),
            base_model=data[self.base_model],
            refiner_model=data[self.refiner_model],
            refiner_switch=float(data[self.refiner_switch]),
            loras=tuple(LoraValue(bool(data[s.enabled]), data[s.name] or flags.NONE_NAME, float(data[s.weight]))
                        for s in self.loras),
            sampler=data[self.sampler],
            scheduler=data[self.scheduler],
            guidance_scale=float(data[self.guidance_scale]),
            vae=data[self.vae] if self.vae is not None else flags.DEFAULT_VAE,
            output_format=data[self.output_format] if self.output_format is not None else "png",
            input_image=self.input_image.values(data) if self.input_image is not None else None,
            **self._debug_values(data),
            **self._t2i_values(data),
        )

    def _debug_values(self, data: Mapping[Any, Any]) -> dict[str, Any]:
        if self.debug is None:
            return {}
        return {"debug": self.debug.values(data), "debug_defaults": self.debug.defaults}

    def _t2i_values(self, data: Mapping[Any, Any]) -> dict[str, Any]:
        """Styles, sharpness and ADM guidance, where the page has those controls."""
        out: dict[str, Any] = {}
        if self.styles is not None:
            out["styles"] = tuple(data[self.styles] or ())
        if self.sharpness is not None:
            out["sharpness"] = float(data[self.sharpness])
        if self.adm is not None:
            out.update(zip(("adm_scaler_positive", "adm_scaler_negative", "adm_scaler_end"),
                           (float(data[c]) for c in self.adm)))
        return out


def _initial_preset() -> str | None:
    import args_manager
    name = getattr(args_manager.args, "preset", None)
    return name if name in t2i_page.preset_choices() else None


@dataclass
class FieldTargets:
    """The controls that request fields (a preset's or loaded parameters) are written into."""

    prompt: Any
    negative_prompt: Any
    performance: Any
    aspect_ratio: Any
    image_number: Any
    base_model: Any
    refiner_model: Any
    refiner_switch: Any
    guidance_scale: Any
    sampler: Any
    scheduler: Any
    vae: Any
    styles: Any
    sharpness: Any
    adm: tuple
    random_seed: Any
    seed: Any
    loras: list
    debug: Mapping[str, Any] = field(default_factory=dict)   # Developer Debug controls by request field

    SIMPLE = ("prompt", "negative_prompt", "image_number", "base_model", "refiner_model", "refiner_switch",
              "guidance_scale", "sampler", "scheduler", "vae", "sharpness")
    ADM = ("adm_scaler_positive", "adm_scaler_negative", "adm_scaler_end")

    def outputs(self) -> list[Any]:
        return [*(getattr(self, k) for k in self.SIMPLE), self.performance, self.aspect_ratio, self.styles,
                *self.adm, self.random_seed, self.seed,
                *[c for slot in self.loras for c in (slot.enabled, slot.name, slot.weight)],
                *self.debug.values()]

    def updates(self, fields: dict, aspect_values: set[str], style_names: list[str]) -> list[Any]:
        """One update per output: the field's value, or a skip where the field is absent or
        has no place on the page (an unknown style, aspect ratio or performance)."""
        def value(key: str) -> Any:
            return gr.update(value=fields[key]) if key in fields and fields[key] is not None else gr.skip()

        out = [value(k) for k in self.SIMPLE]
        performance = fields.get("performance")
        out.append(gr.update(value=performance) if performance in flags.Performance.values() else gr.skip())
        size = f"{fields['width']}*{fields['height']}" if "width" in fields and "height" in fields else None
        out.append(gr.update(value=size) if size in aspect_values else gr.skip())
        styles = fields.get("styles")
        if isinstance(styles, list):   # the selected ones on top, in their order, as after a click
            chosen = [s for s in styles if s in style_names]
            out.append(gr.update(choices=chosen + [s for s in style_names if s not in chosen], value=chosen))
        else:
            out.append(gr.skip())
        out += [value(k) for k in self.ADM]
        if isinstance(fields.get("seed"), int) and fields["seed"] >= 0:
            out += [gr.update(value=False), gr.update(value=str(fields["seed"]), visible=True)]
        else:
            out += [gr.skip(), gr.skip()]
        loras = fields.get("loras")
        for i, _slot in enumerate(self.loras):
            if not isinstance(loras, list):
                out += [gr.skip()] * 3
            elif i < len(loras):
                out += [gr.update(value=True), gr.update(value=loras[i][0]), gr.update(value=float(loras[i][1]))]
            else:
                out += [gr.update(value=True), gr.update(value=flags.NONE_NAME), gr.update(value=1.0)]
        loaded = debug_page.loaded_values(fields)
        out += [gr.update(value=loaded[name]) if name in loaded else gr.skip() for name in self.debug]
        return out


def _checkpoint_choices(cfg: config_module.Config) -> list[str]:
    return config_module.list_model_files(cfg.path_checkpoints)


def _lora_choices(cfg: config_module.Config) -> list[str]:
    return [flags.NONE_NAME] + config_module.list_model_files(cfg.path_loras)


def _vae_choices(cfg: config_module.Config) -> list[str]:
    return [flags.DEFAULT_VAE] + config_module.list_model_files(cfg.path_vae)


def _default_base_model(cfg: config_module.Config, choices: list[str]) -> str | None:
    if cfg.default_model in choices:
        return cfg.default_model
    return choices[0] if choices else None


def _aspect_choices(cfg: config_module.Config) -> list[tuple[str, str]]:
    values = list(flags.SDXL_ASPECT_RATIOS)
    if cfg.default_aspect_ratio not in values:
        values.insert(0, cfg.default_aspect_ratio)
    return [(aspect_ratio_label(v), v) for v in values]


def _aspect_accordion_label(value: str | None) -> str:
    """'Aspect Ratios · 1152×896 | 9:7': the collapsed accordion still says what is chosen."""
    try:
        return f"Aspect Ratios · {aspect_ratio_label(value or '')}"
    except ValueError:
        return "Aspect Ratios"


def _short_model_label(name: str) -> str:
    """'sdxl/base.safetensors:unet' -> 'unet · base' (fits a phone-width dropdown)."""
    checkpoint, _, part = name.rpartition(":")
    stem = Path(checkpoint).stem if checkpoint else name
    return f"{part} · {stem}" if checkpoint else name


def _lock_updates(performance: str, restore: Mapping[str, Any]) -> tuple[Any, ...]:
    """(sampler, scheduler, guidance, refiner, refiner switch, note) for a performance mode:
    what the mode overrides is shown locked with the value it uses; the rest gets its
    ``restore`` value (sampler, scheduler, guidance, and the refiner and its switch when given)."""
    try:
        locked = LockedControls.of(performance)
    except ValueError:
        return (gr.skip(),) * 6

    def control(value: Any, default: Any, info: str) -> Any:
        if value is None:
            return gr.update(interactive=True, value=default, info=None)
        return gr.update(interactive=False, value=value, info=f"set by {performance}")

    note = "" if locked.locks_nothing else (
        f"*{performance} sets the sampler, scheduler and guidance, turns the refiner off and does not use"
        " the negative prompt, sharpness or ADM guidance.*")
    if not locked.refiner:
        refiner = gr.update(interactive=False, value=flags.NONE_NAME, info=f"off in {performance}")
        switch = gr.update(visible=False)
    elif "refiner" in restore:
        refiner = gr.update(interactive=True, value=restore["refiner"], info=None)
        switch = gr.update(visible=restore["refiner"] not in (None, flags.NONE_NAME),
                           value=restore["refiner_switch"])
    else:
        refiner, switch = gr.update(interactive=True, info=None), gr.skip()
    return (control(locked.sampler, restore["sampler"], ""),
            control(locked.scheduler, restore["scheduler"], ""),
            control(locked.guidance_scale, restore["guidance"], ""),
            refiner, switch, note)


def _ignored_control_updates(performance: str, count: int) -> list[Any]:
    """The negative prompt, sharpness, ADM, CFG mimicking and refiner swap controls: frozen
    (values kept) where the mode ignores them."""
    try:
        frozen = LockedControls.of(performance).ignores_guidance_extras
    except ValueError:
        return [gr.skip()] * count
    return [gr.update(interactive=not frozen)] * count


def _mode_memory(performance: str, current: dict[str, Any],
                 kept: dict[str, dict] | None) -> tuple[dict[str, Any], dict[str, dict] | None]:
    """(the values to restore, what the page session keeps) when the performance changes.

    Entering a mode that locks controls keeps the user's values and the ones the mode shows;
    leaving it gives each control its kept value back, unless something (a preset, loaded
    parameters) set the control since, to another value than the mode showed."""
    try:
        locked = LockedControls.of(performance)
    except ValueError:
        return current, kept
    if not locked.locks_nothing:
        return current, {"user": kept["user"] if kept else current, "shown": locked.shown(current)}
    if kept is None:
        return current, None
    return {k: kept["user"][k] if current[k] == kept["shown"][k] else current[k] for k in MODE_VALUES}, None



INPUT_IMAGE_TABS = (("Upscale or Variation", input_image_page.TAB_UOV, "fr-uov-tab"),
                    ("Image Prompt", input_image_page.TAB_IP, "fr-ip-tab"),
                    ("Inpaint or Outpaint", input_image_page.TAB_INPAINT, "fr-inpaint-tab"))
# Upstream's tab ids (config default_selected_image_input_tab_id) -> ours.
INPUT_IMAGE_TAB_IDS = {"uov_tab": input_image_page.TAB_UOV, "ip_tab": input_image_page.TAB_IP,
                       "inpaint_tab": input_image_page.TAB_INPAINT}


def _input_image_panel(enabled: gr.Checkbox, cfg: config_module.Config
                       ) -> tuple[InputImageControls, gr.Column, list[gr.Tab], gr.Checkbox, list[gr.Column]]:
    """Upstream's Input Image panel: one tab per mode, the image upload left and its
    options right (Image Prompt: four slots, their Stop At/Weight behind an Advanced box).
    Returns the controls, the panel, the tabs, the image-prompt Advanced box and the
    slots' advanced columns, for the caller to wire. Starting values: config.txt's (upstream's keys)."""
    first_tab = INPUT_IMAGE_TAB_IDS[cfg.default_selected_image_input_tab_id]
    method = input_image_page.inpaint_method_settings(cfg.default_inpaint_method, cfg.default_inpaint_engine_version)
    ip_advanced_on = cfg.default_image_prompt_advanced_checkbox
    with gr.Column(visible=cfg.default_image_prompt_checkbox, elem_id="fr-input-image-panel") as panel:
        tab_value = gr.Textbox(value=first_tab, visible=False, elem_id="fr-input-image-tab")
        tabs: list[gr.Tab] = []
        with gr.Tabs(selected=first_tab, elem_id="fr-input-image-tabs", overflow_behavior="wrap"):
            with gr.Tab(INPUT_IMAGE_TABS[0][0], id=INPUT_IMAGE_TABS[0][1], elem_id=INPUT_IMAGE_TABS[0][2]) as uov_tab:
                with gr.Row():
                    with gr.Column(min_width=200):
                        uov_image = gr.Image(label="Image to vary or upscale", type="numpy", format="png",
                                             sources=["upload", "clipboard"], height=300, elem_id="fr-uov-image")
                    with gr.Column(min_width=200):
                        uov_method = gr.Radio(list(flags.UOV_METHODS), value=cfg.default_uov_method,
                                              label="Upscale or Variation", elem_id="fr-uov-method")
                tabs.append(uov_tab)
            with gr.Tab(INPUT_IMAGE_TABS[1][0], id=INPUT_IMAGE_TABS[1][1], elem_id=INPUT_IMAGE_TABS[1][2]) as ip_tab:
                slots: list[ImagePromptControls] = []
                advanced_columns: list[gr.Column] = []
                with gr.Row(elem_classes=["fr-ip-row"]):
                    for i in range(input_image_page.IMAGE_PROMPT_SLOTS):
                        with gr.Column(min_width=150):
                            image = gr.Image(label=f"Image Prompt {i + 1}", show_label=False, type="numpy",
                                             format="png", sources=["upload", "clipboard"], height=220,
                                             elem_id=f"fr-ip-image-{i}")
                            with gr.Column(visible=ip_advanced_on, elem_id=f"fr-ip-advanced-{i}") as advanced_col:
                                stop = gr.Slider(0.0, 1.0, value=input_image_page.IMAGE_PROMPT_STOP, step=0.001,
                                                 label="Stop At", elem_id=f"fr-ip-stop-{i}")
                                weight = gr.Slider(0.0, 2.0, value=input_image_page.IMAGE_PROMPT_WEIGHT,
                                                   step=0.001, label="Weight", elem_id=f"fr-ip-weight-{i}")
                                kind = gr.Radio(list(input_image_page.IMAGE_PROMPT_TYPES), value=flags.IMAGE_PROMPT,
                                                label="Type", container=False, elem_id=f"fr-ip-type-{i}")
                            advanced_columns.append(advanced_col)
                            slots.append(ImagePromptControls(image, stop, weight, kind))
                ip_advanced = gr.Checkbox(label="Advanced", value=ip_advanced_on, container=False,
                                          elem_id="fr-ip-advanced")
                tabs.append(ip_tab)
            with gr.Tab(INPUT_IMAGE_TABS[2][0], id=INPUT_IMAGE_TABS[2][1],
                        elem_id=INPUT_IMAGE_TABS[2][2]) as inpaint_tab:
                with gr.Row():
                    with gr.Column(scale=3, min_width=240):
                        # A short label: the canvas's toolbar is drawn over the top right of the box.
                        canvas = gr.ImageMask(label="Image", type="numpy", format="png", height=420,
                                              sources=["upload", "clipboard"],
                                              brush=gr.Brush(colors=["#FFFFFF"], color_mode="fixed"),
                                              elem_id="fr-inpaint-canvas")
                        gr.Markdown("Draw over the parts of the picture that should change, or choose an "
                                    "outpaint direction.", elem_id="fr-inpaint-hint")
                    with gr.Column(scale=2, min_width=200):
                        method_choice = gr.Dropdown(list(flags.INPAINT_METHODS), value=cfg.default_inpaint_method,
                                                    label="Method", elem_id="fr-inpaint-method")
                        additional_prompt = gr.Textbox(label="Inpaint Additional Prompt", lines=2,
                                                       visible=method.additional_prompt_shown,
                                                       placeholder="What the repainted part should show",
                                                       elem_id="fr-inpaint-additional-prompt")
                        outpaint = gr.CheckboxGroup(list(flags.OUTPAINT_SELECTIONS), value=[],
                                                    visible=method.outpaint_shown,
                                                    label="Outpaint Direction", elem_id="fr-outpaint")
                        mask_upload = gr.Image(label="Mask (optional, white repaints)", type="numpy",
                                               format="png", sources=["upload", "clipboard"], height=200,
                                               image_mode="RGBA", elem_id="fr-inpaint-mask-upload")
                        invert_mask = gr.Checkbox(label="Invert Mask When Generating",
                                                  value=cfg.default_invert_mask_checkbox,
                                                  elem_id="fr-invert-mask")
                        with gr.Accordion("Inpaint settings", open=False, elem_id="fr-inpaint-advanced"):
                            strength = gr.Slider(0.0, 1.0, value=method.strength, step=0.001,
                                                 label="Inpaint Denoising Strength", elem_id="fr-inpaint-strength")
                            respective = gr.Slider(0.0, 1.0, value=method.respective_field,
                                                   step=0.001, label="Inpaint Respective Field",
                                                   elem_id="fr-inpaint-respective-field")
                tabs.append(inpaint_tab)
    controls = InputImageControls(enabled=enabled, tab=tab_value, uov_image=uov_image,
                                  uov_method=uov_method, image_prompts=slots, inpaint_canvas=canvas,
                                  inpaint_mask_upload=mask_upload, outpaint=outpaint, inpaint_strength=strength,
                                  inpaint_respective_field=respective, invert_mask=invert_mask,
                                  inpaint_method=method_choice, inpaint_additional_prompt=additional_prompt)
    return controls, panel, tabs, ip_advanced, advanced_columns


# -- the page's panels: each builds its components (in page order) and returns them ----------

@dataclass
class AppContext:
    """What the page's event handlers and the API endpoints use from outside the page."""

    cfg: config_module.Config
    worker: Callable[[], Worker]
    status: Callable[[], dict]
    demo_warning: Callable[[], str | None]
    free_memory: Callable[[], dict]
    unload_model: Callable[[str], dict]
    followers: Followers
    guard: route_guard.RouteGuard   # who may read what; which API clients are still there


@dataclass
class ProgressPanel:
    progress: gr.HTML
    gallery: gr.Gallery


@dataclass
class PromptPanel:
    prompt: gr.Textbox
    generate: gr.Button
    stop: gr.Button
    skip: gr.Button
    input_image_checkbox: gr.Checkbox
    advanced_checkbox: gr.Checkbox


@dataclass
class InputImagePanel:
    controls: InputImageControls
    panel: gr.Column
    tabs: list[gr.Tab]
    ip_advanced: gr.Checkbox
    ip_advanced_columns: list[gr.Column]


@dataclass
class MemoryPanel:
    html: gr.HTML
    free: gr.Button
    refresh: gr.Button
    unload_choice: gr.Dropdown
    unload: gr.Button

    def outputs(self) -> list[Any]:
        return [self.html, self.unload_choice]


@dataclass
class ReportPanel:
    report: gr.JSON
    history_link: gr.HTML


@dataclass
class LoadParametersPanel:
    image: gr.File
    json: gr.Textbox
    load: gr.Button
    note: gr.Markdown


@dataclass
class SettingsTab:
    preset: gr.Dropdown
    preset_note: gr.Markdown
    performance: gr.Radio
    performance_note: gr.Markdown
    aspect_ratio_accordion: gr.Accordion
    aspect_ratio: gr.Radio
    image_number: gr.Slider
    output_format: gr.Radio
    negative: gr.Textbox
    random_seed: gr.Checkbox
    seed: gr.Textbox


@dataclass
class StylesTab:
    search: gr.Textbox
    styles: gr.CheckboxGroup
    samples: gr.HTML    # hidden: the styles' preview pictures, for the page's hover script


@dataclass
class ModelsTab:
    base_model: gr.Dropdown
    refiner_model: gr.Dropdown
    refiner_switch: gr.Slider
    loras: list[LoraSlot]
    refresh: gr.Button


@dataclass
class AdvancedTab:
    guidance: gr.Slider
    sampler: gr.Dropdown
    scheduler: gr.Dropdown
    vae: gr.Dropdown
    sharpness: gr.Slider
    adm: tuple[gr.Slider, gr.Slider, gr.Slider]
    debug: DebugPanel


@dataclass
class Page:
    """Every panel of the page, for the event wiring."""

    owner: gr.BrowserState
    banner: gr.Markdown
    shown: ProgressPanel
    prompt: PromptPanel
    input_image: InputImagePanel
    memory: MemoryPanel
    report: ReportPanel
    params: LoadParametersPanel
    advanced_column: gr.Column
    settings: SettingsTab
    styles: StylesTab
    models: ModelsTab
    advanced: AdvancedTab

    def controls(self) -> Controls:
        s, m, a = self.settings, self.models, self.advanced
        return Controls(prompt=self.prompt.prompt, negative_prompt=s.negative, performance=s.performance,
                        aspect_ratio=s.aspect_ratio, image_number=s.image_number, seed=s.seed,
                        random_seed=s.random_seed, base_model=m.base_model, refiner_model=m.refiner_model,
                        refiner_switch=m.refiner_switch, loras=m.loras, sampler=a.sampler, scheduler=a.scheduler,
                        guidance_scale=a.guidance, vae=a.vae, output_format=s.output_format,
                        styles=self.styles.styles, sharpness=a.sharpness, adm=a.adm,
                        input_image=self.input_image.controls, debug=self.debug_controls())

    def field_targets(self) -> FieldTargets:
        s, m, a = self.settings, self.models, self.advanced
        return FieldTargets(prompt=self.prompt.prompt, negative_prompt=s.negative, performance=s.performance,
                            aspect_ratio=s.aspect_ratio, image_number=s.image_number, base_model=m.base_model,
                            refiner_model=m.refiner_model, refiner_switch=m.refiner_switch,
                            guidance_scale=a.guidance, sampler=a.sampler, scheduler=a.scheduler, vae=a.vae,
                            styles=self.styles.styles, sharpness=a.sharpness, adm=a.adm,
                            random_seed=s.random_seed, seed=s.seed, loras=m.loras,
                            debug=self.debug_controls().by_field)

    def debug_controls(self) -> DebugControls:
        """Developer Debug Mode's controls, with the inpaint panel's invert box among them."""
        panel = self.advanced.debug
        return DebugControls({**panel.by_field, "invert_mask_checkbox": self.input_image.controls.invert_mask},
                             panel.defaults)

    def follow_outputs(self) -> list[Any]:
        """The components of FOLLOW_OUTPUTS, in its order."""
        p = self.prompt
        return [self.shown.progress, self.shown.gallery, self.report.report, self.banner, p.generate, p.stop,
                p.skip, self.settings.seed]


def _progress_panel() -> ProgressPanel:
    # One box for both: the live preview is drawn over the gallery (PAGE_CSS), never pushing it down.
    with gr.Column(elem_id="fr-main-view"):
        progress = gr.HTML(progress_html(TaskProgress(text="Idle", stage="idle")), elem_id="fr-progress")
        gallery = gr.Gallery(label="Images", columns=2, format="png", height=GALLERY_HEIGHT,
                             elem_id="fr-gallery", object_fit="contain")
    return ProgressPanel(progress, gallery)


def _prompt_panel(cfg: config_module.Config) -> PromptPanel:
    """The prompt, Generate/Stop/Skip, and the Input Image / Advanced boxes under them."""
    with gr.Row():
        prompt = gr.Textbox(label="Prompt", value=cfg.default_prompt, lines=3, scale=5, min_width=200,
                            placeholder="Type prompt here (Ctrl+Enter generates)", elem_id="fr-prompt")
        with gr.Column(scale=1, min_width=110, elem_id="fr-generate-col"):
            generate_btn = gr.Button("Generate", variant="primary", elem_id="generate_button")
            stop_btn = gr.Button("Stop", variant="stop", visible=False, elem_id="stop_button")
            skip_btn = gr.Button("Skip", visible=False, elem_id="skip_button")
    with gr.Row(elem_classes=["fr-check-row"]):
        input_image_checkbox = gr.Checkbox(label="Input Image", value=cfg.default_image_prompt_checkbox,
                                           container=False, elem_id="fr-input-image-checkbox")
        advanced_checkbox = gr.Checkbox(label="Advanced", value=cfg.default_advanced_checkbox, container=False,
                                        elem_id="fr-advanced-checkbox")
    return PromptPanel(prompt, generate_btn, stop_btn, skip_btn, input_image_checkbox, advanced_checkbox)


def _memory_panel() -> MemoryPanel:
    with gr.Accordion("Resident memory", open=False, elem_id="fr-memory"):
        memory_html = gr.HTML(elem_id="fr-memory-panel")
        with gr.Row():
            free_btn = gr.Button("Free memory", size="sm", elem_id="fr-free-memory")
            memory_refresh_btn = gr.Button("Refresh", size="sm", elem_id="fr-memory-refresh")
        unload_choice = gr.Dropdown([], label="Resident model", elem_id="fr-unload-choice")
        unload_btn = gr.Button("Unload this model", size="sm", elem_id="fr-unload")
    return MemoryPanel(memory_html, free_btn, memory_refresh_btn, unload_choice, unload_btn)


def _report_panel(cfg: config_module.Config) -> ReportPanel:
    with gr.Accordion("Report", open=False):
        report = gr.JSON(label="Report", elem_id="fr-report")
    history_link = gr.HTML(t2i_page.history_link_html(cfg), elem_id="fr-history")
    return ReportPanel(report, history_link)


def _load_parameters_panel() -> LoadParametersPanel:
    with gr.Accordion("Load parameters", open=False, elem_id="fr-load-params"):
        param_image = gr.File(label="Image with parameters", file_types=["image"], type="filepath",
                              elem_id="fr-param-image")
        param_json = gr.Textbox(label="or paste parameters (JSON)", lines=3, elem_id="fr-param-json")
        param_btn = gr.Button("Load parameters", size="sm", elem_id="fr-param-load")
        param_note = gr.Markdown("", elem_id="fr-param-note")
    return LoadParametersPanel(param_image, param_json, param_btn, param_note)


def _settings_tab(cfg: config_module.Config) -> SettingsTab:
    with gr.Tab("Settings"):
        preset = gr.Dropdown(t2i_page.preset_choices(), value=_initial_preset(),
                             label="Preset", elem_id="fr-preset", allow_custom_value=False)
        preset_note = gr.Markdown("", elem_id="fr-preset-note")
        performance = gr.Radio(flags.Performance.values(), value=cfg.default_performance.value,
                               label="Performance", elem_id="fr-performance")
        performance_note = gr.Markdown("")
        with gr.Accordion(_aspect_accordion_label(cfg.default_aspect_ratio), open=False,
                          elem_id="fr-aspect-ratios-accordion") as aspect_ratio_accordion:
            aspect_ratio = gr.Radio(_aspect_choices(cfg), value=cfg.default_aspect_ratio, show_label=False,
                                    label="Aspect Ratios", elem_id="fr-aspect-ratios")
        image_number = gr.Slider(1, min(cfg.default_max_image_number, MAX_IMAGE_NUMBER),
                                 value=min(cfg.default_image_number, cfg.default_max_image_number), step=1,
                                 label="Image Number")
        output_format = gr.Radio(list(OUTPUT_FORMATS), value="png", label="Output Format")
        negative = gr.Textbox(label="Negative prompt", value=cfg.default_prompt_negative, lines=2,
                              placeholder="Describe what you do not want to see", elem_id="fr-negative-prompt")
        random_seed = gr.Checkbox(label="Random", value=True, elem_id="fr-random-seed")
        seed = gr.Textbox(label="Seed", value="0", max_lines=1, visible=False, elem_id="fr-seed")
    return SettingsTab(preset, preset_note, performance, performance_note, aspect_ratio_accordion, aspect_ratio, image_number,
                       output_format, negative, random_seed, seed)


def _styles_tab(cfg: config_module.Config) -> StylesTab:
    with gr.Tab("Styles", elem_id="fr-styles-tab"):
        all_styles = t2i_page.style_names(cfg)
        style_search = gr.Textbox(label="Search styles", max_lines=1, elem_id="fr-style-search",
                                  placeholder="Type to filter the styles")
        chosen = t2i_page.default_styles(cfg)
        styles = gr.CheckboxGroup(chosen + [n for n in all_styles if n not in chosen], value=chosen,
                                  label="Styles", elem_id="fr-styles")
        style_samples = gr.HTML(t2i_page.style_samples_html(cfg), elem_id="fr-style-samples-holder",
                                container=False)
    return StylesTab(style_search, styles, style_samples)


def _lora_slots(cfg: config_module.Config) -> list[LoraSlot]:
    lora_files = _lora_choices(cfg)
    slots: list[LoraSlot] = []
    defaults = list(cfg.default_loras)
    # Upstream's default_max_lora_number and default_loras_min/max_weight, within max_lora_weight.
    weight_range = (max(cfg.default_loras_min_weight, -cfg.max_lora_weight),
                    min(cfg.default_loras_max_weight, cfg.max_lora_weight))
    for i in range(max(cfg.default_max_lora_number, len(defaults))):
        d = defaults[i] if i < len(defaults) else None
        with gr.Row(elem_classes=["fr-lora-row"]):
            slots.append(LoraSlot(
                enabled=gr.Checkbox(value=d.enabled if d else True, label="Enable",
                                    elem_classes=["fr-lora-enable"], min_width=80, scale=0),
                name=gr.Dropdown(lora_files, value=d.name if d else flags.NONE_NAME,
                                 label=f"LoRA {i + 1}", allow_custom_value=True,
                                 elem_classes=["fr-lora-name"], min_width=160, scale=3),
                weight=gr.Slider(*weight_range, value=d.weight if d else 1.0, step=0.01,
                                 label="Weight", elem_classes=["fr-lora-weight"],
                                 min_width=120, scale=2),
            ))
    return slots


def _models_tab(cfg: config_module.Config) -> ModelsTab:
    checkpoints = _checkpoint_choices(cfg)
    with gr.Tab("Models"):
        base_model = gr.Dropdown(checkpoints, value=_default_base_model(cfg, checkpoints),
                                 label="Base Model (SDXL only)", allow_custom_value=True)
        refiner_choices = [flags.NONE_NAME] + checkpoints
        refiner_value = (cfg.default_refiner if cfg.default_refiner in refiner_choices
                         else flags.NONE_NAME)
        refiner_model = gr.Dropdown(refiner_choices, value=refiner_value, label="Refiner",
                                    allow_custom_value=True)
        refiner_switch = gr.Slider(0.1, 1.0, value=cfg.default_refiner_switch, step=0.01,
                                   label="Refiner Switch At",
                                   visible=refiner_value != flags.NONE_NAME)
        slots = _lora_slots(cfg)
        refresh_btn = gr.Button("Refresh All Files", size="sm", elem_id="fr-refresh-files")
    return ModelsTab(base_model, refiner_model, refiner_switch, slots, refresh_btn)


def _advanced_tab(cfg: config_module.Config) -> AdvancedTab:
    with gr.Tab("Advanced"):
        guidance = gr.Slider(1.0, 30.0, value=cfg.default_cfg_scale, step=0.01,
                             label="Guidance Scale")
        sampler = gr.Dropdown(supported_samplers(), value=cfg.default_sampler, label="Sampler")
        scheduler = gr.Dropdown(supported_schedulers(), value=cfg.default_scheduler,
                                label="Scheduler")
        vae = gr.Dropdown(_vae_choices(cfg), value=cfg.default_vae, label="VAE",
                          allow_custom_value=True)
        sharpness = gr.Slider(0.0, 30.0, value=cfg.default_sample_sharpness, step=0.001,
                              label="Image Sharpness", elem_id="fr-sharpness")
        adm = (gr.Slider(0.1, 3.0, value=1.5, step=0.001, label="Positive ADM Guidance Scaler"),
               gr.Slider(0.1, 3.0, value=0.8, step=0.001, label="Negative ADM Guidance Scaler"),
               gr.Slider(0.0, 1.0, value=0.3, step=0.001, label="ADM Guidance End At Step"))
        debug = _debug_panel(cfg)
    return AdvancedTab(guidance, sampler, scheduler, vae, sharpness, adm, debug)


def _page(cfg: config_module.Config, warning: str | None) -> Page:
    """Lay the page out: results and prompt on the left, the Advanced tabs on the right."""
    owner = gr.BrowserState(None, storage_key="fooocus-resident-owner")
    banner = gr.Markdown(_banner_text(warning), visible=bool(warning), elem_id="demo-banner")
    with gr.Row():
        with gr.Column(scale=2, min_width=300):
            shown = _progress_panel()
            prompt = _prompt_panel(cfg)
            input_image = InputImagePanel(*_input_image_panel(prompt.input_image_checkbox, cfg))
            memory = _memory_panel()
            report = _report_panel(cfg)
            params = _load_parameters_panel()
        with gr.Column(scale=1, visible=cfg.default_advanced_checkbox, min_width=300,
                       elem_id="fr-advanced-column") as advanced_column:
            # Wrap, not "menu": on a phone every tab stays one tap away instead of hiding in a "..." menu.
            with gr.Tabs(elem_id="fr-advanced-tabs", overflow_behavior="wrap"):
                settings = _settings_tab(cfg)
                styles = _styles_tab(cfg)
                models = _models_tab(cfg)
                advanced = _advanced_tab(cfg)
    input_image.controls.control = advanced.debug.control
    return Page(owner, banner, shown, prompt, input_image, memory, report, params, advanced_column,
                settings, styles, models, advanced)


# -- event wiring, per panel (all page events are private) -------------------------------------

def _wire_generation(app: gr.Blocks, page: Page, ctx: AppContext) -> Any:
    """Generate, Stop, Skip, and a (re)loaded page following its task; returns the Generate event."""
    controls = page.controls()
    owner, follow_outputs = page.owner, page.follow_outputs()

    async def on_generate(data: dict, caller: gr.Request) -> AsyncIterator[tuple[Any, ...]]:
        try:
            request = controls.values(data).to_request()
        except (ValueError, TypeError) as error:
            yield _update(progress=progress_html(TaskProgress(text=f"Error: {error}", stage="error")),
                          report={"error": str(error)})
            return
        # Capped as the caller's login or address (its API calls' share too): the page's owner
        # token is the browser's own choice, a new one per request would dodge the cap.
        task = ctx.worker().submit(request, owner=page_owner(caller.username, data[owner]),
                                   client=api_owner(caller_client(caller)))
        async for update in follow_task(task, ctx.worker(), ctx.demo_warning, ctx.followers):
            yield update

    generate_event = page.prompt.generate.click(
        on_generate, inputs=controls.components() | {owner}, outputs=follow_outputs,
        api_visibility="private", concurrency_limit=None, show_progress="hidden")

    def on_stop(who: str | None, caller: gr.Request) -> None:
        ctx.worker().stop_owned(page_owner(caller.username, who))

    def on_skip(who: str | None, caller: gr.Request) -> None:
        ctx.worker().skip_owned(page_owner(caller.username, who))

    page.prompt.stop.click(on_stop, inputs=[owner], outputs=None, api_visibility="private", queue=False)
    page.prompt.skip.click(on_skip, inputs=[owner], outputs=None, api_visibility="private", queue=False)

    async def on_load(who: str | None, caller: gr.Request) -> AsyncIterator[tuple[Any, ...]]:
        """Give a new browser its owner token; a reloaded page follows its running task."""
        if not who:
            who = uuid.uuid4().hex
        yield (who, *_update())
        tasks = ctx.worker().tasks_of(page_owner(caller.username, who))
        if tasks:
            async for update in follow_task(tasks[-1], ctx.worker(), ctx.demo_warning, ctx.followers):
                yield (gr.skip(), *update)

    app.load(on_load, inputs=[owner], outputs=[owner, *follow_outputs], api_visibility="private",
             concurrency_limit=None, show_progress="hidden")
    return generate_event


def _wire_prompt_panel(page: Page) -> None:
    """The Advanced, Input Image and Developer Debug Mode boxes show their panels (and Save
    Metadata to Images its scheme)."""
    prompt = page.prompt
    prompt.advanced_checkbox.change(lambda on: gr.update(visible=bool(on)), inputs=[prompt.advanced_checkbox],
                                    outputs=[page.advanced_column], api_visibility="private", queue=False)
    prompt.input_image_checkbox.change(lambda on: gr.update(visible=bool(on)),
                                       inputs=[prompt.input_image_checkbox], outputs=[page.input_image.panel],
                                       api_visibility="private", queue=False)
    debug = page.advanced.debug
    debug.enabled.change(lambda on: gr.update(visible=bool(on)), inputs=[debug.enabled], outputs=[debug.column],
                         api_visibility="private", queue=False)
    save, scheme = debug.by_field["save_metadata_to_images"], debug.by_field["metadata_scheme"]
    save.change(lambda on: gr.update(visible=bool(on)), inputs=[save], outputs=[scheme],   # as upstream's
                api_visibility="private", queue=False)


def _wire_input_image_panel(panel: InputImagePanel, debug: DebugPanel, cfg: config_module.Config) -> None:
    for (_, tab_name, _), tab in zip(INPUT_IMAGE_TABS, panel.tabs):
        # In the browser: the tab shown is the mode sent, with no round trip to race Generate.
        tab.select(None, inputs=None, outputs=[panel.controls.tab], js=f"() => {json.dumps(tab_name)}",
                   api_visibility="private", queue=False)
    slots = panel.controls.image_prompts

    def on_ip_advanced(on: bool) -> list[Any]:
        # As upstream: the box shows the slots' options and resets them, so no value hidden
        # behind a closed box goes on being sent unnoticed.
        stop, weight = input_image_page.type_defaults(flags.IMAGE_PROMPT)
        return ([gr.update(visible=bool(on))] * len(panel.ip_advanced_columns) + [flags.IMAGE_PROMPT] * len(slots)
                + [stop] * len(slots) + [weight] * len(slots))

    panel.ip_advanced.change(on_ip_advanced, inputs=[panel.ip_advanced],
                             outputs=[*panel.ip_advanced_columns, *(s.kind for s in slots), *(s.stop for s in slots),
                                      *(s.weight for s in slots)],
                             api_visibility="private", queue=False)
    for slot in panel.controls.image_prompts:   # a type brings its own Stop At / Weight (upstream's defaults)
        slot.kind.change(lambda kind: [gr.update(value=v) for v in input_image_page.type_defaults(kind)],
                         inputs=[slot.kind], outputs=[slot.stop, slot.weight], api_visibility="private",
                         queue=False)
    controls = panel.controls

    def on_inpaint_method(method: str) -> list[Any]:
        chosen = input_image_page.inpaint_method_settings(method, cfg.default_inpaint_engine_version)
        return [gr.update(visible=True) if chosen.additional_prompt_shown else gr.update(visible=False, value=""),
                gr.update(visible=True) if chosen.outpaint_shown else gr.update(visible=False, value=[]),
                gr.update(value=chosen.disable_initial_latent), gr.update(value=chosen.engine),
                gr.update(value=chosen.strength), gr.update(value=chosen.respective_field)]

    controls.inpaint_method.change(
        on_inpaint_method, inputs=[controls.inpaint_method],
        outputs=[controls.inpaint_additional_prompt, controls.outpaint,
                 debug.by_field["inpaint_disable_initial_latent"], debug.by_field["inpaint_engine"],
                 controls.inpaint_strength, controls.inpaint_respective_field],
        api_visibility="private", queue=False)


def _wire_settings_tab(page: Page) -> None:
    """The seed box follows Random; the accordion names the aspect ratio; a performance mode
    locks what it overrides and freezes what it ignores, and leaving it restores the user's values."""
    settings, advanced, models = page.settings, page.advanced, page.models
    settings.random_seed.change(lambda on: gr.update(visible=not on), inputs=[settings.random_seed],
                                outputs=[settings.seed], api_visibility="private", queue=False)
    settings.aspect_ratio.change(lambda value: gr.update(label=_aspect_accordion_label(value)),
                                 inputs=[settings.aspect_ratio], outputs=[settings.aspect_ratio_accordion],
                                 api_visibility="private", queue=False)
    # Per page session: what a locking mode replaced, so leaving it puts back this user's values.
    kept_values = gr.State(None)
    mode_controls = [advanced.sampler, advanced.scheduler, advanced.guidance, models.refiner_model,
                     models.refiner_switch]
    # Upstream freezes these too in the distilled modes: they run CFG mimicking off and no refiner.
    ignored = [settings.negative, advanced.sharpness, *advanced.adm, advanced.debug.by_field["adaptive_cfg"],
               advanced.debug.by_field["refiner_swap_method"]]

    def on_performance(performance: str, *values: Any) -> tuple[Any, ...]:
        *current, kept = values
        restore, kept = _mode_memory(performance, dict(zip(MODE_VALUES, current)), kept)
        return (*_lock_updates(performance, restore), *_ignored_control_updates(performance, len(ignored)), kept)

    settings.performance.change(on_performance, inputs=[settings.performance, *mode_controls, kept_values],
                                outputs=[*mode_controls, settings.performance_note, *ignored, kept_values],
                                api_visibility="private", queue=False)


def _wire_models_tab(models: ModelsTab, advanced: AdvancedTab, preset: gr.Dropdown, cfg: config_module.Config) -> None:
    """The switch shows with a refiner; Refresh All Files lists the folders (and presets) again."""
    models.refiner_model.change(lambda r: gr.update(visible=bool(r) and r != flags.NONE_NAME),
                                inputs=[models.refiner_model], outputs=[models.refiner_switch],
                                api_visibility="private", queue=False)

    def on_refresh() -> tuple[Any, ...]:
        fresh = config_module.list_model_files(cfg.path_checkpoints)
        loras = _lora_choices(cfg)
        return (gr.update(choices=fresh), gr.update(choices=[flags.NONE_NAME] + fresh),
                gr.update(choices=_vae_choices(cfg)), gr.update(choices=t2i_page.preset_choices()),
                *[gr.update(choices=loras) for _ in models.loras])

    models.refresh.click(on_refresh, inputs=None,
                         outputs=[models.base_model, models.refiner_model, advanced.vae, preset,
                                  *[s.name for s in models.loras]],
                         api_visibility="private", queue=False)


def _wire_styles_tab(styles: StylesTab, cfg: config_module.Config) -> None:
    """A search filters; a click moves the selected styles to the top, in the order chosen."""
    def on_styles(query: str, chosen: list[str]) -> Any:
        return gr.update(choices=t2i_page.filtered_styles(query, chosen, cfg))

    styles.search.change(on_styles, inputs=[styles.search, styles.styles], outputs=[styles.styles],
                         api_visibility="private", queue=False)
    styles.styles.input(on_styles, inputs=[styles.search, styles.styles], outputs=[styles.styles],
                        api_visibility="private", queue=False)


def _wire_presets_and_parameters(app: gr.Blocks, page: Page, cfg: config_module.Config,
                                 guard: route_guard.RouteGuard, generate_event: Any) -> None:
    """A preset, or parameters loaded back, set the controls; the history-log link is today's
    (set again after each run, as upstream's: a run past midnight logs into the next day's)."""
    field_targets = page.field_targets()
    aspect_values = {value for _, value in _aspect_choices(cfg)}
    param_note = page.params.note

    def apply_fields(fields: dict, note: str) -> tuple[Any, ...]:
        return (*field_targets.updates(fields, aspect_values, t2i_page.style_names(cfg)), note)

    def on_preset(name: str | None, progress: gr.Progress = gr.Progress()) -> tuple[Any, ...]:
        if not name:
            return (*[gr.skip()] * len(field_targets.outputs()), "")

        def downloading(file: str, done: int, total: int | None) -> None:
            progress((done, total), desc=f"Downloading {file}", unit="bytes")

        try:
            fields, note = t2i_page.preset_fields(name, downloading, supported_samplers(), supported_schedulers())
        except ValueError as error:
            return (*[gr.skip()] * len(field_targets.outputs()), f"Error: {error}")
        if not fields.get("prompt"):
            fields.pop("prompt", None)      # an empty preset prompt keeps what was typed
        return apply_fields(fields, note)

    def on_load_parameters(image: str | None, pasted: str | None) -> tuple[Any, ...]:
        from modules import parameters
        try:
            fields = t2i_page.loaded_fields(image, pasted)
        except parameters.ParameterError as error:
            return (*[gr.skip()] * len(field_targets.outputs()), f"Error: {error}")
        notes = t2i_page.unavailable(fields, supported_samplers(), supported_schedulers())
        return apply_fields(fields, " ".join([f"Loaded {len(fields)} parameters.", *notes]))

    # Queued: a preset's model downloads show their progress on the page.
    page.settings.preset.change(on_preset, inputs=[page.settings.preset],
                                outputs=[*field_targets.outputs(), page.settings.preset_note],
                                api_visibility="private", show_progress="minimal")
    page.params.load.click(on_load_parameters, inputs=[page.params.image, page.params.json],
                           outputs=[*field_targets.outputs(), param_note], api_visibility="private", queue=False)
    def history_link(caller: gr.Request) -> str:
        return t2i_page.history_link_html(cfg, guard.history_shown(login=caller.username is not None))

    def on_page_load(caller: gr.Request) -> tuple[str, str]:
        return history_link(caller), t2i_page.style_samples_html(cfg)

    generate_event.then(history_link, inputs=None, outputs=[page.report.history_link], api_visibility="private",
                        queue=False)

    app.load(on_page_load, inputs=None, outputs=[page.report.history_link, page.styles.samples],
             api_visibility="private", queue=False)


def _wire_memory_panel(app: gr.Blocks, memory: MemoryPanel, generate_event: Any, ctx: AppContext) -> None:
    """Free, Unload and Refresh act on the worker thread; the panel redraws after each run."""

    def render_memory(note: str = "") -> tuple[str, Any]:
        snapshot = ctx.status()
        names = resident_memory.resident_names(snapshot)
        panel = resident_memory.panel_html(snapshot, ctx.worker().last_report)
        if note:
            panel = f'<p class="fr-mem-note">{html.escape(note)}</p>' + panel
        return panel, gr.update(choices=[(_short_model_label(n), n) for n in names],
                                value=names[0] if names else None)

    async def on_free() -> tuple[str, Any]:
        freed = await asyncio.wrap_future(ctx.worker().call(ctx.free_memory))
        return render_memory(f"Freed {freed.get('freed_bytes', 0) / 2**20:.1f} MB "
                             f"({len(freed.get('unloaded', []))} model(s))")

    async def on_unload(name: str | None) -> tuple[str, Any]:
        if not name:
            return render_memory("Choose a resident model to unload")
        try:
            await asyncio.wrap_future(ctx.worker().call(lambda: ctx.unload_model(name)))
        except ValueError as error:
            return render_memory(str(error))
        return render_memory(f"Unloaded {name}")

    memory_outputs = memory.outputs()
    memory.free.click(on_free, outputs=memory_outputs, api_visibility="private", concurrency_limit=None)
    memory.unload.click(on_unload, inputs=[memory.unload_choice], outputs=memory_outputs,
                        api_visibility="private", concurrency_limit=None)
    memory.refresh.click(lambda: render_memory(), outputs=memory_outputs, api_visibility="private")
    generate_event.then(lambda: render_memory(), outputs=memory_outputs, api_visibility="private")
    app.load(lambda: render_memory(), outputs=memory_outputs, api_visibility="private")


def _api_endpoints(ctx: AppContext) -> None:
    """``/generate``, ``/model_status`` and ``/free_memory``: API-only events on hidden components."""
    api_request = gr.JSON(visible=False, label="request")
    api_gallery = gr.File(file_count="multiple", visible=False, label="gallery")
    api_report = gr.JSON(visible=False, label="report")
    api_status = gr.JSON(visible=False, label="model_status")
    api_freed = gr.JSON(visible=False, label="freed")

    async def generate(request: dict, caller: gr.Request) -> tuple[list[str], dict]:
        """Run one request (DESIGN.md §4) and wait for it: returns (image files, report).

        The task belongs to the caller (its login, else its address); if the call is
        cancelled or the client goes away (its result stream dropped, or never opened),
        the task is stopped (a queued one never runs)."""
        if not isinstance(request, dict):
            return [], {"error": "the request must be one JSON object"}
        session, since = getattr(caller, "session_hash", None), time.monotonic()
        task = ctx.worker().submit(request, owner=api_owner(caller_client(caller)))
        try:
            result = await task_result(task, lambda: ctx.guard.client_gone(session, since), ctx.worker().stop)
        except asyncio.CancelledError:
            ctx.worker().stop(task)
            raise
        return list(result.images), result.report

    def model_status_api() -> dict:
        """The registry as the worker last published it, plus the last request's summary."""
        snapshot = ctx.status()
        snapshot["last_request"] = resident_memory.summary_line(ctx.worker().last_report)
        return snapshot

    async def free_memory_api() -> dict:
        """Unload every model no request is using; waits for a running request."""
        freed = await asyncio.wrap_future(ctx.worker().call(ctx.free_memory))
        return {**freed, "status": ctx.status()}

    # No triggers: API-only events. The worker serialises the work, so the
    # endpoints themselves may take any number of concurrent callers.
    gr.on([], generate, inputs=[api_request], outputs=[api_gallery, api_report],
          api_name="generate", concurrency_limit=None, show_progress="hidden")
    gr.on([], model_status_api, inputs=None, outputs=[api_status], api_name="model_status",
          concurrency_limit=None, show_progress="hidden")
    gr.on([], free_memory_api, inputs=None, outputs=[api_freed], api_name="free_memory",
          concurrency_limit=None, show_progress="hidden")


def build_app(worker: Worker | None = None, cfg: config_module.Config | None = None,
              demo_warning: Callable[[], str | None] = _demo_warning,
              model_status: Callable[[], dict] | None = None,
              free_memory: Callable[[], dict] = resident_memory.free_memory,
              unload_model: Callable[[str], dict] = resident_memory.unload_model,
              reconnect_grace_s: float = RECONNECT_GRACE_S) -> gr.Blocks:
    """The Blocks app: the page plus ``/generate``, ``/model_status`` and ``/free_memory``.

    ``worker`` and ``cfg`` default to the process's own. ``model_status`` overrides
    the worker's published snapshot (tests); ``free_memory``/``unload_model`` run on
    the worker thread.
    """
    cfg = cfg or config_module.get_config()

    def the_worker() -> Worker:
        return worker or get_worker()

    def status() -> dict:
        return model_status() if model_status is not None else the_worker().status_snapshot()

    guard = route_guard.RouteGuard(cfg.path_outputs, cfg.temp_root, cfg.shared_history_log)
    ctx = AppContext(cfg, the_worker, status, demo_warning, free_memory, unload_model,
                     Followers(the_worker, reconnect_grace_s), guard)

    with gr.Blocks(title="Fooocus-Resident", analytics_enabled=False, delete_cache=CACHE_CLEANUP) as app:
        page = _page(cfg, demo_warning())
        generate_event = _wire_generation(app, page, ctx)
        _wire_prompt_panel(page)
        _wire_input_image_panel(page.input_image, page.advanced.debug, cfg)
        _wire_settings_tab(page)
        _wire_models_tab(page.models, page.advanced, page.settings.preset, cfg)
        _wire_styles_tab(page.styles, cfg)
        _wire_presets_and_parameters(app, page, cfg, guard, generate_event)
        _wire_memory_panel(app, page.memory, generate_event, ctx)
        _api_endpoints(ctx)

    # Gradio's own queue is no longer than the worker's (--queue-size or max_queue_length).
    queue_length = getattr(the_worker(), "max_pending", None) or cfg.max_queue_length
    app.queue(default_concurrency_limit=None, max_size=queue_length)
    app.route_guard = guard  # type: ignore[attr-defined]   # installed by launch_options
    app.queue_length = queue_length  # type: ignore[attr-defined]   # sizes Gradio's slots in launch_options
    return app
