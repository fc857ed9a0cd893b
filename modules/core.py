"""Prompt encoding, the sampling loop and VAE encoding/decoding, on patchers.

Every stage first asks `model_management.load_models_gpu` for its model: that is
the only place weights move or get patched. The networks are diffusers /
transformers modules; the loop follows diffusers' SDXL pipeline step for step
(same noise, same scheduler calls), so a request matches
`StableDiffusionXLPipeline` on the same weights.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections import Counter
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Callable, Iterable, Sequence

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


# Upstream's default CLIP skip: the penultimate layer's hidden states condition SDXL.
DEFAULT_CLIP_SKIP = 2


def _encode_windows(encoder, windows: torch.Tensor, vectors: dict, device,
                    clip_skip: int = DEFAULT_CLIP_SKIP) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden states [k, 77, width] of the `clip_skip`-th layer from the end, output[0]) of
    one encoder call. As upstream (ComfyUI's clip_layer), a skip past the first layer takes
    the final, normed output; the pooled output never changes with it."""
    hook = None
    if vectors:
        hook = encoder.get_input_embeddings().register_forward_hook(_InsertVectors(vectors))
    try:
        out = encoder(windows.to(device), output_hidden_states=True)
    finally:
        if hook is not None:
            hook.remove()
    if clip_skip >= len(out.hidden_states):
        return out.last_hidden_state, out[0]
    return out.hidden_states[-clip_skip], out[0]


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


def encode_prompt(clip: ModelPatcher, tokenizers: tuple, prompt: str, embeddings: dict | None = None,
                  clip_skip: int = DEFAULT_CLIP_SKIP) -> Conditioning:
    """SDXL conditioning: penultimate hidden states of both encoders side by side,
    pooled (projected) output of the second (from the first window).

    `embeddings`: name -> modules.embeddings.Embedding for the prompt's references.
    `clip_skip`: which layer from the end gives the hidden states, in both encoders."""
    return encode_prompts(clip, tokenizers, [prompt], [embeddings], clip_skip)[0]


def encode_prompts(clip: ModelPatcher, tokenizers: tuple, prompts: Sequence[str],
                   embeddings: Sequence[dict | None] | None = None,
                   clip_skip: int = DEFAULT_CLIP_SKIP) -> list[Conditioning]:
    """`encode_prompt` of several prompts in one call per encoder: every prompt's token
    windows are rows of one batch (CLIP reads each 77-token window on its own).

    `embeddings`: per prompt, the embeddings its references name (or None)."""
    model_management.load_models_gpu([clip])
    encoders: SDXLTextEncoders = clip.model  # type: ignore[assignment]
    device = clip.load_device
    per_prompt = list(embeddings) if embeddings is not None else [None] * len(prompts)
    hidden: list[list[torch.Tensor]] = [[] for _ in prompts]
    pooled: list[torch.Tensor | None] = [None] * len(prompts)
    pairs = [(tokenizers[0], encoders.text_encoder, "text_encoder"),
             (tokenizers[1], encoders.text_encoder_2, "text_encoder_2")]
    with torch.inference_mode():
        for tokenizer, encoder, name in pairs:
            if encoder is None:
                continue
            tokens = [_prompt_tokens(tokenizer, encoder, name, prompt, found)
                      for prompt, found in zip(prompts, per_prompt)]
            starts = [0]
            for token in tokens:
                starts.append(starts[-1] + token.windows.shape[0])
            vectors = {(start + window, position): vector for start, token in zip(starts, tokens)
                       for (window, position), vector in token.vectors.items()}
            states, first = _encode_windows(encoder, torch.cat([t.windows for t in tokens]), vectors, device,
                                            clip_skip)
            empty = None
            for i, token in enumerate(tokens):
                own = states[starts[i]:starts[i + 1]]
                if token.weights:
                    if empty is None:
                        empty, _ = _encode_windows(encoder, token_windows(tokenizer, ""), {}, device, clip_skip)
                    own = _weighted(own, empty[0], token.weights)
                hidden[i].append(own.reshape(1, -1, own.shape[-1]))   # windows side by side in sequence
                pooled[i] = first[starts[i]:starts[i] + 1]
    return [Conditioning(embeds=torch.cat(h, dim=-1), pooled=p) for h, p in zip(hidden, pooled)]


