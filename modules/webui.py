"""The Gradio page and the two API endpoints.

Both the page's Generate button and the ``/generate`` endpoint build one
request dict (DESIGN.md §4) and hand it to the single worker
(``modules.async_worker``), so UI and API requests share one FIFO queue and
one set of resident models.

API (callable with ``gradio_client``):

* ``/generate``: one JSON object in (a hidden ``gr.JSON``), ``[gallery, report]``
  out. ``gallery`` is a hidden ``gr.File(file_count="multiple")``: the client
  downloads the PNGs and gets a list of local file paths; ``report`` is a dict.
* ``/model_status``: no input, the model registry as a dict.

The page's own events (Generate, Stop, Skip, Refresh) are private: not listed
in the API and not callable by clients.
"""

from __future__ import annotations

import html
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import gradio as gr

from modules import config as config_module
from modules import flags
from modules.async_worker import AsyncTask, TaskProgress, Worker, get_worker

log = logging.getLogger(__name__)

LORA_SLOTS = 5
LORA_WEIGHT_RANGE = (-2.0, 2.0)
MAX_IMAGE_NUMBER = 32
PROGRESS_POLL_S = 0.5  # the page refreshes at least this often while a task runs


def supported_samplers() -> list[str]:
    """Fooocus's sampler names that the sampling code implements, in Fooocus's order."""
    from modules.core import SAMPLERS
    return [name for name in flags.SAMPLER_NAMES if name in SAMPLERS]


def supported_schedulers() -> list[str]:
    from modules.core import SCHEDULERS
    return [name for name in flags.SCHEDULER_NAMES if name in SCHEDULERS]


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
        }
        if self.base_model:
            request["base_model"] = self.base_model
        return request


# -- pipeline access (late imports: the pipeline pulls in torch and diffusers) -------------

def _model_status() -> dict:
    from modules import default_pipeline
    return default_pipeline.model_status()


def _demo_warning() -> str | None:
    from modules import default_pipeline
    return default_pipeline.demo_model_in_use()


def _banner_text(warning: str | None) -> str:
    return f"### ⚠ Demo model\n{warning}" if warning else ""


def allowed_paths(cfg: config_module.Config) -> list[str]:
    """Folders the server may serve files from (images written there, and the temp
    folder used without the image log or when the output folder cannot be written)."""
    return [str(cfg.path_outputs), str(cfg.temp_root)]


def progress_html(progress: TaskProgress) -> str:
    percent = max(0.0, min(100.0, progress.percent))
    return (f'<div class="fr-progress"><progress value="{percent:.1f}" max="100" style="width:100%"></progress>'
            f"<div>{percent:.0f}% — {html.escape(progress.text)}</div></div>")


def follow_task(task: AsyncTask, worker: Worker,
                demo_warning: Callable[[], str | None]) -> Iterator[tuple[Any, ...]]:
    """The page's Generate handler after submit: yields (progress, gallery, report, banner)
    updates while the task runs, then its images and report.

    If the page goes away (Gradio closes the generator) the task is stopped.
    """
    snap = task.progress
    try:
        yield progress_html(snap), gr.skip(), gr.skip(), gr.skip()
        while not task.done():
            newer = task.wait_for_update(snap.version, PROGRESS_POLL_S)
            if newer.version != snap.version:
                snap = newer
                yield progress_html(snap), gr.skip(), gr.skip(), gr.skip()
    finally:
        if not task.done():  # nobody is left to receive the result
            worker.stop(task)
    result = task.result()
    text = demo_warning()
    yield (progress_html(task.progress), list(result.images), result.report,
           gr.update(value=_banner_text(text), visible=bool(text)))


# -- the page ------------------------------------------------------------------------------

@dataclass
class LoraSlot:
    enabled: gr.Checkbox
    name: gr.Dropdown
    weight: gr.Slider


