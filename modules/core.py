"""Prompt encoding, the sampling loop and VAE encoding/decoding, on patchers.

Every stage first asks `model_management.load_models_gpu` for its model: that is
the only place weights move or get patched. The networks are diffusers /
transformers modules; the loop follows diffusers' SDXL pipeline step for step
(same noise, same scheduler calls), so a request matches
`StableDiffusionXLPipeline` on the same weights.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable

import numpy as np
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, HeunDiscreteScheduler, KDPM2AncestralDiscreteScheduler,
                       KDPM2DiscreteScheduler, LCMScheduler, TCDScheduler, UniPCMultistepScheduler)

from ldm_patched.modules import model_management
from ldm_patched.modules.model_patcher import ModelPatcher
from modules.compiled_unet import CompiledUNets, CompileSettings
from modules import controlnet, ip_adapter
from modules import guidance as guidance_mod
from modules import samplers, tiling


class SDXLTextEncoders(torch.nn.Module):
    """CLIP-L and OpenCLIP-G as one module, so one patcher (and one LoRA key space:
    `text_encoder.*`, `text_encoder_2.*`) covers both. The refiner has only G."""

    def __init__(self, text_encoder: torch.nn.Module | None, text_encoder_2: torch.nn.Module) -> None:
        super().__init__()
        self.text_encoder = text_encoder
        self.text_encoder_2 = text_encoder_2


@dataclass
class Conditioning:
    embeds: torch.Tensor   # [1, 77*k, context]
    pooled: torch.Tensor   # [1, pooled]


# The compiled UNet forward (`--compile-unet`), next to the plain modules the patchers
# hold; disabled (eager) unless launch or a test configures it.
UNET_COMPILER = CompiledUNets()


def configure_compile(settings: CompileSettings) -> CompiledUNets:
    """Install the compiled-UNet holder for these settings (launch does this once)."""
    global UNET_COMPILER
    UNET_COMPILER = CompiledUNets(settings)
    return UNET_COMPILER


# -- schedulers -------------------------------------------------------------------------

# SDXL's training noise schedule; every sampler starts from it.
SDXL_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                     beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading",
                     prediction_type="epsilon")

SAMPLERS: dict[str, tuple[type, dict]] = {
    "euler": (EulerDiscreteScheduler, {}),
    "euler_ancestral": (EulerAncestralDiscreteScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "dpm_2": (KDPM2DiscreteScheduler, {}),
    "dpm_2_ancestral": (KDPM2AncestralDiscreteScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_sde": (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_sde_gpu": (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "dpmpp_3m_sde": (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++", "solver_order": 3}),
    "dpmpp_3m_sde_gpu": (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++", "solver_order": 3}),
    # First-order SDE DPM-Solver++ stands in for k-diffusion's dpmpp_sde (which
    # needs torchsde and scipy); same family, one model call per step.
    "dpmpp_sde": (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++", "solver_order": 1}),
    "dpmpp_sde_gpu": (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++", "solver_order": 1}),
    "ddpm": (DDPMScheduler, {}),
    "ddim": (DDIMScheduler, {"set_alpha_to_one": False}),
    "uni_pc": (UniPCMultistepScheduler, {}),
    "uni_pc_bh2": (UniPCMultistepScheduler, {"solver_type": "bh2"}),
    "lcm": (LCMScheduler, {}),
    "tcd": (TCDScheduler, {}),
}

SCHEDULERS: dict[str, dict] = {
    "normal": {},
    "karras": {"use_karras_sigmas": True},
    "exponential": {"use_exponential_sigmas": True},
    "sgm_uniform": {"timestep_spacing": "trailing"},
    "simple": {"timestep_spacing": "trailing"},
    "turbo": {"timestep_spacing": "trailing"},
    "lcm": {},   # the LCM/TCD samplers' own spacing; "normal" for the others
    "tcd": {},
}


# Every name either table offers: diffusers' schedulers, then modules/samplers' own.
AVAILABLE_SAMPLERS = (*SAMPLERS, *samplers.ALGORITHMS)
AVAILABLE_SCHEDULERS = (*SCHEDULERS, *samplers.CUSTOM_SCHEDULES)


def make_scheduler(sampler: str, scheduler: str):
    """A fresh scheduler for a Fooocus sampler/scheduler pair: a diffusers scheduler, or
    one of modules/samplers' k-diffusion algorithms behind the same calls."""
    if sampler not in AVAILABLE_SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r} (field 'sampler'); available: "
                         f"{', '.join(AVAILABLE_SAMPLERS)}")
    if scheduler not in AVAILABLE_SCHEDULERS:
        raise ValueError(f"unknown scheduler {scheduler!r} (field 'scheduler'); available: "
                         f"{', '.join(AVAILABLE_SCHEDULERS)}")
    edm = scheduler in samplers.EDM_SCHEDULES
    if sampler in samplers.ALGORITHMS or (edm and sampler in samplers.EDM_ALGORITHMS):
        return _k_sampler(sampler, scheduler)
    if edm:
        able = (*samplers.EDM_ALGORITHMS, *samplers.ALGORITHMS)
        raise ValueError(f"scheduler {scheduler!r} (field 'scheduler') runs the UNet as an EDM model (Playground "
                         f"v2.5), which diffusers' schedulers here do not; sampler {sampler!r} (field 'sampler') "
                         f"cannot use it (samplers that can: {', '.join(able)})")
    custom = scheduler in samplers.CUSTOM_SCHEDULES
    cls, sampler_options = SAMPLERS[sampler]
    schedule_options = {"use_karras_sigmas": True} if custom else SCHEDULERS[scheduler]
    options = {**SDXL_SCHEDULE, **sampler_options, **schedule_options}
    accepted = inspect.signature(cls.__init__).parameters
    missing = [k for k in schedule_options if k not in accepted]
    if missing:
        raise ValueError(f"scheduler {scheduler!r} (field 'scheduler') cannot be used with sampler {sampler!r} "
                         f"(field 'sampler'): its diffusers scheduler takes no "
                         f"{'custom noise levels' if custom else ', '.join(missing)}")
    made = cls(**{k: v for k, v in options.items() if k in accepted})
    if custom:
        samplers.use_custom_sigmas(made, scheduler)
    return made


