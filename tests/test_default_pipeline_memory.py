"""Requests under memory pressure: out-of-memory retried once, caches on the ledgers,
a refiner that is the base checkpoint (DESIGN.md §3, issue 8)."""

import copy

import pytest
import torch

from ldm_patched.modules import model_management as mm
from ldm_patched.modules.file_version import FileVersion
from ldm_patched.modules.lora import LoraPatch
from modules import core
from modules.default_pipeline import Pipeline
from tests.helpers.patching import META, meta_settings
from tests.helpers.pipelines import BASE, SMALL, pixels
from tests.helpers.lora_files import kohya_lora
from tests.helpers import pipelines


def fail_once(monkeypatch, owner, name: str, times: int = 1) -> list:
    """Make `owner.name` raise torch.OutOfMemoryError on its first `times` calls."""
    original = getattr(owner, name)
    calls = []

    def failing(*args, **kwargs):
        calls.append(name)
        if len(calls) <= times:
            raise torch.OutOfMemoryError(f"injected: CUDA out of memory in {name}")
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, failing)
    return calls



@pytest.mark.parametrize("policy", list(mm.Policy))
def test_out_of_memory_in_sampling_is_retried_once_and_keeps_the_image(pipeline, monkeypatch, policy):
    pipeline(policy)
    clean = pipelines.process_request(dict(SMALL))
    calls = fail_once(monkeypatch, core, "sample_batch")
    result = pipelines.process_request(dict(SMALL))
    assert "error" not in result.report, result.report
    assert result.report["model_management"]["oom_retries"] == 1 and len(calls) == 2
    assert result.report["out_of_memory"]["effective_budget_bytes"] < result.report["out_of_memory"]["budget_bytes"]
    assert result.report["vram"]["effective_budget_bytes"] == mm.get_manager().effective_budget
    assert (pixels(result.images[0]) == pixels(clean.images[0])).all()
    assert pipelines.current().model_status()["effective_budget_bytes"] == mm.get_manager().effective_budget


def test_out_of_memory_in_a_merge_is_retried_and_the_next_request_is_steady(pipeline, monkeypatch,
                                                                              tiny_components):
    folders = pipeline(mm.Policy.RESIDENT)
    kohya_lora(tiny_components, folders["loras"] / "style.safetensors")
    request = {**SMALL, "loras": [["style.safetensors", 0.8]]}
    with monkeypatch.context() as patch:
        fail_once(patch, LoraPatch, "added")
        first = pipelines.process_request(dict(request))
    assert "error" not in first.report and first.report["model_management"]["oom_retries"] == 1
    second = pipelines.process_request(dict(request))
    moved = second.report["model_management"]
    assert "error" not in second.report and (moved["models_loaded"], moved["weights_patched"]) == (0, 0)
    assert (pixels(second.images[0]) == pixels(first.images[0])).all()


def test_out_of_memory_twice_fails_the_request_alone_with_what_it_needed(pipeline, monkeypatch):
    pipeline(mm.Policy.RESIDENT)
    with monkeypatch.context() as patch:
        fail_once(patch, core, "sample_batch", times=2)
        failed = pipelines.process_request(dict(SMALL))
    error = failed.report["error"]
    assert failed.images == [] and "out of memory" in error and "needed about" in error and "budget" in error
    assert "error" not in pipelines.process_request(dict(SMALL)).report


def test_an_out_of_memory_batch_is_retried_in_halves_and_finished_images_are_not_made_again(pipeline,
                                                                                             monkeypatch):
    folders = pipeline(mm.Policy.RESIDENT)
    original = core.sample_batch
    calls = []

    def fails_at_two_images_and_once_at_the_second(images, **kwargs):
        calls.append([image.seed for image in images])
        if len(images) == 2 or calls.count([8]) == 1 and images[0].seed == 8:
            raise torch.OutOfMemoryError("injected")
        return original(images, **kwargs)

    monkeypatch.setattr(core, "sample_batch", fails_at_two_images_and_once_at_the_second)
    result = pipelines.process_request({**SMALL, "image_number": 2})
    # Both images in one batch: out of memory, so halves; the second half fails once more
    # (one image: the request's retry) and the finished first image is not made again.
    assert "error" not in result.report and calls == [[7, 8], [7], [8], [8]]
    assert result.report["model_management"]["oom_batch_halvings"] == 1
    assert result.report["model_management"]["oom_retries"] == 1
    assert len(result.images) == 2 and len(list(folders["outputs"].rglob("*.png"))) == 2