def _prompt_tokens(tokenizer, encoder, name: str, prompt: str, embeddings: dict | None) -> PromptTokens:
    if not embeddings:
        return PromptTokens(windows=token_windows(tokenizer, prompt), vectors={}, weights={})
    width = encoder.get_input_embeddings().weight.shape[1]
    return embedding_tokens(tokenizer, prompt, embeddings, name, width)


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


@dataclass
class BatchImage:
    """One image of a sampling batch: its seed (its own noise stream, as if it ran alone)
    and its conditionings, one UNetStage per model (base, then the refiner)."""

    seed: int
    stages: list[UNetStage]


@dataclass
class UNetCalls:
    """UNet forward calls and the rows each carried, counted where the UNet is called.
    Cumulative: a request reads its share with `mark()` and `since()`."""

    calls: int = 0
    rows: Counter = field(default_factory=Counter)   # rows in one call -> calls with that many

    def count(self, rows: int) -> None:
        self.calls += 1
        self.rows[rows] += 1

    def mark(self) -> "UNetCalls":
        return UNetCalls(self.calls, Counter(self.rows))

    def since(self, mark: "UNetCalls") -> "UNetCalls":
        return UNetCalls(self.calls - mark.calls, self.rows - mark.rows)

    def add(self, other: "UNetCalls") -> None:
        self.calls += other.calls
        self.rows.update(other.rows)


UNET_CALLS = UNetCalls()


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


def sample(stages: list[UNetStage], *, seed: int, **options) -> torch.Tensor | None:
    """Denoise one image: `sample_batch` of one (None if the callback dropped it)."""
    return sample_batch([BatchImage(seed, stages)], **options)[0]


# A step callback: (step, steps, {image position: its x0 estimate}) -> positions to drop now.
StepCallback = Callable[[int, int, dict[int, torch.Tensor]], Iterable[int] | None]


def sample_batch(images: Sequence[BatchImage], *, sampler: str, scheduler: str, steps: int, cfg: float,
                 width: int, height: int, shape: tuple[int, int, int, int], switch_step: int | None = None,
                 callback: StepCallback | None = None, guidance: guidance_mod.Guidance = guidance_mod.NEUTRAL,
                 init_latents: torch.Tensor | None = None, denoise: float = 1.0,
                 mask: torch.Tensor | None = None, swap: str = "joint",
                 swap_latents: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 start_latents: torch.Tensor | None = None) -> list[torch.Tensor | None]:
    """Denoise images of latent `shape` (one image's) together; returns each one's latents,
    None for those the callback dropped. `switch_step` hands over to stages[1].
    `guidance`: sharpness and ADM scaling (modules/guidance.py), computed per step.

    Each image has its own generator (its seed) and its own scheduler, so its noise and any
    ancestral/SDE noise are drawn exactly as when it runs alone; only the UNet calls are
    shared (`_predict_batch`). The callback runs after every step and may drop images:
    their rows leave the next UNet call.

    Image to image: `init_latents` (VAE-encoded and scaled, `shape`) noised to the first
    kept timestep of the `denoise` schedule (see kept_schedule) replace pure noise.
    Inpainting: where `mask` (latent size, 1 = repaint, 0 = keep) is 0 the latents are
    put back to init_latents at the current noise level after every step, and to
    init_latents exactly after the last, so any checkpoint can inpaint.

    `swap`: how the refiner takes over at `switch_step` (upstream's refiner_swap_method).
    "joint": the same sampler run goes on with the refiner's UNet. "separate": a fresh
    sampler run from the switch's noise level, from the latents as they are (no new noise;
    a multistep sampler's history starts over). "vae": the base's x0 estimate at the switch
    (through `swap_latents` when given, for a refiner of another latent space; an SDXL
    refiner shares the base's, and upstream then passes the latents on as they are) is
    noised again with fresh noise (seed + 1) whose channel mean is the one of the base's last
    noise prediction (upstream's noise_mean), and sampled from there on the rest of the
    schedule with every noise level times VAE_SWAP_SIGMA_SCALE (upstream's k_sigmas), for
    the schedulers that step on a sigma list one UNet call per step (see _scale_schedule;
    the others go on at the schedule's own levels).
    `start_latents`, when given, are noised instead of init_latents for the start (upstream's
    disabled initial latent: zeros), init_latents still being what the mask keeps."""
    _check_img2img(shape, init_latents, mask)
    first = images[0].stages[0].unet
    device = first.load_device
    _load_unet(first, width, height, len(images))
    if init_latents is not None:
        init_latents = init_latents.to(device, torch.float32)
    start = init_latents if start_latents is None else start_latents.to(device, torch.float32)
    flights = [_InFlight.start(position, image, sampler, scheduler, steps, denoise, shape, device, start)
               for position, image in enumerate(images)]
    keep = None if mask is None else 1.0 - mask.to(device, torch.float32)
    timesteps = flights[0].timesteps
    live = list(flights)
    active = 0
    rescaled: tuple[int, torch.Tensor] | None = None   # (loop index it starts at, the vae swap's timesteps)
    switch_at = None if switch_step is None else _call_of_step(flights[0].sched, switch_step)
    with torch.inference_mode():
        for i, t in enumerate(timesteps):
            if switch_at is not None and i == switch_at and len(images[0].stages) > 1 and active == 0:
                active = 1
                if swap != "joint":
                    for flight in live:
                        flight.restart(sampler, scheduler, steps, denoise, switch_step, device,
                                       (swap_latents or _same_latents) if swap == "vae" else None)
                    if swap == "vae" and live[0].rescaled:
                        rescaled = (i, live[0].timesteps)
                _load_unet(images[0].stages[1].unet, width, height, len(live))
            if rescaled is not None:
                t = rescaled[1][i - rescaled[0]]
            preds = _predict_batch([(f.image.stages[active], f.sched, f.latents) for f in live], t, cfg,
                                   width, height, guidance)
            next_t = (None if i + 1 == len(timesteps) else
                      timesteps[i + 1] if rescaled is None else rescaled[1][i + 1 - rescaled[0]])
            for flight, pred in zip(live, preds):
                flight.step(pred, t, init_latents, keep, next_t)
            if callback is not None:   # (step, steps, x0 estimates: a preview may use them)
                dropped = set(callback(i + 1, steps, {f.position: f.estimate() for f in live}) or ())
                live = [f for f in live if f.position not in dropped]
                if not live:
                    break
    kept = {f.position for f in live}
    return [f.latents if f.position in kept else None for f in flights]


