"""modules/samplers: upstream's k-diffusion samplers and its extra noise schedules.

Oracles: diffusers' own schedulers on the same sigmas (LMS, Heun, EDM), the exact
solution of the probability-flow ODE for Gaussian data (whose denoiser is known in closed
form: a solver of order p must converge to it at that order; a stochastic sampler must
end with the data's mean and spread), the published Heun++ weights applied to a slope
that does not depend on x, and the published schedule numbers.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch

from modules import core, samplers

MU, SPREAD = 0.3, 0.5   # the Gaussian "data": every latent element ~ N(MU, SPREAD^2)


def gaussian_denoiser(x: torch.Tensor, sigma: float) -> torch.Tensor:
    return (SPREAD ** 2 * x + sigma ** 2 * MU) / (SPREAD ** 2 + sigma ** 2)


def exact_flow(x: torch.Tensor, sigma_from: float, sigma_to: float) -> torch.Tensor:
    """The probability-flow ODE's solution for Gaussian data."""
    return MU + (x - MU) * math.sqrt((SPREAD ** 2 + sigma_to ** 2) / (SPREAD ** 2 + sigma_from ** 2))


def drive(sched, x: torch.Tensor, denoiser=gaussian_denoiser, seed: int = 0,
          calls_left: int = 0) -> tuple[torch.Tensor, int]:
    """core.sample's calls, with `denoiser` as the model (eps-prediction at the pending sigma);
    `calls_left` stops that many calls early (x is then the point of the next call)."""
    generator = torch.Generator().manual_seed(seed)
    calls = 0
    timesteps = sched.timesteps[:len(sched.timesteps) - calls_left] if calls_left else sched.timesteps
    for t in timesteps:   # an adaptive sampler's timesteps grow while it runs
        sigma = sched.asked[-1]
        eps = (x - denoiser(x, sigma)) / sigma
        x = sched.step(eps, t, x, generator=generator).prev_sample
        calls += 1
    return x, calls


def noise(seed: int = 3, size: int = 32) -> torch.Tensor:
    return torch.randn(1, 4, size, size, generator=torch.Generator().manual_seed(seed))


def ksampler(name: str, scheduler: str = "karras", steps: int = 12) -> samplers.KSamplerScheduler:
    sched = core.make_scheduler(name, scheduler)
    sched.set_timesteps(steps)
    return sched


def solve_error(name: str, steps: int) -> float:
    sched = ksampler(name, steps=steps)
    start = noise() * sched.sigmas[0]
    end = sched.sigmas[-2] if name.startswith("dpm_") else 0.0   # the DPM-Solvers stop at the last nonzero sigma
    out, _ = drive(sched, start)
    return float((out - exact_flow(start, sched.sigmas[0], end)).abs().max())


def peer_toy_model(model_input: torch.Tensor) -> torch.Tensor:
    """A nonlinear eps 'model' of the scaled input alone, so two schedulers that scale alike agree."""
    return torch.tanh(1.3 * model_input) + 0.1 * model_input


def run_peer(sched, x: torch.Tensor, generator_kw: bool = True) -> torch.Tensor:
    for t in sched.timesteps:
        eps = peer_toy_model(sched.scale_model_input(x, t))
        x = sched.step(eps, t, x, **({"generator": None} if generator_kw else {})).prev_sample
    return x


# -- samplers against diffusers ------------------------------------------------------------

def test_lms_steps_like_diffusers_lms_scheduler_on_the_same_sigmas():
    from diffusers import LMSDiscreteScheduler

    ours = ksampler("lms", "normal", steps=10)
    peer = LMSDiscreteScheduler(**core.SDXL_SCHEDULE)
    peer.set_timesteps(10)
    np.testing.assert_allclose(ours.sigmas, peer.sigmas.numpy(), rtol=1e-6)
    start = noise() * ours.sigmas[0]
    torch.testing.assert_close(run_peer(ours, start), run_peer(peer, start, generator_kw=False),
                               rtol=1e-5, atol=1e-5)