def _k_sampler(sampler: str, scheduler: str) -> samplers.KSamplerScheduler:
    """modules/samplers' `sampler` on the sigmas of `scheduler`: the listed diffusers
    schedules as Euler computes them (so "karras" is the same noise levels for every
    sampler), or modules/samplers' own."""
    euler = EulerDiscreteScheduler(**{**SDXL_SCHEDULE, **SCHEDULERS.get(scheduler, {})})
    alphas_cumprod = euler.alphas_cumprod
    if scheduler in samplers.CUSTOM_SCHEDULES:
        def schedule(steps: int) -> list[float]:
            return samplers.custom_sigmas(scheduler, steps, alphas_cumprod)
    else:
        def schedule(steps: int) -> list[float]:
            euler.set_timesteps(steps)
            return [float(s) for s in euler.sigmas]
    edm = samplers.Parameterization(edm=scheduler in samplers.EDM_SCHEDULES)
    return samplers.KSamplerScheduler(sampler, schedule, alphas_cumprod, edm)


# -- stages -------------------------------------------------------------------------

def token_windows(tokenizer, prompt: str) -> torch.Tensor:
    """[k, 77] token ids: the prompt in windows of 75 tokens, each framed by start/end
    tokens and padded, so prompts longer than CLIP's 77 positions are not cut (as in
    Fooocus). A prompt that fits gives exactly the usual single padded row."""
    ids = tokenizer(prompt, add_special_tokens=False, truncation=False).input_ids
    return _windows(tokenizer, ids)


