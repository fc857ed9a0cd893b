"""The input-image fields of a request (Fooocus's "Input Image" tab), decoded and checked.

Torch-free. Request fields:

* ``input_image``: the image to vary, upscale, inpaint or outpaint;
* ``uov_method``: one of ``flags.UOV_METHODS`` ("Disabled" by default);
* ``inpaint_mask``: white (or a sketch's opaque strokes) marks what to repaint;
* ``outpaint_selections``: any of "Left", "Right", "Top", "Bottom";
* ``inpaint_strength`` (0-1], ``inpaint_respective_field`` [0-1];
* ``overwrite_vary_strength``, ``overwrite_upscale_strength``: upstream's developer
  options, the denoise of Vary (0.5 / 0.85) and of Upscale (0.382) replaced by a value in
  (0, 1]; -1 to 0 keep the method's own, as upstream (what an img2img API's free
  ``denoising_strength`` maps to);
* ``image_prompts``: up to four ``[image, stop, weight, type]``; type "ImagePrompt" (the
  default), "PyraCanny" or "CPDS"; stop and weight default to upstream's per type (0.5 and
  0.6 for ImagePrompt, 0.5 and 1.0 for the two ControlNets);
* Developer Debug Mode's control options (upstream's / Fooocus-API's names):
  ``controlnet_softness`` [0, 1] (0.25), ``canny_low_threshold`` and ``canny_high_threshold``
  (1-255: 64, 128), ``skipping_cn_preprocessor`` (the images are already edge/structure
  maps), ``debugging_cn_preprocessor`` (return the preprocessed images, generate nothing);
* Developer Debug Mode's inpaint options (upstream's names): ``inpaint_erode_or_dilate``
  (-64..64 px, 0: grow (+) or shrink (-) the mask, before any invert), ``invert_mask_checkbox``
  (repaint what the mask leaves), ``inpaint_engine`` (``flags.INPAINT_ENGINE_VERSIONS``: which
  patch file; "None": no patch), ``inpaint_disable_initial_latent`` (sampling starts from
  an empty latent, not the pre-filled crop), ``debugging_inpaint_preprocessor`` (return the
  crop and its mask as prepared, generate nothing).

An image is a base64 string (PNG, JPEG or WebP; a ``data:image/...;base64,`` prefix is
fine), Gradio's file object ``{"path": ...}`` or the path of an image file in a folder the
server owns (``Config.input_folders``: path_inputs, the outputs, Gradio's uploads); any other
path is refused with the same message as a missing file.
Every error names its field. Pixels never go into the image's metadata: the report gets
`describe()` (sizes and content hashes) instead.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from modules import flags
from modules.config import Config
from modules.generation_request import is_finite_number, shown_number
from modules.task_types import RequestError

MAX_IMAGE_SIDE = 4096
MAX_ENCODED_BYTES = 64 * 2 ** 20      # an encoded image larger than this is refused unread
MAX_PATH_CHARS = 4096
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")   # JPEG includes MPO, what many cameras write
IMAGE_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"RIFF")
MAX_IMAGE_PROMPTS = 4                 # upstream's four image-prompt slots
INPAINT_STRENGTH, INPAINT_RESPECTIVE_FIELD = 1.0, 0.618
CONTROLNET_SOFTNESS = 0.25                           # upstream's defaults for the control options
CANNY_LOW_THRESHOLD, CANNY_HIGH_THRESHOLD = 64, 128


@dataclass
class ImagePromptInput:
    image: np.ndarray      # HxWx3 uint8
    stop: float
    weight: float
    kind: str = flags.IMAGE_PROMPT   # one of flags.IMAGE_PROMPT_TYPES (not a refused one)


@dataclass(frozen=True)
class ControlOptions:
    """Developer Debug Mode's "Control" options for the PyraCanny/CPDS image prompts."""

    softness: float = CONTROLNET_SOFTNESS
    canny_low: int = CANNY_LOW_THRESHOLD
    canny_high: int = CANNY_HIGH_THRESHOLD
    skip_preprocessors: bool = False
    debug_preprocessors: bool = False


