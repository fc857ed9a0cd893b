"""Image to image in core.sample (init latents + denoise), masked latent inpainting, and
core.encode, on the tiny random SDXL."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from ldm_patched.modules import model_management as mm
from ldm_patched.modules.model_patcher import ModelPatcher
from modules import core

WIDTH = HEIGHT = 64
CPU = torch.device("cpu")


@pytest.fixture
def models(tiny_components):
    """(unet patcher, vae patcher) under a conservative CPU manager."""
    budget = 10 * 1024 ** 3
    mm.configure(mm.MemorySettings(policy=mm.Policy.CONSERVATIVE, budget_bytes=budget, total_bytes=budget))
    yield (ModelPatcher(tiny_components["unet"], CPU, CPU, name="unet"),
           ModelPatcher(tiny_components["vae"], CPU, CPU, name="vae"))
    mm.get_manager().unload_all()


def stage(unet: ModelPatcher) -> core.UNetStage:
    config = unet.model.config
    generator = torch.Generator().manual_seed(7)
    pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    positive = core.Conditioning(embeds=torch.randn(1, 77, config.cross_attention_dim, generator=generator),
                                 pooled=torch.randn(1, pooled, generator=generator))
    return core.UNetStage(unet, positive, None)


def run(unet, vae, sampler="euler", scheduler="normal", steps=3, **kwargs) -> torch.Tensor:
    shape = core.latent_shape(unet, vae, WIDTH, HEIGHT)
    return core.sample([stage(unet)], sampler=sampler, scheduler=scheduler, steps=steps, cfg=1.0,
                       width=WIDTH, height=HEIGHT, seed=1234, shape=shape, **kwargs)


class Timesteps:
    """Records the timestep of every UNet call."""

    def __init__(self, unet: torch.nn.Module) -> None:
        self.seen: list[float] = []
        self.handle = unet.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        self.seen.append(float(torch.as_tensor(t).flatten()[0]))

    def __enter__(self) -> "Timesteps":
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


def init_latents(vae: ModelPatcher) -> torch.Tensor:
    pixels = np.random.default_rng(3).integers(0, 256, (HEIGHT, WIDTH, 3), dtype=np.uint8)
    return core.encode(vae, pixels)


def test_without_init_the_loop_is_todays_text_to_image(models):
    unet, vae = models
    shape = core.latent_shape(unet, vae, WIDTH, HEIGHT)
    sched = core.make_scheduler("euler", "normal")   # today's loop, written out
    sched.set_timesteps(3)
    generator = torch.Generator("cpu").manual_seed(1234)
    latents = torch.randn(shape, generator=generator) * sched.init_noise_sigma
    with torch.inference_mode():
        for t in sched.timesteps:
            pred = core._predict(stage(unet), sched, latents, t, 1.0, WIDTH, HEIGHT)
            latents = sched.step(pred, t, latents, generator=generator).prev_sample
    assert torch.equal(run(unet, vae), latents)
    assert torch.equal(run(unet, vae, denoise=1.0), latents)


@pytest.mark.parametrize("sampler,scheduler", [("euler", "normal"), ("euler_ancestral", "normal"),
                                               ("dpmpp_2m", "karras"), ("lcm", "lcm")])
def test_denoise_keeps_the_last_steps_of_the_longer_schedule(models, sampler, scheduler):
    """Oracle: diffusers' SDXL img2img get_timesteps on the schedule of int(steps/denoise)
    steps, with a strength that keeps exactly `steps` of them."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    unet, vae = models
    steps, denoise = 3, 0.4
    total = int(steps / denoise)
    peer = core.make_scheduler(sampler, scheduler)
    peer.set_timesteps(total)
    expected, count = StableDiffusionXLImg2ImgPipeline.get_timesteps(
        SimpleNamespace(scheduler=peer), total, (steps + 0.5) / total, "cpu")
    assert count == steps
    with Timesteps(unet.model) as calls:
        run(unet, vae, sampler=sampler, scheduler=scheduler, steps=steps,
            init_latents=init_latents(vae), denoise=denoise)
    assert calls.seen == [float(t) for t in expected]
    assert core.kept_schedule(steps, denoise) == (7, 4) and core.kept_schedule(steps, 1.0) == (3, 0)


