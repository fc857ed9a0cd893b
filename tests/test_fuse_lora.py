"""fuse_lora: a fused checkpoint draws what base + LoRA draws at run time."""

import json
import shutil

import numpy as np
import pytest
from safetensors import safe_open

from ldm_patched.modules import model_management as mm
from modules import fuse_lora, model_catalogue
from tests.helpers.pipelines import SMALL, pixels
from tests.helpers.lora_files import kohya_lora
from tests.helpers import pipelines


def test_lora_argument_weights():
    assert fuse_lora.parse_lora_argument("style.safetensors:0.5") == ("style.safetensors", 0.5)
    assert fuse_lora.parse_lora_argument("style.safetensors") == ("style.safetensors", 1.0)
    assert fuse_lora.parse_lora_argument(r"C:\loras\style.safetensors") == (r"C:\loras\style.safetensors", 1.0)


def test_fused_checkpoint_draws_like_base_plus_lora(pipeline, tiny_components, tmp_path):
    folders = pipeline(mm.Policy.CONSERVATIVE)
    lora = kohya_lora(tiny_components, folders["loras"] / "style.safetensors")
    runtime = pipelines.process_request({**SMALL, "loras": [["style.safetensors", 0.75]]})
    fused_path = folders["checkpoints"] / "fused.safetensors"
    assert fuse_lora.main([str(folders["checkpoints"] / SMALL["base_model"]), "--lora", f"{lora}:0.75",
                           "-o", str(fused_path)]) == 0
    with safe_open(str(fused_path), framework="pt") as handle:
        recorded = json.loads(handle.metadata()[model_catalogue.FUSED_LORAS_METADATA_KEY])
    assert recorded == [["style.safetensors", 0.75]]
    fused = pipelines.process_request({**SMALL, "base_model": "fused.safetensors"})
    plain = pipelines.process_request(dict(SMALL))
    assert np.abs(pixels(fused.images[0]) - pixels(runtime.images[0])).max() <= 2
    assert np.abs(pixels(plain.images[0]) - pixels(runtime.images[0])).max() > 2  # the LoRA matters


def test_fusing_never_maps_the_files(pipeline, tiny_components, tmp_path, monkeypatch):
    """Issue 9 item 1: every file is read into private memory; a map of a file that changes
    on disk while it is read can crash the process (SIGBUS)."""
    import mmap
    import sys

    import safetensors

    def refuse(*args, **kwargs):
        raise AssertionError("a file was memory-mapped")

    folders = pipeline(mm.Policy.CONSERVATIVE)
    lora = kohya_lora(tiny_components, folders["loras"] / "style.safetensors")
    monkeypatch.setattr(mmap, "mmap", refuse)
    mapping_reader = safetensors.safe_open
    for module in list(sys.modules.values()):   # every name safetensors' mapping reader is bound to
        if getattr(module, "safe_open", None) is mapping_reader:
            monkeypatch.setattr(module, "safe_open", refuse)
    out = tmp_path / "fused.safetensors"
    assert fuse_lora.main([str(folders["checkpoints"] / SMALL["base_model"]), "--lora", str(lora),
                           "-o", str(out)]) == 0
    assert out.is_file()


def test_performance_lora_fused_into_the_checkpoint_is_not_added_again(pipeline, tiny_components):
    folders = pipeline(mm.Policy.RESIDENT)
    lcm = kohya_lora(tiny_components, folders["loras"] / "sdxl_lcm_lora.safetensors")
    request = {**SMALL, "performance": "Extreme Speed", "steps": 2}
    runtime = pipelines.process_request(dict(request))
    assert runtime.report["loras"][0]["file"] == "sdxl_lcm_lora.safetensors"
    fused_path = folders["checkpoints"] / "lcm_fused.safetensors"
    fuse_lora.fuse(str(folders["checkpoints"] / SMALL["base_model"]), [(lcm, 1.0)], str(fused_path))
    shutil.move(lcm, folders["outputs"] / "moved_away.safetensors")   # the LoRA file is no longer needed
    fused = pipelines.process_request({**request, "base_model": "lcm_fused.safetensors"})
    assert "error" not in fused.report, fused.report
    assert fused.report["loras"] == [] and "fused" in fused.report["performance_lora"]
    assert np.abs(pixels(fused.images[0]) - pixels(runtime.images[0])).max() <= 2


def test_missing_files_fail_with_a_message(tmp_path, capsys, tiny_checkpoint):
    assert fuse_lora.main([tiny_checkpoint, "--lora", str(tmp_path / "nope.safetensors"),
                           "-o", str(tmp_path / "out.safetensors")]) == 1
    assert "nope.safetensors" in capsys.readouterr().err
