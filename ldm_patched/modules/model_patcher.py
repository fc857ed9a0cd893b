"""MECHANISM: one torch module, its weight patches and exact backups of originals.

A `ModelPatcher` is a cheap description of a *wanted* state of a module: which
parameters get which patches.  The module's *actual* state (which keys are
merged with which patches, and the exact original tensors of those keys) lives
in one `WeightState` per module, shared by every patcher of that module.  That
is what lets any clone reach its wanted state by diff: only keys whose patch
set differs are rewritten, always from the exact original, in place.

Partial residency and fp8 storage are mechanisms too: a module's weight groups
(each layer's own tensors) can stay on the offload device and be streamed in for
their forward by hooks (`WeightStreamer`), and Linear/Conv2d/Embedding weights can
be stored in float8 and upcast per layer (`CastLinear`...). Which groups stream is
the caller's decision.

No device policy here: callers (model_management) say where to move and where
backups live; this module only knows how.
"""

from __future__ import annotations

import functools
import hashlib
import weakref
from dataclasses import dataclass, field
from typing import Callable, Collection, Hashable, Iterable, Protocol

import torch
import torch.nn.functional as F

from ldm_patched.modules import telemetry


class WeightPatch(Protocol):
    """Something that knows the change it makes to one weight (a LoRA pair, a diff)."""

    @property
    def identity(self) -> Hashable:
        """Content identity: equal identities always produce equal changes."""
        ...

    @property
    def source(self) -> str:
        """What a person calls where this change comes from (a file name), for status pages."""
        ...

    def added(self, base: torch.Tensor, alpha: float, cache: bool = False) -> torch.Tensor:
        """A new float32 tensor: `base` (float32, the weight's shape and device) plus `alpha`
        times this change. `base` is not modified. With `cache`, factors copied to that
        device stay there."""
        ...

    def cached_bytes(self, device: torch.device) -> int:
        """Bytes this patch keeps cached on `device` (its factors), for budget accounting."""
        ...

    def cache_devices(self) -> Iterable[torch.device]:
        """The devices this patch holds cached factors on."""
        ...

    def factor_bytes(self) -> int:
        """Bytes `added(..., cache=True)` would keep on a device: planned before it happens."""
        ...

    def drop_cache(self) -> None:
        """Free whatever `added(..., cache=True)` kept on devices."""
        ...


@dataclass(frozen=True)
class PatchEntry:
    patch: WeightPatch
    strength_patch: float = 1.0
    strength_model: float = 1.0

    def signature(self) -> tuple[Hashable, float, float]:
        return (self.patch.identity, float(self.strength_patch), float(self.strength_model))


KeySignature = tuple[tuple[Hashable, float, float], ...]


@dataclass(frozen=True)
class PatchSignature:
    """The content of a patch set: per key, which patches at which strengths."""

    keys: dict[str, KeySignature]
    digest: str

    @staticmethod
    def of(keys: dict[str, KeySignature]) -> "PatchSignature":
        hasher = hashlib.sha1()
        for key in sorted(keys):
            hasher.update(repr((key, keys[key])).encode())
        return PatchSignature(keys=keys, digest=hasher.hexdigest()[:16] if keys else "original")

    def __eq__(self, other: object) -> bool:
        # The digest is a hash of the whole content: comparing it is enough and O(1).
        return isinstance(other, PatchSignature) and self.digest == other.digest

    def __hash__(self) -> int:
        return hash(self.digest)


ORIGINAL = PatchSignature.of({})
# Set while keys are being rewritten: matches no wanted state, so an interrupted
# patch is finished by the next diff, key by key, from `WeightState.applied`.
IN_PROGRESS = PatchSignature(keys={}, digest="in-progress")
# A key's signature while it is being written: never a wanted state, so it is redone.
WRITING: KeySignature = (("<writing>", 0.0, 0.0),)


@dataclass
class WeightState:
    """What is actually merged into one module right now, and the originals to undo it."""

    backups: dict[str, torch.Tensor] = field(default_factory=dict)   # exact originals (may outlive a patch)
    applied: dict[str, KeySignature] = field(default_factory=dict)
    signature: PatchSignature = ORIGINAL
    params: dict[str, torch.nn.Parameter] = field(default_factory=dict)  # name lookups off the hot path
    cached_patches: dict[int, "WeightPatch"] = field(default_factory=dict)  # patches holding device factors
    # Merged weights of patch sets switched away from, by (key, that key's signature): a
    # return to a recent set is a device copy per key instead of a merge (bit-identical).
    variants: dict[tuple[str, KeySignature], torch.Tensor] = field(default_factory=dict)
    groups: tuple["WeightGroup", ...] | None = None   # computed once: the module's structure is fixed
    streamer: "WeightStreamer | None" = None          # set while some groups are streamed

    def param(self, module: torch.nn.Module, key: str) -> torch.nn.Parameter:
        if not self.params:
            self.params = dict(module.named_parameters())
        return self.params[key]

    def backup_bytes(self, device: torch.device | None = None) -> int:
        return sum(_nbytes(t) for t in self.backups.values() if device is None or t.device == device)

    def bytes_by_device(self) -> dict[torch.device, int]:
        """Backups and cached factors, per device they live on."""
        result: dict[torch.device, int] = {}
        for tensor in self.backups.values():
            result[tensor.device] = result.get(tensor.device, 0) + _nbytes(tensor)
        for patch in self.cached_patches.values():
            for device in patch.cache_devices():
                result[device] = result.get(device, 0) + patch.cached_bytes(device)
        for tensor in self.variants.values():
            result[tensor.device] = result.get(tensor.device, 0) + _nbytes(tensor)
        return result


