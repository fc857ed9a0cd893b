"""Inpaint and outpaint, Fooocus style: masks, the crop around the mask, the paste back,
and the two extra networks (the inpaint weight patch and the inpaint head).

What upstream Fooocus does (learned from its inpaint_worker / async_worker / core, not
copied), and how each piece lands here:

* Outpaint extends the canvas by 30 % of the image's height (top/bottom) or width
  (left/right) with edge pixels and marks the new strips for repaint; it then repaints
  the whole canvas at strength 1.0 (respective field 1.0).
* Inpaint crops a box around the mask (the mask's square bounding box with 15 % margin,
  grown until it covers `respective_field` (0.618) of each side), resizes it to about
  1024x1024, pre-fills the masked pixels from their surroundings (coarse-to-fine box
  blurs), generates, and pastes the crop back through a feathered mask: 255 inside,
  falling 8 per pixel outward (32 px). Outside that ring the original pixels stay.
* The latent mask is the pixel mask, bilinearly brought to 8x the latent size, rounded,
  then max-pooled 8x8: a latent cell is repainted if any of its pixels is.
* `inpaint_v26.fooocus.patch` is a torch pickle {"diffusion_model.<ldm key>": (uint8 diff,
  min, max)} merged into the UNet at strength 1.0 (`QuantizedDiff`); the head
  `fooocus_inpaint_head.pth` is {"head": [320, 5, 3, 3]}, a bias-free 3x3 conv (replicate
  padding) on [mask, UNet-space latent] whose output is added to the UNet's first conv.

Here the patch is an ordinary weight patch (resident, diffed, restored exactly like a
LoRA) and the head a model kind the registry manages; the head's feature is added by a
hook installed once, active only inside `head_applied` (an exact no-op otherwise).

Pipeline order: `outpaint_canvas` (if any direction) -> `prepare` -> VAE-encode
`job.fill_pixels` (initial latent) and `job.head_pixels` (head latent) -> `latent_mask`
-> UNet patcher `.clone().add_patches(models.patches(path, unet))` -> sample inside
`head_applied(...)` with core's init latent, denoise and mask -> decode -> `job.paste`.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import struct
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageFilter

from ldm_patched.modules import model_management
from ldm_patched.modules.file_version import FileReadError, FileVersion, read_file
from ldm_patched.modules.lora_adapters import QuantizedDiff
from ldm_patched.modules.model_patcher import ModelPatcher
from ldm_patched.modules.sdxl_layout import invert_key_map, unet_key_map
from ldm_patched.modules.sized_cache import SizedCache

# -- upstream constants (Fooocus 2.5: modules/flags.py, modules/config.py, async_worker, inpaint_worker)
OUTPAINT_DIRECTIONS = ("left", "right", "top", "bottom")
OUTPAINT_FRACTION = 0.3               # of the image's height (top/bottom) or width (left/right)
DEFAULT_STRENGTH = 1.0                # inpaint_strength (denoise); outpaint forces 1.0
DEFAULT_RESPECTIVE_FIELD = 0.618      # inpaint_respective_field; outpaint forces 1.0
DEFAULT_ENGINE = "v2.6"
PATCH_FILES = {"v1": "inpaint.fooocus.patch", "v2.5": "inpaint_v25.fooocus.patch",
               "v2.6": "inpaint_v26.fooocus.patch"}
HEAD_FILE = "fooocus_inpaint_head.pth"
MODEL_FOLDER = "inpaint"              # models/inpaint
PATCH_STRENGTH = 1.0
MASK_THRESHOLD = 127                  # a mask pixel above this is repainted
GENERATION_SIDE = 1024                # crops are generated at about this many pixels squared
BOX_MARGIN = 1.15                     # the crop box around the mask's bounding box
FEATHER_STEP, FEATHER_RINGS = 8, 32   # paste weight falls by 8 per pixel, gone after 32 px
FILL_SCHEDULE = ((512, 2), (256, 2), (128, 4), (64, 4), (33, 8), (15, 8), (5, 16), (3, 16))
PATCH_KEY_PREFIX = "diffusion_model."
HEAD_IN_CHANNELS = 5                  # 1 mask + 4 latent channels


class InpaintInputError(ValueError):
    """A request's inpaint input that cannot be used; `field` names the request field."""

    def __init__(self, field_name: str, reason: str) -> None:
        self.field, self.reason = field_name, reason
        super().__init__(f"{field_name}: {reason}")


