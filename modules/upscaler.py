"""The upscaler model kind, and Fooocus's Vary / Upscale plans.

An ESRGAN-family file (Fooocus ships `fooocus_upscaler_s409985e5.bin`, a 4x RRDBNet,
in `models/upscale_models`) is built with spandrel and wrapped in a `ModelPatcher`, so
it is one more model in the registry: the same budget, the same eviction, the same
`/model_status` as the UNet and VAE, never a side cache on the GPU.

Files are read into private memory (never a map of the file) and cached per
`FileVersion`: a rewritten file is a new version and replaces the old one.

`uov_plan` turns upstream's `uov_method` strings into sizes and a denoise; the
request pipeline runs `upscale`, resizes with Lanczos, then (when the plan says so)
`core.encode` + `core.sample(init_latents=..., denoise=plan.denoise)`.
"""

from __future__ import annotations

import enum
import importlib.machinery
import io
import math
import os
import pickle
import sys
import types
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import torch

from ldm_patched.modules import model_management
from ldm_patched.modules.file_version import FileReadError, FileVersion, read_file, read_safetensors
from ldm_patched.modules.model_patcher import ModelPatcher
from modules import tiling

DEFAULT_UPSCALER = "fooocus_upscaler_s409985e5.bin"
DEFAULT_UPSCALER_URL = "https://huggingface.co/lllyasviel/misc/resolve/main/fooocus_upscaler_s409985e5.bin"
EXTENSIONS = (".pth", ".bin", ".pt", ".safetensors")


class UpscalerError(ValueError):
    """A file that cannot be used as an upscaler; the message names the file and what it holds."""


# -- spandrel without a working torchvision --------------------------------------------

class _PlaceholderInterpolationMode(enum.Enum):
    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


def _unavailable(name: str, reason: str):
    def call(*args, **kwargs):
        raise RuntimeError(f"torchvision.transforms.functional.{name} is not available here ({reason}); "
                           f"only the LaMa and RestoreFormer architectures need it, and upscaling does not")
    call.__name__ = name
    return call


def _placeholder_module(name: str) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
    module.__path__ = []   # a package, so `import torchvision.transforms.functional` resolves
    module.__fooocus_placeholder__ = True
    return module


_PLACEHOLDER_NAMES = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional")


def install_torchvision_placeholder() -> bool:
    """Make `from torchvision.transforms.functional import ...` work where torchvision
    cannot be imported; True when a placeholder was installed (see import_spandrel).

    spandrel imports `torchvision.transforms.functional` at import time for two
    architectures (LaMa, RestoreFormer) that are never used to upscale. The PyPI
    torchvision wheel does not load beside a CPU-only torch wheel ("operator
    torchvision::nms does not exist"), which would make every upscaler unusable. A
    real, working torchvision (CUDA installs) is left untouched; otherwise the half
    imported `torchvision*` modules are removed and a placeholder offering only the
    three names spandrel imports is installed; calling any of them raises."""
    try:
        import torchvision.transforms.functional  # noqa: F401
        return False
    except Exception as error:   # RuntimeError from the operator registry, ImportError, OSError...
        reason = f"{type(error).__name__}: {error}"
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
        del sys.modules[name]
    root, transforms, functional = (_placeholder_module(n) for n in _PLACEHOLDER_NAMES)
    functional.InterpolationMode = _PlaceholderInterpolationMode
    functional.rotate = _unavailable("rotate", reason)
    functional.normalize = _unavailable("normalize", reason)
    root.transforms, transforms.functional = transforms, functional
    sys.modules.update(zip(_PLACEHOLDER_NAMES, (root, transforms, functional)))
    return True


def _remove_torchvision_placeholder() -> None:
    for name in _PLACEHOLDER_NAMES:
        if getattr(sys.modules.get(name), "__fooocus_placeholder__", False):
            del sys.modules[name]


def import_spandrel():
    """`import spandrel`, with the torchvision placeholder only while spandrel imports:
    its two modules keep the placeholder names, and nothing else in the process (e.g.
    transformers, which probes torchvision for its image processors) ever sees it."""
    if "spandrel" in sys.modules:
        return sys.modules["spandrel"]
    installed = install_torchvision_placeholder()
    try:
        import spandrel
    finally:
        if installed:
            _remove_torchvision_placeholder()
    return spandrel


