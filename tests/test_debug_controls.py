"""Upstream's Developer Debug Mode sampling controls, one small test each, on the tiny models."""

import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_patched.modules import model_management as mm
from modules import config, core, default_pipeline
from modules.generation_request import GenerationRequest
from modules.task_types import RequestError
from tests.helpers import pipelines
from tests.helpers.pipelines import SMALL, pixels

# Sharpness off: the guided prediction is then CFG alone, which the adaptive-CFG oracle recomputes.
PLAIN = {**SMALL, "sharpness": 0.0}


def _events(request):
    events = []
    result = pipelines.process_request(request, None, events.append)
    assert "error" not in result.report, result.report.get("error")
    return result, events


def test_overwrite_step_forces_the_step_count(pipeline):
    pipeline(mm.Policy.RESIDENT)
    plain = pipelines.process_request(dict(SMALL))
    forced = pipelines.process_request({**SMALL, "overwrite_step": 2})
    # One image, guided: one UNet call (negative and positive rows) per step.
    assert (plain.report["unet_calls"], forced.report["unet_calls"]) == (3, 2)
    assert forced.report["steps"] == 2
    unforced = pipelines.process_request({**SMALL, "overwrite_step": -1})
    assert unforced.report["unet_calls"] == 3


def test_overwrite_width_and_height_force_the_size(pipeline):
    pipeline(mm.Policy.RESIDENT)
    result = pipelines.process_request({**SMALL, "overwrite_width": 96, "overwrite_height": 80})
    assert Image.open(result.images[0]).size == (96, 80)
    with pytest.raises(RequestError, match="overwrite_width"):
        GenerationRequest.from_dict({**SMALL, "overwrite_width": 100}, config.get_config())


def test_disable_seed_increment_gives_every_image_the_same_seed(pipeline):
    pipeline(mm.Policy.RESIDENT)
    result = pipelines.process_request({**SMALL, "image_number": 2, "seed": 41, "disable_seed_increment": True})
    assert result.report["seeds"] == [41, 41]
    assert [json.loads(Image.open(p).text["parameters"])["seed"] for p in result.images] == ["41", "41"]
    assert np.array_equal(pixels(result.images[0]), pixels(result.images[1]))


def test_adaptive_cfg_blends_real_and_mimicked_guidance_by_progress(pipeline, monkeypatch):
    """Upstream's CFG mimicking, recomputed from the UNet's own rows of each step:
    eps = real * p + mimicked * (1 - p), p = 1 - t / 999, when the scale is above adaptive_cfg."""
    pipeline(mm.Policy.RESIDENT)
    rows, preds = [], []
    real_unet = core.UNET_COMPILER

    class Spy:
        def __call__(self, unet, sample, t, *rest):
            out = real_unet(unet, sample, t, *rest)
            rows.append((float(t), out.float().clone()))
            return out

        def __getattr__(self, name):
            return getattr(real_unet, name)

    real_step = core._InFlight.step

    def step(self, pred, t, *rest):
        preds.append(pred.clone())
        return real_step(self, pred, t, *rest)

    monkeypatch.setattr(core, "UNET_COMPILER", Spy())
    monkeypatch.setattr(core._InFlight, "step", step)
    result = pipelines.process_request({**PLAIN, "guidance_scale": 10.0, "adaptive_cfg": 7.0})
    assert "error" not in result.report
    assert len(rows) == len(preds) == 3
    for (t, out), pred in zip(rows, preds):
        uncond, cond = out[0], out[1]          # rows: negative, then positive
        progress = 1.0 - t / 999.0
        real = uncond + 10.0 * (cond - uncond)
        mimicked = uncond + 7.0 * (cond - uncond)
        expected = real * progress + mimicked * (1.0 - progress)
        assert torch.allclose(pred, expected, atol=1e-5, rtol=1e-5)
        assert progress == 1.0 or not torch.allclose(pred, real, atol=1e-5, rtol=1e-5)


def test_adaptive_cfg_below_the_scale_changes_the_image(pipeline):
    pipeline(mm.Policy.RESIDENT)
    plain = pipelines.process_request({**PLAIN, "guidance_scale": 5.0, "adaptive_cfg": 5.0})
    mimicked = pipelines.process_request({**PLAIN, "guidance_scale": 5.0, "adaptive_cfg": 1.0})
    assert not np.array_equal(pixels(plain.images[0]), pixels(mimicked.images[0]))


