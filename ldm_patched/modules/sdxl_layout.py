"""Parameter-name mapping between diffusers/transformers modules and the
original single-file SDXL layout (Stability's "sgm"/"ldm" names).

Everything here is derived by rule from a model config, so it holds for any
number of levels, resnets per level and transformer depth: the real SDXL base
and refiner as well as the tiny test models.

Directions:
  * ``unet_key_map(config)``: diffusers ``UNet2DConditionModel`` key ->
    original key without ``model.diffusion_model.``. Public on purpose: the
    LoRA loader resolves LoRA key names (which use the original module paths)
    through it. Invert with ``invert_key_map``.
  * ``vae_key_map(config)``: diffusers ``AutoencoderKL`` key -> original key
    without ``first_stage_model.``. The mid-block attention projections are
    1x1 convs in the original and Linear layers in diffusers; see
    ``vae_tensor_to_original`` / ``vae_tensor_from_original``.
  * CLIP-L and OpenCLIP-G: whole state-dict converters in both directions.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from functools import lru_cache
from typing import Any

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_L_PREFIX = "conditioner.embedders.0.transformer."
CLIP_G_PREFIX = "conditioner.embedders.1.model."
CLIP_G_REFINER_PREFIX = "conditioner.embedders.0.model."

# diffusers ResnetBlock2D child name -> original ResBlock child name
_UNET_RESNET_RENAMES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_VAE_RESNET_RENAMES = {"conv_shortcut": "nin_shortcut"}
# diffusers VAE attention child -> original AttnBlock child
_VAE_ATTN_RENAMES = {
    "group_norm": "norm",
    "to_q": "q",
    "to_k": "k",
    "to_v": "v",
    "to_out.0": "proj_out",
}


# --------------------------------------------------------------------------- helpers


def _per_level(value: Any, levels: int) -> list[int]:
    """diffusers accepts an int or a per-level sequence for several fields."""
    if isinstance(value, int):
        return [value] * levels
    return [int(v) for v in value]


def invert_key_map(key_map: Mapping[str, str]) -> dict[str, str]:
    """original -> diffusers from a diffusers -> original map (the map is 1:1)."""
    inverted = {v: k for k, v in key_map.items()}
    if len(inverted) != len(key_map):
        raise ValueError("key map is not one-to-one")
    return inverted


def _config_dict(config: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


def _freeze(config: Mapping[str, Any]) -> str:
    # a hashable, order-independent form so meta-model key lists can be cached
    return json.dumps(_config_dict(config), sort_keys=True, default=list)


def _rename_child(rest: str, renames: Mapping[str, str]) -> str:
    """Rename the leading module name(s) of ``rest`` (e.g. 'to_out.0.weight')."""
    for old, new in renames.items():
        if rest == old or rest.startswith(old + "."):
            return new + rest[len(old):]
    return rest


def _map_keys(keys: Iterable[str], prefixes: Mapping[str, tuple[str, Mapping[str, str]]]) -> dict[str, str]:
    """Map each key through the longest matching module prefix."""
    out: dict[str, str] = {}
    for key in keys:
        parts = key.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            head = ".".join(parts[:cut])
            if head in prefixes:
                target, renames = prefixes[head]
                out[key] = target + "." + _rename_child(".".join(parts[cut:]), renames)
                break
        else:
            raise KeyError(f"no layout rule for parameter {key!r}")
    return out


# --------------------------------------------------------------------------- UNet


def unet_module_map(config: Mapping[str, Any]) -> dict[str, tuple[str, Mapping[str, str]]]:
    """diffusers module prefix -> (original module prefix, child renames).

    The original UNet is a flat ``input_blocks`` list (one entry per resnet,
    optionally followed by its transformer, plus one entry per downsampler),
    a 3-entry ``middle_block`` and a flat ``output_blocks`` list with one more
    resnet per level than the down path, the upsampler sitting after the last
    resnet (and its transformer, if any) of a level.
    """
    down_types = list(config["down_block_types"])
    up_types = list(config["up_block_types"])
    levels = len(down_types)
    layers = _per_level(config["layers_per_block"], levels)
    none: Mapping[str, str] = {}
    m: dict[str, tuple[str, Mapping[str, str]]] = {
        "conv_in": ("input_blocks.0.0", none),
        "time_embedding.linear_1": ("time_embed.0", none),
        "time_embedding.linear_2": ("time_embed.2", none),
        "add_embedding.linear_1": ("label_emb.0.0", none),
        "add_embedding.linear_2": ("label_emb.0.2", none),
        "conv_norm_out": ("out.0", none),
        "conv_out": ("out.2", none),
        "mid_block.resnets.0": ("middle_block.0", _UNET_RESNET_RENAMES),
        "mid_block.attentions.0": ("middle_block.1", none),
        "mid_block.resnets.1": ("middle_block.2", _UNET_RESNET_RENAMES),
    }
    index = 1  # input_blocks.0 is conv_in
    for level, block_type in enumerate(down_types):
        for j in range(layers[level]):
            m[f"down_blocks.{level}.resnets.{j}"] = (f"input_blocks.{index}.0", _UNET_RESNET_RENAMES)
            if "CrossAttn" in block_type:
                m[f"down_blocks.{level}.attentions.{j}"] = (f"input_blocks.{index}.1", none)
            index += 1
        if level != levels - 1:
            m[f"down_blocks.{level}.downsamplers.0.conv"] = (f"input_blocks.{index}.0.op", none)
            index += 1
    index = 0
    up_layers = list(reversed(layers))
    for up, block_type in enumerate(up_types):
        attn = "CrossAttn" in block_type
        for j in range(up_layers[up] + 1):
            m[f"up_blocks.{up}.resnets.{j}"] = (f"output_blocks.{index}.0", _UNET_RESNET_RENAMES)
            if attn:
                m[f"up_blocks.{up}.attentions.{j}"] = (f"output_blocks.{index}.1", none)
            index += 1
        if up != levels - 1:
            # the upsampler joins the level's last output block, after its transformer
            slot = 2 if attn else 1
            m[f"up_blocks.{up}.upsamplers.0.conv"] = (f"output_blocks.{index - 1}.{slot}.conv", none)
    return m


@lru_cache(maxsize=16)
def _meta_keys(kind: str, frozen: str) -> tuple[str, ...]:
    """Parameter names of a model built on the meta device (no memory used)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    cls = UNet2DConditionModel if kind == "unet" else AutoencoderKL
    with torch.device("meta"):
        model = cls.from_config(json.loads(frozen))
    return tuple(model.state_dict().keys())