def _spandrel():
    return import_spandrel()


# -- reading a file -----------------------------------------------------------------

def _pickled_state_dict(path: str) -> tuple[FileVersion, dict]:
    file, data = read_file(path)
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, AttributeError,
            IndexError, KeyError, UnicodeDecodeError, OSError) as error:
        raise UpscalerError(f"upscaler file {file.name} is not a readable PyTorch weights file "
                            f"({type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''})"
                            ) from None
    if not isinstance(state, dict):
        raise UpscalerError(f"upscaler file {file.name} holds a {type(state).__name__}, not a state dict")
    return file, state


def read_state_dict(path: str) -> tuple[FileVersion, dict[str, torch.Tensor]]:
    """(version, tensors) of an upscaler file, with Fooocus's key renaming applied: its
    upscaler names the dense blocks `residual_block_N` where ESRGAN files say `RDBN`."""
    name = os.path.basename(path)
    if not path.lower().endswith(EXTENSIONS):
        raise UpscalerError(f"upscaler file {name}: unsupported extension (expected one of {', '.join(EXTENSIONS)})")
    try:
        if path.lower().endswith(".safetensors"):
            file, state, _ = read_safetensors(path)
        else:
            file, state = _pickled_state_dict(path)
    except FileReadError as error:
        raise UpscalerError(f"upscaler file {name} cannot be read: {error.reason}") from error
    except OSError as error:
        raise UpscalerError(f"upscaler file {name} cannot be read: {error.strerror or error}") from error
    state = _spandrel().canonicalize_state_dict(state)
    return file, OrderedDict((str(k).replace("residual_block_", "RDB"), v) for k, v in state.items())


# -- the model ---------------------------------------------------------------------

class UpscalerModule(torch.nn.Module):
    """The network with what running it needs: scale, architecture, and the size
    multiple its input must have (pixel-unshuffle variants need 4)."""

    def __init__(self, net: torch.nn.Module, scale: int, architecture: str, multiple_of: int) -> None:
        super().__init__()
        self.net = net
        self.scale = scale
        self.architecture = architecture
        self.multiple_of = multiple_of

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.net(image)


def _describe(state: dict) -> str:
    keys = list(state)
    return f"{len(keys)} keys, e.g. {', '.join(keys[:3]) or 'none'}"


def build_module(name: str, state: dict[str, torch.Tensor]) -> UpscalerModule:
    """The upscaling network of a state dict; UpscalerError (naming `name`) otherwise."""
    spandrel = _spandrel()
    try:
        descriptor = spandrel.ModelLoader().load_from_state_dict(state)
    except spandrel.UnsupportedModelError:
        raise UpscalerError(f"upscaler file {name} is not an image upscaler: no known architecture matches "
                            f"its weights ({_describe(state)})") from None
    except Exception as error:   # a matching architecture whose tensors do not fit it
        raise UpscalerError(f"upscaler file {name}: weights do not fit the detected architecture "
                            f"({type(error).__name__}: {error})") from None
    arch = descriptor.architecture.id
    if not isinstance(descriptor, spandrel.ImageModelDescriptor) or descriptor.scale < 2:
        raise UpscalerError(f"upscaler file {name} holds a {arch} model ({descriptor.purpose}, scale "
                            f"{descriptor.scale}), not an image upscaler")
    descriptor.model.eval()
    return UpscalerModule(descriptor.model, descriptor.scale, arch, descriptor.size_requirements.multiple_of)


def load_upscaler(path: str) -> tuple[FileVersion, ModelPatcher]:
    """Read and build an upscaler file as a patcher named `<file>:upscaler`."""
    file, state = read_state_dict(path)
    module = build_module(file.name, state)
    module.requires_grad_(False)
    manager = model_management.get_manager()
    return file, ModelPatcher(module, manager.device, manager.offload_device(), name=f"{file.name}:upscaler")


