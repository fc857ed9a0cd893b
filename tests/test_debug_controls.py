"""Upstream's Developer Debug Mode sampling controls, one small test each, on the tiny models."""

import json
import shutil
import threading

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


@pytest.mark.parametrize("field, value", [("adaptive_cfg", 0.5), ("clip_skip", 13), ("overwrite_step", 0),
                                          ("overwrite_switch", 201), ("refiner_swap_method", "both"),
                                          ("freeu_b1", 2.5), ("disable_preview", "yes")])
def test_bad_debug_values_name_the_field(field, value):
    with pytest.raises(RequestError, match=field):
        GenerationRequest.from_dict({**SMALL, field: value}, config.get_config())
