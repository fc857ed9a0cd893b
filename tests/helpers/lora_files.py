"""Builders of LoRA-family files with the key names real trainers write, over the tiny model.

Factors are random but depend only on (layer, tensor role), so two schemes can carry
the same change. Names: kohya-ss sd-scripts (`lora_unet_`, `lora_te1_text_model_`),
LyCORIS (`hada_`, `lokr_`, `a1`..`b2`, `dora_scale`, `lycoris_`), diffusers/peft
(`unet.`, `text_encoder.text_model.`, `lora_A/B`, `.lora.up`, `lora_linear_layer`,
`processor.to_q_lora`), ComfyUI saves (`diffusion_model.`, `text_encoders.clip_l...`).
"""

from __future__ import annotations

import copy
import os
import zlib
from typing import Callable, Iterable

import torch
from safetensors.torch import save_file

from ldm_patched.modules.sdxl_layout import unet_key_map

# Layers a typical SDXL LoRA touches: attention, feed-forward, projections, resnets, samplers.
UNET_LAYERS = ("attn1.to_q", "attn1.to_out.0", "attn2.to_k", "attn2.to_v", "ff.net.0.proj", "ff.net.2",
               "proj_in", "proj_out", "conv1", "conv2", "time_emb_proj", "downsamplers.0.conv")
TE_LAYERS = ("self_attn.q_proj", "self_attn.v_proj", "mlp.fc1")
ENCODERS = ("text_encoder", "text_encoder_2")


def rand(name: str, *shape: int, scale: float = 0.1) -> torch.Tensor:
    """Random tensor that depends only on `name`."""
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return torch.randn(*shape, generator=gen) * scale


