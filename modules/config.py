"""Paths and defaults, read the Fooocus way.

Sources, later ones winning:

1. built-in defaults (below);
2. ``config.txt``, a JSON object. Its path comes from the ``config_path``
   environment variable; without it we use ``<repo root>/config.txt`` rather
   than upstream's "current directory", so launching from another folder still
   finds the same file. A missing file means "all defaults" (we never write it);
3. ``presets/<NAME>.json`` under the repo root when ``--preset NAME`` is given
   (modules/presets.py; a request's ``preset`` field uses ``with_preset``);
4. an environment variable with exactly the key's name (``path_checkpoints``,
   ``default_model``...). Its value is JSON-decoded when it parses, otherwise
   taken as the raw string; for text-valued keys the raw string is always used,
   so ``default_prompt=123`` means the text "123".
5. ``--output-path`` overrides ``path_outputs``.

Relative paths, wherever they come from, are resolved against the repo root.
Unknown keys are ignored, so an upstream config.txt loads as is. A value of the
wrong type raises ``ConfigError`` naming the key and where it came from.

The result is a frozen ``Config``; ``get_config()`` caches one for the process
and ``reload_config()`` rebuilds it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modules import flags, presets

log = logging.getLogger("fooocus_resident.config")

REPO_ROOT = Path(__file__).resolve().parent.parent
MODEL_EXTENSIONS: tuple[str, ...] = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


class ConfigError(ValueError):
    """A config value that can't be used; the message names key and source."""


@dataclass(frozen=True)
class LoraSetting:
    """One default LoRA slot."""

    name: str
    weight: float
    enabled: bool = True


