"""Generation parameters as request fields: read back from an image or pasted JSON, or
taken from a config/preset, for the page's controls and the API.

Two metadata layouts are understood:
- ours: the PNG text chunk ``parameters`` holding the request's JSON (what
  default_pipeline.save_image writes, and each entry of the history log);
- upstream Fooocus's "fooocus" scheme (same chunk, JSON with ``resolution``
  "(w, h)", ``adm_guidance`` "(p, n, end)", ``styles`` as a list's text,
  ``lora_combined_N`` "name : weight", ``base_model`` without extension...).

The result holds only request fields (DESIGN.md section 4) with plain JSON
values, so it can be sent to /generate as is or spread over the page's controls.
"""

from __future__ import annotations

import ast
import json
import re
from typing import Any

from PIL import Image

from modules import flags
from modules.config import MODEL_EXTENSIONS

# Request fields copied as they are when present.
FIELDS = ("prompt", "negative_prompt", "styles", "performance", "width", "height", "image_number", "seed",
          "base_model", "refiner_model", "refiner_switch", "vae", "loras", "guidance_scale", "sampler",
          "scheduler", "steps", "sharpness", "adm_scaler_positive", "adm_scaler_negative", "adm_scaler_end",
          "aspect_ratio", "output_format")


class ParameterError(ValueError):
    """Parameters that cannot be read; the message says from where and why."""


def _literal(value: Any) -> Any:
    """Upstream writes tuples and lists as their Python text ("(1152, 896)", "['A', 'B']")."""
    if isinstance(value, str):
        try:
            return ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return value
    return value


def _upstream_fields(data: dict) -> dict:
    out: dict[str, Any] = {}
    size = _literal(data.get("resolution"))
    if isinstance(size, (list, tuple)) and len(size) == 2:
        out["width"], out["height"] = int(size[0]), int(size[1])
    adm = _literal(data.get("adm_guidance"))
    if isinstance(adm, (list, tuple)) and len(adm) == 3:
        out["adm_scaler_positive"], out["adm_scaler_negative"], out["adm_scaler_end"] = map(float, adm)
    loras = []
    for key in sorted((k for k in data if re.fullmatch(r"lora_combined_\d+", k)), key=lambda k: int(k.rsplit("_", 1)[1])):
        name, _, weight = str(data[key]).rpartition(" : ")
        if name:
            loras.append([_with_extension(name), float(weight)])
    if loras:
        out["loras"] = loras
    for key in ("base_model", "refiner_model"):
        name = data.get(key)
        if isinstance(name, str) and name and name != "None":
            out[key] = _with_extension(name)
    if isinstance(data.get("seed"), str) and data["seed"].strip().lstrip("-").isdigit():
        out["seed"] = int(data["seed"])     # upstream writes the seed as text
    return out


def _with_extension(name: str) -> str:
    """Upstream writes model names without their extension."""
    return name if name.lower().endswith(MODEL_EXTENSIONS) else name + ".safetensors"


def from_json(data: Any, source: str = "pasted JSON") -> dict:
    """Request fields from a parameters object (ours or upstream's)."""
    if isinstance(data, str):
        try:
            data = json.loads(data)
        except json.JSONDecodeError as error:
            raise ParameterError(f"{source} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise ParameterError(f"{source} must be a JSON object of generation parameters")
    fields = {k: data[k] for k in FIELDS if k in data}
    if "styles" in fields:
        styles = _literal(fields["styles"])
        fields["styles"] = list(styles) if isinstance(styles, (list, tuple)) else [str(styles)]
    if "loras" in fields and isinstance(fields["loras"], list):
        # Reports and metadata list LoRAs as {"file", "weight"} dicts; requests take [name, weight].
        pairs = [[l["file"], l["weight"]] if isinstance(l, dict) else list(l) for l in fields["loras"]]
        # A performance mode adds its own LoRA; sending it back would add it twice.
        fields["loras"] = [p for p in pairs if p and p[0] not in flags.PERFORMANCE_LORA_FILES]
    fields.update(_upstream_fields(data))
    if not fields:
        raise ParameterError(f"{source} holds no generation parameters")
    return fields


def from_image(image: str | Image.Image) -> dict:
    """Request fields from an image's metadata (PNG text chunk `parameters`)."""
    picture = Image.open(image) if isinstance(image, str) else image
    text = getattr(picture, "text", None) or {}
    raw = text.get("parameters") or picture.info.get("parameters")
    if not raw:
        raise ParameterError("the image has no generation parameters in its metadata "
                             "(saved with --disable-metadata, or by another program)")
    return from_json(raw, source="the image's metadata")


def from_config(cfg) -> dict:
    """Request fields of a Config's defaults (a preset applied to the page)."""
    width, height = cfg.default_size
    return {"prompt": cfg.default_prompt, "negative_prompt": cfg.default_prompt_negative,
            "performance": str(cfg.default_performance), "base_model": cfg.default_model,
            "refiner_model": cfg.default_refiner, "refiner_switch": cfg.default_refiner_switch,
            "vae": cfg.default_vae, "loras": [[l.name, l.weight] for l in cfg.default_loras if l.enabled],
            "guidance_scale": cfg.default_cfg_scale, "sampler": cfg.default_sampler,
            "scheduler": cfg.default_scheduler, "styles": list(cfg.default_styles),
            "sharpness": cfg.default_sample_sharpness, "width": width, "height": height,
            "aspect_ratio": cfg.default_aspect_ratio, "image_number": cfg.default_image_number}
