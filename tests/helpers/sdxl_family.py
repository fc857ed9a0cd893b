"""The SDXL family's UNet block layouts, as published, at SDXL size and tiny.

The facts come from upstream Fooocus's model detection (ldm_patched/modules/model_detection.py,
which lists SSD-1B, Segmind-Vega, KOALA-700M and KOALA-1B next to SDXL in ComfyUI's terms):
transformers per input block, per output block (listed from the last output block to the
first), and the mid block's depth (-1: one resnet and no transformer, -2: no mid block).
`UPSTREAM_LAYOUTS` keeps them in those terms; `published_unet` restates each as the diffusers
config the model publishes (transformer_layers_per_block, reverse_transformer_layers_per_block,
mid_block_type); a test checks the two agree, so neither is taken on trust.
"""

from __future__ import annotations

from typing import Any

from ldm_patched.modules.demo_model import TINY_CLIP_G, TINY_CLIP_L, TIME_EMBED_DIM

# name -> (resnets per level, transformer_depth, transformer_depth_output, transformer_depth_middle)
UPSTREAM_LAYOUTS: dict[str, tuple[list[int], list[int], list[int], int]] = {
    "SDXL": ([2, 2, 2], [0, 0, 2, 2, 10, 10], [0, 0, 0, 2, 2, 2, 10, 10, 10], 10),
    "SSD-1B": ([2, 2, 2], [0, 0, 2, 2, 4, 4], [0, 0, 0, 1, 1, 2, 10, 4, 4], -1),
    "Segmind-Vega": ([2, 2, 2], [0, 0, 1, 1, 2, 2], [0, 0, 0, 1, 1, 1, 2, 2, 2], -1),
    "KOALA-700M": ([1, 1, 1], [0, 2, 5], [0, 0, 2, 2, 5, 5], -2),
    "KOALA-1B": ([1, 1, 1], [0, 2, 6], [0, 0, 2, 2, 6, 6], 6),
}

# The diffusers form of each layout (SDXL base's is diffusers' own default mid block).
_DIFFUSERS_LAYOUTS: dict[str, dict[str, Any]] = {
    "SDXL": {"layers_per_block": 2, "transformer_layers_per_block": [1, 2, 10]},
    "SSD-1B": {"layers_per_block": 2, "transformer_layers_per_block": [1, 2, 4],
               "reverse_transformer_layers_per_block": [[4, 4, 10], [2, 1, 1], [1, 1, 1]],
               "mid_block_type": "UNetMidBlock2D"},
    "Segmind-Vega": {"layers_per_block": 2, "transformer_layers_per_block": [1, 1, 2],
                     "mid_block_type": "UNetMidBlock2D"},
    "KOALA-700M": {"layers_per_block": 1, "transformer_layers_per_block": [1, 2, 5], "mid_block_type": None},
    "KOALA-1B": {"layers_per_block": 1, "transformer_layers_per_block": [1, 2, 6]},
}
FAMILY = tuple(_DIFFUSERS_LAYOUTS)
DISTILLED = tuple(name for name in FAMILY if name != "SDXL")

_LEVELS = {
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "norm_num_groups": 32,
    "use_linear_projection": True, "addition_embed_type": "text_time",
}
_SDXL_SIZE = {"block_out_channels": [320, 640, 1280], "attention_head_dim": [5, 10, 20],
              "cross_attention_dim": 2048, "addition_time_embed_dim": 256,
              "projection_class_embeddings_input_dim": 2816}
# Tiny widths in the same canonical form demo_model's TINY_UNET uses (64-channel heads).
_TINY_SIZE = {"block_out_channels": [32, 64, 64], "attention_head_dim": [1, 1, 1],
              "cross_attention_dim": TINY_CLIP_L["hidden_size"] + TINY_CLIP_G["hidden_size"],
              "addition_time_embed_dim": TIME_EMBED_DIM,
              "projection_class_embeddings_input_dim": TINY_CLIP_G["projection_dim"] + 6 * TIME_EMBED_DIM}


def published_unet(name: str) -> dict[str, Any]:
    """The SDXL-size diffusers UNet config of a family member."""
    return {**_LEVELS, **_SDXL_SIZE, **_DIFFUSERS_LAYOUTS[name]}


def tiny_unet(name: str) -> dict[str, Any]:
    """The same block layout at the tiny widths of the test models."""
    return {**_LEVELS, **_TINY_SIZE, **_DIFFUSERS_LAYOUTS[name]}


def block_depths(unet) -> tuple[list[int], list[int], int]:
    """(transformers per input block, per output block from the last one, mid depth in
    upstream's code) of a diffusers UNet, read from its modules."""
    def depth(block, j: int) -> int:
        attentions = getattr(block, "attentions", None)
        return len(attentions[j].transformer_blocks) if attentions else 0

    down = [depth(b, j) for b in unet.down_blocks for j in range(len(b.resnets))]
    up = [depth(b, j) for b in unet.up_blocks for j in range(len(b.resnets))][::-1]
    mid = unet.mid_block
    if mid is None:
        middle = -2
    elif getattr(mid, "attentions", None) and mid.attentions[0] is not None:
        middle = len(mid.attentions[0].transformer_blocks)
    else:
        middle = -1
    return down, up, middle
