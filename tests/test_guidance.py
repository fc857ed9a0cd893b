"""Sharpness and ADM guidance: sampling-time computations that patch and move nothing."""

import numpy as np
import torch
from PIL import Image

from ldm_patched.modules import model_management as mm
from modules import guidance
from tests.helpers import pipelines

BASE = "tiny_sdxl_base.safetensors"
NEUTRAL = {"sharpness": 0.0, "adm_scaler_positive": 1.0, "adm_scaler_negative": 1.0, "adm_scaler_end": 0.0}
SMALL = {"base_model": BASE, "prompt": "a cat", "negative_prompt": "blurry", "width": 64, "height": 64,
         "steps": 4, "seed": 7, "sampler": "euler", "scheduler": "normal", "guidance_scale": 5.0}


def pixels(path: str) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


def naive_bilateral(x: np.ndarray, guide: np.ndarray, size: int, sigma_space: float, sigma_range: float):
    """The joint bilateral filter written out pixel by pixel (float64, reflected borders)."""
    pad = size // 2
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad)), mode="reflect")
    gp = np.pad(guide, ((0, 0), (pad, pad), (pad, pad)), mode="reflect")
    out = np.zeros_like(x)
    _, height, width = x.shape
    for i in range(height):
        for j in range(width):
            total, norm = np.zeros(x.shape[0]), 0.0
            for di in range(-pad, pad + 1):
                for dj in range(-pad, pad + 1):
                    d = np.abs(gp[:, i + pad + di, j + pad + dj] - guide[:, i, j]).sum()
                    w = np.exp(-(di * di + dj * dj) / (2 * sigma_space ** 2)) * np.exp(-0.5 * (d / sigma_range) ** 2)
                    total += w * xp[:, i + pad + di, j + pad + dj]
                    norm += w
            out[:, i, j] = total / norm
    return out


def test_bilateral_filter_matches_the_formula_written_out():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 9, 8, generator=gen, dtype=torch.float64)
    guide = torch.randn(1, 3, 9, 8, generator=gen, dtype=torch.float64)
    ours = guidance.joint_bilateral(x, guide, size=5, sigma_space=1.5, sigma_range=0.8)[0].numpy()
    assert np.allclose(ours, naive_bilateral(x[0].numpy(), guide[0].numpy(), 5, 1.5, 0.8), atol=1e-10)


def test_sharpness_blend_weight_follows_the_timestep():
    g = guidance.Guidance(sharpness=2.0)
    assert g.sharpness_weight(999) == 0.0
    assert abs(g.sharpness_weight(0) - 0.002) < 1e-12
    eps = torch.randn(1, 4, 16, 16)
    assert torch.equal(guidance.sharpen(eps, eps, 999.0, g, torch.linspace(0.99, 0.01, 1000)), eps)


def test_neutral_settings_give_the_plain_image_and_match_diffusers(pipeline, tiny_checkpoint, diffusers_config_dir):
    from diffusers import StableDiffusionXLPipeline

    pipeline(mm.Policy.CONSERVATIVE)
    ours = pipelines.process_request({**SMALL, **NEUTRAL})
    assert "error" not in ours.report, ours.report
    assert ours.report["guidance"] == {"sharpness": 0.0, "adm_positive": 1.0, "adm_negative": 1.0, "adm_end": 0.0,
                                        "adaptive_cfg": 7.0}   # upstream's default CFG mimicking
    pipe = StableDiffusionXLPipeline.from_single_file(tiny_checkpoint, config=diffusers_config_dir,
                                                      local_files_only=True)
    theirs = pipe(prompt="a cat", negative_prompt="blurry", width=64, height=64, num_inference_steps=4,
                  guidance_scale=5.0, output_type="np", generator=torch.Generator("cpu").manual_seed(7)).images[0]
    assert np.abs(pixels(ours.images[0]) - np.round(theirs * 255)).max() <= 2
    # ADM scalers of 1 are the plain sizes whatever the end, and a zero end ignores the scalers.
    for variant in ({"adm_scaler_end": 0.9}, {"adm_scaler_positive": 2.0, "adm_scaler_negative": 0.5}):
        same = pipelines.process_request({**SMALL, **NEUTRAL, **variant})
        assert np.array_equal(pixels(same.images[0]), pixels(ours.images[0]))


def test_adm_scales_the_size_conditioning_of_each_side_for_the_first_steps(pipeline):
    pipeline(mm.Policy.CONSERVATIVE)
    pipelines.process_request({**SMALL, **NEUTRAL})        # loads the checkpoint
    unet = next(iter(pipelines.current().catalogue.state.checkpoints.values())).unet.model
    seen = []
    hook = unet.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((float(args[1]), kwargs["added_cond_kwargs"]["time_ids"].tolist())),
        with_kwargs=True)
    try:
        report = pipelines.process_request({**SMALL, **NEUTRAL, "adm_scaler_positive": 1.5,
                                                   "adm_scaler_negative": 0.8, "adm_scaler_end": 0.3}).report
    finally:
        hook.remove()
    assert "error" not in report, report
    assert len(seen) == 4
    for t, (negative, positive) in seen:
        if t > 999 * 0.7:
            assert positive == [96, 96, 0, 0, 64, 64] and negative == [51, 51, 0, 0, 64, 64]
        else:
            assert positive == negative == [64, 64, 0, 0, 64, 64]
    assert sum(t > 999 * 0.7 for t, _ in seen) == 1       # euler, 4 steps: only t=751 is in the first 30 %


def test_other_values_change_the_image_and_move_nothing_when_resident(pipeline):
    pipeline(mm.Policy.RESIDENT)
    plain = pipelines.process_request({**SMALL, **NEUTRAL})
    assert "error" not in plain.report, plain.report
    images = [pixels(plain.images[0])]
    for tweak in ({"sharpness": 30.0}, {"adm_scaler_positive": 1.5, "adm_scaler_negative": 0.8,
                                        "adm_scaler_end": 0.3}, {}):   # {}: the defaults 2.0, 1.5, 0.8, 0.3
        request = {**SMALL, **NEUTRAL, **tweak} if tweak else dict(SMALL)
        result = pipelines.process_request(request)
        moved = result.report["model_management"]
        assert (moved["models_loaded"], moved["weights_patched"], moved["bytes_to_device"],
                moved["bytes_to_offload"], moved["text_encodes"]) == (0, 0, 0, 0, 0), moved
        image = pixels(result.images[0])
        assert all(not np.array_equal(image, other) for other in images), tweak
        images.append(image)
    assert pipelines.process_request(dict(SMALL)).report["guidance"] == {
        "sharpness": 2.0, "adm_positive": 1.5, "adm_negative": 0.8, "adm_end": 0.3, "adaptive_cfg": 7.0}


def test_the_filter_takes_latents_smaller_than_its_window():
    """A 4x4 latent (a 32 px image, e.g. Vary of a small upload) is smaller than the 13-wide
    window: the border is repeated instead of failing; a constant input stays constant."""
    x = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    out = guidance.anisotropic_filter(x, x)
    assert out.shape == x.shape and torch.isfinite(out).all()
    flat = torch.full((1, 4, 3, 5), 0.25)
    assert torch.allclose(guidance.anisotropic_filter(flat, flat), flat)