def _encoders(tiny_components):
    from ldm_patched.modules.checkpoint import load_tokenizers
    from ldm_patched.modules.model_patcher import ModelPatcher

    encoders = core.SDXLTextEncoders(tiny_components["text_encoder"], tiny_components["text_encoder_2"])
    return ModelPatcher(encoders, torch.device("cpu"), torch.device("cpu"), name="clip"), load_tokenizers()


@pytest.mark.parametrize("skip", [1, 2, 3])
def test_clip_skip_picks_the_hidden_layer_of_both_encoders(pipeline, tiny_components, skip):
    """Oracle: transformers' own hidden states. A skip past the first layer (3 of the tiny
    encoders' 2) is the final normed output, as upstream; the pooled output never changes."""
    pipeline(mm.Policy.RESIDENT)
    clip, tokenizers = _encoders(tiny_components)
    cond = core.encode_prompt(clip, tokenizers, "a cat", clip_skip=skip)
    states = []
    with torch.inference_mode():
        for tokenizer, encoder in zip(tokenizers, (tiny_components["text_encoder"], tiny_components["text_encoder_2"])):
            ids = torch.tensor([tokenizer("a cat", padding="max_length", max_length=77).input_ids])
            out = encoder(ids, output_hidden_states=True)
            states.append(out.last_hidden_state if skip > encoder.config.num_hidden_layers
                          else out.hidden_states[-skip])
        pooled = out.text_embeds
    assert torch.allclose(cond.embeds, torch.cat(states, dim=-1), atol=1e-6)
    assert torch.allclose(cond.pooled, pooled, atol=1e-6)


def test_clip_skip_changes_the_image_and_is_part_of_the_conditioning_cache_key(pipeline):
    pipeline(mm.Policy.RESIDENT)
    default = pipelines.process_request(dict(SMALL))
    skip_one = pipelines.process_request({**SMALL, "clip_skip": 1})
    again = pipelines.process_request({**SMALL, "clip_skip": 2})
    assert skip_one.report["model_management"]["text_encodes"] == 2     # not served from clip_skip 2's cache
    assert again.report["model_management"]["text_encodes"] == 0
    assert not np.array_equal(pixels(default.images[0]), pixels(skip_one.images[0]))
    assert np.array_equal(pixels(default.images[0]), pixels(again.images[0]))


def test_overwrite_switch_is_the_refiner_switch_step(pipeline, tiny_refiner_checkpoint):
    folders = pipeline(mm.Policy.RESIDENT)
    shutil.copy(tiny_refiner_checkpoint, folders["checkpoints"] / "refiner.safetensors")
    request = {**SMALL, "steps": 2, "refiner_model": "refiner.safetensors", "refiner_switch": 0.5}
    by_fraction = pipelines.process_request(dict(request))
    by_step = pipelines.process_request({**request, "refiner_switch": 0.9, "overwrite_switch": 1})
    never = pipelines.process_request({**request, "overwrite_switch": 2})
    alone = pipelines.process_request({**SMALL, "steps": 2})
    assert np.array_equal(pixels(by_fraction.images[0]), pixels(by_step.images[0]))
    assert np.array_equal(pixels(never.images[0]), pixels(alone.images[0]))
    assert not np.array_equal(pixels(by_fraction.images[0]), pixels(alone.images[0]))


def test_requests_batch_together_when_their_refiner_switch_step_is_the_same(pipeline, tiny_refiner_checkpoint):
    """The batch key holds the switch step, however it was asked for (a fraction or overwrite_switch)."""
    folders = pipeline(mm.Policy.RESIDENT)
    shutil.copy(tiny_refiner_checkpoint, folders["checkpoints"] / "refiner.safetensors")
    request = {**SMALL, "steps": 4, "refiner_model": "refiner.safetensors", "refiner_switch": 0.5}
    key = pipelines.current().batch_key
    assert key(dict(request)) is not None
    assert key(dict(request)) == key({**request, "refiner_switch": 0.9, "overwrite_switch": 2})
    assert key(dict(request)) != key({**request, "overwrite_switch": 3})


def test_disable_preview_sends_no_step_previews(pipeline):
    pipeline(mm.Policy.RESIDENT)
    _, shown = _events(dict(SMALL))
    _, hidden = _events({**SMALL, "disable_preview": True})
    assert any(e.preview is not None for e in shown)
    assert [e.preview for e in hidden if e.stage == "sampling"] and all(e.preview is None for e in hidden)


