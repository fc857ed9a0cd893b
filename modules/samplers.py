"""Upstream Fooocus's samplers and noise schedules that diffusers has no scheduler for.

Samplers (k-diffusion's algorithms, as upstream runs them through ComfyUI's ksampler):
``lms`` (linear multistep, order 4), ``heunpp2`` (Heun++), ``dpmpp_2s_ancestral``
(DPM-Solver++(2S) with ancestral noise), ``dpm_fast`` (DPM-Solver-3 at a fixed number of
denoiser calls), ``dpm_adaptive`` (DPM-Solver-23 with an error-controlled step size) and
``restart`` (Heun steps with restart segments, Xu et al. 2023). Each is written once, as a
generator in sigma space: it yields ``(x, sigma)`` where it needs the denoiser and is sent
back ``(x, denoised)`` (the point as evaluated, which inpainting may have blended, and the
denoiser's output there); it returns the final ``x``.

`KSamplerScheduler` drives one of them behind the diffusers scheduler calls that
`modules/core.py`'s loop makes (set_timesteps, timesteps, scale_model_input, step,
add_noise), so the loop, classifier-free guidance, inpainting and previews stay one code
path. `timesteps` has one entry per denoiser call (the nearest training timestep, as
upstream's discrete model sampling gives the UNet). ``dpm_adaptive`` decides its calls as
it goes: its `timesteps` grows while it runs.

Schedules: ``ddim_uniform`` (every (1000 // steps)-th training sigma from the second),
``align_your_steps`` (NVIDIA's published SDXL noise levels, log-linearly interpolated to
the step count) and ``edm_playground_v2.5`` (Karras sigmas from 120 to 0.002 with the UNet
run as an EDM model, sigma_data 0.5, as upstream patches it for Playground v2.5). The
first two also drive diffusers' schedulers (see `custom_sigmas`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Generator, Iterator, Sequence

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor

from ldm_patched.modules.checkpoint import SDXL_VAE_SCALING_FACTOR

# (x, sigma) requests out, (x as evaluated, denoised) in, final x returned
Algorithm = Generator[tuple[torch.Tensor | None, float], tuple[torch.Tensor, torch.Tensor], torch.Tensor]
NoiseFn = Callable[[torch.Tensor], torch.Tensor]

# NVIDIA's Align Your Steps noise levels for SDXL (10 steps), from the paper's how-to page.
AYS_SDXL = (14.6146412293, 6.3184485287, 3.7681790315, 2.1811480769, 1.3405244945, 0.8620721141,
            0.5550693289, 0.3798540708, 0.2332364134, 0.1114188177, 0.0291671582)
# Upstream's EDM patch for Playground v2.5: sigma range and sigma_data.
EDM_SIGMA_MAX, EDM_SIGMA_MIN, EDM_SIGMA_DATA = 120.0, 0.002, 0.5
KARRAS_RHO = 7.0


def _d(x: torch.Tensor, sigma: float, denoised: torch.Tensor) -> torch.Tensor:
    """The probability-flow ODE's derivative dx/dsigma (Karras et al.)."""
    return (x - denoised) / sigma


def ancestral_step(sigma_from: float, sigma_to: float, eta: float = 1.0) -> tuple[float, float]:
    """(sigma_down, sigma_up): step deterministically to sigma_down, then add sigma_up of
    fresh noise, so the marginal at sigma_to is kept; eta 0 is the plain ODE step."""
    if not eta or sigma_to == 0:
        return sigma_to, 0.0
    up = min(sigma_to, eta * math.sqrt(sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2))
    return math.sqrt(sigma_to ** 2 - up ** 2), up


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = KARRAS_RHO) -> list[float]:
    """Karras et al.'s schedule: n sigmas evenly spaced in sigma^(1/rho), then 0."""
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return [(hi + i / max(n - 1, 1) * (lo - hi)) ** rho for i in range(n)] + [0.0]


# -- samplers ----------------------------------------------------------------------------

