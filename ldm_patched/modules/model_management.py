"""POLICY: devices, dtypes, the memory budgets and the registry of loaded models.

Two policies (DESIGN.md §3):

* conservative (default) keeps upstream Fooocus's semantics: a loaded model is
  recognised by the identity of its patcher object, clones of a module are
  unloaded before another clone loads, and unless `--disable-offload-from-vram`
  every load evicts every model not named in it.
* resident (`--keep-models-resident`) recognises a model by its module and its
  weight-patch signature, reaches a new signature by diff on the device, and
  frees memory in tiers (cheapest to rebuild first) only when the budget needs room.

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

import enum
import gc
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch

from ldm_patched.modules import telemetry
from ldm_patched.modules.model_patcher import ModelPatcher, PatchSignature

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


_DTYPES = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}


def _dtype_flag(args: object, component: str, choices: Iterable[str]) -> torch.dtype | None:
    for choice in choices:
        if getattr(args, f"{component}_in_{choice}", False):
            if choice.startswith("fp8"):
                # Upstream stores fp8 and casts per layer; diffusers layers cannot run fp8 weights.
                log.warning("[Fooocus-Resident] --%s-in-%s: fp8 weight storage is not implemented, "
                            "using fp16", component, choice.replace("_", "-"))
                return torch.float16
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

    @property
    def module(self) -> torch.nn.Module:
        return self.patcher.model

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


@dataclass
class LoadPlan:
    """What one `load_models_gpu` call will do; computed before anything moves."""

    already_loaded: list[LoadedModel] = field(default_factory=list)
    to_load: list[ModelPatcher] = field(default_factory=list)
    to_evict: list[LoadedModel] = field(default_factory=list)
    placement: Placement | None = None          # None: the conservative default (offload device)
    charges: dict[torch.device, int] = field(default_factory=dict)   # what the load adds, per device
    over_budget: bool = False


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


@dataclass
class CacheStats:
    """InvokeAI-style cache report: hits, misses and the high-water mark per device."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0
    tier_frees: dict[str, int] = field(default_factory=dict)   # bytes freed per tier
    high_water: dict[str, int] = field(default_factory=dict)   # per device name
    out_of_memory: int = 0


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

    def dtype_for(self, component: str, device: torch.device | None = None) -> torch.dtype:
        device = device or self.device
        chosen = {"unet": self.settings.unet_dtype, "vae": self.settings.vae_dtype,
                  "text_encoder": self.settings.text_encoder_dtype}[component]
        if chosen is not None:
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
        required = int(sum(p.model_size() for p in plan.to_load
                           if self.normalize(p.load_device) == device) * 1.3) + memory_required
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
        return plan

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
        weights = sum(p.model_size() for p in plan.to_load if self.normalize(p.load_device) == device)
        base = memory_required + weights
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
            if base + extra <= cheap:
                plan.placement, plan.charges = placement, {device: base + extra}
                break
        else:
            placement, extra = options[-1]
            plan.placement, plan.charges = placement, {device: base + extra}
            free = cheap + self._reclaimable(device, wanted, TIERS[2:3])
            wanted_modules = {id(p.model) for p in wanted}
            for entry in reversed(self.loaded):  # least recently used first
                if free >= base + extra:
                    break
                if id(entry.module) in wanted_modules or entry in plan.to_evict:
                    continue
                plan.to_evict.append(entry)
                free += entry.bytes_on(device)
            plan.over_budget = free < base + extra
        if plan.placement.backup_device != device:
            plan.charges[HOST] = sum(g[0] for g in growth)
        return plan

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
            if self.resident:
                for device, charge in plan.charges.items():
                    self.make_room(device, charge, keep=wanted,
                                   tiers=TIERS[:3] if plan.placement.backup_device == HOST else TIERS[:2])
            for entry in plan.already_loaded:
                self.stats.hits += 1
                self._refresh(entry, self._patcher_for(entry, patchers), plan.placement)
            for patcher in plan.to_load:
                self.stats.misses += 1
                self._load(patcher, plan.placement)
            if plan.over_budget and self.resident:
                self._request_over_budget = True
                log.warning("[Fooocus-Resident] request needs more than the budget of %.2f GB; "
                            "running it the conservative way", self.effective_budget / GIB)
            self._current_request_modules.update(id(p.model) for p in patchers)
            self._note_peak(memory_required)
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

    def _refresh(self, entry: LoadedModel, patcher: ModelPatcher, placement: Placement | None) -> None:
        entry.patcher = patcher
        entry.last_used = self.clock
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

    def _load(self, patcher: ModelPatcher, placement: Placement | None) -> None:
        """Register, then move and patch; any failure rolls the load back whole."""
        device = self.normalize(patcher.load_device)
        entry = LoadedModel(patcher=patcher, device=device, last_used=self.clock)
        self.loaded.insert(0, entry)
        try:
            patcher.move_to(device)
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
        self._current_request_modules = set()
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
                 "last_used": e.last_used}
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