def test_disable_intermediate_results_announces_images_only_at_the_end(pipeline, monkeypatch):
    """The first image's file is written before the second image samples (the progress of
    image 2 waits for it): plain requests announce it then, this one only at the end."""
    pipeline(mm.Policy.RESIDENT)
    pipelines.use_max_batch(monkeypatch, 1)
    written = threading.Event()
    real_save = default_pipeline.save_image

    def save(*args, **kwargs):
        saved = real_save(*args, **kwargs)
        written.set()
        return saved
    monkeypatch.setattr(default_pipeline, "save_image", save)

    def run(request):
        written.clear()
        events = []

        def on_progress(event):
            if event.stage == "sampling" and event.image_index == 1:
                assert written.wait(timeout=60)
            events.append(event)
        result = pipelines.process_request(request, None, on_progress)
        assert len(result.images) == 2
        end = next(i for i, e in enumerate(events) if e.message == "Saving images")
        return [i < end for i, e in enumerate(events) if e.image is not None]

    assert True in run({**SMALL, "image_number": 2})
    assert run({**SMALL, "image_number": 2, "disable_intermediate_results": True}) == [False, False]


def test_black_out_nsfw_is_refused_naming_the_field(pipeline):
    pipeline(mm.Policy.RESIDENT)
    result = pipelines.process_request({**SMALL, "black_out_nsfw": True})
    assert "black_out_nsfw" in result.report["error"] and not result.images
    assert "error" not in pipelines.process_request({**SMALL, "black_out_nsfw": False}).report


def test_generate_image_grid_adds_the_batch_as_one_more_image(pipeline):
    """Upstream's wall: ceil(sqrt(n)) columns, rows as needed, row by row, empty cells black;
    the grid is in the temp folder without metadata; one image or the default: no grid."""
    folders = pipeline(mm.Policy.RESIDENT)
    three = pipelines.process_request({**SMALL, "image_number": 3, "width": 64, "height": 72,
                                       "generate_image_grid": True})
    assert len(three.images) == 4 and three.report["seeds"] == [7, 8, 9]
    grid = pixels(three.images[3])
    assert grid.shape == (144, 128, 3)   # 2 rows, 2 columns of 64x72
    cells = [grid[:72, :64], grid[:72, 64:], grid[72:, :64]]
    assert all(np.array_equal(cell, pixels(path)) for cell, path in zip(cells, three.images))
    assert not grid[72:, 64:].any()
    assert three.report["image_grid"] == {"image": three.report["images"][3], "rows": 2, "columns": 2,
                                          "size": [128, 144]}
    assert "parameters" not in Image.open(three.images[3]).info
    assert folders["outputs"] not in Path(three.images[3]).parents
    two = pipelines.process_request({**SMALL, "image_number": 2, "generate_image_grid": True})
    assert Image.open(two.images[2]).size == (128, 64)   # 1 row, 2 columns
    for plain in ({**SMALL, "image_number": 2}, {**SMALL, "generate_image_grid": True}):
        result = pipelines.process_request(plain)
        assert len(result.images) == plain.get("image_number", 1) and "image_grid" not in result.report


@pytest.mark.parametrize("field, value", [("adaptive_cfg", 0.5), ("clip_skip", 13), ("overwrite_step", 0),
                                          ("overwrite_switch", 201), ("refiner_swap_method", "both"),
                                          ("freeu_b1", 2.5), ("freeu_s1", 4.5), ("freeu_s2", -0.1),
                                          ("disable_preview", "yes")])
def test_bad_debug_values_name_the_field(field, value):
    with pytest.raises(RequestError, match=field):
        GenerationRequest.from_dict({**SMALL, field: value}, config.get_config())


# -- FreeU ---------------------------------------------------------------------------------

FREEU = {"freeu_enabled": True, "freeu_b1": 1.01, "freeu_b2": 1.5, "freeu_s1": 0.99, "freeu_s2": 0.5}


def test_freeu_skip_factors_go_to_four_as_upstream_sliders():
    request = GenerationRequest.from_dict({**SMALL, **FREEU, "freeu_s1": 3.0, "freeu_s2": 4.0}, config.get_config())
    assert request.freeu == (1.01, 1.5, 3.0, 4.0)