def lms_coefficients(sigmas: Sequence[float], i: int, order: int) -> list[float]:
    """Adams-Bashforth weights of the last `order` derivatives for the step sigmas[i] ->
    sigmas[i+1]: the exact integral of each Lagrange basis polynomial over the step."""
    weights = []
    for j in range(order):
        others = [sigmas[i - k] for k in range(order) if k != j]
        basis = np.polynomial.Polynomial([1.0])
        for other in others:
            basis = basis * np.polynomial.Polynomial([-other, 1.0]) / (sigmas[i - j] - other)
        integral = basis.integ()
        weights.append(float(integral(sigmas[i + 1]) - integral(sigmas[i])))
    return weights


def lms(sigmas: Sequence[float], x, noise: NoiseFn, order: int = 4) -> Algorithm:
    derivatives: list[torch.Tensor] = []
    for i in range(len(sigmas) - 1):
        x, denoised = yield x, sigmas[i]
        derivatives = (derivatives + [_d(x, sigmas[i], denoised)])[-order:]
        weights = lms_coefficients(sigmas, i, len(derivatives))
        x = x + sum(w * d for w, d in zip(weights, reversed(derivatives)))
    return x


def heunpp2(sigmas: Sequence[float], x, noise: NoiseFn) -> Algorithm:
    """Heun++: the step's slope is a sigma-weighted blend of the slopes at this and the
    next one or two sigmas (Heun on the second-last step, Euler on the last)."""
    end = sigmas[-1]
    for i in range(len(sigmas) - 1):
        sigma, nxt = sigmas[i], sigmas[i + 1]
        x, denoised = yield x, sigma
        d = _d(x, sigma, denoised)
        dt = nxt - sigma
        if nxt == end:
            x = x + d * dt
            continue
        x_2 = x + d * dt
        _, denoised_2 = yield x_2, nxt
        d_2 = _d(x_2, nxt, denoised_2)
        if sigmas[i + 2] == end:
            w_2 = nxt / (2 * sigmas[0])
            x = x + (d * (1 - w_2) + d_2 * w_2) * dt
            continue
        after = sigmas[i + 2]
        x_3 = x_2 + d_2 * (after - nxt)
        _, denoised_3 = yield x_3, after
        d_3 = _d(x_3, after, denoised_3)
        w_2, w_3 = nxt / (3 * sigmas[0]), after / (3 * sigmas[0])
        x = x + (d * (1 - w_2 - w_3) + d_2 * w_2 + d_3 * w_3) * dt
    return x


def dpmpp_2s_ancestral(sigmas: Sequence[float], x, noise: NoiseFn, eta: float = 1.0,
                       s_noise: float = 1.0) -> Algorithm:
    """Second-order single-step DPM-Solver++ (midpoint in log-sigma) to sigma_down, then
    ancestral noise; Euler where sigma_down is 0."""
    for i in range(len(sigmas) - 1):
        sigma, nxt = sigmas[i], sigmas[i + 1]
        x, denoised = yield x, sigma
        down, up = ancestral_step(sigma, nxt, eta)
        if down == 0:
            x = x + _d(x, sigma, denoised) * (down - sigma)
        else:
            h = math.log(sigma) - math.log(down)        # lambda = -log(sigma) grows by h
            mid = math.exp(-(-math.log(sigma) + h / 2))
            x_2 = (mid / sigma) * x - math.expm1(-h / 2) * denoised
            _, denoised_2 = yield x_2, mid
            x = (down / sigma) * x - math.expm1(-h) * denoised_2
        if nxt > 0 and up:
            x = x + noise(x) * s_noise * up
    return x


def _eps(x, t: float):
    """Ask for the denoiser at lambda = t (sigma = e^-t); returns (x as evaluated, eps)."""
    sigma = math.exp(-t)
    x, denoised = yield x, sigma
    return x, (x - denoised) / sigma


