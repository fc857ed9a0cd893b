"""The pipeline state that persists between requests, and one request end to end.

`refresh_everything` turns (checkpoint files, LoRA list) into patchers and
reuses what it already has: a loaded checkpoint, parsed LoRA files, the
patchers of an unchanged LoRA set, encoded prompts. Nothing here moves or
patches weights: `core` asks `model_management.load_models_gpu` for that.
"""

from __future__ import annotations

import concurrent.futures
import datetime
import json
import logging
import math
import os
import random
import re
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import torch

from ldm_patched.modules import model_management
from ldm_patched.modules.checkpoint import CheckpointError, load_checkpoint, load_vae
from ldm_patched.modules.file_version import FileVersion
from ldm_patched.modules.lora import (LoraError, LoraFileCache, LoraMatch, match_lora, text_encoder_lora_names,
                                      unet_lora_names)
from ldm_patched.modules.model_patcher import ModelPatcher
from modules import config as config_module
from modules import core, flags, guidance, history_log, image_output, sdxl_styles
from modules.embeddings import EmbeddingCache, EmbeddingError

if TYPE_CHECKING:
    from modules.async_worker import TaskControl

log = logging.getLogger("fooocus_resident.pipeline")

FUSED_LORAS_METADATA_KEY = "fooocus_resident.fused_loras"
DEMO_CHECKPOINT_NAME = "fooocus_resident_demo_random.safetensors"
MAX_SIDE = 4096
MAX_IMAGES = 32
MAX_STEPS = 200
MAX_SEED = 2 ** 63 - 1


class RequestError(ValueError):
    """A request that cannot run as asked; the message says which field and why."""


class StopRequested(Exception):
    pass


@dataclass
class ProgressEvent:
    image_index: int
    image_count: int
    step: int
    steps: int
    message: str
    stage: str = "sampling"      # loading, encoding, sampling, skipped, decoding, saving
    preview: Any = None          # small RGB uint8 array (sampling), every PREVIEW_EVERY steps
    image: str | None = None     # path of an image that has just been written (saving)


PREVIEW_EVERY = 2   # steps between two live previews


def latent_preview(latents: torch.Tensor) -> np.ndarray:
    """A cheap look at latents (1, C, h, w): the first three channels, each stretched
    to 0..255 over its own range. No VAE involved: a rough idea of composition only."""
    x = latents[0, :3].detach().float().cpu()
    if x.shape[0] < 3:
        x = x[:1].expand(3, *x.shape[1:])
    low = x.amin(dim=(1, 2), keepdim=True)
    span = (x.amax(dim=(1, 2), keepdim=True) - low).clamp_min(1e-6)
    return ((x - low) / span * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


@dataclass
class RequestResult:
    images: list[str]
    report: dict


# -- the request ----------------------------------------------------------------------

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
            raise RequestError(str(error)) from error
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
            steps=None if data.get("steps") in (None, -1) else _int(data, "steps", 0, 1, MAX_STEPS),
            output_format=_one_of(data, "output_format", cfg.default_output_format, flags.OUTPUT_FORMATS),
            styles=_names(data, "styles", list(cfg.default_styles)),
            sharpness=_float(data, "sharpness", cfg.default_sample_sharpness, 0.0, 30.0),
            adm_scaler_positive=_float(data, "adm_scaler_positive", 1.5, 0.1, 3.0),
            adm_scaler_negative=_float(data, "adm_scaler_negative", 0.8, 0.1, 3.0),
            adm_scaler_end=_float(data, "adm_scaler_end", 0.3, 0.0, 1.0),
        )
        for side in ("width", "height"):
            if getattr(request, side) % 8:
                raise RequestError(f"field '{side}' must be a multiple of 8, got {getattr(request, side)}")
        return request


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


def _int(data: dict, key: str, default: int, low: int, high: int) -> int:
    value = data.get(key, default)
    if (isinstance(value, bool) or not isinstance(value, (int, float))
            or (isinstance(value, float) and not math.isfinite(value)) or int(value) != value):
        raise RequestError(f"field '{key}' must be an integer, got {value!r}")
    if not low <= int(value) <= high:
        raise RequestError(f"field '{key}' must be between {low} and {high}, got {value}")
    return int(value)


def _float(data: dict, key: str, default: float, low: float, high: float) -> float:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RequestError(f"field '{key}' must be a finite number, got {value!r}")
    if not low <= float(value) <= high:
        raise RequestError(f"field '{key}' must be between {low} and {high}, got {value}")
    return float(value)


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


def check_lora_weight(weight: float, where: str, cfg: config_module.Config) -> float:
    """LoRA weights are finite and within +-max_lora_weight (NaN, inf or 1e308 give
    black or noise images, or overflow in the merge)."""
    limit = cfg.max_lora_weight
    if not math.isfinite(weight) or abs(weight) > limit:
        raise RequestError(f"{where}: weight must be a finite number between {-limit:g} and {limit:g} "
                           f"(config key max_lora_weight), got {weight!r}")
    return weight


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
        check_lora_weight(float(item[1]), f"field 'loras' item {index} ({item[0]})", cfg)
        if item[0] not in ("", flags.NONE_NAME) and item[1] != 0:
            loras.append((item[0], float(item[1])))
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


