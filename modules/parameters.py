"""Generation parameters in image metadata, both ways, and as request fields.

Written in upstream Fooocus's layout (its modules/meta_parser.py), so upstream loads
our images and we load its:

- the "fooocus" scheme: a JSON object (keys sorted) of upstream's fields: ``prompt``
  and ``negative_prompt`` (every line, wildcards and arrays resolved),
  ``prompt_expansion``, ``styles`` (a Python list's text, "Fooocus V2" first when
  used), ``performance``, ``steps``, ``resolution`` "(w, h)" (the saved image's size),
  ``guidance_scale``, ``sharpness``, ``adm_guidance`` "(p, n, end)", ``base_model``,
  ``refiner_model`` and ``vae`` (file names without extension), ``refiner_switch``,
  ``sampler``, ``scheduler``, ``seed`` (text), ``lora_combined_N`` "name : weight",
  ``metadata_scheme``, ``version``, ``full_prompt`` and ``full_negative_prompt`` (the
  texts encoded), and the Developer Debug fields under upstream's conditions:
  ``adaptive_cfg`` (when sampling used other than 7.0; the distilled modes use 1.0),
  ``clip_skip`` (when > 1, so the default 2 always), ``freeu`` "(b1, b2, s1, s2)" (when
  FreeU is on), and with a refiner only, ``overwrite_switch`` (when > 0) and
  ``refiner_swap_method`` (when not "joint");
- the "a1111" scheme: AUTOMATIC1111's text, "prompt\\nNegative prompt: ...\\nSteps: 30,
  Sampler: DPM++ 2M SDE Karras, Seed: ..., Size: WxH, ..." with upstream's extra keys
  (Sharpness, ADM Guidance, Performance, Scheduler, Raw prompt..., and the debug fields
  as Adaptive CFG, Clip skip, Overwrite Switch, Refiner Swap Method, FreeU) and the AutoV2
  hashes (sha256, 10 hex digits) of the model and LoRA files, computed once per file
  version.

modules/image_output.py puts the text into the file: PNG text chunk ``parameters``
(and ``fooocus_scheme``), JPEG/WebP EXIF UserComment (and MakerNote). Reading
(``read_parameters``) takes those, our earlier layout (the request's JSON, in
``parameters`` or EXIF ImageDescription) and AUTOMATIC1111's own files, and returns
request fields (DESIGN.md section 4) with plain JSON values, for /generate or the
page's controls; upstream's ``freeu`` reads as ``freeu_enabled`` with ``freeu_b1``,
``freeu_b2``, ``freeu_s1``, ``freeu_s2``.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import math
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from modules import flags, generation_request, image_output, sdxl_styles
from modules.config import MODEL_EXTENSIONS

# Request fields copied as they are when present.
FIELDS = ("prompt", "negative_prompt", "styles", "performance", "width", "height", "image_number", "seed",
          "base_model", "refiner_model", "refiner_switch", "vae", "loras", "guidance_scale", "sampler",
          "scheduler", "steps", "sharpness", "adm_scaler_positive", "adm_scaler_negative", "adm_scaler_end",
          "aspect_ratio", "output_format")
# The Developer Debug request fields adaptive_cfg, clip_skip, overwrite_switch,
# refiner_swap_method, freeu_enabled and freeu_b1...freeu_s2 are kept too, typed (_debug_fields),
# and these, which only our request layout (pasted JSON) carries:
REQUEST_ONLY_FLAGS = ("disable_preview", "disable_intermediate_results", "disable_seed_increment",
                      "read_wildcards_in_order", "generate_image_grid")
REQUEST_ONLY_WHOLE = ("overwrite_width", "overwrite_height")

# The Developer Debug fields upstream records (fooocus-scheme key -> a1111-scheme key), in
# the order its A1111MetadataParser writes them.
A1111_DEBUG_KEYS = {"adaptive_cfg": "Adaptive CFG", "clip_skip": "Clip skip", "overwrite_switch": "Overwrite Switch",
                    "refiner_swap_method": "Refiner Swap Method", "freeu": "FreeU"}
DEFAULT_ADAPTIVE_CFG = 7.0   # upstream's default_cfg_tsnr: not recorded when sampling used it
VERSION = "Fooocus-Resident"
HASH_LENGTH = 10   # upstream's (and Civitai's "AutoV2") short sha256


class ParameterError(ValueError):
    """Parameters that cannot be read; the message says from where and why."""


# -- writing --------------------------------------------------------------------------------

def stem(name: str) -> str:
    """A model name as upstream's metadata writes it: the file name without folder or extension."""
    return name if name in ("", flags.NONE_NAME, flags.DEFAULT_VAE) else Path(name).stem


