"""Names and constants shared by the UI, the API and the pipeline.

Everything here is plain data: performance modes, sampler/scheduler names,
aspect ratios. Which samplers and schedulers actually work is decided by the
sampling code (modules/core.py); this module only fixes the vocabulary so that
requests written for upstream Fooocus use the same strings here.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from enum import Enum

# The string Fooocus uses for "no model selected" (refiner, LoRA slots).
NONE_NAME = "None"
DEFAULT_VAE = "Default (model)"   # upstream's name for "the checkpoint's own VAE"


class Performance(str, Enum):
    """The five performance modes, valued by the exact strings the API accepts."""

    QUALITY = "Quality"
    SPEED = "Speed"
    EXTREME_SPEED = "Extreme Speed"
    LIGHTNING = "Lightning"
    HYPER_SD = "Hyper-SD"

    def __str__(self) -> str:  # str(Performance.SPEED) == "Speed", as in the API
        return self.value

    @classmethod
    def values(cls) -> list[str]:
        return [m.value for m in cls]


@dataclass(frozen=True)
class PerformanceLora:
    """A distillation LoRA that a fast mode adds on top of the user's LoRAs."""

    file_name: str
    weight: float
    # Where upstream downloads it from; only used when downloads are allowed.
    url: str


@dataclass(frozen=True)
class PerformanceSettings:
    """What a performance mode fixes for one request.

    ``None`` in sampler/scheduler/cfg_scale means "keep the request's (or the
    config's) own value"; the distilled modes pin all three because their LoRAs
    only produce sane images with those settings.
    """

    performance: Performance
    steps: int
    lora: PerformanceLora | None
    sampler: str | None
    scheduler: str | None
    cfg_scale: float | None
    refiner_enabled: bool
    # Upstream also zeroes its "sharpness" filter in the distilled modes.
    sharpness: float | None

    @property
    def is_distilled(self) -> bool:
        return self.lora is not None


# Download sources used by upstream Fooocus 2.5. From memory: the LCM LoRA is
# hosted under lllyasviel/misc, the Lightning and Hyper-SD LoRAs under
# mashb1t/misc (the 2.5 maintainer's mirror).
_HF = "https://huggingface.co"
LCM_LORA = PerformanceLora(
    "sdxl_lcm_lora.safetensors", 1.0,
    f"{_HF}/lllyasviel/misc/resolve/main/sdxl_lcm_lora.safetensors",
)
LIGHTNING_LORA = PerformanceLora(
    "sdxl_lightning_4step_lora.safetensors", 1.0,
    f"{_HF}/mashb1t/misc/resolve/main/sdxl_lightning_4step_lora.safetensors",
)
HYPER_SD_LORA = PerformanceLora(
    "sdxl_hyper_sd_4step_lora.safetensors", 0.8,
    f"{_HF}/mashb1t/misc/resolve/main/sdxl_hyper_sd_4step_lora.safetensors",
)

# Values follow upstream 2.5 (modules/flags.py steps, async_worker's
# set_lcm/lightning/hyper_sd defaults). In all three distilled modes upstream
# also forces cfg 1.0, adaptive cfg 1.0, refiner off and sharpness 0.
_SETTINGS: dict[Performance, PerformanceSettings] = {
    Performance.QUALITY: PerformanceSettings(
        Performance.QUALITY, 60, None, None, None, None, True, None),
    Performance.SPEED: PerformanceSettings(
        Performance.SPEED, 30, None, None, None, None, True, None),
    Performance.EXTREME_SPEED: PerformanceSettings(
        Performance.EXTREME_SPEED, 8, LCM_LORA, "lcm", "lcm", 1.0, False, 0.0),
    Performance.LIGHTNING: PerformanceSettings(
        Performance.LIGHTNING, 4, LIGHTNING_LORA, "euler", "sgm_uniform", 1.0, False, 0.0),
    Performance.HYPER_SD: PerformanceSettings(
        Performance.HYPER_SD, 4, HYPER_SD_LORA, "dpmpp_sde_gpu", "karras", 1.0, False, 0.0),
}

PERFORMANCE_LORA_FILES: tuple[str, ...] = tuple(
    s.lora.file_name for s in _SETTINGS.values() if s.lora is not None
)


def parse_performance(name: str | Performance) -> Performance:
    """Map an API/config string to a Performance (case and spacing tolerant).

    Raises ValueError naming the mode and the valid ones.
    """
    if isinstance(name, Performance):
        return name
    wanted = " ".join(str(name).split()).casefold()
    for mode in Performance:
        if mode.value.casefold() == wanted:
            return mode
    raise ValueError(
        f"unknown performance mode {name!r}; valid modes: "
        + ", ".join(repr(v) for v in Performance.values())
    )


