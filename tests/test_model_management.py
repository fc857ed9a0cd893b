"""Registry decisions of both policies, counted on the CPU (DESIGN.md §3, invariant 4)."""

import argparse

import pytest
import torch

from ldm_patched.modules import model_management as mm
from ldm_patched.modules import telemetry
from ldm_patched.modules.model_patcher import ModelPatcher
from tests.helpers.patching import META, CheckedManager, lora_for, meta_settings, snapshot

CPU = torch.device("cpu")


def patcher(features: int, name: str, seed: int = 0, device: torch.device = META) -> ModelPatcher:
    """A model that loads on the meta stand-in accelerator (or `device`) and offloads to the CPU."""
    torch.manual_seed(seed)
    return ModelPatcher(torch.nn.Linear(features, features), device, CPU, name=name)


def manager(policy: mm.Policy, budget: int = 10 ** 9, always_offload: bool = True,
            device: torch.device = META) -> mm.ModelManager:
    """A manager on `device` whose every load is checked against the tensors really there."""
    settings = meta_settings(budget, policy, always_offload_from_vram=always_offload, device=device)
    return CheckedManager(settings, baseline=mm.device_tensor_bytes(device) if device == META else 0) \
        if device == META else mm.ModelManager(settings)


def names(m: mm.ModelManager) -> list[str]:
    return [entry.patcher.name for entry in m.loaded]


def counted(action) -> telemetry.MoveCounters:
    before = telemetry.snapshot()
    action()
    return telemetry.snapshot().minus(before)


def test_resident_repeat_loads_nothing_and_patches_nothing():
    m = manager(mm.Policy.RESIDENT)
    unet = patcher(16, "unet")
    unet.add_patches(lora_for(unet.model, ["weight"], "a.safetensors"))
    first = counted(lambda: m.load_models([unet]))
    assert (first.models_loaded, first.weights_patched) == (1, 1)
    for _ in range(3):
        again = counted(lambda: m.load_models([unet.clone()]))  # a fresh clone, same content
        assert (again.models_loaded, again.weights_patched, again.weights_restored) == (0, 0, 0)
        assert again.bytes_to_device == again.bytes_to_offload == 0


def test_conservative_reloads_and_repatches_a_fresh_clone():
    m = manager(mm.Policy.CONSERVATIVE, always_offload=False)
    unet = patcher(16, "unet")
    unet.add_patches(lora_for(unet.model, ["weight"], "a.safetensors"))
    m.load_models([unet])
    same = counted(lambda: m.load_models([unet]))
    assert (same.models_loaded, same.weights_patched) == (0, 0)
    clone = counted(lambda: m.load_models([unet.clone()]))
    # Upstream identity is the patcher object: the old clone is unloaded (restored), the new one patched.
    assert (clone.models_unloaded, clone.models_loaded) == (1, 1)
    assert (clone.weights_restored, clone.weights_patched) == (1, 1)


def test_conservative_always_offload_evicts_everything_not_named():
    m = manager(mm.Policy.CONSERVATIVE, device=CPU)   # compares values: no stand-in (it holds no data)
    clip, unet = patcher(8, "clip", device=CPU), patcher(16, "unet", device=CPU)
    clip.add_patches(lora_for(clip.model, ["weight"], "a.safetensors"))
    original = snapshot(clip.model)
    m.load_models([clip])
    m.load_models([unet])
    assert names(m) == ["unet"]
    assert all(torch.equal(v, original[k]) for k, v in snapshot(clip.model).items())


def test_disable_offload_from_vram_keeps_models_while_memory_allows():
    m = manager(mm.Policy.CONSERVATIVE, always_offload=False)
    clip, unet = patcher(8, "clip"), patcher(16, "unet")
    m.load_models([clip])
    m.load_models([unet])
    assert names(m) == ["unet", "clip"]
    clip, unet = patcher(8, "clip"), patcher(16, "unet")
    tight = manager(mm.Policy.CONSERVATIVE, budget=unet.model_size() + clip.model_size(), always_offload=False)
    tight.load_models([clip])
    tight.load_models([unet])
    assert names(tight) == ["unet"]


def test_resident_evicts_least_recently_used_outside_the_request():
    a, b, c = patcher(16, "a"), patcher(16, "b"), patcher(16, "c")
    size = a.model_size()
    m = manager(mm.Policy.RESIDENT, budget=2 * size)
    for p in (a, b):
        m.begin_request()
        m.load_models([p])
        m.end_request()
    m.begin_request()
    m.load_models([a])        # a is now more recent than b
    m.load_models([c])        # room for c: b goes, the least recently used
    summary = m.end_request()
    assert names(m) == ["c", "a"]
    assert summary.resident_bytes <= summary.budget_bytes and not summary.over_budget
    m.begin_request()
    m.load_models([b])
    assert names(m) == ["b", "c"]
    assert m.end_request().resident_bytes <= 2 * size