@dataclass(frozen=True)
class ImageMetadata:
    """One image's parameters in upstream's fooocus-scheme fields, the scheme its file
    gets, and the model files behind the names (for the a1111 scheme's hashes)."""

    fields: dict
    scheme: str = "fooocus"
    model_files: dict = field(default_factory=dict)   # "base_model"/"refiner_model"/LoRA stem -> path

    @property
    def save(self) -> bool:
        return self.fields.get("metadata_scheme") is not False

    def sized(self, width: int, height: int) -> "ImageMetadata":
        """With the resolution of the image as saved."""
        return dataclasses.replace(self, fields={**self.fields, "resolution": str((int(width), int(height)))})

    def text(self, max_chars: int | None = None) -> str:
        """The text the file carries; prompts are left out when it would exceed `max_chars`."""
        text = self._text(self.fields)
        if max_chars is not None and len(text) > max_chars:
            short = {**self.fields, "prompts_left_out": "too long for this file's metadata", "prompt": "",
                     "negative_prompt": "", "full_prompt": [], "full_negative_prompt": []}
            text = self._text(short)
        return text

    def _text(self, fields: dict) -> str:
        if self.scheme == "a1111":
            return a1111_text(fields, self._hashes())
        return json.dumps(dict(sorted(fields.items())), ensure_ascii=True)

    def _hashes(self) -> dict[str, str]:
        return {role: file_hash(path) for role, path in self.model_files.items()}


def image_metadata(texts: sdxl_styles.ImageTexts, *, expansion: bool, performance: str, steps: int,
                   width: int, height: int, guidance_scale: float, sharpness: float,
                   adm: tuple[float, float, float], base_model: str, refiner_model: str | None,
                   refiner_switch: float, sampler: str, scheduler: str, vae: str, seed: int,
                   loras: list[tuple[str, float]], scheme: str, save: bool,
                   model_files: dict | None = None, adaptive_cfg: float = DEFAULT_ADAPTIVE_CFG,
                   clip_skip: int = 2, overwrite_switch: int = -1, refiner_swap_method: str = "joint",
                   freeu: tuple[float, float, float, float] | None = None) -> ImageMetadata:
    """Upstream's fields for one image (as its async_worker.save_and_log and meta_parser write them).

    The Developer Debug fields only under upstream's conditions: ``overwrite_switch`` (a
    step, when > 0) and ``refiner_swap_method`` (when not "joint") only when a refiner is
    used, ``adaptive_cfg`` (the value sampling used) when not 7.0, ``clip_skip`` when > 1,
    ``freeu`` "(b1, b2, s1, s2)" when FreeU is on."""
    fields: dict[str, Any] = {
        "prompt": texts.log_prompt, "negative_prompt": texts.log_negative_prompt,
        "prompt_expansion": texts.expansion,
        "styles": str([sdxl_styles.FOOOCUS_V2, *texts.styles] if expansion else list(texts.styles)),
        "performance": performance, "steps": steps, "resolution": str((width, height)),
        "guidance_scale": guidance_scale, "sharpness": sharpness, "adm_guidance": str(tuple(adm)),
        "base_model": stem(base_model), "refiner_model": stem(refiner_model or flags.NONE_NAME),
        "refiner_switch": refiner_switch, "sampler": sampler, "scheduler": scheduler, "vae": stem(vae),
        "seed": str(seed), "full_prompt": list(texts.positive), "full_negative_prompt": list(texts.negative),
        "metadata_scheme": scheme if save else False, "version": VERSION,
    }
    if refiner_model not in (None, "", flags.NONE_NAME):
        if overwrite_switch > 0:
            fields["overwrite_switch"] = int(overwrite_switch)
        if refiner_swap_method != "joint":
            fields["refiner_swap_method"] = refiner_swap_method
    if adaptive_cfg != DEFAULT_ADAPTIVE_CFG:
        fields["adaptive_cfg"] = float(adaptive_cfg)
    if clip_skip > 1:
        fields["clip_skip"] = int(clip_skip)
    if freeu is not None:
        fields["freeu"] = str(tuple(float(v) for v in freeu))
    for index, (name, weight) in enumerate(loras):
        fields[f"lora_combined_{index + 1}"] = f"{stem(name)} : {weight}"
    return ImageMetadata(fields=fields, scheme=scheme, model_files=dict(model_files or {}))


