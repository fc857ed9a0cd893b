"""The model catalogue: files on disk -> the loaded models a request uses, kept between requests.

`ModelCatalogue` owns what outlives a request: loaded checkpoints (one per file version; a
rewritten file is another checkpoint, which replaces the old one), standalone VAEs, parsed
LoRA files and the patchers of recent LoRA sets, encoded prompts, and the input-image models
(upscalers, image prompts, ControlNets, inpaint patches). It registers with the memory ledger
what it keeps on each device, so the policy (`model_management`) can count and free it.

It moves no weight: the request stages (`default_pipeline.Pipeline`) ask the ledger for
that before each stage. The worker thread owns the pipeline and so this catalogue: no locks.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from ldm_patched.modules import model_management
from ldm_patched.modules.checkpoint import load_checkpoint, load_vae
from ldm_patched.modules.file_version import FileVersion
from ldm_patched.modules.lora import LoraFileCache, LoraMatch, match_lora, text_encoder_lora_names, unet_lora_names
from ldm_patched.modules.model_patcher import ModelPatcher
from ldm_patched.modules.sized_cache import SizedCache
from modules import config as config_module
from modules import controlnet, core, flags, ip_adapter, upscaler
from modules import inpaint as inpaint_mod
from modules.embeddings import EmbeddingCache, EmbeddingError
from modules.generation_request import _resolve as resolve_model
from modules.task_types import RequestError

log = logging.getLogger("fooocus_resident.catalogue")

FUSED_LORAS_METADATA_KEY = "fooocus_resident.fused_loras"
MAX_PATCHED_SETS = 4
MAX_CONDITIONS = 64


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
    part_bytes: dict[int, int] = field(default_factory=dict)   # id(module) -> its bytes, measured once

    def parts(self) -> list[ModelPatcher]:
        return [p for p in (self.unet, self.clip, self.vae) if p is not None]

    def idle_bytes_on(self, device: torch.device, manager: model_management.ModelManager) -> int:
        """Bytes of the parts on `device` that the registry does not hold (never loaded yet,
        or evicted to their offload device): memory the cache keeps that no ledger counts.
        A part's device is its first tensor's (modules move whole), so this is O(parts)."""
        total = 0
        for part in self.parts():
            first = next(part.model.parameters(), None)
            if first is None or first.device != device or manager.holds(part.model):
                continue
            if id(part.model) not in self.part_bytes:
                self.part_bytes[id(part.model)] = part.model_size()
            total += self.part_bytes[id(part.model)]
        return total

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
class CatalogueState:
    checkpoints: "OrderedDict[FileVersion, LoadedCheckpoint]" = field(default_factory=OrderedDict)
    lora_files: LoraFileCache = field(default_factory=LoraFileCache)
    lora_matches: dict[tuple[FileVersion, int, bool], LoraMatch] = field(default_factory=dict)
    embeddings: EmbeddingCache = field(default_factory=EmbeddingCache)
    patched: "OrderedDict[tuple, PatchedModels]" = field(default_factory=OrderedDict)
    # Measured once per entry: the ledger asks for its bytes many times per request.
    conditions: SizedCache[tuple, core.Conditioning] = field(default_factory=lambda: SizedCache(conditioning_bytes))
    vaes: "OrderedDict[FileVersion, ModelPatcher]" = field(default_factory=OrderedDict)   # models/vae files
    # Input-image models (each a model kind in the registry): Upscale/Vary, Image Prompt, the
    # PyraCanny/CPDS ControlNets, Inpaint.
    upscalers: upscaler.UpscalerCache = field(default_factory=upscaler.UpscalerCache)
    image_prompts: ip_adapter.ImagePromptModels = field(default_factory=ip_adapter.ImagePromptModels)
    controlnets: controlnet.ControlNetModels = field(default_factory=controlnet.ControlNetModels)
    inpaint: inpaint_mod.InpaintModels = field(default_factory=inpaint_mod.InpaintModels)
    max_checkpoints: int | None = None   # None: the policy's default (max_cached_checkpoints)

    def conditions_bytes(self) -> int:
        """Bytes the conditioning cache holds (on the text encoders' device)."""
        return self.conditions.nbytes()


def max_cached_checkpoints(manager: model_management.ModelManager) -> int:
    """Upstream keeps a base and a refiner; resident mode keeps a few more in host
    memory so alternating base models does not re-read files."""
    return 4 if manager.resident else 2


def conditioning_bytes(cond: core.Conditioning) -> int:
    return sum(t.numel() * t.element_size() for t in (cond.embeds, cond.pooled) if t is not None)


def _fused_loras(metadata: dict[str, str]) -> list[str]:
    try:
        return [str(item[0]) for item in json.loads(metadata.get(FUSED_LORAS_METADATA_KEY, "[]"))]
    except (ValueError, TypeError, IndexError):
        return []


def _refiner_takes(match: LoraMatch) -> bool:
    """The refiner takes a LoRA when some of its keys fit and none names a refiner layer
    with another shape (that is a LoRA made for the base). Keys the refiner lacks (CLIP-L,
    base-only blocks) are fine: upstream applies the list to the refiner the same way."""
    return match.matched_count > 0 and not match.misfit


def joined_conditioning(conds: list[core.Conditioning], pool_top_k: int) -> core.Conditioning:
    """Upstream's conditioning of several texts, each encoded on its own: their token states
    concatenated, the pooled outputs of the first `pool_top_k` summed."""
    if len(conds) == 1:
        return conds[0]
    pooled = sum(c.pooled for c in conds[:max(pool_top_k, 1)])
    return core.Conditioning(embeds=torch.cat([c.embeds for c in conds], dim=1), pooled=pooled)


def _install_image_prompt_processors(unet: torch.nn.Module) -> None:
    """Image-prompt processors go on every UNet when it is adopted, inactive (bit-exact with
    the originals) until a request applies image prompts. Installed later, at the first
    image prompt, they would change the module under every graph `--compile-unet` had
    compiled, and each shape would compile again."""
    try:
        ip_adapter.install(unet)
    except ip_adapter.ImagePromptError as error:   # a UNet they cannot serve: image prompts say why
        log.info("[Fooocus-Resident] image prompts unavailable for this UNet: %s", error)


class ModelCatalogue:
    """Checkpoints, VAEs, LoRA sets, conditionings and input-image models, by file version.

    `manager` is read per call (the process's ledger can be replaced between tests and by
    `--always-*` flags at start)."""

    def __init__(self) -> None:
        self.state = CatalogueState()

    @property
    def manager(self) -> model_management.ModelManager:
        return model_management.get_manager()

    # -- checkpoints and VAEs -------------------------------------------------------------

    def get_checkpoint(self, path: str) -> LoadedCheckpoint:
        manager = self.manager
        file = FileVersion.of(path)
        cached = self.state.checkpoints.get(file)
        if cached is not None:
            self.state.checkpoints.move_to_end(file)
            return cached
        self._drop_other_versions(file)   # before loading: the old version's memory is freed first
        started = time.perf_counter()
        loaded = load_checkpoint(file.path, unet_dtype=manager.dtype_for("unet"),
                                 vae_dtype=manager.dtype_for("vae", manager.vae_device()),
                                 text_encoder_dtype=manager.dtype_for("text_encoder"),
                                 unet_storage_dtype=manager.storage_dtype_for("unet"),
                                 text_encoder_storage_dtype=manager.storage_dtype_for("text_encoder"))
        file = loaded.version or file   # the version actually read
        checkpoint = self.adopt_checkpoint(file, loaded.kind, {"unet": loaded.unet, "vae": loaded.vae,
                                                               "text_encoder": loaded.text_encoder,
                                                               "text_encoder_2": loaded.text_encoder_2},
                                           (loaded.tokenizer, loaded.tokenizer_2), _fused_loras(loaded.metadata))
        log.info("[Fooocus-Resident] loaded %s (%s) in %.2f s", os.path.basename(file.path), loaded.kind,
                 time.perf_counter() - started)
        return checkpoint

    def adopt_checkpoint(self, file: FileVersion, kind: str, components: dict[str, torch.nn.Module | None],
                         tokenizers: tuple, fused_loras: list[str] | None = None) -> LoadedCheckpoint:
        """Wrap loaded modules in patchers and cache them under `file`.

        Benchmarks use this directly with modules built on the device (no file to read)."""
        manager = self.manager
        device, offload = manager.settings.device, manager.offload_device()
        name = os.path.basename(file.path)
        encoders = core.SDXLTextEncoders(components.get("text_encoder"), components["text_encoder_2"])
        vae = components.get("vae")
        _install_image_prompt_processors(components["unet"])
        checkpoint = LoadedCheckpoint(
            file=file, kind=kind,
            unet=ModelPatcher(components["unet"], device, offload, name=f"{name}:unet"),
            clip=ModelPatcher(encoders, device, offload, name=f"{name}:text_encoders"),
            vae=None if vae is None else ModelPatcher(vae, manager.vae_device(), offload, name=f"{name}:vae"),
            tokenizers=tokenizers,
            fused_loras=fused_loras or [],
        )
        checkpoints = self.state.checkpoints
        checkpoints[file] = checkpoint
        if manager.normalize(model_management.HOST) != manager.device:
            # With an accelerator, evicting a part moves it to the host, where the cache keeps
            # it. CPU-only, the host is the device, and its budget is for the models it holds:
            # cached parts that budget cannot free would keep it over itself.
            manager.register_cache("checkpoints", model_management.HOST, self.idle_checkpoint_bytes)
        while len(checkpoints) > (self.state.max_checkpoints or max_cached_checkpoints(manager)):
            self._drop_checkpoint(next(iter(checkpoints.values())))
        return checkpoint

    def get_vae(self, name: str, cfg: config_module.Config) -> ModelPatcher:
        """A standalone VAE from the VAE folders, loaded once per file version."""
        file = FileVersion.of(resolve_model(name, cfg.path_vae, "vae", "VAE", "path_vae"))
        vaes = self.state.vaes
        cached = vaes.get(file)
        if cached is not None:
            vaes.move_to_end(file)
            return cached
        manager = self.manager
        for old in [f for f in vaes if f.path == file.path]:   # a new version replaces the old one
            manager.forget(vaes.pop(old).model)
        vae = load_vae(file.path, dtype=manager.dtype_for("vae", manager.vae_device()))
        patcher = ModelPatcher(vae, manager.vae_device(), manager.offload_device(), name=f"{file.name}:vae")
        vaes[file] = patcher
        while len(vaes) > (2 if manager.resident else 1):
            _, dropped = vaes.popitem(last=False)
            manager.forget(dropped.model)
        return patcher

    def _drop_other_versions(self, file: FileVersion) -> None:
        """A new version of a checkpoint's path replaces the old one at once: its
        modules leave the registry and every cache that refers to them."""
        for old in [c for f, c in self.state.checkpoints.items() if f.path == file.path and f != file]:
            log.info("[Fooocus-Resident] %s changed on disk: dropping the loaded version", file.name)
            self._drop_checkpoint(old)

    def idle_checkpoint_bytes(self) -> int:
        """Host memory of the cached checkpoints' parts no ledger holds: charged to the host
        ledger, where pinned backups and file caches are planned (only where an accelerator
        is the device; see `adopt_checkpoint`)."""
        manager = self.manager
        host = manager.normalize(model_management.HOST)
        return sum(c.idle_bytes_on(host, manager) for c in list(self.state.checkpoints.values()))

    def _drop_checkpoint(self, checkpoint: LoadedCheckpoint) -> None:
        state = self.state
        for patcher in checkpoint.parts():
            self.manager.forget(patcher.model)
        state.controlnets.drop_for(checkpoint.unet.model)
        del state.checkpoints[checkpoint.file]
        state.patched = OrderedDict((k, v) for k, v in state.patched.items()
                                    if v.checkpoint is not checkpoint and k[2] != id(checkpoint))
        state.lora_matches = {k: v for k, v in state.lora_matches.items() if k[1] != id(checkpoint)}
        state.conditions.clear()

    # -- LoRA sets ------------------------------------------------------------------------

    def patched_models(self, checkpoint: LoadedCheckpoint, loras: list[tuple[str, float]],
                       refiner: LoadedCheckpoint | None = None) -> PatchedModels:
        """Patchers for checkpoint + LoRAs; the same LoRA set returns the same patchers.

        With a `refiner`, the same list goes to it as upstream does, each LoRA only where
        it fits (see `_refiner_takes`); the report says which ones it took."""
        state = self.state
        files = [(FileVersion.of(path), weight) for path, weight in loras]
        self._drop_stale_lora_sets([file for file, _ in files])
        key = (id(checkpoint), tuple(files), None if refiner is None else id(refiner))
        cached = state.patched.get(key)
        if cached is not None:
            state.patched.move_to_end(key)
            return cached
        unet, clip = checkpoint.unet.clone(), checkpoint.clip.clone()
        refiner_unet = refiner_clip = None
        if refiner is not None:
            refiner_unet, refiner_clip = refiner.unet.clone(), refiner.clip.clone()
        report, warnings = [], []
        for (path, weight), (file, _) in zip(loras, files):
            match = self._lora_match(checkpoint, path, file)
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
                refined = self._lora_match(refiner, path, file, strict=False)
                entry["refiner"] = _refiner_takes(refined)
                if entry["refiner"]:
                    entry["refiner_matched_keys"] = len(
                        refiner_unet.add_patches(refined.patches["unet"], weight)
                        + refiner_clip.add_patches(refined.patches["clip"], weight))
            report.append(entry)
        models = PatchedModels(checkpoint=checkpoint, unet=unet, clip=clip, loras=report,
                               refiner_unet=refiner_unet, refiner_clip=refiner_clip, warnings=warnings)
        # Parsed LoRA files are host memory (pinned with a GPU): on the host ledger, freed with the file cache.
        self.manager.register_cache("lora_files", model_management.HOST, lambda: state.lora_files.nbytes())
        state.patched[key] = models
        while len(state.patched) > MAX_PATCHED_SETS:
            state.patched.popitem(last=False)
        return models

    def _drop_stale_lora_sets(self, files: list[FileVersion]) -> None:
        """Patched sets and matches made from an older version of one of `files` are dropped
        at once (their patchers hold the old factors), and so is the old parsed file."""
        state = self.state
        current = {f.path: f for f in files}

        def stale(file: FileVersion) -> bool:
            return file.path in current and file != current[file.path]

        state.patched = OrderedDict((k, v) for k, v in state.patched.items()
                                    if not any(stale(f) for f, _ in k[1]))
        state.lora_matches = {k: v for k, v in state.lora_matches.items() if not stale(k[0])}
        for file in files:
            state.lora_files.forget_path(file.path, keep=file)

    def _lora_match(self, checkpoint: LoadedCheckpoint, path: str, file: FileVersion,
                    strict: bool = True) -> LoraMatch:
        state = self.state
        key = (file, id(checkpoint), strict)
        match = state.lora_matches.get(key)
        if match is None:
            match = match_lora(state.lora_files.get(path), checkpoint.lora_targets(), strict=strict)
            # Matches hold the parsed tensors: keep only those of files the bounded cache keeps.
            state.lora_matches = {k: v for k, v in state.lora_matches.items() if k[0] in state.lora_files}
            state.lora_matches[key] = match
        return match

    # -- prompts --------------------------------------------------------------------------

    def encode_many(self, clip: ModelPatcher, tokenizers: tuple, prompts: list[str], counts: dict,
                    embedding_folders=(), max_cache_bytes: int = 512 * 2 ** 20,
                    clip_skip: int = core.DEFAULT_CLIP_SKIP) -> list[core.Conditioning]:
        """Encode prompts, those not cached each on its own, as upstream does: a prompt's
        conditioning does not depend on what else was encoded with it, so a cached one is the
        one a fresh encode would give (CLIP in a batch of other prompts differs in the last
        bits, which then shows in pixels). In resident mode the same
        prompt under the same text-encoder weights and the same embedding file versions is
        served from the cache, which is bounded in entries and in bytes."""
        manager, state = self.manager, self.state
        weights = clip.weight_signature().digest
        asked: list[tuple[tuple, dict]] = []
        for prompt in prompts:
            try:
                embeddings = state.embeddings.for_prompt(prompt, embedding_folders)
            except EmbeddingError as error:
                raise RequestError(str(error)) from error
            files = tuple(sorted((name, e.file) for name, e in embeddings.items()))
            asked.append(((id(clip.model), weights, prompt, files, clip_skip), embeddings))
        found: dict[tuple, core.Conditioning] = {}
        missing: dict[tuple, dict] = {}
        for key, embeddings in asked:
            if manager.resident and key in state.conditions:
                state.conditions.move_to_end(key)
                found[key] = state.conditions[key]
            else:
                missing[key] = embeddings
        if missing:
            try:
                conds = [core.encode_prompt(clip, tokenizers, key[2], embeddings or None, clip_skip)
                         for key, embeddings in missing.items()]
            except EmbeddingError as error:
                raise RequestError(str(error)) from error
            counts["text_encodes"] += len(missing)
            found.update(zip(missing, conds))
            if manager.resident:
                self._cache_conditions(clip, dict(zip(missing, conds)), max_cache_bytes)
        return [found[key] for key, _ in asked]

    def _cache_conditions(self, clip: ModelPatcher, new: dict[tuple, core.Conditioning], max_bytes: int) -> None:
        conditions = self.state.conditions
        for key, cond in new.items():
            if conditioning_bytes(cond) <= max_bytes:
                conditions[key] = cond
        while len(conditions) > MAX_CONDITIONS or conditions.nbytes() > max_bytes:
            conditions.popitem(last=False)
        # Kept conditionings live on the encoders' device: charged there, freed in the first tier.
        self.manager.register_cache("conditionings", clip.load_device, self.state.conditions_bytes,
                                    conditions.clear)

    def encode_texts(self, clip: ModelPatcher, tokenizers: tuple, texts: tuple[str, ...], pool_top_k: int,
                     counts: dict, embedding_folders=(), max_cache_bytes: int = 512 * 2 ** 20) -> core.Conditioning:
        """Upstream's conditioning of several texts (see `joined_conditioning`), each encoded on
        its own (and cached)."""
        conds = self.encode_many(clip, tokenizers, list(texts), counts, embedding_folders, max_cache_bytes)
        return joined_conditioning(conds, pool_top_k)

    # -- performance LoRAs -------------------------------------------------------------------

    def performance_lora(self, settings: flags.PerformanceSettings, checkpoint: LoadedCheckpoint,
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
        if cfg.downloads:
            from modules import model_downloader
            dest = os.path.join(str(cfg.path_loras[0]), lora.file_name)
            if model_downloader.download_file(lora.url, dest):
                return [(dest, lora.weight)], lora.file_name
        raise RequestError(f"performance '{settings.performance}' needs the LoRA file {lora.file_name} in the "
                           f"LoRA folder (config key path_loras; download it from {lora.url})")

    # -- what it holds ----------------------------------------------------------------------

    def checkpoint_names(self) -> list[str]:
        return [os.path.basename(c.file.path) for c in self.state.checkpoints.values()]

    def status(self) -> dict:
        """Its caches for `/model_status`: checkpoints, parsed LoRA files, conditionings."""
        state = self.state
        return {"checkpoints": self.checkpoint_names(), "lora_files_cached": len(state.lora_files),
                "lora_files": [{"name": f.name, "bytes": n} for f, n in state.lora_files.sizes().items()],
                "conditioning_cache": {"entries": len(state.conditions), "bytes": state.conditions_bytes()}}