@pytest.mark.parametrize("vram_state", [mm.VRAMState.HIGH_VRAM, mm.VRAMState.NORMAL_VRAM])
def test_budget_too_small_for_the_request_still_runs_and_ends_within_budget(vram_state):
    """Where streaming is not allowed (a GPU said to be large) the model loads whole and is
    evicted at the end; otherwise it streams (one group larger than the budget: still over it
    while it computes) and stays registered with nothing on the device."""
    big = patcher(32, "big")
    settings = meta_settings(big.model_size() // 2, mm.Policy.RESIDENT, vram_state=vram_state)
    m = CheckedManager(settings, baseline=mm.device_tensor_bytes(META))
    m.begin_request()
    plan = m.load_models([big])
    assert plan.over_budget and names(m) == ["big"]
    summary = m.end_request()
    assert summary.over_budget and summary.resident_bytes <= summary.budget_bytes
    if vram_state is mm.VRAMState.HIGH_VRAM:
        assert names(m) == []
    else:
        assert names(m) == ["big"] and big.model.weight.device == CPU
        assert summary.placements == [{"name": "big", "placement": "streamed", "resident_bytes": 0,
                                       "streamed_bytes": big.model_size(), "streamed_groups": 1}]


def test_resident_lora_switch_by_diff_on_the_resident_module():
    m = manager(mm.Policy.RESIDENT, device=CPU)   # addresses: meta tensors have none
    base = patcher(16, "unet", device=CPU)
    a = base.clone()
    a.add_patches(lora_for(base.model, ["weight"], "a.safetensors", seed=1))
    m.load_models([a])
    address = base.model.weight.data_ptr()
    switch = counted(lambda: m.load_models([base]))
    assert (switch.models_loaded, switch.weights_restored, switch.weights_patched) == (0, 1, 0)
    assert base.model.weight.data_ptr() == address


def test_always_gpu_keeps_offload_on_the_device_in_conservative_policy():
    device = torch.device("cpu")
    high = mm.ModelManager(mm.MemorySettings(vram_state=mm.VRAMState.HIGH_VRAM, device=device))
    assert high.offload_device() == device
    resident = mm.ModelManager(mm.MemorySettings(policy=mm.Policy.RESIDENT, vram_state=mm.VRAMState.HIGH_VRAM))
    assert resident.offload_device() == CPU


def test_settings_from_flags_on_a_cuda_machine(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(mm, "total_device_bytes", lambda device: 80 * mm.GIB)
    # Another process holds 30 GB of the card; this one holds 2 GB of cached blocks.
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (48 * mm.GIB, 80 * mm.GIB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 2 * mm.GIB)
    flags = dict(always_cpu=None, gpu_device_id=None, always_gpu=False, always_high_vram=False,
                 always_low_vram=False, always_no_vram=False, disable_offload_from_vram=False,
                 keep_models_resident=False, vram_budget=None, vae_in_cpu=False)
    default = mm.settings_from_args(argparse.Namespace(**flags))
    assert (default.policy, default.vram_state, default.always_offload_from_vram) == (
        mm.Policy.CONSERVATIVE, mm.VRAMState.NORMAL_VRAM, True)
    assert default.budget_bytes == 50 * mm.GIB - mm.default_reserve_bytes(80 * mm.GIB)
    best = mm.settings_from_args(argparse.Namespace(**{**flags, "always_gpu": True,
                                                        "disable_offload_from_vram": True}))
    assert best.vram_state is mm.VRAMState.HIGH_VRAM and not best.always_offload_from_vram
    ours = mm.settings_from_args(argparse.Namespace(**{**flags, "keep_models_resident": True, "vram_budget": 70.0}))
    assert ours.policy is mm.Policy.RESIDENT and ours.budget_bytes == 70 * mm.GIB
    with pytest.raises(mm.BudgetError, match="--vram-budget 81 GB"):
        mm.settings_from_args(argparse.Namespace(**{**flags, "vram_budget": 81.0}))


@pytest.mark.parametrize("policy", list(mm.Policy))
def test_status_lists_models_with_signature(policy):
    m = manager(policy)
    unet = patcher(16, "unet")
    unet.add_patches(lora_for(unet.model, ["weight"], "a.safetensors"))
    m.load_models([unet])
    status = m.status()
    assert status["mode"] == policy.value
    assert status["models"][0]["name"] == "unet"
    assert status["models"][0]["signature"] == unet.weight_signature().digest
    assert status["resident_bytes"] == status["models"][0]["bytes"] > 0


def test_fooocus_module_level_api_reaches_the_configured_manager():
    settings = mm.MemorySettings(policy=mm.Policy.CONSERVATIVE, budget_bytes=10 ** 9, total_bytes=10 ** 9)
    installed = mm.configure(settings)
    try:
        unet = patcher(16, "unet", device=CPU)
        mm.load_model_gpu(unet)
        assert mm.get_manager() is installed and names(installed) == ["unet"]
        assert mm.get_torch_device() == CPU and mm.unet_offload_device() == CPU
        assert mm.get_free_memory() == 10 ** 9 - unet.model_size()
        assert unet.is_clone(unet.clone())
        mm.unload_all_models()
        assert installed.loaded == []
    finally:
        mm.configure(settings)
