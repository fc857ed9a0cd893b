"""LoRA-family files through whole requests: images, resident switches, reports, the refiner."""

import logging
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_patched.modules import model_management as mm
from ldm_patched.modules.lora import read_lora_file
from modules import resident_memory
from modules.fuse_lora import fuse
from tests.helpers.lora_files import TE_SCHEMES, find_text_layers, kohya_lora, lora_tensors, lycoris_file, write
from tests.helpers import pipelines
from modules.task_types import RequestResult

BASE = "tiny_sdxl_base.safetensors"
SMALL = {"base_model": BASE, "prompt": "a cat", "negative_prompt": "blurry", "width": 64, "height": 64, "steps": 3,
         "seed": 7, "sampler": "euler", "scheduler": "normal", "guidance_scale": 5.0}


def pixels(path: str) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


def run(request: dict) -> RequestResult:
    result = pipelines.process_request(dict(request))
    assert "error" not in result.report, result.report
    return result


@pytest.mark.parametrize("kind", ["lora", "loha", "lokr", "dora", "diff"])
def test_image_matches_a_checkpoint_with_the_file_fused_in(pipeline, tiny_components, tiny_checkpoint, kind):
    """UNet and both text encoders, each adapter kind: the request equals the merged checkpoint."""
    folders = pipeline(mm.Policy.CONSERVATIVE)
    path = lycoris_file(tiny_components, folders["loras"] / f"{kind}.safetensors", kind)
    fuse(tiny_checkpoint, [(path, 0.8)], str(folders["checkpoints"] / "fused.safetensors"))
    with_file = run({**SMALL, "loras": [[f"{kind}.safetensors", 0.8]]})
    fused = run({**SMALL, "base_model": "fused.safetensors"})
    plain = run(dict(SMALL))
    assert with_file.report["loras"][0]["unmatched_keys"] == 0
    assert np.abs(pixels(with_file.images[0]) - pixels(fused.images[0])).max() <= 3
    assert not np.array_equal(pixels(with_file.images[0]), pixels(plain.images[0]))


def _snapshot(checkpoint) -> dict[str, torch.Tensor]:
    return {f"{part}.{k}": v.clone() for part, patcher in (("unet", checkpoint.unet), ("clip", checkpoint.clip))
            for k, v in patcher.model.state_dict().items()}


def test_resident_switch_loha_lokr_lora_patches_exactly_the_changed_keys(pipeline, tiny_components):
    folders = pipeline(mm.Policy.RESIDENT)
    layers, te = ("attn1.to_q", "ff.net.2", "conv1"), ("self_attn.q_proj",)
    for kind in ("loha", "lokr", "lora"):
        lycoris_file(tiny_components, folders["loras"] / f"{kind}.safetensors", kind, layers, te)
    kohya_lora(tiny_components, folders["loras"] / "steady.safetensors", unet_layers=("attn2.to_k",),
               te_layers=("mlp.fc1",))
    n = len(read_lora_file(folders["loras"] / "loha.safetensors").layers)
    m = len(read_lora_file(folders["loras"] / "steady.safetensors").layers)
    assert n == len(read_lora_file(folders["loras"] / "lokr.safetensors").layers) > 0

    run(dict(SMALL))
    checkpoint = next(iter(pipelines.current().catalogue.state.checkpoints.values()))
    original = _snapshot(checkpoint)
    prompts = iter(f"a cat number {i}" for i in range(10))   # new prompts: the text encoders run each time

    def counts(loras):
        report = run({**SMALL, "prompt": next(prompts), "loras": [[name, 0.9] for name in loras]}).report
        return report["model_management"]["weights_patched"], report["model_management"]["weights_restored"]

    assert counts(["loha.safetensors", "steady.safetensors"]) == (n + m, 0)
    assert counts(["lokr.safetensors", "steady.safetensors"]) == (n, n)
    assert counts(["lora.safetensors", "steady.safetensors"]) == (n, n)
    assert counts(["loha.safetensors", "steady.safetensors"]) == (n, n)
    assert counts(["loha.safetensors", "steady.safetensors"]) == (0, 0)
    assert counts([]) == (0, n + m)
    for key, value in _snapshot(checkpoint).items():
        assert torch.equal(value, original[key]), key


