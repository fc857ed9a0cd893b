"""On a real GPU: invariants 1 and 2 of DESIGN.md §3 in fp16 and bf16, with backups on the
device and in pinned host memory; accounting against the CUDA allocator; a real
out-of-memory under `set_per_process_memory_fraction`. Skipped without CUDA."""

import numpy as np
import pytest
import torch

from ldm_patched.modules import model_management as mm
from ldm_patched.modules.model_patcher import weight_state
from tests.helpers.pipelines import SMALL, pixels
from tests.helpers.lora_files import kohya_lora
from tests.helpers import pipelines

pytestmark = pytest.mark.cuda
CUDA = torch.device("cuda", 0)


@pytest.fixture
def gpu_pipeline(pipeline, monkeypatch):
    """The CPU `pipeline` fixture's folders, with a manager on the GPU."""

    def install(policy, dtype=torch.float16, budget=None):
        folders = pipeline(policy)
        total = torch.cuda.get_device_properties(CUDA).total_memory
        settings = mm.MemorySettings(policy=policy, vram_state=mm.VRAMState.NORMAL_VRAM, device=CUDA,
                                     budget_bytes=budget or total // 2, total_bytes=total,
                                     host_budget_bytes=8 * mm.GIB, unet_dtype=dtype, text_encoder_dtype=dtype,
                                     vae_dtype=torch.float32)
        mm.configure(settings)
        pipelines.install()
        return folders

    return install


def weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_same_pixels_in_both_policies_and_exact_removal(gpu_pipeline, tiny_components, dtype):
    folders = gpu_pipeline(mm.Policy.CONSERVATIVE, dtype)
    kohya_lora(tiny_components, folders["loras"] / "a.safetensors")
    request = {**SMALL, "loras": [["a.safetensors", 0.8]]}
    conservative = pixels(pipelines.process_request(dict(request)).images[0])
    gpu_pipeline(mm.Policy.RESIDENT, dtype)
    kohya_lora(tiny_components, folders["loras"] / "a.safetensors")
    pipelines.process_request(dict(SMALL))
    checkpoint = next(iter(pipelines.current().catalogue.state.checkpoints.values()))
    originals = {"unet": weights(checkpoint.unet.model), "clip": weights(checkpoint.clip.model)}
    resident = pixels(pipelines.process_request(dict(request)).images[0])
    assert np.array_equal(conservative, resident)
    pipelines.process_request(dict(SMALL))
    for name, patcher in (("unet", checkpoint.unet), ("clip", checkpoint.clip)):
        for key, value in weights(patcher.model).items():
            assert torch.equal(value, originals[name][key]), (name, key)


@pytest.mark.parametrize("backups_on_host", [False, True])
def test_pinned_host_backups_restore_exactly(gpu_pipeline, tiny_components, backups_on_host):
    folders = gpu_pipeline(mm.Policy.RESIDENT)
    kohya_lora(tiny_components, folders["loras"] / "a.safetensors")
    pipelines.process_request(dict(SMALL))
    manager = mm.get_manager()
    checkpoint = next(iter(pipelines.current().catalogue.state.checkpoints.values()))
    original = weights(checkpoint.unet.model)
    if backups_on_host:   # a budget with room for the weights only: backups go to pinned host memory
        manager.effective_budget = manager.used_bytes()
    pipelines.process_request({**SMALL, "loras": [["a.safetensors", 0.8]]})
    backups = list(weight_state(checkpoint.unet.model).backups.values())
    assert backups and all((b.device.type == "cpu") == backups_on_host for b in backups)
    if backups_on_host:
        assert all(b.is_pinned() for b in backups)
    pipelines.process_request(dict(SMALL))
    for key, value in weights(checkpoint.unet.model).items():
        assert torch.equal(value, original[key]), key


def test_accounting_matches_the_allocator(gpu_pipeline, tiny_components):
    folders = gpu_pipeline(mm.Policy.RESIDENT)
    kohya_lora(tiny_components, folders["loras"] / "a.safetensors")
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated(CUDA)
    for request in (SMALL, {**SMALL, "loras": [["a.safetensors", 0.8]]}, SMALL):
        pipelines.process_request(dict(request))
        torch.cuda.synchronize()
        manager = mm.get_manager()
        tensors = sum(1 for e in manager.loaded for _ in e.module.parameters())
        tolerance = 512 * (tensors + 64)   # the allocator rounds each block up to 512 bytes
        assert abs(manager.accounting_error(CUDA, baseline)) <= tolerance, manager.status()


def test_real_out_of_memory_is_recovered(gpu_pipeline, tiny_components):
    gpu_pipeline(mm.Policy.RESIDENT)
    pipelines.process_request(dict(SMALL))
    torch.cuda.synchronize()
    used = torch.cuda.memory_allocated(CUDA)
    total = torch.cuda.get_device_properties(CUDA).total_memory
    torch.cuda.set_per_process_memory_fraction(min((used + 32 * 2 ** 20) / total, 1.0), CUDA)
    try:
        huge = pipelines.process_request({**SMALL, "width": 4096, "height": 4096, "steps": 1})
        assert "error" in huge.report and "out of memory" in huge.report["error"]
        assert huge.report["model_management"]["oom_retries"] == 1
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, CUDA)
    after = pipelines.process_request(dict(SMALL))
    assert "error" not in after.report and after.images