def test_restart_below_20_steps_is_heun_like_diffusers_heun_scheduler():
    from diffusers import HeunDiscreteScheduler

    ours = ksampler("restart", "karras", steps=8)
    peer = HeunDiscreteScheduler(**{**core.SDXL_SCHEDULE, "use_karras_sigmas": True})
    peer.set_timesteps(8)
    assert len(ours.timesteps) == len(peer.timesteps) == 15          # Heun twice a step, Euler at the end
    start = noise() * ours.sigmas[0]
    torch.testing.assert_close(run_peer(ours, start), run_peer(peer, start, generator_kw=False),
                               rtol=1e-5, atol=1e-5)


# -- samplers against the Gaussian's exact flow ---------------------------------------------

def test_dpm_fast_spends_one_call_per_step_and_converges_at_third_order():
    sched = ksampler("dpm_fast", steps=12)
    _, calls = drive(sched, noise() * sched.sigmas[0])
    assert calls == len(sched.timesteps) == 12
    coarse, fine = solve_error("dpm_fast", 12), solve_error("dpm_fast", 24)
    assert fine < 5e-3 and coarse / fine > 6, (coarse, fine)


def test_lms_converges_at_higher_order_than_heunpp2():
    lms_coarse, lms_fine = solve_error("lms", 12), solve_error("lms", 24)
    heun_coarse, heun_fine = solve_error("heunpp2", 12), solve_error("heunpp2", 24)
    assert lms_coarse / lms_fine > 4 and lms_fine < 1e-2, (lms_coarse, lms_fine)
    assert lms_fine < heun_fine < heun_coarse


def test_dpm_adaptive_uses_only_the_end_sigmas_and_meets_its_tolerance():
    def adaptive(sigmas: list[float]) -> samplers.KSamplerScheduler:
        sched = core.make_scheduler("dpm_adaptive", "karras")
        sched.schedule = lambda steps: sigmas
        sched.set_timesteps(len(sigmas) - 1)
        return sched

    short, long = adaptive([14.6, 1.0, 0.03, 0.0]), adaptive([14.6, 9.0, 5.0, 2.0, 0.5, 0.03, 0.0])
    start = noise() * 14.6
    a, calls = drive(short, start)
    b, _ = drive(long, start)
    assert torch.equal(a, b)                    # the same first and last nonzero sigma
    assert calls % 3 == 0 and calls == len(short.timesteps) == len(short.asked) > 6
    exact = exact_flow(start, 14.6, 0.03)
    assert float((a - exact).abs().max()) < 0.1 * float(exact.abs().max())
    # image to image keeping one step of a Karras schedule: its first sigma is its last, so no
    # call at all, and the loop's start is the init at that noise level (upstream returns it)
    idle = core.make_scheduler("dpm_adaptive", "karras")
    timesteps = core._start_at(idle, 4, 3, "cpu")
    ones = torch.ones(1, 4, 2, 2)
    assert len(timesteps) == 0 and torch.equal(idle.add_noise(0 * ones, ones, timesteps[0]), ones * idle.sigmas[0])


def test_dpmpp_2s_without_noise_is_second_order_and_with_it_ends_on_the_data_distribution():
    """Measured at the last nonzero sigma: the final step to 0 is Euler (first order)."""
    deterministic = functools.partial(samplers.dpmpp_2s_ancestral, eta=0.0)
    errors = []
    for steps in (12, 24):
        sched = ksampler("dpmpp_2s_ancestral", steps=steps)
        sched.algorithm = deterministic
        sched.set_timesteps(steps)
        assert len(sched.timesteps) == 2 * steps - 1
        start = noise() * sched.sigmas[0]
        out, _ = drive(sched, start, calls_left=1)
        errors.append(float((out - exact_flow(start, sched.sigmas[0], sched.sigmas[-2])).abs().max()))
    assert errors[0] / errors[1] > 3, errors
    sched = ksampler("dpmpp_2s_ancestral", steps=24)
    out, _ = drive(sched, noise(size=64) * sched.sigmas[0])
    assert abs(float(out.mean()) - MU) < 0.02 and abs(float(out.std()) / SPREAD - 1) < 0.03
    again, _ = drive(ksampler("dpmpp_2s_ancestral", steps=24), noise(size=64) * sched.sigmas[0])
    other, _ = drive(ksampler("dpmpp_2s_ancestral", steps=24), noise(size=64) * sched.sigmas[0], seed=1)
    assert torch.equal(out, again) and not torch.equal(out, other)   # its noise comes from the request's seed


