"""Small GPUs through whole requests: partially resident and streamed models draw the same
pixels as whole loading, and fp8 storage halves the UNet's bytes (on the CPU, where torch's
float8 types exist too)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import args_manager
from ldm_patched.modules import model_management as mm
from ldm_patched.modules.checkpoint import load_checkpoint
from ldm_patched.modules.model_patcher import ModelPatcher, store_weights_in
from modules import resident_memory
from tests.helpers import pipelines
from tests.helpers.lora_files import kohya_lora
from tests.helpers.pipelines import SMALL, pixels

LORA = "detail.safetensors"


def run(request: dict) -> dict:
    result = pipelines.process_request(dict(request))
    assert "error" not in result.report, result.report
    return {"pixels": pixels(result.images[0]), "report": result.report}


def unet_patcher() -> ModelPatcher:
    return next(iter(pipelines.current().catalogue.state.checkpoints.values())).unet


def raw(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes (float8 has no exact comparison of its own)."""
    return tensor.detach().contiguous().view(torch.uint8)


def test_partial_and_streamed_requests_draw_the_pixels_of_whole_loading(pipeline, tiny_components, use_compiler):
    """Whole loading, then half the UNet under --always-low-vram (conservative) and everything
    streamed under --always-no-vram (resident): the same pixels with and without a LoRA; after
    the LoRA is removed every UNet weight is the file's, bit for bit. Reports and the memory
    panel say what was resident and what streamed; a compiled UNet runs streamed ones eager."""
    folders = pipeline(mm.Policy.CONSERVATIVE)
    kohya_lora(tiny_components, folders["loras"] / LORA)
    plain, with_lora = {**SMALL, "steps": 2}, {**SMALL, "steps": 2, "loras": [[LORA, 0.8]]}
    expected = {"plain": run(plain)["pixels"], "lora": run(with_lora)["pixels"]}
    original = tiny_components["unet"].state_dict()   # what the checkpoint file holds
    half_unet = ModelPatcher(tiny_components["unet"], mm.HOST, mm.HOST).model_size() // 2
    working = mm.working_memory_bytes("unet", plain["width"], plain["height"], 1, torch.float32)

    for policy, vram_state, budget in ((mm.Policy.CONSERVATIVE, mm.VRAMState.LOW_VRAM, half_unet + working),
                                       (mm.Policy.RESIDENT, mm.VRAMState.NO_VRAM, 10 * 1024 ** 3)):
        pipeline(policy, budget=budget, vram_state=vram_state)
        compiler = use_compiler(enabled=True, backend="eager")
        lora, after = run(with_lora), run(plain)
        assert np.array_equal(lora["pixels"], expected["lora"]) and np.array_equal(after["pixels"], expected["plain"])
        assert all(torch.equal(v, original[k]) for k, v in unet_patcher().model.state_dict().items())
        report = lora["report"]
        unet = next(m for m in report["vram"]["models"] if m["name"].endswith(":unet"))
        assert unet["placement"] == ("partial" if vram_state is mm.VRAMState.LOW_VRAM else "streamed")
        assert unet["resident_bytes"] + unet["streamed_bytes"] == 2 * half_unet
        assert report["model_management"]["bytes_streamed"] >= plain["steps"] * unet["streamed_bytes"] > 0
        assert report["compile"]["compiled_calls"] == 0 and report["compile"]["streamed_eager_calls"] > 0
        assert compiler.counts["graphs_compiled"] == 0
    status = pipelines.current().model_status()
    html = resident_memory.panel_html(status, lora["report"])
    assert "<th>Placement</th>" in html and "MB streamed (" in html   # the UNet row: bytes and layers


