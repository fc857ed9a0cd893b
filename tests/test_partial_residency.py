"""Partial residency: the policy keeps what fits on the device, the patcher streams the rest.

Device questions run on the `meta` stand-in accelerator (tests/helpers/patching.py): load and
offload devices differ, and the ledger must equal the tensors really on the device. Values run
on the CPU, where a streamed group is brought in as a copy for its forward.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils import _pytree as pytree

from ldm_patched.modules import model_management as mm
from ldm_patched.modules import telemetry
from ldm_patched.modules.model_patcher import ModelPatcher
from tests.helpers.patching import CPU, META, CheckedManager, DeviceAllocations, meta_settings

LAYER = 64


def stack(layers: int, seed: int = 0, name: str = "model", load: torch.device = META) -> ModelPatcher:
    """A model of `layers` equal Linear layers (each one weight group)."""
    torch.manual_seed(seed)
    module = torch.nn.Sequential(*[torch.nn.Linear(LAYER, LAYER) for _ in range(layers)])
    return ModelPatcher(module, load, CPU, name=name)


def layer_bytes() -> int:
    return (LAYER * LAYER + LAYER) * 4


def unet_inputs(unet: torch.nn.Module, text_width: int, device: torch.device) -> dict:
    """One CFG batch at a 64x64 image (8x8 latents) for the tiny UNet."""
    generator = torch.Generator().manual_seed(0)
    make = lambda *shape: torch.randn(*shape, generator=generator).to(device)  # noqa: E731
    return {"sample": make(2, 4, 8, 8), "timestep": torch.tensor(10.0).to(device),
            "encoder_hidden_states": make(2, 77, unet.config.cross_attention_dim),
            "added_cond_kwargs": {"text_embeds": make(2, text_width), "time_ids": make(2, 6)}, "return_dict": False}


def on_device_groups(patcher: ModelPatcher, device: torch.device) -> tuple[int, int]:
    """(bytes, count) of the modules whose own tensors are not on `device` (what streams), read
    from the module itself."""
    nbytes = count = 0
    for module in patcher.model.modules():
        own = [t for t in list(module._parameters.values()) + list(module._buffers.values()) if t is not None]
        if own and own[0].device != device:
            nbytes += sum(t.numel() * t.element_size() for t in own)
            count += 1
    return nbytes, count


@pytest.mark.parametrize("policy", [mm.Policy.CONSERVATIVE, mm.Policy.RESIDENT])
def test_half_the_unet_stays_within_the_budget_before_during_and_after_a_forward(tiny_components, policy):
    """Budget half the UNet, NORMAL_VRAM: the UNet is placed partly; at every streamed layer of a
    forward, the tensors really on the device (weights, the streamed copies, activations) stay
    under the budget; before and after, they are exactly the ledger; each step brings in exactly
    the bytes of the groups left on the host."""
    unet_module = copy.deepcopy(tiny_components["unet"])
    unet = ModelPatcher(unet_module, META, CPU, name="unet")
    inputs = unet_inputs(unet_module, tiny_components["text_encoder_2"].config.projection_dim, META)
    baseline = mm.device_tensor_bytes(META)
    budget = unet.model_size() // 2
    working = 256 * 1024
    manager = CheckedManager(meta_settings(budget, policy), baseline)   # checks ledger == tensors per load

    plan = manager.load_models([unet], working)
    streamed_bytes, streamed_groups = on_device_groups(unet, META)
    assert not plan.over_budget and 0 < streamed_bytes < unet.model_size()
    assert manager.used_bytes(META) + plan.stream_window_bytes + working <= budget
    assert manager.ledger(CPU)["models_bytes"] == streamed_bytes
    assert manager.status()["models"][0]["placement"] == "partial"
    assert manager.status()["models"][0]["streamed_bytes"] == streamed_bytes

    seen: list[int] = []
    streamed = [m for m in unet_module.modules() if m._parameters and next(iter(m.parameters())).device == CPU]
    existing = [*unet_module.parameters(), *unet_module.buffers(), *pytree.tree_leaves(inputs)]
    for step in range(2):   # the first step learns the order, the second prefetches
        before = telemetry.snapshot()
        with DeviceAllocations(META, existing) as allocations, torch.inference_mode():
            # At each streamed layer, after its weights came in (and the next one's, prefetched):
            # the resident weights (the ledger, checked against the device before and after) plus
            # everything ops have put on the device and not freed.
            handles = [m.register_forward_pre_hook(lambda *_: seen.append(manager.used_bytes(META)
                                                                           + allocations.bytes))
                       for m in streamed]
            out = unet_module(**inputs)[0]
            for handle in handles:
                handle.remove()
        assert out.shape == inputs["sample"].shape and out.device == META
        del out
        assert manager.accounting_error(META, baseline) == 0 and allocations.bytes == 0
        moved = telemetry.snapshot().minus(before)
        assert (moved.bytes_streamed, moved.groups_streamed) == (streamed_bytes, streamed_groups)
        assert moved.bytes_to_device == moved.bytes_to_offload == 0
    assert len(seen) == 2 * streamed_groups
    assert max(seen) <= budget                          # from the second step on two groups are in at once
    assert min(seen) >= manager.used_bytes(META) + min(  # each streamed layer really was on the device
        sum(t.numel() * t.element_size() for t in m.parameters()) for m in streamed)


def test_no_vram_streams_every_group(tiny_components):
    unet_module = copy.deepcopy(tiny_components["unet"])
    unet = ModelPatcher(unet_module, META, CPU, name="unet")
    manager = CheckedManager(meta_settings(10 * unet.model_size(), mm.Policy.CONSERVATIVE,
                                           vram_state=mm.VRAMState.NO_VRAM), mm.device_tensor_bytes(META))
    manager.load_models([unet])
    assert manager.used_bytes(META) == 0
    assert all(p.device == CPU for p in unet_module.parameters())
    assert manager.status()["models"][0]["placement"] == "streamed"
    with torch.inference_mode():
        before = telemetry.snapshot()
        unet_module(**unet_inputs(unet_module, tiny_components["text_encoder_2"].config.projection_dim, META))
    assert telemetry.snapshot().minus(before).bytes_streamed == unet.model_size()


def request(manager: mm.ModelManager, stages) -> telemetry.MoveCounters:
    manager.begin_request()
    for patcher, working in stages:
        manager.load_models([patcher], working)
    return manager.end_request().counters


@pytest.mark.parametrize("vram_state", [mm.VRAMState.NORMAL_VRAM, mm.VRAMState.HIGH_VRAM])
def test_resident_keeps_a_set_partially_resident_when_the_budget_is_just_short(vram_state):
    """Text encoders, UNet, VAE (4, 16, 2 layers) under a budget 5 layers short of the set: the
    UNet stays partly resident (more than half of it), gives groups up for the VAE's working
    memory instead of the text encoders being evicted, and the next request moves nothing.
    Without streaming (a GPU said to be large) models are evicted whole and reloaded every
    request."""
    clip, unet, vae = stack(4, 1, "clip"), stack(16, 2, "unet"), stack(2, 3, "vae")
    layer = layer_bytes()
    unet_working, vae_working = 20_000, 60_000
    budget = 17 * layer + unet_working
    manager = CheckedManager(meta_settings(budget, vram_state=vram_state), mm.device_tensor_bytes(META))
    stages = [(clip, 0), (unet, unet_working), (vae, vae_working)]

    first = request(manager, stages)
    second = request(manager, stages)
    assert manager.peak_used <= budget
    if vram_state is mm.VRAMState.HIGH_VRAM:
        assert second.models_loaded > 0 and second.bytes_to_device > 0
        return
    assert first.models_unloaded == 0 and first.bytes_to_offload > 0      # the UNet shrank for the VAE
    assert (second.bytes_to_device, second.bytes_to_offload, second.models_loaded, second.models_unloaded) == \
        (0, 0, 0, 0)
    placements = {m["name"]: m for m in manager.status()["models"]}
    assert placements["clip"]["placement"] == placements["vae"]["placement"] == "whole"
    assert placements["unet"]["placement"] == "partial"
    assert placements["unet"]["resident_bytes"] + placements["unet"]["streamed_bytes"] == unet.model_size()


def test_resident_evicts_models_of_the_set_rather_than_stream_most_of_a_model():
    """Far short (beside the text encoders the UNet would keep 3 of 16 layers): the text encoders
    are evicted and the UNet keeps what the whole budget allows, beside its stream window."""
    clip, unet = stack(4, 1, "clip"), stack(16, 2, "unet")
    budget = 9 * layer_bytes() + 20_000
    manager = CheckedManager(meta_settings(budget), mm.device_tensor_bytes(META))
    counters = request(manager, [(clip, 0), (unet, 20_000)])
    assert counters.models_unloaded == 1 and [e.patcher.name for e in manager.loaded] == ["unet"]
    assert manager.status()["models"][0]["resident_bytes"] == 7 * layer_bytes()


def test_a_partial_model_goes_back_to_whole_when_room_comes_back():
    other, unet = stack(4, 1, "other"), stack(8, 2, "unet")
    manager = CheckedManager(meta_settings(10 * layer_bytes()), mm.device_tensor_bytes(META))
    manager.load_models([other])
    manager.load_models([other, unet])   # both in one stage: the smaller stays whole
    status = {m["name"]: m for m in manager.status()["models"]}
    assert status["other"]["placement"] == "whole" and status["unet"]["placement"] == "partial"
    resident = status["unet"]["resident_bytes"]
    manager.forget(other.model)
    before = telemetry.snapshot()
    manager.load_models([unet])
    assert manager.status()["models"][0]["placement"] == "whole"
    assert telemetry.snapshot().minus(before).bytes_to_device == unet.model_size() - resident
    assert not unet.streamed_groups()


class RunsOutOfMemory(torch.nn.Module):
    """Raises torch.OutOfMemoryError (as a GPU would) on its first `times` calls, then adds one."""

    def __init__(self, times: int) -> None:
        super().__init__()
        self.times = times
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls <= self.times:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")
        return x + 1


def partial_model(times: int) -> tuple[torch.nn.Sequential, torch.nn.Sequential, ModelPatcher, mm.ModelManager]:
    """Six layers and an out-of-memory maker (and a copy that never runs out), on the CPU under
    --always-low-vram with room for four layers: two stay resident (beside the window of two),
    four stream."""
    torch.manual_seed(0)
    module = torch.nn.Sequential(*[torch.nn.Linear(LAYER, LAYER) for _ in range(6)], RunsOutOfMemory(times))
    reference = copy.deepcopy(module)   # before placement: a streamed module is never copied
    reference[-1].times = 0
    patcher = ModelPatcher(module, CPU, CPU, name="model")
    budget = 4 * layer_bytes()
    manager = mm.ModelManager(mm.MemorySettings(vram_state=mm.VRAMState.LOW_VRAM, budget_bytes=budget,
                                                total_bytes=budget))
    manager.load_models([patcher])
    assert len(patcher.streamed_groups()) == 4
    return module, reference, patcher, manager


def test_out_of_memory_in_a_partial_forward_streams_one_more_group_and_retries():
    module, reference, patcher, manager = partial_model(times=1)
    x = torch.randn(3, LAYER)
    with torch.inference_mode():
        expected = reference(x)
        out = module(x)
    assert torch.equal(out, expected) and module[-1].calls == 2
    assert len(patcher.streamed_groups()) == 5
    assert manager.effective_budget == 3 * layer_bytes() and manager.stats.out_of_memory == 1


def test_out_of_memory_retries_until_nothing_is_left_to_stream():
    module, _, patcher, manager = partial_model(times=100)
    with pytest.raises(torch.OutOfMemoryError), torch.inference_mode():
        module(torch.randn(1, LAYER))
    assert module[-1].calls == 3 and len(patcher.streamed_groups()) == 6   # two retries, then it gives up
    with torch.inference_mode():   # the streamer is left clean: the next forward runs
        module[-1].times = 0
        assert module(torch.ones(1, LAYER)).shape == (1, LAYER)


@pytest.mark.cuda
def test_cuda_streaming_prefetches_on_a_copy_stream_and_draws_the_whole_output(tiny_components):
    """On a GPU, half the fp16 UNet resident: the streamed layers live in pinned host memory, the
    outputs equal the whole UNet's on the GPU bit for bit (prefetch on the side stream included),
    and the allocator's peak over a step stays within the budget."""
    cuda = torch.device("cuda", torch.cuda.current_device())
    module = copy.deepcopy(tiny_components["unet"]).half()
    inputs = unet_inputs(module, tiny_components["text_encoder_2"].config.projection_dim, cuda)
    inputs = pytree.tree_map(lambda t: t.half() if isinstance(t, torch.Tensor) and t.is_floating_point() else t,
                             inputs)
    with torch.inference_mode():
        whole = copy.deepcopy(module).to(cuda)
        expected = whole(**inputs)[0]
    del whole
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated(cuda)
    patcher = ModelPatcher(module, cuda, CPU, name="unet")
    working = 4 * 2 ** 20
    budget = patcher.model_size() // 2 + working
    manager = mm.ModelManager(mm.MemorySettings(vram_state=mm.VRAMState.NORMAL_VRAM, device=cuda, budget_bytes=budget,
                                                total_bytes=budget, host_budget_bytes=1 << 40))
    manager.load_models([patcher], working)
    streamed = [p for p in module.parameters() if p.device.type == "cpu"]
    assert streamed and all(p.is_pinned() for p in streamed)
    assert manager.accounting_error(cuda, baseline) == 0
    torch.cuda.reset_peak_memory_stats(cuda)
    for _ in range(2):   # the second step prefetches
        with torch.inference_mode():
            assert torch.equal(module(**inputs)[0], expected)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated(cuda) - baseline <= budget
    assert manager.accounting_error(cuda, baseline) == 0