def performance_settings(name: str | Performance) -> PerformanceSettings:
    """Settings that the given performance mode imposes on a request."""
    return _SETTINGS[parse_performance(name)]


# Sampler names as Fooocus spells them (ComfyUI's k-diffusion set plus the
# non-k-diffusion ones). These are identifiers only; support is up to core.py.
KSAMPLER_NAMES: tuple[str, ...] = (
    "euler", "euler_ancestral", "heun", "heunpp2", "dpm_2", "dpm_2_ancestral",
    "lms", "dpm_fast", "dpm_adaptive", "dpmpp_2s_ancestral", "dpmpp_sde",
    "dpmpp_sde_gpu", "dpmpp_2m", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu",
    "dpmpp_3m_sde", "dpmpp_3m_sde_gpu", "ddpm", "lcm", "tcd", "restart",
)
SAMPLER_EXTRA_NAMES: tuple[str, ...] = ("ddim", "uni_pc", "uni_pc_bh2")
SAMPLER_NAMES: tuple[str, ...] = KSAMPLER_NAMES + SAMPLER_EXTRA_NAMES

SCHEDULER_NAMES: tuple[str, ...] = (
    "normal", "karras", "exponential", "sgm_uniform", "simple", "ddim_uniform",
    "lcm", "turbo", "align_your_steps", "tcd", "edm_playground_v2.5",
)

# The names AUTOMATIC1111 (and Civitai) give our samplers, as upstream's metadata writes them
# ("" where it has none); with the karras scheduler " Karras" is appended except for these.
A1111_SAMPLER_NAMES: dict[str, str] = {
    "euler": "Euler", "euler_ancestral": "Euler a", "heun": "Heun", "heunpp2": "", "dpm_2": "DPM2",
    "dpm_2_ancestral": "DPM2 a", "lms": "LMS", "dpm_fast": "DPM fast", "dpm_adaptive": "DPM adaptive",
    "dpmpp_2s_ancestral": "DPM++ 2S a", "dpmpp_sde": "DPM++ SDE", "dpmpp_sde_gpu": "DPM++ SDE",
    "dpmpp_2m": "DPM++ 2M", "dpmpp_2m_sde": "DPM++ 2M SDE", "dpmpp_2m_sde_gpu": "DPM++ 2M SDE",
    "dpmpp_3m_sde": "", "dpmpp_3m_sde_gpu": "", "ddpm": "", "lcm": "LCM", "tcd": "TCD", "restart": "Restart",
    "ddim": "DDIM", "uni_pc": "UniPC", "uni_pc_bh2": "",
}
A1111_NO_KARRAS: tuple[str, ...] = ("euler", "euler_ancestral", "heun", "dpm_fast", "dpm_adaptive", "ddim",
                                    "uni_pc")


def a1111_sampler(sampler: str, scheduler: str) -> str:
    """The A1111 name of a sampler/scheduler pair ("DPM++ 2M SDE Karras"); ours when it has none."""
    name = A1111_SAMPLER_NAMES.get(sampler) or sampler
    if name != sampler and scheduler == "karras" and sampler not in A1111_NO_KARRAS:
        name += " Karras"
    return name


def sampler_from_a1111(name: str) -> tuple[str, str | None]:
    """(sampler, scheduler or None) for an A1111 sampler name; "DPM++ 2M Karras" gives the
    karras scheduler. The first of our names with that A1111 name wins (as upstream reads it).
    Raises ValueError for a name we do not know."""
    text = name.strip()
    scheduler = None
    if text.endswith(" Karras"):
        text, scheduler = text[: -len(" Karras")], "karras"
    if text in SAMPLER_NAMES:
        return text, scheduler
    for ours, theirs in A1111_SAMPLER_NAMES.items():
        if theirs and theirs.casefold() == text.casefold():
            return ours, scheduler
    raise ValueError(f"unknown sampler {name!r}")


METADATA_SCHEMES: tuple[str, ...] = ("fooocus", "a1111")   # upstream's MetadataScheme values
# Upstream's inpaint engine versions: which inpaint patch file ("None": no patch, no head).
INPAINT_ENGINE_VERSIONS: tuple[str, ...] = ("None", "v1", "v2.5", "v2.6")
DEFAULT_INPAINT_ENGINE = "v2.6"
# Upstream's inpaint "Method" choices (the page presets the inpaint options from them).
INPAINT_METHODS: tuple[str, ...] = ("Inpaint or Outpaint (default)", "Improve Detail (face, hand, eyes, etc.)",
                                    "Modify Content (add objects, change background, etc.)")