def _dpm_solver_update(x, t: float, t_next: float, eps, order: int, r1: float | None = None):
    """One DPM-Solver step of `order` (1, 2 or 3) from lambda t to t_next, given eps at
    (x, t); the intermediate points are at fractions r1 (and r2 = 2/3) of the step.
    Returns the new x; with order 3 also the second-order estimate (its error control)."""
    sigma_at = lambda s: math.exp(-s)  # noqa: E731
    h = t_next - t
    first = x - sigma_at(t_next) * math.expm1(h) * eps
    if order == 1:
        return first, None
    r1 = r1 if r1 is not None else (0.5 if order == 2 else 1 / 3)
    s1 = t + r1 * h
    u1 = x - sigma_at(s1) * math.expm1(r1 * h) * eps
    _, eps_1 = yield from _eps(u1, s1)
    second = first - sigma_at(t_next) / (2 * r1) * math.expm1(h) * (eps_1 - eps)
    if order == 2:
        return second, None
    r2 = 2 / 3
    s2 = t + r2 * h
    u2 = (x - sigma_at(s2) * math.expm1(r2 * h) * eps
          - sigma_at(s2) * (r2 / r1) * (math.expm1(r2 * h) / (r2 * h) - 1) * (eps_1 - eps))
    _, eps_2 = yield from _eps(u2, s2)
    third = first - sigma_at(t_next) / r2 * (math.expm1(h) / h - 1) * (eps_2 - eps)
    return third, second


def _last_sigma(sigmas: Sequence[float]) -> float:
    """Where the DPM-Solver samplers stop: the last nonzero sigma (they never reach 0)."""
    return sigmas[-2] if sigmas[-1] == 0 else sigmas[-1]


def dpm_fast(sigmas: Sequence[float], x, noise: NoiseFn) -> Algorithm:
    """DPM-Solver-fast: as many denoiser calls as steps, spent on uniform steps in
    log-sigma from the first sigma to the last nonzero one, third order but for the last."""
    calls = len(sigmas) - 1
    t_start, t_end = -math.log(sigmas[0]), -math.log(_last_sigma(sigmas))
    m = calls // 3 + 1
    ts = [t_start + (t_end - t_start) * k / m for k in range(m + 1)]
    orders = [3] * (m - 2) + [2, 1] if calls % 3 == 0 else [3] * (m - 1) + [calls % 3]
    for k, order in enumerate(orders):
        x, eps = yield from _eps(x, ts[k])
        x, _ = yield from _dpm_solver_update(x, ts[k], ts[k + 1], eps, order)
    return x


@dataclass
class StepSizeController:
    """k-diffusion's PID step-size control (there with pcoeff 0, icoeff 1, dcoeff 0: a plain
    integral controller): the step grows or shrinks by a bounded factor of the inverse error."""

    h: float
    order: float = 3.0
    pcoeff: float = 0.0
    icoeff: float = 1.0
    dcoeff: float = 0.0
    accept_safety: float = 0.81
    eps: float = 1e-8

    def __post_init__(self) -> None:
        self.errors: list[float] = []

    def propose(self, error: float) -> bool:
        """Scale h for the next try; True when this step's error is accepted."""
        inverse = 1 / (error + self.eps)
        if not self.errors:
            self.errors = [inverse] * 3
        self.errors[0] = inverse
        b1 = (self.pcoeff + self.icoeff + self.dcoeff) / self.order
        b2 = -(self.pcoeff + 2 * self.dcoeff) / self.order
        b3 = self.dcoeff / self.order
        factor = self.errors[0] ** b1 * self.errors[1] ** b2 * self.errors[2] ** b3
        factor = 1 + math.atan(factor - 1)
        accept = factor >= self.accept_safety
        if accept:
            self.errors[2], self.errors[1] = self.errors[1], self.errors[0]
        self.h *= factor
        return accept


def dpm_adaptive(sigmas: Sequence[float], x, noise: NoiseFn, rtol: float = 0.05, atol: float = 0.0078,
                 h_init: float = 0.05) -> Algorithm:
    """DPM-Solver-23: each try takes a third-order step and its second-order companion (three
    denoiser calls); their difference, against rtol and atol, accepts the step or not and
    sizes the next. The steps are its own: only the first and last nonzero sigma are used."""
    t, t_end = -math.log(sigmas[0]), -math.log(_last_sigma(sigmas))
    control = StepSizeController(h_init)
    x_previous = None     # the last accepted low-order estimate (the start at first)
    while t < t_end - 1e-5:
        t_next = min(t_end, t + control.h)
        x, eps = yield from _eps(x, t)
        x_previous = x if x_previous is None else x_previous
        x_high, x_low = yield from _dpm_solver_update(x, t, t_next, eps, 3)
        delta = torch.clamp(rtol * torch.maximum(x_low.abs(), x_previous.abs()), min=atol)
        error = float(torch.linalg.norm((x_low - x_high) / delta) / math.sqrt(x.numel()))
        if control.propose(error):
            x_previous, x, t = x_low, x_high, t_next
    return x


