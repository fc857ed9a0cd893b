"""POLICY: devices, dtypes, the memory budgets and the registry of loaded models.

Two policies (DESIGN.md §3):

* conservative (default) keeps upstream Fooocus's semantics: a loaded model is
  recognised by the identity of its patcher object, clones of a module are
  unloaded before another clone loads, and unless `--disable-offload-from-vram`
  every load evicts every model not named in it.
* resident (`--keep-models-resident`) recognises a model by its module and its
  weight-patch signature, reaches a new signature by diff on the device, and
  frees memory in tiers (cheapest to rebuild first) only when the budget needs room.

Partial residency is a placement decided here: a model that does not fit its budget
keeps as many of its weight groups on the device as fit beside the stage's working
memory and the stream window (`ResidencyOrder` says which first), the rest streams
in per forward from host memory (`model_patcher.WeightStreamer` does the moving).
`--always-low-vram` and NORMAL_VRAM fall back to it when a model does not fit,
`--always-no-vram` streams every model, and the resident policy keeps a set
partially resident instead of evicting models of the running request.

Memory is *accounted*, never re-measured: one ledger per device (the accelerator
and the host), charged with everything resident mode keeps there: weights,
backups of originals (in the dtype actually chosen), cached LoRA factors and the
caches other parts register (conditionings, parsed LoRA files). A load is planned
against the ledger before anything moves, and registered before it moves, so a
failure can roll it back. Decisions are the same on a CPU-only machine, and tests
use the `meta` device as a stand-in accelerator. How weights are moved and
patched is `model_patcher`'s business.
"""

from __future__ import annotations

import bisect
import enum
import functools
import gc
import logging
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch

from ldm_patched.modules import telemetry
from ldm_patched.modules.model_patcher import ModelPatcher, PatchSignature, WeightGroup

log = logging.getLogger("fooocus_resident.model_management")

GIB = 1024 ** 3
HOST = torch.device("cpu")


class VRAMState(enum.Enum):
    DISABLED = 0      # no accelerator: everything on the CPU
    NO_VRAM = 1
    LOW_VRAM = 2
    NORMAL_VRAM = 3
    HIGH_VRAM = 4     # --always-gpu / --always-high-vram: nothing is offloaded to the CPU


class Policy(str, enum.Enum):
    CONSERVATIVE = "conservative"
    RESIDENT = "resident"


class BudgetError(ValueError):
    """A budget flag that cannot be honoured on this machine (an error at start)."""


@dataclass(frozen=True)
class MemorySettings:
    policy: Policy = Policy.CONSERVATIVE
    vram_state: VRAMState = VRAMState.DISABLED
    device: torch.device = torch.device("cpu")
    always_offload_from_vram: bool = True
    vae_in_cpu: bool = False
    total_bytes: int = 0
    budget_bytes: int = 0
    host_budget_bytes: int = 0              # 0: no separate host limit (the device is the host)
    check_accounting: bool = False          # --check-memory-accounting: ledger vs tensors after each request
    unet_dtype: torch.dtype | None = None   # None: chosen by device
    vae_dtype: torch.dtype | None = None
    text_encoder_dtype: torch.dtype | None = None


def normalize_device(device: torch.device | str, default: torch.device | None = None) -> torch.device:
    """One name per device: "cuda" is the configured (or current) CUDA device, "cuda:0" stays."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        if default is not None and default.type == "cuda" and default.index is not None:
            return default
        index = torch.cuda.current_device() if torch.cuda.is_available() else 0
        return torch.device("cuda", index)
    return device


def default_reserve_bytes(total_bytes: int) -> int:
    """Kept out of the budget: CUDA context, allocator slack and activations that
    the per-request working-memory estimate does not cover (1.5 GiB + 5 %)."""
    return int(1.5 * GIB + 0.05 * total_bytes)


def total_device_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return host_total_bytes()


def host_total_bytes() -> int:
    try:
        import psutil
        return int(psutil.virtual_memory().total)
    except ImportError:  # pragma: no cover - psutil comes with gradio
        return 16 * GIB


def available_device_bytes(device: torch.device) -> int:
    """What this process can use on the device now: free memory plus what it already holds
    (other processes' memory is not ours to budget)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device))
    return total_device_bytes(device)


def default_host_budget(total_bytes: int) -> int:
    """Host memory for host copies, pinned backups and file caches: all but 4 GiB + 10 %."""
    return max(int(total_bytes - 4 * GIB - 0.1 * total_bytes), 0)


def settings_from_args(args: object) -> MemorySettings:
    """Turn Fooocus's memory/device/precision flags (plus ours) into settings."""
    flag = lambda name, default=None: getattr(args, name, default)  # noqa: E731
    cuda = torch.cuda.is_available() and flag("always_cpu") in (None, False)
    if cuda:
        device = torch.device("cuda", flag("gpu_device_id") or 0)
    else:
        device = torch.device("cpu")
    if not cuda:
        vram_state = VRAMState.DISABLED
    elif flag("always_gpu") or flag("always_high_vram"):
        vram_state = VRAMState.HIGH_VRAM
    elif flag("always_no_vram"):
        vram_state = VRAMState.NO_VRAM
    elif flag("always_low_vram"):
        vram_state = VRAMState.LOW_VRAM
    else:
        vram_state = VRAMState.NORMAL_VRAM
    total = total_device_bytes(device)
    budget_gb = flag("vram_budget")
    if budget_gb is not None and budget_gb * GIB > total:
        raise BudgetError(f"--vram-budget {budget_gb:g} GB is more than {device} has "
                          f"({total / GIB:.1f} GB in all)")
    if budget_gb:
        budget = int(budget_gb * GIB)
    else:
        budget = max(available_device_bytes(device) - default_reserve_bytes(total), 0)
    host_budget = default_host_budget(host_total_bytes()) if cuda else 0
    return MemorySettings(
        policy=Policy.RESIDENT if flag("keep_models_resident") else Policy.CONSERVATIVE,
        vram_state=vram_state,
        device=device,
        always_offload_from_vram=not flag("disable_offload_from_vram", False),
        vae_in_cpu=bool(flag("vae_in_cpu")),
        total_bytes=total,
        budget_bytes=budget,
        host_budget_bytes=host_budget,
        check_accounting=bool(flag("check_memory_accounting")),
        unet_dtype=_dtype_flag(args, "unet", ("fp16", "bf16", "fp8_e4m3fn", "fp8_e5m2")),
        vae_dtype=_dtype_flag(args, "vae", ("fp16", "fp32", "bf16")),
        text_encoder_dtype=_dtype_flag(args, "clip", ("fp16", "fp32", "bf16", "fp8_e4m3fn", "fp8_e5m2")),
    )


_DTYPES = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16,
           "fp8_e4m3fn": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}
FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def _dtype_flag(args: object, component: str, choices: Iterable[str]) -> torch.dtype | None:
    for choice in choices:
        if getattr(args, f"{component}_in_{choice}", False):
            return _DTYPES[choice]
    if getattr(args, "all_in_fp16", False):
        return torch.float16
    if getattr(args, "all_in_fp32", False):
        return torch.float32
    return None


def _add(ledger: dict[torch.device, int], other: dict[torch.device, int]) -> dict[torch.device, int]:
    for device, nbytes in other.items():
        ledger[device] = ledger.get(device, 0) + nbytes
    return ledger


@dataclass(eq=False)
class LoadedModel:
    """A registry entry: a module on a device, and the patcher that last asked for it.

    Sizes are recorded per device when the entry is loaded or re-patched, so the
    steady-state path never walks the module's parameters."""

    patcher: ModelPatcher
    device: torch.device
    last_used: int
    weights: dict[torch.device, int] = field(default_factory=dict)
    extras: dict[torch.device, int] = field(default_factory=dict)   # backups and cached factors
    resident_count: int | None = None   # partially resident: how many groups of its order stay (None: whole)
    streamed: int = 0                   # bytes of the groups streamed in per forward

    @property
    def module(self) -> torch.nn.Module:
        return self.patcher.model

    @property
    def partial(self) -> bool:
        return self.resident_count is not None

    def weights_on_device(self) -> int:
        return self.weights.get(self.device, 0)

    def streamed_bytes(self) -> int:
        """Weights kept off the device and streamed in per forward (0 when placed whole)."""
        return self.streamed

    def resident_weight_bytes(self) -> int:
        """Weights that stay on the device (with the CPU as the device, streamed ones live
        there too: they are not counted here)."""
        return sum(self.weights.values()) - self.streamed if self.partial else self.weights_on_device()

    def placement_name(self) -> str:
        if not self.partial:
            return "whole"
        return "partial" if self.resident_weight_bytes() else "streamed"

    def placement_report(self) -> dict:
        return {"name": self.patcher.name, "placement": self.placement_name(),
                "resident_bytes": self.resident_weight_bytes(), "streamed_bytes": self.streamed_bytes(),
                "streamed_groups": len(self.patcher.streamed_groups())}

    @property
    def signature(self) -> PatchSignature:
        return self.patcher.applied_signature()

    def bytes_on(self, device: torch.device) -> int:
        return self.weights.get(device, 0) + self.extras.get(device, 0)

    def resident_bytes(self) -> int:
        return self.bytes_on(self.device)

    def measure(self, weights: bool = True) -> None:
        """Record sizes; a re-patch changes only backups and factors, not the weights."""
        if weights:
            self.weights = {normalize_device(d, self.device): n
                            for d, n in self.patcher.weight_bytes_by_device().items()}
            self.streamed = self.patcher.streamed_bytes()
        self.extras = {normalize_device(d, self.device): n
                       for d, n in self.patcher.extra_bytes_by_device().items()}


@dataclass(eq=False)
class RegisteredCache:
    """Memory another part keeps on a device (conditionings, parsed LoRA files).

    `nbytes` reports it; `free`, when given, drops it (the first tier to go)."""

    name: str
    device: torch.device
    nbytes: Callable[[], int]
    free: Callable[[], None] | None = None


@dataclass(frozen=True)
class Placement:
    """Where one load keeps what patching adds: backups and factor caches."""

    backup_device: torch.device
    backup_dtype: torch.dtype | None
    cache_factors: bool
    keep_variants: bool = False


@dataclass(frozen=True)
class ResidencyOrder:
    """The order in which a model's weight groups stay on the device: a resident share of N
    bytes is the longest prefix that fits in N.

    First the groups that cannot stream (they own tensors and so do their children), then
    the streamable ones, smallest first. Why smallest first: the bytes that must stream are
    then carried by the fewest, largest groups (fewest copies and waits per step), and the
    small layers (norms, biases, time and text projections) are those with the least compute
    to hide a copy behind; the big matrices of the wide transformer blocks stream."""

    names: tuple[str, ...]
    sizes: tuple[int, ...]
    cumulative: tuple[int, ...]
    pinned: int   # leading groups that never stream

    @staticmethod
    def of(groups: Sequence[WeightGroup]) -> "ResidencyOrder":
        fixed = [g for g in groups if not g.streamable]
        ordered = fixed + sorted((g for g in groups if g.streamable), key=lambda g: (g.nbytes, g.index))
        sizes = tuple(g.nbytes for g in ordered)
        cumulative, total = [], 0
        for size in sizes:
            total += size
            cumulative.append(total)
        return ResidencyOrder(tuple(g.name for g in ordered), sizes, tuple(cumulative), len(fixed))

    @property
    def count(self) -> int:
        return len(self.names)

    def total_bytes(self) -> int:
        return self.cumulative[-1] if self.cumulative else 0

    def resident_count(self, nbytes: int) -> int:
        """How many groups stay within `nbytes` (never fewer than the pinned ones)."""
        return max(self.pinned, bisect.bisect_right(self.cumulative, nbytes))

    def resident_bytes(self, count: int) -> int:
        return self.cumulative[count - 1] if count else 0

    def streamed(self, count: int) -> frozenset[str]:
        return frozenset(self.names[count:])

    def window_bytes(self, count: int) -> int:
        """Device bytes streaming needs at once beyond the resident share: the group computing
        and the one prefetched, at most the two largest streamed groups."""
        return sum(self.sizes[max(count, self.count - 2):]) if count < self.count else 0


@dataclass
class LoadPlan:
    """What one `load_models_gpu` call will do; computed before anything moves."""

    already_loaded: list[LoadedModel] = field(default_factory=list)
    to_load: list[ModelPatcher] = field(default_factory=list)
    to_evict: list[LoadedModel] = field(default_factory=list)
    placement: Placement | None = None          # None: the conservative default (offload device)
    charges: dict[torch.device, int] = field(default_factory=dict)   # what the load adds, per device
    over_budget: bool = False
    # Partial residency, by id of the module: how many groups of its order stay on the device
    # (its whole count: placed whole). Models of the load and models it shrinks to make room.
    residency: dict[int, int] = field(default_factory=dict)
    stream_window_bytes: int = 0                # device bytes the load's streamed models need at once


@dataclass
class RequestSummary:
    counters: telemetry.MoveCounters
    policy: Policy
    budget_bytes: int
    resident_bytes: int
    peak_allocated_bytes: int
    over_budget: bool
    effective_budget_bytes: int = 0
    host_resident_bytes: int = 0
    placements: list[dict] = field(default_factory=list)   # per model the request used: resident/streamed