@dataclass(frozen=True)
class InpaintOptions:
    """Developer Debug Mode's inpaint options (upstream's defaults)."""

    erode_or_dilate: int = 0
    invert_mask: bool = False
    engine: str = flags.DEFAULT_INPAINT_ENGINE
    disable_initial_latent: bool = False
    debug_preprocessor: bool = False


@dataclass
class ImageInputs:
    """What a request asks of its input images. `mode` is "" (text to image), "uov" or
    "inpaint" (which includes outpaint); image prompts combine with any mode."""

    mode: str = ""
    image: np.ndarray | None = None          # HxWx3 uint8
    uov_method: str = flags.UOV_DISABLED
    mask: np.ndarray | None = None           # HxW or HxWxC uint8, as given
    outpaint: list[str] = field(default_factory=list)
    inpaint_strength: float = INPAINT_STRENGTH
    inpaint_respective_field: float = INPAINT_RESPECTIVE_FIELD
    image_prompts: list[ImagePromptInput] = field(default_factory=list)
    vary_strength: float | None = None       # None: the Vary method's own denoise
    upscale_strength: float | None = None    # None: the Upscale methods' own denoise
    control: ControlOptions = field(default_factory=ControlOptions)
    inpaint: InpaintOptions = field(default_factory=InpaintOptions)

    def uov_denoise(self, own: float) -> float:
        """The denoise the uov method runs at: its own, or the request's overwrite."""
        wanted = self.vary_strength if self.uov_method.startswith("Vary") else self.upscale_strength
        return own if wanted is None else wanted

    @property
    def adapter_prompts(self) -> list[ImagePromptInput]:
        """The IP-Adapter's ("ImagePrompt")."""
        return [p for p in self.image_prompts if p.kind == flags.IMAGE_PROMPT]

    @property
    def control_prompts(self) -> list[ImagePromptInput]:
        """The ControlNets' (PyraCanny, CPDS), in request order."""
        return [p for p in self.image_prompts if p.kind in flags.CONTROLNET_TYPES]

    def describe(self) -> dict[str, Any]:
        """For the report and the file metadata: what was asked, without pixels."""
        out: dict[str, Any] = {}
        if self.image is not None:
            out["input_image"] = _describe(self.image)
        if self.mode == "uov":
            out["uov_method"] = self.uov_method
            for key, value in (("overwrite_vary_strength", self.vary_strength),
                               ("overwrite_upscale_strength", self.upscale_strength)):
                if value is not None:
                    out[key] = value
        if self.mode == "inpaint":
            if self.mask is not None:
                out["inpaint_mask"] = _describe(self.mask)
            o = self.inpaint
            out.update(outpaint_selections=list(self.outpaint), inpaint_strength=self.inpaint_strength,
                       inpaint_respective_field=self.inpaint_respective_field, inpaint_engine=o.engine,
                       inpaint_erode_or_dilate=o.erode_or_dilate, invert_mask_checkbox=o.invert_mask,
                       inpaint_disable_initial_latent=o.disable_initial_latent,
                       debugging_inpaint_preprocessor=o.debug_preprocessor)
        if self.image_prompts:
            out["image_prompts"] = [{**_describe(p.image), "stop": p.stop, "weight": p.weight, "type": p.kind}
                                    for p in self.image_prompts]
        if self.control_prompts or self.control.debug_preprocessors:
            c = self.control
            out.update(controlnet_softness=c.softness, canny_low_threshold=c.canny_low,
                       canny_high_threshold=c.canny_high, skipping_cn_preprocessor=c.skip_preprocessors,
                       debugging_cn_preprocessor=c.debug_preprocessors)
        return out


def _describe(image: np.ndarray) -> dict[str, Any]:
    return {"width": int(image.shape[1]), "height": int(image.shape[0]),
            "sha256": hashlib.sha256(np.ascontiguousarray(image).tobytes()).hexdigest()[:16]}