def _quote(value: Any) -> Any:
    """An a1111 value with a comma, colon or line break goes in JSON quotes."""
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ",:\n") else value


def _lora_pairs(fields: dict) -> list[tuple[str, str]]:
    """(name, weight text) of the lora_combined_N fields, in N order."""
    keys = sorted((k for k in fields if re.fullmatch(r"lora_combined_\d+", k)), key=lambda k: int(k.rsplit("_", 1)[1]))
    pairs = []
    for key in keys:
        parts = str(fields[key]).split(" : ")
        if len(parts) >= 2:
            pairs.append((" : ".join(parts[:-1]), parts[-1]))
    return pairs


def a1111_text(fields: dict, hashes: dict[str, str]) -> str:
    """The a1111 scheme's text of upstream's fields (upstream's A1111MetadataParser.to_string)."""
    width, height = _literal(fields["resolution"])
    params: dict[str, Any] = {
        "Steps": fields["steps"], "Sampler": flags.a1111_sampler(fields["sampler"], fields["scheduler"]),
        "Seed": fields["seed"], "Size": f"{width}x{height}", "CFG scale": fields["guidance_scale"],
        "Sharpness": fields["sharpness"], "ADM Guidance": fields["adm_guidance"], "Model": fields["base_model"],
        "Model hash": hashes.get("base_model"), "Performance": fields["performance"],
        "Scheduler": fields["scheduler"], "VAE": fields["vae"], "Raw prompt": fields["prompt"],
        "Raw negative prompt": fields["negative_prompt"],
    }
    if fields.get("refiner_model") not in (None, "", flags.NONE_NAME):
        params.update({"Refiner": fields["refiner_model"], "Refiner hash": hashes.get("refiner_model")})
    for key, label in A1111_DEBUG_KEYS.items():   # upstream's order: after the refiner, before the LoRAs
        if key in fields:
            params[label] = fields[key]
    loras = _lora_pairs(fields)
    if loras:
        params["Lora hashes"] = ", ".join(f"{name}: {hashes.get(name, '')}" for name, _ in loras)
        params["Lora weights"] = ", ".join(f"{name}: {weight}" for name, weight in loras)
    params["Version"] = fields["version"]
    line = ", ".join(f"{key}: {_quote(value)}" for key, value in params.items() if value is not None)
    positive = ", ".join(fields.get("full_prompt", []))
    negative = ", ".join(fields.get("full_negative_prompt", []))
    return (positive + (f"\nNegative prompt: {negative}" if negative else "") + "\n" + line).strip()


_hash_lock = threading.Lock()
_hashes: dict[tuple[str, int, int], str] = {}


def file_hash(path: str) -> str:
    """The first 10 hex digits of the file's sha256, computed once per version of the file."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    with _hash_lock:
        if key in _hashes:
            return _hashes[key]
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    value = digest.hexdigest()[:HASH_LENGTH]
    with _hash_lock:
        _hashes[key] = value
    return value


# -- reading --------------------------------------------------------------------------------

def _literal(value: Any) -> Any:
    """Upstream writes tuples and lists as their Python text ("(1152, 896)", "['A', 'B']")."""
    if isinstance(value, str):
        try:
            return ast.literal_eval(value)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            return value
    return value


def _number(value: Any, kind=float) -> Any:
    try:
        return kind(value)
    except (TypeError, ValueError):
        return None


def _settings():
    """The process's config for finding model files by name (None when it cannot load)."""
    from modules import config
    try:
        return config.get_config()
    except config.ConfigError:
        return None