def batchable(sampler: str) -> bool:
    """Whether images of this sampler can share UNet calls: not an adaptive one, which picks
    each image's noise levels from that image's own error (upstream sizes them on the batch)."""
    return sampler not in samplers.ADAPTIVE


def _load_unet(unet: ModelPatcher, width: int, height: int, images: int) -> None:
    """A sampling stage's UNet, with the image-prompt ControlNets applied to it (they load
    together, so a conservative load evicts neither)."""
    model_management.load_models_gpu(*controlnet.with_controls(unet, model_management.working_memory_bytes(
        "unet", width, height, images, unet.model_dtype())))


def unet_batch_size(unet: ModelPatcher, width: int, height: int, wanted: int) -> int:
    """How many images of this size the UNet can denoise in one batch: the UNet is loaded,
    then the ledger says how many images' working memory fit beside it (1 to `wanted`)."""
    per_image = model_management.working_memory_bytes("unet", width, height, 1, unet.model_dtype())
    model_management.load_models_gpu([unet], per_image)
    return model_management.batch_that_fits([unet], per_image, wanted)


@dataclass(eq=False)
class _InFlight:
    """One image's denoising state: its own scheduler (multistep samplers keep history per
    image) and its own generator, as when it runs alone."""

    position: int
    image: BatchImage
    sched: Any
    timesteps: torch.Tensor
    generator: torch.Generator
    noise: torch.Tensor
    latents: torch.Tensor
    denoised: torch.Tensor | None = None
    eps: torch.Tensor | None = None    # the last guided noise prediction (upstream's eps_record)
    rescaled: bool = False             # a vae swap scaled the rest of its schedule

    @classmethod
    def start(cls, position: int, image: BatchImage, sampler: str, scheduler: str, steps: int, denoise: float,
              shape, device, init_latents: torch.Tensor | None) -> "_InFlight":
        sched = make_scheduler(sampler, scheduler)
        if init_latents is not None:
            total, first = kept_schedule(steps, denoise)
            timesteps = _start_at(sched, total, first, device)
        else:
            sched.set_timesteps(steps, device=device)
            timesteps = sched.timesteps
        # Noise is drawn on the CPU so a seed gives the same image on every device; the
        # same generator then feeds the stochastic samplers, as in diffusers' pipeline.
        generator = torch.Generator("cpu").manual_seed(image.seed)
        noise = torch.randn(shape, generator=generator, dtype=torch.float32).to(device)
        latents = (noise * sched.init_noise_sigma if init_latents is None
                   else _noised(sched, init_latents, noise, timesteps[0]))
        return cls(position, image, sched, timesteps, generator, noise, latents, latents)

    def step(self, pred: torch.Tensor, t, init_latents: torch.Tensor | None, keep: torch.Tensor | None,
             next_t) -> None:
        self.eps = pred
        extra = {"generator": self.generator} if _takes_generator(self.sched) else {}
        out = self.sched.step(pred, t, self.latents, return_dict=True, **extra)
        self.latents = out.prev_sample
        denoised = getattr(out, "pred_original_sample", None)
        self.denoised = denoised if denoised is not None else getattr(out, "denoised", None)
        if keep is not None:
            self.latents, self.denoised = _keep_outside(self.sched, self.latents, self.denoised, init_latents,
                                                        self.noise, keep, next_t)

    def estimate(self) -> torch.Tensor:
        return self.denoised if self.denoised is not None else self.latents

    def restart(self, sampler: str, scheduler: str, steps: int, denoise: float, switch_step: int, device,
                swap_latents: Callable[[torch.Tensor], torch.Tensor] | None) -> None:
        """A fresh scheduler on the same schedule, from step `switch_step` on (separate and
        vae swaps). With `swap_latents` (vae swap, as upstream's) the latents become the x0
        estimate through it; the rest of the schedule's noise levels are scaled by
        VAE_SWAP_SIGMA_SCALE where the scheduler allows (`rescaled`), and the latents are
        noised to its first level with fresh noise of seed + 1, its mean over the channels
        replaced by that of the base's last noise prediction."""
        total, first = kept_schedule(steps, denoise)
        self.sched = make_scheduler(sampler, scheduler)
        self.timesteps = _start_at(self.sched, total, first + switch_step, device)
        if swap_latents is not None:
            clean = swap_latents(self.estimate()).to(device, torch.float32)
            timesteps = _scale_schedule(self.sched, VAE_SWAP_SIGMA_SCALE, device)
            self.rescaled = timesteps is not None
            if self.rescaled:
                self.timesteps = timesteps
            self.generator = torch.Generator("cpu").manual_seed(self.image.seed + 1)
            noise = torch.randn(tuple(clean.shape), generator=self.generator, dtype=torch.float32).to(device)
            edm = getattr(getattr(self.sched, "parameterization", None), "edm", False)   # its output is no eps
            if self.eps is not None and self.eps.shape == noise.shape and not edm:
                noise = noise - noise.mean(dim=1, keepdim=True) + self.eps.float().mean(dim=1, keepdim=True)
            self.noise = noise
            self.latents = _noised(self.sched, clean, self.noise, self.timesteps[0])