def parse(data: dict, cfg: Config) -> ImageInputs:
    """The input-image fields of request `data` (absent fields: text to image); files are
    read only from `cfg.input_folders`."""
    folders = cfg.input_folders
    inputs = ImageInputs(image_prompts=_image_prompts(data.get("image_prompts"), folders),
                         control=_control_options(data))
    method = data.get("uov_method", flags.UOV_DISABLED)
    if method in (None, ""):
        method = flags.UOV_DISABLED
    if method not in flags.UOV_METHODS:
        raise RequestError(f"field 'uov_method' must be one of {', '.join(flags.UOV_METHODS)}, got {method!r}")
    inputs.uov_method = method
    inputs.vary_strength = _overwrite_strength(data, "overwrite_vary_strength")
    inputs.upscale_strength = _overwrite_strength(data, "overwrite_upscale_strength")
    inputs.outpaint = _outpaint(data.get("outpaint_selections"))
    has_mask = data.get("inpaint_mask") not in (None, "")
    if method != flags.UOV_DISABLED:
        inputs.mode = "uov"
    elif has_mask or inputs.outpaint:
        inputs.mode = "inpaint"
    image = data.get("input_image")
    if image in (None, ""):
        if inputs.mode:
            wanted = "uov_method" if inputs.mode == "uov" else ("inpaint_mask" if has_mask else "outpaint_selections")
            raise RequestError(f"field 'input_image' is required with field '{wanted}'")
        return inputs
    if not inputs.mode:
        raise RequestError("field 'input_image' needs something to do: a field 'uov_method' other than "
                           "'Disabled', an 'inpaint_mask' or 'outpaint_selections'")
    inputs.image = decode_image(image, "input_image", folders)
    if inputs.mode == "inpaint":
        if has_mask:
            inputs.mask = decode_image(data["inpaint_mask"], "inpaint_mask", folders, keep_alpha=True)
        inputs.inpaint_strength = _fraction(data, "inpaint_strength", INPAINT_STRENGTH, low_open=True)
        inputs.inpaint_respective_field = _fraction(data, "inpaint_respective_field", INPAINT_RESPECTIVE_FIELD)
    inputs.inpaint = _inpaint_options(data, cfg.default_inpaint_engine_version)
    return inputs


def _inpaint_options(data: dict, default_engine: str) -> InpaintOptions:
    engine = data.get("inpaint_engine")
    if engine in (None, ""):
        engine = default_engine   # config/preset default_inpaint_engine_version
    if engine not in flags.INPAINT_ENGINE_VERSIONS:
        raise RequestError(f"field 'inpaint_engine' must be one of {', '.join(flags.INPAINT_ENGINE_VERSIONS)}, "
                           f"got {engine!r}")
    return InpaintOptions(erode_or_dilate=_whole(data, "inpaint_erode_or_dilate", 0, -64, 64),
                          invert_mask=_flag(data, "invert_mask_checkbox"), engine=engine,
                          disable_initial_latent=_flag(data, "inpaint_disable_initial_latent"),
                          debug_preprocessor=_flag(data, "debugging_inpaint_preprocessor"))


def _fraction(data: dict, key: str, default: float, low_open: bool = False) -> float:
    value = data.get(key, default)
    if not is_finite_number(value):
        raise RequestError(f"field '{key}' must be a finite number, got {shown_number(value)}")
    if not (0.0 < value <= 1.0 if low_open else 0.0 <= value <= 1.0):
        raise RequestError(f"field '{key}' must be between 0 and 1, got {shown_number(value)}")
    return float(value)


def _overwrite_strength(data: dict, key: str) -> float | None:
    """Upstream's overwrite sliders: -1..0 mean "the method's own", (0, 1] replaces it."""
    value = _number(data.get(key), -1.0, f"field '{key}'", -1.0, 1.0)
    return value if value > 0 else None


def _outpaint(value: Any) -> list[str]:
    if value in (None, ""):
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise RequestError(f"field 'outpaint_selections' must be a list of directions, got {value!r}")
    by_lower = {d.lower(): d for d in flags.OUTPAINT_SELECTIONS}
    unknown = [v for v in value if v.strip().lower() not in by_lower]
    if unknown:
        raise RequestError(f"field 'outpaint_selections': unknown direction(s) {unknown}; "
                           f"choose from {', '.join(flags.OUTPAINT_SELECTIONS)}")
    return list(dict.fromkeys(by_lower[v.strip().lower()] for v in value))