# -- persistent state ---------------------------------------------------------------

@dataclass(eq=False)
class LoadedCheckpoint:
    file: FileVersion   # a rewritten file is another checkpoint, which replaces this one
    kind: str
    unet: ModelPatcher
    clip: ModelPatcher
    vae: ModelPatcher | None
    tokenizers: tuple
    fused_loras: list[str]
    lora_names: dict[str, dict[str, str]] = field(default_factory=dict)

    def lora_targets(self) -> dict[str, tuple[dict[str, str], torch.nn.Module]]:
        if not self.lora_names:
            self.lora_names = {"unet": unet_lora_names(self.unet.model),
                               "clip": text_encoder_lora_names(self.clip.model)}
        return {"unet": (self.lora_names["unet"], self.unet.model),
                "clip": (self.lora_names["clip"], self.clip.model)}


@dataclass(eq=False)
class PatchedModels:
    """A checkpoint's patchers with one LoRA set added (and the refiner's, where it takes them)."""

    checkpoint: LoadedCheckpoint
    unet: ModelPatcher
    clip: ModelPatcher
    loras: list[dict]
    refiner_unet: ModelPatcher | None = None
    refiner_clip: ModelPatcher | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def refiner_loras(self) -> list[str]:
        return [lora["file"] for lora in self.loras if lora.get("refiner")]


@dataclass
class PipelineState:
    checkpoints: "OrderedDict[FileVersion, LoadedCheckpoint]" = field(default_factory=OrderedDict)
    lora_files: LoraFileCache = field(default_factory=LoraFileCache)
    lora_matches: dict[tuple[FileVersion, int, bool], LoraMatch] = field(default_factory=dict)
    embeddings: EmbeddingCache = field(default_factory=EmbeddingCache)
    patched: "OrderedDict[tuple, PatchedModels]" = field(default_factory=OrderedDict)
    conditions: "OrderedDict[tuple, core.Conditioning]" = field(default_factory=OrderedDict)
    vaes: "OrderedDict[FileVersion, ModelPatcher]" = field(default_factory=OrderedDict)   # models/vae files
    max_checkpoints: int | None = None   # None: the policy's default (max_cached_checkpoints)


STATE = PipelineState()
# Encoding and writing image files runs here while the next image samples.
IMAGE_WRITER = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="image-writer")
MAX_PATCHED_SETS = 4
MAX_CONDITIONS = 64


def max_cached_checkpoints(manager: model_management.ModelManager) -> int:
    """Upstream keeps a base and a refiner; resident mode keeps a few more in host
    memory so alternating base models does not re-read files."""
    return 4 if manager.resident else 2


def get_checkpoint(path: str) -> LoadedCheckpoint:
    manager = model_management.get_manager()
    file = FileVersion.of(path)
    cached = STATE.checkpoints.get(file)
    if cached is not None:
        STATE.checkpoints.move_to_end(file)
        return cached
    _drop_other_versions(file)   # before loading: the old version's memory is freed first
    started = time.perf_counter()
    loaded = load_checkpoint(file.path, unet_dtype=manager.dtype_for("unet"),
                             vae_dtype=manager.dtype_for("vae", manager.vae_device()),
                             text_encoder_dtype=manager.dtype_for("text_encoder"))
    file = loaded.version or file   # the version actually read
    checkpoint = adopt_checkpoint(file, loaded.kind, {"unet": loaded.unet, "vae": loaded.vae,
                                                      "text_encoder": loaded.text_encoder,
                                                      "text_encoder_2": loaded.text_encoder_2},
                                  (loaded.tokenizer, loaded.tokenizer_2), _fused_loras(loaded.metadata))
    log.info("[Fooocus-Resident] loaded %s (%s) in %.2f s", os.path.basename(file.path), loaded.kind,
             time.perf_counter() - started)
    return checkpoint


def adopt_checkpoint(file: FileVersion, kind: str, components: dict[str, torch.nn.Module | None],
                     tokenizers: tuple, fused_loras: list[str] | None = None) -> LoadedCheckpoint:
    """Wrap loaded modules in patchers and cache them under `file`.

    Benchmarks use this directly with modules built on the device (no file to read)."""
    manager = model_management.get_manager()
    device, offload = manager.settings.device, manager.offload_device()
    name = os.path.basename(file.path)
    encoders = core.SDXLTextEncoders(components.get("text_encoder"), components["text_encoder_2"])
    vae = components.get("vae")
    checkpoint = LoadedCheckpoint(
        file=file, kind=kind,
        unet=ModelPatcher(components["unet"], device, offload, name=f"{name}:unet"),
        clip=ModelPatcher(encoders, device, offload, name=f"{name}:text_encoders"),
        vae=None if vae is None else ModelPatcher(vae, manager.vae_device(), offload, name=f"{name}:vae"),
        tokenizers=tokenizers,
        fused_loras=fused_loras or [],
    )
    STATE.checkpoints[file] = checkpoint
    while len(STATE.checkpoints) > (STATE.max_checkpoints or max_cached_checkpoints(manager)):
        _drop_checkpoint(next(iter(STATE.checkpoints.values())))
    return checkpoint