_WEIGHT_STATES: "weakref.WeakKeyDictionary[torch.nn.Module, WeightState]" = weakref.WeakKeyDictionary()


def weight_state(module: torch.nn.Module) -> WeightState:
    state = _WEIGHT_STATES.get(module)
    if state is None:
        state = _WEIGHT_STATES[module] = WeightState()
    return state


def original_weight(module: torch.nn.Module, name: str, param: torch.Tensor) -> torch.Tensor:
    """The exact original of parameter `name` of `module`, whatever patch is merged into it
    now: its backup while a patch is merged (or being written), else the parameter itself."""
    state = weight_state(module)
    return state.backups[name] if name in state.applied else param


@dataclass(frozen=True)
class PatchResult:
    patched: int = 0
    restored: int = 0
    from_variants: int = 0


def module_bytes(module: torch.nn.Module) -> int:
    return sum(_nbytes(t) for t in _tensors(module))


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()




def _tensors(module: torch.nn.Module) -> Iterable[torch.Tensor]:
    yield from module.parameters()
    yield from module.buffers()


def _same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    # "cuda" and "cuda:0" name the same device when only one is in use.
    return a.index is None or b.index is None or a.index == b.index


# -- weight groups: the unit of partial residency ------------------------------------------


@dataclass(frozen=True)
class WeightGroup:
    """One module's own parameters and buffers: what partial residency keeps on the device
    or streams in for that module's forward."""

    name: str          # the module's path in the model ("" is the model itself)
    nbytes: int
    index: int         # position in a children-first walk of the model
    streamable: bool   # owns parameters and no descendant owns tensors: its forward is where they are used


def _own_tensors(module: torch.nn.Module) -> list[tuple[str, str, torch.Tensor]]:
    """(kind, attribute, tensor) of the parameters and buffers `module` holds itself."""
    own = [("param", name, p) for name, p in module._parameters.items() if p is not None]
    return own + [("buffer", name, b) for name, b in module._buffers.items() if b is not None]


def weight_groups(model: torch.nn.Module) -> tuple[WeightGroup, ...]:
    """Every module of `model` that holds tensors itself, children first."""
    groups: list[WeightGroup] = []
    seen: set[int] = set()

    def walk(module: torch.nn.Module, name: str) -> bool:
        if id(module) in seen:
            return False
        seen.add(id(module))
        below = False
        for child_name, child in module.named_children():
            below |= walk(child, f"{name}.{child_name}" if name else child_name)
        own = _own_tensors(module)
        if own:
            groups.append(WeightGroup(name, sum(_nbytes(t) for _, _, t in own), len(groups),
                                      streamable=not below and any(kind == "param" for kind, _, _ in own)))
        return below or bool(own)

    walk(model, "")
    return tuple(groups)


def _set_own(module: torch.nn.Module, kind: str, attr: str, old: torch.Tensor, new: torch.Tensor) -> None:
    """Put `new` where `module` keeps `old`; a parameter keeps its identity where torch allows
    (not between storage kinds, e.g. meta and the CPU)."""
    if kind == "buffer":
        module._buffers[attr] = new
        return
    try:
        old.data = new
    except RuntimeError:
        module._parameters[attr] = torch.nn.Parameter(new, requires_grad=old.requires_grad)


@dataclass
class _StreamedGroup:
    module: "weakref.ref[torch.nn.Module]"
    tensors: list[tuple[str, str, torch.Tensor]]   # the canonical tensors, on the offload device
    nbytes: int
    handles: list


@dataclass
class _Copies:
    """One group's weights brought onto the device (for its forward, or ahead of it)."""

    name: str
    tensors: list[torch.Tensor]
    event: "torch.cuda.Event | None" = None


