"""Tiny Control-LoRA files in the published layout (not derived from modules/controlnet.py).

The layout, as Stability's control-lora files and ComfyUI's ControlLoraSave write it: a
safetensors file with an empty ``lora_controlnet`` tensor; for every layer the ControlNet
shares with the base UNet, under the UNet's original (ldm) name, a weight of 2+ dims as
``<layer>.up`` [out, r] / [out, r, 1, 1] and ``<layer>.down`` [r, in] / [r, in, kh, kw] (the
change to the UNet's weight), a 1-D tensor (bias, norm) as its full value; the ControlNet's own
layers as full fp16 weights: ``input_hint_block.{0,2,...,14}`` (3 -> 16 -> 16 -> 32 -> 32 -> 96
-> 96 -> 256 -> model channels, 3x3 convs, stride 2 at 4, 8 and 12), ``zero_convs.N.0`` (1x1,
one per input block: conv_in, each resnet, each downsampler) and ``middle_block_out.0``.

`oracle_state` gives the same ControlNet as a plain diffusers state dict (the oracle: what
``ControlNetModel.from_unet`` of that UNet must hold), built from its own table of diffusers
names below.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from ldm_patched.modules.sdxl_layout import unet_key_map

CANNY_FILE = "control-lora-canny-rank128.safetensors"
CPDS_FILE = "fooocus_xl_cpds_128.safetensors"
HINT_CHANNELS = (16, 16, 32, 32, 96, 96, 256)    # conv outputs of input_hint_block before the last
SHARED_PREFIXES = ("conv_in.", "time_embedding.", "add_embedding.", "down_blocks.", "mid_block.")


def _input_block_channels(unet) -> list[int]:
    """Output channels of each original input block: conv_in, then per level its resnets and
    (but the last level) its downsampler."""
    config = unet.config
    channels = [config.block_out_channels[0]]
    levels = len(config.block_out_channels)
    for level, width in enumerate(config.block_out_channels):
        channels += [width] * config.layers_per_block
        if level != levels - 1:
            channels.append(width)
    return channels


def _own_layers(unet) -> list[tuple[str, str, tuple[int, ...]]]:
    """(original name, diffusers name, weight shape) of the ControlNet-only convs."""
    model_channels = unet.config.block_out_channels[0]
    layers = []
    widths = (3, *HINT_CHANNELS, model_channels)
    diffusers_names = (["controlnet_cond_embedding.conv_in"]
                       + [f"controlnet_cond_embedding.blocks.{j}" for j in range(len(HINT_CHANNELS) - 1)]
                       + ["controlnet_cond_embedding.conv_out"])
    for n, name in enumerate(diffusers_names):
        layers.append((f"input_hint_block.{2 * n}", name, (widths[n + 1], widths[n], 3, 3)))
    for i, width in enumerate(_input_block_channels(unet)):
        layers.append((f"zero_convs.{i}.0", f"controlnet_down_blocks.{i}", (width, width, 1, 1)))
    mid = unet.config.block_out_channels[-1]
    layers.append(("middle_block_out.0", "controlnet_mid_block", (mid, mid, 1, 1)))
    return layers


def _shared_names(unet) -> dict[str, str]:
    """diffusers name -> original name of the UNet parameters a ControlNet shares."""
    shared = [k for k, _ in unet.named_parameters() if k.startswith(SHARED_PREFIXES)]
    return unet_key_map(unet.config, shared)


def tiny_control_lora(unet, rank: int = 4, seed: int = 0, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """The tensors of a random Control-LoRA for `unet` (read for its shapes only: any size,
    any device). `scale` sizes the zero convs (how strongly the control acts)."""
    gen = torch.Generator().manual_seed(seed)
    params = dict(unet.named_parameters())
    file: dict[str, torch.Tensor] = {"lora_controlnet": torch.tensor([])}
    for key, name in _shared_names(unet).items():
        shape = params[key].shape
        if len(shape) >= 2:
            r = min(rank, shape[0], shape[1])
            up = torch.randn(shape[0], r, *([1] * (len(shape) - 2)), generator=gen) * 0.05
            down = torch.randn(r, *shape[1:], generator=gen) * 0.05
            stem = name[:-len(".weight")]
            file[f"{stem}.up"], file[f"{stem}.down"] = up.half(), down.half()
        else:   # trained in full: norm scales near 1, biases small
            noise = 0.01 * torch.randn(shape, generator=gen)
            file[name] = (1.0 + noise if name.endswith(".weight") else noise).half()
    for name, _, shape in _own_layers(unet):
        fan_in = shape[1] * shape[2] * shape[3]
        factor = scale if name.startswith(("zero_convs", "middle_block_out")) else 1.0
        file[f"{name}.weight"] = (torch.randn(shape, generator=gen) * factor / fan_in ** 0.5).half()
        file[f"{name}.bias"] = (torch.randn(shape[0], generator=gen) * 0.02 * factor).half()
    return file


def oracle_state(unet, file: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What diffusers' ControlNetModel.from_unet(unet) must hold for `file`, by this module's
    own tables: shared weights are the UNet's plus up @ down, the rest the file's values."""
    params = {k: p.detach().float().cpu() for k, p in unet.named_parameters()}
    state = {}
    for key, name in _shared_names(unet).items():
        if name in file:
            state[key] = file[name].float()
            continue
        stem = name[:-len(".weight")]
        up, down = file[f"{stem}.up"].float(), file[f"{stem}.down"].float()
        state[key] = params[key] + (up.flatten(1) @ down.flatten(1)).reshape(params[key].shape)
    for name, diffusers_name, _ in _own_layers(unet):
        for kind in ("weight", "bias"):
            state[f"{diffusers_name}.{kind}"] = file[f"{name}.{kind}"].float()
    return state


def write_tiny_control_lora(path: str | Path, unet, rank: int = 4, seed: int = 0,
                            scale: float = 1.0) -> dict[str, torch.Tensor]:
    """Write the file; returns its tensors."""
    file = tiny_control_lora(unet, rank, seed, scale)
    save_file({k: v.contiguous() for k, v in file.items()}, str(path))
    return file


def write_both(folder: Path, unet, scale: float = 1.0) -> None:
    """The PyraCanny and CPDS files under upstream's names (different seeds: different nets)."""
    write_tiny_control_lora(Path(folder) / CANNY_FILE, unet, seed=1, scale=scale)
    write_tiny_control_lora(Path(folder) / CPDS_FILE, unet, seed=2, scale=scale)
