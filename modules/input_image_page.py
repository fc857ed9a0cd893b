"""Plain (Gradio-free) helpers behind the page's "Input Image" panel; modules/webui.py
wires them to the controls.

The panel follows upstream Fooocus: a checkbox opens it, and its selected tab decides
what the request asks for:

* "Upscale or Variation" (``TAB_UOV``): ``input_image`` + ``uov_method``;
* "Image Prompt" (``TAB_IP``): ``image_prompts`` (filled slots only), each of a type
  (ImagePrompt, PyraCanny, CPDS) whose defaults the Stop At / Weight sliders take;
* "Inpaint or Outpaint" (``TAB_INPAINT``): ``input_image`` + ``inpaint_mask`` (the
  strokes drawn on the canvas, merged with an uploaded mask) and/or
  ``outpaint_selections``, with ``inpaint_strength`` and ``inpaint_respective_field``;
  its "Method" presets those and the Developer Debug inpaint options as upstream's does
  (`inpaint_method_settings`), and its "Inpaint Additional Prompt" goes before the
  prompt, as the first line, when an inpaint or outpaint is sent (`inpaint_prompt`).

The Developer Debug "Control" options (`ControlValues`) act as upstream's: "Mixing Image
Prompt and Vary/Upscale" sends the Upscale or Variation tab's image with the Image Prompt
tab (and the image prompts with the other tab), "Mixing Image Prompt and Inpaint" likewise
for the inpaint tab (with both on, the Image Prompt tab takes Vary/Upscale when it has an
image and a method, else the inpaint: a request has one input image); any mixing option
sends the image prompts whatever tab is shown. The ControlNet options (softness, Canny
thresholds, skip/debug preprocessors) go with the image prompts when they differ from the
defaults. With the checkbox off no input-image field is sent. Images go into the request as
base64 PNG strings (modules/image_inputs.py decodes them). A value the page cannot
turn into a request raises ValueError with a message for the user.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass
from typing import Any

import numpy as np

from modules import flags

TAB_UOV, TAB_IP, TAB_INPAINT = "uov", "ip", "inpaint"
TABS = (TAB_UOV, TAB_IP, TAB_INPAINT)
IMAGE_PROMPT_SLOTS = 4
IMAGE_PROMPT_STOP, IMAGE_PROMPT_WEIGHT = flags.IMAGE_PROMPT_DEFAULTS[flags.IMAGE_PROMPT]
# The types the page offers: upstream's list without the refused ones (FaceSwap).
IMAGE_PROMPT_TYPES = tuple(t for t in flags.IMAGE_PROMPT_TYPES if t not in flags.UNSUPPORTED_IMAGE_PROMPT_TYPES)
CONTROLNET_SOFTNESS, CANNY_LOW, CANNY_HIGH = 0.25, 64, 128   # upstream's defaults
INPAINT_STRENGTH, INPAINT_RESPECTIVE_FIELD = 1.0, 0.618   # upstream's defaults
MASK_THRESHOLD = 127   # an uploaded mask's grey above this repaints


@dataclass(frozen=True)
class ImagePromptSlot:
    image: Any = None        # numpy array, PIL image, file path or None (empty slot)
    stop: float = IMAGE_PROMPT_STOP
    weight: float = IMAGE_PROMPT_WEIGHT
    kind: str = flags.IMAGE_PROMPT


def type_defaults(kind: str | None) -> tuple[float, float]:
    """(stop at, weight) a slot takes when its type is chosen (upstream's per type)."""
    return flags.IMAGE_PROMPT_DEFAULTS.get(kind or flags.IMAGE_PROMPT, flags.IMAGE_PROMPT_DEFAULTS[flags.IMAGE_PROMPT])


@dataclass(frozen=True)
class ControlValues:
    """Developer Debug Mode's "Control" tab (upstream's labels in the comments)."""

    mixing_vary_upscale: bool = False      # Mixing Image Prompt and Vary/Upscale
    mixing_inpaint: bool = False           # Mixing Image Prompt and Inpaint
    softness: float = CONTROLNET_SOFTNESS  # Softness of ControlNet
    canny_low: int = CANNY_LOW             # Canny Low Threshold
    canny_high: int = CANNY_HIGH           # Canny High Threshold
    skip_preprocessors: bool = False       # Skip Preprocessors
    debug_preprocessors: bool = False      # Debug Preprocessors

    def request_fields(self) -> dict[str, Any]:
        """The ControlNet options that differ from the defaults, under upstream's field names."""
        fields = {"controlnet_softness": float(self.softness), "canny_low_threshold": int(self.canny_low),
                  "canny_high_threshold": int(self.canny_high),
                  "skipping_cn_preprocessor": bool(self.skip_preprocessors),
                  "debugging_cn_preprocessor": bool(self.debug_preprocessors)}
        defaults = {"controlnet_softness": CONTROLNET_SOFTNESS, "canny_low_threshold": CANNY_LOW,
                    "canny_high_threshold": CANNY_HIGH, "skipping_cn_preprocessor": False,
                    "debugging_cn_preprocessor": False}
        return {k: v for k, v in fields.items() if v != defaults[k]}


@dataclass(frozen=True)
class InpaintMethodSettings:
    """What choosing an inpaint Method sets (upstream's values)."""

    additional_prompt_shown: bool   # the additional prompt is cleared when hidden
    outpaint_shown: bool            # the outpaint directions are cleared when hidden
    disable_initial_latent: bool
    engine: str
    strength: float
    respective_field: float


def inpaint_method_settings(method: str, engine: str = flags.DEFAULT_INPAINT_ENGINE) -> InpaintMethodSettings:
    """`engine`: the inpaint patch the other methods than Improve Detail use (config
    default_inpaint_engine_version)."""
    default, detail, modify = flags.INPAINT_METHODS
    if method == detail:    # a light pass over the masked part alone, without the inpaint patch
        return InpaintMethodSettings(True, False, False, "None", 0.5, 0.0)
    if method == modify:    # new content: sampling starts from an empty latent, not the picture
        return InpaintMethodSettings(True, False, True, engine, INPAINT_STRENGTH, 0.0)
    if method != default:
        raise ValueError(f"Inpaint or Outpaint: unknown method {method!r}")
    return InpaintMethodSettings(False, True, False, engine, INPAINT_STRENGTH, INPAINT_RESPECTIVE_FIELD)


def inpaint_prompt(prompt: str, additional: str) -> str:
    """The prompt with the inpaint's additional prompt as its first line (upstream's order:
    line 1 is the main prompt, the others extra positive prompts)."""
    if not additional:
        return prompt
    return f"{additional}\n{prompt}" if prompt else additional


@dataclass(frozen=True)
class InputImageValues:
    """What the Input Image panel holds; ``to_fields`` gives the request's fields."""

    enabled: bool = False
    tab: str = TAB_UOV
    uov_image: Any = None
    uov_method: str = flags.UOV_DISABLED
    image_prompts: tuple[ImagePromptSlot, ...] = ()
    inpaint_canvas: Any = None          # the ImageEditor's {"background", "layers", "composite"}
    inpaint_mask_upload: Any = None     # an optional mask image (white repaints)
    outpaint: tuple[str, ...] = ()
    inpaint_strength: float = INPAINT_STRENGTH
    inpaint_respective_field: float = INPAINT_RESPECTIVE_FIELD
    inpaint_additional_prompt: str = ""
    control: ControlValues = ControlValues()

    def to_fields(self) -> dict[str, Any]:
        if not self.enabled:
            return {}
        if self.tab not in TABS:
            raise ValueError(f"unknown Input Image tab {self.tab!r}")
        control = self.control
        fields: dict[str, Any] = {}
        if self.tab == TAB_UOV:
            fields = uov_fields(self.uov_image, self.uov_method)
        elif self.tab == TAB_INPAINT:
            fields = self._inpaint()
        else:
            if control.mixing_vary_upscale and to_rgb(self.uov_image) is not None:
                fields = uov_fields(self.uov_image, self.uov_method)
            if not fields and control.mixing_inpaint:
                fields = self._mixed_inpaint()
        if self.tab == TAB_IP or control.mixing_vary_upscale or control.mixing_inpaint:
            prompts = image_prompt_fields(self.image_prompts)
            if prompts:
                fields.update(prompts, **control.request_fields())
        return fields

    def prompt_for(self, prompt: str, fields: dict[str, Any]) -> str:
        """The request's prompt for `fields` (what ``to_fields`` gave): with the additional
        prompt first when they inpaint or outpaint."""
        if {"inpaint_mask", "outpaint_selections"} & fields.keys():
            return inpaint_prompt(prompt, self.inpaint_additional_prompt.strip())
        return prompt

    def _inpaint(self) -> dict[str, Any]:
        return inpaint_fields(self.inpaint_canvas, self.inpaint_mask_upload, self.outpaint,
                              self.inpaint_strength, self.inpaint_respective_field)

    def _mixed_inpaint(self) -> dict[str, Any]:
        """The inpaint tab's fields when it is mixed into the Image Prompt tab: as upstream,
        only when it has an image and something to repaint (else nothing, no error)."""
        try:
            return self._inpaint()
        except ValueError:
            return {}


# -- each tab -----------------------------------------------------------------------------

def uov_fields(image: Any, method: str | None) -> dict[str, Any]:
    """Upscale or Variation: nothing with "Disabled" (as upstream: text to image)."""
    method = method or flags.UOV_DISABLED
    if method not in flags.UOV_METHODS:
        raise ValueError(f"Upscale or Variation: unknown method {method!r}")
    if method == flags.UOV_DISABLED:
        return {}
    pixels = to_rgb(image)
    if pixels is None:
        raise ValueError(f"Upscale or Variation: upload an image to {method}")
    return {"input_image": encode_png(pixels), "uov_method": method}


def image_prompt_fields(slots: tuple[ImagePromptSlot, ...] | list[ImagePromptSlot]) -> dict[str, Any]:
    """Image Prompt: one ``[image, stop, weight, type]`` per filled slot; none: no field."""
    prompts = []
    for slot in slots:
        pixels = to_rgb(slot.image)
        if pixels is None:
            continue
        kind = slot.kind or flags.IMAGE_PROMPT
        if kind not in IMAGE_PROMPT_TYPES:
            raise ValueError(f"Image Prompt: unknown type {kind!r}; choose one of {', '.join(IMAGE_PROMPT_TYPES)}")
        prompts.append([encode_png(pixels), float(slot.stop), float(slot.weight), kind])
    return {"image_prompts": prompts} if prompts else {}


def inpaint_fields(canvas: Any, mask_upload: Any, outpaint: tuple[str, ...] | list[str] | None,
                   strength: float = INPAINT_STRENGTH,
                   respective_field: float = INPAINT_RESPECTIVE_FIELD) -> dict[str, Any]:
    """Inpaint or Outpaint: the canvas's image, the mask drawn on it (merged with an
    uploaded mask) and the outpaint directions."""
    directions = [d for d in flags.OUTPAINT_SELECTIONS if d in (outpaint or ())]
    image = canvas_image(canvas)
    mask_upload_pixels = to_gray(mask_upload)
    if image is None:
        if directions or mask_upload_pixels is not None or drawn_mask(canvas) is not None:
            raise ValueError("Inpaint or Outpaint: upload the image to inpaint or outpaint first")
        return {}
    mask = merge_masks(image.shape[:2], drawn_mask(canvas), mask_upload_pixels)
    if mask is None and not directions:
        raise ValueError("Inpaint or Outpaint: draw on the image where it should change, upload a mask, "
                         "or choose an outpaint direction")
    fields: dict[str, Any] = {"input_image": encode_png(image)}
    if mask is not None:
        fields["inpaint_mask"] = encode_png(mask)
    if directions:
        fields["outpaint_selections"] = directions
    fields["inpaint_strength"] = float(strength)
    fields["inpaint_respective_field"] = float(respective_field)
    return fields


# -- images -------------------------------------------------------------------------------

def to_array(value: Any) -> np.ndarray | None:
    """An image as Gradio gives it (numpy array, PIL image, file path, {"path": ...}) as an
    HxW or HxWxC uint8 array; None for no image."""
    if value is None:
        return None
    if isinstance(value, dict):
        value = value.get("path")
        if value is None:
            return None
    if isinstance(value, str):
        if not value:
            return None
        from PIL import Image
        with Image.open(value) as image:
            image.load()
            value = image.convert("RGBA") if "A" in image.getbands() else image.convert("RGB")
    array = np.asarray(value)
    if array.dtype != np.uint8:
        if np.issubdtype(array.dtype, np.floating) and array.size and array.max() <= 1.0:
            array = array * 255.0
        array = np.clip(array, 0, 255).astype(np.uint8)
    if array.ndim not in (2, 3) or array.size == 0:
        raise ValueError(f"not an image (array of shape {array.shape})")
    return array


def to_rgb(value: Any) -> np.ndarray | None:
    array = to_array(value)
    if array is None:
        return None
    if array.ndim == 2:
        return np.repeat(array[:, :, None], 3, axis=2)
    if array.shape[2] == 4:   # transparent pixels become white, as a pasted PNG looks
        alpha = array[:, :, 3:4].astype(np.float32) / 255.0
        rgb = array[:, :, :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)
        return np.clip(np.round(rgb), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(array[:, :, :3])


def to_gray(value: Any) -> np.ndarray | None:
    """A mask image as HxW uint8 (an RGBA mask: its colour where opaque, else black)."""
    array = to_array(value)
    if array is None:
        return None
    if array.ndim == 2:
        return array
    gray = array[:, :, :3].max(axis=2) if array.shape[2] >= 3 else array[:, :, 0]
    if array.shape[2] == 4:
        gray = np.minimum(gray, array[:, :, 3])
    return gray.astype(np.uint8)


def canvas_image(canvas: Any) -> np.ndarray | None:
    """The image under the strokes: the editor's background."""
    if canvas is None:
        return None
    if isinstance(canvas, dict):
        return to_rgb(canvas.get("background"))
    return to_rgb(canvas)


def drawn_mask(canvas: Any) -> np.ndarray | None:
    """Where the user drew: 255 where any layer has an opaque (or, without alpha, a
    non-black) pixel, else 0. None when nothing was drawn."""
    if not isinstance(canvas, dict):
        return None
    mask = None
    for layer in canvas.get("layers") or ():
        array = to_array(layer)
        if array is None:
            continue
        if array.ndim == 3 and array.shape[2] == 4:
            drawn = array[:, :, 3] > 0
        elif array.ndim == 3:
            drawn = array.max(axis=2) > 0
        else:
            drawn = array > 0
        mask = drawn if mask is None else _fit(mask, drawn.shape) | drawn
    if mask is None or not mask.any():
        return None
    return mask.astype(np.uint8) * 255


def merge_masks(shape: tuple[int, int], *masks: np.ndarray | None) -> np.ndarray | None:
    """The union of the masks at the image's size (HxW uint8, 255 repaints); None if empty."""
    merged = None
    for mask in masks:
        if mask is None:
            continue
        binary = _fit(mask > MASK_THRESHOLD, shape)
        merged = binary if merged is None else merged | binary
    if merged is None or not merged.any():
        return None
    return merged.astype(np.uint8) * 255


def _fit(mask: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """A boolean mask resized (nearest) to HxW ``shape``."""
    height, width = shape[:2]
    if mask.shape[:2] == (height, width):
        return mask
    from PIL import Image
    image = Image.fromarray(mask.astype(np.uint8) * 255).resize((width, height), Image.NEAREST)
    return np.asarray(image) > MASK_THRESHOLD


def encode_png(pixels: np.ndarray) -> str:
    from PIL import Image
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")