def test_fp8_flags_store_weights_in_float8_and_the_ledger_counts_one_byte_each(tiny_checkpoint):
    """--unet-in-fp8-e4m3fn / --clip-in-fp8-e5m2 (until now: fp16 with a warning): the Linear,
    Conv2d and Embedding weights are float8 (1 byte each), the rest is in the compute dtype."""
    settings = mm.settings_from_args(args_manager.parse_args(["--unet-in-fp8-e4m3fn", "--clip-in-fp8-e5m2"]))
    manager = mm.ModelManager(settings)
    assert manager.storage_dtype_for("unet") is torch.float8_e4m3fn
    assert manager.storage_dtype_for("text_encoder") is torch.float8_e5m2
    compute = manager.dtype_for("unet")
    assert compute not in mm.FLOAT8
    stored = load_checkpoint(tiny_checkpoint, unet_dtype=compute, text_encoder_dtype=compute,
                             unet_storage_dtype=manager.storage_dtype_for("unet"),
                             text_encoder_storage_dtype=manager.storage_dtype_for("text_encoder"))
    plain = load_checkpoint(tiny_checkpoint, unet_dtype=torch.float16)
    layers = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Embedding)
    for part, storage in (("unet", torch.float8_e4m3fn), ("text_encoder_2", torch.float8_e5m2)):
        module, reference = getattr(stored, part), getattr(plain, part)
        weights = {f"{n}.weight" for n, m in reference.named_modules() if type(m) in layers}
        params = dict(module.named_parameters())
        assert {n for n, p in params.items() if p.dtype is storage} == weights
        other = sum(p.numel() for n, p in params.items() if n not in weights)
        float8 = sum(params[n].numel() for n in weights)
        expected = float8 + other * torch.empty((), dtype=compute).element_size() + \
            sum(b.numel() * b.element_size() for b in module.buffers())
        assert ModelPatcher(module, mm.HOST, mm.HOST).model_size() == expected
        assert float8 > 0.9 * sum(p.numel() for p in reference.parameters())   # the bulk: half of fp16
        assert ModelPatcher(module, mm.HOST, mm.HOST).model_dtype() == compute


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def test_fp8_images_stay_close_to_fp16_and_loras_merge_from_the_original(pipeline, tiny_components):
    """An fp8 UNet draws close to the fp16 one (PSNR printed); a LoRA merge is the float32 merge
    of the float8 original stored back in float8, and removing it restores the float8 bytes."""
    folders = pipeline(mm.Policy.RESIDENT)
    kohya_lora(tiny_components, folders["loras"] / LORA)
    images = {}
    for flag in ("--unet-in-fp16", "--unet-in-fp8-e4m3fn"):
        fp_settings = mm.settings_from_args(args_manager.parse_args([flag, "--keep-models-resident"]))
        pipeline(mm.Policy.RESIDENT, unet_dtype=fp_settings.unet_dtype)
        images[flag] = run(SMALL)["pixels"]
    quality = psnr(images["--unet-in-fp16"], images["--unet-in-fp8-e4m3fn"])
    print(f"fp8 (e4m3fn) against fp16 UNet: PSNR {quality:.1f} dB")
    assert 25.0 <= quality < float("inf")

    unet = unet_patcher().model
    original = {k: raw(v).clone() for k, v in unet.state_dict().items()}
    widened = ModelPatcher(_float32_copy(unet), mm.HOST, mm.HOST)   # the oracle: float32 copy of the float8 weights
    run({**SMALL, "loras": [[LORA, 0.8]]})
    lora_set = next(m for m in pipelines.current().catalogue.state.patched.values() if m.unet.patches)
    for key, entries in lora_set.unet.patches.items():
        for entry in entries:
            widened.add_patches({key: entry.patch}, entry.strength_patch, entry.strength_model)
    widened.patch_model()
    merged, expected = dict(unet.named_parameters()), dict(widened.model.named_parameters())
    keys = [k for k in lora_set.unet.patches if merged[k].dtype is torch.float8_e4m3fn]
    assert keys and all(torch.equal(raw(merged[k]), raw(expected[k].to(torch.float8_e4m3fn))) for k in keys)
    run(dict(SMALL))
    assert all(torch.equal(raw(v), original[k]) for k, v in unet.state_dict().items())


def _float32_copy(module: torch.nn.Module) -> torch.nn.Module:
    widened = copy.deepcopy(module)
    for param in widened.parameters():
        param.data = param.data.float()
    return widened


def test_upcasting_layers_compile_as_one_graph():
    """The per-layer upcast is plain ops in the layers' forward: torch.compile traces it whole
    (fullgraph: any graph break fails) and gives the eager values."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten(), torch.nn.Linear(8 * 6 * 6, 4))
    assert store_weights_in(model, torch.float8_e4m3fn, torch.float32) == 2
    x = torch.randn(2, 3, 8, 8)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    assert torch.equal(compiled(x), model(x))
    assert model[0].weight.dtype is torch.float8_e4m3fn