def get_vae(name: str, cfg: config_module.Config) -> ModelPatcher:
    """A standalone VAE from the VAE folders, loaded once per file version."""
    file = FileVersion.of(_resolve(name, cfg.path_vae, "vae", "VAE", "path_vae"))
    cached = STATE.vaes.get(file)
    if cached is not None:
        STATE.vaes.move_to_end(file)
        return cached
    manager = model_management.get_manager()
    for old in [f for f in STATE.vaes if f.path == file.path]:   # a new version replaces the old one
        manager.forget(STATE.vaes.pop(old).model)
    vae = load_vae(file.path, dtype=manager.dtype_for("vae", manager.vae_device()))
    patcher = ModelPatcher(vae, manager.vae_device(), manager.offload_device(), name=f"{file.name}:vae")
    STATE.vaes[file] = patcher
    while len(STATE.vaes) > (2 if manager.resident else 1):
        _, dropped = STATE.vaes.popitem(last=False)
        manager.forget(dropped.model)
    return patcher


def _fused_loras(metadata: dict[str, str]) -> list[str]:
    try:
        return [str(item[0]) for item in json.loads(metadata.get(FUSED_LORAS_METADATA_KEY, "[]"))]
    except (ValueError, TypeError, IndexError):
        return []


def _drop_other_versions(file: FileVersion) -> None:
    """A new version of a checkpoint's path replaces the old one at once: its
    modules leave the registry and every cache that refers to them."""
    for old in [c for f, c in STATE.checkpoints.items() if f.path == file.path and f != file]:
        log.info("[Fooocus-Resident] %s changed on disk: dropping the loaded version", file.name)
        _drop_checkpoint(old)


def _drop_checkpoint(checkpoint: LoadedCheckpoint) -> None:
    manager = model_management.get_manager()
    for patcher in (checkpoint.unet, checkpoint.clip, checkpoint.vae):
        if patcher is not None:
            manager.forget(patcher.model)
    del STATE.checkpoints[checkpoint.file]
    STATE.patched = OrderedDict((k, v) for k, v in STATE.patched.items()
                                if v.checkpoint is not checkpoint and k[2] != id(checkpoint))
    STATE.lora_matches = {k: v for k, v in STATE.lora_matches.items() if k[1] != id(checkpoint)}
    STATE.conditions.clear()


def patched_models(checkpoint: LoadedCheckpoint, loras: list[tuple[str, float]],
                   refiner: LoadedCheckpoint | None = None) -> PatchedModels:
    """Patchers for checkpoint + LoRAs; the same LoRA set returns the same patchers.

    With a `refiner`, the same list goes to it as upstream does, each LoRA only where
    it fits (see `_refiner_takes`); the report says which ones it took."""
    files = [(FileVersion.of(path), weight) for path, weight in loras]
    _drop_stale_lora_sets([file for file, _ in files])
    key = (id(checkpoint), tuple(files), None if refiner is None else id(refiner))
    cached = STATE.patched.get(key)
    if cached is not None:
        STATE.patched.move_to_end(key)
        return cached
    unet, clip = checkpoint.unet.clone(), checkpoint.clip.clone()
    refiner_unet = refiner_clip = None
    if refiner is not None:
        refiner_unet, refiner_clip = refiner.unet.clone(), refiner.clip.clone()
    report, warnings = [], []
    for (path, weight), (file, _) in zip(loras, files):
        match = _lora_match(checkpoint, path, file)
        taken = unet.add_patches(match.patches["unet"], weight) + clip.add_patches(match.patches["clip"], weight)
        entry = {"file": file.name, "weight": weight, "matched_keys": len(taken),
                 "unmatched_keys": len(match.unmatched)}
        if match.unmatched:
            log.warning("[Fooocus-Resident] LoRA %s: %d keys match no layer (e.g. %s)",
                        file.name, len(match.unmatched), match.unmatched[0])
        if match.warnings:
            entry["warnings"] = list(match.warnings)
            warnings.extend(match.warnings)
            for warning in match.warnings:
                log.warning("[Fooocus-Resident] %s", warning)
        if refiner is not None:
            refined = _lora_match(refiner, path, file, strict=False)
            entry["refiner"] = _refiner_takes(refined)
            if entry["refiner"]:
                entry["refiner_matched_keys"] = len(
                    refiner_unet.add_patches(refined.patches["unet"], weight)
                    + refiner_clip.add_patches(refined.patches["clip"], weight))
        report.append(entry)
    models = PatchedModels(checkpoint=checkpoint, unet=unet, clip=clip, loras=report,
                           refiner_unet=refiner_unet, refiner_clip=refiner_clip, warnings=warnings)
    # Parsed LoRA files are host memory (pinned with a GPU): on the host ledger, freed with the file cache.
    model_management.get_manager().register_cache("lora_files", model_management.HOST,
                                                  lambda: STATE.lora_files.nbytes())
    STATE.patched[key] = models
    while len(STATE.patched) > MAX_PATCHED_SETS:
        STATE.patched.popitem(last=False)
    return models


