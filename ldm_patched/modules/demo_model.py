"""Tiny random SDXL-shaped models: test fixtures and the built-in demo checkpoint.

The shapes follow SDXL's rules (text_time conditioning, two text encoders
whose widths add up to the cross-attention width, 64-channel heads, 32 norm
groups) at a size that builds in milliseconds. The configs are written in the
same canonical form that ``checkpoint.infer_*_config`` produces, so a
save/load round trip must reproduce them exactly.

Text encoder widths differ (32 vs 64) on purpose: diffusers' single-file
loader tells CLIP-L and OpenCLIP-G apart by position-embedding width.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Mapping
from typing import Any

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from ldm_patched.modules.checkpoint import (
    SDXL_VAE_SCALING_FACTOR,
    TOKENIZER_DIR,
    original_state_dict,
    save_checkpoint,
)

TIME_EMBED_DIM = 8
_CLIP_COMMON = {"vocab_size": 49408, "max_position_embeddings": 77, "layer_norm_eps": 1e-5, "num_attention_heads": 1}
TINY_CLIP_L = {**_CLIP_COMMON, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
               "projection_dim": 32, "hidden_act": "quick_gelu"}
TINY_CLIP_G = {**_CLIP_COMMON, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
               "projection_dim": 32, "hidden_act": "gelu"}
_UNET_COMMON = {"sample_size": 128, "in_channels": 4, "out_channels": 4, "norm_num_groups": 32,
                "use_linear_projection": True, "addition_embed_type": "text_time",
                "addition_time_embed_dim": TIME_EMBED_DIM}
TINY_UNET = {
    **_UNET_COMMON,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [32, 64],
    "layers_per_block": 2,
    "transformer_layers_per_block": 1,
    "attention_head_dim": [1, 1],
    "cross_attention_dim": TINY_CLIP_L["hidden_size"] + TINY_CLIP_G["hidden_size"],
    "projection_class_embeddings_input_dim": TINY_CLIP_G["projection_dim"] + 6 * TIME_EMBED_DIM,
}
# The refiner differs from the base like the real one does: own widths, only
# OpenCLIP-G as context, 5 time embeddings (no target size), plus here an
# attention level *before* a plain level and a depth-2 transformer.
TINY_REFINER_UNET = {
    **_UNET_COMMON,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [64, 64],
    "layers_per_block": 1,
    "transformer_layers_per_block": 2,
    "attention_head_dim": [1, 1],
    "cross_attention_dim": TINY_CLIP_G["hidden_size"],
    "projection_class_embeddings_input_dim": TINY_CLIP_G["projection_dim"] + 5 * TIME_EMBED_DIM,
}
TINY_VAE = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4,
    # Four levels like SDXL's VAE, so latents are 1/8 of the image as the pipeline
    # expects of real checkpoints (a default-size request on the demo stays cheap).
    "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [32, 32, 64, 64], "layers_per_block": 1, "norm_num_groups": 32,
    "sample_size": 1024, "scaling_factor": SDXL_VAE_SCALING_FACTOR, "force_upcast": True,
    "use_quant_conv": True, "use_post_quant_conv": True, "mid_block_add_attention": True,
}

# SDXL's published scheduler settings (EulerDiscrete, as in the diffusers repo)
SDXL_SCHEDULER_CONFIG = {
    "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
    "steps_offset": 1, "timestep_spacing": "leading", "prediction_type": "epsilon",
    "interpolation_type": "linear", "use_karras_sigmas": False,
}
_NORMS = (torch.nn.LayerNorm, torch.nn.GroupNorm)


def _random_state(module: torch.nn.Module, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Deterministic values for every parameter and buffer in state-dict order.

    Matrices get 1/sqrt(fan_in) scale so activations neither vanish nor blow
    up; norm scales stay near 1; everything else (biases, embeddings) is small.
    """
    modules = dict(module.named_modules())
    out = {}
    for key, ref in module.state_dict().items():
        owner = modules.get(key.rpartition(".")[0])
        noise = torch.randn(ref.shape, generator=generator, dtype=torch.float32)
        if isinstance(owner, _NORMS) and key.endswith(".weight"):
            value = 1.0 + 0.02 * noise
        elif ref.ndim >= 2 and not isinstance(owner, torch.nn.Embedding):
            value = noise / math.sqrt(ref[0].numel())
        else:
            value = 0.02 * noise
        out[key] = value
    return out