@dataclass(frozen=True)
class Config:
    config_path: Path
    path_checkpoints: tuple[Path, ...]
    path_loras: tuple[Path, ...]
    path_embeddings: tuple[Path, ...]
    path_vae: tuple[Path, ...]
    # Style files (upstream's sdxl_styles/*.json format); the first folder holding a name wins.
    path_styles: tuple[Path, ...]
    # The Fooocus V2 prompt-expansion model folder (upstream's layout).
    path_fooocus_expansion: Path
    # Input-image models, in upstream's folders: upscalers (Upscale, Vary), the IP-Adapter
    # and its CLIP vision encoder (Image Prompt), the inpaint patch and head (Inpaint).
    path_upscale_models: Path
    path_controlnet: Path
    path_clip_vision: Path
    path_inpaint: Path
    # Outputs go to one folder; a list in config.txt uses its first entry.
    path_outputs: Path
    # Images an operator puts here may be named by path in a request's image fields.
    path_inputs: Path
    # Empty string: use the first checkpoint found in path_checkpoints.
    default_model: str
    default_refiner: str
    default_refiner_switch: float
    default_vae: str
    default_loras: tuple[LoraSetting, ...]
    default_performance: flags.Performance
    default_sampler: str
    default_scheduler: str
    default_cfg_scale: float
    default_prompt: str
    default_prompt_negative: str
    default_image_number: int
    default_aspect_ratio: str
    default_styles: tuple[str, ...]
    default_sample_sharpness: float
    default_output_format: str = "png"
    # Image metadata (upstream's keys): the scheme written, and whether images carry it at all.
    default_metadata_scheme: str = "fooocus"
    default_save_metadata_to_images: bool = True
    # Steps for every performance mode unless a request sets its own; -1: the mode's.
    default_overwrite_step: int = -1
    # Developer Debug Mode defaults (upstream's keys): the refiner's switch step (-1: from
    # default_refiner_switch), CFG mimicking from TSNR, CLIP skip.
    default_overwrite_switch: int = -1
    default_cfg_tsnr: float = 7.0
    default_clip_skip: int = 2
    # Which of the page's boxes start ticked (upstream's keys): Advanced, Input Image, Developer Debug Mode.
    default_advanced_checkbox: bool = False
    default_image_prompt_checkbox: bool = False
    default_developer_debug_mode_checkbox: bool = False
    default_image_prompt_advanced_checkbox: bool = False
    # The page's other starting values (upstream's keys).
    default_selected_image_input_tab_id: str = "uov_tab"   # uov_tab, ip_tab or inpaint_tab here
    default_uov_method: str = flags.UOV_DISABLED
    default_inpaint_method: str = flags.INPAINT_METHODS[0]
    default_invert_mask_checkbox: bool = False
    default_overwrite_upscale: float = -1.0          # Forced Overwrite of Denoising Strength of "Upscale"
    default_max_image_number: int = 32               # the Image Number slider's end (at most 32)
    default_max_lora_number: int = 5                 # LoRA rows on the page
    default_loras_min_weight: float = -2.0           # the LoRA weight sliders' range
    default_loras_max_weight: float = 2.0
    # The inpaint patch a request gets unless it names one (its field inpaint_engine).
    default_inpaint_engine_version: str = flags.DEFAULT_INPAINT_ENGINE
    default_black_out_nsfw: bool = False   # only false: no safety checker ships
    # Wildcard files (name.txt, one choice per line) for __name__ in prompts.
    path_wildcards: Path = REPO_ROOT / "wildcards"
    # A preset's model files: (file name, URL) pairs, fetched when downloads are allowed,
    # and older default models used instead of a missing default_model (upstream's keys).
    checkpoint_downloads: tuple[tuple[str, str], ...] = ()
    lora_downloads: tuple[tuple[str, str], ...] = ()
    embeddings_downloads: tuple[tuple[str, str], ...] = ()
    vae_downloads: tuple[tuple[str, str], ...] = ()
    previous_default_models: tuple[str, ...] = ()
    # Limits on what one request may ask (issue 9): each error names the field and the key.
    max_prompt_tokens: int = 3000
    max_loras_per_request: int = 32
    max_lora_weight: float = 10.0
    max_queue_length: int = 100   # upstream Fooocus-API's --queue-size default; --queue-size overrides it
    max_queue_per_client: int = 16
    max_job_history: int = 100    # finished HTTP API jobs kept for query-job / job-history
    max_conditioning_cache_mb: float = 512.0
    # pixels x steps x images / 1e6 of one request: upstream's largest (1024x1024, 60 steps,
    # 32 images) is 2013; a 200-step x 32-image request at 1152x896 (6606) is refused.
    max_megapixel_steps: float = 2048.0
    # Under a login the history log (every user's prompts and images) is served to nobody,
    # unless shared on purpose: then to every logged-in user.
    shared_history_log: bool = False
    # The size (sqrt of width x height) Vary, small Upscales and Inpaint work at: upstream's
    # 1024 suits SDXL; smaller models (or quick tests) want less.
    image_input_side: int = 1024
    # The REST APIs' key (X-API-KEY or Authorization: Bearer); --api-key adds more. Empty: none.
    api_key: str = ""
    # From the command line, not config keys: what the pipeline is handed instead of
    # reading args_manager (--disable-image-log, --temp-path, --disable-metadata,
    # --disable-preset-download).
    image_log: bool = True
    temp_path: Path | None = None
    metadata: bool = True
    downloads: bool = True
    always_download_new_model: bool = False
    max_batch: int | None = None      # --max-batch: images in one UNet batch (None: what the budget allows)
    batch_window_ms: float = 0.0      # --batch-window-ms: how long the worker waits for requests to join

    @property
    def temp_root(self) -> Path:
        """Where images go without the image log, or when the output folder cannot be written."""
        return self.temp_path or Path(tempfile.gettempdir()) / "fooocus_resident"

    @property
    def input_folders(self) -> tuple[Path, ...]:
        """The folders the server owns, where an image field may name a file by path:
        path_inputs, the outputs, the temp folder and Gradio's upload folder (whatever
        else the process can read is never an input)."""
        return (self.path_inputs, self.path_outputs, self.temp_root, gradio_upload_folder())

    @property
    def default_size(self) -> tuple[int, int]:
        """(width, height) of default_aspect_ratio."""
        return flags.parse_aspect_ratio(self.default_aspect_ratio)

    def ensure_folders(self) -> None:
        """Create the model and output folders (on demand, e.g. at launch); a path that
        is a file, or cannot be created, is a ConfigError naming its key."""
        folders = [(f, k) for k in ("path_checkpoints", "path_loras", "path_embeddings", "path_vae")
                   for f in getattr(self, k)] + [(self.path_outputs, "path_outputs")] + [
            (getattr(self, k), k) for k in ("path_upscale_models", "path_controlnet", "path_clip_vision",
                                            "path_inpaint")]
        for folder, key in folders:
            try:
                folder.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                what = "is a file, not a folder" if folder.exists() else f"cannot be created ({e.strerror or e})"
                raise ConfigError(f"config key {key!r} ({self.config_path}): {folder} {what}") from None