class WeightStreamer:
    """Hooks that bring streamed groups' weights onto `device` for their module's forward and
    drop them after it; the canonical tensors stay where they are (host memory, pinned with
    a GPU), so LoRA patches written there once serve every step.

    Prefetch: after each forward the streamer knows which group follows which; from the
    second forward on, while a group computes, the next one is copied ahead (on CUDA on a
    side stream, so the copy overlaps the compute). At most two groups are on the device at
    once: the one computing and the one prefetched. A copy is never kept past the end of a
    forward (the model's or one of its children's), so patches between forwards are always
    what the next forward reads.

    Out of memory inside a forward: the model's forward is wrapped; the copies are dropped and
    `on_out_of_memory` (the caller's policy, e.g. "stream one more group") is asked whether
    to retry.

    The streamer refers to the modules weakly (it lives in their `WeightState`), and a module
    is copied before it is placed, never while it streams (a copy would share the hooks)."""

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        self.model = weakref.ref(model)
        self.device = device
        self.groups: dict[str, _StreamedGroup] = {}
        self.next_of: dict[str, str] = {}
        self.last: str | None = None
        self.prefetched: _Copies | None = None
        self.depth = 0
        self.copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.on_out_of_memory: Callable[[], bool] | None = None
        roots = [model, *model.children()]
        self._root_handles = [h for m in roots for h in (
            m.register_forward_pre_hook(self._enter),
            m.register_forward_hook(self._leave, always_call=True))]
        self._wrapped = self._wrap_forward(model)

    # -- which groups -----------------------------------------------------------------

    def stream(self, modules: dict[str, torch.nn.Module]) -> None:
        """Stream exactly these groups (name -> module), their tensors as they are now."""
        self.reset()
        for name in [n for n in self.groups if n not in modules]:
            for handle in self.groups.pop(name).handles:
                handle.remove()
        for name, module in modules.items():
            tensors = _own_tensors(module)
            group = self.groups.get(name)
            if group is None:
                handles = [module.register_forward_pre_hook(functools.partial(self._bring_in, name)),
                           module.register_forward_hook(functools.partial(self._send_back, name), always_call=True)]
                group = self.groups[name] = _StreamedGroup(weakref.ref(module), tensors, 0, handles)
            group.tensors = tensors
            group.nbytes = sum(_nbytes(t) for _, _, t in tensors)

    def streamed_bytes(self) -> int:
        return sum(g.nbytes for g in self.groups.values())

    def remove(self) -> None:
        """Every group back to its canonical tensors, every hook off."""
        self.reset()
        for group in self.groups.values():
            for handle in group.handles:
                handle.remove()
        self.groups = {}
        for handle in self._root_handles:
            handle.remove()
        model = self.model()
        if model is not None and model.__dict__.get("forward") is self._wrapped:
            del model.__dict__["forward"]

    def reset(self) -> None:
        """Drop every copy on the device: canonical tensors back in place, nothing prefetched."""
        for name in self.groups:
            self._restore(name)
        self.prefetched = None
        self.last = None

    # -- hooks --------------------------------------------------------------------------

    def _enter(self, module, args) -> None:
        self.depth += 1

    def _leave(self, module, args, output) -> None:
        self.depth = max(self.depth - 1, 0)
        if self.depth == 0:
            self._end_forward()

    def _end_forward(self) -> None:
        self.prefetched = None
        self.last = None

    def _bring_in(self, name: str, module, args) -> None:
        if self.last is not None:
            self.next_of[self.last] = name
        self.last = name
        copies = self._take_prefetched(name) or self._copy(name, ahead=False)
        for (kind, attr, _), tensor in zip(self.groups[name].tensors, copies.tensors):
            (module._parameters if kind == "param" else module._buffers)[attr] = tensor
        following = self.next_of.get(name)
        if following is not None and following != name and following in self.groups:
            self.prefetched = self._copy(following, ahead=True)

    def _send_back(self, name: str, module, args, output) -> None:
        self._restore(name)
        if self.depth == 0:   # a group called on its own, outside the model's forward
            self._end_forward()

    def _restore(self, name: str) -> None:
        group = self.groups[name]
        module = group.module()
        if module is None:
            return
        for kind, attr, tensor in group.tensors:
            (module._parameters if kind == "param" else module._buffers)[attr] = tensor

    # -- copies ---------------------------------------------------------------------------

    def _take_prefetched(self, name: str) -> _Copies | None:
        copies, self.prefetched = self.prefetched, None
        if copies is None or copies.name != name:
            return None   # a wrong guess is dropped (its bytes were counted when copied)
        if copies.event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(copies.event)
            for tensor in copies.tensors:   # freed only after the compute stream is done with it
                tensor.record_stream(current)
        return copies

    def _copy(self, name: str, ahead: bool) -> _Copies:
        group = self.groups[name]
        sources = [t.detach() for _, _, t in group.tensors]
        telemetry.count(bytes_streamed=group.nbytes, groups_streamed=1)
        if ahead and self.copy_stream is not None:
            with torch.cuda.stream(self.copy_stream):
                tensors = [t.to(self.device, non_blocking=True) for t in sources]
                event = torch.cuda.Event()
                event.record(self.copy_stream)
            return _Copies(name, tensors, event)
        # copy=True: with the CPU as the device this still streams through a copy.
        return _Copies(name, [t.to(self.device, non_blocking=True, copy=True) for t in sources])

    # -- out of memory --------------------------------------------------------------------

    def _wrap_forward(self, model: torch.nn.Module) -> Callable:
        model_ref = weakref.ref(model)

        def forward_retrying(*args, **kwargs):
            model = model_ref()
            while True:
                try:
                    return type(model).forward(model, *args, **kwargs)
                except torch.OutOfMemoryError as error:
                    message = str(error)
                # Here, outside the `except`, the traceback and the activations it held are gone.
                self.reset()
                if self.on_out_of_memory is None or not self.on_out_of_memory():
                    raise torch.OutOfMemoryError(message)

        model.forward = forward_retrying
        return forward_retrying


