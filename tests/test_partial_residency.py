"""Partial residency: the policy keeps what fits on the device, the patcher streams the rest.

Device questions run on the `meta` stand-in accelerator (tests/helpers/patching.py): load and
offload devices differ, and the ledger must equal the tensors really on the device. Values run
on the CPU, where a streamed group is brought in as a copy for its forward.
"""

from __future__ import annotations

import copy

import pytest
import torch

from ldm_patched.modules import model_management as mm
from ldm_patched.modules import telemetry
from ldm_patched.modules.model_patcher import ModelPatcher
from tests.helpers.patching import CPU, META, CheckedManager, meta_settings

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

    def measure(module, args):
        seen.append(mm.device_tensor_bytes(META) - baseline)

    # Counting every tensor on the device walks the whole process: once per streamed layer of
    # the second step (the first that prefetches), for one policy.
    streamed = [m for m in unet_module.modules() if m._parameters and next(iter(m.parameters())).device == CPU]
    measured_step = 1 if policy is mm.Policy.CONSERVATIVE else None
    for step in range(3):
        handles = [m.register_forward_pre_hook(measure) for m in streamed] if step == measured_step else []
        before = telemetry.snapshot()
        assert manager.accounting_error(META, baseline) == 0
        with torch.inference_mode():
            out = unet_module(**inputs)[0]
        assert out.shape == inputs["sample"].shape and out.device == META
        del out
        assert manager.accounting_error(META, baseline) == 0
        moved = telemetry.snapshot().minus(before)
        assert (moved.bytes_streamed, moved.groups_streamed) == (streamed_bytes, streamed_groups)
        assert moved.bytes_to_device == moved.bytes_to_offload == 0
        for handle in handles:
            handle.remove()
    if measured_step is not None:
        assert len(seen) == streamed_groups
        assert max(seen) <= budget                       # the second step prefetches: two groups in at once
        assert min(seen) > manager.used_bytes(META)      # each streamed layer really was on the device


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
    """Text encoders, UNet, VAE (4, 16, 2 layers) under a budget 4 layers short of the set: the
    UNet stays partly resident, gives groups up for the VAE's working memory instead of the text
    encoders being evicted, and the next request moves nothing. Without streaming (a GPU said
    to be large) models are evicted whole and reloaded every request."""
    clip, unet, vae = stack(4, 1, "clip"), stack(16, 2, "unet"), stack(2, 3, "vae")
    layer = layer_bytes()
    unet_working, vae_working = 20_000, 60_000
    budget = 16 * layer + unet_working
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


class RunsOutOfMemoryOnce(torch.nn.Module):
    """Raises torch.OutOfMemoryError on its first call (as a GPU would), then adds one."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")
        return x + 1


def test_out_of_memory_in_a_partial_forward_streams_one_more_group_and_retries():
    torch.manual_seed(0)
    module = torch.nn.Sequential(*[torch.nn.Linear(LAYER, LAYER) for _ in range(6)], RunsOutOfMemoryOnce())
    reference = copy.deepcopy(module)
    reference[-1].calls = 1
    x = torch.randn(3, LAYER)
    with torch.inference_mode():
        expected = reference(x)
    patcher = ModelPatcher(module, CPU, CPU, name="model")
    budget = 4 * layer_bytes()
    manager = mm.ModelManager(mm.MemorySettings(vram_state=mm.VRAMState.LOW_VRAM, budget_bytes=budget,
                                                total_bytes=budget))
    manager.load_models([patcher])
    streamed_before = len(patcher.streamed_groups())
    assert 0 < streamed_before < 6
    with torch.inference_mode():
        out = module(x)
    assert torch.equal(out, expected) and module[-1].calls == 2
    assert len(patcher.streamed_groups()) == streamed_before + 1
    assert manager.effective_budget == budget - layer_bytes()
    assert manager.stats.out_of_memory == 1


def test_out_of_memory_with_nothing_left_to_stream_is_raised():
    module = torch.nn.Sequential(torch.nn.Linear(LAYER, LAYER), RunsOutOfMemoryOnce())
    patcher = ModelPatcher(module, CPU, CPU, name="model")
    manager = mm.ModelManager(mm.MemorySettings(vram_state=mm.VRAMState.NO_VRAM, budget_bytes=1 << 30,
                                                total_bytes=1 << 30))
    manager.load_models([patcher])
    with pytest.raises(torch.OutOfMemoryError), torch.inference_mode():
        module(torch.randn(1, LAYER))
    assert module[0].weight.device == CPU and manager.stats.out_of_memory == 0

