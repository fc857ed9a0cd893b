"""Test builder: small kohya-format UNet LoRA files over chosen layers (shared by tests).

Key names are the ones kohya's trainer writes for diffusers-layout UNets
(`lora_unet_<module path with _>.lora_down/lora_up/alpha`)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors.torch import save_file


def unet_lora(unet: torch.nn.Module, path: Path | str, layers: tuple[str, ...], seed: int, rank: int = 2,
              scale: float = 0.3) -> str:
    """A LoRA with random factors (from `seed`) on every UNet weight whose module path ends
    with one of `layers`; returns the path."""
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, param in unet.named_parameters():
        module, _, kind = name.rpartition(".")
        if kind != "weight" or param.ndim < 2 or not any(module.endswith("." + layer) for layer in layers):
            continue
        shape = param.shape
        base = "lora_unet_" + module.replace(".", "_")
        down = torch.randn(rank, *shape[1:], generator=generator) / math.sqrt(shape[1:].numel())
        up = torch.randn(shape[0], rank, *([1] * (len(shape) - 2)), generator=generator) * scale
        tensors[f"{base}.lora_down.weight"], tensors[f"{base}.lora_up.weight"] = down, up
        tensors[f"{base}.alpha"] = torch.tensor(float(rank))
    if not tensors:
        raise ValueError(f"no UNet layer matches {layers}")
    save_file(tensors, str(path))
    return str(path)