@pytest.mark.parametrize("steps,calls,restarts", [(20, 39, 1), (36, 71, 2)])
def test_restart_from_20_steps_restarts_from_0_1_to_2_and_keeps_the_distribution(steps, calls, restarts):
    """Upstream's rule: Karras over (steps - 9 * times) steps, then a 10-point Karras segment
    from 2 down to 0.1 run `times` times (9 steps each; 36+ steps: steps // 4, twice)."""
    sched = ksampler("restart", "normal", steps=steps)
    out, made = drive(sched, noise(size=64) * sched.init_noise_sigma)
    assert made == calls
    jumps = [(a, b) for a, b in zip(sched.asked, sched.asked[1:]) if b > 1.5 * a]
    assert len(jumps) == restarts
    assert all(abs(a - 0.1) < 0.05 and abs(b - 2.0) < 0.3 for a, b in jumps), jumps
    assert abs(float(out.mean()) - MU) < 0.02 and abs(float(out.std()) / SPREAD - 1) < 0.03


def test_heunpp2_weights_the_slopes_as_published():
    """With a slope g(sigma) that does not depend on x, Heun++ moves x by
    sum_i (w1 g_i + w2 g_i+1 + w3 g_i+2) dt_i, w2 = s_i+1 / 3 s_0, w3 = s_i+2 / 3 s_0,
    w1 = 1 - w2 - w3; Heun (w = s_i+1 / 2 s_0) on the second-last step, Euler on the last."""
    slope = lambda s: s ** 2 + 0.5   # noqa: E731
    sched = ksampler("heunpp2", "karras", steps=7)
    s = sched.sigmas
    expected = 0.0
    for i in range(len(s) - 1):
        dt = s[i + 1] - s[i]
        if i == len(s) - 2:
            move = slope(s[i])
        elif i == len(s) - 3:
            w2 = s[i + 1] / (2 * s[0])
            move = (1 - w2) * slope(s[i]) + w2 * slope(s[i + 1])
        else:
            w2, w3 = s[i + 1] / (3 * s[0]), s[i + 2] / (3 * s[0])
            move = (1 - w2 - w3) * slope(s[i]) + w2 * slope(s[i + 1]) + w3 * slope(s[i + 2])
        expected += move * dt
    start = noise() * s[0]
    out, calls = drive(sched, start, denoiser=lambda x, sigma: x - sigma * slope(sigma))
    assert calls == 3 * 5 + 2 + 1
    torch.testing.assert_close(out, start + expected, rtol=1e-5, atol=1e-4)


# -- schedules -----------------------------------------------------------------------------

def test_ddim_uniform_takes_every_nth_training_sigma_as_diffusers_leading_spacing_does():
    """Where 1000 is a multiple of the steps, upstream's ddim_uniform and diffusers' 'leading'
    spacing (steps_offset 1) pick the same training timesteps; 30 steps give 31 (stride 33)."""
    from diffusers import EulerDiscreteScheduler

    table = samplers.training_sigmas(EulerDiscreteScheduler(**core.SDXL_SCHEDULE).alphas_cumprod)
    for steps in (10, 25):
        leading = EulerDiscreteScheduler(**core.SDXL_SCHEDULE)
        leading.set_timesteps(steps)
        ours = ksampler("lms", "ddim_uniform", steps=steps)
        np.testing.assert_allclose(ours.sigmas, leading.sigmas.numpy(), rtol=1e-5)
    thirty = ksampler("lms", "ddim_uniform", steps=30)
    assert len(thirty.sigmas) == 32 and thirty.sigmas[0] == pytest.approx(table[991]) and thirty.sigmas[-1] == 0
    assert thirty.timesteps[0] == 991 and thirty.timesteps[-1] == 1