def _build(factory: Any, seed: int) -> torch.nn.Module:
    with init_empty_weights():  # skip the library's own (slow, random) init
        module = factory()
    generator = torch.Generator().manual_seed(seed)
    module.load_state_dict(_random_state(module, generator), strict=True, assign=True)
    return module.eval()


def build_tiny_sdxl(seed: int = 0, refiner: bool = False,
                    unet_config: Mapping[str, Any] | None = None) -> dict[str, torch.nn.Module]:
    """Tiny random SDXL components: unet, vae, text_encoder (base only), text_encoder_2.
    ``unet_config`` replaces the UNet's (another block layout of the SDXL family)."""
    unet_config = unet_config or (TINY_REFINER_UNET if refiner else TINY_UNET)
    base_seed = seed * 16 + (8 if refiner else 0)  # distinct streams per component and kind
    parts: dict[str, torch.nn.Module] = {
        "unet": _build(lambda: UNet2DConditionModel.from_config(unet_config), base_seed),
        "vae": _build(lambda: AutoencoderKL.from_config(TINY_VAE), base_seed + 1),
    }
    if not refiner:
        parts["text_encoder"] = _build(lambda: CLIPTextModel(CLIPTextConfig(**TINY_CLIP_L)), base_seed + 2)
    parts["text_encoder_2"] = _build(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**TINY_CLIP_G)), base_seed + 3)
    return parts


def write_demo_checkpoint(path: str | os.PathLike[str], seed: int = 0, refiner: bool = False,
                          unet_config: Mapping[str, Any] | None = None) -> str:
    """Write a tiny random SDXL base (or refiner) single-file checkpoint; returns its path."""
    parts = build_tiny_sdxl(seed=seed, refiner=refiner, unet_config=unet_config)
    state = original_state_dict(refiner=refiner, **parts)
    kind = "refiner" if refiner else "base"
    metadata = {
        "modelspec.architecture": f"stable-diffusion-xl-v1-{kind}",
        "modelspec.title": f"Fooocus-Resident tiny random demo ({kind}, seed {seed})",
        "fooocus_resident.demo_seed": str(seed),
    }
    return save_checkpoint(path, state, metadata)


def _write_json(path: str, data: Mapping[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, sort_keys=True)


def _copy_tokenizer(target: str, pad_token: str | None) -> None:
    os.makedirs(target, exist_ok=True)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copyfile(os.path.join(TOKENIZER_DIR, name), os.path.join(target, name))
    if pad_token is None:
        return
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        file = os.path.join(target, name)
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
        data["pad_token"] = pad_token
        _write_json(file, data)


def write_diffusers_config_dir(directory: str | os.PathLike[str], components: Mapping[str, torch.nn.Module]) -> str:
    """A diffusers config folder (no weights) describing ``components``.

    ``StableDiffusionXLPipeline.from_single_file(ckpt, config=dir,
    local_files_only=True)`` reads it instead of fetching configs from the
    Hub. Without a ``text_encoder`` the folder describes the refiner
    (``StableDiffusionXLImg2ImgPipeline``).
    """
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    refiner = "text_encoder" not in components
    index: dict[str, Any] = {
        "_class_name": "StableDiffusionXLImg2ImgPipeline" if refiner else "StableDiffusionXLPipeline",
        "force_zeros_for_empty_prompt": not refiner,
        "scheduler": ["diffusers", "EulerDiscreteScheduler"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": [None, None] if refiner else ["transformers", "CLIPTextModel"],
        "tokenizer": [None, None] if refiner else ["transformers", "CLIPTokenizer"],
        "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer_2": ["transformers", "CLIPTokenizer"],
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
    }
    if refiner:
        index["requires_aesthetics_score"] = True
    _write_json(os.path.join(directory, "model_index.json"), index)
    for name in ("unet", "vae"):
        components[name].save_config(os.path.join(directory, name))
    for name in ("text_encoder", "text_encoder_2"):
        if name in components:
            components[name].config.save_pretrained(os.path.join(directory, name))
    EulerDiscreteScheduler(**SDXL_SCHEDULER_CONFIG).save_config(os.path.join(directory, "scheduler"))
    if not refiner:
        _copy_tokenizer(os.path.join(directory, "tokenizer"), None)
    _copy_tokenizer(os.path.join(directory, "tokenizer_2"), "!")
    return directory