def test_freeu_formulas_against_numpy():
    """FreeU_V2's structure scaling and the low-frequency filter, recomputed with numpy."""
    from modules import freeu

    generator = torch.Generator().manual_seed(0)
    h = torch.randn(2, 4, 6, 6, generator=generator)
    mean = h.numpy().mean(axis=1, keepdims=True)
    low = mean.reshape(2, -1).min(axis=1).reshape(2, 1, 1, 1)
    high = mean.reshape(2, -1).max(axis=1).reshape(2, 1, 1, 1)
    expected = h.numpy().copy()
    expected[:, :2] *= 1 + (1.4 - 1) * (mean - low) / (high - low)
    assert np.allclose(freeu.scale_backbone(h, 1.4).numpy(), expected, atol=1e-6)

    spectrum = np.fft.fftshift(np.fft.fft2(h.numpy()), axes=(-2, -1))
    spectrum[..., 2:4, 2:4] *= 0.3                   # the 2x2 window at the centre (6 // 2 +- 1)
    expected = np.fft.ifft2(np.fft.ifftshift(spectrum, axes=(-2, -1))).real
    assert np.allclose(freeu.fourier_filter(h, 0.3).numpy(), expected, atol=1e-5)


def test_freeu_hooks_the_decoder_blocks_by_backbone_channels(tiny_components):
    """The tiny UNet's first channel count is 32: (b2, s2) act where the backbone has 64
    channels (the first decoder block's 3 ResNets, the second's first), (b1, s1) nowhere."""
    from modules import freeu

    unet = tiny_components["unet"]
    resnets = [r for block in unet.up_blocks for r in block.resnets]
    with freeu.applied(unet, freeu.FreeU(1.1, 1.2, 0.9, 0.8)):
        assert freeu.active(unet)
        hooked = [bool(r._forward_pre_hooks) for r in resnets]
    assert hooked == [True, True, True, True, False, False]
    assert not freeu.active(unet) and not any(r._forward_pre_hooks for r in resnets)


def test_freeu_changes_pixels_and_leaves_later_requests_as_they_were(pipeline):
    pipeline(mm.Policy.RESIDENT)
    before = pipelines.process_request(dict(SMALL))
    with_freeu = pipelines.process_request({**SMALL, **FREEU})
    after = pipelines.process_request(dict(SMALL))
    assert not np.array_equal(pixels(before.images[0]), pixels(with_freeu.images[0]))
    assert np.array_equal(pixels(before.images[0]), pixels(after.images[0]))
    moved = with_freeu.report["model_management"]
    assert (moved["weights_patched"], moved["models_loaded"]) == (0, 0)   # a forward-time change only
    neutral = pipelines.process_request({**SMALL, **FREEU, "freeu_b2": 1.0, "freeu_s2": 1.0})
    assert pipelines.max_difference(before.images[0], neutral.images[0]) <= 1   # b = s = 1: FFT rounding only


def test_freeu_runs_eager_beside_the_compiled_unet(pipeline, use_compiler):
    pipeline(mm.Policy.RESIDENT)
    use_compiler(enabled=True, backend="aot_eager")
    before = pipelines.process_request(dict(SMALL))
    with_freeu = pipelines.process_request({**SMALL, **FREEU})
    after = pipelines.process_request(dict(SMALL))
    assert before.report["compile"]["ran_compiled"] and after.report["compile"]["ran_compiled"]
    assert with_freeu.report["compile"]["compiled_calls"] == 0
    assert with_freeu.report["compile"]["freeu_eager_calls"] == 3
    assert after.report["compile"]["graphs_compiled"] == 0
    assert np.array_equal(pixels(before.images[0]), pixels(after.images[0]))
    assert not np.array_equal(pixels(before.images[0]), pixels(with_freeu.images[0]))


# -- refiner swap methods -------------------------------------------------------------------

@pytest.fixture
def with_refiner(pipeline, tiny_refiner_checkpoint):
    folders = pipeline(mm.Policy.RESIDENT)
    shutil.copy(tiny_refiner_checkpoint, folders["checkpoints"] / "refiner.safetensors")
    return {**SMALL, "steps": 4, "refiner_model": "refiner.safetensors", "refiner_switch": 0.5}


def test_separate_swap_is_joint_for_a_one_step_sampler_and_restarts_a_multistep_one(with_refiner):
    """Upstream's separate swap runs a second sampler from the switch on the same schedule,
    without new noise: Euler keeps no state between steps, so it is the joint run; DPM++ 2M's
    history starts over at the switch, so its image changes."""
    images = {}
    for sampler in ("euler", "dpmpp_2m"):
        for swap in ("joint", "separate"):
            result = pipelines.process_request({**with_refiner, "sampler": sampler, "refiner_swap_method": swap})
            assert result.report["unet_calls"] == 4
            images[sampler, swap] = pixels(result.images[0])
    assert np.array_equal(images["euler", "joint"], images["euler", "separate"])
    assert not np.array_equal(images["dpmpp_2m", "joint"], images["dpmpp_2m", "separate"])