def _refiner_takes(match: LoraMatch) -> bool:
    """The refiner takes a LoRA when some of its keys fit and none names a refiner layer
    with another shape (that is a LoRA made for the base). Keys the refiner lacks (CLIP-L,
    base-only blocks) are fine: upstream applies the list to the refiner the same way."""
    return match.matched_count > 0 and not match.misfit


def _drop_stale_lora_sets(files: list[FileVersion]) -> None:
    """Patched sets and matches made from an older version of one of `files` are dropped
    at once (their patchers hold the old factors), and so is the old parsed file."""
    current = {f.path: f for f in files}

    def stale(file: FileVersion) -> bool:
        return file.path in current and file != current[file.path]

    STATE.patched = OrderedDict((k, v) for k, v in STATE.patched.items() if not any(stale(f) for f, _ in k[1]))
    STATE.lora_matches = {k: v for k, v in STATE.lora_matches.items() if not stale(k[0])}
    for file in files:
        STATE.lora_files.forget_path(file.path, keep=file)


def _lora_match(checkpoint: LoadedCheckpoint, path: str, file: FileVersion, strict: bool = True) -> LoraMatch:
    key = (file, id(checkpoint), strict)
    match = STATE.lora_matches.get(key)
    if match is None:
        match = match_lora(STATE.lora_files.get(path), checkpoint.lora_targets(), strict=strict)
        # Matches hold the parsed tensors: keep only those of files the bounded cache keeps.
        STATE.lora_matches = {k: v for k, v in STATE.lora_matches.items() if k[0] in STATE.lora_files}
        STATE.lora_matches[key] = match
    return match


def encode(clip: ModelPatcher, tokenizers: tuple, prompt: str, counts: dict,
           embedding_folders=(), max_cache_bytes: int = 512 * 2 ** 20) -> core.Conditioning:
    """Encode a prompt; in resident mode the same prompt under the same text-encoder
    weights and the same embedding file versions is served from the cache, which is
    bounded in entries and in bytes."""
    manager = model_management.get_manager()
    try:
        embeddings = STATE.embeddings.for_prompt(prompt, embedding_folders)
    except EmbeddingError as error:
        raise RequestError(str(error)) from error
    files = tuple(sorted((name, e.file) for name, e in embeddings.items()))
    key = (id(clip.model), clip.weight_signature().digest, prompt, files)
    if manager.resident and key in STATE.conditions:
        STATE.conditions.move_to_end(key)
        return STATE.conditions[key]
    try:
        cond = core.encode_prompt(clip, tokenizers, prompt, embeddings or None)
    except EmbeddingError as error:
        raise RequestError(str(error)) from error
    counts["text_encodes"] += 1
    if manager.resident and conditioning_bytes(cond) <= max_cache_bytes:
        STATE.conditions[key] = cond
        while len(STATE.conditions) > MAX_CONDITIONS or conditions_cache_bytes() > max_cache_bytes:
            STATE.conditions.popitem(last=False)
        # Kept conditionings live on the encoders' device: charged there, freed in the first tier.
        manager.register_cache("conditionings", clip.load_device, lambda: conditions_cache_bytes(STATE),
                               lambda: STATE.conditions.clear())
    return cond


def conditioning_bytes(cond: core.Conditioning) -> int:
    return sum(t.numel() * t.element_size() for t in (cond.embeds, cond.pooled) if t is not None)


def conditions_cache_bytes(state: "PipelineState | None" = None) -> int:
    """Bytes the conditioning cache holds (on the text encoders' device)."""
    return sum(conditioning_bytes(c) for c in list((state or STATE).conditions.values()))


# -- model files ------------------------------------------------------------------------

def resolve_checkpoint(name: str, cfg: config_module.Config) -> str:
    if not name:
        files = config_module.list_model_files(cfg.path_checkpoints)
        real = [f for f in files if os.path.basename(f) != DEMO_CHECKPOINT_NAME]
        if not files:
            raise RequestError("no checkpoint in the checkpoints folder (config key path_checkpoints): "
                               "put an SDXL .safetensors file there")
        name = (real or files)[0]
    return _resolve(name, cfg.path_checkpoints, "base_model", "checkpoints", "path_checkpoints")


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


def scrub_paths(message: str, cfg: config_module.Config) -> str:
    """Errors go to clients: files under a model folder are named relative to it and a
    folder itself by its config key, never by the server's absolute path."""
    folders = [(str(f), key) for key in ("path_checkpoints", "path_loras", "path_vae", "path_embeddings")
               for f in getattr(cfg, key)] + [(str(cfg.path_outputs), "path_outputs")]
    for folder, key in sorted(folders, key=lambda item: -len(item[0])):
        message = message.replace(folder + os.sep, "").replace(folder, f"<{key}>")
    return message