@dataclass
class Controls:
    """The page's input components, in one place."""

    prompt: gr.Textbox
    negative_prompt: gr.Textbox
    performance: gr.Radio
    aspect_ratio: gr.Dropdown
    image_number: gr.Slider
    seed: gr.Number
    base_model: gr.Dropdown
    refiner_model: gr.Dropdown
    refiner_switch: gr.Slider
    loras: list[LoraSlot] = field(default_factory=list)
    sampler: gr.Dropdown | None = None
    scheduler: gr.Dropdown | None = None
    guidance_scale: gr.Slider | None = None
    vae: gr.Dropdown | None = None

    def components(self) -> set[gr.components.Component]:
        out: set[gr.components.Component] = {
            self.prompt, self.negative_prompt, self.performance, self.aspect_ratio, self.image_number,
            self.seed, self.base_model, self.refiner_model, self.refiner_switch,
        }
        for slot in self.loras:
            out |= {slot.enabled, slot.name, slot.weight}
        for extra in (self.sampler, self.scheduler, self.guidance_scale, self.vae):
            assert extra is not None
            out.add(extra)
        return out

    def values(self, data: Mapping[Any, Any]) -> UIValues:
        """Read a Gradio ``{component: value}`` mapping (set-style inputs)."""
        assert self.sampler is not None and self.scheduler is not None and self.guidance_scale is not None
        seed = data[self.seed]
        return UIValues(
            prompt=data[self.prompt],
            negative_prompt=data[self.negative_prompt],
            performance=data[self.performance],
            aspect_ratio=data[self.aspect_ratio],
            image_number=int(data[self.image_number]),
            seed=-1 if seed is None else int(seed),
            base_model=data[self.base_model],
            refiner_model=data[self.refiner_model],
            refiner_switch=float(data[self.refiner_switch]),
            loras=tuple(LoraValue(bool(data[s.enabled]), data[s.name] or flags.NONE_NAME, float(data[s.weight]))
                        for s in self.loras),
            sampler=data[self.sampler],
            scheduler=data[self.scheduler],
            guidance_scale=float(data[self.guidance_scale]),
            vae=data[self.vae] if self.vae is not None else flags.DEFAULT_VAE,
        )


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