def test_vae_swap_passes_the_sdxl_latents_on_without_a_vae_round_trip(with_refiner, monkeypatch):
    """Upstream drops an SDXL refiner's VAE (the latent space is the base's): its vae swap
    converts nothing, only SD 1.5 refiners (not supported here) go through an interposer."""
    calls = []
    for name in ("decode", "encode"):
        real = getattr(core, name)
        monkeypatch.setattr(core, name, lambda *args, _real=real, _name=name, **kw: (calls.append(_name),
                                                                                     _real(*args, **kw))[1])
    joint = pipelines.process_request(dict(with_refiner))
    vae = pipelines.process_request({**with_refiner, "refiner_swap_method": "vae"})
    assert calls == [] and vae.report["unet_calls"] == 4
    assert not np.array_equal(pixels(joint.images[0]), pixels(vae.images[0]))
    alone = pipelines.process_request({**SMALL, "steps": 4, "refiner_swap_method": "vae"})
    assert "error" not in alone.report   # no refiner: nothing to swap


@pytest.mark.parametrize("sampler, scheduler", [("euler", "normal"), ("dpmpp_2m", "karras")])
def test_vae_swap_goes_on_at_upstreams_scaled_noise_levels_with_the_base_noise_mean(
        with_refiner, monkeypatch, sampler, scheduler):
    """Upstream's vae swap: the refiner samples the rest of the schedule with every sigma
    times 1.4 (its k_sigmas; the UNet's timestep the nearest training one in log-sigma), from
    the base's x0 noised with fresh noise whose channel mean is the base's last prediction's."""
    calls, preds, renoised = [], [], []
    real_unet, real_step, real_noised = core.UNET_COMPILER, core._InFlight.step, core._noised

    class Spy:
        def __call__(self, unet, sample, t, *rest):
            calls.append(float(t))
            return real_unet(unet, sample, t, *rest)

        def __getattr__(self, name):
            return getattr(real_unet, name)

    def step(self, pred, *rest):
        preds.append(pred.clone())
        return real_step(self, pred, *rest)

    def noised(sched, init, noise, t):
        out = real_noised(sched, init, noise, t)
        renoised.append((init.clone(), noise.clone(), out.clone()))
        return out

    monkeypatch.setattr(core, "UNET_COMPILER", Spy())
    monkeypatch.setattr(core._InFlight, "step", step)
    monkeypatch.setattr(core, "_noised", noised)
    result = pipelines.process_request({**with_refiner, "sampler": sampler, "scheduler": scheduler,
                                        "refiner_swap_method": "vae"})
    assert "error" not in result.report and len(calls) == 4 and len(renoised) == 1

    schedule = core.make_scheduler(sampler, scheduler)
    schedule.set_timesteps(4)
    sigmas = schedule.sigmas.double().numpy()
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
    alphas = np.cumprod(1.0 - betas)
    training = np.log(np.sqrt((1 - alphas) / alphas))
    assert calls[:2] == [float(t) for t in schedule.timesteps[:2]]          # the base as scheduled
    assert calls[2:] == [float(np.abs(training - np.log(1.4 * s)).argmin()) for s in sigmas[2:4]]

    clean, noise, out = renoised[0]
    assert torch.allclose(noise.mean(dim=1), preds[1].mean(dim=1), atol=1e-5)   # the last base step's
    level = 1.4 * sigmas[2]
    if sampler == "euler":       # x + sigma * n
        assert torch.allclose(out, clean + level * noise, atol=1e-4)
    else:                        # DPM-Solver's variance-preserving form of the same level
        alpha = 1 / np.sqrt(1 + level ** 2)
        assert torch.allclose(out, alpha * clean + alpha * level * noise, atol=1e-4)


@pytest.mark.parametrize("sampler", ["uni_pc", "heun"])
def test_vae_swap_with_samplers_whose_step_takes_no_generator(with_refiner, sampler):
    """UniPC (its levels scaled) and Heun (second order: two UNet calls a step, its own
    levels) step without a generator; both sample, the refiner taking over where step 2
    begins, and differ from the joint swap."""
    request = {**with_refiner, "sampler": sampler, "scheduler": "karras"}
    joint = pipelines.process_request(dict(request))
    vae = pipelines.process_request({**request, "refiner_swap_method": "vae"})
    assert "error" not in joint.report and "error" not in vae.report, (joint.report.get("error"),
                                                                      vae.report.get("error"))
    assert not np.array_equal(pixels(joint.images[0]), pixels(vae.images[0]))