def _windows(tokenizer, ids: list[int]) -> torch.Tensor:
    width = tokenizer.model_max_length
    body = width - 2
    rows = []
    for start in range(0, max(len(ids), 1), body):
        row = [tokenizer.bos_token_id, *ids[start:start + body], tokenizer.eos_token_id]
        rows.append(row + [tokenizer.pad_token_id] * (width - len(row)))
    return torch.tensor(rows)


@dataclass
class PromptTokens:
    """Token windows of a prompt with embeddings: which positions take file vectors
    instead of token embeddings, and the per-position weights."""

    windows: torch.Tensor                                   # [k, 77] ids (placeholders where vectors go)
    vectors: dict[tuple[int, int], torch.Tensor]            # (window, position) -> vector
    weights: dict[tuple[int, int], float]                   # (window, position) -> weight != 1


# Any ordinary token id serves where a vector goes: the embedding hook overwrites its
# row. Id 1 ('"') is neither the end token (which CLIP pools at) nor either padding.
PLACEHOLDER_ID = 1


def embedding_tokens(tokenizer, prompt: str, embeddings: dict, encoder: str, width: int) -> PromptTokens:
    """Tokens of `prompt` for `encoder`, embedding references replaced by their vectors."""
    from modules.embeddings import split_prompt

    ids: list[int] = []
    flat_vectors: dict[int, torch.Tensor] = {}
    flat_weights: dict[int, float] = {}
    for segment in split_prompt(prompt):
        if segment.embedding is None:
            ids += tokenizer(segment.text, add_special_tokens=False, truncation=False).input_ids
            continue
        for vector in embeddings[segment.embedding].for_encoder(encoder, width):
            flat_vectors[len(ids)] = vector
            if segment.weight != 1.0:
                flat_weights[len(ids)] = segment.weight
            ids.append(PLACEHOLDER_ID)
    body = tokenizer.model_max_length - 2
    place = lambda i: (i // body, i % body + 1)  # noqa: E731  (window, position after the start token)
    return PromptTokens(windows=_windows(tokenizer, ids),
                        vectors={place(i): v for i, v in flat_vectors.items()},
                        weights={place(i): w for i, w in flat_weights.items()})


class _InsertVectors:
    """Forward hook on a token-embedding layer: rows at the given (window, position)
    become the embedding file's vectors. Registered only for one encoder call."""

    def __init__(self, vectors: dict[tuple[int, int], torch.Tensor]) -> None:
        self.vectors = vectors

    def __call__(self, module, inputs, output: torch.Tensor) -> torch.Tensor:
        output = output.clone()
        for (window, position), vector in self.vectors.items():
            output[window, position] = vector.to(output.device, output.dtype)
        return output


def _encode_windows(encoder, windows: torch.Tensor, vectors: dict, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(penultimate hidden states [k, 77, width], output[0]) of one encoder call."""
    hook = None
    if vectors:
        hook = encoder.get_input_embeddings().register_forward_hook(_InsertVectors(vectors))
    try:
        out = encoder(windows.to(device), output_hidden_states=True)
    finally:
        if hook is not None:
            hook.remove()
    return out.hidden_states[-2], out[0]


def _weighted(states: torch.Tensor, empty: torch.Tensor, weights: dict[tuple[int, int], float]) -> torch.Tensor:
    """Fooocus' (A1111-style) token weights: a weighted position moves away from the
    empty prompt's state by its weight, then each window keeps its original mean."""
    states = states.clone()
    for window in sorted({w for w, _ in weights}):
        original_mean = states[window].mean()
        for (w, position), weight in weights.items():
            if w == window:
                states[window, position] = (states[window, position] - empty[position]) * weight + empty[position]
        states[window] *= original_mean / states[window].mean()
    return states


def encode_prompt(clip: ModelPatcher, tokenizers: tuple, prompt: str, embeddings: dict | None = None) -> Conditioning:
    """SDXL conditioning: penultimate hidden states of both encoders side by side,
    pooled (projected) output of the second (from the first window).

    `embeddings`: name -> modules.embeddings.Embedding for the prompt's references."""
    model_management.load_models_gpu([clip])
    encoders: SDXLTextEncoders = clip.model  # type: ignore[assignment]
    device = clip.load_device
    hidden, pooled = [], None
    pairs = [(tokenizers[0], encoders.text_encoder, "text_encoder"),
             (tokenizers[1], encoders.text_encoder_2, "text_encoder_2")]
    with torch.inference_mode():
        for tokenizer, encoder, name in pairs:
            if encoder is None:
                continue
            if embeddings:
                width = encoder.get_input_embeddings().weight.shape[1]
                tokens = embedding_tokens(tokenizer, prompt, embeddings, name, width)
                states, first = _encode_windows(encoder, tokens.windows, tokens.vectors, device)
                if tokens.weights:
                    empty, _ = _encode_windows(encoder, token_windows(tokenizer, ""), {}, device)
                    states = _weighted(states, empty[0], tokens.weights)
            else:
                states, first = _encode_windows(encoder, token_windows(tokenizer, prompt), {}, device)
            hidden.append(states.reshape(1, -1, states.shape[-1]))   # windows side by side in sequence
            pooled = first[:1]
    return Conditioning(embeds=torch.cat(hidden, dim=-1), pooled=pooled)


def _same_length(embeds: list[torch.Tensor]) -> list[torch.Tensor]:
    """Repeat conditionings of different window counts up to a common length, so
    positive and negative can share one batch."""
    lengths = [e.shape[1] for e in embeds]
    common = math.lcm(*lengths)
    return [e.repeat(1, common // e.shape[1], 1) for e in embeds]


def time_ids(width: int, height: int, refiner: bool, aesthetic: float, device, dtype) -> torch.Tensor:
    """SDXL size/crop micro-conditioning (the refiner conditions on an aesthetic score)."""
    values = [height, width, 0, 0] + ([aesthetic] if refiner else [height, width])
    return torch.tensor([values], device=device, dtype=dtype)


@dataclass
class UNetStage:
    """One model's share of the steps: base, or the refiner after the switch."""

    unet: ModelPatcher
    positive: Conditioning
    negative: Conditioning | None
    refiner: bool = False


class SkipImage(Exception):
    """Raised by a step callback to finish the current image early."""


def latent_shape(unet: ModelPatcher, vae: ModelPatcher, width: int, height: int) -> tuple[int, int, int, int]:
    """(1, C, h, w) of the latents for an image: the VAE's downscale is 2^(levels-1), 8 for SDXL."""
    scale = 2 ** (len(vae.model.config.block_out_channels) - 1)
    return (1, unet.model.config.in_channels, height // scale, width // scale)


def kept_schedule(steps: int, denoise: float) -> tuple[int, int]:
    """(total, first kept index) of an image-to-image schedule, ComfyUI/Fooocus's rule:
    a schedule made for int(steps / denoise) steps of which the last `steps` run, so a
    smaller denoise starts from a lower noise level with the same number of UNet calls.
    denoise 1 is the whole schedule (today's text-to-image)."""
    if not 0.0 < denoise <= 1.0:
        raise ValueError(f"denoise must be in (0, 1], got {denoise}")
    if denoise >= 0.9999:
        return steps, 0
    total = int(steps / denoise)
    return total, total - steps


def _start_at(sched, total: int, start: int, device) -> torch.Tensor:
    """Set the scheduler to `total` steps and return the timesteps from index `start` on.
    Schedulers that count steps (Euler, DPM++, UniPC, LCM...) are told where they begin,
    so their sigma index (and `add_noise`) follow the kept part; second-order ones
    (Heun, DPM2) hold two entries per step after the first."""
    if isinstance(sched, samplers.KSamplerScheduler):   # runs its algorithm on the kept sigmas
        return sched.start_at(total, start, device)
    sched.set_timesteps(total, device=device)
    first = start * getattr(sched, "order", 1)
    if hasattr(sched, "set_begin_index"):
        sched.set_begin_index(first)
    return sched.timesteps[first:]


def _noised(sched, init: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """`init` at the noise level of timestep `t` (the scheduler's own rule: x + sigma*n
    for the sigma schedulers, sqrt(a)*x + sqrt(1-a)*n for DDPM-style ones like LCM)."""
    return sched.add_noise(init, noise, t.reshape(1))


def _check_img2img(shape, init_latents: torch.Tensor | None, mask: torch.Tensor | None) -> None:
    if init_latents is not None and tuple(init_latents.shape) != tuple(shape):
        raise ValueError(f"init_latents has shape {tuple(init_latents.shape)}, the latents are {tuple(shape)}")
    if mask is not None:
        if init_latents is None:
            raise ValueError("a mask needs init_latents (what to keep outside it)")
        if mask.shape[-2:] != tuple(shape[-2:]):
            raise ValueError(f"mask has size {tuple(mask.shape[-2:])}, the latents are {tuple(shape[-2:])}")


def sample(stages: list[UNetStage], *, sampler: str, scheduler: str, steps: int, cfg: float,
           width: int, height: int, seed: int, shape: tuple[int, int, int, int],
           switch_step: int | None = None, callback: Callable[[int, int, torch.Tensor], None] | None = None,
           guidance: guidance_mod.Guidance = guidance_mod.NEUTRAL,
           init_latents: torch.Tensor | None = None, denoise: float = 1.0,
           mask: torch.Tensor | None = None) -> torch.Tensor:
    """Denoise one image of latent `shape`; returns latents. `switch_step` hands over to stages[1].
    `guidance`: sharpness and ADM scaling (modules/guidance.py), computed per step.

    Image to image: `init_latents` (VAE-encoded and scaled, `shape`) noised to the first
    kept timestep of the `denoise` schedule (see kept_schedule) replace pure noise.
    Inpainting: where `mask` (latent size, 1 = repaint, 0 = keep) is 0 the latents are
    put back to init_latents at the current noise level after every step, and to
    init_latents exactly after the last, so any checkpoint can inpaint."""
    _check_img2img(shape, init_latents, mask)
    sched = make_scheduler(sampler, scheduler)
    first = stages[0].unet
    device = first.load_device
    # With image-prompt controls applied to the UNet, their ControlNets load with it.
    model_management.load_models_gpu(*controlnet.with_controls(first, model_management.working_memory_bytes(
        "unet", width, height, 1, first.model_dtype())))
    total, start = kept_schedule(steps, denoise) if init_latents is not None else (steps, 0)
    timesteps = _start_at(sched, total, start, device) if init_latents is not None else None
    if timesteps is None:
        sched.set_timesteps(steps, device=device)
        timesteps = sched.timesteps
    # Noise is drawn on the CPU so a seed gives the same image on every device; the
    # same generator then feeds the stochastic samplers, as in diffusers' pipeline.
    generator = torch.Generator("cpu").manual_seed(seed)
    noise = torch.randn(shape, generator=generator, dtype=torch.float32).to(device)
    if init_latents is None:
        latents = noise * sched.init_noise_sigma
    else:
        init_latents = init_latents.to(device, torch.float32)
        latents = _noised(sched, init_latents, noise, timesteps[0])
    keep = None if mask is None else 1.0 - mask.to(device, torch.float32)
    active = 0
    denoised = latents
    with torch.inference_mode():
        for i, t in enumerate(timesteps):
            if switch_step is not None and i == switch_step and len(stages) > 1 and active == 0:
                active = 1
                model_management.load_models_gpu([stages[1].unet], model_management.working_memory_bytes(
                    "unet", width, height, 1, stages[1].unet.model_dtype()))
            stage = stages[active]
            noise_pred = _predict(stage, sched, latents, t, cfg, width, height, guidance)
            out = sched.step(noise_pred, t, latents, generator=generator, return_dict=True)
            latents = out.prev_sample
            denoised = getattr(out, "pred_original_sample", None)
            if denoised is None:
                denoised = getattr(out, "denoised", None)
            if keep is not None:
                last = i + 1 == len(timesteps)
                latents, denoised = _keep_outside(sched, latents, denoised, init_latents, noise, keep,
                                                  None if last else timesteps[i + 1])
            try:
                if callback is not None:   # (step, steps, x0 estimate: a preview may use it)
                    callback(i + 1, steps, denoised if denoised is not None else latents)
            except SkipImage:
                return denoised if denoised is not None else latents
    return latents


def _keep_outside(sched, latents, denoised, init, noise, keep, next_t):
    """Masked latent blending: outside the mask the latents become init at the next
    step's noise level (exactly init after the last step); the x0 estimate shows init there."""
    target = init if next_t is None else _noised(sched, init, noise, next_t)
    latents = latents * (1.0 - keep) + target * keep
    if denoised is not None:
        denoised = denoised * (1.0 - keep) + init * keep
    return latents, denoised


# Upstream (ComfyUI's cond concatenation) also refuses to pad a conditioning to more
# than 4x its length: past that, two batches of their own sizes cost less.
MAX_PAD_FACTOR = 4


def cond_batches(lengths: list[int]) -> list[list[int]]:
    """Indices of the conditionings that share one UNet batch. Different window counts
    are repeated to their least common multiple only while that costs at most
    MAX_PAD_FACTOR x the shortest; otherwise each runs in its own batch (23 against 19
    windows would be 437 windows each, 19x the work)."""
    if len(set(lengths)) <= 1 or math.lcm(*lengths) // min(lengths) <= MAX_PAD_FACTOR:
        return [list(range(len(lengths)))]
    return [[i] for i in range(len(lengths))]


def _predict(stage: UNetStage, sched, latents: torch.Tensor, t, cfg: float, width: int, height: int,
             guidance: guidance_mod.Guidance = guidance_mod.NEUTRAL) -> torch.Tensor:
    unet = stage.unet.model
    dtype = stage.unet.model_dtype()
    guided = cfg > 1.0 and stage.negative is not None
    conds = [stage.negative, stage.positive] if guided else [stage.positive]
    aesthetic = [2.5, 6.0] if guided else [6.0]
    all_ids = torch.cat([time_ids(width, height, stage.refiner, a, latents.device, dtype) for a in aesthetic])
    if not stage.refiner:   # rows: negative, then positive
        all_ids = guidance_mod.scaled_size_ids(all_ids, float(t), guidance, guided)
    preds = []
    positive_rows = [False, True] if guided else [True]
    for batch in cond_batches([c.embeds.shape[1] for c in conds]):
        # Image prompts give the negative rows the empty image's tokens (a no-op without them).
        ip_adapter.select_batch(unet, [positive_rows[i] for i in batch], timestep=t)
        embeds = torch.cat(_same_length([conds[i].embeds for i in batch])).to(dtype)
        pooled = torch.cat([conds[i].pooled for i in batch]).to(dtype)
        ids = all_ids[batch]
        model_input = sched.scale_model_input(torch.cat([latents] * len(batch)), t).to(dtype)
        # PyraCanny/CPDS controls acting at t (None without): their residuals, per row of the batch.
        control = controlnet.residuals(unet, model_input, t, embeds, pooled, ids)
        preds.append(UNET_COMPILER(unet, model_input, t, embeds, pooled, ids, control).float())
    pred = torch.cat(preds)
    if guided:
        uncond, cond = pred.chunk(2)
        if guidance.sharpness:
            cond = guidance_mod.sharpen(cond, sched.scale_model_input(latents, t), float(t), guidance,
                                        sched.alphas_cumprod)
        pred = uncond + cfg * (cond - uncond)
    return pred


# Images over VAE_TILE_ABOVE pixels go through the VAE in tiles (its working memory is one
# tile's, and a Stop takes effect between two tiles); smaller ones in one pass, as diffusers'
# pipeline does, so their pixels do not depend on tiling. Sizes in image pixels.
VAE_TILE_ABOVE = 2 * 1024 * 1024
VAE_TILE, VAE_TILE_OVERLAP = 1024, 256


def _tiled_vae(width: int, height: int) -> bool:
    return width * height > VAE_TILE_ABOVE


def decode(vae: ModelPatcher, latents: torch.Tensor, width: int, height: int,
           interrupt: Callable[[], None] | None = None) -> np.ndarray:
    """Latents -> HxWx3 uint8 image. `interrupt` runs before each tile (large images) or the
    one pass, and may raise to stop."""
    tiled = _tiled_vae(width, height)
    side = min(VAE_TILE, width), min(VAE_TILE, height)
    model_management.load_models_gpu([vae], model_management.working_memory_bytes(
        "vae", *(side if tiled else (width, height)), latents.shape[0], vae.model_dtype()))
    model = vae.model
    factor = 2 ** (len(model.config.block_out_channels) - 1)

    def run(part: torch.Tensor) -> torch.Tensor:
        return model.decode(part, return_dict=False)[0].float()

    with torch.inference_mode():
        scaled = latents.to(vae.load_device, vae.model_dtype()) / model.config.scaling_factor
        if tiled:
            image = tiling.run_tiled(run, scaled, VAE_TILE // factor, VAE_TILE_OVERLAP // factor, Fraction(factor),
                                     interrupt)
        else:
            if interrupt is not None:
                interrupt()
            image = run(scaled)
    image = (image / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).cpu().numpy()
    return (image * 255).round().astype(np.uint8)


def _crop_to_multiple(pixels: np.ndarray, multiple: int) -> np.ndarray:
    """Centre crop to a multiple of the VAE's downscale, as upstream's VAE encode does:
    the latents then decode to exactly the cropped size."""
    height, width = pixels.shape[:2]
    h, w = height // multiple * multiple, width // multiple * multiple
    top, left = (height - h) // 2, (width - w) // 2
    return pixels[top:top + h, left:left + w]


def encode(vae: ModelPatcher, pixels: np.ndarray, interrupt: Callable[[], None] | None = None) -> torch.Tensor:
    """HxWx3 uint8 image -> latents (1, C, h, w) scaled by the VAE's scaling factor, the
    inverse of `decode`. The posterior's mean is used, not a sample, so the same image
    and seed always give the same result. Sizes not a multiple of the VAE's downscale
    (8 for SDXL) are centre-cropped to one. `interrupt` as in `decode`."""
    if pixels.ndim != 3 or pixels.shape[2] != 3 or pixels.dtype != np.uint8:
        raise ValueError(f"encode expects an HxWx3 uint8 image, got {pixels.dtype} {pixels.shape}")
    model = vae.model
    factor = 2 ** (len(model.config.block_out_channels) - 1)
    pixels = _crop_to_multiple(pixels, factor)
    height, width = pixels.shape[:2]
    tiled = _tiled_vae(width, height)
    side = min(VAE_TILE, width), min(VAE_TILE, height)
    model_management.load_models_gpu([vae], model_management.working_memory_bytes(
        "vae", *(side if tiled else (width, height)), 1, vae.model_dtype()))
    image = torch.from_numpy(np.array(pixels)).permute(2, 0, 1)[None].float() / 127.5 - 1.0

    def run(part: torch.Tensor) -> torch.Tensor:
        return model.encode(part.to(vae.load_device, vae.model_dtype()), return_dict=False)[0].mode().float()

    with torch.inference_mode():
        if tiled:
            latents = tiling.run_tiled(run, image, VAE_TILE, VAE_TILE_OVERLAP, Fraction(1, factor), interrupt)
        else:
            if interrupt is not None:
                interrupt()
            latents = run(image)
    return latents * model.config.scaling_factor