def _call_of_step(sched, step: int) -> int:
    """The index among the scheduler's UNet calls (its `timesteps`) where sampling step
    `step` begins: the step itself for one call per step; twice it for diffusers' second-order
    schedulers (Heun, DPM2: two entries per step but the last); for a k-diffusion algorithm
    with several calls per step, the last call at that step's sigma (the step before may end
    with a call at it too), else `step` (adaptive ones: their calls are not known)."""
    if isinstance(sched, samplers.KSamplerScheduler):
        if sched._planned is None or step >= len(sched.sigmas) - 1:
            return step
        level = sched.sigmas[step]
        return max((j for j, asked in enumerate(sched._planned) if asked == level), default=step)
    return step * getattr(sched, "order", 1)


def _takes_generator(sched) -> bool:
    """Whether the scheduler's step draws noise from a generator (UniPC, Heun and DPM2 take
    none: they are deterministic). Asked every step: answered once per scheduler class."""
    return _step_takes_generator(type(sched))


@functools.lru_cache(maxsize=None)
def _step_takes_generator(kind: type) -> bool:
    return "generator" in inspect.signature(kind.step).parameters


def _same_latents(latents: torch.Tensor) -> torch.Tensor:
    return latents


# Upstream's vae refiner swap goes on from the switch with every remaining noise level
# times this (its k_sigmas): the x0 estimate is noised a little above where the base left.
VAE_SWAP_SIGMA_SCALE = 1.4
# diffusers' schedulers that step on their `sigmas` list, one UNet call per step; the
# second-order ones (Heun, DPM2) interleave intermediate levels, the DDPM-style ones
# (DDIM, DDPM, LCM, TCD) step on the alphas of discrete timesteps.
_SIGMA_STEPPERS = (EulerDiscreteScheduler, EulerAncestralDiscreteScheduler, DPMSolverMultistepScheduler,
                   UniPCMultistepScheduler)