def test_a_refiner_that_is_the_base_is_not_a_second_patch_set(pipeline, tiny_components):
    folders = pipeline(mm.Policy.RESIDENT)
    kohya_lora(tiny_components, folders["loras"] / "style.safetensors")
    request = {**SMALL, "loras": [["style.safetensors", 0.8]], "refiner_model": BASE, "refiner_switch": 0.5}
    first = pipelines.process_request(dict(request))
    assert "disabled" in first.report["refiner_model"]
    again = pipelines.process_request(dict(request)).report["model_management"]
    assert (again["weights_patched"], again["weights_restored"]) == (0, 0)


def test_lora_files_and_conditionings_are_charged(pipeline, tiny_components):
    folders = pipeline(mm.Policy.RESIDENT)
    kohya_lora(tiny_components, folders["loras"] / "style.safetensors")
    pipelines.process_request({**SMALL, "loras": [["style.safetensors", 0.8]]})
    manager = mm.get_manager()
    caches = manager.ledger(mm.HOST)["caches"]
    assert caches["lora_files"] == pipelines.current().catalogue.state.lora_files.nbytes() > 0
    assert caches["conditionings"] > 0
    assert manager.used_bytes() == sum(e.bytes_on(manager.device) for e in manager.loaded) + sum(caches.values())



def _tensor_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def test_cached_checkpoint_parts_the_registry_does_not_hold_are_charged_to_the_host(tiny_components):
    """A checkpoint read into host memory, or evicted back there, is memory the checkpoint
    cache keeps: it counts on the host ledger, and stops counting while the registry holds
    it on the accelerator (the meta stand-in)."""
    mm.configure(meta_settings(budget=1 << 40))
    try:
        parts = {name: copy.deepcopy(tiny_components[name]) for name in ("unet", "vae", "text_encoder_2")}
        checkpoint = Pipeline().catalogue.adopt_checkpoint(FileVersion("base.safetensors", 1, 1), "sdxl", parts, (None, None))
        manager = mm.get_manager()
        every_part = sum(_tensor_bytes(m) for m in parts.values())
        assert manager.ledger(mm.HOST)["caches"]["checkpoints"] == every_part > 0

        manager.load_models([checkpoint.unet])
        assert next(checkpoint.unet.model.parameters()).device == META
        assert manager.ledger(mm.HOST)["caches"]["checkpoints"] == every_part - _tensor_bytes(parts["unet"])

        manager.unload_all()   # evicted to its offload device, the host: idle in the cache again
        assert manager.ledger(mm.HOST)["caches"]["checkpoints"] == every_part
    finally:
        mm.configure(mm.MemorySettings())


def test_a_steady_request_measures_no_cached_tensor_with_50_lora_files_cached(pipeline, tiny_components,
                                                                                 monkeypatch):
    """Ledger queries read the caches' kept byte counts: with 50 parsed LoRA files cached, a
    steady request calls no per-tensor size function, and the counts still equal the tensors."""
    from ldm_patched.modules import lora_adapters
    from modules import model_catalogue

    folders = pipeline(mm.Policy.RESIDENT)
    paths = [kohya_lora(tiny_components, folders["loras"] / f"style{i}.safetensors", rank=2)
             for i in range(50)]
    state = pipelines.current().catalogue.state
    for path in paths:
        state.lora_files.get(path)
    request = {**SMALL, "loras": [["style0.safetensors", 0.8]]}
    pipelines.process_request(dict(request))   # registers the caches, encodes, patches
    measured = []
    for owner, name in ((lora_adapters, "_nbytes"), (model_catalogue, "conditioning_bytes")):
        original = getattr(owner, name)
        monkeypatch.setattr(owner, name, lambda *a, _f=original, _n=name: measured.append(_n) or _f(*a))
    steady = pipelines.process_request(dict(request))
    assert "error" not in steady.report and steady.report["model_management"]["weights_patched"] == 0
    assert measured == []
    monkeypatch.undo()
    factor_bytes = sum(t.numel() * t.element_size() for path in paths
                       for adapter in state.lora_files.get(path).layers.values() for t in adapter.tensors())
    caches = mm.get_manager().ledger(mm.HOST)["caches"]
    assert len(state.lora_files) == 50 and caches["lora_files"] == factor_bytes
    assert caches["conditionings"] == sum(t.numel() * t.element_size() for c in state.conditions.values()
                                          for t in (c.embeds, c.pooled))