def performance_lora(settings: flags.PerformanceSettings, checkpoint: LoadedCheckpoint,
                     cfg: config_module.Config) -> tuple[list[tuple[str, float]], str | None]:
    """The performance mode's LoRA (path, weight), unless it is fused into the checkpoint."""
    lora = settings.lora
    if lora is None:
        return [], None
    if lora.file_name in checkpoint.fused_loras:
        return [], f"{lora.file_name} is fused into the checkpoint; not added again"
    try:
        return [(config_module.resolve_model_file(lora.file_name, cfg.path_loras), lora.weight)], lora.file_name
    except FileNotFoundError:
        pass
    if _downloads_allowed(cfg):
        from modules import model_downloader
        dest = os.path.join(str(cfg.path_loras[0]), lora.file_name)
        if model_downloader.download_file(lora.url, dest):
            return [(dest, lora.weight)], lora.file_name
    raise RequestError(f"performance '{settings.performance}' needs the LoRA file {lora.file_name} in the "
                       f"LoRA folder (config key path_loras; download it from {lora.url})")


def _downloads_allowed(cfg: config_module.Config) -> bool:
    return cfg.downloads


# -- one request ------------------------------------------------------------------------

@dataclass
class RequestProgress:
    """What a request has finished so far: a retry after an out-of-memory goes on from here
    instead of making (and saving) the finished images again."""

    writes: list = field(default_factory=list)       # futures of committed image files
    next_image: int = 0
    patchers: list[ModelPatcher] = field(default_factory=list)   # what the request needs resident


def process_request(request: dict, control: "TaskControl | None" = None,
                    progress: Callable[[ProgressEvent], None] | None = None) -> RequestResult:
    """Run one request; bad input and failures come back as report["error"].

    An out-of-memory frees what the request does not need and retries once; a second one
    fails the request alone, saying what it needed and what the budget is."""
    manager = model_management.get_manager()
    started = time.perf_counter()
    manager.begin_request()
    compile_mark = core.UNET_COMPILER.mark()
    report: dict[str, Any] = {"mode": manager.settings.policy.value, "seed": -1}   # seed: set once known
    stage_ms = {"text_encode": 0.0, "sampling": 0.0, "vae_decode": 0.0, "save_images": 0.0}
    counts = {"text_encodes": 0, "oom_retries": 0}
    done = RequestProgress()
    images: list[str] = []
    for attempt in (1, 2):
        oom = None
        try:
            images = _run(request, control, progress, report, stage_ms, counts, done)
        except torch.OutOfMemoryError as error:
            oom = str(error).splitlines()[0] if str(error) else "out of memory"
        except StopRequested:
            report["stopped"] = True
            images = _finished_writes(done.writes)   # a Stop keeps the images already done
        except (RequestError, CheckpointError, LoraError, config_module.ConfigError) as error:
            report["error"] = str(error)
        except ValueError as error:  # unknown sampler/scheduler, bad aspect ratio...
            report["error"] = str(error)
        except Exception as error:  # keep serving whatever went wrong
            log.exception("request failed")
            report["error"] = f"internal error: {type(error).__name__}: {error}"
        if oom is None:
            break
        # Here, outside the `except`, the traceback and the activations it held are gone.
        needed = manager.request_peak_bytes()
        budget = manager.effective_budget
        manager.recover_from_oom(keep_loaded=done.patchers)
        report["out_of_memory"] = {"message": oom, "needed_bytes": needed, "budget_bytes": budget,
                                   "effective_budget_bytes": manager.effective_budget}
        if attempt == 1:
            counts["oom_retries"] += 1
            continue
        report["error"] = (f"out of memory on {manager.device} twice: the request needed about "
                           f"{needed / model_management.GIB:.2f} GB (models, patches and working memory) "
                           f"with a budget of {budget / model_management.GIB:.2f} GB; the effective budget is "
                           f"now {manager.effective_budget / model_management.GIB:.2f} GB. Try a smaller size "
                           f"or fewer images")
    summary = manager.end_request()
    report["compile"] = core.UNET_COMPILER.report_since(compile_mark)   # ran compiled? compiled?
    if "error" in report:
        images = []
        report["error"] = _client_error(report["error"])
    _finish_report(report, summary, started, stage_ms, counts, images)
    return RequestResult(images=images, report=report)


def _finished_writes(writes: list[concurrent.futures.Future]) -> list[str]:
    paths = []
    for write in writes:
        try:
            paths.append(write.result().path)
        except Exception:
            log.exception("writing an image failed")
    return paths


def _stage_event(progress, stage: str, message: str, index: int = 0, count: int = 1,
                 step: int = 0, steps: int = 1, image: str | None = None) -> None:
    if progress is not None:
        progress(ProgressEvent(index, count, step, steps, message, stage=stage, image=image))


def _client_error(message: str) -> str:
    try:
        return scrub_paths(message, config_module.get_config())
    except Exception:   # a config that cannot load: the message as it is
        return message


