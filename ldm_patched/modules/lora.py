"""LoRA files -> weight patches for the SDXL UNet and both text encoders.

Where each tensor comes from:
  file (safetensors) --LoraFileCache--> ParsedLora: {base name: LoraFactors}
  base name --key map of the target model--> parameter name of our module
  -> LoraPatch(file identity, base name, factors), a `WeightPatch` for model_patcher.

Formats: kohya names (`lora_unet_<original or diffusers path>`, `lora_te1_`,
`lora_te2_`, `lora_up`/`lora_down`/`lora_mid`/`alpha`, `diff`), diffusers/peft
names (`unet.<path>.lora_A/lora_B`, `.lora.up/.lora.down`,
`.lora_linear_layer.up/down`, `text_encoder.` / `text_encoder_2.` with or without
`text_model.`). The published SDXL LCM, Lightning and Hyper-SD LoRAs use kohya
names over diffusers or original block paths, both covered by the key map.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Hashable, Iterable

import torch

from ldm_patched.modules import telemetry
from ldm_patched.modules.file_version import FileReadError, FileVersion, read_safetensors


class LoraError(ValueError):
    """A LoRA file that cannot be used; the message names the file and the reason."""


# The old name, kept for code written before the rename (every model file uses it now).
LoraFileId = FileVersion


def _version(path: str) -> FileVersion:
    try:
        return FileVersion.of(path)
    except FileReadError as error:
        raise LoraError(f"LoRA file {error}") from error


@dataclass(eq=False)
class LoraFactors:
    """One layer's low-rank change: delta = alpha/rank * up @ (mid) @ down; or a full diff."""

    up: torch.Tensor | None = None
    down: torch.Tensor | None = None
    mid: torch.Tensor | None = None
    alpha: float | None = None
    diff: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        assert self.down is not None
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.rank

    def delta_shape(self) -> tuple[int, ...]:
        if self.diff is not None:
            return tuple(self.diff.shape)
        assert self.up is not None and self.down is not None
        if self.mid is not None:
            return (self.up.shape[0], self.down.shape[1], *self.mid.shape[2:])
        return (self.up.shape[0], *self.down.shape[1:])

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.up, self.down, self.mid, self.diff) if t is not None]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


def _fits(factors: LoraFactors, shape: torch.Size) -> bool:
    want = factors.delta_shape()
    if tuple(want) == tuple(shape):
        return True
    # A linear LoRA on a 1x1 conv (or the reverse) differs only by trailing ones.
    numel = lambda s: int(torch.Size(s).numel())  # noqa: E731
    return numel(want) == numel(shape) and want[:2] == tuple(shape[:2])


def _prepared(factors: LoraFactors, device: torch.device) -> tuple[torch.Tensor | None, ...]:
    """(up, down, mid, diff) as float32 on `device`, up/down flattened to 2-D matrices."""
    f32 = lambda t: None if t is None else t.to(device, torch.float32, non_blocking=True)  # noqa: E731
    up, down = f32(factors.up), f32(factors.down)
    return (None if up is None else up.flatten(1), None if down is None else down.flatten(1),
            f32(factors.mid), f32(factors.diff))


def added_delta(base: torch.Tensor, factors: LoraFactors, alpha: float,
                prepared: tuple[torch.Tensor | None, ...]) -> torch.Tensor:
    """base + alpha * delta as a new tensor, in one kernel where the layout allows."""
    up, down, mid, diff = prepared
    if diff is not None:
        return base.add(diff.reshape(base.shape), alpha=alpha)
    alpha *= factors.scale
    if mid is not None:
        # Tucker-decomposed conv (LoCon): up[p,i] * mid[i,j,k,l] * down[j,r] -> [p,r,k,l]
        delta = torch.einsum("ijkl,jr,pi->prkl", mid, down, up)
        return base.add(delta.reshape(base.shape), alpha=alpha)
    # Linear and conv LoRAs alike are one matrix product on the weight's 2-D view.
    return torch.addmm(base.reshape(base.shape[0], -1), up, down, alpha=alpha).view(base.shape)


@dataclass(eq=False)
class LoraPatch:
    """A `WeightPatch` (see model_patcher): one layer of one LoRA file version."""

    file: FileVersion
    name: str
    factors: LoraFactors
    _on_device: dict[torch.device, tuple[torch.Tensor | None, ...]] = field(default_factory=dict)

    @property
    def identity(self) -> Hashable:
        return (self.file, self.name)

    def added(self, base: torch.Tensor, alpha: float, cache: bool = False) -> torch.Tensor:
        device = base.device
        prepared = self._on_device.get(device)
        if prepared is None:
            prepared = _prepared(self.factors, device)
            if cache and device.type != "cpu":
                # float32 and flattened once: a later switch launches only the matmul.
                self._on_device[device] = prepared
        return added_delta(base, self.factors, alpha, prepared)

    def cached_bytes(self, device: torch.device) -> int:
        return sum(t.numel() * t.element_size() for t in self._on_device.get(device, ()) if t is not None)

    def drop_cache(self) -> None:
        self._on_device.clear()


