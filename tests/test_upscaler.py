"""The upscaler model kind: loading ESRGAN files, tiles, the cache by file version, the
registry, the torchvision placeholder, and Fooocus's Vary/Upscale plans."""

from __future__ import annotations

import os
import sys
import types

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ldm_patched.modules import model_management as mm
from modules import tiling, upscaler


@pytest.fixture
def manager():
    """A conservative CPU manager, as conftest's `pipeline` fixture installs."""
    budget = 10 * 1024 ** 3
    yield mm.configure(mm.MemorySettings(policy=mm.Policy.CONSERVATIVE, budget_bytes=budget, total_bytes=budget))
    mm.get_manager().unload_all()


def tiny_esrgan(seed: int = 0) -> torch.nn.Module:
    upscaler.import_spandrel()
    from spandrel.architectures.ESRGAN import ESRGAN

    torch.manual_seed(seed)
    return ESRGAN(num_filters=8, num_blocks=1, scale=4).eval()


def old_layout(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The key layout of real ESRGAN files (`model.0.weight`, `model.1.sub.0.RDB1.conv1.0.weight`)."""
    state = {k: v.clone() for k, v in net.state_dict().items()}
    assert "model.1.sub.0.RDB1.conv1.0.weight" in state and "model.0.weight" in state
    return state


def write(path, state: dict[str, torch.Tensor]) -> str:
    if str(path).endswith(".safetensors"):
        save_file(state, str(path))
    else:
        torch.save(state, str(path))
    return str(path)


def image(height: int, width: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def reference(net: torch.nn.Module, pixels: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        x = torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255.0
        y = net(x)[0].clamp(0, 1).permute(1, 2, 0) * 255.0
    return y.round().to(torch.uint8).numpy()


@pytest.mark.parametrize("name", ["tiny.pth", "tiny.safetensors"])
def test_old_layout_files_load_as_4x_upscalers(tmp_path, manager, name):
    net = tiny_esrgan()
    patcher = upscaler.UpscalerCache().get(write(tmp_path / name, old_layout(net)))
    assert patcher.model.scale == 4 and patcher.model.architecture == "ESRGAN"
    assert patcher.name == f"{name}:upscaler"
    pixels = image(20, 28)
    out = upscaler.upscale(patcher, pixels)
    assert out.shape == (80, 112, 3) and out.dtype == np.uint8
    assert np.abs(out.astype(int) - reference(net, pixels).astype(int)).max() <= 1


def test_fooocus_renamed_keys_load(tmp_path, manager):
    net = tiny_esrgan()
    renamed = {k.replace(".RDB", ".residual_block_"): v for k, v in old_layout(net).items()}
    assert any("residual_block_1" in k for k in renamed)
    patcher = upscaler.UpscalerCache().get(write(tmp_path / upscaler.DEFAULT_UPSCALER, renamed))
    pixels = image(16, 16)
    assert np.abs(upscaler.upscale(patcher, pixels).astype(int) - reference(net, pixels).astype(int)).max() <= 1


def test_tiles_blend_to_the_untiled_result(tmp_path, manager):
    # The tiny net sees about 18 input pixels around each pixel; overlap/4 = 20 is enough
    # context that the blended tiles equal one pass over the whole image.
    net = tiny_esrgan()
    patcher = upscaler.UpscalerCache().get(write(tmp_path / "tiny.pth", old_layout(net)))
    x = torch.from_numpy(image(144, 176)).permute(2, 0, 1)[None].float() / 255.0
    assert tiling.tile_starts(176, 128, 80) == [0, 48] and tiling.tile_starts(144, 128, 80) == [0, 16]
    tiled = upscaler.upscale_tensor(patcher, x, tile=128, overlap=80)
    whole = upscaler.upscale_tensor(patcher, x, tile=512, overlap=32)
    with torch.inference_mode():
        direct = net(x)
    assert tiled.shape == (1, 3, 576, 704)
    torch.testing.assert_close(whole, direct, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tiled, whole, atol=1e-4, rtol=1e-4)


def test_files_that_are_not_upscalers_are_named_in_the_error(tmp_path, manager):
    lora = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8),
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(8, 4)}
    with pytest.raises(upscaler.UpscalerError, match=r"my_lora\.safetensors.*not an image upscaler.*lora_unet"):
        upscaler.UpscalerCache().get(write(tmp_path / "my_lora.safetensors", lora))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(os.urandom(4096))
    with pytest.raises(upscaler.UpscalerError, match=r"garbage\.pth.*not a readable PyTorch"):
        upscaler.UpscalerCache().get(str(garbage))
    bad_st = tmp_path / "broken.safetensors"
    bad_st.write_bytes(os.urandom(64))
    with pytest.raises(upscaler.UpscalerError, match=r"broken\.safetensors cannot be read"):
        upscaler.UpscalerCache().get(str(bad_st))
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(upscaler.UpscalerError, match=r"notes\.txt.*extension"):
        upscaler.UpscalerCache().get(str(text))


def test_a_rewritten_file_replaces_the_cached_upscaler(tmp_path, manager):
    cache = upscaler.UpscalerCache()
    path = write(tmp_path / "up.pth", old_layout(tiny_esrgan(seed=0)))
    first = cache.get(path)
    assert cache.get(path) is first                       # unchanged file: not read again
    upscaler.upscale(first, image(8, 8))
    names = [m["name"] for m in mm.get_manager().status()["models"]]
    assert names.count("up.pth:upscaler") == 1            # the registry holds it like any model
    replacement = write(tmp_path / "up.new.pth", old_layout(tiny_esrgan(seed=1)))
    os.replace(replacement, path)                         # a new version of the same path
    second = cache.get(path)
    assert second is not first and len(cache) == 1
    assert all(e.module is not first.model for e in mm.get_manager().loaded)
    assert not torch.equal(next(second.model.parameters()), next(first.model.parameters()))


def test_spandrel_imports_and_the_placeholder_is_not_left_behind():
    upscaler.import_spandrel()
    from spandrel.architectures.RestoreFormer import tv_normalize

    if not getattr(tv_normalize, "__name__", "") == "normalize" or tv_normalize.__module__ != upscaler.__name__:
        pytest.skip("a working torchvision is installed; no placeholder needed")
    with pytest.raises(RuntimeError, match="not available"):
        tv_normalize(torch.zeros(1))
    # the rest of the process (transformers probing torchvision) never sees the placeholder
    assert not getattr(sys.modules.get("torchvision"), "__fooocus_placeholder__", False)


def test_placeholder_offers_what_spandrel_imports(monkeypatch):
    for name in [n for n in sys.modules if n.startswith("torchvision")]:
        monkeypatch.delitem(sys.modules, name)
    installed = upscaler.install_torchvision_placeholder()
    try:
        if not installed:
            pytest.skip("a working torchvision is installed; no placeholder needed")
        from torchvision.transforms.functional import InterpolationMode, normalize, rotate

        assert InterpolationMode.BILINEAR.value == "bilinear"
        for fn in (normalize, rotate):
            with pytest.raises(RuntimeError, match="not available"):
                fn(torch.zeros(1))
    finally:
        upscaler._remove_torchvision_placeholder()


def test_a_working_torchvision_is_left_alone(monkeypatch):
    real = types.ModuleType("torchvision")
    transforms = types.ModuleType("torchvision.transforms")
    functional = types.ModuleType("torchvision.transforms.functional")
    real.transforms, transforms.functional = transforms, functional
    for name, mod in [("torchvision", real), ("torchvision.transforms", transforms),
                      ("torchvision.transforms.functional", functional)]:
        monkeypatch.setitem(sys.modules, name, mod)
    assert upscaler.install_torchvision_placeholder() is False
    assert sys.modules["torchvision"] is real and sys.modules["torchvision.transforms.functional"] is functional


def test_uov_plans_follow_upstream():
    plan = upscaler.uov_plan("Vary (Subtle)", 1024, 1024)
    assert (plan.denoise, plan.diffuse, plan.upscale, plan.target) == (0.5, True, False, (1024, 1024))
    plan = upscaler.uov_plan("Vary (Strong)", 640, 480)    # shape ceil 576 -> raised to 1024
    assert (plan.denoise, plan.target) == (0.85, (1152, 832))
    assert upscaler.uov_plan("Vary (Subtle)", 3000, 3000).target == (2048, 2048)
    plan = upscaler.uov_plan("Upscale (2x)", 1024, 1024)
    assert (plan.upscale, plan.scale, plan.denoise, plan.diffuse, plan.target) == (True, 2.0, 0.382, True, (2048, 2048))
    plan = upscaler.uov_plan("Upscale (1.5x)", 1152, 896)
    assert (plan.target, plan.diffuse) == ((1728, 1344), True)
    plan = upscaler.uov_plan("Upscale (Fast 2x)", 1024, 1024)
    assert (plan.upscale, plan.diffuse, plan.target) == (True, False, (2048, 2048))
    assert upscaler.uov_plan("Upscale (2x)", 1600, 1600).diffuse is False   # over 2800: SR image returned
    plan = upscaler.uov_plan("Upscale (1.5x)", 300, 200)   # too small: the 4x image sized to 1024
    assert plan.target == (1200, 800) and plan.diffuse
    assert upscaler.uov_plan("Upscale (1.5x)", 667, 667).latent_size == (1000, 1000)
    assert upscaler.uov_plan("Disabled", 640, 480).diffuse is False
    with pytest.raises(ValueError, match="uov_method.*Vary \\(Subtle\\)"):
        upscaler.uov_plan("Upscale (3x)", 64, 64)


def test_prepare_image_upscales_then_resizes(tmp_path, manager):
    patcher = upscaler.UpscalerCache().get(write(tmp_path / "tiny.pth", old_layout(tiny_esrgan())))
    plan = upscaler.UovPlan("Upscale (Fast 2x)", True, 2.0, 0.382, False, (40, 24))
    out = upscaler.prepare_image(plan, image(12, 20), patcher)
    assert out.shape == (24, 40, 3) and out.dtype == np.uint8


def test_upscaler_working_memory_is_per_tile():
    fp16 = mm.working_memory_bytes("upscaler", 512, 512, 1, torch.float16)
    assert 0.5 * 1024 ** 3 < fp16 < 1024 ** 3
    assert mm.working_memory_bytes("upscaler", 512, 512, 1, torch.float32) == 2 * fp16
