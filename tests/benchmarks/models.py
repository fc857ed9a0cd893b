"""SDXL-layout models with random weights, built directly on the target device.

Three sizes share one builder:

* ``sdxl``: the real SDXL base and refiner configs (2.6 B + 2.3 B UNet parameters);
* ``mid``: the CPU proxy, the same layout at ~140 M parameters per base;
* ``tiny``: ``demo_model``'s TINY configs, for the dry run.

Modules are constructed on the meta device (no memory, no library init), given
storage on the device in the target dtype with ``to_empty`` and then filled
deterministically: norm scales ~1, matrices ~N(0, 1/fan_in), the rest small
(the same rule as ``demo_model``). Nothing is read from or written to disk
except the LoRA file.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from ldm_patched.modules import demo_model

# -- configs --------------------------------------------------------------------------

_CLIP = {"vocab_size": 49408, "max_position_embeddings": 77, "layer_norm_eps": 1e-5}  # bundled tokenizers
_UNET = {"sample_size": 128, "in_channels": 4, "out_channels": 4, "norm_num_groups": 32,
         "use_linear_projection": True, "addition_embed_type": "text_time", "addition_time_embed_dim": 256}
_BASE_BLOCKS = {"down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]}
_REFINER_BLOCKS = {"down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                   "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]}


def _clip(hidden: int, layers: int, heads: int, inner: int, act: str) -> dict[str, Any]:
    return {**_CLIP, "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
            "intermediate_size": inner, "projection_dim": hidden, "hidden_act": act}


def _unet(blocks: dict, widths: list[int], depth: Any, heads: list[int], context: int, pooled: int,
          time_ids: int) -> dict[str, Any]:
    """An SDXL UNet config; `time_ids` is 6 for a base, 5 for a refiner (aesthetic score)."""
    return {**_UNET, **blocks, "block_out_channels": widths, "layers_per_block": 2,
            "transformer_layers_per_block": depth, "attention_head_dim": heads, "cross_attention_dim": context,
            "projection_class_embeddings_input_dim": pooled + time_ids * _UNET["addition_time_embed_dim"]}


def _vae(widths: list[int]) -> dict[str, Any]:
    return {**demo_model.TINY_VAE, "down_block_types": ["DownEncoderBlock2D"] * len(widths),
            "up_block_types": ["UpDecoderBlock2D"] * len(widths), "block_out_channels": widths,
            "layers_per_block": 2}


@dataclass(frozen=True)
class SizeSpec:
    """Model configs of one size, plus what a request looks like at that size."""

    name: str
    clip_l: dict
    clip_g: dict
    unet: dict
    refiner_clip_g: dict
    refiner_unet: dict
    vae: dict
    lora_rank: int
    side: int            # request width = height in pixels
    speed_steps: int     # Speed mode's 30 steps, capped so a run fits in minutes


_SDXL_L, _SDXL_G = _clip(768, 12, 12, 3072, "quick_gelu"), _clip(1280, 32, 20, 5120, "gelu")
_MID_L, _MID_G = _clip(256, 6, 4, 1024, "quick_gelu"), _clip(512, 8, 8, 2048, "gelu")

SIZES: dict[str, SizeSpec] = {
    "sdxl": SizeSpec(
        "sdxl", _SDXL_L, _SDXL_G,
        _unet(_BASE_BLOCKS, [320, 640, 1280], [1, 2, 10], [5, 10, 20], 768 + 1280, 1280, 6),
        _SDXL_G,
        _unet(_REFINER_BLOCKS, [384, 768, 1536, 1536], 4, [6, 12, 24, 24], 1280, 1280, 5),
        _vae([128, 256, 512, 512]), lora_rank=64, side=1024, speed_steps=8),
    "mid": SizeSpec(
        "mid", _MID_L, _MID_G,
        _unet(_BASE_BLOCKS, [128, 256, 512], [1, 1, 2], [2, 4, 8], 256 + 512, 512, 6),
        _MID_G,
        _unet(_REFINER_BLOCKS, [96, 192, 384, 384], 2, [3, 3, 6, 6], 512, 512, 5),
        _vae([32, 64, 128, 128]), lora_rank=16, side=256, speed_steps=4),
    "tiny": SizeSpec(
        "tiny", demo_model.TINY_CLIP_L, demo_model.TINY_CLIP_G, demo_model.TINY_UNET,
        demo_model.TINY_CLIP_G, demo_model.TINY_REFINER_UNET, demo_model.TINY_VAE,
        lora_rank=2, side=64, speed_steps=2),
}

# -- random modules on the device ---------------------------------------------------------

_NORMS = (torch.nn.LayerNorm, torch.nn.GroupNorm)


@torch.no_grad()
def random_module(factory: Callable[[], torch.nn.Module], device: torch.device, dtype: torch.dtype,
                  seed: int) -> torch.nn.Module:
    """`factory()` built on meta, given storage on `device` in `dtype`, filled from `seed`."""
    with torch.device("meta"):
        module = factory()
    # Buffers (CLIP's position ids) are computed values, not weights: rebuild them for real.
    buffers = _real_buffers(factory, module)
    # torch's own `to`: diffusers' override only adds a warning about fp32 modules (SDXL has none).
    module = torch.nn.Module.to(module, dtype=dtype).to_empty(device=device)
    generator = torch.Generator(device).manual_seed(seed)
    owners = dict(module.named_modules())
    for name, param in module.named_parameters():
        _fill(param, owners[name.rpartition(".")[0]], name.endswith(".weight"), generator)
    for name, buffer in module.named_buffers():
        buffer.copy_(buffers[name])
    return module.requires_grad_(False).eval()


def _real_buffers(factory: Callable[[], torch.nn.Module], meta: torch.nn.Module) -> dict[str, torch.Tensor]:
    if not any(True for _ in meta.buffers()):
        return {}
    from accelerate import init_empty_weights
    with init_empty_weights():   # parameters on meta, buffers real (and small)
        return dict(factory().named_buffers())


def _fill(param: torch.Tensor, owner: torch.nn.Module, is_weight: bool, generator: torch.Generator) -> None:
    if isinstance(owner, _NORMS) and is_weight:
        param.normal_(1.0, 0.02, generator=generator)
    elif param.ndim >= 2 and not isinstance(owner, torch.nn.Embedding):
        param.normal_(0.0, 1.0 / math.sqrt(param[0].numel()), generator=generator)
    else:
        param.normal_(0.0, 0.02, generator=generator)


@dataclass(frozen=True)
class Dtypes:
    unet: torch.dtype
    text_encoder: torch.dtype
    vae: torch.dtype


def build_checkpoint(spec: SizeSpec, device: torch.device, dtypes: Dtypes, seed: int,
                     refiner: bool = False) -> dict[str, torch.nn.Module | None]:
    """Components for `ModelCatalogue.adopt_checkpoint`. A refiner gets no VAE of
    its own: the pipeline decodes with the base's VAE."""
    base = seed * 16 + (8 if refiner else 0)   # distinct random streams per component
    unet_config = spec.refiner_unet if refiner else spec.unet
    build = lambda factory, dtype, offset: random_module(factory, device, dtype, base + offset)  # noqa: E731
    parts: dict[str, torch.nn.Module | None] = {
        "unet": build(lambda: UNet2DConditionModel.from_config(unet_config), dtypes.unet, 0),
        "vae": None if refiner else build(lambda: AutoencoderKL.from_config(spec.vae), dtypes.vae, 1),
        "text_encoder": None if refiner else build(
            lambda: CLIPTextModel(CLIPTextConfig(**spec.clip_l)), dtypes.text_encoder, 2),
        "text_encoder_2": build(lambda: CLIPTextModelWithProjection(
            CLIPTextConfig(**(spec.refiner_clip_g if refiner else spec.clip_g))), dtypes.text_encoder, 3),
    }
    return parts