def _run(request: dict, control, progress, report: dict, stage_ms: dict, counts: dict,
         done: RequestProgress) -> list[str]:
    cfg = preset_config(request)
    req = GenerationRequest.from_dict(request, cfg)
    prompt, tag_loras = split_lora_tags(req.prompt)
    if len(req.loras) + len(tag_loras) > cfg.max_loras_per_request:
        raise RequestError(f"{len(req.loras) + len(tag_loras)} LoRAs (field 'loras' and <lora:...> tags in field "
                           f"'prompt'); at most {cfg.max_loras_per_request} (config key max_loras_per_request)")
    for name, weight in tag_loras:
        check_lora_weight(weight, f"field 'prompt': tag <lora:{name}>", cfg)
    settings = flags.performance_settings(req.performance)
    sampler = settings.sampler or req.sampler
    scheduler = settings.scheduler or req.scheduler
    cfg_scale = settings.cfg_scale if settings.cfg_scale is not None else req.guidance_scale
    steps = req.steps or settings.steps
    core.make_scheduler(sampler, scheduler)  # fail on unknown names before loading anything
    styled = sdxl_styles.apply_styles(prompt, req.negative_prompt, req.styles,
                                      sdxl_styles.get_library(cfg.path_styles))
    positive_text, negative_text = sdxl_styles.join(styled.positive), sdxl_styles.join(styled.negative)
    seed = req.seed if req.seed >= 0 else random.randint(0, MAX_SEED - MAX_IMAGES)
    report.update(seed=seed, performance=str(req.performance), sampler=sampler, scheduler=scheduler,
                  steps=steps, cfg=cfg_scale, width=req.width, height=req.height,
                  image_number=req.image_number, styles=list(req.styles))
    if isinstance(request.get("preset"), str) and request["preset"]:
        report["preset"] = request["preset"]

    _stage_event(progress, "loading", "Loading models", count=req.image_number)
    base = get_checkpoint(resolve_checkpoint(req.base_model, cfg))
    if base.kind != "base":
        raise RequestError(f"field 'base_model': {model_name(base.file.path, cfg.path_checkpoints)} is an SDXL "
                           f"refiner; choose it as refiner_model")
    user_loras = [(resolve_lora(name, cfg), weight) for name, weight in req.loras + tag_loras]
    perf_loras, perf_note = performance_lora(settings, base, cfg)

    refiner = None
    if req.refiner_model and req.refiner_model != flags.NONE_NAME and settings.refiner_enabled \
            and req.refiner_switch < 1.0:
        refiner = get_checkpoint(resolve_checkpoint(req.refiner_model, cfg))
        if refiner is base:
            # As upstream: the base as its own refiner would only swap LoRA patches mid-sampling.
            report["refiner_model"] = "disabled: the refiner is the base model"
            refiner = None
        else:
            report["refiner_model"] = model_name(refiner.file.path, cfg.path_checkpoints)
    models = patched_models(base, user_loras + perf_loras, refiner)
    done.patchers = [models.unet, models.clip]
    if refiner is not None:
        done.patchers += [models.refiner_unet or refiner.unet, models.refiner_clip or refiner.clip]
    report.update(base_model=model_name(base.file.path, cfg.path_checkpoints),
                  loras=[{**entry, "file": model_name(path, cfg.path_loras)}
                         for entry, (path, _) in zip(models.loras, user_loras + perf_loras)])
    if refiner is not None:
        report["refiner_loras"] = models.refiner_loras
    if models.warnings:
        report["warnings"] = list(models.warnings)
    if perf_note:
        report["performance_lora"] = perf_note
    check_prompt_tokens("prompt", prompt, base.tokenizers, cfg)
    check_prompt_tokens("negative_prompt", req.negative_prompt, base.tokenizers, cfg)

    if req.vae not in ("", flags.DEFAULT_VAE, flags.NONE_NAME):
        vae = get_vae(req.vae, cfg)
        report["vae"] = req.vae
    else:
        vae = base.vae or (refiner.vae if refiner is not None else None)
    if vae is None:
        raise RequestError(f"{report['base_model']} has no VAE: choose one from the VAE folder "
                           f"(config key path_vae; request field 'vae')")
    done.patchers.append(vae)
    positive_texts = expanded_prompts(prompt, styled, [seed + i for i in range(req.image_number)], cfg,
                                      stage_ms, report) if styled.expansion else [positive_text] * req.image_number
    stage_sets: dict[str, list[core.UNetStage]] = {}
    _stage_event(progress, "encoding", "Encoding the prompt", count=req.image_number)
    with _stage(stage_ms, "text_encode"):
        folders, limit = cfg.path_embeddings, int(cfg.max_conditioning_cache_mb * 2 ** 20)
        for text in dict.fromkeys(positive_texts[done.next_image:]):   # each different text once
            stages = [core.UNetStage(models.unet, encode(models.clip, base.tokenizers, text, counts, folders, limit),
                                     encode(models.clip, base.tokenizers, negative_text, counts, folders, limit))]
            if refiner is not None:
                refiner_clip = models.refiner_clip or refiner.clip
                stages.append(core.UNetStage(models.refiner_unet or refiner.unet,
                                             encode(refiner_clip, refiner.tokenizers, text, counts, folders, limit),
                                             encode(refiner_clip, refiner.tokenizers, negative_text, counts,
                                                    folders, limit),
                                             refiner=refiner.kind == "refiner"))
            stage_sets[text] = stages
    switch = round(steps * req.refiner_switch) if refiner is not None else None
    tweaks = sampling_guidance(req, settings)
    report["guidance"] = asdict(tweaks)

    writes = done.writes
    skipped: list[int] = []
    announced: list[str] = []

    def announce(wait: bool) -> None:
        """Tell the page about images written since the last call (from this thread only)."""
        for write in writes[len(announced):]:
            if not (wait or write.done()) or write.exception() is not None:
                return
            announced.append(write.result().path)
            _stage_event(progress, "saving", f"Saved image {len(announced)}/{req.image_number}",
                         len(announced) - 1, req.image_number, steps, steps, image=announced[-1])

    for index in range(done.next_image, req.image_number):
        _check_stop(control)
        image_seed = seed + index

        def on_step(step: int, total: int, latents: torch.Tensor | None = None, index: int = index) -> None:
            _check_stop(control)
            announce(wait=False)
            if control is not None and control.skip.is_set():
                control.skip.clear()
                skipped.append(index)
                raise core.SkipImage()
            if progress is not None:
                preview = (latent_preview(latents) if latents is not None
                           and (step % PREVIEW_EVERY == 0 or step == total) else None)
                progress(ProgressEvent(index, req.image_number, step, total,
                                       f"Sampling image {index + 1}/{req.image_number}, step {step}/{total}",
                                       preview=preview))

        with _stage(stage_ms, "sampling"):
            latents = core.sample(stage_sets[positive_texts[index]], sampler=sampler, scheduler=scheduler, steps=steps, cfg=cfg_scale,
                                  width=req.width, height=req.height, seed=image_seed,
                                  shape=core.latent_shape(models.unet, vae, req.width, req.height),
                                  switch_step=switch, callback=on_step, guidance=tweaks)
        if skipped and skipped[-1] == index:   # Skip: the unfinished image is dropped
            done.next_image = index + 1
            _stage_event(progress, "skipped", f"Skipped image {index + 1}/{req.image_number}",
                         index, req.image_number, steps, steps)
            continue
        _stage_event(progress, "decoding", f"Decoding image {index + 1}/{req.image_number}",
                     index, req.image_number, steps, steps)
        with _stage(stage_ms, "vae_decode"):
            pixels = core.decode(vae, latents, req.width, req.height)
        # Encoding and the file commit run on the writer thread while the next image samples.
        write = IMAGE_WRITER.submit(save_image, pixels, {
            **_echo(req, prompt), "full_prompt": positive_texts[index], "full_negative_prompt": negative_text,
            "seed": image_seed, "sampler": sampler, "scheduler": scheduler, "steps": steps,
            "cfg": cfg_scale, "base_model": report["base_model"], "loras": report["loras"]}, cfg, req.output_format)
        writes.append(write)
        done.next_image = index + 1
        announce(wait=False)
    _stage_event(progress, "saving", "Saving images", req.image_number - 1, req.image_number, steps, steps)
    with _stage(stage_ms, "save_images"):   # only the part that did not overlap: waiting for the commits
        saved = [write.result() for write in writes]
    announce(wait=True)
    report["seeds"] = [seed + i for i in range(req.image_number) if i not in skipped]
    if skipped:
        report["skipped"] = [seed + i for i in skipped]
    report["output_format"] = req.output_format
    warnings = sorted({s.warning for s in saved if s.warning})
    if warnings:
        report["warnings"] = report.get("warnings", []) + warnings
    return [s.path for s in saved]