# -- fp8 storage: weights upcast per layer ---------------------------------------------------


class _UpcastWeights:
    """A layer whose weight (and bias) are stored in another dtype (float8) and upcast to
    `compute_dtype` in each call: one cast per layer, inside its forward, so torch.compile
    traces it like any other op and no full-precision copy of the model exists."""

    compute_dtype: torch.dtype

    def _weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        bias = self.bias
        return self.weight.to(self.compute_dtype), None if bias is None else bias.to(self.compute_dtype)


class CastLinear(_UpcastWeights, torch.nn.Linear):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        weight, bias = self._weights()
        return F.linear(input, weight, bias)


class CastConv2d(_UpcastWeights, torch.nn.Conv2d):
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        weight, bias = self._weights()
        return self._conv_forward(input, weight, bias)


class CastEmbedding(_UpcastWeights, torch.nn.Embedding):
    bias = None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        weight, _ = self._weights()
        return F.embedding(input, weight, self.padding_idx, self.max_norm, self.norm_type,
                           self.scale_grad_by_freq, self.sparse)


_UPCAST = {torch.nn.Linear: CastLinear, torch.nn.Conv2d: CastConv2d, torch.nn.Embedding: CastEmbedding}


def _storable(module: torch.nn.Module) -> bool:
    # Exact classes only: a subclass may have its own forward, which ours would replace.
    return type(module) in _UPCAST or isinstance(module, _UpcastWeights)


def storable_weight_names(model: torch.nn.Module) -> set[str]:
    """Names of the weights float8 storage applies to: those of plain Linear, Conv2d and
    Embedding layers (the bulk of the bytes; norms and biases stay in the compute dtype)."""
    return {f"{name}.weight" if name else "weight" for name, m in model.named_modules() if _storable(m)}


def upcast_in_forward(model: torch.nn.Module, compute_dtype: torch.dtype) -> int:
    """Make every storable layer whose weight is not in `compute_dtype` upcast it per call;
    returns how many layers do."""
    count = 0
    for module in model.modules():
        if _storable(module) and module.weight.dtype != compute_dtype:
            module.__class__ = _UPCAST.get(type(module), type(module))
            module.compute_dtype = compute_dtype
            count += 1
    return count


@torch.no_grad()
def store_weights_in(model: torch.nn.Module, storage_dtype: torch.dtype, compute_dtype: torch.dtype) -> int:
    """Store `model`'s storable weights in `storage_dtype` and every other floating tensor in
    `compute_dtype` (what a checkpoint loaded with that storage holds); returns the layers
    that upcast."""
    stored = storable_weight_names(model)
    for name, param in model.named_parameters():
        if param.is_floating_point():
            param.data = param.data.to(storage_dtype if name in stored else compute_dtype)
    return upcast_in_forward(model, compute_dtype)


def compute_dtype(model: torch.nn.Module) -> torch.dtype:
    """The dtype `model` computes in: an upcasting layer's target, else its weights' dtype."""
    for module in model.modules():
        if isinstance(module, _UpcastWeights):
            return module.compute_dtype
        for tensor in module._parameters.values():
            if tensor is not None:
                return tensor.dtype
    return torch.float32


def compute_device_and_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    """Where and in what `model` computes: with streamed groups, the streaming device (its
    first weight may be on the host)."""
    streamer = weight_state(model).streamer
    if streamer is not None:
        return streamer.device, compute_dtype(model)
    for tensor in _tensors(model):
        return tensor.device, compute_dtype(model)
    return torch.device("cpu"), compute_dtype(model)


def is_streamed(model: torch.nn.Module) -> bool:
    """True while some of `model`'s weight groups are streamed in per forward."""
    state = _WEIGHT_STATES.get(model)
    return state is not None and state.streamer is not None