class UpscalerCache:
    """Loaded upscalers by file version. A new version of a path replaces the old one
    (which is dropped from the registry); an unchanged file is never read again."""

    def __init__(self) -> None:
        self._loaded: dict[FileVersion, ModelPatcher] = {}

    def get(self, path: str) -> ModelPatcher:
        file = FileVersion.of(os.path.abspath(path))
        patcher = self._loaded.get(file)
        if patcher is None:
            file, patcher = load_upscaler(file.path)
            for old in [v for v in self._loaded if v.same_path(file)]:
                self._drop(old)
            self._loaded[file] = patcher
        return patcher

    def _drop(self, file: FileVersion) -> None:
        patcher = self._loaded.pop(file)
        model_management.get_manager().forget(patcher.model)

    def clear(self) -> None:
        for file in list(self._loaded):
            self._drop(file)

    def versions(self) -> list[FileVersion]:
        return list(self._loaded)

    def __len__(self) -> int:
        return len(self._loaded)


# -- running it in tiles ------------------------------------------------------------

UPSCALE_TILE, UPSCALE_OVERLAP = 512, 32   # input pixels; the working memory is one tile's


def _run(module: UpscalerModule, tile: torch.Tensor, device, dtype) -> torch.Tensor:
    """One tile [1,3,h,w] in 0..1 through the network, padded (replicate) to its size multiple."""
    h, w = tile.shape[-2:]
    m = module.multiple_of
    pad_h, pad_w = (-h) % m, (-w) % m
    if pad_h or pad_w:
        tile = torch.nn.functional.pad(tile, (0, pad_w, 0, pad_h), mode="replicate")
    out = module(tile.to(device, dtype)).float().cpu()
    return out[..., :h * module.scale, :w * module.scale]


def upscale_tensor(patcher: ModelPatcher, image: torch.Tensor, tile: int | None = None,
                   overlap: int | None = None, interrupt: Callable[[], None] | None = None) -> torch.Tensor:
    """[1,3,H,W] float 0..1 -> [1,3,sH,sW] float, in overlapping tiles (default UPSCALE_TILE,
    UPSCALE_OVERLAP) blended by weight, so large images fit the budgeted working memory;
    `interrupt` runs before each tile (a Stop takes effect between two tiles)."""
    tile = UPSCALE_TILE if tile is None else tile
    overlap = UPSCALE_OVERLAP if overlap is None else overlap
    if overlap < 0 or tile <= overlap:
        raise ValueError(f"tile ({tile}) must be larger than overlap ({overlap}) >= 0")
    module: UpscalerModule = patcher.model  # type: ignore[assignment]
    _, _, height, width = image.shape
    dtype = patcher.model_dtype()
    model_management.load_models_gpu([patcher], model_management.working_memory_bytes(
        "upscaler", min(tile, width), min(tile, height), 1, dtype))
    with torch.inference_mode():
        return tiling.run_tiled(lambda part: _run(module, part, patcher.load_device, dtype), image, tile, overlap,
                                Fraction(module.scale), interrupt)


def upscale(patcher: ModelPatcher, pixels: np.ndarray, tile: int | None = None, overlap: int | None = None,
            interrupt: Callable[[], None] | None = None) -> np.ndarray:
    """HxWx3 uint8 -> (scale*H)x(scale*W)x3 uint8 through the upscaler."""
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8:
        raise ValueError(f"upscale expects an HxWx3 uint8 image, got {pixels.dtype} {pixels.shape}")
    image = torch.from_numpy(np.array(pixels)).permute(2, 0, 1)[None].float() / 255.0
    out = upscale_tensor(patcher, image, tile, overlap, interrupt)
    return (out[0].clamp(0, 1).permute(1, 2, 0) * 255.0).round().to(torch.uint8).numpy()


# -- Vary / Upscale plans ------------------------------------------------------------

# upstream modules/flags.py: the uov_method strings of the UI and API
from modules.flags import (UOV_DISABLED as DISABLED, UOV_METHODS, UPSCALE_15, UPSCALE_2,  # noqa: E402
                           UPSCALE_FAST, VARY_STRONG, VARY_SUBTLE)

# upstream modules/async_worker.py (apply_vary / apply_upscale)
VARY_DENOISE = {VARY_SUBTLE: 0.5, VARY_STRONG: 0.85}
UPSCALE_DENOISE = 0.382
UPSCALE_FACTOR = {UPSCALE_15: 1.5, UPSCALE_2: 2.0, UPSCALE_FAST: 2.0}
VARY_MIN_SIDE, VARY_MAX_SIDE = 1024, 2048   # the image's "shape ceil" is clamped to this
UPSCALE_MIN_SIDE = 1024                      # smaller results are enlarged to this shape ceil
UPSCALE_MAX_DIFFUSE_SIDE = 2800              # larger ones are returned without diffusion
LATENT_MULTIPLE = 8                          # the VAE crops to this before encoding