def restart(sigmas: Sequence[float], x, noise: NoiseFn, s_noise: float = 1.0) -> Algorithm:
    """Heun steps; from 20 steps on, the schedule becomes Karras over the same range with
    9 (36+: steps // 4, twice) steps set aside for restarts: back up from sigma 0.1 to 2
    with fresh noise and descend again."""
    sigmas, restarts = restart_plan(sigmas)
    last = None
    for old, new in restarts:
        if last is not None and last < old:
            x = x + noise(x) * s_noise * math.sqrt(old ** 2 - last ** 2)
        x, denoised = yield x, old
        d = _d(x, old, denoised)
        if new == 0:
            x = x + d * (new - old)
        else:
            x_2 = x + d * (new - old)
            _, denoised_2 = yield x_2, new
            x = x + (d + _d(x_2, new, denoised_2)) / 2 * (new - old)
        last = new
    return x


def restart_plan(sigmas: Sequence[float]) -> tuple[list[float], list[tuple[float, float]]]:
    """(the schedule restart uses, its (from, to) Heun steps including the restart segments)."""
    steps = len(sigmas) - 1
    restarts: dict[float, tuple[int, int, float]] = {}
    if steps >= 20:
        restart_steps, times = (steps // 4, 2) if steps >= 36 else (9, 1)
        sigmas = karras_sigmas(steps - restart_steps * times, sigmas[-2], sigmas[0])
        restarts = {0.1: (restart_steps + 1, times, 2.0)}
    nearest = lambda value: int(np.argmin([abs(s - value) for s in sigmas]))  # noqa: E731
    at = {nearest(key): value for key, value in restarts.items()}
    plan: list[tuple[float, float]] = []
    for i in range(len(sigmas) - 1):
        plan.append((sigmas[i], sigmas[i + 1]))
        if i + 1 in at:
            segment_steps, times, top = at[i + 1]
            low, high = i + 1, nearest(top)
            if high < low:
                segment = karras_sigmas(segment_steps, sigmas[low], sigmas[high])[:-1]
                plan += list(zip(segment[:-1], segment[1:])) * times
    return list(sigmas), plan


def euler(sigmas: Sequence[float], x, noise: NoiseFn) -> Algorithm:
    for i in range(len(sigmas) - 1):
        x, denoised = yield x, sigmas[i]
        x = x + _d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
    return x


def dpmpp_2m(sigmas: Sequence[float], x, noise: NoiseFn) -> Algorithm:
    """DPM-Solver++(2M): the data estimate extrapolated from this and the previous step
    (first order on the first step and the step to 0, which lands on the estimate)."""
    previous = None
    for i in range(len(sigmas) - 1):
        sigma, nxt = sigmas[i], sigmas[i + 1]
        x, denoised = yield x, sigma
        if nxt == 0:
            x = denoised
            continue
        h = math.log(sigma) - math.log(nxt)
        estimate = denoised
        if previous is not None:
            r = (math.log(sigmas[i - 1]) - math.log(sigma)) / h
            estimate = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * previous
        x = (nxt / sigma) * x - math.expm1(-h) * estimate
        previous = denoised
    return x


ALGORITHMS: dict[str, Callable[..., Algorithm]] = {
    "heunpp2": heunpp2, "lms": lms, "dpm_fast": dpm_fast, "dpm_adaptive": dpm_adaptive,
    "dpmpp_2s_ancestral": dpmpp_2s_ancestral, "restart": restart,
}
# Samplers diffusers runs for every other schedule; with the EDM schedule (which diffusers'
# SDXL schedulers cannot drive) their k-diffusion form runs here, as upstream's preset
# for Playground v2.5 (dpmpp_2m) needs.
EDM_ALGORITHMS: dict[str, Callable[..., Algorithm]] = {"euler": euler, "dpmpp_2m": dpmpp_2m}
# Its calls depend on the values it sees, so they are known only while it runs.
ADAPTIVE = frozenset({"dpm_adaptive"})


# -- noise schedules ---------------------------------------------------------------------

def training_sigmas(alphas_cumprod: torch.Tensor) -> np.ndarray:
    """sigma of each training timestep, ascending (index = timestep)."""
    a = alphas_cumprod.double().numpy()
    return np.sqrt((1 - a) / a)


def ddim_uniform_sigmas(table: np.ndarray, steps: int) -> list[float]:
    """Upstream's ddim_uniform: every (len // steps)-th training sigma from index 1, high to
    low, then 0 (more sigmas than steps when 1000 is not a multiple of steps)."""
    stride = max(len(table) // steps, 1)
    return [float(s) for s in table[1::stride][::-1]] + [0.0]


def align_your_steps_sigmas(steps: int) -> list[float]:
    """AYS for SDXL: the 10-step levels, log-linearly interpolated to steps + 1 points; the
    last becomes 0."""
    levels = np.array(AYS_SDXL)
    if steps + 1 != len(levels):
        xs = np.linspace(0, 1, len(levels))
        levels = np.exp(np.interp(np.linspace(0, 1, steps + 1), xs, np.log(levels[::-1])))[::-1]
    return [float(s) for s in levels[:-1]] + [0.0]


def edm_playground_sigmas(steps: int) -> list[float]:
    return karras_sigmas(steps, EDM_SIGMA_MIN, EDM_SIGMA_MAX)


# The schedules this module computes itself; the others come from diffusers' Euler sigmas.
CUSTOM_SCHEDULES = ("ddim_uniform", "align_your_steps", "edm_playground_v2.5")
EDM_SCHEDULES = frozenset({"edm_playground_v2.5"})


def custom_sigmas(scheduler: str, steps: int, alphas_cumprod: torch.Tensor) -> list[float]:
    if scheduler == "ddim_uniform":
        return ddim_uniform_sigmas(training_sigmas(alphas_cumprod), steps)
    if scheduler == "align_your_steps":
        return align_your_steps_sigmas(steps)
    if scheduler == "edm_playground_v2.5":
        return edm_playground_sigmas(steps)
    raise ValueError(f"unknown scheduler {scheduler!r}")


def use_custom_sigmas(scheduler, name: str) -> None:
    """Make a diffusers scheduler built with use_karras_sigmas=True run on schedule `name`
    instead: its Karras conversion is the one place its set_timesteps takes sigmas from,
    so the sampler's own bookkeeping (Heun's doubled steps, DPM2's midpoints, timesteps,
    the final 0) follows as it does for Karras."""
    def convert(in_sigmas, num_inference_steps):
        return np.array(custom_sigmas(name, num_inference_steps, scheduler.alphas_cumprod)[:-1])

    scheduler._convert_to_karras = convert


# -- the scheduler face ------------------------------------------------------------------

@dataclass
class SamplerStep:
    prev_sample: torch.Tensor            # the next point the denoiser is asked at (the result after the last)
    pred_original_sample: torch.Tensor   # the denoiser's output at this point (previews use it)


# Playground v2.5's latent statistics (upstream's SDXL_Playground_2_5 latent format).
PLAYGROUND_LATENT_MEAN = (-1.6574, 1.886, -1.383, 2.5155)
PLAYGROUND_LATENT_STD = (8.4927, 5.9022, 6.5498, 5.2299)
PLAYGROUND_LATENT_SCALE = 0.5


@dataclass(frozen=True)
class Parameterization:
    """How the UNet's output and timestep input relate to sigma: eps-prediction on the
    discrete training schedule (SDXL), or EDM (Karras et al.'s preconditioning) with
    Playground v2.5's latent format. The pipeline's latents are the VAE's times
    `vae_scale` (SDXL's convention); EDM samples in its own latent space, so latents
    cross over where they enter and leave the sampler."""

    edm: bool = False
    vae_scale: float = SDXL_VAE_SCALING_FACTOR

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = torch.tensor(PLAYGROUND_LATENT_MEAN, device=like.device, dtype=like.dtype).view(1, -1, 1, 1)
        std = torch.tensor(PLAYGROUND_LATENT_STD, device=like.device, dtype=like.dtype).view(1, -1, 1, 1)
        return mean, std

    def to_model_space(self, latents: torch.Tensor) -> torch.Tensor:
        if not self.edm:
            return latents
        mean, std = self._stats(latents)
        return (latents / self.vae_scale - mean) * PLAYGROUND_LATENT_SCALE / std

    def from_model_space(self, latents: torch.Tensor) -> torch.Tensor:
        if not self.edm:
            return latents
        mean, std = self._stats(latents)
        return (latents * std / PLAYGROUND_LATENT_SCALE + mean) * self.vae_scale

    @property
    def sigma_data(self) -> float:
        return EDM_SIGMA_DATA if self.edm else 1.0

    def model_input_scale(self, sigma: float) -> float:
        return 1 / math.sqrt(sigma ** 2 + self.sigma_data ** 2)

    def denoised(self, x: torch.Tensor, output: torch.Tensor, sigma: float) -> torch.Tensor:
        if not self.edm:
            return x - output * sigma
        data = self.sigma_data
        return x * data ** 2 / (sigma ** 2 + data ** 2) + output * sigma * data / math.sqrt(sigma ** 2 + data ** 2)


class _LiveTimesteps:
    """An adaptive sampler's timesteps: those asked for so far and the pending one; the
    sampling loop's `for t in timesteps` follows it until the sampler finishes."""

    def __init__(self, owner: "KSamplerScheduler") -> None:
        self.owner = owner

    def __iter__(self) -> Iterator[torch.Tensor]:
        i = 0
        while i < len(self.owner.asked):
            yield self[i]
            i += 1

    def __len__(self) -> int:
        return len(self.owner.asked)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return torch.stack([self[k] for k in range(len(self))[i]])
        if i == 0 and not self.owner.asked:   # finished before asking: where it started
            return self.owner.timestep_tensor(self.owner.sigmas[0])
        return self.owner.timestep_tensor(self.owner.asked[i])


class KSamplerScheduler:
    """One algorithm above behind the scheduler calls `core.sample` makes.

    `schedule(steps)` gives the sigmas (ending in 0); `set_timesteps` starts the algorithm
    on them (`start_at` on the part an image-to-image request keeps). Each `step` hands the
    model output at the pending point to the algorithm and returns the next point."""

    order = 1

    def __init__(self, name: str, schedule: Callable[[int], list[float]], alphas_cumprod: torch.Tensor,
                 parameterization: Parameterization = Parameterization()) -> None:
        self.name = name
        self.algorithm = (EDM_ALGORITHMS if parameterization.edm and name in EDM_ALGORITHMS else ALGORITHMS)[name]
        self.schedule = schedule
        self.alphas_cumprod = alphas_cumprod
        self.parameterization = parameterization
        self._log_table = np.log(training_sigmas(alphas_cumprod))
        self._device = None
        self._generator = None
        self.sigmas: list[float] = []
        self.asked: list[float] = []       # sigma of every denoiser call so far, and the pending one
        self._planned: list[float] | None = None
        self._run: Algorithm | None = None
        self._pending: tuple[torch.Tensor | None, float] | None = None
        self.timesteps: torch.Tensor | _LiveTimesteps = torch.zeros(0)

    # -- what the UNet is given ---------------------------------------------------------

    def timestep_of(self, sigma: float) -> float:
        """The UNet's timestep input for sigma: the nearest training timestep in log-sigma
        (upstream's discrete model sampling), or EDM's c_noise = ln(sigma) / 4."""
        if self.parameterization.edm:
            return 0.25 * math.log(sigma)
        return float(np.abs(self._log_table - math.log(sigma)).argmin())

    def timestep_tensor(self, sigma: float) -> torch.Tensor:
        return torch.tensor(self.timestep_of(sigma), dtype=torch.float32, device=self._device)

    @property
    def init_noise_sigma(self) -> float:
        """Noise scale of a full-strength start, upstream's rule: sqrt(1 + sigma^2) from the
        model's top sigma, sigma below it."""
        top = EDM_SIGMA_MAX if self.parameterization.edm else float(np.exp(self._log_table[-1]))
        first = self.sigmas[0]
        return math.sqrt(1 + first ** 2) if first >= top * (1 - 1e-5) else first

    # -- the run -------------------------------------------------------------------------

    def set_timesteps(self, num_inference_steps: int, device=None) -> None:
        self._begin(self.schedule(num_inference_steps), device)

    def start_at(self, total: int, start: int, device=None):
        """Image to image: the algorithm runs on the last part of a `total`-step schedule,
        from index `start` (upstream slices the sigmas the same way)."""
        self._begin(self.schedule(total)[start:], device)
        return self.timesteps

    def _begin(self, sigmas: list[float], device) -> None:
        if len(sigmas) < 2:
            raise ValueError("a schedule needs at least one step")
        self.sigmas, self._device = list(sigmas), device
        if self.name in ADAPTIVE:
            self._planned = None
            self.timesteps = _LiveTimesteps(self)
        else:
            self._planned = self._dry_run(self.sigmas)
            self.timesteps = torch.tensor([self.timestep_of(s) for s in self._planned], dtype=torch.float32,
                                          device=device)
        self._run = self.algorithm(self.sigmas, None, self._noise)
        try:
            self._pending = next(self._run)
            self.asked = [self._pending[1]]
        except StopIteration:   # nothing to do (dpm_adaptive when the first sigma is the last)
            self._pending, self.asked = None, []

    def _dry_run(self, sigmas: list[float]) -> list[float]:
        """The sigmas a fixed sampler will ask for (they do not depend on the values)."""
        zero = torch.zeros(())
        run = self.algorithm(sigmas, zero, lambda x: torch.zeros_like(x))
        asked = []
        try:
            request = next(run)
            while True:
                asked.append(request[1])
                request = run.send((zero, zero))
        except StopIteration:
            return asked

    def _noise(self, like: torch.Tensor) -> torch.Tensor:
        """Fresh noise from the request's generator (drawn on the CPU when that is where the
        generator lives, as the diffusers schedulers draw theirs)."""
        return randn_tensor(like.shape, generator=self._generator, device=like.device, dtype=like.dtype)

    def _sigma(self) -> float:
        if self._pending is None:
            raise RuntimeError(f"sampler {self.name!r} has finished; call set_timesteps first")
        return self._pending[1]

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample * self.parameterization.model_input_scale(self._sigma())

    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, generator=None,
             return_dict: bool = True) -> SamplerStep:
        sigma = self._sigma()
        denoised = self.parameterization.denoised(sample.float(), model_output.float(), sigma)
        self._generator = generator
        out = self.parameterization.from_model_space
        try:
            self._pending = self._run.send((sample.float(), denoised))
        except StopIteration as done:
            self._pending = None
            return SamplerStep(out(done.value), out(denoised))
        self.asked.append(self._pending[1])
        if self._planned is not None and self._planned[len(self.asked) - 1] != self._pending[1]:
            raise RuntimeError(f"sampler {self.name!r} left its planned schedule")
        return SamplerStep(self._pending[0], out(denoised))

    def add_noise(self, original: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """`original` at the noise level of `timesteps`: the pending call's sigma (or, with
        nothing pending, the first) when it is that timestep, as the loop asks; else the
        training table's."""
        t = float(torch.as_tensor(timesteps).reshape(-1)[0])
        at = self._pending[1] if self._pending is not None else self.sigmas[0]
        if self.timestep_of(at) == t:
            sigma = at
        else:
            sigma = float(np.exp(np.interp(t, np.arange(len(self._log_table)), self._log_table)))
        return self.parameterization.to_model_space(original) + noise * sigma