def _image_prompts(value: Any, folders: tuple[Path, ...]) -> list[ImagePromptInput]:
    if value in (None, ""):
        return []
    if not isinstance(value, list):
        raise RequestError("field 'image_prompts' must be a list of [image, stop, weight, type]")
    prompts = []
    for index, item in enumerate(value):
        where = f"field 'image_prompts' item {index}"
        entry = list(item) if isinstance(item, (list, tuple)) else [item]
        if not entry or len(entry) > 4:
            raise RequestError(f"{where} must be [image, stop, weight, type]")
        image, stop, weight, kind = (entry + [None] * 3)[:4]
        if image in (None, ""):
            continue   # an empty slot, as upstream's page sends
        kind = _image_prompt_type(kind, where)
        default_stop, default_weight = flags.IMAGE_PROMPT_DEFAULTS[kind]
        prompts.append(ImagePromptInput(
            image=decode_image(image, f"image_prompts[{index}]", folders),
            stop=_number(stop, default_stop, f"{where} stop", 0.0, 1.0),
            weight=_number(weight, default_weight, f"{where} weight", 0.0, 2.0), kind=kind))
    if len(prompts) > MAX_IMAGE_PROMPTS:
        raise RequestError(f"field 'image_prompts' has {len(prompts)} images; at most {MAX_IMAGE_PROMPTS}")
    return prompts


def _image_prompt_type(kind: Any, where: str) -> str:
    """The type of one image prompt (case as upstream's names; absent: "ImagePrompt")."""
    if kind in (None, ""):
        return flags.IMAGE_PROMPT
    usable = [t for t in flags.IMAGE_PROMPT_TYPES if t not in flags.UNSUPPORTED_IMAGE_PROMPT_TYPES]
    by_lower = {t.lower(): t for t in flags.IMAGE_PROMPT_TYPES}
    known = by_lower.get(kind.strip().lower()) if isinstance(kind, str) else None
    if known in flags.UNSUPPORTED_IMAGE_PROMPT_TYPES:
        raise RequestError(f"{where}: type {known!r} is not supported: {flags.UNSUPPORTED_IMAGE_PROMPT_TYPES[known]}; "
                           f"use one of {', '.join(usable)}")
    if known is None:
        raise RequestError(f"{where}: type must be one of {', '.join(usable)}, got {kind!r}")
    return known


def _control_options(data: dict) -> ControlOptions:
    return ControlOptions(
        softness=_number(data.get("controlnet_softness"), CONTROLNET_SOFTNESS, "field 'controlnet_softness'", 0.0, 1.0),
        canny_low=_whole(data, "canny_low_threshold", CANNY_LOW_THRESHOLD, 1, 255),
        canny_high=_whole(data, "canny_high_threshold", CANNY_HIGH_THRESHOLD, 1, 255),
        skip_preprocessors=_flag(data, "skipping_cn_preprocessor"),
        debug_preprocessors=_flag(data, "debugging_cn_preprocessor"))


def _whole(data: dict, key: str, default: int, low: int, high: int) -> int:
    """A whole number (a float with no fraction too: sliders send 64.0)."""
    value = data.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer():
        raise RequestError(f"field '{key}' must be a whole number, got {value!r}")
    if not low <= value <= high:
        raise RequestError(f"field '{key}' must be between {low} and {high}, got {value}")
    return int(value)


def _flag(data: dict, key: str) -> bool:
    value = data.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise RequestError(f"field '{key}' must be true or false, got {value!r}")
    return value


def _number(value: Any, default: float, where: str, low: float, high: float) -> float:
    if value is None:
        return default
    if not is_finite_number(value):
        raise RequestError(f"{where} must be a finite number, got {shown_number(value)}")
    if not low <= value <= high:
        raise RequestError(f"{where} must be between {low:g} and {high:g}, got {shown_number(value)}")
    return float(value)


