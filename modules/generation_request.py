"""A generation request as the API and the page send it: parsed, checked and resolved.

Torch-free. Every check names the field (or the config key) it concerns, so a bad
request fails with a message a client can act on, before anything is loaded.
Model names are resolved in the model folders here, so the Ray ingress routes on
exactly the files the pipeline will load.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from modules import config as config_module
from modules import flags
from modules.task_types import RequestError

DEMO_CHECKPOINT_NAME = "fooocus_resident_demo_random.safetensors"
MAX_SIDE = 4096
MAX_IMAGES = 32
MAX_STEPS = 200
MAX_SEED = 2 ** 63 - 1


@dataclass
class GenerationRequest:
    prompt: str
    negative_prompt: str = ""
    performance: flags.Performance = flags.Performance.SPEED
    width: int = 1152
    height: int = 896
    image_number: int = 1
    seed: int = -1
    base_model: str = ""
    refiner_model: str = ""
    refiner_switch: float = 0.8
    vae: str = flags.DEFAULT_VAE
    loras: list[tuple[str, float]] = field(default_factory=list)
    guidance_scale: float = 4.0
    sampler: str = flags.DEFAULT_SAMPLER
    scheduler: str = flags.DEFAULT_SCHEDULER
    steps: int | None = None
    output_format: str = "png"
    styles: list[str] = field(default_factory=list)
    sharpness: float = 2.0
    adm_scaler_positive: float = 1.5
    adm_scaler_negative: float = 0.8
    adm_scaler_end: float = 0.3
    # Upstream's metadata and prompt options (Developer Debug Mode there).
    metadata_scheme: str = "fooocus"
    save_metadata_to_images: bool = True
    read_wildcards_in_order: bool = False
    # Upstream's Developer Debug Mode sampling controls (README "Request fields" says what each does;
    # modules/debug_page.py puts them on the page).
    adaptive_cfg: float = 7.0
    clip_skip: int = 2
    overwrite_step: int = -1
    overwrite_switch: int = -1
    overwrite_width: int = -1
    overwrite_height: int = -1
    disable_seed_increment: bool = False
    refiner_swap_method: str = "joint"
    freeu: tuple[float, float, float, float] | None = None   # (b1, b2, s1, s2) when freeu_enabled
    disable_preview: bool = False
    disable_intermediate_results: bool = False
    black_out_nsfw: bool = False
    generate_image_grid: bool = False   # the batch's images also as one grid image (temp folder, no metadata)

    def switch_step(self, steps: int) -> int:
        """The step the refiner takes over at: overwrite_switch (a step, as upstream's), else
        refiner_switch of `steps`."""
        return self.overwrite_switch if self.overwrite_switch > 0 else round(steps * self.refiner_switch)

    def refines(self, steps: int) -> bool:
        """Whether a refiner (when one is chosen) takes any of the `steps`."""
        return self.overwrite_switch < steps if self.overwrite_switch > 0 else self.refiner_switch < 1.0

    def image_seed(self, seed: int, index: int) -> int:
        """Image `index`'s seed: seed + index, or the same seed for all (disable_seed_increment)."""
        return seed if self.disable_seed_increment else seed + index

    @staticmethod
    def from_dict(data: dict, cfg: config_module.Config) -> "GenerationRequest":
        if not isinstance(data, dict):
            raise RequestError("the request must be one JSON object")
        if not isinstance(data.get("prompt"), str):
            raise RequestError("field 'prompt' (a string) is required")
        width, height = cfg.default_size
        if "aspect_ratio" in data:
            try:
                width, height = flags.parse_aspect_ratio(_text(data, "aspect_ratio", ""))
            except ValueError as error:
                raise RequestError(f"field 'aspect_ratio': {error}") from None
        try:
            performance = flags.parse_performance(data.get("performance", cfg.default_performance))
        except ValueError as error:
            raise RequestError(f"field 'performance': {error}") from None
        request = GenerationRequest(
            prompt=_prompt_text(data, "prompt", "", cfg),
            negative_prompt=_prompt_text(data, "negative_prompt", cfg.default_prompt_negative, cfg),
            performance=performance,
            width=_int(data, "width", width, 64, MAX_SIDE),
            height=_int(data, "height", height, 64, MAX_SIDE),
            image_number=_int(data, "image_number", 1, 1, MAX_IMAGES),
            seed=_int(data, "seed", -1, -1, MAX_SEED),
            base_model=_text(data, "base_model", cfg.default_model),
            refiner_model=_text(data, "refiner_model", cfg.default_refiner),
            refiner_switch=_float(data, "refiner_switch", cfg.default_refiner_switch, 0.0, 1.0),
            vae=_text(data, "vae", cfg.default_vae),
            loras=_loras(data.get("loras", [[s.name, s.weight] for s in cfg.default_loras if s.enabled]), cfg),
            guidance_scale=_float(data, "guidance_scale", cfg.default_cfg_scale, 0.0, 30.0),
            sampler=_text(data, "sampler", cfg.default_sampler),
            scheduler=_text(data, "scheduler", cfg.default_scheduler),
            steps=_steps(data, cfg),
            output_format=_one_of(data, "output_format", cfg.default_output_format, flags.OUTPUT_FORMATS),
            styles=_names(data, "styles", list(cfg.default_styles)),
            sharpness=_float(data, "sharpness", cfg.default_sample_sharpness, 0.0, 30.0),
            adm_scaler_positive=_float(data, "adm_scaler_positive", 1.5, 0.1, 3.0),
            adm_scaler_negative=_float(data, "adm_scaler_negative", 0.8, 0.1, 3.0),
            adm_scaler_end=_float(data, "adm_scaler_end", 0.3, 0.0, 1.0),
            metadata_scheme=_one_of(data, "metadata_scheme", cfg.default_metadata_scheme, flags.METADATA_SCHEMES),
            save_metadata_to_images=_bool(data, "save_metadata_to_images", cfg.default_save_metadata_to_images),
            read_wildcards_in_order=_bool(data, "read_wildcards_in_order", False),
            **_debug_controls(data, cfg),
        )
        _apply_overwrites(request)
        for side in ("width", "height"):
            if getattr(request, side) % 8:
                raise RequestError(f"field '{side}' must be a multiple of 8, got {getattr(request, side)}")
        return request


REFINER_SWAP_METHODS = ("joint", "separate", "vae")
FREEU_DEFAULTS = {"freeu_b1": 1.01, "freeu_b2": 1.02, "freeu_s1": 0.99, "freeu_s2": 0.95}
# Upstream's FreeU sliders: the backbone factors 0..2, the skip factors 0..4.
FREEU_MAXIMA = {"freeu_b1": 2.0, "freeu_b2": 2.0, "freeu_s1": 4.0, "freeu_s2": 4.0}


def _overwrite(data: dict, key: str, low: int, high: int, default: int = -1) -> int:
    """-1 (not forced) or a value in [low, high]; `default` when the field is absent."""
    value = data.get(key, default)
    if value == -1 and is_finite_number(value):
        return -1
    return _int(data, key, default, low, high)


def _debug_controls(data: dict, cfg: config_module.Config) -> dict[str, Any]:
    """Upstream's Developer Debug Mode sampling fields, with upstream's ranges; absent ones
    take config.txt's (or the preset's) default_cfg_tsnr, default_clip_skip and
    default_overwrite_switch, upstream's defaults otherwise."""
    if _bool(data, "black_out_nsfw", False):
        raise RequestError("field 'black_out_nsfw': blacking out NSFW images needs a safety-checker model, "
                           "which this server does not ship; send false")
    freeu = tuple(_float(data, key, default, 0.0, FREEU_MAXIMA[key]) for key, default in FREEU_DEFAULTS.items())
    return dict(adaptive_cfg=_float(data, "adaptive_cfg", cfg.default_cfg_tsnr, 1.0, 30.0),
                clip_skip=_int(data, "clip_skip", cfg.default_clip_skip, 1, 12),
                overwrite_step=_overwrite(data, "overwrite_step", 1, MAX_STEPS),
                overwrite_switch=_overwrite(data, "overwrite_switch", 1, MAX_STEPS, cfg.default_overwrite_switch),
                overwrite_width=_overwrite(data, "overwrite_width", 64, MAX_SIDE),
                overwrite_height=_overwrite(data, "overwrite_height", 64, MAX_SIDE),
                disable_seed_increment=_bool(data, "disable_seed_increment", False),
                refiner_swap_method=_one_of(data, "refiner_swap_method", "joint", REFINER_SWAP_METHODS),
                freeu=freeu if _bool(data, "freeu_enabled", False) else None,
                disable_preview=_bool(data, "disable_preview", False),
                disable_intermediate_results=_bool(data, "disable_intermediate_results", False),
                generate_image_grid=_bool(data, "generate_image_grid", False))


def _apply_overwrites(request: GenerationRequest) -> None:
    """Forced steps and size win over `steps`, `width`, `height` and the aspect ratio (as
    upstream's overwrite_* do); the size errors then name the overwrite field."""
    if request.overwrite_step > 0:
        request.steps = request.overwrite_step
    for side in ("width", "height"):
        forced = getattr(request, f"overwrite_{side}")
        if forced > 0:
            if forced % 8:
                raise RequestError(f"field 'overwrite_{side}' must be a multiple of 8, got {forced}")
            setattr(request, side, forced)


def _text(data: dict, key: str, default: str) -> str:
    value = data.get(key, default)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise RequestError(f"field '{key}' must be a string, got {value!r}")
    return _valid_text(key, value)


def _valid_text(key: str, value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as error:   # a lone surrogate ("\ud800") from a JSON escape
        raise RequestError(f"field '{key}' is not valid text: {error.reason} at character {error.start}") from None
    return value


# A CLIP token is rarely over a dozen characters: a text this many times longer than the
# token limit is refused before spending time on tokenizing it.
CHARS_PER_TOKEN_BOUND = 32


def _prompt_text(data: dict, key: str, default: str, cfg: config_module.Config) -> str:
    value = _text(data, key, default)
    if len(value) > cfg.max_prompt_tokens * CHARS_PER_TOKEN_BOUND:
        raise RequestError(f"field '{key}' is too long ({len(value)} characters; at most "
                           f"{cfg.max_prompt_tokens} tokens, config key max_prompt_tokens)")
    return value


def check_prompt_tokens(key: str, text: str, tokenizers: tuple, cfg: config_module.Config) -> None:
    """Token limit (max_prompt_tokens): each 75 tokens is one more window the text
    encoders and every UNet step attend over."""
    tokenizer = next(t for t in tokenizers if t is not None)
    count = len(tokenizer(text, add_special_tokens=False, truncation=False).input_ids)
    if count > cfg.max_prompt_tokens:
        raise RequestError(f"field '{key}' has {count} tokens; at most {cfg.max_prompt_tokens} "
                           f"(config key max_prompt_tokens)")


def is_finite_number(value: Any) -> bool:
    """A JSON number that is not NaN or infinite. JSON integers have no size limit
    (`10**400`): they are compared as integers, never converted to a float that overflows."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    return isinstance(value, int) or math.isfinite(value)


def shown_number(value: Any) -> str:
    """A number for an error message: a huge integer is not spelled out in 400 digits."""
    text = repr(value)
    return text if len(text) <= 24 else f"{text[:8]}...({len(text)} digits)"


def _int(data: dict, key: str, default: int, low: int, high: int) -> int:
    value = data.get(key, default)
    if not is_finite_number(value) or int(value) != value:
        raise RequestError(f"field '{key}' must be an integer, got {shown_number(value)}")
    if not low <= value <= high:
        raise RequestError(f"field '{key}' must be between {low} and {high}, got {shown_number(value)}")
    return int(value)


def _float(data: dict, key: str, default: float, low: float, high: float) -> float:
    value = data.get(key, default)
    if not is_finite_number(value):
        raise RequestError(f"field '{key}' must be a finite number, got {shown_number(value)}")
    if not low <= value <= high:
        raise RequestError(f"field '{key}' must be between {low} and {high}, got {shown_number(value)}")
    return float(value)


def _bool(data: dict, key: str, default: bool) -> bool:
    value = data.get(key, default)
    if not isinstance(value, bool):
        raise RequestError(f"field '{key}' must be true or false, got {value!r}")
    return value


def _steps(data: dict, cfg: config_module.Config) -> int | None:
    """The request's steps (-1: the performance mode's); without them, config/preset
    default_overwrite_step (-1 there too: the mode's)."""
    if data.get("steps") is None:
        return cfg.default_overwrite_step if cfg.default_overwrite_step > 0 else None
    if data["steps"] == -1:
        return None
    return _int(data, "steps", 0, 1, MAX_STEPS)


def check_cost(width: int, height: int, steps: int, images: int, cfg: config_module.Config,
               size_from: str = "fields 'width' and 'height'") -> None:
    """The cost cap (config key max_megapixel_steps): pixels x steps x images is what a
    request costs the one worker every other client waits behind; `size_from` says which
    fields set the working size (an input image sets it for vary, upscale and inpaint)."""
    cost = width * height * steps * images / 1e6
    if cost > cfg.max_megapixel_steps:
        raise RequestError(f"the request costs {width}x{height} pixels x {steps} steps x {images} image(s) = "
                           f"{cost:.0f} megapixel-steps; at most {cfg.max_megapixel_steps:g} (config key "
                           f"max_megapixel_steps): lower {size_from}, field 'steps' or field 'image_number'")


def _names(data: dict, key: str, default: list[str]) -> list[str]:
    value = data.get(key, default)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RequestError(f"field '{key}' must be a list of names, got {value!r}")
    return list(value)


def _one_of(data: dict, key: str, default: str, allowed: tuple[str, ...]) -> str:
    value = _text(data, key, default)
    if value not in allowed:
        raise RequestError(f"field '{key}' must be one of {', '.join(allowed)}, got {value!r}")
    return value


def check_lora_weight(weight: float | int, where: str, cfg: config_module.Config) -> float:
    """LoRA weights are finite and within +-max_lora_weight (NaN, inf or 1e308 give
    black or noise images, or overflow in the merge)."""
    limit = cfg.max_lora_weight
    if not is_finite_number(weight) or abs(weight) > limit:
        raise RequestError(f"{where}: weight must be a finite number between {-limit:g} and {limit:g} "
                           f"(config key max_lora_weight), got {shown_number(weight)}")
    return float(weight)


def _loras(value: Any, cfg: config_module.Config) -> list[tuple[str, float]]:
    if not isinstance(value, list):
        raise RequestError("field 'loras' must be a list of [file name, weight]")
    if len(value) > cfg.max_loras_per_request:
        raise RequestError(f"field 'loras' has {len(value)} entries; at most {cfg.max_loras_per_request} "
                           f"(config key max_loras_per_request)")
    loras = []
    for index, item in enumerate(value):
        if (not isinstance(item, (list, tuple)) or len(item) != 2 or not isinstance(item[0], str)
                or isinstance(item[1], bool) or not isinstance(item[1], (int, float))):
            raise RequestError(f"field 'loras': each LoRA must be [file name, weight], got {item!r}")
        _valid_text("loras", item[0])
        weight = check_lora_weight(item[1], f"field 'loras' item {index} ({item[0]})", cfg)
        if item[0] not in ("", flags.NONE_NAME) and weight != 0:
            loras.append((item[0], weight))
    return loras


_LORA_TAG = re.compile(r"<lora:([^:>]+):([^>]*)>")


def split_lora_tags(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """Fooocus prompt tags `<lora:name:weight>` -> (prompt without tags, loras)."""
    loras = []
    for name, weight in _LORA_TAG.findall(prompt):
        if not name.endswith(".safetensors"):
            name += ".safetensors"
        try:
            value = float(weight)
        except ValueError:
            raise RequestError(f"field 'prompt': tag <lora:{name}:{weight}> has no number as weight") from None
        loras.append((name, value))
    return _LORA_TAG.sub("", prompt).strip(), loras


def check_request(data: Any, cfg: config_module.Config, samplers: Collection[str] = flags.SAMPLER_NAMES,
                  schedulers: Collection[str] = flags.SCHEDULER_NAMES) -> GenerationRequest:
    """Everything about a request that can be checked before it is queued, so an HTTP API
    answers a bad one at once: its fields, the sampler and scheduler (among `samplers` and
    `schedulers`, what the sampling code implements), styles, the model files it names and
    its input images. The pipeline checks again when it runs (files may change meanwhile)."""
    from modules import image_inputs, sdxl_styles   # numpy, style files: only for early checks

    cfg = preset_config(data, cfg)
    req = GenerationRequest.from_dict(data, cfg)
    imposed = flags.performance_settings(req.performance)
    for key, value, imposed_value, known in (("sampler", req.sampler, imposed.sampler, samplers),
                                             ("scheduler", req.scheduler, imposed.scheduler, schedulers)):
        if imposed_value is None and value not in known:
            raise RequestError(f"field '{key}': unknown {key} {value!r}; available: {', '.join(known)}")
    _, tag_loras = split_lora_tags(req.prompt)
    sdxl_styles.check_names(req.styles, sdxl_styles.get_library(cfg.path_styles))
    resolve_checkpoint(req.base_model, cfg)
    if req.refiner_model not in ("", flags.NONE_NAME):
        _resolve(req.refiner_model, cfg.path_checkpoints, "refiner_model", "checkpoints", "path_checkpoints")
    if req.vae not in ("", flags.DEFAULT_VAE, flags.NONE_NAME):
        _resolve(req.vae, cfg.path_vae, "vae", "VAE", "path_vae")
    for name, _ in req.loras + tag_loras:
        resolve_lora(name, cfg)
    image_inputs.parse(data, cfg)
    return req


# -- model files ------------------------------------------------------------------------

def resolve_checkpoint(name: str, cfg: config_module.Config, field: str = "base_model") -> str:
    """The checkpoint file asked for in request `field` (base_model or refiner_model)."""
    if not name:
        files = config_module.list_model_files(cfg.path_checkpoints)
        real = [f for f in files if os.path.basename(f) != DEMO_CHECKPOINT_NAME]
        if not files:
            raise RequestError("no checkpoint in the checkpoints folder (config key path_checkpoints): "
                               "put an SDXL .safetensors file there")
        name = (real or files)[0]
    return _resolve(name, cfg.path_checkpoints, field, "checkpoints", "path_checkpoints")


def resolve_lora(name: str, cfg: config_module.Config) -> str:
    return _resolve(name, cfg.path_loras, "loras", "LoRA", "path_loras")


def _resolve(name: str, folders, field: str, kind: str, key: str) -> str:
    """The file's path; the error names the file as asked and the folder by its config
    key (clients never see the server's absolute paths)."""
    try:
        return config_module.resolve_model_file(name, folders)
    except FileNotFoundError:
        raise RequestError(f"field '{field}': model file {name!r} not found in the {kind} folder "
                           f"(config key {key})") from None


def model_name(path: str, folders) -> str:
    """A model file's name as clients use it: relative to the model folder holding it."""
    for folder in folders:
        relative = os.path.relpath(path, folder)
        if not relative.startswith(os.pardir + os.sep) and relative != os.pardir and not os.path.isabs(relative):
            return relative.replace(os.sep, "/")
    return os.path.basename(path)


# An absolute path left in a message once the configured folders are replaced: POSIX
# (two or more components, not part of a URL or a relative name) or Windows (C:\...).
_ABSOLUTE_PATH = re.compile(r"(?<![\w.~:/-])(?:/[^\s/'\"<>:,;()\[\]]+){2,}/?|\b[A-Za-z]:\\[^\s'\"<>]*")


def owned_folders(cfg: config_module.Config) -> list[tuple[str, str]]:
    """(folder, config key) of every folder the server reads or writes, longest first."""
    keys = ("path_checkpoints", "path_loras", "path_vae", "path_embeddings", "path_styles")
    folders = [(str(f), key) for key in keys for f in getattr(cfg, key)]
    folders += [(str(getattr(cfg, key)), key) for key in (
        "path_outputs", "path_inputs", "path_upscale_models", "path_controlnet", "path_clip_vision", "path_inpaint",
        "path_fooocus_expansion")]
    folders += [(str(cfg.temp_root), "temp_path"), (str(config_module.gradio_upload_folder()), "uploads")]
    return sorted(folders, key=lambda item: -len(item[0]))


def scrub_paths(message: str, cfg: config_module.Config) -> str:
    """Errors go to clients: files under a folder the server owns are named relative to it
    and a folder itself by its config key; any other absolute path is cut to its last
    part. Clients never see the server's absolute paths."""
    for folder, key in owned_folders(cfg):
        message = message.replace(folder + os.sep, "").replace(folder, f"<{key}>")
    return _ABSOLUTE_PATH.sub(lambda m: os.path.basename(m.group(0).rstrip("/\\")) or "<path>", message)


def preset_config(request: Any, cfg: config_module.Config) -> config_module.Config:
    """The config a request's defaults come from: `cfg`, or with the request's `preset`
    (presets/NAME.json) laid over config.txt instead of --preset's."""
    name = request.get("preset") if isinstance(request, dict) else None
    if name in (None, ""):
        return cfg
    if not isinstance(name, str):
        raise RequestError(f"field 'preset' must be a preset name, got {name!r}")
    return config_module.with_preset(name)