def test_align_your_steps_is_nvidias_sdxl_schedule_interpolated_in_log_sigma():
    published = [14.6146412293, 6.3184485287, 3.7681790315, 2.1811480769, 1.3405244945, 0.8620721141,
                 0.5550693289, 0.3798540708, 0.2332364134, 0.1114188177]
    ten = ksampler("lms", "align_your_steps", steps=10).sigmas
    assert ten == pytest.approx(published + [0.0], rel=1e-9)
    twenty = ksampler("lms", "align_your_steps", steps=20).sigmas
    assert twenty[:-1:2] == pytest.approx(published, rel=1e-9)                 # the knots stay
    between = [math.sqrt(a * b) for a, b in zip(published, published[1:] + [0.0291671582])]
    assert twenty[1:-1:2] == pytest.approx(between, rel=1e-9) and twenty[-1] == 0   # geometric midpoints


def test_edm_playground_is_diffusers_edm_karras_schedule_and_preconditioning():
    from diffusers import EDMEulerScheduler

    peer = EDMEulerScheduler(sigma_min=0.002, sigma_max=120.0, sigma_data=0.5, sigma_schedule="karras", rho=7.0)
    peer.set_timesteps(9)
    ours = ksampler("dpm_fast", "edm_playground_v2.5", steps=9)
    np.testing.assert_allclose(ours.sigmas, peer.sigmas.numpy(), rtol=1e-5)
    x, output = noise(size=8), noise(seed=4, size=8)
    sigma = torch.tensor(ours.sigmas[2])
    assert ours.timestep_of(ours.sigmas[2]) == pytest.approx(float(peer.precondition_noise(sigma)), rel=1e-6)
    edm = ours.parameterization
    torch.testing.assert_close(x * edm.model_input_scale(ours.sigmas[2]), peer.precondition_inputs(x, sigma))
    torch.testing.assert_close(edm.denoised(x, output, ours.sigmas[2]), peer.precondition_outputs(x, output, sigma))
    latents = noise(seed=5, size=8) * 0.13
    torch.testing.assert_close(edm.from_model_space(edm.to_model_space(latents)), latents)


def test_diffusers_samplers_run_on_the_new_schedules_and_edm_is_refused_by_name():
    sched = core.make_scheduler("dpmpp_2m_sde_gpu", "align_your_steps")
    sched.set_timesteps(10)
    assert sched.sigmas[:-1].tolist() == pytest.approx(samplers.align_your_steps_sigmas(10)[:-1], rel=1e-6)
    heun = core.make_scheduler("heun", "ddim_uniform")
    heun.set_timesteps(30)
    assert len(heun.timesteps) == 2 * 31 - 1        # ddim_uniform's 31 steps, Heun's doubling
    refused = "edm_playground_v2.5.*field 'scheduler'.*'dpmpp_2m_sde_gpu'.*samplers that can: euler, dpmpp_2m, .*lms"
    with pytest.raises(ValueError, match=refused):
        core.make_scheduler("dpmpp_2m_sde_gpu", "edm_playground_v2.5")
    with pytest.raises(ValueError, match="align_your_steps.*euler_ancestral"):
        core.make_scheduler("euler_ancestral", "align_your_steps")


# -- through the sampling loop and whole requests -------------------------------------------

# dpm_adaptive is left to the core-level test below: on random weights it takes many calls.
NEW_PAIRS = [(name, "karras") for name in samplers.ALGORITHMS if name not in samplers.ADAPTIVE] + [
    ("dpmpp_2m_sde_gpu", "align_your_steps"), ("dpmpp_2m", "ddim_uniform"), ("lms", "edm_playground_v2.5")]