def build_app(worker: Worker | None = None, cfg: config_module.Config | None = None,
              demo_warning: Callable[[], str | None] = _demo_warning,
              model_status: Callable[[], dict] = _model_status) -> gr.Blocks:
    """The Blocks app: the page plus the ``/generate`` and ``/model_status`` endpoints.

    ``worker``, ``cfg`` and the two pipeline hooks default to the process's own.
    """
    cfg = cfg or config_module.get_config()

    def the_worker() -> Worker:
        return worker or get_worker()

    checkpoints = _checkpoint_choices(cfg)
    lora_files = _lora_choices(cfg)
    aspect_ratios = list(flags.SDXL_ASPECT_RATIOS)
    if cfg.default_aspect_ratio not in aspect_ratios:
        aspect_ratios.insert(0, cfg.default_aspect_ratio)
    warning = demo_warning()

    with gr.Blocks(title="Fooocus-Resident", analytics_enabled=False) as app:
        banner = gr.Markdown(_banner_text(warning), visible=bool(warning), elem_id="demo-banner")
        with gr.Row():
            with gr.Column(scale=2):
                prompt = gr.Textbox(label="Prompt", value=cfg.default_prompt, lines=3)
                negative = gr.Textbox(label="Negative prompt", value=cfg.default_prompt_negative, lines=2)
                with gr.Row():
                    generate_btn = gr.Button("Generate", variant="primary")
                    stop_btn = gr.Button("Stop", variant="stop")
                    skip_btn = gr.Button("Skip")
                progress = gr.HTML(progress_html(TaskProgress(text="Idle")))
                gallery = gr.Gallery(label="Images", columns=2, format="png")
                report = gr.JSON(label="Report")
            with gr.Column(scale=1):
                performance = gr.Radio(flags.Performance.values(), value=cfg.default_performance.value,
                                       label="Performance")
                aspect_ratio = gr.Dropdown(aspect_ratios, value=cfg.default_aspect_ratio, label="Aspect ratio")
                image_number = gr.Slider(1, MAX_IMAGE_NUMBER, value=cfg.default_image_number, step=1,
                                         label="Image number")
                seed = gr.Number(value=-1, precision=0, label="Seed (-1: random)")
                base_model = gr.Dropdown(checkpoints, value=_default_base_model(cfg, checkpoints),
                                         label="Base model", allow_custom_value=True)
                refiner_choices = [flags.NONE_NAME] + checkpoints
                refiner_model = gr.Dropdown(
                    refiner_choices,
                    value=cfg.default_refiner if cfg.default_refiner in refiner_choices else flags.NONE_NAME,
                    label="Refiner", allow_custom_value=True)
                refiner_switch = gr.Slider(0.1, 1.0, value=cfg.default_refiner_switch, step=0.01,
                                           label="Refiner switch at")
                slots: list[LoraSlot] = []
                defaults = list(cfg.default_loras)
                with gr.Accordion("LoRAs", open=True):
                    for i in range(LORA_SLOTS):
                        d = defaults[i] if i < len(defaults) else None
                        with gr.Row():
                            slots.append(LoraSlot(
                                enabled=gr.Checkbox(value=d.enabled if d else True, label=f"LoRA {i + 1}",
                                                    scale=1, min_width=110),
                                name=gr.Dropdown(lora_files, value=d.name if d else flags.NONE_NAME,
                                                 label="File", scale=3, allow_custom_value=True),
                                weight=gr.Slider(*LORA_WEIGHT_RANGE, value=d.weight if d else 1.0, step=0.01,
                                                 label="Weight", scale=3),
                            ))
                refresh_btn = gr.Button("Refresh model files", size="sm")
                with gr.Accordion("Advanced", open=False):
                    sampler = gr.Dropdown(supported_samplers(), value=cfg.default_sampler, label="Sampler")
                    scheduler = gr.Dropdown(supported_schedulers(), value=cfg.default_scheduler,
                                            label="Scheduler")
                    guidance = gr.Slider(1.0, 30.0, value=cfg.default_cfg_scale, step=0.01,
                                         label="Guidance scale")
                    vae = gr.Dropdown(_vae_choices(cfg), value=cfg.default_vae, label="VAE",
                                      allow_custom_value=True)

        controls = Controls(prompt=prompt, negative_prompt=negative, performance=performance,
                            aspect_ratio=aspect_ratio, image_number=image_number, seed=seed,
                            base_model=base_model, refiner_model=refiner_model, refiner_switch=refiner_switch,
                            loras=slots, sampler=sampler, scheduler=scheduler, guidance_scale=guidance,
                            vae=vae)

        # -- page events (private) ----------------------------------------------------------

        def on_generate(data: dict) -> Iterator[tuple[Any, ...]]:
            try:
                request = controls.values(data).to_request()
            except (ValueError, TypeError) as error:
                yield (progress_html(TaskProgress(percent=0, text=f"Error: {error}")), gr.skip(),
                       {"error": str(error)}, gr.skip())
                return
            yield from follow_task(the_worker().submit(request), the_worker(), demo_warning)

        generate_btn.click(on_generate, inputs=controls.components(),
                           outputs=[progress, gallery, report, banner],
                           api_visibility="private", concurrency_limit=None, show_progress="minimal")
        def on_stop() -> None:
            the_worker().stop_current()

        def on_skip() -> None:
            the_worker().skip_current()

        stop_btn.click(on_stop, inputs=None, outputs=None, api_visibility="private", queue=False)
        skip_btn.click(on_skip, inputs=None, outputs=None, api_visibility="private", queue=False)

        def on_refresh() -> tuple[Any, ...]:
            fresh = config_module.list_model_files(cfg.path_checkpoints)
            loras = _lora_choices(cfg)
            return (gr.update(choices=fresh), gr.update(choices=[flags.NONE_NAME] + fresh),
                    gr.update(choices=_vae_choices(cfg)), *[gr.update(choices=loras) for _ in slots])

        refresh_btn.click(on_refresh, inputs=None,
                          outputs=[base_model, refiner_model, vae, *[s.name for s in slots]],
                          api_visibility="private", queue=False)

        # -- API ------------------------------------------------------------------------------

        api_request = gr.JSON(visible=False, label="request")
        api_gallery = gr.File(file_count="multiple", visible=False, label="gallery")
        api_report = gr.JSON(visible=False, label="report")
        api_status = gr.JSON(visible=False, label="model_status")

        def generate(request: dict) -> tuple[list[str], dict]:
            """Run one request (DESIGN.md §4) and wait for it: returns (image files, report)."""
            if not isinstance(request, dict):
                return [], {"error": "the request must be one JSON object"}
            result = the_worker().submit(request).result()
            return list(result.images), result.report

        # No triggers: an API-only event. The worker serialises the work, so the
        # endpoint itself may take any number of concurrent callers into its queue.
        gr.on([], generate, inputs=[api_request], outputs=[api_gallery, api_report],
              api_name="generate", concurrency_limit=None, show_progress="hidden")
        gr.on([], model_status, inputs=None, outputs=[api_status], api_name="model_status",
              concurrency_limit=None, show_progress="hidden")

    app.queue(default_concurrency_limit=None)
    return app