def preset_config(request: Any) -> config_module.Config:
    """The config a request's defaults come from: the process's, or with the request's
    `preset` (presets/NAME.json) laid over config.txt instead of --preset's."""
    name = request.get("preset") if isinstance(request, dict) else None
    if name in (None, ""):
        return config_module.get_config()
    if not isinstance(name, str):
        raise RequestError(f"field 'preset' must be a preset name, got {name!r}")
    return config_module.with_preset(name)


def expanded_prompts(prompt: str, styled: sdxl_styles.StyledPrompt, seeds: list[int], cfg: config_module.Config,
                     stage_ms: dict, report: dict) -> list[str]:
    """Per image: the styled texts plus the Fooocus V2 expansion of the prompt with that image's
    seed (as upstream, the expansion comes last and starts with the prompt itself)."""
    from modules import expansion
    expander = expansion.get_expansion(cfg.path_fooocus_expansion, _downloads_allowed(cfg))
    stage_ms.setdefault("prompt_expansion", 0.0)
    with _stage(stage_ms, "prompt_expansion"):
        expanded = [expander(prompt, seed) for seed in seeds]
    report["prompt_expansions"] = expanded
    return [sdxl_styles.join([*styled.positive, text]) for text in expanded]


def sampling_guidance(req: GenerationRequest, settings: flags.PerformanceSettings) -> guidance.Guidance:
    """Sharpness and ADM scaling of a request; the distilled modes turn both off, as upstream."""
    if settings.is_distilled:
        return guidance.Guidance(sharpness=settings.sharpness or 0.0)
    return guidance.Guidance(sharpness=req.sharpness, adm_positive=req.adm_scaler_positive,
                             adm_negative=req.adm_scaler_negative, adm_end=req.adm_scaler_end)


def _echo(req: GenerationRequest, prompt: str) -> dict:
    data = asdict(req)
    data.update(prompt=prompt, performance=str(req.performance))
    return data


def _check_stop(control) -> None:
    if control is not None and control.stop.is_set():
        raise StopRequested()