class InpaintError(ValueError):
    """An inpaint model file that cannot be used; the message names the file and why."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        super().__init__(f"inpaint file {os.path.basename(path)}: {reason}")


# -- images and masks ----------------------------------------------------------------------

def as_rgb(image: Any) -> np.ndarray:
    """uint8 HxWx3 from a PIL image or an array (gray, RGB or RGBA)."""
    array = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise InpaintInputError("input_image", f"not an image (array of shape {array.shape})")
    return np.ascontiguousarray(array[..., :3].astype(np.uint8))


def _mask_values(mask: Any) -> np.ndarray:
    """One uint8 channel: alpha of a sketch (RGBA with any transparency), else the brightest
    channel, so a drawn stroke and an uploaded black/white mask both read as 'repaint'."""
    array = np.asarray(mask)
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    elif array.dtype.kind == "f":
        array = np.clip(array * (255.0 if array.max(initial=0) <= 1.0 else 1.0), 0, 255).astype(np.uint8)
    if array.ndim == 3 and array.shape[2] == 4 and (array[..., 3] < 255).any():
        return array[..., 3].astype(np.uint8)
    if array.ndim == 3 and array.shape[2] in (1, 3, 4):
        return array[..., :3].max(axis=2).astype(np.uint8)
    if array.ndim == 2:
        return array.astype(np.uint8)
    raise InpaintInputError("inpaint_mask", f"not a mask image (array of shape {array.shape})")


def mask_from_image(mask: Any, width: int, height: int) -> np.ndarray:
    """A drawn or uploaded mask as uint8 HxW of 0/255 at the image's size (resized, not refused)."""
    values = _mask_values(mask)
    if values.shape != (height, width):
        values = np.asarray(Image.fromarray(values).resize((width, height), Image.BILINEAR))
    return np.where(values > MASK_THRESHOLD, 255, 0).astype(np.uint8)


def erode_or_dilate(mask: np.ndarray, pixels: int) -> np.ndarray:
    """Upstream's "Mask Erode or Dilate": the white area grown (`pixels` > 0) or shrunk (< 0)
    by that many pixels, a 3x3 square step each (chessboard distance); done as one
    (2k+1)-wide max/min along each axis, the same square and cheaper than k passes."""
    k = int(pixels)
    if k == 0:
        return mask
    reduce = np.maximum if k > 0 else np.minimum
    out = np.asarray(mask)
    for axis in (0, 1):
        pad = [(0, 0)] * out.ndim
        pad[axis] = (abs(k), abs(k))
        padded = np.pad(out, pad, mode="edge")   # a replicated edge changes no max/min: edges are ignored
        length = out.shape[axis]
        out = reduce.reduce([np.take(padded, range(i, i + length), axis=axis) for i in range(2 * abs(k) + 1)])
    return np.ascontiguousarray(out)


def invert_mask(mask: np.ndarray) -> np.ndarray:
    """Upstream's "Invert Mask": repaint what the mask left, keep what it marked."""
    return (255 - np.asarray(mask, np.uint8)).astype(np.uint8)


def combine_masks(*masks: np.ndarray | None) -> np.ndarray:
    """Union of masks (a sketch and an uploaded mask): repaint where any says so."""
    present = [m for m in masks if m is not None]
    if not present:
        raise InpaintInputError("inpaint_mask", "no mask given")
    return np.maximum.reduce(present)


def require_mask(mask: np.ndarray) -> np.ndarray:
    """The mask, or InpaintInputError when nothing is marked for repaint."""
    if not (mask > MASK_THRESHOLD).any():
        raise InpaintInputError("inpaint_mask", "the mask is empty: draw or upload the area to repaint")
    return mask


