"""Builders shared by tests: LoRA patches over a module's own keys, weight snapshots,
and a stand-in accelerator for tests about devices.

The stand-in is the `meta` device: tensors there have shapes and dtypes but no data,
so load and offload devices differ (bytes moved are not trivially 0) while nothing
is allocated. Leaving it allocates uninitialised storage (see model_patcher._transfer).
"""

from __future__ import annotations

import weakref

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from ldm_patched.modules import model_management as mm
from ldm_patched.modules.file_version import FileVersion
from ldm_patched.modules.lora import LoraFactors, LoraPatch

META = torch.device("meta")
CPU = torch.device("cpu")


def lora_for(module: torch.nn.Module, keys: list[str], tag: str, rank: int = 2, seed: int = 1) -> dict:
    """Random rank-`rank` LoRA patches for `keys` of `module` (a file version named `tag`)."""
    gen = torch.Generator().manual_seed(seed)
    patches = {}
    for key in keys:
        shape = module.get_parameter(key).shape
        down = torch.randn(rank, *shape[1:], generator=gen)
        up = torch.randn(shape[0], rank, *([1] * (len(shape) - 2)), generator=gen)
        patches[key] = LoraPatch(FileVersion(tag, 1, 1), key, LoraFactors(up=up, down=down, alpha=1.0))
    return patches


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


class CheckedManager(mm.ModelManager):
    """A manager whose every load is followed by the accounting check (ledger == bytes of the
    tensors on its device, beyond `baseline`) and that records the highest use it saw."""

    def __init__(self, settings: mm.MemorySettings, baseline: int = 0) -> None:
        super().__init__(settings)
        self.baseline = baseline
        self.peak_used = 0

    def load_models(self, patchers, memory_required=0):
        plan = super().load_models(patchers, memory_required)
        assert self.accounting_error(self.device, self.baseline) == 0, self.status()
        self.peak_used = max(self.peak_used, self.used_bytes(self.device))
        return plan


def meta_settings(budget: int, policy: mm.Policy = mm.Policy.RESIDENT, **overrides) -> mm.MemorySettings:
    """Settings of a manager whose device is the meta stand-in accelerator."""
    return mm.MemorySettings(**{"policy": policy, "vram_state": mm.VRAMState.NORMAL_VRAM, "device": META,
                                "budget_bytes": budget, "total_bytes": budget, "host_budget_bytes": 1 << 40,
                                **overrides})


class DeviceAllocations(TorchDispatchMode):
    """While on: the bytes of the storages that ops create on `device` and that are still alive
    (streamed-in copies, activations), each storage once; the storages of `existing` tensors (the
    resident weights, which the ledger holds, and the inputs) are not counted again when a view
    of one is made.

    Cheaper than walking every object of the process at each layer (`device_tensor_bytes`)."""

    def __init__(self, device: torch.device, existing) -> None:
        super().__init__()
        self.device = device
        self.bytes = 0
        self._live: dict[int, list[int]] = {}   # storage -> [bytes, tensors alive]
        self._before = {t.untyped_storage()._cdata for t in existing
                        if isinstance(t, torch.Tensor) and t.device == device}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.device == self.device:
                self._track(tensor)
        return out

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self._before:
            return
        entry = self._live.get(key)
        if entry is None:
            entry = self._live[key] = [storage.nbytes(), 0]
            self.bytes += entry[0]
        entry[1] += 1
        weakref.finalize(tensor, self._release, key)

    def _release(self, key: int) -> None:
        entry = self._live[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.bytes -= entry[0]
            del self._live[key]