DEFAULT_SAMPLER = "dpmpp_2m_sde_gpu"
DEFAULT_SCHEDULER = "karras"

# SDXL training resolutions offered by Fooocus, "width*height".
SDXL_ASPECT_RATIOS: tuple[str, ...] = (
    "704*1408", "704*1344", "768*1344", "768*1280", "832*1216", "832*1152",
    "896*1152", "896*1088", "960*1088", "960*1024", "1024*1024", "1024*960",
    "1088*960", "1088*896", "1152*896", "1152*832", "1216*832", "1280*768",
    "1344*768", "1344*704", "1408*704", "1472*704", "1536*640", "1600*640",
    "1664*576", "1728*576",
)
DEFAULT_ASPECT_RATIO = "1152*896"

# The whole string: "1152*896", or a UI label "1152×896 ∣ 9:7" (the ratio after "∣").
# 'W*H' or 'W×H', optionally with upstream's label tail '∣ a:b' (or '| a:b'; the ratio must
# be W:H reduced). Nothing else: '256x256' and '64*64 extra' are refused.
_ASPECT_RE = re.compile(r"\s*(\d+)\s*[*×]\s*(\d+)\s*(?:[∣|]\s*(\d+)\s*:\s*(\d+)\s*)?")

OUTPUT_FORMATS: tuple[str, ...] = ("png", "jpeg", "webp")


def parse_aspect_ratio(text: str) -> tuple[int, int]:
    """Parse an aspect-ratio string into (width, height) in pixels."""
    m = _ASPECT_RE.fullmatch(text)
    if m is None:
        raise ValueError(f"bad aspect ratio {text!r}; expected 'WIDTH*HEIGHT' like {DEFAULT_ASPECT_RATIO!r}")
    width, height = int(m.group(1)), int(m.group(2))
    if m.group(3) is not None:
        d = math.gcd(width, height) or 1
        if (int(m.group(3)), int(m.group(4))) != (width // d, height // d):
            raise ValueError(f"bad aspect ratio {text!r}: {width}×{height} is {width // d}:{height // d}")
    if width <= 0 or height <= 0:
        raise ValueError(f"bad aspect ratio {text!r}: width and height must be positive")
    return width, height


# -- input image (upstream's UI strings) --------------------------------------------------

UOV_DISABLED = "Disabled"
VARY_SUBTLE = "Vary (Subtle)"
VARY_STRONG = "Vary (Strong)"
UPSCALE_15 = "Upscale (1.5x)"
UPSCALE_2 = "Upscale (2x)"
UPSCALE_FAST = "Upscale (Fast 2x)"
UOV_METHODS = (UOV_DISABLED, VARY_SUBTLE, VARY_STRONG, UPSCALE_15, UPSCALE_2, UPSCALE_FAST)
OUTPAINT_SELECTIONS = ("Left", "Right", "Top", "Bottom")
# Image-prompt types, upstream's names and order (its flags.ip_list); PyraCanny and CPDS
# are ControlNets (modules/controlnet.py), ImagePrompt the IP-Adapter (modules/ip_adapter.py).
IMAGE_PROMPT = "ImagePrompt"
PYRACANNY = "PyraCanny"
CPDS = "CPDS"
FACESWAP = "FaceSwap"
IMAGE_PROMPT_TYPES = (IMAGE_PROMPT, PYRACANNY, CPDS, FACESWAP)
CONTROLNET_TYPES = (PYRACANNY, CPDS)
# (stop at, weight) when a request or the page leaves them out (upstream's default_parameters).
IMAGE_PROMPT_DEFAULTS = {IMAGE_PROMPT: (0.5, 0.6), PYRACANNY: (0.5, 1.0), CPDS: (0.5, 1.0), FACESWAP: (0.9, 0.75)}
# Why each refused type is refused (the request's error says it).
UNSUPPORTED_IMAGE_PROMPT_TYPES = {
    FACESWAP: "it crops the face with a face detector (upstream vendors facexlib's RetinaFace and its "
              "weights) before the IP-Adapter Plus Face file, and no maintained face library installs here",
}
# Upscale runs fewer steps than text to image (upstream's StepsUOV); denoise keeps the last of them.
UOV_STEPS = {Performance.QUALITY: 36, Performance.SPEED: 18, Performance.EXTREME_SPEED: 8,
             Performance.LIGHTNING: 4, Performance.HYPER_SD: 4}