def parameter_count(components: dict[str, torch.nn.Module | None]) -> int:
    return sum(p.numel() for m in components.values() if m is not None for p in m.parameters())


# -- the LCM-shaped LoRA -----------------------------------------------------------------

# Every layer kind the published SDXL LCM LoRA touches in the UNet.
LORA_LAYERS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out",
               "conv1", "conv2", "time_emb_proj", "conv_shortcut")


def lora_targets(unet: torch.nn.Module) -> list[tuple[str, torch.Size]]:
    """(diffusers module path, weight shape) of every UNet layer the LoRA covers."""
    targets = []
    for name, param in unet.named_parameters():
        module, _, kind = name.rpartition(".")
        if kind == "weight" and any(module == l or module.endswith("." + l) for l in LORA_LAYERS):
            targets.append((module, param.shape))
    return targets


def write_lcm_shaped_lora(unet: torch.nn.Module, path: Path, rank: int, dtype: torch.dtype,
                          targets: list[tuple[str, torch.Size]] | None = None) -> int:
    """A kohya-format LoRA (random factors) over `targets` of `unet` (default: every layer the
    LCM LoRA covers); returns its key count."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    for module, shape in lora_targets(unet) if targets is None else targets:
        base = "lora_unet_" + module.replace(".", "_")
        # Seeded by name: the same file for the same model, whatever the device.
        generator = torch.Generator().manual_seed(zlib.crc32(base.encode()))
        fan_in = int(torch.Size(shape[1:]).numel())
        down = torch.randn(rank, *shape[1:], generator=generator) / math.sqrt(fan_in)
        up = torch.randn(shape[0], rank, *([1] * (len(shape) - 2)), generator=generator) * 0.01
        tensors[f"{base}.lora_down.weight"] = down.to(dtype)
        tensors[f"{base}.lora_up.weight"] = up.to(dtype)
        tensors[f"{base}.alpha"] = torch.tensor(float(rank), dtype=dtype)
    save_file(tensors, str(path))
    return len(tensors) // 3


def write_cached_loras(unet: torch.nn.Module, folder: Path, count: int, dtype: torch.dtype,
                       keys: int = 8, rank: int = 4) -> list[Path]:
    """`count` small LoRA files (`keys` layers each, a different slice of the targets per file)
    that the steady scenario keeps parsed in the LoRA file cache: what a server that has
    served many LoRAs holds while it repeats one request."""
    targets = lora_targets(unet)
    paths = []
    for i in range(count):
        path = folder / f"bench_cached_{i:02d}.safetensors"
        start = i * keys % len(targets)
        write_lcm_shaped_lora(unet, path, rank, dtype, (targets + targets)[start:start + keys])
        paths.append(path)
    return paths
