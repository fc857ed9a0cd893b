"""Loaded files are private memory, and a file's version is (device, inode, size, mtime, ctime):
rewriting a model file in place (even keeping size and mtime) never changes what is loaded,
and the next request uses the new version, which replaces the old one."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_patched.modules import model_management as mm
from ldm_patched.modules import telemetry
from ldm_patched.modules.checkpoint import CheckpointError, load_checkpoint, original_state_dict, save_checkpoint
from ldm_patched.modules.demo_model import build_tiny_sdxl
from ldm_patched.modules.file_version import FileVersion, read_safetensors
from ldm_patched.modules.lora import LoraError, LoraFileCache, read_lora_file
from tests.helpers.serving import rewrite_in_place, write_unet_lora
from tests.helpers import pipelines

BASE = "tiny_sdxl_base.safetensors"
SMALL = {"base_model": BASE, "prompt": "a cat", "negative_prompt": "blurry", "width": 64, "height": 64,
         "steps": 2, "seed": 7, "sampler": "euler", "scheduler": "normal", "guidance_scale": 5.0}


@pytest.fixture(scope="module")
def other_checkpoint_bytes(tmp_path_factory) -> bytes:
    """A second tiny base checkpoint (other random weights), byte for byte the size of the first."""
    path = tmp_path_factory.mktemp("other") / "other.safetensors"
    save_checkpoint(path, original_state_dict(**build_tiny_sdxl(seed=1)), {"title": "tiny base"})
    return path.read_bytes()


def pixels(path: str) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


def ctime_changed(path, before: os.stat_result) -> None:
    """Precondition of the same-size-same-mtime cases: only ctime (and content) tell the versions apart."""
    after = os.stat(path)
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    assert after.st_ctime_ns != before.st_ctime_ns


def test_file_version_tells_a_same_size_same_mtime_rewrite_apart(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"a" * 100)
    first = FileVersion.of(str(path))
    before = os.stat(path)
    rewrite_in_place(path, b"b" * 100)
    ctime_changed(path, before)
    assert FileVersion.of(str(path)) != first
    replaced = tmp_path / "new.bin"
    replaced.write_bytes(b"c" * 100)
    os.utime(replaced, ns=(before.st_atime_ns, before.st_mtime_ns))
    os.replace(replaced, path)   # rsync -t: another inode under the same name
    assert FileVersion.of(str(path)).inode != first.inode


def test_loaded_checkpoint_is_private_memory(tmp_path, tiny_checkpoint, tiny_components, other_checkpoint_bytes):
    path = tmp_path / BASE
    shutil.copy(tiny_checkpoint, path)
    loaded = load_checkpoint(str(path))
    rewrite_in_place(path, other_checkpoint_bytes)   # cp other.safetensors model.safetensors
    for name, module in (("unet", loaded.unet), ("vae", loaded.vae), ("text_encoder_2", loaded.text_encoder_2)):
        expected = tiny_components[name].state_dict()
        for key, value in module.state_dict().items():
            if key in expected:
                assert torch.equal(value, expected[key]), f"{name}.{key} changed with the file on disk"


def test_loaded_lora_is_private_memory(tmp_path, tiny_components):
    path = tmp_path / "style.safetensors"
    write_unet_lora(tiny_components["unet"], path, seed=1)
    parsed = read_lora_file(str(path))
    kept = {name: f.up.clone() for name, f in parsed.layers.items()}
    other = tmp_path / "other.safetensors"
    write_unet_lora(tiny_components["unet"], other, seed=2)
    rewrite_in_place(path, other.read_bytes())
    assert all(torch.equal(parsed.layers[name].up, up) for name, up in kept.items())


def test_lora_rewritten_with_same_size_and_mtime_is_read_again(tmp_path, tiny_components):
    path = tmp_path / "style.safetensors"
    write_unet_lora(tiny_components["unet"], path, seed=1)
    cache = LoraFileCache()
    first = cache.get(str(path))
    other = tmp_path / "other.safetensors"
    write_unet_lora(tiny_components["unet"], other, seed=2)
    before = os.stat(path)
    rewrite_in_place(path, other.read_bytes())
    ctime_changed(path, before)
    reads = telemetry.snapshot().lora_files_read
    second = cache.get(str(path))
    assert telemetry.snapshot().lora_files_read == reads + 1
    expected = read_lora_file(str(other))
    assert all(torch.equal(second.layers[k].up, expected.layers[k].up) for k in expected.layers)
    assert not all(torch.equal(first.layers[k].up, second.layers[k].up) for k in first.layers)
    assert len(cache) == 1   # the new version replaced the old one


@pytest.mark.parametrize("policy", [mm.Policy.RESIDENT, mm.Policy.CONSERVATIVE])
def test_checkpoint_rewritten_in_place_is_served_as_the_new_version(pipeline, policy, other_checkpoint_bytes):
    folders = pipeline(policy)
    path = folders["checkpoints"] / BASE
    old = pixels(pipelines.process_request(dict(SMALL)).images[0])
    before = os.stat(path)
    rewrite_in_place(path, other_checkpoint_bytes)
    ctime_changed(path, before)
    rewritten = pipelines.process_request(dict(SMALL))
    assert "error" not in rewritten.report, rewritten.report
    assert pipelines.current().model_status()["checkpoints"] == [BASE]   # the old version is gone
    assert len(pipelines.current().catalogue.state.checkpoints) == 1
    assert len(mm.get_manager().loaded) <= 3    # unet, text encoders, vae of one version
    pipeline(policy)   # a fresh process state: the oracle for "the new file's pixels"
    fresh = pixels(pipelines.process_request(dict(SMALL)).images[0])
    assert np.array_equal(pixels(rewritten.images[0]), fresh)
    assert not np.array_equal(old, fresh)


def test_lora_rewritten_in_place_changes_the_next_request(pipeline, tiny_components, tmp_path):
    folders = pipeline(mm.Policy.RESIDENT)
    path = folders["loras"] / "style.safetensors"
    write_unet_lora(tiny_components["unet"], path, seed=1)
    request = {**SMALL, "loras": [["style.safetensors", 1.0]]}
    pipelines.process_request(dict(request))
    other = tmp_path / "other.safetensors"
    write_unet_lora(tiny_components["unet"], other, seed=2)
    before = os.stat(path)
    rewrite_in_place(path, other.read_bytes())
    ctime_changed(path, before)
    result = pipelines.process_request(dict(request))
    assert result.report["model_management"]["lora_files_read"] == 1
    assert len(pipelines.current().catalogue.state.lora_files) == 1
    pipeline(mm.Policy.RESIDENT)
    fresh = pipelines.process_request(dict(request))
    assert np.array_equal(pixels(result.images[0]), pixels(fresh.images[0]))


def test_truncated_or_corrupt_files_fail_naming_the_file(tmp_path, tiny_checkpoint, tiny_components):
    path = tmp_path / "cut.safetensors"
    data = open(tiny_checkpoint, "rb").read()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cut.safetensors.*(truncated|outside the file)"):
        load_checkpoint(str(path))
    path.write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="cut.safetensors.*corrupt"):
        load_checkpoint(str(path))
    lora = tmp_path / "lora.safetensors"
    write_unet_lora(tiny_components["unet"], lora, seed=1)
    raw = lora.read_bytes()
    lora.write_bytes(raw[:-10])
    with pytest.raises(LoraError, match="lora.safetensors"):
        read_lora_file(str(lora))


def test_reader_matches_safetensors_for_every_dtype(tmp_path):
    from safetensors.torch import load_file, save_file

    tensors = {str(dtype): torch.arange(12).reshape(3, 4).to(dtype)
               for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64,
                             torch.int32, torch.int8, torch.uint8, torch.bool)}
    tensors["empty"] = torch.zeros(0, 5)
    path = tmp_path / "all.safetensors"
    save_file(tensors, str(path), metadata={"k": "v"})
    version, ours, metadata = read_safetensors(str(path))
    reference = load_file(str(path))
    assert metadata == {"k": "v"} and version == FileVersion.of(str(path))
    assert set(ours) == set(reference)
    for key, tensor in reference.items():
        assert ours[key].dtype == tensor.dtype and torch.equal(ours[key], tensor)


def test_read_file_gives_the_bytes_and_the_version_read(tmp_path):
    from ldm_patched.modules.file_version import read_file

    path = tmp_path / "weights.bin"
    path.write_bytes(bytes(range(256)) * 40)
    version, data = read_file(str(path))
    assert data == path.read_bytes() and version == FileVersion.of(str(path))