def gradio_upload_folder() -> Path:
    """Where Gradio keeps uploads and the files it serves (its rule: GRADIO_TEMP_DIR, else
    <system temp>/gradio), without importing Gradio."""
    return Path(os.environ.get("GRADIO_TEMP_DIR") or Path(tempfile.gettempdir()) / "gradio").resolve()


# --- value parsers: (raw value, key, source) -> typed value ------------------------

def _fail(key: str, source: str, value: Any, want: str) -> ConfigError:
    return ConfigError(f"config key {key!r} from {source}: expected {want}, got {value!r}")


def _as_str(value: Any, key: str, source: str) -> str:
    if not isinstance(value, str):
        raise _fail(key, source, value, "a string")
    return value


def _as_float(value: Any, key: str, source: str) -> float:
    # bool is an int subclass; true/false is never a meaningful number here.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(key, source, value, "a number")
    if not math.isfinite(value):   # NaN, Infinity, 1e999 parse as JSON but mean nothing here
        raise _fail(key, source, value, "a finite number")
    return float(value)


def _in_range(low: float, high: float) -> Callable[[Any, str, str], float]:
    """A finite number in [low, high]: the range the request field it defaults takes, so a
    bad default fails at start naming its key, not every request naming the field."""
    def parse(value: Any, key: str, source: str) -> float:
        number = _as_float(value, key, source)
        if not low <= number <= high:
            raise _fail(key, source, value, f"a number between {low:g} and {high:g}")
        return number
    return parse


def _as_positive_float(value: Any, key: str, source: str) -> float:
    number = _as_float(value, key, source)
    if number <= 0:
        raise _fail(key, source, value, "a number > 0")
    return number


def _as_bool(value: Any, key: str, source: str) -> bool:
    if not isinstance(value, bool):
        raise _fail(key, source, value, "true or false")
    return value