def unet_key_map(config: Mapping[str, Any], keys: Iterable[str] | None = None) -> dict[str, str]:
    """diffusers UNet key -> original key (without ``model.diffusion_model.``).

    ``config`` is a ``UNet2DConditionModel`` config (``unet.config`` or a dict).
    ``keys`` defaults to every state-dict key of a model with that config.
    Example (SDXL base): ``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight``
    -> ``input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight``.
    """
    if keys is None:
        keys = _meta_keys("unet", _freeze(config))
    return _map_keys(keys, unet_module_map(config))


# --------------------------------------------------------------------------- VAE


def vae_module_map(config: Mapping[str, Any]) -> dict[str, tuple[str, Mapping[str, str]]]:
    """diffusers VAE module prefix -> (original prefix, child renames).

    The original decoder indexes its up levels by resolution (``up.0`` is the
    full-resolution level, applied last), so diffusers ``up_blocks.i`` (in
    application order) is ``decoder.up.{n-1-i}``.
    """
    levels = len(config["down_block_types"])
    layers = int(config["layers_per_block"])
    none: Mapping[str, str] = {}
    m: dict[str, tuple[str, Mapping[str, str]]] = {
        "quant_conv": ("quant_conv", none),
        "post_quant_conv": ("post_quant_conv", none),
    }
    for part in ("encoder", "decoder"):
        m[f"{part}.conv_in"] = (f"{part}.conv_in", none)
        m[f"{part}.conv_out"] = (f"{part}.conv_out", none)
        m[f"{part}.conv_norm_out"] = (f"{part}.norm_out", none)
        m[f"{part}.mid_block.resnets.0"] = (f"{part}.mid.block_1", _VAE_RESNET_RENAMES)
        m[f"{part}.mid_block.resnets.1"] = (f"{part}.mid.block_2", _VAE_RESNET_RENAMES)
        m[f"{part}.mid_block.attentions.0"] = (f"{part}.mid.attn_1", _VAE_ATTN_RENAMES)
    for i in range(levels):
        for j in range(layers):
            m[f"encoder.down_blocks.{i}.resnets.{j}"] = (f"encoder.down.{i}.block.{j}", _VAE_RESNET_RENAMES)
        if i != levels - 1:
            m[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = (f"encoder.down.{i}.downsample.conv", none)
        orig = levels - 1 - i
        for j in range(layers + 1):
            m[f"decoder.up_blocks.{i}.resnets.{j}"] = (f"decoder.up.{orig}.block.{j}", _VAE_RESNET_RENAMES)
        if i != levels - 1:
            m[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = (f"decoder.up.{orig}.upsample.conv", none)
    return m


def vae_key_map(config: Mapping[str, Any], keys: Iterable[str] | None = None) -> dict[str, str]:
    """diffusers AutoencoderKL key -> original key (without ``first_stage_model.``)."""
    if keys is None:
        keys = _meta_keys("vae", _freeze(config))
    return _map_keys(keys, vae_module_map(config))


def is_vae_attention_matrix(diffusers_key: str) -> bool:
    """True for the mid-attention q/k/v/out weights (Linear here, 1x1 conv there)."""
    return ".mid_block.attentions." in diffusers_key and diffusers_key.endswith(
        ("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight")
    )


def vae_tensor_to_original(diffusers_key: str, tensor: torch.Tensor) -> torch.Tensor:
    """Reshape a diffusers VAE tensor to its original shape ([C,C] -> [C,C,1,1])."""
    if is_vae_attention_matrix(diffusers_key) and tensor.ndim == 2:
        return tensor.reshape(*tensor.shape, 1, 1)
    return tensor


def vae_tensor_from_original(diffusers_key: str, tensor: torch.Tensor) -> torch.Tensor:
    """Inverse of ``vae_tensor_to_original`` ([C,C,1,1] or [C,C,1] -> [C,C])."""
    if is_vae_attention_matrix(diffusers_key) and tensor.ndim > 2:
        return tensor.reshape(tensor.shape[0], tensor.shape[1])
    return tensor


# --------------------------------------------------------------------------- CLIP-L

# Keys that carry no learned weight and that we neither need nor write.
_CLIP_IGNORED_SUFFIXES = ("position_ids", "logit_scale", "attn_mask")


def clip_l_to_original(
    hf_state_dict: Mapping[str, torch.Tensor], prefix: str = CLIP_L_PREFIX
) -> dict[str, torch.Tensor]:
    """transformers ``CLIPTextModel`` state dict -> original keys.

    The original keeps HF's names under ``<prefix>text_model.``; recent
    transformers drop the ``text_model.`` level in ``CLIPTextModel``, so both
    spellings are accepted.
    """
    out = {}
    for key, tensor in hf_state_dict.items():
        if key.endswith(_CLIP_IGNORED_SUFFIXES):
            continue
        out[prefix + "text_model." + key.removeprefix("text_model.")] = tensor
    return out


def clip_l_from_original(
    state_dict: Mapping[str, torch.Tensor], prefix: str = CLIP_L_PREFIX
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Original keys under ``prefix`` -> (flat HF keys without ``text_model.``, ignored keys)."""
    out, ignored = {}, []
    for key, tensor in state_dict.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):].removeprefix("text_model.")
        # CLIPTextModel has no projection; a few merged files still carry one
        if key.endswith(_CLIP_IGNORED_SUFFIXES) or name.startswith("text_projection"):
            ignored.append(key)
            continue
        out[name] = tensor
    return out, ignored


# --------------------------------------------------------------------------- OpenCLIP-G

# HF child name inside an encoder layer -> OpenCLIP child name inside a resblock
_G_LAYER_RENAMES = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}
_G_TOP_LEVEL = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
}
_HF_LAYER = "text_model.encoder.layers."


def open_clip_to_original(
    hf_state_dict: Mapping[str, torch.Tensor], prefix: str = CLIP_G_PREFIX
) -> dict[str, torch.Tensor]:
    """transformers ``CLIPTextModelWithProjection`` state dict -> OpenCLIP keys.

    q/k/v projections are fused into ``attn.in_proj_*`` (q, k, v order along
    dim 0) and the projection is stored as ``[width, proj]``, the transpose
    of HF's ``text_projection.weight``.
    """
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in hf_state_dict.items():
        if key.endswith(_CLIP_IGNORED_SUFFIXES):
            continue
        if key in _G_TOP_LEVEL:
            out[prefix + _G_TOP_LEVEL[key]] = tensor
        elif key == "text_projection.weight":
            out[prefix + "text_projection"] = tensor.t().contiguous()
        elif key.startswith(_HF_LAYER):
            layer, rest = key[len(_HF_LAYER):].split(".", 1)
            base = f"{prefix}transformer.resblocks.{layer}."
            for qkv in ("q", "k", "v"):
                head = f"self_attn.{qkv}_proj."
                if rest.startswith(head):
                    kind = rest[len(head):]  # weight | bias
                    fused.setdefault(base + "attn.in_proj_" + kind, {})[qkv] = tensor
                    break
            else:
                out[base + _rename_child(rest, _G_LAYER_RENAMES)] = tensor
        else:
            raise KeyError(f"no OpenCLIP layout rule for {key!r}")
    for key, parts in fused.items():
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def open_clip_from_original(
    state_dict: Mapping[str, torch.Tensor], prefix: str = CLIP_G_PREFIX
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """OpenCLIP keys under ``prefix`` -> (HF ``CLIPTextModelWithProjection`` keys, ignored keys)."""
    top = {v: k for k, v in _G_TOP_LEVEL.items()}
    layer_renames = {v: k for k, v in _G_LAYER_RENAMES.items()}
    out: dict[str, torch.Tensor] = {}
    ignored: list[str] = []
    block = "transformer.resblocks."
    for key, tensor in state_dict.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        if name in top:
            out[top[name]] = tensor
        elif name == "text_projection":
            out["text_projection.weight"] = tensor.t().contiguous()
        elif name.startswith(block):
            layer, rest = name[len(block):].split(".", 1)
            base = f"{_HF_LAYER}{layer}."
            if rest.startswith("attn.in_proj_"):
                kind = rest[len("attn.in_proj_"):]
                for qkv, part in zip(("q", "k", "v"), tensor.chunk(3, dim=0)):
                    out[f"{base}self_attn.{qkv}_proj.{kind}"] = part
            elif rest.endswith("attn_mask"):
                ignored.append(key)
            else:
                out[base + _rename_child(rest, layer_renames)] = tensor
        else:
            ignored.append(key)  # logit_scale, attn_mask and the like
    return out, ignored