# -- parsing files ------------------------------------------------------------------

# Suffix -> (factor field) for every naming scheme we read.
_SUFFIXES: tuple[tuple[str, str], ...] = (
    (".lora_up.weight", "up"), (".lora_down.weight", "down"), (".lora_mid.weight", "mid"),
    (".lora_B.weight", "up"), (".lora_A.weight", "down"),
    (".lora.up.weight", "up"), (".lora.down.weight", "down"),
    (".lora_linear_layer.up.weight", "up"), (".lora_linear_layer.down.weight", "down"),
    (".alpha", "alpha"), (".diff", "diff"),
)


@dataclass(eq=False)
class ParsedLora:
    file: FileVersion
    layers: dict[str, LoraFactors]
    ignored: list[str]

    def nbytes(self) -> int:
        return sum(f.nbytes() for f in self.layers.values())


def peft_alphas(metadata: dict[str, str] | None) -> dict[str, tuple[float, dict[str, float]]]:
    """diffusers/peft files carry no `.alpha` tensors; their alpha is in the file's
    `lora_adapter_metadata` JSON, per target prefix: {"unet.lora_alpha": 8, "unet.r": 4,
    "unet.alpha_pattern": {...}}. Returns prefix -> (alpha, per-module overrides)."""
    import json

    try:
        config = json.loads((metadata or {}).get("lora_adapter_metadata", "") or "{}")
    except ValueError:
        return {}
    alphas = {}
    for key, value in config.items():
        prefix, _, field = key.rpartition(".")
        if field == "lora_alpha" and isinstance(value, (int, float)):
            patterns = config.get(f"{prefix}.alpha_pattern") or {}
            alphas[prefix] = (float(value), {k: float(v) for k, v in patterns.items()})
    return alphas


def _peft_alpha(name: str, alphas: dict[str, tuple[float, dict[str, float]]]) -> float | None:
    prefix, _, module = name.partition(".")
    if prefix not in alphas:
        return None
    alpha, patterns = alphas[prefix]
    for pattern, value in patterns.items():
        if module == pattern or module.endswith("." + pattern):
            return value
    return alpha


def parse_lora_tensors(file: FileVersion, tensors: dict[str, torch.Tensor],
                       metadata: dict[str, str] | None = None) -> ParsedLora:
    layers: dict[str, LoraFactors] = {}
    ignored = []
    for key, tensor in tensors.items():
        for suffix, role in _SUFFIXES:
            if key.endswith(suffix):
                factors = layers.setdefault(key[: -len(suffix)], LoraFactors())
                if role == "alpha":
                    factors.alpha = float(tensor.float().item())
                else:
                    setattr(factors, role, tensor)
                break
        else:
            ignored.append(key)
    alphas = peft_alphas(metadata)
    for name, factors in list(layers.items()):
        low_rank = factors.up is not None and factors.down is not None
        if not low_rank and factors.diff is None:
            del layers[name]
            ignored.append(name)
        elif factors.alpha is None:
            factors.alpha = _peft_alpha(name, alphas)
    return ParsedLora(file=file, layers=layers, ignored=ignored)


def read_lora_file(path: str) -> ParsedLora:
    """Parse a LoRA file; its tensors are read into private memory (never a map of the
    file), so rewriting or truncating the file later cannot change a loaded LoRA."""
    name = os.path.basename(path)
    if not path.endswith(".safetensors"):
        raise LoraError(f"LoRA file {name}: only .safetensors LoRA files are read "
                        f"(pickled files can run code)")
    try:
        file, tensors, metadata = read_safetensors(path)
    except FileReadError as error:
        raise LoraError(f"LoRA file {name} is not a readable safetensors file: {error.reason}") from error
    except OSError as error:
        raise LoraError(f"LoRA file {name} cannot be read: {error.strerror or error}") from error
    if torch.cuda.is_available():
        # Pinned pages let the copies to the GPU run asynchronously and at full speed.
        tensors = {k: v.pin_memory() for k, v in tensors.items()}
    telemetry.count(lora_files_read=1)
    parsed = parse_lora_tensors(file, tensors, metadata)
    if not parsed.layers:
        raise LoraError(f"LoRA file {file.name} holds no LoRA layers (first keys: "
                        f"{', '.join(list(tensors)[:3]) or 'none'})")
    return parsed


