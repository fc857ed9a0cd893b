"""POLICY: devices, dtypes, the VRAM budget and the registry of loaded models.

Two policies (DESIGN.md §3):

* conservative (default) keeps upstream Fooocus's semantics: a loaded model is
  recognised by the identity of its patcher object, clones of a module are
  unloaded before another clone loads, and unless `--disable-offload-from-vram`
  every load evicts every model not named in it.
* resident (`--keep-models-resident`) recognises a model by its module and its
  weight-patch signature, reaches a new signature by diff on the device, and
  evicts least-recently-used models outside the current load only when the
  budget needs room.

Free memory is *accounted* (budget minus the bytes of resident models), never
re-measured, so the decisions are the same on a CPU-only machine and testable.
How weights are moved and patched is `model_patcher`'s business.
"""

from __future__ import annotations

import enum
import logging
import time
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch

from ldm_patched.modules import telemetry
from ldm_patched.modules.model_patcher import ModelPatcher, PatchSignature

log = logging.getLogger("fooocus_resident.model_management")

GIB = 1024 ** 3


class VRAMState(enum.Enum):
    DISABLED = 0      # no accelerator: everything on the CPU
    NO_VRAM = 1
    LOW_VRAM = 2
    NORMAL_VRAM = 3
    HIGH_VRAM = 4     # --always-gpu / --always-high-vram: nothing is offloaded to the CPU


class Policy(str, enum.Enum):
    CONSERVATIVE = "conservative"
    RESIDENT = "resident"


@dataclass(frozen=True)
class MemorySettings:
    policy: Policy = Policy.CONSERVATIVE
    vram_state: VRAMState = VRAMState.DISABLED
    device: torch.device = torch.device("cpu")
    always_offload_from_vram: bool = True
    vae_in_cpu: bool = False
    total_bytes: int = 0
    budget_bytes: int = 0
    unet_dtype: torch.dtype | None = None   # None: chosen by device
    vae_dtype: torch.dtype | None = None
    text_encoder_dtype: torch.dtype | None = None


def default_reserve_bytes(total_bytes: int) -> int:
    """Kept out of the budget: CUDA context, allocator slack and activations that
    the per-request working-memory estimate does not cover (1.5 GiB + 5 %)."""
    return int(1.5 * GIB + 0.05 * total_bytes)