def outpaint_canvas(image: np.ndarray, mask: np.ndarray | None,
                    directions: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Extend the canvas on each chosen side by 30 % (of the height for top/bottom, of the
    width for left/right) with edge pixels, the new strips marked 255 in the mask."""
    image = as_rgb(image)
    chosen = [str(d).strip().lower() for d in directions]
    unknown = [d for d in chosen if d not in OUTPAINT_DIRECTIONS]
    if unknown:
        raise InpaintInputError("outpaint_selections", f"unknown direction(s) {unknown}; "
                                f"choose from {[d.capitalize() for d in OUTPAINT_DIRECTIONS]}")
    height, width = image.shape[:2]
    mask = np.zeros((height, width), np.uint8) if mask is None else mask_from_image(mask, width, height)
    dy, dx = int(height * OUTPAINT_FRACTION), int(width * OUTPAINT_FRACTION)
    rows = (dy if "top" in chosen else 0, dy if "bottom" in chosen else 0)
    cols = (dx if "left" in chosen else 0, dx if "right" in chosen else 0)
    image = np.pad(image, (rows, cols, (0, 0)), mode="edge")
    mask = np.pad(mask, (rows, cols), mode="constant", constant_values=255)
    return np.ascontiguousarray(image), np.ascontiguousarray(mask)


def latent_mask(mask: np.ndarray | torch.Tensor, latent_h: int, latent_w: int) -> torch.Tensor:
    """(1, 1, h, w) float32 of 0/1 for core's blending: the pixel mask brought to 8x the latent
    size (bilinear, rounded), then max-pooled 8x8, so any repainted pixel repaints its cell."""
    values = torch.as_tensor(np.asarray(mask), dtype=torch.float32)
    if values.ndim == 3:
        values = values.amax(dim=-1)
    values = (values / 255.0)[None, None]
    values = torch.nn.functional.interpolate(values, size=(latent_h * 8, latent_w * 8), mode="bilinear").round()
    return torch.nn.functional.max_pool2d(values, 8).round()


def feather(mask: np.ndarray) -> np.ndarray:
    """Paste weights: 255 on the mask, 256 - 8*d at chessboard distance d outside it, 0 from
    32 px on; the ring hides the seam, and everything beyond it stays the original. Only the
    mask's bounding box plus the ring is filtered (a small mask on a large image is cheap)."""
    binary = mask > MASK_THRESHOLD
    soft = np.zeros(mask.shape, np.uint8)
    if not binary.any():
        return soft
    rows, cols = np.nonzero(binary)
    top, left = max(0, rows.min() - FEATHER_RINGS), max(0, cols.min() - FEATHER_RINGS)
    bottom, right = rows.max() + FEATHER_RINGS + 1, cols.max() + FEATHER_RINGS + 1
    current = Image.fromarray(np.where(binary[top:bottom, left:right], 255, 0).astype(np.uint8))
    region = np.asarray(current).astype(np.int32)
    for ring in range(1, FEATHER_RINGS):
        current = current.filter(ImageFilter.MaxFilter(3))
        region[(np.asarray(current) > 0) & (region == 0)] = 256 - FEATHER_STEP * ring
    soft[top:bottom, left:right] = region.clip(0, 255)
    return soft


def fill_masked(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Masked pixels replaced by their surroundings, blurred coarse to fine with the known
    pixels put back after each pass: a neutral start for a full-strength repaint."""
    known = mask <= MASK_THRESHOLD
    current = image.copy()
    for radius, repeats in FILL_SCHEDULE:
        for _ in range(repeats):
            current = np.array(Image.fromarray(current).filter(ImageFilter.BoxBlur(radius)))
            current[known] = image[known]
    return current


def _span(low: int, high: int, minimum: int, limit: int) -> tuple[int, int]:
    """[low, high) widened evenly to at least `minimum`, then slid and clipped into [0, limit)."""
    grow = max(0, minimum - (high - low))
    low, high = low - grow // 2, high + grow - grow // 2
    if low < 0:
        low, high = 0, high - low
    if high > limit:
        low, high = max(0, low - (high - limit)), limit
    return low, high


def crop_box(mask: np.ndarray, respective_field: float) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the area generated: a square around the mask with 15 %
    margin, grown to cover `respective_field` of each side (1.0: the whole image)."""
    height, width = mask.shape
    if not 0.0 <= respective_field <= 1.0:
        raise InpaintInputError("inpaint_respective_field", f"must be within 0..1, got {respective_field}")
    if respective_field >= 1.0:
        return 0, height, 0, width
    rows, cols = np.nonzero(mask > MASK_THRESHOLD)
    cy, cx = (rows.min() + rows.max()) // 2, (cols.min() + cols.max()) // 2
    half = int(max(rows.max() - rows.min(), cols.max() - cols.min()) // 2 * BOX_MARGIN)
    top, bottom = _span(int(cy) - half, int(cy) + half + 1, math.ceil(height * respective_field), height)
    left, right = _span(int(cx) - half, int(cx) + half + 1, math.ceil(width * respective_field), width)
    return top, bottom, left, right


def generation_size(height: int, width: int, side: int = GENERATION_SIDE) -> tuple[int, int]:
    """(height, width), multiples of 64, of about side x side pixels with the crop's aspect."""
    scale = side / math.sqrt(height * width)
    return (max(64, round(height * scale / 64) * 64), max(64, round(width * scale / 64) * 64))


def _resize(image: np.ndarray, height: int, width: int, resample=Image.LANCZOS) -> np.ndarray:
    if image.shape[:2] == (height, width):
        return image
    return np.asarray(Image.fromarray(image).resize((width, height), resample))


@dataclass
class InpaintJob:
    """One inpaint: the full image and mask, the crop box, and the crop as generated.

    `fill_pixels` (pre-filled crop) is what the initial latent encodes, `head_pixels`
    (masked area gray) what the head sees, `mask` the crop mask at generation size.
    """

    image: np.ndarray                   # full canvas, uint8 HxWx3
    full_mask: np.ndarray               # full canvas, 0/255
    soft_mask: np.ndarray               # paste weights, 0..255
    box: tuple[int, int, int, int]      # top, bottom, left, right
    crop: np.ndarray                    # the box's pixels at generation size
    mask: np.ndarray                    # the box's mask at generation size, 0/255
    fill_pixels: np.ndarray
    strength: float = DEFAULT_STRENGTH

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) to generate at."""
        return self.crop.shape[0], self.crop.shape[1]

    @property
    def head_pixels(self) -> np.ndarray:
        """The crop with the masked area mid-gray: what upstream encodes for the head."""
        gray = self.crop.astype(np.float32)
        gray[self.mask > MASK_THRESHOLD] = 127.5
        return gray.round().astype(np.uint8)

    def paste(self, generated: np.ndarray) -> np.ndarray:
        """The full image with the generated crop blended in through the feathered mask;
        pixels with weight 0 are the input's, bit for bit."""
        top, bottom, left, right = self.box
        canvas = self.image.copy()
        canvas[top:bottom, left:right] = _resize(as_rgb(generated), bottom - top, right - left)
        weight = self.soft_mask[..., None].astype(np.float32) / 255.0
        blended = canvas.astype(np.float32) * weight + self.image.astype(np.float32) * (1.0 - weight)
        blended = blended.round().clip(0, 255).astype(np.uint8)
        return np.where(self.soft_mask[..., None] > 0, blended, self.image)


def prepare(image: Any, mask: np.ndarray, respective_field: float = DEFAULT_RESPECTIVE_FIELD,
            strength: float = DEFAULT_STRENGTH, outpaint: bool = False, use_fill: bool | None = None,
            side: int = GENERATION_SIDE) -> InpaintJob:
    """An `InpaintJob` for `image` and its mask (0/255, the image's size). Outpaint repaints
    the whole canvas at full strength; the pre-fill is used for (near) full strength."""
    image = as_rgb(image)
    mask = require_mask(mask_from_image(mask, image.shape[1], image.shape[0]))
    if outpaint:
        respective_field, strength = 1.0, 1.0
    if not 0.0 < strength <= 1.0:
        raise InpaintInputError("inpaint_strength", f"must be within (0, 1], got {strength}")
    top, bottom, left, right = crop_box(mask, respective_field)
    height, width = generation_size(bottom - top, right - left, side)
    crop = _resize(image[top:bottom, left:right], height, width)
    crop_mask = mask_from_image(mask[top:bottom, left:right], width, height)
    fill = fill_masked(crop, crop_mask) if (strength > 0.99 if use_fill is None else use_fill) else crop
    return InpaintJob(image=image, full_mask=mask, soft_mask=feather(mask), box=(top, bottom, left, right),
                      crop=crop, mask=crop_mask, fill_pixels=fill, strength=strength)


# -- model files -----------------------------------------------------------------------------

def _looks_like_safetensors(head: bytes, size: int) -> bool:
    if len(head) < 9:
        return False
    (length,) = struct.unpack("<Q", head[:8])
    return 0 < length <= size - 8 and head[8:9] == b"{"


def _load_torch_file(path: str) -> tuple[FileVersion, Any]:
    """A torch pickle read into private memory (no mmap), with the version read; refused if
    it changed while read. Only tensors and containers are unpickled (weights_only)."""
    try:
        version, raw = read_file(path)
    except FileReadError as error:
        raise InpaintError(path, error.reason) from error
    except OSError as error:
        raise InpaintError(path, f"cannot be read: {error.strerror or error}") from error
    if _looks_like_safetensors(raw[:16], version.size):
        raise InpaintError(path, "is a safetensors file (a LoRA or a checkpoint?), "
                                 "not a Fooocus inpaint file (a torch pickle)")
    try:
        data = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as error:   # unpickling errors have many types
        raise InpaintError(path, f"is not a readable PyTorch file ({type(error).__name__})") from None
    return version, data


def _scalar(value: Any) -> float | None:
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.is_floating_point():
        return float(value.reshape(()))
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


@dataclass
class ParsedPatch:
    """A `.fooocus.patch` file in memory: key -> (uint8 diff, min, max)."""

    version: FileVersion
    entries: dict[str, tuple[torch.Tensor, float, float]]

    def nbytes(self) -> int:
        return sum(q.numel() for q, _, _ in self.entries.values())


def parse_patch(path: str, data: Any, version: FileVersion) -> ParsedPatch:
    """Check the unpickled object is Fooocus's layout and keep it as `ParsedPatch`."""
    if not isinstance(data, dict) or not data:
        raise InpaintError(path, f"holds {type(data).__name__}, not a dict of weight diffs")
    entries = {}
    for key, value in data.items():
        if isinstance(value, torch.Tensor):
            raise InpaintError(path, f"holds plain tensors (e.g. {key!r}): a LoRA or a checkpoint, "
                                     f"not Fooocus's (uint8 diff, min, max) triples")
        if not isinstance(value, (tuple, list)) or len(value) != 3:
            raise InpaintError(path, f"entry {key!r} is not a (uint8 diff, min, max) triple")
        quantized, low, high = value[0], _scalar(value[1]), _scalar(value[2])
        if not isinstance(quantized, torch.Tensor) or quantized.dtype != torch.uint8 or low is None or high is None:
            raise InpaintError(path, f"entry {key!r} is not a (uint8 diff, min, max) triple")
        entries[str(key)] = (quantized, low, high)
    return ParsedPatch(version, entries)


def read_patch_file(path: str) -> ParsedPatch:
    version, data = _load_torch_file(path)
    return parse_patch(path, data, version)


def patch_weights(parsed: ParsedPatch, unet: torch.nn.Module) -> dict[str, QuantizedDiff]:
    """{UNet parameter name: QuantizedDiff} for `ModelPatcher.add_patches`. The file's keys
    are original-layout names under `diffusion_model.`; sdxl_layout's map resolves them.
    Any key that names no parameter of this UNet, or has another shape, refuses the file."""
    params = dict(unet.named_parameters())
    ours = invert_key_map(unet_key_map(dict(unet.config), keys=list(params)))
    path = parsed.version.path
    patches, unknown, misshaped = {}, [], []
    for key, (quantized, low, high) in parsed.entries.items():
        name = ours.get(key[len(PATCH_KEY_PREFIX):]) if key.startswith(PATCH_KEY_PREFIX) else None
        if name is None:
            unknown.append(key)
        elif tuple(params[name].shape) != tuple(quantized.shape):
            misshaped.append(f"{key} {tuple(quantized.shape)} vs {tuple(params[name].shape)}")
        else:
            patches[name] = QuantizedDiff(parsed.version, key, quantized, low, high)
    if unknown:
        raise InpaintError(path, f"{len(unknown)} of {len(parsed.entries)} keys name no weight of this UNet "
                                 f"(e.g. {unknown[:3]}): a patch for another model?")
    if misshaped:
        raise InpaintError(path, f"{len(misshaped)} weights have another shape than this UNet's "
                                 f"(e.g. {misshaped[:2]}): a patch for another model?")
    return patches


class InpaintHead(torch.nn.Module):
    """Fooocus's inpaint head: [mask, latent] (5 channels) -> the UNet's first-conv width,
    a bias-free 3x3 conv over replicate-padded input."""

    def __init__(self, out_channels: int = 320) -> None:
        super().__init__()
        self.head = torch.nn.Parameter(torch.zeros(out_channels, HEAD_IN_CHANNELS, 3, 3))

    def forward(self, feed: torch.Tensor) -> torch.Tensor:
        padded = torch.nn.functional.pad(feed, (1, 1, 1, 1), mode="replicate")
        return torch.nn.functional.conv2d(padded, self.head)


def read_head_file(path: str) -> tuple[FileVersion, InpaintHead]:
    version, data = _load_torch_file(path)
    weight = data.get("head") if isinstance(data, dict) else None
    if not isinstance(weight, torch.Tensor) or len(data) != 1:
        keys = list(data)[:3] if isinstance(data, dict) else type(data).__name__
        raise InpaintError(path, f"is not a Fooocus inpaint head (want one tensor 'head', found {keys})")
    if weight.ndim != 4 or tuple(weight.shape[1:]) != (HEAD_IN_CHANNELS, 3, 3) or not weight.is_floating_point():
        raise InpaintError(path, f"'head' has shape {tuple(weight.shape)}, want [channels, 5, 3, 3]")
    head = InpaintHead(weight.shape[0])
    head.head.data = weight.to(torch.float32)
    return version, head


@dataclass
class _CachedPatch:
    parsed: ParsedPatch
    per_unet: "weakref.WeakKeyDictionary[torch.nn.Module, dict[str, QuantizedDiff]]" = field(
        default_factory=weakref.WeakKeyDictionary)


class InpaintModels:
    """Parsed patch files and head patchers, one per path, keyed by file version: a new
    version of a path replaces the old at once. Patch objects are kept per UNet so that
    device copies they cache survive between requests."""

    def __init__(self) -> None:
        self._patches: SizedCache[str, _CachedPatch] = SizedCache(lambda cached: cached.parsed.nbytes())
        self._heads: dict[str, tuple[FileVersion, ModelPatcher]] = {}

    @staticmethod
    def _version(path: str) -> FileVersion:
        try:
            return FileVersion.of(path)
        except FileReadError as error:
            raise InpaintError(path, error.reason) from error

    def patches(self, path: str, unet: torch.nn.Module) -> dict[str, QuantizedDiff]:
        """{parameter name: patch} of the patch file at `path` for `unet` (a module)."""
        key = os.path.abspath(path)
        cached = self._patches.get(key)
        if cached is None or cached.parsed.version != self._version(key):
            cached = self._patches[key] = _CachedPatch(read_patch_file(key))
        found = cached.per_unet.get(unet)
        if found is None:
            found = cached.per_unet[unet] = patch_weights(cached.parsed, unet)
        return found

    def head(self, path: str) -> ModelPatcher:
        """The head at `path` as a model kind the registry manages ("<file>:inpaint_head")."""
        key = os.path.abspath(path)
        cached = self._heads.get(key)
        if cached is not None and cached[0] == self._version(key):
            return cached[1]
        if cached is not None:
            model_management.get_manager().forget(cached[1].model)
        version, module = read_head_file(key)
        manager = model_management.get_manager()
        patcher = ModelPatcher(module, manager.device, manager.offload_device(),
                               name=f"{version.name}:inpaint_head")
        self._heads[key] = (version, patcher)
        return patcher

    def nbytes(self) -> int:
        return self._patches.nbytes()


# -- the head's hook on the UNet ---------------------------------------------------------------

class HeadHook:
    """Forward hook on the UNet's conv_in: adds `feature` while one is set, else returns
    None (the output untouched, bit for bit). Installed once per UNet."""

    ATTRIBUTE = "_fooocus_inpaint_head_hook"

    def __init__(self) -> None:
        self.feature: torch.Tensor | None = None

    def __call__(self, module: torch.nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor | None:
        if self.feature is None:
            return None
        return output + self.feature.to(output)


def _module(model: Any) -> torch.nn.Module:
    return model.model if isinstance(model, ModelPatcher) else model


def install_head_hook(unet: Any) -> HeadHook:
    conv = _module(unet).conv_in
    hook = getattr(conv, HeadHook.ATTRIBUTE, None)
    if hook is None:
        hook = HeadHook()
        conv.register_forward_hook(hook)
        setattr(conv, HeadHook.ATTRIBUTE, hook)
    return hook


def head_feature(head: ModelPatcher, latent: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The head's output for a UNet-space latent (VAE latent times scaling factor) and its
    latent mask, computed on the head's current device."""
    weight = head.model.head
    feed = torch.cat([mask.to(latent), latent], dim=1).to(weight.device, weight.dtype)
    with torch.no_grad():
        return head.model(feed)


@contextlib.contextmanager
def head_applied(unet: Any, head: ModelPatcher, latent: torch.Tensor, mask: torch.Tensor,
                 load_with: Sequence[ModelPatcher] = ()) -> Iterator[torch.Tensor]:
    """Within the block the UNet's conv_in output gets the head's feature added; outside it
    the UNet is untouched. The head is loaded through the registry together with
    `load_with` (pass the UNet patcher so a conservative load does not evict it)."""
    model_management.load_models_gpu([*load_with, head])
    feature = head_feature(head, latent, mask)
    hook = install_head_hook(unet)
    hook.feature = feature
    try:
        yield feature
    finally:
        hook.feature = None