def _as_positive_int(value: Any, key: str, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _fail(key, source, value, "an integer >= 1")
    return value


def _as_overwrite_step(value: Any, key: str, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not (value == -1 or 1 <= value <= 200):
        raise _fail(key, source, value, "-1 (not forced) or an integer from 1 to 200")
    return value


# Upstream's Input Image tab ids; Describe, Enhance and Metadata are not built here.
IMAGE_INPUT_TAB_IDS = ("uov_tab", "ip_tab", "inpaint_tab")


def _as_image_number_cap(value: Any, key: str, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 32:
        raise _fail(key, source, value, "an integer from 1 to 32 (a request's most images)")
    return value


def _as_lora_rows(value: Any, key: str, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 32:
        raise _fail(key, source, value, "an integer from 1 to 32")
    return value


def _as_no_nsfw_blackout(value: Any, key: str, source: str) -> bool:
    """Upstream's NSFW blackout needs a safety checker, which is not shipped: refused when
    asked for, rather than serving unchecked images to an operator who expects it."""
    if value is not False:
        raise _fail(key, source, value, "false (blacking out NSFW images needs a safety-checker model, "
                    "which this project does not ship)")
    return value


def _as_clip_skip(value: Any, key: str, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 12:
        raise _fail(key, source, value, "an integer from 1 to 12")
    return value


def _as_downloads(value: Any, key: str, source: str) -> tuple[tuple[str, str], ...]:
    """{file name: URL}: names stay inside their model folder, URLs are http(s)."""
    if not isinstance(value, dict):
        raise _fail(key, source, value, "an object of file name: URL")
    for name, url in value.items():
        parts = Path(name).parts
        if not name or Path(name).is_absolute() or ".." in parts:
            raise _fail(key, source, name, "a file name inside its model folder")
        if not isinstance(url, str) or not url.startswith(("https://", "http://")):
            raise _fail(key, source, url, f"an http(s) URL for {name}")
    return tuple(value.items())


def _as_paths(value: Any, key: str, source: str) -> tuple[Path, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(v, str) and v for v in items):
        raise _fail(key, source, value, "a folder path or a non-empty list of folder paths")
    return tuple(_resolve(v) for v in items)


def _as_first_path(value: Any, key: str, source: str) -> Path:
    return _as_paths(value, key, source)[0]


def _as_performance(value: Any, key: str, source: str) -> flags.Performance:
    try:
        return flags.parse_performance(_as_str(value, key, source))
    except ValueError as e:
        raise ConfigError(f"config key {key!r} from {source}: {e}") from None


def _one_of(names: Sequence[str]) -> Callable[[Any, str, str], str]:
    def parse(value: Any, key: str, source: str) -> str:
        if value not in names:
            raise _fail(key, source, value, "one of " + ", ".join(names))
        return value
    return parse


def _as_aspect_ratio(value: Any, key: str, source: str) -> str:
    try:
        width, height = flags.parse_aspect_ratio(_as_str(value, key, source))
    except ValueError as e:
        raise ConfigError(f"config key {key!r} from {source}: {e}") from None
    return f"{width}*{height}"  # normalised, so UI labels like "1152×896 ∣ 9:7" work too


def _as_names(value: Any, key: str, source: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _fail(key, source, value, "a list of names")
    return tuple(value)


def _as_loras(value: Any, key: str, source: str) -> tuple[LoraSetting, ...]:
    if not isinstance(value, list):
        raise _fail(key, source, value, "a list of [name, weight] or [enabled, name, weight]")
    out: list[LoraSetting] = []
    for item in value:
        if isinstance(item, list) and len(item) == 2:
            enabled, (name, weight) = True, item
        elif isinstance(item, list) and len(item) == 3:
            enabled, name, weight = item
        else:
            raise _fail(key, source, item, "[name, weight] or [enabled, name, weight]")
        if not isinstance(enabled, bool) or not isinstance(name, str):
            raise _fail(key, source, item, "[name, weight] or [enabled, name, weight]")
        weight = _as_float(weight, key, source)
        # Upstream pads its UI slots with "None" entries; they carry no LoRA.
        if name and name != flags.NONE_NAME:
            out.append(LoraSetting(name=name, weight=weight, enabled=enabled))
    return tuple(out)


# key -> (default raw value, parser, takes text: env value used raw).
_KEYS: dict[str, tuple[Any, Callable[[Any, str, str], Any], bool]] = {
    "path_checkpoints": ("models/checkpoints", _as_paths, False),
    "path_loras": ("models/loras", _as_paths, False),
    "path_embeddings": ("models/embeddings", _as_paths, False),
    "path_vae": ("models/vae", _as_paths, False),
    "path_outputs": ("outputs", _as_first_path, False),
    "path_inputs": ("inputs", _as_first_path, False),
    "path_styles": ("sdxl_styles", _as_paths, False),
    "path_fooocus_expansion": ("models/prompt_expansion/fooocus_expansion", _as_first_path, False),
    "path_upscale_models": ("models/upscale_models", _as_first_path, False),
    "path_controlnet": ("models/controlnet", _as_first_path, False),
    "path_clip_vision": ("models/clip_vision", _as_first_path, False),
    "path_inpaint": ("models/inpaint", _as_first_path, False),
    "default_model": ("", _as_str, True),
    "default_refiner": (flags.NONE_NAME, _as_str, True),
    "default_refiner_switch": (0.8, _in_range(0.0, 1.0), False),
    "default_vae": (flags.DEFAULT_VAE, _as_str, True),
    "default_loras": ([], _as_loras, False),
    "default_performance": (flags.Performance.SPEED.value, _as_performance, True),
    "default_sampler": (flags.DEFAULT_SAMPLER, _one_of(flags.SAMPLER_NAMES), True),
    "default_scheduler": (flags.DEFAULT_SCHEDULER, _one_of(flags.SCHEDULER_NAMES), True),
    # 4.0 is what upstream's UI shows (its default preset); its code default is 7.0.
    "default_cfg_scale": (4.0, _in_range(0.0, 30.0), False),
    "default_prompt": ("", _as_str, True),
    "default_prompt_negative": ("", _as_str, True),
    "default_image_number": (2, _as_positive_int, False),
    "default_aspect_ratio": (flags.DEFAULT_ASPECT_RATIO, _as_aspect_ratio, True),
    "default_output_format": ("png", _one_of(flags.OUTPUT_FORMATS), True),
    "default_metadata_scheme": ("fooocus", _one_of(flags.METADATA_SCHEMES), True),
    # Upstream's default is false; ours keeps parameters in every image (--disable-metadata turns them off).
    "default_save_metadata_to_images": (True, _as_bool, False),
    "default_overwrite_step": (-1, _as_overwrite_step, False),
    "default_overwrite_switch": (-1, _as_overwrite_step, False),
    "default_cfg_tsnr": (7.0, _in_range(1.0, 30.0), False),
    "default_clip_skip": (2, _as_clip_skip, False),
    "default_advanced_checkbox": (False, _as_bool, False),
    "default_image_prompt_checkbox": (False, _as_bool, False),
    "default_developer_debug_mode_checkbox": (False, _as_bool, False),
    "default_image_prompt_advanced_checkbox": (False, _as_bool, False),
    "default_selected_image_input_tab_id": ("uov_tab", _one_of(IMAGE_INPUT_TAB_IDS), True),
    "default_uov_method": (flags.UOV_DISABLED, _one_of(flags.UOV_METHODS), True),
    "default_inpaint_method": (flags.INPAINT_METHODS[0], _one_of(flags.INPAINT_METHODS), True),
    "default_invert_mask_checkbox": (False, _as_bool, False),
    "default_overwrite_upscale": (-1.0, _in_range(-1.0, 1.0), False),
    "default_max_image_number": (32, _as_image_number_cap, False),
    "default_max_lora_number": (5, _as_lora_rows, False),
    "default_loras_min_weight": (-2.0, _as_float, False),
    "default_loras_max_weight": (2.0, _as_float, False),
    "default_inpaint_engine_version": (flags.DEFAULT_INPAINT_ENGINE, _one_of(flags.INPAINT_ENGINE_VERSIONS), True),
    "default_black_out_nsfw": (False, _as_no_nsfw_blackout, False),
    "path_wildcards": ("wildcards", _as_first_path, False),
    "checkpoint_downloads": ({}, _as_downloads, False),
    "lora_downloads": ({}, _as_downloads, False),
    "embeddings_downloads": ({}, _as_downloads, False),
    "vae_downloads": ({}, _as_downloads, False),
    "previous_default_models": ([], _as_names, False),
    "max_prompt_tokens": (3000, _as_positive_int, False),
    "max_loras_per_request": (32, _as_positive_int, False),
    "max_lora_weight": (10.0, _as_positive_float, False),
    "max_queue_length": (100, _as_positive_int, False),
    "max_queue_per_client": (16, _as_positive_int, False),
    "max_job_history": (100, _as_positive_int, False),
    "max_conditioning_cache_mb": (512.0, _as_positive_float, False),
    "max_megapixel_steps": (2048.0, _as_positive_float, False),
    "shared_history_log": (False, _as_bool, False),
    "image_input_side": (1024, _as_positive_int, False),
    "api_key": ("", _as_str, True),
    # Upstream's default list also holds "Fooocus V2", which needs the expansion model's
    # files; without a config or preset we start with no styles, so a fresh install works offline.
    "default_styles": ([], _as_names, False),
    "default_sample_sharpness": (2.0, _as_float, False),
}
CONFIG_KEYS: tuple[str, ...] = tuple(_KEYS)


def _resolve(path: str | os.PathLike[str]) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else REPO_ROOT / p


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a usable value")


def _read_json_object(path: Path, what: str) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{what} {path} is not UTF-8 text (byte {e.start}: {e.reason})") from None
    except OSError as e:
        raise ConfigError(f"{what} {path} cannot be read: {e.strerror or e}") from None
    try:
        # NaN/Infinity are not JSON; Python's parser takes them unless told not to.
        data = json.loads(text, parse_constant=_reject_constant)
    except ValueError as e:
        raise ConfigError(f"{what} {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{what} {path} must hold a JSON object, got {type(data).__name__}")
    return data


def _decode_env(raw: str, takes_text: bool) -> Any:
    if takes_text:
        return raw
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def load_config(env: Mapping[str, str] = os.environ, *, preset: str | None = None,
                output_path: str | None = None, cli: Mapping[str, Any] | None = None) -> Config:
    """Build a Config from defaults, config.txt, an optional preset and ``env``."""
    # A relative config_path is taken relative to the current directory, as typed.
    config_path = Path(env.get("config_path", REPO_ROOT / "config.txt")).expanduser().absolute()
    # (raw value, where it came from) per key, later layers overwrite.
    raw: dict[str, tuple[Any, str]] = {k: (d, "defaults") for k, (d, _, _) in _KEYS.items()}

    if config_path.exists() and not config_path.is_file():
        raise ConfigError(f"config file {config_path} (from config_path) is not a file")
    if config_path.is_file():
        for k, v in _read_json_object(config_path, "config file").items():
            if k in _KEYS:
                raw[k] = (v, str(config_path))
    if preset:
        try:
            values, preset_path = presets.read(preset, _KEYS)
        except presets.PresetError as error:
            raise ConfigError(str(error)) from None
        for k, v in values.items():
            raw[k] = (v, str(preset_path))
    for k, (_, _, takes_text) in _KEYS.items():
        if k in env:
            raw[k] = (_decode_env(env[k], takes_text), f"environment variable {k}")
    if output_path:
        raw["path_outputs"] = (output_path, "--output-path")

    values = {k: parse(raw[k][0], k, raw[k][1]) for k, (_, parse, _) in _KEYS.items()}
    _check_default_loras(values, raw)
    if values["default_loras_min_weight"] >= values["default_loras_max_weight"]:
        raise ConfigError(f"config keys 'default_loras_min_weight' ({values['default_loras_min_weight']:g}) and "
                          f"'default_loras_max_weight' ({values['default_loras_max_weight']:g}): the minimum must "
                          f"be below the maximum")
    if not (cli or {}).get("always_download_new_model"):
        values["default_model"] = _available_default_model(values)
    return Config(config_path=config_path, **values, **(cli or {}))


_fallbacks_logged: set[tuple[str, str]] = set()


def _available_default_model(values: dict[str, Any]) -> str:
    """As upstream: a default model that is not there, when one of previous_default_models
    is, is replaced by that one (unless --always-download-new-model), so an older install
    keeps working without a new download."""
    name, folders = values["default_model"], values["path_checkpoints"]
    if not name or _exists(name, folders):
        return name
    for older in values["previous_default_models"]:
        if _exists(older, folders):
            if (name, older) not in _fallbacks_logged:
                _fallbacks_logged.add((name, older))
                log.info("default model %s is not there but %s is: using it (--always-download-new-model "
                         "downloads the new one)", name, older)
            return older
    return name


def _exists(name: str, folders: Iterable[Path]) -> bool:
    try:
        resolve_model_file(name, folders)
    except FileNotFoundError:
        return False
    return True


def _check_default_loras(values: dict[str, Any], raw: dict[str, tuple[Any, str]]) -> None:
    """The default LoRAs obey the same weight limit as a request's, at start: otherwise every
    request that keeps the defaults would fail naming a field the client never sent."""
    limit = values["max_lora_weight"]
    for lora in values["default_loras"]:
        if abs(lora.weight) > limit:
            raise ConfigError(f"config key 'default_loras' from {raw['default_loras'][1]}: {lora.name} has weight "
                              f"{lora.weight:g}, beyond max_lora_weight ({limit:g})")


# --- process-wide cached instance ------------------------------------------------

_lock = threading.Lock()
_cached: Config | None = None


def _from_process() -> Config:
    import args_manager  # late import: args_manager.init() may run after we are imported

    a = args_manager.args
    return load_config(os.environ, preset=a.preset, output_path=a.output_path, cli=_cli_settings(a))


def _cli_settings(a) -> dict:
    """What the command line hands the pipeline (not config keys)."""
    temp = getattr(a, "temp_path", None)
    return {"image_log": not getattr(a, "disable_image_log", False),
            "temp_path": Path(temp).expanduser().absolute() if temp else None,
            "metadata": not getattr(a, "disable_metadata", False),
            "downloads": not getattr(a, "disable_preset_download", False),
            "always_download_new_model": bool(getattr(a, "always_download_new_model", False)),
            "max_batch": getattr(a, "max_batch", None),
            "batch_window_ms": float(getattr(a, "batch_window_ms", 0.0) or 0.0)}


def with_preset(name: str) -> Config:
    """The process's sources with preset `name` in place of --preset (a request's or the
    page's choice); environment variables and --output-path still win."""
    import args_manager  # late import, as in _from_process

    a = args_manager.args
    return load_config(os.environ, preset=name, output_path=a.output_path, cli=_cli_settings(a))


def get_config() -> Config:
    """The process's Config (env + args_manager.args), built on first use."""
    global _cached
    with _lock:
        if _cached is None:
            _cached = _from_process()
        return _cached


def reload_config() -> Config:
    """Re-read every source and replace the cached Config."""
    global _cached
    with _lock:
        _cached = _from_process()
        return _cached


# --- model files -----------------------------------------------------------------

def _as_folder_list(folders: str | os.PathLike[str] | Iterable[str | os.PathLike[str]]) -> list[Path]:
    if isinstance(folders, (str, os.PathLike)):
        return [Path(folders)]
    return [Path(f) for f in folders]


def list_model_files(folders: str | os.PathLike[str] | Iterable[str | os.PathLike[str]],
                     extensions: Sequence[str] = MODEL_EXTENSIONS) -> list[str]:
    """Model files under ``folders``, recursively, as sorted names relative to their folder.

    Names use "/" separators. A name found in several folders is listed once
    (the first folder wins in ``resolve_model_file``). Missing folders are skipped.
    """
    exts = tuple(e.lower() for e in extensions)
    names: set[str] = set()
    for folder in _as_folder_list(folders):
        if not folder.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]  # skip .cache, .git...
            for fn in filenames:
                if fn.lower().endswith(exts) and not fn.startswith("."):
                    rel = Path(dirpath, fn).relative_to(folder)
                    names.add(rel.as_posix())
    return sorted(names, key=lambda n: (n.casefold(), n))


def _inside(path: Path, folder: Path) -> bool:
    # Lexical check (abspath folds "..") so symlinked model files still count as inside.
    return Path(os.path.abspath(path)).is_relative_to(os.path.abspath(folder))


def resolve_model_file(name: str, folders: str | os.PathLike[str] | Iterable[str | os.PathLike[str]]) -> str:
    """Absolute path of model ``name`` in the first of ``folders`` that holds it.

    ``name`` is a name as listed by ``list_model_files`` (subfolders allowed)
    or an absolute path inside one of the folders. Names reaching outside the
    folders ("../x", other absolute paths) are never resolved: names arrive
    from API requests. Raises FileNotFoundError naming the file and every
    folder searched.
    """
    searched = _as_folder_list(folders)
    for folder in searched:
        candidate = folder / name  # an absolute name replaces the folder
        if candidate.is_file() and _inside(candidate, folder):
            return os.path.abspath(candidate)
    where = ", ".join(str(f) for f in searched) or "(no folders configured)"
    raise FileNotFoundError(f"model file {name!r} not found; searched: {where}")