def decode_image(value: Any, key: str, folders: tuple[Path, ...] = (), keep_alpha: bool = False) -> np.ndarray:
    """HxWx3 uint8 (HxWx4 with `keep_alpha` when the image has transparency) from a
    base64 string, a data URI, Gradio's {"path": ...} or the path of a file inside one of
    `folders` (the folders the server owns; a relative path is taken in the first)."""
    raw = _encoded_bytes(value, key, folders)
    from PIL import Image, UnidentifiedImageError

    try:
        # Only the formats clients send: PIL's others (EPS runs Ghostscript, TIFF, ICO...) are
        # never tried. Opening reads the header alone; the size is checked before decoding.
        with Image.open(io.BytesIO(raw), formats=IMAGE_FORMATS) as image:
            width, height = image.size
            if max(width, height) > MAX_IMAGE_SIDE:
                raise RequestError(f"field '{key}': the image is {width}x{height}; at most "
                                   f"{MAX_IMAGE_SIDE} pixels per side")
            alpha = keep_alpha and ("A" in image.getbands() or "transparency" in image.info)
            pixels = np.asarray(image.convert("RGBA" if alpha else "RGB"))
    except RequestError:
        raise
    except Image.DecompressionBombError:   # declared far beyond MAX_IMAGE_PIXELS: refused unread
        raise RequestError(f"field '{key}': the image is larger than {MAX_IMAGE_SIDE}x{MAX_IMAGE_SIDE} "
                           f"pixels; refused before decoding") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        raise RequestError(f"field '{key}': not a readable PNG, JPEG or WebP image "
                           f"({type(error).__name__})") from None
    if min(pixels.shape[:2]) < 8:
        raise RequestError(f"field '{key}': the image is {pixels.shape[1]}x{pixels.shape[0]}; at least 8 "
                           f"pixels per side")
    return np.ascontiguousarray(pixels)


def _refused(key: str) -> RequestError:
    """One message whatever the reason (outside the owned folders, missing, a folder): a
    client learns nothing about the server's files from it."""
    return RequestError(f"field '{key}': neither base64 image data nor an image file in a folder the server "
                        f"owns (config key path_inputs, the outputs, uploads)")


def _encoded_bytes(value: Any, key: str, folders: tuple[Path, ...]) -> bytes:
    if isinstance(value, dict) and isinstance(value.get("path"), str):
        value = value["path"]
    if not isinstance(value, str):
        raise RequestError(f"field '{key}' must be a base64 image or an image file's path, "
                           f"got {type(value).__name__}")
    if len(value) > MAX_ENCODED_BYTES * 4 // 3 + 4:
        raise RequestError(f"field '{key}': the image is over {MAX_ENCODED_BYTES // 2 ** 20} MB")
    text = value.strip()
    if text.startswith("data:"):
        text = text.partition(",")[2]
    data = _base64(text)
    # Base64 uses "/" too (JPEG data starts "/9j/"): what decodes to an image is data;
    # otherwise the text may name a file in an owned folder.
    if data is not None and data.startswith(IMAGE_SIGNATURES):
        return data
    path = _owned_file(text, folders) if len(text) < MAX_PATH_CHARS else None
    if path is not None:
        return _read_file(path, key)
    if data is not None:
        return data   # base64 of something else: decoding says it is no readable image
    raise _refused(key)


def _base64(text: str) -> bytes | None:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


def _owned_file(text: str, folders: tuple[Path, ...]) -> str | None:
    """The real path of `text` (symlinks resolved) when it is a file inside one of
    `folders`, else None. A relative path is taken in the first folder."""
    if not folders:
        return None
    path = Path(text)
    if not path.is_absolute():
        path = folders[0] / path
    try:
        real = path.resolve(strict=True)
    except (OSError, RuntimeError, ValueError):   # missing, a symlink loop, a NUL byte
        return None
    for folder in folders:
        try:
            inside = real.is_relative_to(Path(folder).resolve())
        except OSError:
            continue
        if inside and real.is_file():
            return str(real)
    return None


def _read_file(path: str, key: str) -> bytes:
    """The file's bytes, opened without following a symlink swapped in after the check."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        raise _refused(key) from None
    with os.fdopen(fd, "rb") as handle:
        if os.fstat(handle.fileno()).st_size > MAX_ENCODED_BYTES:
            raise RequestError(f"field '{key}': the image file is over {MAX_ENCODED_BYTES // 2 ** 20} MB")
        return handle.read(MAX_ENCODED_BYTES + 1)