def shape_ceil(width: float, height: float) -> float:
    """Upstream's size measure: sqrt(W*H) rounded up to a multiple of 64."""
    return math.ceil(math.sqrt(width * height) / 64.0) * 64.0


def size_for_shape_ceil(width: int, height: int, ceil: float) -> tuple[int, int]:
    """(width, height) scaled by multiples of 64 until their shape ceil is `ceil`,
    as upstream's set_image_shape_ceil does; unchanged when it already is."""
    w, h = width, height
    for _ in range(256):
        now = shape_ceil(w, h)
        if abs(now - ceil) < 0.1:
            break
        k = ceil / now
        w, h = int(round(w * k / 64.0) * 64), int(round(h * k / 64.0) * 64)
    return w, h


@dataclass(frozen=True)
class UovPlan:
    """What a uov_method does to an input image of a given size.

    upscale: run the upscaler model first; scale: the requested factor of the input
    size; target: (width, height) the image is Lanczos-resized to; diffuse: run
    img2img on it with `denoise`; latent_size: (width, height) the diffusion works at
    (target cropped to a multiple of 8 by the VAE encode)."""

    method: str
    upscale: bool
    scale: float
    denoise: float
    diffuse: bool
    target: tuple[int, int]

    @property
    def latent_size(self) -> tuple[int, int]:
        return tuple(v // LATENT_MULTIPLE * LATENT_MULTIPLE for v in self.target)  # type: ignore[return-value]


def uov_plan(method: str, width: int, height: int, model_scale: int = 4, side: int = VARY_MIN_SIDE) -> UovPlan:
    """The plan for `method` on a width x height input (upstream's exact strings).
    `model_scale`: the upscaler's factor (4 for Fooocus's), which sizes small results.
    `side`: the size SDXL works best at (upstream's 1024): Vary's shape ceil is clamped
    to [side, 2 side] and smaller Upscale results are enlarged to it."""
    if method not in UOV_METHODS:
        raise ValueError(f"uov_method {method!r} is not one of: {', '.join(UOV_METHODS)}")
    if method == DISABLED:
        return UovPlan(method, False, 1.0, 1.0, False, (width, height))
    if method in VARY_DENOISE:
        ceil = min(max(shape_ceil(width, height), side), side * VARY_MAX_SIDE // VARY_MIN_SIDE)
        return UovPlan(method, False, 1.0, VARY_DENOISE[method], True, size_for_shape_ceil(width, height, ceil))
    f = UPSCALE_FACTOR[method]
    ceil = shape_ceil(width * f, height * f)
    if ceil < side:   # sized from the upscaled (4x) image, as upstream
        target = size_for_shape_ceil(width * model_scale, height * model_scale, side)
        ceil = side
    else:
        target = (int(width * f), int(height * f))
    diffuse = method != UPSCALE_FAST and ceil <= UPSCALE_MAX_DIFFUSE_SIDE
    return UovPlan(method, True, f, UPSCALE_DENOISE, diffuse, target)


def resize_lanczos(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """HxWx3 uint8 resized to (width, height) with PIL's Lanczos, as upstream resamples."""
    from PIL import Image

    if (pixels.shape[1], pixels.shape[0]) == tuple(size):
        return pixels
    return np.asarray(Image.fromarray(pixels).resize(size, resample=Image.Resampling.LANCZOS))


def prepare_image(plan: UovPlan, pixels: np.ndarray, upscaler: ModelPatcher | None,
                  interrupt: Callable[[], None] | None = None) -> np.ndarray:
    """The image a plan hands to the VAE (or returns, when it does not diffuse)."""
    if plan.upscale:
        if upscaler is None:
            raise ValueError(f"uov_method {plan.method!r} needs an upscaler model")
        pixels = upscale(upscaler, pixels, interrupt=interrupt)
    return resize_lanczos(pixels, plan.target)