def _scale_schedule(sched, factor: float, device) -> torch.Tensor | None:
    """Multiply the noise levels from the scheduler's start on by `factor`, the UNet's
    timesteps following (the nearest training timestep in log-sigma, as upstream's model
    sampling); returns the timesteps from the start. None, unchanged, for a scheduler
    without such a list (see _SIGMA_STEPPERS) or a k-diffusion algorithm that is adaptive
    or makes more than one call per step."""
    if isinstance(sched, samplers.KSamplerScheduler):
        if sched.name in samplers.ADAPTIVE or len(sched.timesteps) != len(sched.sigmas) - 1:
            return None
        sched._begin([sigma * factor for sigma in sched.sigmas], device)
        return sched.timesteps
    if not isinstance(sched, _SIGMA_STEPPERS) or getattr(sched, "order", 1) != 1:
        return None
    begin = sched.begin_index or 0
    sigmas = sched.sigmas.clone()
    sigmas[begin:] = sigmas[begin:] * factor
    log_table = torch.from_numpy(np.log(samplers.training_sigmas(sched.alphas_cumprod)))
    levels = sigmas[begin:len(sched.timesteps)].double().cpu().log()
    nearest = (levels[:, None] - log_table[None, :]).abs().argmin(dim=1)
    timesteps = sched.timesteps.clone()
    timesteps[begin:] = nearest.to(timesteps.device, timesteps.dtype)
    sched.sigmas, sched.timesteps = sigmas, timesteps
    return timesteps[begin:]


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
    """One image's guided noise prediction."""
    return _predict_batch([(stage, sched, latents)], t, cfg, width, height, guidance)[0]


@dataclass
class _UNetRow:
    """One row of a UNet call: an image's positive or negative conditioning, padded as alone."""

    image: int
    cond: int            # index in the image's [negative, positive] (or [positive])
    positive: bool
    embeds: torch.Tensor
    pooled: torch.Tensor
    ids: torch.Tensor
    sample: torch.Tensor


def _predict_batch(images: Sequence[tuple[UNetStage, Any, torch.Tensor]], t, cfg: float, width: int,
                   height: int, guidance: guidance_mod.Guidance = guidance_mod.NEUTRAL) -> list[torch.Tensor]:
    """Guided noise predictions of several images (stage, own scheduler, latents) in as few
    UNet calls as their conditionings allow. Each image's rows are padded exactly as when it
    runs alone (`cond_batches`); rows of equal padded length share one call; guidance and
    sharpness are then applied per image, as alone."""
    unet = images[0][0].unet.model
    dtype = images[0][0].unet.model_dtype()
    calls: dict[int, list[_UNetRow]] = {}   # padded length -> its rows
    guided = []
    for index, (stage, sched, latents) in enumerate(images):
        guided.append(cfg > 1.0 and stage.negative is not None)
        conds = [stage.negative, stage.positive] if guided[-1] else [stage.positive]
        aesthetic = [2.5, 6.0] if guided[-1] else [6.0]
        ids = torch.cat([time_ids(width, height, stage.refiner, a, latents.device, dtype) for a in aesthetic])
        if not stage.refiner:   # rows: negative, then positive
            ids = guidance_mod.scaled_size_ids(ids, float(t), guidance, guided[-1])
        sample = sched.scale_model_input(latents, t)
        for batch in cond_batches([c.embeds.shape[1] for c in conds]):
            padded = _same_length([conds[i].embeds for i in batch])
            for i, embeds in zip(batch, padded):
                row = _UNetRow(index, i, positive=i == len(conds) - 1, embeds=embeds, pooled=conds[i].pooled,
                               ids=ids[i:i + 1], sample=sample)
                calls.setdefault(embeds.shape[1], []).append(row)
    outputs: list[dict[int, torch.Tensor]] = [{} for _ in images]
    for rows in calls.values():
        # Image prompts give the negative rows the empty image's tokens (a no-op without them).
        ip_adapter.select_batch(unet, [r.positive for r in rows], timestep=t)
        embeds = torch.cat([r.embeds for r in rows]).to(dtype)
        pooled = torch.cat([r.pooled for r in rows]).to(dtype)
        ids = torch.cat([r.ids for r in rows])
        model_input = torch.cat([r.sample for r in rows]).to(dtype)
        # PyraCanny/CPDS controls acting at t (None without): their residuals, per row of the call.
        control = controlnet.residuals(unet, model_input, t, embeds, pooled, ids)
        UNET_CALLS.count(len(rows))
        pred = UNET_COMPILER(unet, model_input, t, embeds, pooled, ids, control).float()
        for row, out in zip(rows, pred.split(1)):
            outputs[row.image][row.cond] = out
    preds = []
    for (stage, sched, latents), out, is_guided in zip(images, outputs, guided):
        if not is_guided:
            preds.append(out[0])
            continue
        uncond, cond = out[0], out[1]
        if guidance.sharpness:
            cond = guidance_mod.sharpen(cond, sched.scale_model_input(latents, t), float(t), guidance,
                                        sched.alphas_cumprod)
        preds.append(uncond + guidance.cfg_at(cfg, float(t)) * (cond - uncond))
    return preds


