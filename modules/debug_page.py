"""Developer Debug Mode on the page: what its controls hold, as request fields.

Upstream's Advanced tab has a "Developer Debug Mode" box that shows four tabs: Debug
Tools, Control, Inpaint and FreeU. As upstream, the values count whether the box is
ticked or not (the box only shows the tabs). A value is sent only when it differs from
what the server takes for a missing field (config.txt's or upstream's default, the
same ``Config`` the page was built from), so an untouched page sends exactly the
request it sent before these controls existed, and one set back to its default sends
nothing for it. The Control tab's values are the Input Image panel's
(``input_image_page.ControlValues``).

Torch- and Gradio-free: modules/webui.py lays the controls out and reads them into
``DebugValues``; tests build ``DebugValues`` directly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from modules import config as config_module
from modules import flags
from modules.generation_request import FREEU_DEFAULTS, MAX_STEPS
from modules.input_image_page import inpaint_method_settings

STEP_RANGE = (-1, MAX_STEPS)          # "Forced Overwrite of Sampling Step"; -1: not forced
SIDE_RANGE = (-1, 2048)               # upstream's width/height sliders (the request takes up to MAX_SIDE)
ERODE_RANGE = (-64, 64)               # "Mask Erode or Dilate"
FREEU_B_RANGE, FREEU_S_RANGE = (0.0, 2.0), (0.0, 4.0)   # upstream's FreeU slider ranges

# Fields sent only with an Upscale or Variation request, and only with an inpaint or outpaint one.
UOV_ONLY = ("overwrite_vary_strength", "overwrite_upscale_strength")
INPAINT_ONLY = ("inpaint_engine", "inpaint_erode_or_dilate", "invert_mask_checkbox",
                "inpaint_disable_initial_latent", "debugging_inpaint_preprocessor")
FREEU = tuple(FREEU_DEFAULTS)   # freeu_b1, freeu_b2, freeu_s1, freeu_s2


@dataclass(frozen=True)
class DebugValues:
    """The Debug Tools, Inpaint and FreeU tabs (and the inpaint panel's "Invert Mask When
    Generating"), under the request's field names; upstream's labels in the comments."""

    refiner_swap_method: str = "joint"         # Refiner swap method
    adaptive_cfg: float = 7.0                  # CFG Mimicking from TSNR
    clip_skip: int = 2                         # CLIP Skip
    steps: int = -1                            # Forced Overwrite of Sampling Step
    overwrite_switch: int = -1                 # Forced Overwrite of Refiner Switch Step
    overwrite_width: int = -1                  # Forced Overwrite of Generating Width
    overwrite_height: int = -1                 # Forced Overwrite of Generating Height
    overwrite_vary_strength: float = -1.0      # Forced Overwrite of Denoising Strength of "Vary"
    overwrite_upscale_strength: float = -1.0   # Forced Overwrite of Denoising Strength of "Upscale"
    generate_image_grid: bool = False          # Generate Image Grid for Each Batch
    disable_preview: bool = False              # Disable Preview
    disable_intermediate_results: bool = False  # Disable Intermediate Results
    disable_seed_increment: bool = False       # Disable seed increment
    read_wildcards_in_order: bool = False      # Read wildcards in order
    save_metadata_to_images: bool = True       # Save Metadata to Images
    metadata_scheme: str = "fooocus"           # Metadata Scheme
    freeu_enabled: bool = False                # FreeU: Enabled
    freeu_b1: float = FREEU_DEFAULTS["freeu_b1"]
    freeu_b2: float = FREEU_DEFAULTS["freeu_b2"]
    freeu_s1: float = FREEU_DEFAULTS["freeu_s1"]
    freeu_s2: float = FREEU_DEFAULTS["freeu_s2"]
    inpaint_engine: str = flags.DEFAULT_INPAINT_ENGINE  # Inpaint Engine
    inpaint_erode_or_dilate: int = 0           # Mask Erode or Dilate
    invert_mask_checkbox: bool = False         # Invert Mask When Generating
    inpaint_disable_initial_latent: bool = False  # Disable initial latent in inpaint
    debugging_inpaint_preprocessor: bool = False  # Debug Inpaint Preprocessing

    @staticmethod
    def defaults(cfg: config_module.Config) -> "DebugValues":
        """What the server takes for each missing field under `cfg`: the page's initial values."""
        return DebugValues(adaptive_cfg=cfg.default_cfg_tsnr, clip_skip=cfg.default_clip_skip,
                           steps=cfg.default_overwrite_step, overwrite_switch=cfg.default_overwrite_switch,
                           save_metadata_to_images=cfg.default_save_metadata_to_images,
                           metadata_scheme=cfg.default_metadata_scheme,
                           inpaint_engine=cfg.default_inpaint_engine_version)

    @staticmethod
    def initial(cfg: config_module.Config) -> "DebugValues":
        """The page's starting values: `defaults`, and what upstream's page-only keys set
        (default_invert_mask_checkbox, default_overwrite_upscale, default_inpaint_method);
        those differ from what the server takes, so they are sent when they apply."""
        method = inpaint_method_settings(cfg.default_inpaint_method, cfg.default_inpaint_engine_version)
        return dataclasses.replace(DebugValues.defaults(cfg), invert_mask_checkbox=cfg.default_invert_mask_checkbox,
                                   overwrite_upscale_strength=cfg.default_overwrite_upscale,
                                   inpaint_engine=method.engine,
                                   inpaint_disable_initial_latent=method.disable_initial_latent)

    @staticmethod
    def names() -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(DebugValues))

    def request_fields(self, defaults: "DebugValues", request: Mapping[str, Any]) -> dict[str, Any]:
        """The fields that differ from `defaults`, for `request` (the rest of the page's
        request): the vary/upscale strengths only go with an Upscale or Variation, the
        inpaint options only with an inpaint or outpaint, FreeU's factors only when on; a
        forced width or height is rounded down to a multiple of 8."""
        out: dict[str, Any] = {}
        for name in self.names():
            value, default = getattr(self, name), getattr(defaults, name)
            if value == default or name in FREEU:
                continue
            if name in UOV_ONLY and "uov_method" not in request:
                continue
            if name in INPAINT_ONLY and not ({"inpaint_mask", "outpaint_selections"} & request.keys()):
                continue
            out[name] = value
        for side in ("overwrite_width", "overwrite_height"):
            if out.get(side, -1) > 0:   # as upstream's latent (size // 8): the server takes multiples of 8
                out[side] -= out[side] % 8
        if self.freeu_enabled:
            out.update({name: float(getattr(self, name)) for name in FREEU})
        return out


def loaded_values(fields: Mapping[str, Any]) -> dict[str, Any]:
    """The debug controls' new values from loaded parameters or a preset's fields: those
    present and, as upstream's loader does for a whole parameter set (one naming its
    performance), "Forced Overwrite of Sampling Step" back to -1 when there are no steps of
    its own (they are the mode's) and FreeU off when it does not record FreeU."""
    out = {name: fields[name] for name in DebugValues.names() if fields.get(name) is not None}
    if "performance" in fields:
        out.setdefault("steps", -1)
        out.setdefault("freeu_enabled", False)
    return out

