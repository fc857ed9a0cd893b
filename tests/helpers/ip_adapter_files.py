"""Tiny image-prompt files in the published layouts (not derived from modules/ip_adapter.py).

- IP-Adapter Plus (tencent-ailab IP-Adapter's ``ip_adapter/resampler.py`` names, as in
  ``ip-adapter-plus_sdxl_vit-h.bin``): ``{"image_proj": {latents, proj_in.*, proj_out.*,
  norm_out.*, layers.N.0.{norm1,norm2}.*, layers.N.0.{to_q,to_kv,to_out}.weight,
  layers.N.1.0.* (LayerNorm), layers.N.1.1.weight, layers.N.1.3.weight}, "ip_adapter":
  {"1.to_k_ip.weight", "1.to_v_ip.weight", "3...."}}``: the numbers are the positions of
  the cross-attention processors among all of the UNet's processors (attn1 even, attn2 odd).
- CLIP vision: transformers' ``CLIPVisionModelWithProjection`` state dict, and open_clip's
  ``visual.*`` names for the same tensors.
"""

from __future__ import annotations

import torch
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

TINY_CLIP_VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=1,
                        image_size=224, patch_size=32, projection_dim=32, hidden_act="gelu", layer_norm_eps=1e-5)


def _rand(gen: torch.Generator, *shape: int, scale: float | None = None) -> torch.Tensor:
    scale = scale if scale is not None else 1.0 / (shape[-1] ** 0.5)
    return torch.randn(*shape, generator=gen) * scale


def tiny_clip_vision(seed: int = 0) -> CLIPVisionModelWithProjection:
    torch.manual_seed(seed)
    return CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_CLIP_VISION)).eval()


def to_open_clip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same encoder under open_clip's names (fused in_proj, transposed projection)."""
    out = {"visual.class_embedding": state["vision_model.embeddings.class_embedding"],
           "visual.conv1.weight": state["vision_model.embeddings.patch_embedding.weight"],
           "visual.positional_embedding": state["vision_model.embeddings.position_embedding.weight"],
           "visual.proj": state["visual_projection.weight"].t().contiguous()}
    for kind in ("weight", "bias"):
        out[f"visual.ln_pre.{kind}"] = state[f"vision_model.pre_layrnorm.{kind}"]
        out[f"visual.ln_post.{kind}"] = state[f"vision_model.post_layernorm.{kind}"]
    n = 0
    while f"vision_model.encoder.layers.{n}.layer_norm1.weight" in state:
        src, dst = f"vision_model.encoder.layers.{n}.", f"visual.transformer.resblocks.{n}."
        for kind in ("weight", "bias"):
            out[dst + f"attn.in_proj_{kind}"] = torch.cat(
                [state[src + f"self_attn.{p}_proj.{kind}"] for p in ("q", "k", "v")])
            for a, b in (("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("attn.out_proj", "self_attn.out_proj"),
                         ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")):
                out[dst + f"{a}.{kind}"] = state[src + f"{b}.{kind}"]
        n += 1
    return out


def tiny_ip_adapter_state(unet, clip_width: int = 64, hidden: int = 64, queries: int = 4, depth: int = 4,
                          seed: int = 0, context_width: int | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """A random IP-Adapter Plus for `unet` (a diffusers UNet2DConditionModel) in the
    published pickle layout. `context_width` overrides the UNet's (a wrong-width file)."""
    gen = torch.Generator().manual_seed(seed)
    context = context_width or unet.config.cross_attention_dim
    proj = {"latents": _rand(gen, 1, queries, hidden, scale=hidden ** -0.5),
            "proj_in.weight": _rand(gen, hidden, clip_width), "proj_in.bias": _rand(gen, hidden, scale=0.02),
            "proj_out.weight": _rand(gen, context, hidden), "proj_out.bias": _rand(gen, context, scale=0.02),
            "norm_out.weight": 1 + _rand(gen, context, scale=0.02), "norm_out.bias": _rand(gen, context, scale=0.02)}
    for n in range(depth):
        p = f"layers.{n}."
        for norm in ("0.norm1", "0.norm2", "1.0"):
            proj[p + norm + ".weight"] = 1 + _rand(gen, hidden, scale=0.02)
            proj[p + norm + ".bias"] = _rand(gen, hidden, scale=0.02)
        proj[p + "0.to_q.weight"] = _rand(gen, hidden, hidden)
        proj[p + "0.to_kv.weight"] = _rand(gen, 2 * hidden, hidden)
        proj[p + "0.to_out.weight"] = _rand(gen, hidden, hidden)
        proj[p + "1.1.weight"] = _rand(gen, 4 * hidden, hidden)
        proj[p + "1.3.weight"] = _rand(gen, hidden, 4 * hidden)
    layers = {}
    for number, name in enumerate(unet.attn_processors):
        if name.endswith("attn2.processor"):
            module = unet.get_submodule(name[:-len(".processor")])
            width = module.to_k.out_features
            layers[f"{number}.to_k_ip.weight"] = _rand(gen, width, context)
            layers[f"{number}.to_v_ip.weight"] = _rand(gen, width, context)
    return {"image_proj": proj, "ip_adapter": layers}