def _model_file(name: str, folders_key: str, cfg) -> str:
    """A model named as upstream writes it (no folder, no extension) -> the file of that name
    in its folders (the first found), else the name with ``.safetensors``."""
    if name.lower().endswith(MODEL_EXTENSIONS):
        return name
    if cfg is not None:
        from modules import config
        for candidate in config.list_model_files(getattr(cfg, folders_key)):
            if Path(candidate).stem == name:
                return candidate
    return name + ".safetensors"


def _is_performance_lora(name: str) -> bool:
    return stem(name) in {stem(f) for f in flags.PERFORMANCE_LORA_FILES}


def _steps_override(steps: Any, performance: Any) -> int | None:
    """Upstream keeps a recorded step count only when it is not the performance mode's own."""
    value = _number(steps, int)
    try:
        own = flags.performance_settings(performance).steps
    except (ValueError, KeyError):
        own = None
    return None if value is None or value == own else value


def _upstream_fields(data: dict, cfg) -> dict:
    """Request fields from upstream's fooocus-scheme names."""
    out: dict[str, Any] = {}
    size = _literal(data.get("resolution"))
    if isinstance(size, (list, tuple)) and len(size) == 2 and all(_number(v, int) for v in size):
        out["width"], out["height"] = int(size[0]), int(size[1])
    adm = _literal(data.get("adm_guidance"))
    if isinstance(adm, (list, tuple)) and len(adm) == 3 and all(_number(v) is not None for v in adm):
        out["adm_scaler_positive"], out["adm_scaler_negative"], out["adm_scaler_end"] = map(float, adm)
    loras = []
    for name, weight in _lora_pairs(data):
        if name.startswith(("True : ", "False : ")):   # upstream's "enabled : name : weight"
            enabled, name = name.split(" : ", 1)
            if enabled == "False":
                continue
        if _number(weight) is not None and name != flags.NONE_NAME and not _is_performance_lora(name):
            loras.append([_model_file(name, "path_loras", cfg), float(weight)])
    if any(re.fullmatch(r"lora_combined_\d+", k) for k in data):
        out["loras"] = loras
    for key, folders in (("base_model", "path_checkpoints"), ("refiner_model", "path_checkpoints"),
                         ("vae", "path_vae")):
        name = data.get(key)
        if isinstance(name, str) and name and name not in (flags.NONE_NAME, flags.DEFAULT_VAE):
            out[key] = _model_file(name, folders, cfg)
    for key in ("guidance_scale", "sharpness", "refiner_switch"):
        if key in data and _number(data[key]) is not None:
            out[key] = float(data[key])
    if _number(data.get("seed"), int) is not None:
        out["seed"] = int(data["seed"])     # upstream writes the seed as text
    out.update(_debug_fields(data))
    return out


def _finite(value: Any) -> float | None:
    number = _number(value)
    return number if number is not None and math.isfinite(number) else None


def _whole(value: Any) -> int | None:
    number = _finite(value)
    return int(number) if number is not None and number.is_integer() else None


def _debug_fields(data: dict) -> dict:
    """The Developer Debug request fields: upstream's names (its ``freeu`` "(b1, b2, s1, s2)"
    meaning FreeU on) or our request's own (``freeu_enabled``, ``freeu_b1``...); values that
    do not parse are left out."""
    out: dict[str, Any] = {}
    for key in ("adaptive_cfg", *generation_request.FREEU_DEFAULTS):
        if key in data and _finite(data[key]) is not None:
            out[key] = _finite(data[key])
    for key in ("clip_skip", "overwrite_switch", *REQUEST_ONLY_WHOLE):
        if key in data and _whole(data[key]) is not None:
            out[key] = _whole(data[key])
    out.update({key: data[key] for key in REQUEST_ONLY_FLAGS if isinstance(data.get(key), bool)})
    if data.get("refiner_swap_method") in generation_request.REFINER_SWAP_METHODS:
        out["refiner_swap_method"] = data["refiner_swap_method"]
    if isinstance(data.get("freeu_enabled"), bool):
        out["freeu_enabled"] = data["freeu_enabled"]
    freeu = _literal(data.get("freeu"))
    if isinstance(freeu, (list, tuple)) and len(freeu) == 4 and all(_finite(v) is not None for v in freeu):
        out["freeu_enabled"] = True
        out.update(zip(generation_request.FREEU_DEFAULTS, map(float, freeu)))
    return out