def test_a_request_with_each_new_sampler_and_schedule_makes_its_own_image(pipeline):
    from ldm_patched.modules import model_management as mm
    from tests.helpers import pipelines
    from tests.helpers.pipelines import SMALL, pixels

    pipeline(mm.Policy.RESIDENT)
    small = {**SMALL, "steps": 2}
    seen = [pixels(pipelines.process_request({**small, "sampler": "euler", "scheduler": "karras"}).images[0])]
    for sampler, scheduler in NEW_PAIRS:
        result = pipelines.process_request({**small, "sampler": sampler, "scheduler": scheduler})
        assert "error" not in result.report, (sampler, scheduler, result.report)
        assert (result.report["sampler"], result.report["scheduler"]) == (sampler, scheduler)
        image = pixels(result.images[0])
        assert image.std() > 1 and not any(np.array_equal(image, other) for other in seen), (sampler, scheduler)
        seen.append(image)


@pytest.mark.parametrize("sampler", ["restart", "dpm_adaptive"])
def test_image_to_image_with_a_mask_keeps_the_init_outside_it(tiny_components, sampler):
    """core.sample's image-to-image path (the kept part of the schedule) and its inpainting
    blend, on a fixed sampler and on the adaptive one."""
    from ldm_patched.modules import model_management as mm
    from ldm_patched.modules.model_patcher import ModelPatcher

    cpu = torch.device("cpu")
    mm.configure(mm.MemorySettings(policy=mm.Policy.CONSERVATIVE, budget_bytes=2 ** 33, total_bytes=2 ** 33))
    unet = ModelPatcher(tiny_components["unet"], cpu, cpu, name="unet")
    config = unet.model.config
    generator = torch.Generator().manual_seed(7)
    pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    positive = core.Conditioning(embeds=torch.randn(1, 77, config.cross_attention_dim, generator=generator),
                                 pooled=torch.randn(1, pooled, generator=generator))
    init = torch.randn(1, 4, 8, 8, generator=generator) * 0.1
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4] = 1.0
    try:
        out = core.sample([core.UNetStage(unet, positive, None)], sampler=sampler, scheduler="karras", steps=3,
                          cfg=1.0, width=64, height=64, seed=3, shape=(1, 4, 8, 8), init_latents=init,
                          denoise=0.25, mask=mask)
    finally:
        mm.get_manager().unload_all()
    assert torch.equal(out[..., 4:], init[..., 4:])
    assert not torch.allclose(out[..., :4], init[..., :4], atol=1e-3)


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m"])
def test_edm_euler_and_dpmpp_2m_step_like_diffusers_edm_schedulers(sampler):
    """Upstream's Playground v2.5 preset samples dpmpp_2m on the EDM schedule."""
    from diffusers import EDMDPMSolverMultistepScheduler, EDMEulerScheduler

    edm = dict(sigma_min=0.002, sigma_max=120.0, sigma_data=0.5, sigma_schedule="karras", rho=7.0)
    peer = EDMEulerScheduler(**edm) if sampler == "euler" else EDMDPMSolverMultistepScheduler(
        **edm, algorithm_type="dpmsolver++", solver_order=2, final_sigmas_type="zero")
    peer.set_timesteps(16)   # from 15 steps on diffusers' DPM-Solver keeps second order to the end
    ours = ksampler(sampler, "edm_playground_v2.5", steps=16)
    np.testing.assert_allclose(ours.sigmas, peer.sigmas.numpy(), rtol=1e-5)
    start = noise(size=8) * ours.sigmas[0]
    x, y = start, start * float(peer.init_noise_sigma) / ours.sigmas[0]
    for t_ours, t_peer in zip(ours.timesteps, peer.timesteps):
        x = ours.step(peer_toy_model(ours.scale_model_input(x, t_ours)), t_ours, x).prev_sample
        y = peer.step(peer_toy_model(peer.scale_model_input(y, t_peer)), t_peer, y).prev_sample
    edm_space = ours.parameterization.to_model_space
    torch.testing.assert_close(edm_space(x), y, rtol=1e-4, atol=1e-4)
