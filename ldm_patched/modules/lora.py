"""LoRA files -> weight patches for the SDXL UNet and both text encoders.

Where each tensor comes from:
  file (safetensors) --LoraFileCache--> ParsedLora: {base name: adapter} (+ bias changes)
  base name --key map of the target model--> parameter name of our module
  -> LoraPatch(file identity, base name, adapter), a `WeightPatch` for model_patcher.

Adapters (lora_adapters.py): LoRA/LoCon (`lora_up`/`lora_down`/`lora_mid`, peft
`lora_A`/`lora_B`, diffusers `.lora.up`, `lora_linear_layer`, attention-processor
`_lora.up`), LoHa (`hada_*`), LoKr (`lokr_*`), GLoRA (`a1`/`a2`/`b1`/`b2`), full
diffs (`diff`, `diff_b` on the bias), norm diffs (`w_norm`, `b_norm`), DoRA
(`dora_scale` next to any of the low-rank kinds), each with its `alpha`.

Names (see `unet_lora_names` / `text_encoder_lora_names`): kohya `lora_unet_` over
original or diffusers block paths, `lycoris_`, peft/diffusers `unet.` (and the bare
diffusers path), attention processors `...processor.to_q` with or without `unet.`,
ComfyUI-saved `diffusion_model.` / `text_encoders.clip_l|clip_g.transformer.`,
kohya `lora_te1_`/`lora_te_`/`lora_te2_` and peft `text_encoder.`/`text_encoder_2.`
with or without `text_model.` whatever level the installed transformers has.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Hashable, Iterable

import torch

from ldm_patched.modules import telemetry
from ldm_patched.modules.file_version import FileReadError, FileVersion, read_safetensors
from ldm_patched.modules.lora_adapters import (DoraFactors, GloraFactors, LohaFactors, LokrFactors,
                                               LoraFactors)
from ldm_patched.modules.sized_cache import SizedCache

__all__ = ["LoraError", "FileVersion", "LoraFactors", "LohaFactors", "LokrFactors", "GloraFactors",
           "DoraFactors", "LoraPatch", "ParsedLora", "LoraFileCache", "LoraMatch", "match_lora",
           "read_lora_file", "parse_lora_tensors", "unet_lora_names", "text_encoder_lora_names"]


class LoraError(ValueError):
    """A LoRA file that cannot be used; the message names the file and the reason."""


def _version(path: str) -> FileVersion:
    try:
        return FileVersion.of(path)
    except FileReadError as error:
        raise LoraError(f"LoRA file {error}") from error


def _fits(factors, shape: torch.Size) -> bool:
    """Does the adapter's change have the weight's shape (or a flattened view of it)?"""
    if isinstance(factors, DoraFactors):
        try:
            factors.per_output(shape)
        except ValueError:
            return False
        return _fits(factors.inner, shape)
    fits = getattr(factors, "fits", None)
    if fits is not None:
        return bool(fits(tuple(shape)))
    want = tuple(factors.delta_shape())
    if want == tuple(shape):
        return True
    # Linear vs 1x1 conv, or a conv change stored flattened: same rows, same size.
    numel = lambda s: int(torch.Size(s).numel())  # noqa: E731
    return len(want) >= 1 and len(shape) >= 1 and numel(want) == numel(shape) and want[0] == shape[0]


def added_delta(base: torch.Tensor, factors, alpha: float, prepared) -> torch.Tensor:
    """base + alpha * delta as a new tensor (kept for callers of the LoRA-only API)."""
    return factors.apply(base, alpha, prepared)


@dataclass(eq=False)
class LoraPatch:
    """A `WeightPatch` (see model_patcher): one layer's change from one LoRA file version.

    `factors` is any adapter of lora_adapters; `role` says whether it changes the
    layer's weight or its bias (`diff_b`, `b_norm`)."""

    file: FileVersion
    name: str
    factors: Any
    role: str = "weight"
    _on_device: dict[torch.device, Any] = field(default_factory=dict)

    @property
    def identity(self) -> Hashable:
        return (self.file, self.name, self.role)

    @property
    def source(self) -> str:
        return os.path.basename(self.file.path)

    def added(self, base: torch.Tensor, alpha: float, cache: bool = False) -> torch.Tensor:
        device = base.device
        prepared = self._on_device.get(device)
        if prepared is None:
            prepared = self.factors.prepare(device)
            if cache and device.type != "cpu":
                # float32 and laid out once: a later switch launches only the arithmetic.
                self._on_device[device] = prepared
        return self.factors.apply(base, alpha, prepared)

    def cached_bytes(self, device: torch.device) -> int:
        prepared = self._on_device.get(device)
        return 0 if prepared is None else sum(t.numel() * t.element_size() for t in _flat_tensors(prepared))

    def cache_devices(self) -> list[torch.device]:
        return list(self._on_device)

    def factor_bytes(self) -> int:
        """float32 copies of the factors, as `added(..., cache=True)` keeps them."""
        return sum(t.numel() * 4 for t in self.factors.tensors())

    def drop_cache(self) -> None:
        self._on_device.clear()