class ModelPatcher:
    """One module plus the patches wanted on it. Clones share the module."""

    def __init__(self, model: torch.nn.Module, load_device: torch.device,
                 offload_device: torch.device, name: str = "model") -> None:
        self.model = model
        self.load_device = torch.device(load_device)
        self.offload_device = torch.device(offload_device)
        self.name = name
        self.patches: dict[str, tuple[PatchEntry, ...]] = {}
        self._signature: PatchSignature | None = ORIGINAL
        self._param_names: frozenset[str] | None = None

    # -- describing the wanted state -------------------------------------------------

    def clone(self) -> "ModelPatcher":
        other = ModelPatcher(self.model, self.load_device, self.offload_device, self.name)
        other.patches = dict(self.patches)
        other._signature = self._signature
        other._param_names = self._param_names
        return other

    def is_clone(self, other: "ModelPatcher") -> bool:
        return other.model is self.model

    def parameter_names(self) -> frozenset[str]:
        if self._param_names is None:
            self._param_names = frozenset(name for name, _ in self.model.named_parameters())
        return self._param_names

    def add_patches(self, patches: dict[str, WeightPatch], strength_patch: float = 1.0,
                    strength_model: float = 1.0) -> list[str]:
        """Add patches for the keys this model has; returns the keys that were taken."""
        names = self.parameter_names()
        taken = []
        for key, patch in patches.items():
            if key not in names:
                continue
            self.patches[key] = self.patches.get(key, ()) + (PatchEntry(patch, strength_patch, strength_model),)
            taken.append(key)
        if taken:
            self._signature = None
        return taken

    def patch_sources(self) -> dict[str, float]:
        """Where this patcher's changes come from (file names), each with its strength: what
        a status page shows of a patch set."""
        sources: dict[str, float] = {}
        for entries in self.patches.values():
            for entry in entries:
                sources.setdefault(entry.patch.source, float(entry.strength_patch))
        return dict(sorted(sources.items()))

    def weight_signature(self) -> PatchSignature:
        if self._signature is None:
            self._signature = PatchSignature.of(
                {key: tuple(entry.signature() for entry in entries) for key, entries in self.patches.items()})
        return self._signature

    # -- the actual state ---------------------------------------------------------------

    def applied_signature(self) -> PatchSignature:
        return weight_state(self.model).signature

    def is_applied(self) -> bool:
        """True when the module's weights are exactly this patcher's wanted state."""
        return self.applied_signature() == self.weight_signature()

    def model_size(self) -> int:
        return module_bytes(self.model)

    def model_dtype(self) -> torch.dtype:
        """The dtype the module computes in (with float8 storage, what its layers upcast to)."""
        return compute_dtype(self.model)

    def weight_groups(self) -> tuple[WeightGroup, ...]:
        state = weight_state(self.model)
        if state.groups is None:
            state.groups = weight_groups(self.model)
        return state.groups

    def streamed_bytes(self) -> int:
        streamer = weight_state(self.model).streamer
        return streamer.streamed_bytes() if streamer is not None else 0

    def streamed_groups(self) -> frozenset[str]:
        """The groups streamed in per forward now (empty when the module is placed whole)."""
        streamer = weight_state(self.model).streamer
        return frozenset(streamer.groups) if streamer is not None else frozenset()

    def weight_bytes_by_device(self) -> dict[torch.device, int]:
        """The module's parameters and buffers, per device (one walk: call on load only)."""
        result: dict[torch.device, int] = {}
        for tensor in _tensors(self.model):
            result[tensor.device] = result.get(tensor.device, 0) + _nbytes(tensor)
        return result

    def extra_bytes_by_device(self) -> dict[torch.device, int]:
        """Backups of originals and cached factors of the module, per device."""
        return weight_state(self.model).bytes_by_device()

    def backup_bytes(self, device: torch.device | None = None) -> int:
        return weight_state(self.model).backup_bytes(device)

    def _pending_keys(self) -> list[str]:
        """Keys that reaching the wanted state writes and that have no backup yet."""
        state = weight_state(self.model)
        wanted = self.weight_signature()
        return [key for key, want in wanted.keys.items()
                if state.applied.get(key) != want and key not in state.backups]

    def pending_backup_bytes(self, element_size: int | None = None) -> int:
        """Bytes the new backups of reaching the wanted state take (in the weights' dtype,
        or with `element_size` bytes per element)."""
        state = weight_state(self.model)
        total = 0
        for key in self._pending_keys():
            param = state.param(self.model, key)
            total += param.numel() * (element_size or param.element_size())
        return total

    def pending_factor_bytes(self) -> int:
        """Bytes of factors that caching the wanted patches would add (not cached yet)."""
        state = weight_state(self.model)
        seen: set[int] = set()
        total = 0
        for entries in self.patches.values():
            for entry in entries:
                if id(entry.patch) not in seen and id(entry.patch) not in state.cached_patches:
                    seen.add(id(entry.patch))
                    total += entry.patch.factor_bytes()
        return total

    def pending_variant_bytes(self) -> int:
        """Bytes that keeping the merged values of the keys this switch changes would add."""
        state = weight_state(self.model)
        wanted = self.weight_signature()
        total = 0
        for key, now in state.applied.items():
            if wanted.keys.get(key) != now and now != WRITING and (key, now) not in state.variants:
                total += _nbytes(state.param(self.model, key))
        return total

    def drop_variants(self, keep: Iterable["ModelPatcher"] = (), device: torch.device | None = None,
                      dry_run: bool = False) -> int:
        """Free kept merged values, except those of the patch sets in `keep`; returns the bytes
        freed (or that would be)."""
        state = weight_state(self.model)
        kept = {(key, sig) for p in keep for key, sig in p.weight_signature().keys.items()}
        freed = 0
        for ident in [i for i, t in state.variants.items()
                      if i not in kept and (device is None or t.device == device)]:
            freed += _nbytes(state.variants[ident])
            if not dry_run:
                del state.variants[ident]
        return freed

    def patch_ids(self) -> set[int]:
        return {id(entry.patch) for entries in self.patches.values() for entry in entries}

    # -- freeing what patching keeps ----------------------------------------------------

    def drop_factor_caches(self, keep: Iterable["ModelPatcher"] = (), device: torch.device | None = None,
                           dry_run: bool = False) -> int:
        """Free the module's cached factors (on `device`, or everywhere), except those the
        patchers in `keep` use; returns the bytes freed (or that would be, when `dry_run`)."""
        state = weight_state(self.model)
        kept = set().union(*(p.patch_ids() for p in keep))
        freed = 0
        for ident, patch in list(state.cached_patches.items()):
            if ident in kept:
                continue
            devices = [d for d in patch.cache_devices() if device is None or d == device]
            if device is not None and not devices:
                continue
            freed += sum(patch.cached_bytes(d) for d in devices)
            if not dry_run:
                patch.drop_cache()
                del state.cached_patches[ident]
        return freed

    def drop_kept_backups(self, keep: Iterable["ModelPatcher"] = (), device: torch.device | None = None,
                          dry_run: bool = False) -> int:
        """Free backups of keys that are not merged now (kept for a later patch), except
        keys the patchers in `keep` want; returns the bytes freed (or that would be)."""
        state = weight_state(self.model)
        wanted = set().union(*(p.patches.keys() for p in keep))
        freed = 0
        for key in [k for k in state.backups if k not in state.applied and k not in wanted]:
            if device is None or state.backups[key].device == device:
                freed += _nbytes(state.backups[key])
                if not dry_run:
                    del state.backups[key]
        return freed

    def downgrade_backups(self, device: torch.device | None = None, dry_run: bool = False) -> int:
        """Store float32 backups of half-precision weights in the weights' dtype (exact: the
        originals were in that dtype); returns the bytes freed (or that would be)."""
        state = weight_state(self.model)
        freed = 0
        for key, backup in list(state.backups.items()):
            dtype = state.param(self.model, key).dtype
            if backup.dtype == dtype or (device is not None and backup.device != device):
                continue
            freed += _nbytes(backup) - backup.numel() * torch.empty((), dtype=dtype).element_size()
            if not dry_run:
                state.backups[key] = _transfer(backup, backup.device, dtype)
        return freed

    def move_backups(self, device: torch.device) -> int:
        """Move every backup to `device` (pinned when that is host memory for a GPU);
        returns the bytes that left their device."""
        state = weight_state(self.model)
        moved = 0
        for key, backup in list(state.backups.items()):
            if backup.device != device:
                moved += _nbytes(backup)
                state.backups[key] = _transfer(backup, device, backup.dtype)
        return moved

    # -- moving and patching ----------------------------------------------------------

    def move_to(self, device: torch.device, streamed: Collection[str] = (),
                on_out_of_memory: Callable[[], bool] | None = None) -> int:
        """Move the module to `device`; returns (and counts) the bytes that moved.

        The weight groups named in `streamed` (streamable ones, see `weight_groups`) stay on
        the offload device instead and are brought in for their forward; `on_out_of_memory`
        is asked, after an out-of-memory inside a forward, whether to retry it (after it
        changed the placement)."""
        device = torch.device(device)
        state = weight_state(self.model)
        if streamed:
            return self._place_partially(device, frozenset(streamed), on_out_of_memory)
        if state.streamer is not None:
            state.streamer.remove()
            state.streamer = None
        moved = sum(_nbytes(t) for t in _tensors(self.model) if not _same_device(t.device, device))
        if moved:
            if any(t.is_meta for t in _tensors(self.model)):
                # Meta tensors hold no data (tests' stand-in accelerator, shape-only planning):
                # leaving the meta device allocates uninitialised storage of the same shapes.
                self.model.to_empty(device=device)
            else:
                self.model.to(device)
            # A move may install new Parameter objects (it does between storage kinds, e.g. meta).
            weight_state(self.model).params = {}
            direction = "bytes_to_device" if _same_device(device, self.load_device) else "bytes_to_offload"
            telemetry.count(**{direction: moved})
        return moved

    def _place_partially(self, device: torch.device, streamed: frozenset[str],
                         on_out_of_memory: Callable[[], bool] | None) -> int:
        """Groups in `streamed` on the offload device (pinned host memory for a GPU), the rest on
        `device`; moved group by group, so only what changes place moves."""
        groups = {g.name: g for g in self.weight_groups()}
        refused = sorted(n for n in streamed if n not in groups or not groups[n].streamable)
        if refused:
            raise ValueError(f"{self.name}: cannot stream {refused[:3]} (not streamable weight groups)")
        state = weight_state(self.model)
        if state.streamer is not None and not _same_device(state.streamer.device, device):
            state.streamer.remove()
            state.streamer = None
        if state.streamer is not None:
            state.streamer.reset()
        modules = dict(self.model.named_modules())
        pin = device.type == "cuda"
        moved = {"bytes_to_device": 0, "bytes_to_offload": 0}
        # Placement may change inside a forward (out of memory): the new tensors must be normal ones.
        with torch.inference_mode(False), torch.no_grad():
            for name, group in groups.items():
                target = self.offload_device if name in streamed else device
                module = modules[name]
                for kind, attr, tensor in _own_tensors(module):
                    if _same_device(tensor.device, target):
                        if pin and target.type == "cpu" and not tensor.is_pinned():
                            _set_own(module, kind, attr, tensor, tensor.detach().pin_memory())
                        continue
                    direction = "bytes_to_offload" if name in streamed else "bytes_to_device"
                    moved[direction] += _nbytes(tensor)
                    _set_own(module, kind, attr, tensor, _transfer(tensor.detach(), target, tensor.dtype, pin=pin))
        state.params = {}
        if state.streamer is None:
            state.streamer = WeightStreamer(self.model, device)
        state.streamer.on_out_of_memory = on_out_of_memory
        state.streamer.stream({name: modules[name] for name in streamed})
        telemetry.count(**moved)
        return sum(moved.values())

    def patch_model(self, device_to: torch.device | None = None,
                    backup_device: torch.device | None = None,
                    cache_factors: bool = False, keep_backups: bool = False,
                    backup_dtype: torch.dtype | None = None, keep_variants: bool = False) -> PatchResult:
        """Put the module into this patcher's wanted state (moving it first if asked).

        Only keys whose patch set differs from what is merged now are written,
        each from its exact original; new originals are kept on `backup_device`, in
        `backup_dtype` if given (float32 copies of half-precision weights are exact and
        save the upcast on every merge). `keep_backups` keeps a restored key's original
        for its next patch; `keep_variants` keeps the merged value a key is switched away
        from, so returning to that patch set copies it back instead of merging again.
        """
        if device_to is not None:
            self.move_to(device_to)
        state = weight_state(self.model)
        wanted = self.weight_signature()
        if state.signature == wanted:
            return PatchResult()
        if state.streamer is not None:   # streamed keys are written where they live, on the host
            state.streamer.reset()
        backup_device = torch.device(backup_device) if backup_device is not None else self.offload_device
        patched = restored = copied = 0
        state.signature = IN_PROGRESS
        writes = _PendingWrites(state)
        for key in set(state.applied) | set(wanted.keys):
            now, want = state.applied.get(key), wanted.keys.get(key)
            if now == want:
                continue
            if keep_variants and now is not None and now != WRITING:
                state.variants[(key, now)] = state.param(self.model, key).detach().clone()
            if want is None:
                self._restore_key(state, key, keep_backups)
                restored += 1
                continue
            if now is not None:
                restored += 1
            if self._copy_variant(state, key, want, writes):
                copied += 1
            else:
                self._merge_key(state, key, want, backup_device, backup_dtype, cache_factors, writes)
            patched += 1
        writes.flush()
        state.signature = wanted
        telemetry.count(weights_patched=patched, weights_restored=restored, weights_from_variants=copied)
        return PatchResult(patched=patched, restored=restored, from_variants=copied)

    def _copy_variant(self, state: WeightState, key: str, want: KeySignature, writes: "_PendingWrites") -> bool:
        """Write a kept merged value of `key` for `want`, if there is one (a device copy)."""
        variant = state.variants.get((key, want))
        if variant is None or key not in state.backups:
            return False
        writes.add(key, state.param(self.model, key), variant, want)
        return True

    def unpatch_model(self, device_to: torch.device | None = None) -> PatchResult:
        """Restore every merged key to its exact original, drop all backups (then move if asked)."""
        state = weight_state(self.model)
        if state.streamer is not None:
            state.streamer.reset()
        restored = 0
        state.signature = IN_PROGRESS
        for key in list(state.applied):
            self._restore_key(state, key, keep_backup=False)
            restored += 1
        state.backups.clear()
        state.variants.clear()
        state.signature = ORIGINAL
        telemetry.count(weights_restored=restored)
        if device_to is not None:
            self.move_to(device_to)
        return PatchResult(restored=restored)

    def _merge_key(self, state: WeightState, key: str, want: KeySignature, backup_device: torch.device,
                   backup_dtype: torch.dtype | None, cache_factors: bool, writes: "_PendingWrites") -> None:
        param = state.param(self.model, key)
        original = state.backups.get(key)
        if original is None:
            original = state.backups[key] = _copy_for_backup(param, backup_device, backup_dtype)
        # Record the key as dirty before writing: a failure can then never leave
        # an unrecorded change, the next diff restores it from the backup.
        state.applied[key] = WRITING
        merged = original.to(param.device, torch.float32, non_blocking=True)   # no copy if already so
        for entry in self.patches[key]:
            if entry.strength_model != 1.0:
                merged = merged * entry.strength_model
            merged = entry.patch.added(merged, entry.strength_patch, cache_factors)
            if cache_factors:
                state.cached_patches[id(entry.patch)] = entry.patch
        writes.add(key, param, merged, want)

    def _restore_key(self, state: WeightState, key: str, keep_backup: bool) -> None:
        original = state.backups[key] if keep_backup else state.backups.pop(key)
        state.param(self.model, key).data.copy_(original, non_blocking=True)
        del state.applied[key]