def test_whole_text_encoder_unmatched_is_said_in_the_report_and_log(pipeline, tiny_components, caplog):
    folders = pipeline(mm.Policy.CONSERVATIVE)
    tensors = {}
    for inner, _, shape in find_text_layers(tiny_components["text_encoder"]):   # no `text_model_` level: a bug
        tensors.update(lora_tensors("lora_te1_" + inner.replace(".", "_"), shape, 4, 4.0))
    for inner, _, shape in find_text_layers(tiny_components["text_encoder_2"]):
        tensors.update(lora_tensors(TE_SCHEMES["kohya"]("text_encoder_2", inner), shape, 4, 4.0))
    write(tensors, folders["loras"] / "half.safetensors")
    with caplog.at_level(logging.WARNING, logger="fooocus_resident.pipeline"):
        report = run({**SMALL, "loras": [["half.safetensors", 1.0]]}).report
    assert any("CLIP-L" in w and "half.safetensors" in w for w in report["warnings"])
    assert report["loras"][0]["warnings"] == report["warnings"]
    assert "CLIP-L" in caplog.text and "NOT applied" in caplog.text


def test_refiner_takes_the_loras_that_fit_it(pipeline, tiny_components, tiny_refiner_components,
                                             tiny_refiner_checkpoint):
    """A CLIP-G LoRA fits the refiner too (same encoder); a base UNet LoRA does not."""
    folders = pipeline(mm.Policy.RESIDENT)
    shutil.copy(tiny_refiner_checkpoint, folders["checkpoints"] / "refiner.safetensors")
    kohya_lora(tiny_components, folders["loras"] / "text.safetensors", unet_layers=(),
               te_layers=("self_attn.q_proj",))
    kohya_lora(tiny_components, folders["loras"] / "unet.safetensors", unet_layers=("conv1", "attn1.to_q"),
               te_layers=())
    request = {**SMALL, "refiner_model": "refiner.safetensors", "refiner_switch": 0.5,
               "loras": [["text.safetensors", 1.0], ["unet.safetensors", 1.0]]}
    report = run(request).report
    assert report["refiner_loras"] == ["text.safetensors"]
    assert [entry["refiner"] for entry in report["loras"]] == [True, False]
    # The refiner's CLIP-G got the same change the base's did.
    refiner = next(c for c in pipelines.current().catalogue.state.checkpoints.values() if c.kind == "refiner")
    base = next(c for c in pipelines.current().catalogue.state.checkpoints.values() if c.kind == "base")
    key = find_text_layers(tiny_components["text_encoder_2"], ("self_attn.q_proj",))[0][1]
    refined = refiner.clip.model.text_encoder_2.state_dict()[key] - tiny_refiner_components["text_encoder_2"].state_dict()[key]
    based = base.clip.model.text_encoder_2.state_dict()[key] - tiny_components["text_encoder_2"].state_dict()[key]
    assert based.abs().max() > 0 and torch.allclose(refined, based, atol=1e-6)
    without = run({**request, "loras": [["unet.safetensors", 1.0]]}).report
    assert without["refiner_loras"] == []


def test_the_memory_panel_names_the_lora_files_patched_into_each_resident_model(pipeline, tiny_components):
    folders = pipeline(mm.Policy.RESIDENT)
    kohya_lora(tiny_components, folders["loras"] / "detail.safetensors", unet_layers=("attn2.to_k",),
               te_layers=("mlp.fc1",))
    kohya_lora(tiny_components, folders["loras"] / "style.safetensors", unet_layers=("ff.net.2",), te_layers=())
    run({**SMALL, "loras": [["detail.safetensors", 0.5], ["style.safetensors", -1.25]]})
    status = pipelines.current().model_status()
    sources = {m["name"].rpartition(":")[2]: m["patch_sources"] for m in status["models"]}
    assert sources["unet"] == {"detail.safetensors": 0.5, "style.safetensors": -1.25}
    assert sources["text_encoders"] == {"detail.safetensors": 0.5}   # style has no text-encoder layers
    assert "detail.safetensors (0.5), style.safetensors (-1.25)" in resident_memory.panel_html(status, None)

    run(dict(SMALL))
    status = pipelines.current().model_status()
    assert all(m["patch_sources"] == {} for m in status["models"])