def from_json(data: Any, source: str = "pasted JSON", cfg=None) -> dict:
    """Request fields from a parameters object: upstream's fooocus scheme (our images' too),
    or this project's earlier layout (the request's own fields)."""
    if isinstance(data, (str, bytes)):
        try:
            data = json.loads(data)
        except json.JSONDecodeError as error:
            raise ParameterError(f"{source} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise ParameterError(f"{source} must be a JSON object of generation parameters")
    cfg = cfg if cfg is not None else _settings()
    fields = {k: data[k] for k in FIELDS if k in data}
    if "styles" in fields:
        styles = _literal(fields["styles"])
        fields["styles"] = [str(s) for s in styles] if isinstance(styles, (list, tuple)) else [str(styles)]
    if "loras" in fields and isinstance(fields["loras"], list):
        # Reports and our earlier metadata list LoRAs as {"file", "weight"}; requests take [name, weight].
        pairs = [[l["file"], l["weight"]] if isinstance(l, dict) else list(l) for l in fields["loras"]]
        # A performance mode adds its own LoRA; sending it back would add it twice.
        fields["loras"] = [p for p in pairs if p and not _is_performance_lora(str(p[0]))]
    fields.update(_upstream_fields(data, cfg))
    if "steps" in fields:
        steps = _steps_override(fields.pop("steps"), fields.get("performance", flags.Performance.SPEED.value))
        if steps is not None:
            fields["steps"] = steps
    if "image_number" in fields and _number(fields["image_number"], int) is None:
        del fields["image_number"]
    if not fields:
        raise ParameterError(f"{source} holds no generation parameters")
    return fields


# key: value, with the value in JSON quotes or up to the next comma (A1111's infotext line)
_A1111_PARAM = re.compile(r'\s*(?P<key>\w[\w /-]+):\s*(?P<value>"(?:[^"\\]|\\.)+"|[^,]*)(?:,|$)')
_A1111_SIZE = re.compile(r"^(\d+)x(\d+)$")
_NEGATIVE = "Negative prompt:"


def _a1111_params(line: str) -> dict[str, str]:
    params = {}
    for match in _A1111_PARAM.finditer(line):
        value = match.group("value").strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                pass
        params[match.group("key").strip()] = value
    return params


def from_a1111(text: str, cfg=None, source: str = "the image's metadata") -> dict:
    """Request fields from AUTOMATIC1111's infotext: upstream Fooocus's a1111 scheme (with its
    Raw prompt, Performance, Scheduler, Sharpness... keys) or A1111's own."""
    cfg = cfg if cfg is not None else _settings()
    lines = text.strip().split("\n")
    params = _a1111_params(lines[-1]) if lines else {}
    if len(params) >= 3:
        lines = lines[:-1]
    else:
        params = {}
    positive, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith(_NEGATIVE):
            in_negative, line = True, line[len(_NEGATIVE):].strip()
        (negative if in_negative else positive).append(line)
    full_positive, full_negative = "\n".join(positive), "\n".join(negative)
    fields: dict[str, Any] = {"prompt": params.get("Raw prompt", full_positive),
                              "negative_prompt": params.get("Raw negative prompt", full_negative)}
    upstream = {"steps": params.get("Steps"), "seed": params.get("Seed"), "guidance_scale": params.get("CFG scale"),
                "sharpness": params.get("Sharpness"), "adm_guidance": params.get("ADM Guidance"),
                "base_model": params.get("Model"), "refiner_model": params.get("Refiner"),
                "vae": params.get("VAE"), "performance": params.get("Performance"),
                **{key: params.get(label) for key, label in A1111_DEBUG_KEYS.items()}}
    size = _A1111_SIZE.match(params.get("Size", ""))
    if size:
        upstream["resolution"] = str((int(size.group(1)), int(size.group(2))))
    if params.get("Lora weights"):
        for index, item in enumerate(params["Lora weights"].split(", ")):
            name, _, weight = item.rpartition(": ")
            upstream[f"lora_combined_{index + 1}"] = f"{name} : {weight}"
    known = {k: v for k, v in upstream.items() if v is not None}
    if known:
        fields.update(from_json(known, source, cfg))
    fields.update(_a1111_sampler(params))
    if "Raw prompt" in params:   # written by Fooocus: its styles are in the full prompt
        fields["styles"] = _styles_in(full_positive, full_negative, fields["prompt"], fields["negative_prompt"], cfg)
    return fields


def _a1111_sampler(params: dict[str, str]) -> dict:
    out: dict[str, Any] = {}
    if "Sampler" in params:
        try:
            out["sampler"], scheduler = flags.sampler_from_a1111(params["Sampler"])
        except ValueError:
            out["sampler"], scheduler = params["Sampler"], None   # the request names it if unknown
        if scheduler:
            out["scheduler"] = scheduler
    for key in ("Scheduler", "Schedule type"):   # Fooocus's, then A1111 1.9's
        name = params.get(key, "").strip().lower().replace(" ", "_")
        if name in flags.SCHEDULER_NAMES:
            out["scheduler"] = name
    return out


def _styles_in(full_positive: str, full_negative: str, prompt: str, negative: str, cfg) -> list[str]:
    """The styles whose templates, applied to the prompt, make up Fooocus's full prompt (the
    a1111 scheme keeps only the joined texts), in the order they appear; "Fooocus V2" when
    text no style or prompt line explains is left (its expansion)."""
    library = sdxl_styles.get_library(cfg.path_styles) if cfg is not None else sdxl_styles.StyleLibrary()
    main = sdxl_styles.prompt_lines(prompt)[0]
    rest_positive, rest_negative = full_positive, full_negative
    found: list[tuple[int, str]] = []
    candidates = sorted(library.styles.values(), key=lambda s: -len(s.prompt) - len(s.negative_prompt))
    for style in candidates:
        applied = ", ".join(t for t in style.prompt.replace(sdxl_styles.PLACEHOLDER, main).splitlines() if t)
        negatives = ", ".join(t for t in style.negative_prompt.splitlines() if t)
        if applied == main:
            applied = ""   # a template that only holds the prompt says nothing
        if not (applied or negatives) or (applied and applied not in rest_positive) or (
                negatives and negatives not in rest_negative):
            continue
        where = full_positive.find(applied) if applied else len(full_positive) + full_negative.find(negatives)
        found.append((where, style.name))
        rest_positive = rest_positive.replace(applied, "", 1) if applied else rest_positive
        rest_negative = rest_negative.replace(negatives, "", 1) if negatives else rest_negative
    for line in sdxl_styles.prompt_lines(prompt):
        rest_positive = rest_positive.replace(line, "", 1)
    names = [name for _, name in sorted(found)]
    if re.search(r"\w", rest_positive):
        names.insert(0, sdxl_styles.FOOOCUS_V2)
    return names


def parse_metadata(text: str, scheme: str | None, source: str = "the image's metadata", cfg=None) -> dict:
    """Request fields from a metadata text of either scheme (JSON means fooocus, other text a1111)."""
    stripped = text.strip()
    if scheme == "a1111" or (scheme is None and not stripped.startswith("{")):
        return from_a1111(text, cfg, source)
    return from_json(text, source, cfg)


def read_parameters(image: bytes | str | os.PathLike | Image.Image, cfg=None) -> dict:
    """Request fields from an image file's metadata: PNG, JPEG or WebP, written by us, by
    upstream Fooocus (either scheme) or by AUTOMATIC1111. `image` is the file's bytes, its
    path or an opened image. Raises ParameterError when there are none."""
    try:
        text, scheme = image_output.read_metadata(image)
    except (OSError, ValueError) as error:
        raise ParameterError(f"the file is not an image that can be read: {error}") from None
    if not text:
        raise ParameterError("the image has no generation parameters in its metadata "
                             "(saved with --disable-metadata, or by another program)")
    return parse_metadata(text, scheme, cfg=cfg)


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
            "aspect_ratio": cfg.default_aspect_ratio, "image_number": cfg.default_image_number,
            # upstream's preset keys default_overwrite_step/_switch, default_cfg_tsnr, default_clip_skip
            "steps": cfg.default_overwrite_step, "overwrite_switch": cfg.default_overwrite_switch,
            "adaptive_cfg": cfg.default_cfg_tsnr, "clip_skip": cfg.default_clip_skip,
            "inpaint_engine": cfg.default_inpaint_engine_version}