# Images over VAE_TILE_ABOVE pixels go through the VAE in tiles (its working memory is one
# tile's, and a Stop takes effect between two tiles); smaller ones in one pass, as diffusers'
# pipeline does, so their pixels do not depend on tiling. Sizes in image pixels.
VAE_TILE_ABOVE = 2 * 1024 * 1024
VAE_TILE, VAE_TILE_OVERLAP = 1024, 256


def _tiled_vae(width: int, height: int) -> bool:
    return width * height > VAE_TILE_ABOVE


def decode(vae: ModelPatcher, latents: torch.Tensor, width: int, height: int,
           interrupt: Callable[[], None] | None = None) -> np.ndarray:
    """Latents -> HxWx3 uint8 image."""
    return decode_batch(vae, [latents], width, height, interrupt)[0]


def decode_batch(vae: ModelPatcher, latents: Sequence[torch.Tensor], width: int, height: int,
                 interrupt: Callable[[], None] | None = None) -> list[np.ndarray]:
    """Latents of several images -> HxWx3 uint8 images. Small images go in as few VAE calls
    as the ledger leaves room for (each call's working memory beside the loaded VAE); a large
    one alone, in tiles. `interrupt` runs before each call or tile, and may raise to stop."""
    if _tiled_vae(width, height):
        return [_decode_tiled(vae, one, width, height, interrupt) for one in latents]
    per_image = model_management.working_memory_bytes("vae", width, height, 1, vae.model_dtype())
    model_management.load_models_gpu([vae], per_image)
    batch = model_management.batch_that_fits([vae], per_image, len(latents))
    if batch > 1:   # room for the whole batch's activations
        model_management.load_models_gpu([vae], batch * per_image)
    model = vae.model
    images = []
    for start in range(0, len(latents), batch):
        if interrupt is not None:
            interrupt()
        with torch.inference_mode():
            chunk = torch.cat(list(latents[start:start + batch]))
            scaled = chunk.to(vae.load_device, vae.model_dtype()) / model.config.scaling_factor
            image = model.decode(scaled, return_dict=False)[0].float()
        images += _to_pixels(image)
    return images


def _decode_tiled(vae: ModelPatcher, latents: torch.Tensor, width: int, height: int,
                  interrupt: Callable[[], None] | None) -> np.ndarray:
    """One large image through the VAE tile by tile (working memory: one tile's)."""
    side = min(VAE_TILE, width), min(VAE_TILE, height)
    model_management.load_models_gpu([vae], model_management.working_memory_bytes(
        "vae", *side, latents.shape[0], vae.model_dtype()))
    model = vae.model
    factor = 2 ** (len(model.config.block_out_channels) - 1)

    def run(part: torch.Tensor) -> torch.Tensor:
        return model.decode(part, return_dict=False)[0].float()

    with torch.inference_mode():
        scaled = latents.to(vae.load_device, vae.model_dtype()) / model.config.scaling_factor
        image = tiling.run_tiled(run, scaled, VAE_TILE // factor, VAE_TILE_OVERLAP // factor, Fraction(factor),
                                 interrupt)
    return _to_pixels(image)[0]


def _to_pixels(image: torch.Tensor) -> list[np.ndarray]:
    pixels = (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    return [(p * 255).round().astype(np.uint8) for p in pixels]


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