class _stage:
    """Times a stage, minus the model-management time spent inside it."""

    def __init__(self, stage_ms: dict, name: str) -> None:
        self.stage_ms, self.name = stage_ms, name

    def __enter__(self) -> None:
        from ldm_patched.modules import telemetry
        self.mm_before = telemetry.COUNTERS.management_seconds
        self.start = time.perf_counter()

    def __exit__(self, *exc) -> None:
        from ldm_patched.modules import telemetry
        _synchronize()
        mm = telemetry.COUNTERS.management_seconds - self.mm_before
        self.stage_ms[self.name] += (time.perf_counter() - self.start - mm) * 1000


def _synchronize() -> None:
    device = model_management.get_manager().device
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _switch_served(counters) -> str:
    """How the request reached its patch sets: nothing to do, kept variants, merges, or both."""
    merged = counters.weights_patched - counters.weights_from_variants
    if counters.weights_from_variants and merged:
        return "variants+merge"
    if counters.weights_from_variants:
        return "variants"
    if merged:
        return "merge"
    return "restore" if counters.weights_restored else "none"


def _finish_report(report: dict, summary: model_management.RequestSummary, started: float,
                   stage_ms: dict, counts: dict, images: list[str]) -> None:
    counters = summary.counters
    report["timings_ms"] = {"total": round((time.perf_counter() - started) * 1000, 3),
                            "model_management": round(counters.management_seconds * 1000, 3),
                            **{k: round(v, 3) for k, v in stage_ms.items()}}
    report["model_management"] = {**counters.as_report(), "text_encodes": counts["text_encodes"],
                                  "over_budget": summary.over_budget, "oom_retries": counts["oom_retries"],
                                  "switch": _switch_served(counters),
                                  "conditioning_cache_bytes": conditions_cache_bytes()}
    report["vram"] = {"budget_bytes": summary.budget_bytes, "resident_bytes": summary.resident_bytes,
                      "peak_allocated_bytes": summary.peak_allocated_bytes,
                      "effective_budget_bytes": summary.effective_budget_bytes,
                      "host_resident_bytes": summary.host_resident_bytes}
    report["images"] = images
    mm = report["model_management"]
    print(f"[Fooocus-Resident] {report['mode']}: {len(images)} image(s) in {report['timings_ms']['total']:.0f} ms; "
          f"model management {report['timings_ms']['model_management']:.1f} ms, "
          f"{mm['bytes_to_device'] / 2**20:.1f} MiB to device, {mm['bytes_to_offload'] / 2**20:.1f} MiB offloaded, "
          f"{mm['models_loaded']} loaded, {mm['weights_patched']} weights patched, "
          f"{mm['weights_restored']} restored, {mm['lora_files_read']} LoRA files read"
          + (f"; error: {report['error']}" if "error" in report else ""))


# -- outputs ------------------------------------------------------------------------------

def save_image(pixels: np.ndarray, parameters: dict, cfg: config_module.Config,
               fmt: str = "png") -> image_output.SavedImage:
    """The image file under outputs/<date>/ (the temp folder without the image log, or
    when the output folder cannot be written), with the generation parameters in its
    metadata unless --disable-metadata. Runs on the writer thread."""
    now = datetime.datetime.now()
    day = now.strftime("%Y-%m-%d")
    fallback = cfg.temp_root / day
    folder = Path(cfg.path_outputs) / day if cfg.image_log else fallback
    stem = f"{now.strftime('%Y-%m-%d_%H-%M-%S')}_{parameters['seed']}"
    saved = image_output.save(pixels, parameters, fmt, folder, fallback, stem, metadata=cfg.metadata)
    if cfg.image_log and not saved.warning:   # the history log lists what is in the day's folder
        history_log.append(str(folder), saved.path, parameters)
    return saved


def flush_writer() -> None:
    """Wait for every queued image file to be committed (shutdown)."""
    IMAGE_WRITER.submit(lambda: None).result()


def model_status() -> dict:
    status = model_management.get_manager().status()
    status["checkpoints"] = [os.path.basename(c.file.path) for c in STATE.checkpoints.values()]
    status["lora_files_cached"] = len(STATE.lora_files)
    status["lora_files"] = [{"name": f.name, "bytes": p.nbytes()}
                            for f, p in list(getattr(STATE.lora_files, "_files", {}).items())]
    status["conditioning_cache"] = {"entries": len(STATE.conditions), "bytes": conditions_cache_bytes()}
    from modules import expansion
    status["prompt_expansion"] = expansion.status()
    return status


def demo_model_in_use() -> str | None:
    names = [os.path.basename(c.file.path) for c in STATE.checkpoints.values()]
    cfg = config_module.get_config()
    files = config_module.list_model_files(cfg.path_checkpoints)
    real = [f for f in files if os.path.basename(f) != DEMO_CHECKPOINT_NAME]
    if DEMO_CHECKPOINT_NAME in names or (files and not real):
        return (f"The built-in demo checkpoint ({DEMO_CHECKPOINT_NAME}) has random weights and draws noise. "
                f"Put a real SDXL checkpoint (.safetensors) into {cfg.path_checkpoints[0]}.")
    return None