class LoraFileCache:
    """Parsed LoRA files by version, least-recently-used out past `max_bytes`."""

    def __init__(self, max_bytes: int = 8 * 1024 ** 3) -> None:
        self.max_bytes = max_bytes
        self._files: "OrderedDict[FileVersion, ParsedLora]" = OrderedDict()

    def get(self, path: str) -> ParsedLora:
        file = _version(path)
        parsed = self._files.get(file)
        if parsed is None:
            parsed = read_lora_file(file.path)
            file = parsed.file   # the version actually read
            self.forget_path(file.path, keep=file)   # a new version replaces the old one at once
            self._files[file] = parsed
            self._trim(keep=file)
        self._files.move_to_end(file)
        return parsed

    def forget_path(self, path: str, keep: FileVersion | None = None) -> None:
        """Drop every cached version of `path` other than `keep`."""
        for old in [f for f in self._files if f.path == path and f != keep]:
            del self._files[old]

    def _trim(self, keep: FileVersion) -> None:
        while sum(p.nbytes() for p in self._files.values()) > self.max_bytes and len(self._files) > 1:
            oldest = next(iter(self._files))
            if oldest == keep:
                break
            del self._files[oldest]

    def __contains__(self, file: FileVersion) -> bool:
        return file in self._files

    def __len__(self) -> int:
        return len(self._files)


# -- key maps -----------------------------------------------------------------------

def _underscored(path: str) -> str:
    return path.replace(".", "_")


def unet_lora_names(unet: torch.nn.Module) -> dict[str, str]:
    """LoRA base names (every scheme) -> UNet parameter name (diffusers layout)."""
    from ldm_patched.modules.sdxl_layout import unet_key_map

    to_original = unet_key_map(dict(unet.config))
    names: dict[str, str] = {}
    for key, _ in unet.named_parameters():
        module, _, kind = key.rpartition(".")
        if kind != "weight":
            continue
        names[f"lora_unet_{_underscored(module)}"] = key
        names[f"unet.{module}"] = key
        original = to_original.get(key)
        if original is not None:
            original_module = original.rpartition(".")[0]
            names[f"lora_unet_{_underscored(original_module)}"] = key
            names[f"unet.{original_module}"] = key
    return names


def text_encoder_lora_names(encoders: torch.nn.Module) -> dict[str, str]:
    """LoRA base names -> parameter names of the text-encoder pair module.

    The pair module holds `text_encoder` (CLIP-L) and `text_encoder_2` (CLIP-G),
    so its own parameter names are the diffusers/peft names.
    """
    prefixes = {"text_encoder": ("lora_te1_", "lora_te_"), "text_encoder_2": ("lora_te2_",)}
    names: dict[str, str] = {}
    for key, _ in encoders.named_parameters():
        module, _, kind = key.rpartition(".")
        if kind != "weight":
            continue
        encoder, _, inner = module.partition(".")
        names[module] = key
        if inner.startswith("text_model."):
            names[f"{encoder}.{inner[len('text_model.'):]}"] = key
        for prefix in prefixes.get(encoder, ()):
            names[prefix + _underscored(inner)] = key
    return names


@dataclass
class LoraMatch:
    """The patches one LoRA file gives each target, and what matched nothing."""

    file: FileVersion
    patches: dict[str, dict[str, LoraPatch]]   # target -> parameter name -> patch
    unmatched: list[str]

    @property
    def matched_count(self) -> int:
        return sum(len(p) for p in self.patches.values())


def match_lora(parsed: ParsedLora, targets: dict[str, tuple[dict[str, str], torch.nn.Module]]) -> LoraMatch:
    """Map every layer of a parsed LoRA onto the targets' parameters, checking shapes.

    `targets`: name -> (LoRA base name -> parameter name, module).
    """
    patches: dict[str, dict[str, LoraPatch]] = {name: {} for name in targets}
    unmatched = list(parsed.ignored)
    for base, factors in parsed.layers.items():
        for target, (names, module) in targets.items():
            key = names.get(base)
            if key is None:
                continue
            shape = module.get_parameter(key).shape
            if not _fits(factors, shape):
                raise LoraError(f"LoRA file {parsed.file.name}: layer {base} has shape "
                                f"{tuple(factors.delta_shape())} but {target} weight {key} is {tuple(shape)} "
                                f"(a LoRA for another model?)")
            patches[target][key] = LoraPatch(parsed.file, base, factors)
            break
        else:
            unmatched.append(base)
    match = LoraMatch(file=parsed.file, patches=patches, unmatched=unmatched)
    if match.matched_count == 0:
        raise LoraError(f"LoRA file {parsed.file.name} matches no key of this SDXL model "
                        f"(first keys: {', '.join(list(parsed.layers)[:3])}); is it a LoRA for another architecture?")
    return match