@dataclass
class CacheStats:
    """InvokeAI-style cache report: hits, misses and the high-water mark per device."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    tier_frees: dict[str, int] = field(default_factory=dict)   # bytes freed per tier
    high_water: dict[str, int] = field(default_factory=dict)   # per device name
    out_of_memory: int = 0


# Resident mode keeps a set partially resident while the load's models keep at least this share of
# their bytes on the device. Further short, streaming them on every step would cost more than
# reloading the set's other models once per request: those are evicted instead.
JUST_SHORT_SHARE = 0.5

# Cheapest to rebuild first. The first tier also holds merged variants of sets not in use
# and the caches other parts register (conditionings).
TIERS = ("unused_factor_caches", "unpatched_backups", "float32_backups", "models")


class ModelManager:
    def __init__(self, settings: MemorySettings) -> None:
        self.settings = settings
        self.device = normalize_device(settings.device)
        self.loaded: list[LoadedModel] = []   # most recently used first
        self.caches: list[RegisteredCache] = []
        self.clock = 0
        self.effective_budget = settings.budget_bytes
        self.stats = CacheStats()
        self._request_start = telemetry.snapshot()
        self._request_over_budget = False
        self._request_peak = 0
        self._current_request_modules: set[int] = set()
        self._previous_request_modules: set[int] = set()   # the set a request like the last one uses
        self._request_placements: dict[str, dict] = {}
        self._orders: "weakref.WeakKeyDictionary[torch.nn.Module, ResidencyOrder]" = weakref.WeakKeyDictionary()

    # -- devices and dtypes ------------------------------------------------------------

    @property
    def resident(self) -> bool:
        return self.settings.policy is Policy.RESIDENT

    def normalize(self, device: torch.device | str) -> torch.device:
        return normalize_device(device, self.device)

    def offload_device(self) -> torch.device:
        if self.settings.vram_state is VRAMState.HIGH_VRAM and not self.resident:
            return self.device
        return HOST

    def vae_device(self) -> torch.device:
        return HOST if self.settings.vae_in_cpu else self.device

    def _chosen_dtype(self, component: str) -> torch.dtype | None:
        return {"unet": self.settings.unet_dtype, "vae": self.settings.vae_dtype,
                "text_encoder": self.settings.text_encoder_dtype}[component]

    def storage_dtype_for(self, component: str) -> torch.dtype | None:
        """The dtype `component`'s weights are stored in when it is not the compute dtype
        (float8, `--unet-in-fp8-*` / `--clip-in-fp8-*`): layers upcast per call."""
        chosen = self._chosen_dtype(component)
        return chosen if chosen in FLOAT8 else None

    def dtype_for(self, component: str, device: torch.device | None = None) -> torch.dtype:
        """The dtype `component` computes in (with float8 storage: the device's default)."""
        device = device or self.device
        chosen = self._chosen_dtype(component)
        if chosen is not None and chosen not in FLOAT8:
            return chosen
        if device.type != "cuda":
            return torch.float32
        if component == "vae":
            major, _ = torch.cuda.get_device_capability(device)
            return torch.bfloat16 if major >= 8 else torch.float32
        return torch.float16

    # -- ledgers ----------------------------------------------------------------------

    def limit(self, device: torch.device) -> int | None:
        """The budget of a ledger: the device's (lowered after an out-of-memory), the host's."""
        device = self.normalize(device)
        if device == self.device:
            return self.effective_budget
        if device == HOST and self.settings.host_budget_bytes:
            return self.settings.host_budget_bytes
        return None

    def used_bytes(self, device: torch.device | None = None) -> int:
        """Everything charged to `device`: registered models' weights, backups and factors
        on it, and the registered caches that live there."""
        device = self.normalize(device or self.device)
        return (sum(e.bytes_on(device) for e in self.loaded)
                + sum(c.nbytes() for c in self.caches if c.device == device))

    def resident_bytes(self, device: torch.device | None = None) -> int:
        return self.used_bytes(device)

    def free_bytes(self, device: torch.device | None = None) -> int:
        device = self.normalize(device or self.device)
        limit = self.limit(device)
        return (limit if limit is not None else 1 << 62) - self.used_bytes(device)

    def register_cache(self, name: str, device: torch.device, nbytes: Callable[[], int],
                       free: Callable[[], None] | None = None) -> None:
        """Charge a cache kept elsewhere to a ledger (replaces one of the same name)."""
        self.caches = [c for c in self.caches if c.name != name]
        self.caches.append(RegisteredCache(name, self.normalize(device), nbytes, free))

    def find(self, patcher: ModelPatcher) -> LoadedModel | None:
        """The entry that counts as `patcher` being loaded, per policy."""
        for entry in self.loaded:
            if self.resident and entry.module is patcher.model:
                return entry
            if not self.resident and entry.patcher is patcher:
                return entry
        return None

    # -- planning ----------------------------------------------------------------

    def plan_load(self, patchers: Sequence[ModelPatcher], memory_required: int = 0) -> LoadPlan:
        if self.resident:
            return self._plan_resident(patchers, memory_required)
        return self._plan_conservative(patchers, memory_required)

    def _plan_conservative(self, patchers: Sequence[ModelPatcher], memory_required: int) -> LoadPlan:
        plan = LoadPlan()
        for patcher in _unique(patchers):
            entry = self.find(patcher)
            if entry is not None:
                plan.already_loaded.append(entry)
            else:
                plan.to_load.append(patcher)
        keep = set(map(id, plan.already_loaded))
        # Upstream unloads other clones of a module before loading a clone of it.
        for patcher in plan.to_load:
            for entry in self.loaded:
                if entry.module is patcher.model and id(entry) not in keep and entry not in plan.to_evict:
                    plan.to_evict.append(entry)
        device = self._stage_device(patchers)
        on_device = [p for p in _unique(patchers) if self.normalize(p.load_device) == device]
        required = (int(sum(p.model_size() for p in plan.to_load if p in on_device) * 1.3)
                    + sum(e.streamed_bytes() for e in plan.already_loaded) + memory_required)
        plan.charges = {device: required}
        free = self.free_bytes(device) + sum(e.bytes_on(device) for e in plan.to_evict)
        for entry in reversed(self.loaded):
            if id(entry) in keep or entry in plan.to_evict:
                continue
            if not self.settings.always_offload_from_vram and free > required:
                break
            plan.to_evict.append(entry)
            free += entry.bytes_on(device)
        plan.over_budget = free < required
        if self._may_stream(device) and (plan.over_budget or self._streams_everything()):
            plan.over_budget = self._fit_partially(plan, on_device, device, free, memory_required) > 0
        else:
            self._place_whole(plan, plan.already_loaded)
        return plan

    # -- partial residency ---------------------------------------------------------

    def _may_stream(self, device: torch.device) -> bool:
        """Whether a model on `device` that does not fit may be partially resident: on the
        accelerator (not a stage the flags put on the host, e.g. --vae-in-cpu), and not on a
        CPU-only machine nor where the user said the GPU is large."""
        return device == self.device and self.settings.vram_state in (
            VRAMState.NORMAL_VRAM, VRAMState.LOW_VRAM, VRAMState.NO_VRAM)

    def _streams_everything(self) -> bool:
        return self.settings.vram_state is VRAMState.NO_VRAM

    def _streams_all_on(self, device: torch.device) -> bool:
        """--always-no-vram: every model on the accelerator streams, whether it fits or not."""
        return self._streams_everything() and self._may_stream(device)

    def residency_order(self, patcher: ModelPatcher) -> ResidencyOrder:
        order = self._orders.get(patcher.model)
        if order is None:
            order = self._orders[patcher.model] = ResidencyOrder.of(patcher.weight_groups())
        return order

    def _entry_of(self, module: torch.nn.Module) -> LoadedModel | None:
        for entry in self.loaded:
            if entry.module is module:
                return entry
        return None

    def _on_device_now(self, patcher: ModelPatcher, device: torch.device) -> int:
        entry = self._entry_of(patcher.model)
        return entry.weights_on_device() if entry is not None and entry.device == device else 0

    def _size(self, patcher: ModelPatcher) -> int:
        """The module's bytes: as recorded when registered (no walk on the steady path)."""
        entry = self._entry_of(patcher.model)
        return sum(entry.weights.values()) if entry is not None else patcher.model_size()

    def _place_whole(self, plan: LoadPlan, entries: Iterable[LoadedModel]) -> None:
        """Partially resident models of a load that fits go back to whole."""
        for entry in entries:
            if entry.partial:
                plan.residency[id(entry.module)] = self.residency_order(entry.patcher).count

    def _fit_partially(self, plan: LoadPlan, on_device: Sequence[ModelPatcher], device: torch.device,
                       free: int, memory_required: int) -> int:
        """Residency for the load's models on `device`, with `free` bytes there beyond what is
        charged now and `memory_required` of them the stage's working memory: smallest models
        whole while they fit, then as many groups as fit beside the stream window. Returns the
        bytes still missing (> 0: even the pinned groups and the window do not fit)."""
        room = free - memory_required + sum(self._on_device_now(p, device) for p in on_device)
        added, window_total = 0, 0
        for patcher in sorted(on_device, key=self._size):
            order = self.residency_order(patcher)
            if order.total_bytes() <= room and not self._streams_everything():
                count = order.count
            else:
                count = self._partial_count(patcher, order, room)
            window = order.window_bytes(count)
            resident = order.resident_bytes(count)
            room -= resident + window
            added += max(resident - self._on_device_now(patcher, device), 0)
            window_total += window
            plan.residency[id(patcher.model)] = count
        plan.stream_window_bytes = window_total
        plan.placement = Placement(HOST, None, False)   # backups where the streamed weights live
        plan.charges[device] = memory_required + added + window_total
        return -room

    def _partial_count(self, patcher: ModelPatcher, order: ResidencyOrder, room: int) -> int:
        if self._streams_everything():
            return order.pinned
        count = order.resident_count(room - order.window_bytes(order.pinned))
        entry = self._entry_of(patcher.model)
        if entry is not None and entry.partial:
            # A share grows back only to whole: growing it at its stage and shrinking it at the
            # next (the VAE's working memory) would move bytes on every request.
            count = min(count, entry.resident_count)
        return count

    def _shrink_for(self, plan: LoadPlan, short: int, skip: set[int]) -> int:
        """Other partially resident models give up groups (the largest of their share first)
        before any model is evicted whole, each down to JUST_SHORT_SHARE of its bytes; returns
        the bytes freed."""
        freed = 0
        for entry in reversed(self.loaded):
            if freed >= short:
                break
            if not entry.partial or id(entry.module) in skip or entry in plan.to_evict:
                continue
            order = self.residency_order(entry.patcher)
            now = order.resident_bytes(entry.resident_count)
            floor = int(order.total_bytes() * JUST_SHORT_SHARE)
            count = order.resident_count(max(now - (short - freed), floor))
            if order.resident_bytes(count) < now:
                plan.residency[id(entry.module)] = count
                freed += now - order.resident_bytes(count)
        return freed

    def _stream_one_more(self, module_ref: "weakref.ref[torch.nn.Module]") -> bool:
        """After an out-of-memory in a partially resident forward: one more group streams (the
        largest of its share), and the budget is lowered by it (the accounting under-estimated
        this device). False when nothing is left to stream: the error goes on."""
        module = module_ref()
        entry = self._entry_of(module) if module is not None else None
        if entry is None or not entry.partial:
            return False
        order = self.residency_order(entry.patcher)
        if entry.resident_count <= order.pinned:
            return False
        count = entry.resident_count - 1
        self.stats.out_of_memory += 1
        self.effective_budget = max(self.effective_budget - order.sizes[count], 0)
        self._place(entry.patcher, count)
        entry.resident_count = count
        entry.measure()
        if self.device.type == "cuda":
            gc.collect()
            with torch.cuda.device(self.device):
                torch.cuda.empty_cache()
        log.warning("[Fooocus-Resident] out of memory in a partially resident forward of %s: streaming "
                    "%d of %d weight groups now, effective budget %.2f GB", entry.patcher.name,
                    order.count - count, order.count, self.effective_budget / GIB)
        return True

    def _place(self, patcher: ModelPatcher, count: int | None) -> None:
        """Move `patcher`'s module to its load device, keeping `count` groups of its order there
        and streaming the rest (None or all of them: whole)."""
        device = self.normalize(patcher.load_device)
        order = self.residency_order(patcher) if count is not None else None
        if order is None or count >= order.count:
            patcher.move_to(device)
            return
        patcher.move_to(device, streamed=order.streamed(count),
                        on_out_of_memory=functools.partial(self._stream_one_more, weakref.ref(patcher.model)))

    def _stage_device(self, patchers: Sequence[ModelPatcher]) -> torch.device:
        """The device a stage computes on (its working memory is charged there)."""
        for patcher in patchers:
            return self.normalize(patcher.load_device)
        return self.device

    def _plan_resident(self, patchers: Sequence[ModelPatcher], memory_required: int) -> LoadPlan:
        plan = LoadPlan()
        wanted = _unique(patchers)
        for patcher in wanted:
            entry = self.find(patcher)
            if entry is not None and entry.device == self.normalize(patcher.load_device):
                plan.already_loaded.append(entry)
                continue
            if entry is not None:
                plan.to_evict.append(entry)   # registered on another device: reload it whole
            plan.to_load.append(patcher)
        device = self._stage_device(wanted)
        on_device = [p for p in wanted if self.normalize(p.load_device) == device]
        # What placing them whole adds: new models, and the streamed part of partial ones.
        base = memory_required + sum(self._size(p) - self._on_device_now(p, device) for p in on_device)
        growth = [self._growth(p) for p in wanted if self.normalize(p.load_device) == device]
        evicted = sum(e.bytes_on(device) for e in plan.to_evict)
        cheap = self.free_bytes(device) + evicted
        # Preferred first: float32 backups, cached factors and kept merged variants on the device
        # (fastest switches), then backups in the weights' dtype, then no variants, then no
        # factor cache, then backups on the host.
        options = [
            (Placement(device, torch.float32, True, True), sum(g[1] + g[2] + g[3] for g in growth)),
            (Placement(device, None, True, True), sum(g[0] + g[2] + g[3] for g in growth)),
            (Placement(device, None, True), sum(g[0] + g[2] for g in growth)),
            (Placement(device, None, False), sum(g[0] for g in growth)),
            (Placement(HOST, None, False), 0),
        ]
        if device == HOST:   # nothing to gain from float32 copies or a second place on the host
            options = [(Placement(HOST, None, False), sum(g[0] for g in growth))]
        if base + options[0][1] > cheap:   # counted only under pressure: the steady state stays O(1)
            cheap += self._reclaimable(device, wanted, TIERS[:2])
        for placement, extra in options:
            if base + extra <= cheap and not self._streams_all_on(device):
                plan.placement, plan.charges = placement, {device: base + extra}
                self._place_whole(plan, plan.already_loaded)
                break
        else:
            placement, extra = options[-1]
            plan.placement, plan.charges = placement, {device: base + extra}
            free = cheap + self._reclaimable(device, wanted, TIERS[2:3])
            self._make_room_resident(plan, wanted, on_device, device, free, base + extra, memory_required)
        if plan.placement.backup_device != device:
            plan.charges[HOST] = sum(g[0] for g in growth)
        return plan

    def _make_room_resident(self, plan: LoadPlan, wanted: Sequence[ModelPatcher], on_device: Sequence[ModelPatcher],
                            device: torch.device, free: int, need: int, memory_required: int) -> None:
        """A load that does not fit: evict models outside the request's set (those neither this
        request nor the last one used; least recently used first); then, where streaming is
        allowed, keep the load's models partially resident, taking groups from other partially
        resident models before evicting models of the set whole; without streaming, evict
        models of the set."""
        wanted_modules = {id(p.model) for p in wanted}
        in_set = self._current_request_modules | self._previous_request_modules
        outside = [e for e in reversed(self.loaded) if id(e.module) not in in_set]
        inside = [e for e in reversed(self.loaded) if id(e.module) in in_set]
        if not self._streams_all_on(device):
            free = self._evict_until(plan, outside, device, free, need, wanted_modules)
            if free >= need:
                self._place_whole(plan, plan.already_loaded)
                return
        if not self._may_stream(device):
            plan.over_budget = self._evict_until(plan, inside, device, free, need, wanted_modules) < need
            return
        short = self._fit_partially(plan, on_device, device, free, memory_required)
        if not self._settled(plan, on_device, short, device):
            free += self._shrink_for(plan, need - free, wanted_modules)
            short = self._fit_partially(plan, on_device, device, free, memory_required)
        for entry in outside + inside:
            if self._settled(plan, on_device, short, device):
                break
            if id(entry.module) in wanted_modules or entry in plan.to_evict:
                continue
            plan.to_evict.append(entry)
            plan.residency.pop(id(entry.module), None)
            free += entry.bytes_on(device)
            short = self._fit_partially(plan, on_device, device, free, memory_required)
        plan.over_budget = short > 0

    def _settled(self, plan: LoadPlan, on_device: Sequence[ModelPatcher], short: int, device: torch.device) -> bool:
        """A partial plan good enough to stop evicting: it fits, and (but with --always-no-vram)
        the load's models keep at least JUST_SHORT_SHARE of their bytes on the device."""
        return short <= 0 and (self._streams_all_on(device)
                               or self._resident_share(plan, on_device) >= JUST_SHORT_SHARE)

    def _resident_share(self, plan: LoadPlan, on_device: Sequence[ModelPatcher]) -> float:
        orders = [(self.residency_order(p), plan.residency.get(id(p.model))) for p in on_device]
        total = sum(o.total_bytes() for o, _ in orders)
        kept = sum(o.total_bytes() if c is None else o.resident_bytes(c) for o, c in orders)
        return kept / total if total else 1.0

    def _evict_until(self, plan: LoadPlan, candidates: Iterable[LoadedModel], device: torch.device, free: int,
                     need: int, wanted_modules: set[int]) -> int:
        for entry in candidates:
            if free >= need:
                break
            if id(entry.module) in wanted_modules or entry in plan.to_evict:
                continue
            plan.to_evict.append(entry)
            free += entry.bytes_on(device)
        return free

    @staticmethod
    def _growth(patcher: ModelPatcher) -> tuple[int, int, int, int]:
        """(new backups in the weights' dtype, the same in float32, new factor caches, merged
        variants kept of the set switched away from) that reaching `patcher`'s state adds."""
        if patcher.is_applied():
            return 0, 0, 0, 0       # already in its wanted state: adds nothing
        native = patcher.pending_backup_bytes()
        wide = patcher.pending_backup_bytes(element_size=4)
        factors = patcher.pending_factor_bytes() if patcher.patches else 0
        return native, max(native, wide), factors, patcher.pending_variant_bytes()

    def largest_batch(self, patchers: Sequence[ModelPatcher], per_item: int, wanted: int) -> int:
        """How many items (images) of `per_item` working memory one call of `patchers` (loaded)
        can take: what the ledger has free on their device, and, only when that is short, what
        freeing tiers and evicting other models would give. At least 1, at most `wanted`."""
        if wanted <= 1 or per_item <= 0:
            return max(1, wanted)
        device = self._stage_device(patchers)
        room = self.free_bytes(device)
        if room < wanted * per_item:   # counted only when short: the steady state stays O(1)
            keep = {id(p.model) for p in patchers}
            room += sum(e.bytes_on(device) for e in self.loaded if id(e.module) not in keep)
            if self.resident:
                room += self._reclaimable(device, patchers, TIERS[:3])
        return max(1, min(wanted, room // per_item))

    # -- freeing in tiers --------------------------------------------------------------

    def _reclaimable(self, device: torch.device, keep: Sequence[ModelPatcher], tiers: Iterable[str]) -> int:
        """Bytes the given tiers would free on `device` without touching what `keep` needs."""
        return sum(self._free_tier(tier, device, keep, need=None, dry_run=True) for tier in tiers)

    def make_room(self, device: torch.device, need: int, keep: Sequence[ModelPatcher] = (),
                  tiers: Iterable[str] = TIERS[:3]) -> bool:
        """Free tiers in order until `need` more bytes fit on `device`; True when they fit."""
        device = self.normalize(device)
        for tier in tiers:
            if self.free_bytes(device) >= need:
                break
            self._free_tier(tier, device, keep, need=need, dry_run=False)
        return self.free_bytes(device) >= need

    def _free_tier(self, tier: str, device: torch.device, keep: Sequence[ModelPatcher],
                   need: int | None, dry_run: bool) -> int:
        """Free (or, dry, count) one tier on `device`, least recently used models first,
        stopping once `need` fits. Whole models are the plan's business, not a tier here."""
        freed = self._free_caches(device, need, dry_run) if tier == "unused_factor_caches" else 0
        if tier == "models":
            return freed
        for entry in reversed(self.loaded):
            if not dry_run and self._fits(device, need):
                break
            if not entry.extras.get(device, 0):
                continue
            keepers = [p for p in keep if p.model is entry.module]
            if entry.patcher.is_applied():
                keepers.append(entry.patcher)
            if dry_run:
                freed += self._tier_bytes(tier, entry.patcher, keepers, device)
                continue
            before = entry.extras.get(device, 0)
            self._apply_tier(tier, entry.patcher, keepers, device, need)
            entry.measure(weights=False)
            freed += before - entry.extras.get(device, 0)
        if not dry_run and freed:
            self.stats.tier_frees[tier] = self.stats.tier_frees.get(tier, 0) + freed
        return freed

    def _free_caches(self, device: torch.device, need: int | None, dry_run: bool) -> int:
        freed = 0
        for cache in self.caches:
            if cache.device != device or cache.free is None:
                continue
            if dry_run:
                freed += cache.nbytes()
            elif not self._fits(device, need):
                before = cache.nbytes()
                cache.free()
                freed += before - cache.nbytes()
        return freed

    def _tier_bytes(self, tier: str, patcher: ModelPatcher, keepers: list[ModelPatcher],
                    device: torch.device) -> int:
        if tier == "unused_factor_caches":
            return (patcher.drop_factor_caches(keepers, device=device, dry_run=True)
                    + patcher.drop_variants(keepers, device=device, dry_run=True))
        if tier == "unpatched_backups":
            return patcher.drop_kept_backups(keepers, device=device, dry_run=True)
        downgraded = patcher.downgrade_backups(device=device, dry_run=True)
        remaining = patcher.backup_bytes(device) - downgraded
        if device != HOST and self.free_bytes(HOST) >= remaining:
            return downgraded + remaining
        return downgraded

    def _apply_tier(self, tier: str, patcher: ModelPatcher, keepers: list[ModelPatcher],
                    device: torch.device, need: int | None) -> None:
        if tier == "unused_factor_caches":
            patcher.drop_factor_caches(keepers, device=device)
            patcher.drop_variants(keepers, device=device)
        elif tier == "unpatched_backups":
            patcher.drop_kept_backups(keepers, device=device)
        else:
            patcher.downgrade_backups(device=device)
            remaining = patcher.backup_bytes(device)
            if (self.free_bytes(device) < (need or 0) and device != HOST
                    and self.free_bytes(HOST) >= remaining):
                patcher.move_backups(HOST)

    def _fits(self, device: torch.device, need: int | None) -> bool:
        return need is not None and self.free_bytes(device) >= need

    # -- doing ----------------------------------------------------------------

    def load_models(self, patchers: Sequence[ModelPatcher], memory_required: int = 0) -> LoadPlan:
        start = time.perf_counter()
        moved_before = telemetry.snapshot()
        with telemetry.management_timer():
            plan = self.plan_load(patchers, memory_required)
            for entry in plan.to_evict:
                self._evict(entry)
            self.clock += 1
            wanted = _unique(patchers)
            wanted_modules = {id(p.model) for p in wanted}
            for entry in list(self.loaded):   # models this load shrinks, before it adds anything
                if id(entry.module) not in wanted_modules and id(entry.module) in plan.residency:
                    self._set_residency(entry, plan.residency[id(entry.module)])
            if self.resident:
                for device, charge in plan.charges.items():
                    self.make_room(device, charge, keep=wanted,
                                   tiers=TIERS[:3] if plan.placement.backup_device == HOST else TIERS[:2])
            for entry in plan.already_loaded:
                self.stats.hits += 1
                self._refresh(entry, self._patcher_for(entry, patchers), plan.placement,
                              plan.residency.get(id(entry.module)))
            for patcher in plan.to_load:
                self.stats.misses += 1
                self._load(patcher, plan.placement, plan.residency.get(id(patcher.model)))
            if plan.over_budget and self.resident:
                self._request_over_budget = True
                log.warning("[Fooocus-Resident] request needs more than the budget of %.2f GB; running it %s",
                            self.effective_budget / GIB,
                            "streaming what does not fit" if plan.residency else "the conservative way")
            self._current_request_modules.update(wanted_modules)
            for entry in self.loaded:
                if id(entry.module) in wanted_modules:
                    self._request_placements[entry.patcher.name] = entry.placement_report()
            self._note_peak(memory_required + plan.stream_window_bytes)
            moved = telemetry.snapshot().minus(moved_before)
            if self.device.type == "cuda" and (moved.bytes_to_device or moved.bytes_to_offload
                                               or moved.weights_patched or moved.weights_restored):
                # Count the queued copies and merges here, not in the stage that follows.
                torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - start
        if elapsed > 0.1 and (moved.bytes_to_device or moved.bytes_to_offload or moved.weights_patched):
            print(f"[Fooocus Model Management] Moving model(s) has taken {elapsed:.2f} seconds")
        return plan

    def _note_peak(self, memory_required: int) -> None:
        """The accounted peak of the request: what is resident plus the stage's working memory."""
        self._request_peak = max(self._request_peak, self.used_bytes(self.device) + memory_required)
        for device in {self.device, HOST}:
            name = str(device)
            self.stats.high_water[name] = max(self.stats.high_water.get(name, 0), self.used_bytes(device))

    @staticmethod
    def _patcher_for(entry: LoadedModel, patchers: Sequence[ModelPatcher]) -> ModelPatcher:
        for patcher in patchers:
            if patcher is entry.patcher:
                return patcher
        for patcher in patchers:
            if patcher.model is entry.module:
                return patcher
        return entry.patcher

    def _patch(self, patcher: ModelPatcher, placement: Placement | None) -> None:
        if not self.resident or placement is None:
            patcher.patch_model(backup_device=patcher.offload_device)
            return
        patcher.patch_model(backup_device=placement.backup_device, backup_dtype=placement.backup_dtype,
                            cache_factors=placement.cache_factors, keep_backups=True,
                            keep_variants=placement.keep_variants)

    def _set_residency(self, entry: LoadedModel, count: int) -> None:
        """Re-place a registered model: `count` groups of its order on the device (all: whole)."""
        target = None if count >= self.residency_order(entry.patcher).count else count
        if target == entry.resident_count:
            return
        self._place(entry.patcher, target)
        entry.resident_count = target
        entry.measure()

    def _refresh(self, entry: LoadedModel, patcher: ModelPatcher, placement: Placement | None,
                 count: int | None = None) -> None:
        entry.patcher = patcher
        entry.last_used = self.clock
        if count is not None:
            self._set_residency(entry, count)
        if not patcher.is_applied():
            try:
                self._patch(patcher, placement)
            except BaseException:
                # Back to the exact originals: a known state the next request starts from.
                patcher.unpatch_model()
                raise
            finally:
                entry.measure(weights=False)
        self._move_to_front(entry)

    def _load(self, patcher: ModelPatcher, placement: Placement | None, count: int | None = None) -> None:
        """Register, then move (`count` groups resident, the rest streamed; None: whole) and
        patch; any failure rolls the load back whole."""
        device = self.normalize(patcher.load_device)
        entry = LoadedModel(patcher=patcher, device=device, last_used=self.clock)
        if count is not None and count < self.residency_order(patcher).count:
            entry.resident_count = count
        self.loaded.insert(0, entry)
        try:
            self._place(patcher, entry.resident_count)
            self._patch(patcher, placement)
        except BaseException:
            self._rollback(entry)
            raise
        entry.measure()
        telemetry.count(models_loaded=1)

    def _rollback(self, entry: LoadedModel) -> None:
        """Undo a failed load: originals restored, module offloaded, entry unregistered."""
        try:
            entry.patcher.unpatch_model(device_to=entry.patcher.offload_device)
            entry.patcher.drop_factor_caches()
        finally:
            self.loaded.remove(entry)

    def _evict(self, entry: LoadedModel) -> None:
        """Restore the original weights, then move the module to its offload device."""
        if self.resident and id(entry.module) in self._current_request_modules:
            self._request_over_budget = True  # the request's own set did not fit
        entry.patcher.unpatch_model(device_to=entry.patcher.offload_device)
        entry.patcher.drop_factor_caches()
        self.loaded.remove(entry)
        self.stats.evictions += 1
        telemetry.count(models_unloaded=1)

    def _move_to_front(self, entry: LoadedModel) -> None:
        self.loaded.remove(entry)
        self.loaded.insert(0, entry)

    def free_memory(self, memory_required: int, keep_loaded: Sequence[ModelPatcher] = (),
                    device: torch.device | None = None) -> None:
        """Free tiers, then evict least-recently-used models (not in keep_loaded), until
        `memory_required` bytes fit in the budget."""
        device = self.normalize(device or self.device)
        keep = {id(p.model) for p in keep_loaded}
        with telemetry.management_timer():
            if self.make_room(device, memory_required, keep=keep_loaded):
                return
            for entry in list(reversed(self.loaded)):
                if self.free_bytes(device) >= memory_required:
                    break
                if id(entry.module) not in keep:
                    self._evict(entry)

    def unload_all(self, keep_loaded: Sequence[ModelPatcher] = ()) -> int:
        """Evict every model (but those in `keep_loaded`) and free every tier; returns bytes freed."""
        keep = {id(p.model) for p in keep_loaded}
        before = {d: self.used_bytes(d) for d in {self.device, HOST}}
        with telemetry.management_timer():
            for entry in list(self.loaded):
                if id(entry.module) not in keep:
                    self._evict(entry)
            for device in before:
                self.make_room(device, 1 << 62, keep=keep_loaded)
        return sum(before[d] - self.used_bytes(d) for d in before)

    def holds(self, module: torch.nn.Module) -> bool:
        """True when `module` is registered: its bytes are on a ledger already."""
        return any(entry.module is module for entry in self.loaded)

    def forget(self, module: torch.nn.Module) -> None:
        """Drop a module from the registry (its checkpoint is being discarded)."""
        for entry in list(self.loaded):
            if entry.module is module:
                self._evict(entry)

    # -- out of memory ---------------------------------------------------------------

    def recover_from_oom(self, keep_loaded: Sequence[ModelPatcher] = ()) -> int:
        """After a `torch.OutOfMemoryError` (call it outside the `except`, so the traceback's
        activations are gone): free every reclaimable tier and every model the request does not
        need, return the cached blocks to the driver, and lower the effective budget (the
        accounting under-estimated what this device can hold). Returns the new budget."""
        self.stats.out_of_memory += 1
        freed = self.unload_all(keep_loaded)
        gc.collect()
        if self.device.type == "cuda":
            with torch.cuda.device(self.device):   # empty_cache acts on the current device
                torch.cuda.empty_cache()
        lowered = int(self.effective_budget * 0.9)
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            lowered = min(lowered, int(free + torch.cuda.memory_allocated(self.device)))
        self.effective_budget = max(lowered, 0)
        log.warning("[Fooocus-Resident] out of memory on %s: freed %.2f GB, effective budget lowered to %.2f GB",
                    self.device, freed / GIB, self.effective_budget / GIB)
        return self.effective_budget

    # -- requests ----------------------------------------------------------------

    def request_peak_bytes(self) -> int:
        """The accounted peak of the running request (resident plus working memory)."""
        return self._request_peak

    def begin_request(self) -> None:
        self._request_start = telemetry.snapshot()
        self._request_over_budget = False
        self._request_peak = self.used_bytes()
        self._current_request_modules = set()
        self._request_placements = {}
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def end_request(self) -> RequestSummary:
        """Trim to the budget (a request that ran over it leaves nothing over it): tiers
        first, then least recently used models."""
        with telemetry.management_timer():
            if self.resident:
                self.make_room(self.device, 0)
            for entry in list(reversed(self.loaded)):
                if self.used_bytes(self.device) <= self.effective_budget:
                    break
                if entry.device == self.device:
                    self._evict(entry)
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = self._request_peak
        self._previous_request_modules, self._current_request_modules = self._current_request_modules, set()
        if self.settings.check_accounting:
            self._log_accounting()
        return RequestSummary(
            counters=telemetry.snapshot().minus(self._request_start),
            policy=self.settings.policy,
            budget_bytes=self.settings.budget_bytes,
            resident_bytes=self.used_bytes(self.device),
            peak_allocated_bytes=peak,
            over_budget=self._request_over_budget,
            effective_budget_bytes=self.effective_budget,
            host_resident_bytes=self.used_bytes(HOST) if self.device != HOST else 0,
            placements=list(self._request_placements.values()),
        )

    # -- reports -----------------------------------------------------------------

    def _log_accounting(self) -> None:
        """The debug check: the device ledger against the tensors really there (on the CPU,
        every tensor of the process is there, so the difference is only informative)."""
        log.info("[Fooocus-Resident] accounting on %s: ledger %d bytes, %+d against the tensors there",
                 self.device, self.used_bytes(self.device), self.accounting_error(self.device))

    def ledger(self, device: torch.device) -> dict:
        device = self.normalize(device)
        return {"device": str(device), "budget_bytes": self.limit(device),
                "used_bytes": self.used_bytes(device),
                "models_bytes": sum(e.weights.get(device, 0) for e in self.loaded),
                "backups_and_factors_bytes": sum(e.extras.get(device, 0) for e in self.loaded),
                "caches": {c.name: c.nbytes() for c in self.caches if c.device == device}}

    def status(self) -> dict:
        """The registry as JSON-able data, for `/model_status`."""
        status = {
            "mode": self.settings.policy.value,
            "device": str(self.device),
            "vram_state": self.settings.vram_state.name,
            "budget_bytes": self.settings.budget_bytes,
            "effective_budget_bytes": self.effective_budget,
            "resident_bytes": self.used_bytes(self.device),
            "device_ledger": self.ledger(self.device),
            "cache_stats": {"hits": self.stats.hits, "misses": self.stats.misses,
                            "evictions": self.stats.evictions, "tier_frees": dict(self.stats.tier_frees),
                            "high_water_bytes": dict(self.stats.high_water),
                            "out_of_memory": self.stats.out_of_memory},
            "models": [
                {"name": e.patcher.name, "device": str(e.device), "bytes": e.resident_bytes(),
                 "weights_bytes": sum(e.weights.values()), "extra_bytes": dict_str(e.extras),
                 "signature": e.signature.digest, "patched_keys": len(e.signature.keys),
                 # Names only when they describe the weights as they are (applied == wanted).
                 "patch_sources": e.patcher.patch_sources() if e.patcher.is_applied() else {},
                 "last_used": e.last_used, **e.placement_report()}
                for e in list(self.loaded)
            ],
        }
        if self.device != HOST:
            status["host"] = self.ledger(HOST)
        return status

    def accounting_error(self, device: torch.device | None = None, baseline: int = 0) -> int:
        """Ledger minus the bytes of tensors actually on `device` (beyond `baseline`, what was
        there before the registry put anything): 0 when the accounting is true. CUDA asks the
        allocator; other devices count the storages of every live tensor."""
        device = self.normalize(device or self.device)
        return self.used_bytes(device) - (device_tensor_bytes(device) - baseline)


def dict_str(by_device: dict[torch.device, int]) -> dict[str, int]:
    return {str(d): n for d, n in by_device.items()}


def device_tensor_bytes(device: torch.device) -> int:
    """Bytes of the storages of every live tensor on `device` (each storage once)."""
    if device.type == "cuda":
        return int(torch.cuda.memory_allocated(device))
    storages: dict[int, int] = {}   # tensors die by reference count: no gc.collect() needed
    for obj in gc.get_objects():
        if type(obj) in _TENSOR_TYPES and obj.device == device:
            storage = obj.untyped_storage()
            storages[storage._cdata] = storage.nbytes()
    return sum(storages.values())


_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def _unique(patchers: Iterable[ModelPatcher]) -> list[ModelPatcher]:
    seen: set[int] = set()
    result = []
    for patcher in patchers:
        if id(patcher) not in seen:
            seen.add(id(patcher))
            result.append(patcher)
    return result


# -- module-level API kept from Fooocus -----------------------------------------------

_MANAGER: ModelManager | None = None


def configure(settings: MemorySettings) -> ModelManager:
    """Install a manager with these settings (launch does this once from the flags)."""
    global _MANAGER
    if _MANAGER is not None:
        _MANAGER.unload_all()
    _MANAGER = ModelManager(settings)
    log.info("[Fooocus-Resident] policy=%s device=%s vram_state=%s budget=%.2f GB",
             settings.policy.value, settings.device, settings.vram_state.name, settings.budget_bytes / GIB)
    if (settings.device.type == "cuda" and settings.policy is Policy.CONSERVATIVE
            and settings.total_bytes >= 24 * GIB):
        log.warning("[Fooocus-Resident] this GPU has %.0f GB: --keep-models-resident would keep models, "
                    "LoRA patches and the budget resident and skip 'Moving model(s)' on every request",
                    settings.total_bytes / GIB)
    return _MANAGER


def get_manager() -> ModelManager:
    global _MANAGER
    if _MANAGER is None:
        # Library code is handed its settings (launch calls `configure`); unconfigured
        # use gets the defaults of no flags at all.
        _MANAGER = configure(settings_from_args(object()))
    return _MANAGER


def get_torch_device() -> torch.device:
    return get_manager().device


def load_models_gpu(models: Sequence[ModelPatcher], memory_required: int = 0) -> LoadPlan:
    return get_manager().load_models(models, memory_required)


def batch_that_fits(models: Sequence[ModelPatcher], per_item: int, wanted: int) -> int:
    return get_manager().largest_batch(models, per_item, wanted)


def load_model_gpu(model: ModelPatcher) -> LoadPlan:
    return load_models_gpu([model])


def free_memory(memory_required: int, device: torch.device | None = None,
                keep_loaded: Sequence[ModelPatcher] = ()) -> None:
    get_manager().free_memory(memory_required, keep_loaded, device)


def get_free_memory(device: torch.device | None = None) -> int:
    return get_manager().free_bytes(device)


def unload_all_models() -> None:
    get_manager().unload_all()


def unet_offload_device() -> torch.device:
    return get_manager().offload_device()


def text_encoder_offload_device() -> torch.device:
    return get_manager().offload_device()


def vae_offload_device() -> torch.device:
    return get_manager().offload_device()


def text_encoder_device() -> torch.device:
    return get_torch_device()


def vae_device() -> torch.device:
    return get_manager().vae_device()


def unet_dtype() -> torch.dtype:
    return get_manager().dtype_for("unet")


def text_encoder_dtype() -> torch.dtype:
    return get_manager().dtype_for("text_encoder")


def vae_dtype() -> torch.dtype:
    return get_manager().dtype_for("vae", vae_device())


def working_memory_bytes(stage: str, width: int, height: int, batch: int, dtype: torch.dtype) -> int:
    """Activation memory a stage needs beyond its weights (a budget estimate, not a measure).

    UNet: two CFG halves through SDXL's widest activations with SDPA attention,
    about 16 KiB per latent pixel per image at fp16; VAE decode: the full-size
    feature maps of the decoder, about 1.5 KiB per output pixel at fp16.
    Upscaler (ESRGAN-family, run in tiles): `width` x `height` is one input tile; an
    RRDB block concatenates up to 64+4*32 channels at the tile's size and the 4x
    upsampler holds 64-channel maps at 16x its pixels, so about 2.5 KiB per input
    pixel at fp16 (a rough upper bound: 512x512 tiles ~ 0.7 GB).
    CLIP vision (image prompts, ViT-H/14 at 224x224, width/height unused): per image the
    hidden states of all 33 layers kept for the penultimate one (257 tokens x 1280, ~22 MB)
    plus one layer's MLP and attention scores (~5 MB), so 32 MiB per image at fp16.
    """
    scale = torch.tensor([], dtype=dtype).element_size() / 2
    if stage == "clip_vision":
        return int(batch * 32 * 1024 * 1024 * scale)
    if stage == "unet":
        return int(batch * 2 * (width // 8) * (height // 8) * 16 * 1024 * scale)
    if stage == "vae":
        return int(batch * width * height * 1536 * scale)
    if stage == "upscaler":
        return int(batch * width * height * 2560 * scale)
    return int(batch * 77 * 2048 * 64 * scale)