def lora_factors(shape: torch.Size, rank: int, layer: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(up, down) for a layer of `shape`; conv downs keep their kernel, ups are 1x1."""
    down = rand(layer + ".down", rank, *shape[1:])
    up = rand(layer + ".up", shape[0], rank, *([1] * (len(shape) - 2)))
    return up, down


# -- where the layers are --------------------------------------------------------------

def find_unet_layers(unet, layers: Iterable[str] = UNET_LAYERS) -> list[tuple[str, str, torch.Size]]:
    """(diffusers module path, original module path, weight shape) of UNet layers named like `layers`."""
    to_original = unet_key_map(dict(unet.config))
    out = []
    for key, param in unet.named_parameters():
        if key.endswith(".weight") and param.ndim >= 2 and any(f".{layer}.weight" in key for layer in layers):
            out.append((key[: -len(".weight")], to_original[key][: -len(".weight")], param.shape))
    return out


def find_text_layers(encoder, layers: Iterable[str] = TE_LAYERS) -> list[tuple[str, str, torch.Size]]:
    """(path inside the CLIP text transformer, parameter name in `encoder`, shape).

    The first is the same whatever level transformers puts `text_model.` at."""
    out = []
    for key, param in encoder.named_parameters():
        if key.endswith(".weight") and any(f".{layer}.weight" in key for layer in layers):
            inner = key[: -len(".weight")]
            inner = inner[len("text_model."):] if inner.startswith("text_model.") else inner
            out.append((inner, key, param.shape))
    return out


# -- naming schemes --------------------------------------------------------------------

UNET_SCHEMES: dict[str, Callable[[str, str], str | None]] = {
    "kohya_original": lambda diffusers, original: "lora_unet_" + original.replace(".", "_"),
    "kohya_diffusers": lambda diffusers, original: "lora_unet_" + diffusers.replace(".", "_"),
    "lycoris": lambda diffusers, original: "lycoris_" + diffusers.replace(".", "_"),
    "peft": lambda diffusers, original: "unet." + diffusers,
    "comfy": lambda diffusers, original: "diffusion_model." + original,
}
TE_SCHEMES: dict[str, Callable[[str, str], str]] = {
    "kohya": lambda encoder, inner: ("lora_te1_" if encoder == "text_encoder" else "lora_te2_")
    + "text_model_" + inner.replace(".", "_"),
    "peft": lambda encoder, inner: f"{encoder}.text_model.{inner}",
    "comfy": lambda encoder, inner: "text_encoders." + ("clip_l" if encoder == "text_encoder" else "clip_g")
    + ".transformer.text_model." + inner,
}
# (up suffix, down suffix) of the LoRA pair in each scheme
LORA_SUFFIXES = {"kohya": (".lora_up.weight", ".lora_down.weight"), "peft": (".lora_B.weight", ".lora_A.weight"),
                 "diffusers": (".lora.up.weight", ".lora.down.weight"),
                 "transformers": (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight"),
                 "processor": ("_lora.up.weight", "_lora.down.weight")}


def processor_name(diffusers: str, prefix: str = "unet.") -> str | None:
    """Old diffusers attention-processor name (`...attn1.processor.to_q`), None for other layers."""
    for proj in ("to_q", "to_k", "to_v", "to_out.0"):
        if diffusers.endswith("." + proj):
            return prefix + diffusers[: -len(proj)] + "processor." + proj.replace(".0", "")
    return None


def lora_tensors(name: str, shape: torch.Size, rank: int, alpha: float | None, style: str = "kohya",
                 seed_name: str | None = None) -> dict[str, torch.Tensor]:
    up, down = lora_factors(shape, rank, seed_name or name)
    up_suffix, down_suffix = LORA_SUFFIXES[style]
    tensors = {name + up_suffix: up, name + down_suffix: down}
    if alpha is not None:
        tensors[name + ".alpha"] = torch.tensor(alpha)
    return tensors


def write(tensors: dict[str, torch.Tensor], path, metadata: dict[str, str] | None = None) -> str:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return str(path)


def kohya_lora(components, path, rank: int = 4, alpha: float = 2.0,
               unet_layers: tuple[str, ...] = UNET_LAYERS, te_layers: tuple[str, ...] = TE_LAYERS,
               unet_scheme: str = "kohya_original") -> str:
    """kohya layout (lora_unet_<original block path>, lora_te1_text_model_..., lora_te2_...), with alphas."""
    tensors = {}
    for diffusers, original, shape in find_unet_layers(components["unet"], unet_layers):
        name = UNET_SCHEMES[unet_scheme](diffusers, original)
        tensors.update(lora_tensors(name, shape, rank, alpha, seed_name=diffusers))
    for encoder in ENCODERS:
        for inner, _, shape in find_text_layers(components[encoder], te_layers):
            tensors.update(lora_tensors(TE_SCHEMES["kohya"](encoder, inner), shape, rank, alpha,
                                        seed_name=f"{encoder}.{inner}"))
    return write(tensors, path)


def peft_lora(components, path, rank: int = 4, alpha_tensors: float | None = None,
              metadata: dict[str, str] | None = None) -> str:
    """diffusers/peft layout (unet.<path>.lora_A/lora_B, text_encoder.text_model...); linear layers only,
    as peft-format SDXL LoRAs are. `alpha_tensors`: write `.alpha` tensors next to the names."""
    tensors = {}
    for diffusers, _, shape in find_unet_layers(components["unet"]):
        if len(shape) == 2:
            tensors.update(lora_tensors("unet." + diffusers, shape, rank, alpha_tensors, "peft", seed_name=diffusers))
    for encoder in ENCODERS:
        for inner, _, shape in find_text_layers(components[encoder]):
            tensors.update(lora_tensors(TE_SCHEMES["peft"](encoder, inner), shape, rank, alpha_tensors, "peft",
                                        seed_name=f"{encoder}.{inner}"))
    return write(tensors, path, metadata)


# -- LyCORIS-family files (kohya names) --------------------------------------------------

def adapter_tensors(kind: str, name: str, shape: torch.Size, rank: int = 2, alpha: float = 2.0,
                    has_bias: bool = False) -> dict[str, torch.Tensor]:
    """The tensors LyCORIS / kohya write for one layer of `shape` under base name `name`."""
    out, width = shape[0], int(shape[1:].numel())
    r = lambda role, *s: rand(f"{name}.{role}", *s)  # noqa: E731
    if kind == "lora":
        return lora_tensors(name, shape, rank, alpha)
    if kind == "loha":
        return {f"{name}.hada_w1_a": r("w1a", out, rank), f"{name}.hada_w1_b": r("w1b", rank, width),
                f"{name}.hada_w2_a": r("w2a", out, rank), f"{name}.hada_w2_b": r("w2b", rank, width),
                f"{name}.alpha": torch.tensor(alpha)}
    if kind == "lokr":
        a, b = (4 if out % 4 == 0 else 1), (2 if shape[1] % 2 == 0 else 1)
        return {f"{name}.lokr_w1": r("w1", a, b), f"{name}.lokr_w2_a": r("w2a", out // a, rank),
                f"{name}.lokr_w2_b": r("w2b", rank, width // b), f"{name}.alpha": torch.tensor(alpha)}
    if kind == "dora":
        tensors = lora_tensors(name, shape, rank, alpha)
        tensors[f"{name}.dora_scale"] = 1.0 + r("m", 1, shape[1], *([1] * (len(shape) - 2))).abs()
        return tensors
    if kind == "diff":
        tensors = {f"{name}.diff": r("diff", *shape) * 0.3}
        if has_bias:
            tensors[f"{name}.diff_b"] = r("diff_b", out) * 0.3
        return tensors
    raise ValueError(kind)


def lycoris_file(components, path, kind: str, unet_layers: tuple[str, ...] = UNET_LAYERS,
                 te_layers: tuple[str, ...] = TE_LAYERS, rank: int = 2) -> str:
    """A file of one adapter kind over UNet (kohya original names) and both text encoders."""
    unet = components["unet"]
    tensors = {}
    for diffusers, original, shape in find_unet_layers(unet, unet_layers):
        has_bias = getattr(unet.get_submodule(diffusers), "bias", None) is not None
        tensors.update(adapter_tensors(kind, "lora_unet_" + original.replace(".", "_"), shape, rank,
                                       has_bias=has_bias))
    for encoder in ENCODERS:
        for inner, _, shape in find_text_layers(components[encoder], te_layers):
            tensors.update(adapter_tensors(kind, TE_SCHEMES["kohya"](encoder, inner), shape, rank, has_bias=True))
    return write(tensors, path)


def diffusers_fused(components, path: str, strength: float):
    """diffusers' own pipeline on copies of `components` with the LoRA file loaded and fused
    (the peer oracle for our merge)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    from ldm_patched.modules.checkpoint import load_tokenizers

    tok, tok2 = load_tokenizers()
    parts = copy.deepcopy(components)
    pipe = StableDiffusionXLPipeline(vae=parts["vae"], text_encoder=parts["text_encoder"],
                                     text_encoder_2=parts["text_encoder_2"], tokenizer=tok, tokenizer_2=tok2,
                                     unet=parts["unet"], scheduler=EulerDiscreteScheduler())
    pipe.load_lora_weights(os.path.dirname(path), weight_name=os.path.basename(path))
    pipe.fuse_lora(lora_scale=strength)
    pipe.unload_lora_weights()
    return pipe