def _flat_tensors(value) -> Iterable[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for item in value:
            yield from _flat_tensors(item)


# -- parsing files ------------------------------------------------------------------

# Key suffix -> (group, field). Longest-first where one suffix ends another.
_SUFFIXES: tuple[tuple[str, str, str], ...] = (
    (".lora_up.weight", "lora", "up"), (".lora_down.weight", "lora", "down"), (".lora_mid.weight", "lora", "mid"),
    (".lora_B.weight", "lora", "up"), (".lora_A.weight", "lora", "down"),
    (".lora.up.weight", "lora", "up"), (".lora.down.weight", "lora", "down"),
    (".lora_linear_layer.up.weight", "lora", "up"), (".lora_linear_layer.down.weight", "lora", "down"),
    # old diffusers attention processors: `...attn1.processor.to_q_lora.up.weight`
    ("_lora.up.weight", "lora", "up"), ("_lora.down.weight", "lora", "down"),
    (".hada_w1_a", "loha", "w1a"), (".hada_w1_b", "loha", "w1b"), (".hada_w2_a", "loha", "w2a"),
    (".hada_w2_b", "loha", "w2b"), (".hada_t1", "loha", "t1"), (".hada_t2", "loha", "t2"),
    (".lokr_w1", "lokr", "w1"), (".lokr_w1_a", "lokr", "w1a"), (".lokr_w1_b", "lokr", "w1b"),
    (".lokr_w2", "lokr", "w2"), (".lokr_w2_a", "lokr", "w2a"), (".lokr_w2_b", "lokr", "w2b"),
    (".lokr_t2", "lokr", "t2"),
    (".a1.weight", "glora", "a1"), (".a2.weight", "glora", "a2"), (".b1.weight", "glora", "b1"),
    (".b2.weight", "glora", "b2"),
    (".diff", "diff", "weight"), (".diff_b", "diff", "bias"),
    (".w_norm", "norm", "weight"), (".b_norm", "norm", "bias"),
    (".alpha", "meta", "alpha"), (".dora_scale", "meta", "dora_scale"),
)


@dataclass(eq=False)
class ParsedLora:
    """A file's changes: `layers` change a layer's weight, `biases` its bias."""

    file: FileVersion
    layers: dict[str, Any]
    ignored: list[str]
    biases: dict[str, Any] = field(default_factory=dict)

    def nbytes(self) -> int:
        return sum(f.nbytes() for f in (*self.layers.values(), *self.biases.values()))

    def kinds(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for factors in (*self.layers.values(), *self.biases.values()):
            counts[factors.kind] = counts.get(factors.kind, 0) + 1
        return counts

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


def _split_key(key: str) -> tuple[str, str, str] | None:
    """(base name, group, field) of a file key, or None when no scheme knows it."""
    for suffix, group, role in _SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], group, role
    return None


def _weight_adapter(parts: dict[str, dict[str, torch.Tensor]], alpha: float | None):
    """The adapter the parts of one layer describe for its weight, or None."""
    lora, loha, lokr, glora = (parts.get(g, {}) for g in ("lora", "loha", "lokr", "glora"))
    if "up" in lora and "down" in lora:
        return LoraFactors(up=lora["up"], down=lora["down"], mid=lora.get("mid"), alpha=alpha)
    if all(k in loha for k in ("w1a", "w1b", "w2a", "w2b")):
        return LohaFactors(loha["w1a"], loha["w1b"], loha["w2a"], loha["w2b"], loha.get("t1"), loha.get("t2"),
                           alpha=alpha)
    factors = LokrFactors(**{k: lokr.get(k) for k in ("w1", "w1a", "w1b", "w2", "w2a", "w2b", "t2")}, alpha=alpha)
    if lokr and factors.is_complete():
        return factors
    if all(k in glora for k in ("a1", "a2", "b1", "b2")):
        return GloraFactors(glora["a1"], glora["a2"], glora["b1"], glora["b2"], alpha=alpha)
    return None


def _full_diff(parts: dict[str, dict[str, torch.Tensor]], role: str) -> LoraFactors | None:
    diff = parts.get("diff", {}).get(role)
    if diff is None:
        diff = parts.get("norm", {}).get(role)
    return None if diff is None else LoraFactors(diff=diff)


def parse_lora_tensors(file: FileVersion, tensors: dict[str, torch.Tensor],
                       metadata: dict[str, str] | None = None) -> ParsedLora:
    """Group a file's tensors by layer and build each layer's adapter(s)."""
    grouped: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    keys_of: dict[str, list[str]] = {}
    ignored = []
    for key, tensor in tensors.items():
        split = _split_key(key)
        if split is None:
            ignored.append(key)
            continue
        base, group, role = split
        grouped.setdefault(base, {}).setdefault(group, {})[role] = tensor
        keys_of.setdefault(base, []).append(key)
    alphas = peft_alphas(metadata)
    layers, biases = {}, {}
    for base, parts in grouped.items():
        meta = parts.get("meta", {})
        alpha = float(meta["alpha"].float().item()) if "alpha" in meta else _peft_alpha(base, alphas)
        adapter = _weight_adapter(parts, alpha)
        if adapter is not None and "dora_scale" in meta:
            adapter = DoraFactors(adapter, meta["dora_scale"])
        if adapter is None:
            adapter = _full_diff(parts, "weight")
        bias = _full_diff(parts, "bias")
        if adapter is not None:
            layers[base] = adapter
        if bias is not None:
            biases[base] = bias
        if adapter is None and bias is None:
            ignored.extend(keys_of[base])   # an incomplete set (e.g. lora_up without lora_down)
    return ParsedLora(file=file, layers=layers, ignored=ignored, biases=biases)


def read_lora_file(path: "str | os.PathLike[str]") -> ParsedLora:
    """Parse a LoRA file; its tensors are read into private memory (never a map of the
    file), so rewriting or truncating the file later cannot change a loaded LoRA."""
    path = os.fspath(path)
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
    if not parsed.layers and not parsed.biases:
        raise LoraError(f"LoRA file {file.name} holds no LoRA layers (first keys: "
                        f"{', '.join(list(tensors)[:3]) or 'none'})")
    return parsed


class LoraFileCache:
    """Parsed LoRA files by version, least-recently-used out past `max_bytes`. Each file is
    measured once, when it is read: `nbytes()` (a ledger query) walks no tensor."""

    def __init__(self, max_bytes: int = 8 * 1024 ** 3) -> None:
        self.max_bytes = max_bytes
        self._files: SizedCache[FileVersion, ParsedLora] = SizedCache(ParsedLora.nbytes)

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
        while self._files.nbytes() > self.max_bytes and len(self._files) > 1:
            oldest = next(iter(self._files))
            if oldest == keep:
                break
            del self._files[oldest]

    def __contains__(self, file: FileVersion) -> bool:
        return file in self._files

    def nbytes(self) -> int:
        return self._files.nbytes()

    def sizes(self) -> dict[FileVersion, int]:
        """Bytes of each cached file, oldest first (as measured when it was read)."""
        return {file: self._files.size_of(file) for file in self._files}

    def __len__(self) -> int:
        return len(self._files)


# -- key maps -----------------------------------------------------------------------

def _underscored(path: str) -> str:
    return path.replace(".", "_")


def _processor_name(module: str) -> str | None:
    """Old diffusers attention-processor name of an attention projection, else None:
    `...attn1.to_q` -> `...attn1.processor.to_q`, `...to_out.0` -> `...processor.to_out`."""
    if ".to_" not in module:
        return None
    name = module.replace(".to_", ".processor.to_")
    return name[: -len(".0")] if name.endswith(".to_out.0") else name


def unet_lora_names(unet: torch.nn.Module) -> dict[str, str]:
    """LoRA base names (every scheme) -> UNet weight name (diffusers layout)."""
    from ldm_patched.modules.sdxl_layout import unet_key_map

    to_original = unet_key_map(dict(unet.config))
    names: dict[str, str] = {}
    for key, _ in unet.named_parameters():
        module, _, kind = key.rpartition(".")
        if kind != "weight":
            continue
        for name in (f"lora_unet_{_underscored(module)}", f"lycoris_{_underscored(module)}", f"unet.{module}", module):
            names[name] = key
        processor = _processor_name(module)
        if processor is not None:
            names[processor] = names[f"unet.{processor}"] = key
        original = to_original.get(key)
        if original is not None:
            original_module = original.rpartition(".")[0]
            for name in (f"lora_unet_{_underscored(original_module)}", f"lycoris_{_underscored(original_module)}",
                         f"unet.{original_module}", f"diffusion_model.{original_module}"):
                names[name] = key
    return names


# Which text encoder a LoRA name is aimed at, by its scheme's prefix.
CLIP_L_PREFIXES = ("lora_te1_", "lora_te_", "text_encoder.", "text_encoders.clip_l.")
CLIP_G_PREFIXES = ("lora_te2_", "text_encoder_2.", "text_encoders.clip_g.")
ENCODER_LABELS = {"text_encoder": "CLIP-L (text_encoder)", "text_encoder_2": "CLIP-G (text_encoder_2)"}


def lora_name_encoder(name: str) -> str | None:
    """"text_encoder" / "text_encoder_2" for names of a text-encoder scheme, else None."""
    if name.startswith(CLIP_G_PREFIXES):
        return "text_encoder_2"
    if name.startswith(CLIP_L_PREFIXES):
        return "text_encoder"
    return None


def _encoder_names(encoder: str, inner: str, in_text_model: bool, has_clip_l: bool) -> list[str]:
    """Every scheme's base name for parameter module `inner` of `encoder`.

    `inner` is relative to the CLIP text transformer (`encoder.layers.0.self_attn.q_proj`)
    when `in_text_model`, else relative to the encoder module (`text_projection`)."""
    short = "clip_l" if encoder == "text_encoder" else "clip_g"
    kohya = {"text_encoder": ("lora_te1_", "lora_te_"), "text_encoder_2": ("lora_te2_",)}[encoder]
    if encoder == "text_encoder_2" and not has_clip_l:
        kohya = ("lora_te2_", "lora_te_")   # a G-only model (the refiner): ComfyUI reads `lora_te_` as G
    if not in_text_model:
        return [f"{encoder}.{inner}", f"text_encoders.{short}.transformer.{inner}",
                *(p + _underscored(inner) for p in kohya)]
    return [f"{encoder}.text_model.{inner}", f"{encoder}.{inner}",
            f"text_encoders.{short}.transformer.text_model.{inner}",
            *(f"{p}text_model_{_underscored(inner)}" for p in kohya)]


def text_encoder_lora_names(encoders: torch.nn.Module) -> dict[str, str]:
    """LoRA base names -> weight names of the text-encoder pair module.

    The pair module holds `text_encoder` (CLIP-L, absent on the refiner) and
    `text_encoder_2` (CLIP-G). transformers 5's `CLIPTextModel` has no `text_model.`
    level while `CLIPTextModelWithProjection` keeps one (older versions have it on
    both): names are built relative to the text transformer, so every scheme maps
    whichever level the installed version has.
    """
    has_clip_l = getattr(encoders, "text_encoder", None) is not None
    names: dict[str, str] = {}
    for key, _ in encoders.named_parameters():
        module, _, kind = key.rpartition(".")
        if kind != "weight":
            continue
        encoder, _, inner = module.partition(".")
        if encoder not in ENCODER_LABELS:
            continue
        leveled = hasattr(getattr(encoders, encoder), "text_model")
        if inner.startswith("text_model."):
            inner, in_text_model = inner[len("text_model."):], True
        else:
            in_text_model = not leveled
        for name in _encoder_names(encoder, inner, in_text_model, has_clip_l):
            names.setdefault(name, key)
    return names


@dataclass
class LoraMatch:
    """The patches one LoRA file gives each target, and what matched nothing."""

    file: FileVersion
    patches: dict[str, dict[str, LoraPatch]]   # target -> parameter name -> patch
    unmatched: list[str]
    misfit: list[str] = field(default_factory=list)    # names found but of another shape (lenient only)
    warnings: list[str] = field(default_factory=list)  # e.g. a whole text encoder unmatched

    @property
    def matched_count(self) -> int:
        return sum(len(p) for p in self.patches.values())


def _present_encoders(targets: dict[str, tuple[dict[str, str], torch.nn.Module]]) -> set[str]:
    present = set()
    for _, module in targets.values():
        present.update(e for e in ENCODER_LABELS if getattr(module, e, None) is not None)
    return present


def _whole_encoder_warnings(parsed: ParsedLora, matched: set[str],
                            targets: dict[str, tuple[dict[str, str], torch.nn.Module]]) -> list[str]:
    """A text encoder for which the file has keys but none matched: almost always a
    naming bug, never silently fine."""
    present = _present_encoders(targets)
    warnings = []
    for encoder in sorted(present):
        names = [n for n in (*parsed.layers, *parsed.biases) if lora_name_encoder(n) == encoder]
        if names and not any(n in matched for n in names):
            warnings.append(f"LoRA {parsed.file.name}: all {len(names)} keys for {ENCODER_LABELS[encoder]} "
                            f"match no layer of that text encoder (e.g. {names[0]}); its text-encoder "
                            f"part is NOT applied")
    return warnings


def match_lora(parsed: ParsedLora, targets: dict[str, tuple[dict[str, str], torch.nn.Module]],
               strict: bool = True) -> LoraMatch:
    """Map every layer of a parsed LoRA onto the targets' parameters, checking shapes.

    `targets`: name -> (LoRA base name -> weight name, module). `strict` (a LoRA the
    user asked for on this model): a wrong shape or nothing matched is an error.
    Not strict (the refiner, which takes a LoRA only where it fits): such layers are
    listed in `misfit` / `unmatched` instead.
    """
    patches: dict[str, dict[str, LoraPatch]] = {name: {} for name in targets}
    unmatched, misfit, matched = list(parsed.ignored), [], set()
    changes = [(base, f, "weight") for base, f in parsed.layers.items()]
    changes += [(base, f, "bias") for base, f in parsed.biases.items()]
    for base, factors, role in changes:
        found = _locate(base, role, targets)
        if found is None:
            unmatched.append(base)
            continue
        target, key, shape = found
        if not _fits(factors, shape):
            if not strict:
                misfit.append(base)
                continue
            shape_text = factors.delta_shape() or getattr(factors, "kind", "?")
            raise LoraError(f"LoRA file {parsed.file.name}: layer {base} ({role}) has shape "
                            f"{tuple(shape_text) if isinstance(shape_text, tuple) else shape_text} but {target} "
                            f"{role} {key} is {tuple(shape)} (a LoRA for another model?)")
        patches[target][key] = LoraPatch(parsed.file, base, factors, role)
        matched.add(base)
    match = LoraMatch(file=parsed.file, patches=patches, unmatched=unmatched, misfit=misfit,
                      warnings=_whole_encoder_warnings(parsed, matched, targets))
    if strict and match.matched_count == 0:
        raise LoraError(f"LoRA file {parsed.file.name} matches no key of this SDXL model "
                        f"(first keys: {', '.join(list(parsed.layers)[:3])}); is it a LoRA for another architecture?")
    return match


def _locate(base: str, role: str, targets) -> tuple[str, str, torch.Size] | None:
    """(target, parameter name, its shape) that `base` names for `role`, or None."""
    for target, (names, module) in targets.items():
        key = names.get(base)
        if key is None:
            continue
        if role == "bias":
            key = key[: -len("weight")] + "bias"
        try:
            return target, key, module.get_parameter(key).shape
        except AttributeError:
            return None
    return None