# Merged values waiting for their copy into the weights, at most this many bytes at a time
# (float32 results of a whole SDXL LoRA at once would be gigabytes).
WRITE_BATCH_BYTES = 256 * 2 ** 20


class _PendingWrites:
    """Weight writes issued together: one multi-tensor copy (`torch._foreach_copy_`) per
    batch instead of a copy kernel per key.

    Why: a LoRA switch is launch-bound (each key was a GEMM, a cast-and-copy and the
    bookkeeping); the multi-tensor copy writes many keys per launch. The values are
    exactly what a per-key `copy_` writes (the same conversion of the same merged
    tensor), so pixels stay bit-identical across policies (DESIGN.md invariant 1). A key
    stays marked WRITING until its copy is issued: a failure in between leaves it dirty,
    and the next diff restores it from its backup."""

    def __init__(self, state: WeightState, limit_bytes: int | None = None) -> None:
        self.state = state
        self.limit_bytes = WRITE_BATCH_BYTES if limit_bytes is None else limit_bytes
        self.targets: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.keys: list[tuple[str, KeySignature]] = []
        self.bytes = 0

    def add(self, key: str, param: torch.nn.Parameter, value: torch.Tensor, want: KeySignature) -> None:
        self.state.applied[key] = WRITING
        self.targets.append(param.data)
        self.values.append(value)
        self.keys.append((key, want))
        self.bytes += _nbytes(value)
        if self.bytes >= self.limit_bytes:
            self.flush()

    def flush(self) -> None:
        if self.targets:
            # One call per device: a partially resident model has weights on the GPU and, for
            # its streamed layers, in host memory.
            by_device: dict[torch.device, tuple[list, list]] = {}
            for target, value in zip(self.targets, self.values):
                targets, values = by_device.setdefault(target.device, ([], []))
                targets.append(target)
                values.append(value)
            for targets, values in by_device.values():
                torch._foreach_copy_(targets, values, non_blocking=True)
            for key, want in self.keys:
                self.state.applied[key] = want
        self.targets, self.values, self.keys, self.bytes = [], [], [], 0


def _copy_for_backup(param: torch.Tensor, device: torch.device, dtype: torch.dtype | None) -> torch.Tensor:
    return _transfer(param.detach(), device, dtype or param.dtype, copy=True)


def _transfer(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype, copy: bool = False,
              pin: bool = False) -> torch.Tensor:
    """`tensor` on `device` in `dtype`. Host copies of GPU tensors (and, with `pin`, any host
    copy) are pinned: restores and streaming from them are asynchronous and run at full bus
    speed. A meta tensor (no data) becomes uninitialised storage of its shape."""
    if tensor.is_meta and torch.device(device).type != "meta":
        result = torch.empty(tensor.shape, dtype=dtype, device=device)
    else:
        result = tensor.to(device, dtype, copy=copy)
    if result.device.type == "cpu" and (pin or tensor.device.type == "cuda") and not result.is_pinned():
        result = result.pin_memory()
    return result