def total_device_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    try:
        import psutil
        return int(psutil.virtual_memory().total)
    except ImportError:  # pragma: no cover - psutil comes with gradio
        return 16 * GIB


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
    budget = int(budget_gb * GIB) if budget_gb else max(total - default_reserve_bytes(total), 0)
    return MemorySettings(
        policy=Policy.RESIDENT if flag("keep_models_resident") else Policy.CONSERVATIVE,
        vram_state=vram_state,
        device=device,
        always_offload_from_vram=not flag("disable_offload_from_vram", False),
        vae_in_cpu=bool(flag("vae_in_cpu")),
        total_bytes=total,
        budget_bytes=budget,
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


@dataclass(eq=False)
class LoadedModel:
    """A registry entry: a module on a device, and the patcher that last asked for it.

    Sizes are recorded when the entry is loaded or re-patched, so accounting on
    the steady-state path never walks the module's parameters."""

    patcher: ModelPatcher
    device: torch.device
    last_used: int
    model_bytes: int = 0
    extra_bytes: int = 0   # backups of originals and cached LoRA factors on the device

    @property
    def module(self) -> torch.nn.Module:
        return self.patcher.model

    @property
    def signature(self) -> PatchSignature:
        return self.patcher.applied_signature()

    def resident_bytes(self) -> int:
        return self.model_bytes + self.extra_bytes

    def measure(self, weights: bool = True) -> None:
        """Record sizes; a re-patch changes only backups and factors, not the weights."""
        if weights:
            self.model_bytes = self.patcher.model_size()
        self.extra_bytes = (self.patcher.backup_bytes(self.device)
                            + self.patcher.cached_factor_bytes(self.device))


@dataclass
class LoadPlan:
    """What one `load_models_gpu` call will do; computed before anything moves."""

    already_loaded: list[LoadedModel] = field(default_factory=list)
    to_load: list[ModelPatcher] = field(default_factory=list)
    to_evict: list[LoadedModel] = field(default_factory=list)
    over_budget: bool = False


@dataclass
class RequestSummary:
    counters: telemetry.MoveCounters
    policy: Policy
    budget_bytes: int
    resident_bytes: int
    peak_allocated_bytes: int
    over_budget: bool


class ModelManager:
    def __init__(self, settings: MemorySettings) -> None:
        self.settings = settings
        self.loaded: list[LoadedModel] = []   # most recently used first
        self.clock = 0
        self._request_start = telemetry.snapshot()
        self._request_over_budget = False
        self._request_peak = 0
        self._current_request_modules: set[int] = set()

    # -- devices and dtypes ------------------------------------------------------------

    @property
    def resident(self) -> bool:
        return self.settings.policy is Policy.RESIDENT

    def offload_device(self) -> torch.device:
        if self.settings.vram_state is VRAMState.HIGH_VRAM and not self.resident:
            return self.settings.device
        return torch.device("cpu")

    def vae_device(self) -> torch.device:
        return torch.device("cpu") if self.settings.vae_in_cpu else self.settings.device

    def dtype_for(self, component: str, device: torch.device | None = None) -> torch.dtype:
        device = device or self.settings.device
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

    # -- accounting ----------------------------------------------------------------

    def resident_bytes(self, device: torch.device | None = None) -> int:
        device = device or self.settings.device
        return sum(e.resident_bytes() for e in self.loaded if e.device == device)

    def free_bytes(self, device: torch.device | None = None) -> int:
        return self.settings.budget_bytes - self.resident_bytes(device)

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
        required = int(sum(p.model_size() for p in plan.to_load) * 1.3) + memory_required
        free = self.free_bytes() + sum(e.resident_bytes() for e in plan.to_evict)
        for entry in reversed(self.loaded):
            if id(entry) in keep or entry in plan.to_evict:
                continue
            if not self.settings.always_offload_from_vram and free > required:
                break
            plan.to_evict.append(entry)
            free += entry.resident_bytes()
        plan.over_budget = free < required
        return plan

    def _plan_resident(self, patchers: Sequence[ModelPatcher], memory_required: int) -> LoadPlan:
        plan = LoadPlan()
        wanted_modules = {id(p.model) for p in patchers}
        for patcher in _unique(patchers):
            entry = self.find(patcher)
            if entry is not None and entry.device == patcher.load_device:
                plan.already_loaded.append(entry)
                continue
            if entry is not None:
                plan.to_evict.append(entry)   # registered on another device: reload it whole
            plan.to_load.append(patcher)
        required = memory_required + sum(p.model_size() for p in plan.to_load)
        free = self.free_bytes() + sum(e.resident_bytes() for e in plan.to_evict)
        for entry in reversed(self.loaded):  # least recently used first
            if free >= required:
                break
            if id(entry.module) in wanted_modules or entry in plan.to_evict:
                continue
            plan.to_evict.append(entry)
            free += entry.resident_bytes()
        plan.over_budget = free < required
        return plan

    # -- doing ----------------------------------------------------------------

    def load_models(self, patchers: Sequence[ModelPatcher], memory_required: int = 0) -> LoadPlan:
        start = time.perf_counter()
        moved_before = telemetry.snapshot()
        with telemetry.management_timer():
            plan = self.plan_load(patchers, memory_required)
            for entry in plan.to_evict:
                self._evict(entry)
            self.clock += 1
            for entry in plan.already_loaded:
                self._refresh(entry, self._patcher_for(entry, patchers))
            for patcher in plan.to_load:
                self._load(patcher)
            if plan.over_budget and self.resident:
                self._request_over_budget = True
                log.warning("[Fooocus-Resident] request needs more than the budget of %.2f GB; "
                            "running it the conservative way", self.settings.budget_bytes / GIB)
            self._current_request_modules.update(id(p.model) for p in patchers)
            self._request_peak = max(self._request_peak, self.resident_bytes() + memory_required)
            moved = telemetry.snapshot().minus(moved_before)
            if self.settings.device.type == "cuda" and (moved.bytes_to_device or moved.bytes_to_offload
                                                        or moved.weights_patched or moved.weights_restored):
                # Count the queued copies and merges here, not in the stage that follows.
                torch.cuda.synchronize(self.settings.device)
        elapsed = time.perf_counter() - start
        if elapsed > 0.1 and (moved.bytes_to_device or moved.bytes_to_offload or moved.weights_patched):
            print(f"[Fooocus Model Management] Moving model(s) has taken {elapsed:.2f} seconds")
        return plan

    @staticmethod
    def _patcher_for(entry: LoadedModel, patchers: Sequence[ModelPatcher]) -> ModelPatcher:
        for patcher in patchers:
            if patcher is entry.patcher:
                return patcher
        for patcher in patchers:
            if patcher.model is entry.module:
                return patcher
        return entry.patcher

    def _backup_place(self, patcher: ModelPatcher) -> tuple[torch.device, torch.dtype | None]:
        """Where originals of patched weights are kept, and in which dtype.

        Conservative: the offload device, as upstream. Resident: on the device when the
        budget allows (restores are then device copies), in float32 when it allows that
        too (each merge then skips an upcast), else in pinned host memory."""
        if not self.resident:
            return patcher.offload_device, None
        need = patcher.patched_key_bytes()
        element = torch.tensor([], dtype=patcher.model_dtype()).element_size()
        free = self.free_bytes()
        if element < 4 and free >= need * 4 // element:
            return self.settings.device, torch.float32
        if free >= need:
            return self.settings.device, None
        return torch.device("cpu"), None

    def _patch(self, patcher: ModelPatcher) -> None:
        device, dtype = self._backup_place(patcher)
        patcher.patch_model(backup_device=device, backup_dtype=dtype, cache_factors=self.resident,
                            keep_backups=self.resident)

    def _refresh(self, entry: LoadedModel, patcher: ModelPatcher) -> None:
        entry.patcher = patcher
        entry.last_used = self.clock
        if not patcher.is_applied():
            self._patch(patcher)
            entry.measure(weights=False)
            if self.resident and self.free_bytes() < 0:
                # Factors of LoRA sets used before go first, before any model is evicted.
                patcher.drop_factor_caches(keep=patcher)
                entry.measure(weights=False)
        self._move_to_front(entry)

    def _load(self, patcher: ModelPatcher) -> None:
        device = patcher.load_device
        patcher.move_to(device)
        self._patch(patcher)
        entry = LoadedModel(patcher=patcher, device=device, last_used=self.clock)
        entry.measure()
        self.loaded.insert(0, entry)
        telemetry.count(models_loaded=1)

    def _evict(self, entry: LoadedModel) -> None:
        """Restore the original weights, then move the module to its offload device."""
        if self.resident and id(entry.module) in self._current_request_modules:
            self._request_over_budget = True  # the request's own set did not fit
        entry.patcher.unpatch_model(device_to=entry.patcher.offload_device)
        entry.patcher.drop_factor_caches()
        self.loaded.remove(entry)
        telemetry.count(models_unloaded=1)

    def _move_to_front(self, entry: LoadedModel) -> None:
        self.loaded.remove(entry)
        self.loaded.insert(0, entry)

    def free_memory(self, memory_required: int, keep_loaded: Sequence[ModelPatcher] = ()) -> None:
        """Evict least-recently-used models (not in keep_loaded) until the budget has room."""
        keep = {id(p.model) for p in keep_loaded}
        with telemetry.management_timer():
            for entry in list(reversed(self.loaded)):
                if self.free_bytes() >= memory_required:
                    break
                if id(entry.module) not in keep:
                    self._evict(entry)

    def unload_all(self) -> None:
        with telemetry.management_timer():
            for entry in list(self.loaded):
                self._evict(entry)

    def forget(self, module: torch.nn.Module) -> None:
        """Drop a module from the registry (its checkpoint is being discarded)."""
        for entry in list(self.loaded):
            if entry.module is module:
                self._evict(entry)

    # -- requests ----------------------------------------------------------------

    def begin_request(self) -> None:
        self._request_start = telemetry.snapshot()
        self._request_over_budget = False
        self._request_peak = self.resident_bytes()
        self._current_request_modules = set()
        if self.settings.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.settings.device)

    def end_request(self) -> RequestSummary:
        """Trim to the budget (a request that ran over it leaves nothing over it)."""
        with telemetry.management_timer():
            for entry in list(reversed(self.loaded)):
                if self.resident_bytes() <= self.settings.budget_bytes:
                    break
                self._evict(entry)
        if self.settings.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.settings.device)
        else:
            peak = self._request_peak
        self._current_request_modules = set()
        return RequestSummary(
            counters=telemetry.snapshot().minus(self._request_start),
            policy=self.settings.policy,
            budget_bytes=self.settings.budget_bytes,
            resident_bytes=self.resident_bytes(),
            peak_allocated_bytes=peak,
            over_budget=self._request_over_budget,
        )

    def status(self) -> dict:
        """The registry as JSON-able data, for `/model_status`."""
        return {
            "mode": self.settings.policy.value,
            "device": str(self.settings.device),
            "vram_state": self.settings.vram_state.name,
            "budget_bytes": self.settings.budget_bytes,
            "resident_bytes": self.resident_bytes(),
            "models": [
                {"name": e.patcher.name, "device": str(e.device), "bytes": e.resident_bytes(),
                 "signature": e.signature.digest, "patched_keys": len(e.signature.keys),
                 "last_used": e.last_used}
                for e in list(self.loaded)   # read from the web thread while the worker runs
            ],
        }


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
        import args_manager
        _MANAGER = configure(settings_from_args(args_manager.args))
    return _MANAGER


def get_torch_device() -> torch.device:
    return get_manager().settings.device


def load_models_gpu(models: Sequence[ModelPatcher], memory_required: int = 0) -> LoadPlan:
    return get_manager().load_models(models, memory_required)


def load_model_gpu(model: ModelPatcher) -> LoadPlan:
    return load_models_gpu([model])


def free_memory(memory_required: int, device: torch.device | None = None,
                keep_loaded: Sequence[ModelPatcher] = ()) -> None:
    get_manager().free_memory(memory_required, keep_loaded)


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
    """
    scale = torch.tensor([], dtype=dtype).element_size() / 2
    if stage == "unet":
        return int(batch * 2 * (width // 8) * (height // 8) * 16 * 1024 * scale)
    if stage == "vae":
        return int(batch * width * height * 1536 * scale)
    return int(batch * 77 * 2048 * 64 * scale)