def test_small_denoise_stays_near_the_init_and_large_does_not(models):
    """Measured on the latents: the tiny random VAE's decoder saturates (its latents are
    ~0.05 in size, so any change decodes to a far-off image); the decoded images are
    still ordered the same way."""
    unet, vae = models
    init = init_latents(vae)
    reference = core.decode(vae, init, WIDTH, HEIGHT).astype(float)

    def distances(denoise: float) -> tuple[float, float]:
        out = run(unet, vae, steps=2, init_latents=init, denoise=denoise)
        pixels = core.decode(vae, out, WIDTH, HEIGHT).astype(float)
        return float((out - init).abs().mean()), float(np.abs(pixels - reference).mean())

    (near, near_px), (far, far_px) = distances(0.1), distances(1.0)
    assert near < 0.25 * far, (near, far)
    assert near_px < far_px


@pytest.mark.parametrize("sampler,scheduler", [("euler", "normal"), ("lcm", "lcm")])
def test_inpainting_keeps_init_latents_exactly_outside_the_mask(models, sampler, scheduler):
    unet, vae = models
    init = init_latents(vae)
    mask = torch.zeros(1, 1, *init.shape[-2:])
    mask[..., :, : init.shape[-1] // 2] = 1.0            # repaint the left half
    seen = []
    out = run(unet, vae, sampler=sampler, scheduler=scheduler, init_latents=init, denoise=0.6, mask=mask,
              callback=lambda step, steps, x0: seen.append(step))
    keep = mask.expand_as(init) == 0
    assert torch.equal(out[keep], init[keep])
    assert not torch.allclose(out[~keep], init[~keep])
    assert seen == [1, 2, 3]


def test_bad_img2img_arguments_are_refused(models):
    unet, vae = models
    init = init_latents(vae)
    with pytest.raises(ValueError, match="denoise"):
        run(unet, vae, init_latents=init, denoise=0.0)
    with pytest.raises(ValueError, match="needs init_latents"):
        run(unet, vae, mask=torch.ones(1, 1, 8, 8))
    with pytest.raises(ValueError, match="init_latents has shape"):
        run(unet, vae, init_latents=init[..., :4], denoise=0.5)


def test_encode_then_decode_keeps_the_size_and_crops_to_multiples_of_8(models):
    _, vae = models
    latents = core.encode(vae, np.zeros((48, 64, 3), dtype=np.uint8))
    assert latents.shape == (1, 4, 6, 8)
    assert core.decode(vae, latents, 64, 48).shape == (48, 64, 3)
    assert core.encode(vae, np.zeros((53, 70, 3), dtype=np.uint8)).shape == (1, 4, 6, 8)
    names = [m["name"] for m in mm.get_manager().status()["models"]]
    assert "vae" in names                                  # loaded through the registry, as decode is


def test_large_images_go_through_the_vae_in_tiles_of_the_same_result_size(models, monkeypatch):
    _, vae = models
    monkeypatch.setattr(core, "VAE_TILE_ABOVE", 32 * 32)   # "large" at this tiny size
    monkeypatch.setattr(core, "VAE_TILE", 32)
    monkeypatch.setattr(core, "VAE_TILE_OVERLAP", 16)
    passes = []

    def decode(self, z, return_dict=False):   # a constant image: blending must give it back unchanged
        passes.append(tuple(z.shape[-2:]))
        return (torch.full((z.shape[0], 3, z.shape[2] * 8, z.shape[3] * 8), 0.5),)
    monkeypatch.setattr(type(vae.model), "decode", decode)
    pixels = core.decode(vae, torch.zeros(1, 4, 6, 10), 80, 48)
    assert pixels.shape == (48, 80, 3) and (pixels == round(0.75 * 255)).all()
    assert len(passes) > 1 and set(passes) == {(4, 4)}   # tiles of 32 px, none thinner
    small = core.encode(vae, np.zeros((32, 32, 3), dtype=np.uint8))   # not over the threshold: one pass
    assert small.shape == (1, 4, 4, 4)
