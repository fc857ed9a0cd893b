"""Single-file SDXL checkpoints (original "sgm" layout) <-> diffusers/transformers modules.

Loading is fully offline: every component config is inferred from tensor
shapes, modules are built without allocating weights (parameters on the meta
device) and then take the file's tensors by assignment. The inverse,
``original_state_dict`` + ``save_checkpoint``, writes the same layout back
(used by ``modules/fuse_lora.py``).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ldm_patched.modules import sdxl_layout as layout
from ldm_patched.modules.file_version import FileReadError, FileVersion, SafetensorsReader
from ldm_patched.modules.model_patcher import storable_weight_names, upcast_in_forward

logger = logging.getLogger(__name__)

TOKENIZER_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tokenizer")
SDXL_VAE_SCALING_FACTOR = 0.13025
HEAD_CHANNELS = 64  # SGM's num_head_channels for SDXL UNet and the CLIP encoders
NORM_GROUPS = 32
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth")


CLIP_VOCAB_SIZE = 49408   # the bundled tokenizer's ids run up to 49407


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used; the message names the file and why."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"Cannot load checkpoint '{path}': {reason}")


@dataclass
class SDXLCheckpoint:
    """The modules of one SDXL single-file checkpoint.

    ``kind`` is "base" or "refiner". The refiner has no CLIP-L, so its
    ``text_encoder`` and ``tokenizer`` are None.
    """

    path: str
    kind: str
    unet: UNet2DConditionModel
    vae: AutoencoderKL | None
    text_encoder: CLIPTextModel | None
    text_encoder_2: CLIPTextModelWithProjection | None
    tokenizer: CLIPTokenizer | None
    tokenizer_2: CLIPTokenizer | None
    metadata: dict[str, str] = field(default_factory=dict)
    version: FileVersion | None = None   # the file version the weights were read from


# --------------------------------------------------------------------------- tokenizers


def load_tokenizers() -> tuple[CLIPTokenizer, CLIPTokenizer]:
    """(CLIP-L tokenizer, OpenCLIP-G tokenizer) from the bundled BPE files.

    Both share the CLIP BPE vocabulary; SDXL's second tokenizer pads with
    "!" (id 0) instead of <|endoftext|>. Fresh objects each call, since
    callers may add tokens (embeddings).
    """
    first = CLIPTokenizer.from_pretrained(TOKENIZER_DIR, local_files_only=True)
    second = CLIPTokenizer.from_pretrained(TOKENIZER_DIR, local_files_only=True, pad_token="!")
    return first, second


# --------------------------------------------------------------------------- reading files


@dataclass
class _Source:
    """Uniform read access to a file's tensors: shapes first, data on demand."""

    shapes: dict[str, tuple[int, ...]]
    get: Callable[[str], torch.Tensor]
    metadata: dict[str, str]
    version: FileVersion | None = None

    def under(self, prefix: str) -> dict[str, tuple[int, ...]]:
        return {k[len(prefix):]: s for k, s in self.shapes.items() if k.startswith(prefix)}

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """Full key -> tensor for every key under ``prefix``."""
        return {k: self.get(k) for k in self.shapes if k.startswith(prefix)}


@contextmanager
def _open_source(path: str) -> Iterator[_Source]:
    if not os.path.exists(path):
        raise CheckpointError(path, "file not found")
    if not os.path.isfile(path):
        raise CheckpointError(path, "not a regular file")
    lower = path.lower()
    if lower.endswith(".safetensors"):
        with _open_safetensors(path) as source:
            yield source
    elif lower.endswith(PICKLE_SUFFIXES):
        yield _open_pickle(path)
    else:
        raise CheckpointError(path, "unsupported file extension (expected .safetensors, .ckpt, .pt or .pth)")


@contextmanager
def _open_safetensors(path: str) -> Iterator[_Source]:
    """Tensors are read on demand into private memory (never a memory map of the file:
    see file_version), one at a time, so the peak is the loaded weights plus one tensor."""
    try:
        reader = SafetensorsReader(path)
    except (FileReadError, OSError) as exc:
        raise CheckpointError(path, f"corrupt or unreadable safetensors file ({_reason(exc)})") from exc
    with reader:
        yield _Source(dict(reader.shapes), _reading(reader, path), reader.metadata, reader.version)
        try:
            reader.check_unchanged()
        except FileReadError as exc:
            raise CheckpointError(path, exc.reason) from exc


def _reason(exc: BaseException) -> str:
    return exc.reason if isinstance(exc, FileReadError) else str(exc)


def _reading(reader: SafetensorsReader, path: str) -> Callable[[str], torch.Tensor]:
    def get(key: str) -> torch.Tensor:
        try:
            return reader.get(key)
        except (FileReadError, OSError) as exc:
            raise CheckpointError(path, _reason(exc)) from exc
    return get


def _open_pickle(path: str) -> _Source:
    import pickle

    before = FileVersion.of(path)
    try:
        # weights_only: never execute code from a downloaded pickle; no mmap: weights are
        # private memory, so rewriting the file later cannot change or crash the model.
        loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        if found or "allowed global" in str(exc):
            what = found.group(1) if found else "a Python object"
            raise CheckpointError(
                path, f"pickle contains non-tensor objects ({what}); refused by torch.load(weights_only=True)"
            ) from exc
        raise CheckpointError(path, "corrupt or unreadable pickle checkpoint") from exc
    except Exception as exc:
        raise CheckpointError(path, f"corrupt or unreadable checkpoint ({type(exc).__name__}: {exc})") from exc
    if FileVersion.of(path) != before:
        raise CheckpointError(path, "the file changed on disk while it was being read; try again")
    if isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping):
        raise CheckpointError(path, f"pickle holds a {type(loaded).__name__}, not a state dict")
    tensors = {k: v for k, v in loaded.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    return _Source({k: tuple(v.shape) for k, v in tensors.items()}, tensors.__getitem__, {}, before)


# --------------------------------------------------------------------------- layout detection


def _top_prefixes(keys: Sequence[str]) -> list[str]:
    return sorted({k.split(".", 1)[0] for k in keys})


def _detect_kind(path: str, keys: Sequence[str]) -> str:
    """'base' or 'refiner'; anything else is a CheckpointError naming why."""

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    if has("cond_stage_model.transformer."):
        raise CheckpointError(path, "this is an SD 1.x checkpoint (cond_stage_model.transformer.*), not SDXL")
    if has("cond_stage_model.model."):
        raise CheckpointError(path, "this is an SD 2.x checkpoint (cond_stage_model.model.*), not SDXL")
    if not has(layout.UNET_PREFIX):
        found = ", ".join(_top_prefixes(keys)) or "none"
        reason = f"unknown layout: no SDXL UNet (model.diffusion_model.*); top-level prefixes: {found}"
        raise CheckpointError(path, reason)
    if layout.UNET_PREFIX + "label_emb.0.0.weight" not in keys:
        raise CheckpointError(path, "UNet has no label_emb (SD 1.x/2.x UNet?), not SDXL")
    if has(layout.CLIP_G_PREFIX):
        if not has(layout.CLIP_L_PREFIX):
            raise CheckpointError(path, "SDXL base layout but the CLIP-L text encoder is missing")
        return "base"
    if has(layout.CLIP_G_REFINER_PREFIX):
        return "refiner"
    found = ", ".join(sorted({".".join(k.split(".")[:3]) for k in keys if k.startswith("conditioner.")})) or "none"
    raise CheckpointError(path, f"unknown layout: no OpenCLIP-G text encoder found (conditioner prefixes: {found})")


# --------------------------------------------------------------------------- config inference


def _count_indices(shapes: Mapping[str, Any], prefix: str) -> int:
    """Number of distinct N in keys '<prefix>N.'."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for k in shapes if (m := pattern.match(k))}
    return max(found) + 1 if found else 0


def _transformer_depth(shapes: Mapping[str, Any], block: str) -> int:
    return _count_indices(shapes, block + "transformer_blocks.")


def _down_levels(shapes: Mapping[str, Sequence[int]]) -> list[list[tuple[int, int]]]:
    """Per level: [(resnet channels, transformer depth)] read from input_blocks."""
    levels: list[list[tuple[int, int]]] = [[]]
    for n in range(1, _count_indices(shapes, "input_blocks.")):
        if f"input_blocks.{n}.0.op.weight" in shapes:
            levels.append([])  # a downsampler closes the level
            continue
        channels = int(shapes[f"input_blocks.{n}.0.out_layers.3.weight"][0])
        levels[-1].append((channels, _transformer_depth(shapes, f"input_blocks.{n}.1.")))
    if any(not level for level in levels):
        raise ValueError("UNet level without resnets")
    return levels


def _up_levels(shapes: Mapping[str, Sequence[int]], layers: Sequence[int]) -> list[list[int]]:
    """Per up level (lowest resolution first): the transformer depth of each output block.
    Distilled models keep fewer transformers on the way up than down (SSD-1B: 4, 4, 10)."""
    count = _count_indices(shapes, "output_blocks.")
    expected = sum(n + 1 for n in layers)
    if count != expected:
        raise ValueError(f"{count} output blocks, expected {expected} for {list(layers)} resnets per level")
    depths = [_transformer_depth(shapes, f"output_blocks.{n}.1.") for n in range(count)]
    levels, start = [], 0
    for n in reversed(layers):
        levels.append(depths[start:start + n + 1])
        start += n + 1
    return levels


def _mid_block(shapes: Mapping[str, Sequence[int]]) -> tuple[str | None, int]:
    """diffusers' mid_block_type and its transformer depth. SDXL's mid block is resnet,
    transformer, resnet; SSD-1B and Segmind-Vega keep one resnet; KOALA-700M has none."""
    depth = _transformer_depth(shapes, "middle_block.1.")
    blocks = _count_indices(shapes, "middle_block.")
    if depth:
        return "UNetMidBlock2DCrossAttn", depth
    if blocks == 1:
        return "UNetMidBlock2D", 0
    if blocks == 0:
        return None, 0
    raise ValueError(f"UNet mid block has {blocks} parts but no transformer")


def _uniform(values: Sequence[int], what: str) -> int:
    if len(set(values)) != 1:
        raise ValueError(f"mixed {what} within one UNet level: {list(values)}")
    return values[0]


def _has_attention(depths: Sequence[int], where: str) -> bool:
    """Whether a level is a cross-attention block; diffusers cannot mix plain and
    transformer resnets within one level."""
    if all(depths):
        return True
    if any(depths):
        raise ValueError(f"{where} mixes resnets with and without a transformer: {list(depths)}")
    return False


def _addition_time_embed_dim(adm: int, pooled_dim: int | None, refiner: bool) -> int:
    """SDXL conditions on pooled text + 6 (base) or 5 (refiner) sinusoidal embeddings."""
    count = 5 if refiner else 6
    if pooled_dim is not None and adm > pooled_dim and (adm - pooled_dim) % count == 0:
        return (adm - pooled_dim) // count
    if adm > count * 256:
        return 256
    raise ValueError(f"cannot split label_emb input {adm} into pooled text ({pooled_dim}) + {count} time embeddings")


def _transformer_layers(down: list[list[int]], up: list[list[int]], mid_depth: int) -> dict[str, Any]:
    """diffusers' transformer_layers_per_block, plus reverse_transformer_layers_per_block
    where the up path is not the down path mirrored.

    Down: an int when every transformer (and the mid block's) has one depth (refiner:
    4), else one entry per level, 1 on attention-free levels (base: [1, 2, 10]), a list
    per resnet where a level's depths differ. The mid block takes the last entry, so
    that one carries the mid depth. Up: diffusers mirrors the down entries unless the
    reverse list gives each up level's depths (SSD-1B: [[4, 4, 10], [2, 1, 1], ...])."""
    per_level: list[Any] = [(lv[0] if len(set(lv)) == 1 else list(lv)) if lv[0] else 1 for lv in down]
    if mid_depth:
        last = per_level[-1]
        if not down[-1][0]:
            per_level[-1] = mid_depth
        elif (last[0] if isinstance(last, list) else last) != mid_depth:
            raise ValueError(f"mid-block depth {mid_depth} differs from last level depth {last}")
    mirrored = [[per_level[-1 - j]] * len(depths) if isinstance(per_level[-1 - j], int) else None
                for j, depths in enumerate(up)]
    reverse = any(depths[0] and depths != mirrored[j] for j, depths in enumerate(up))
    out: dict[str, Any] = {}
    used = [d for lv in down + up for d in lv if d] + ([mid_depth] if mid_depth else [])
    if not reverse and len(set(used)) == 1:
        out["transformer_layers_per_block"] = used[0]
        return out
    out["transformer_layers_per_block"] = per_level
    if reverse:
        out["reverse_transformer_layers_per_block"] = [list(d) if d[0] else [1] * len(d) for d in up]
    return out


def infer_unet_config(
    shapes: Mapping[str, Sequence[int]], *, pooled_dim: int | None = None, refiner: bool = False
) -> dict[str, Any]:
    """A ``UNet2DConditionModel`` config from original-layout UNet key shapes
    (keys without ``model.diffusion_model.``).

    Block layout comes from the tensors alone, so the SDXL family loads by shape:
    base and refiner, SSD-1B and Segmind-Vega (fewer transformers, a one-resnet mid
    block), KOALA (one resnet per level, no mid block or a deep one)."""
    levels = _down_levels(shapes)
    channels = [_uniform([c for c, _ in lv], "resnet widths") for lv in levels]
    layers = [len(lv) for lv in levels]
    down = [[d for _, d in lv] for lv in levels]
    up = _up_levels(shapes, layers)
    down_attn = [_has_attention(d, f"down level {i}") for i, d in enumerate(down)]
    up_attn = [_has_attention(d, f"up level {i}") for i, d in enumerate(up)]
    mid_type, mid_depth = _mid_block(shapes)
    attn_keys = [k for k in shapes if k.endswith("attn2.to_k.weight")]
    proj_in = [k for k in shapes if k.endswith(".proj_in.weight")]
    if not attn_keys or not proj_in:
        raise ValueError("UNet has no cross-attention (not SDXL)")
    adm = int(shapes["label_emb.0.0.weight"][1])
    time_dim = int(shapes["time_embed.0.weight"][0])
    config: dict[str, Any] = {
        "sample_size": 128,
        "in_channels": int(shapes["input_blocks.0.0.weight"][1]),
        "out_channels": int(shapes["out.2.weight"][0]),
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in down_attn],
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in up_attn],
        "mid_block_type": mid_type,
        "block_out_channels": channels,
        "layers_per_block": layers[0] if len(set(layers)) == 1 else layers,
        **_transformer_layers(down, up, mid_depth),
        "attention_head_dim": [max(1, c // HEAD_CHANNELS) for c in channels],
        "cross_attention_dim": int(shapes[attn_keys[0]][1]),
        "use_linear_projection": len(shapes[proj_in[0]]) == 2,
        "norm_num_groups": NORM_GROUPS,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": _addition_time_embed_dim(adm, pooled_dim, refiner),
        "projection_class_embeddings_input_dim": adm,
    }
    if time_dim != 4 * channels[0]:
        config["time_embedding_dim"] = time_dim
    return config


def infer_vae_config(shapes: Mapping[str, Sequence[int]]) -> dict[str, Any]:
    """An ``AutoencoderKL`` config from original-layout VAE key shapes (no ``first_stage_model.``)."""
    levels = _count_indices(shapes, "encoder.down.")
    return {
        "in_channels": int(shapes["encoder.conv_in.weight"][1]),
        "out_channels": int(shapes["decoder.conv_out.weight"][0]),
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": [int(shapes[f"encoder.down.{i}.block.0.conv2.weight"][0]) for i in range(levels)],
        "layers_per_block": _count_indices(shapes, "encoder.down.0.block."),
        "latent_channels": int(shapes["decoder.conv_in.weight"][1]),
        "norm_num_groups": NORM_GROUPS,
        "sample_size": 1024,
        "scaling_factor": SDXL_VAE_SCALING_FACTOR,
        "force_upcast": True,
        "use_quant_conv": "quant_conv.weight" in shapes,
        "use_post_quant_conv": "post_quant_conv.weight" in shapes,
        "mid_block_add_attention": "encoder.mid.attn_1.q.weight" in shapes,
    }


def infer_clip_config(hf_shapes: Mapping[str, Sequence[int]], *, open_clip: bool) -> dict[str, Any]:
    """``CLIPTextConfig`` kwargs from HF-named text-encoder shapes
    (with or without the ``text_model.`` level)."""
    shapes = {k.removeprefix("text_model."): s for k, s in hf_shapes.items()}
    vocab, hidden = (int(x) for x in shapes["embeddings.token_embedding.weight"])
    projection = shapes.get("text_projection.weight")
    return {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": int(shapes["encoder.layers.0.mlp.fc1.weight"][0]),
        "num_hidden_layers": _count_indices(shapes, "encoder.layers."),
        "num_attention_heads": max(1, hidden // HEAD_CHANNELS),
        "max_position_embeddings": int(shapes["embeddings.position_embedding.weight"][0]),
        "projection_dim": int(projection[0]) if projection is not None else hidden,
        "hidden_act": "gelu" if open_clip else "quick_gelu",
        "layer_norm_eps": 1e-5,
    }


# --------------------------------------------------------------------------- building modules


def _cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


@dataclass(frozen=True)
class _Dtypes:
    """What a component's tensors are cast to: `compute`, and with a `storage` dtype (float8)
    the weights of its plain Linear/Conv2d/Embedding layers (`stored`) are kept in that one
    instead and upcast per layer in the forward."""

    compute: torch.dtype
    storage: torch.dtype | None = None
    stored: frozenset[str] = frozenset()

    def for_model(self, model: torch.nn.Module) -> "_Dtypes":
        if self.storage is None:
            return self
        return _Dtypes(self.compute, self.storage, frozenset(storable_weight_names(model)))

    def of(self, key: str) -> torch.dtype:
        return self.storage if key in self.stored else self.compute

    def finish(self, model: torch.nn.Module) -> torch.nn.Module:
        if self.storage is not None:
            upcast_in_forward(model, self.compute)
        return model


def _assign(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """Strict load into a meta-initialised module, taking the tensors as they are."""
    try:
        module.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as exc:
        raise ValueError(str(exc).replace("\n", " ")) from exc
    return module.eval()


def _fit_to_model_keys(state: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Add or drop the ``text_model.`` level to match this transformers version."""
    wrapped = any(k.startswith("text_model.") for k in model.state_dict())
    flat = {k.removeprefix("text_model."): v for k, v in state.items()}
    if not wrapped:
        return flat
    return {k if k == "text_projection.weight" else "text_model." + k: v for k, v in flat.items()}


def _build_text_encoder(
    cls: type, hf_state: dict[str, torch.Tensor], open_clip: bool, dtypes: _Dtypes
) -> torch.nn.Module:
    config = CLIPTextConfig(**infer_clip_config({k: tuple(v.shape) for k, v in hf_state.items()}, open_clip=open_clip))
    with init_empty_weights():  # parameters on meta, buffers (position_ids) real
        model = cls(config)
    dtypes = dtypes.for_model(model)
    state = {k: _cast(v, dtypes.of(k)) for k, v in _fit_to_model_keys(hf_state, model).items()}
    return dtypes.finish(_assign(model, state))


def _build_open_clip(source: _Source, prefix: str, dtypes: _Dtypes) -> CLIPTextModelWithProjection:
    state = _strip_ignored(layout.open_clip_from_original(source.tensors(prefix), prefix))
    return _build_text_encoder(CLIPTextModelWithProjection, state, True, dtypes)


def _build_clip_l(source: _Source, dtypes: _Dtypes) -> CLIPTextModel:
    state = _strip_ignored(layout.clip_l_from_original(source.tensors(layout.CLIP_L_PREFIX)))
    return _build_text_encoder(CLIPTextModel, state, False, dtypes)


def _map_tensors(
    source: _Source, prefix: str, key_map: Mapping[str, str], dtypes: _Dtypes,
    reshape: Callable[[str, torch.Tensor], torch.Tensor] = lambda _k, t: t,
) -> dict[str, torch.Tensor]:
    """diffusers key -> tensor, requiring every mapped key and no unmapped one."""
    available = source.under(prefix)
    missing = [o for o in key_map.values() if o not in available]
    unused = sorted(set(available) - set(key_map.values()))
    if missing or unused:
        raise ValueError(f"layout mismatch under {prefix}: missing {missing[:5]} unexpected {unused[:5]}"
                         f" ({len(missing)} missing, {len(unused)} unexpected)")
    return {d: _cast(reshape(d, source.get(prefix + o)), dtypes.of(d)) for d, o in key_map.items()}


def _build_unet(source: _Source, pooled_dim: int, refiner: bool, dtypes: _Dtypes) -> UNet2DConditionModel:
    config = infer_unet_config(source.under(layout.UNET_PREFIX), pooled_dim=pooled_dim, refiner=refiner)
    with init_empty_weights():
        unet = UNet2DConditionModel.from_config(config)
    key_map = layout.unet_key_map(unet.config, keys=unet.state_dict().keys())
    dtypes = dtypes.for_model(unet)
    return dtypes.finish(_assign(unet, _map_tensors(source, layout.UNET_PREFIX, key_map, dtypes)))


def _build_vae(source: _Source, dtype: torch.dtype, prefix: str = layout.VAE_PREFIX) -> AutoencoderKL:
    config = infer_vae_config(source.under(prefix))
    with init_empty_weights():
        vae = AutoencoderKL.from_config(config)
    key_map = layout.vae_key_map(vae.config, keys=vae.state_dict().keys())
    state = _map_tensors(source, prefix, key_map, _Dtypes(dtype), layout.vae_tensor_from_original)
    return _assign(vae, state)


_VAE_PARTS = ("encoder", "decoder", "quant_conv", "post_quant_conv")


def load_vae(path: str | os.PathLike[str], *, dtype: torch.dtype = torch.float32) -> AutoencoderKL:
    """A standalone SDXL VAE file (models/vae) in the original layout, with or
    without the checkpoint's `first_stage_model.` prefix."""
    path = os.fspath(path)
    with _open_source(path) as source:
        prefix = layout.VAE_PREFIX if source.under(layout.VAE_PREFIX) else ""
        parts = {k: s for k, s in source.under(prefix).items() if k.split(".", 1)[0] in _VAE_PARTS}
        if "encoder.conv_in.weight" not in parts or "decoder.conv_out.weight" not in parts:
            raise CheckpointError(path, "not a VAE in the original layout (no encoder.conv_in / decoder.conv_out; "
                                        f"found {', '.join(_top_prefixes(list(source.shapes))[:6]) or 'no tensors'})")
        vae_only = _Source({prefix + k: s for k, s in parts.items()}, source.get, source.metadata, source.version)
        return _component(path, "VAE", lambda: _build_vae(vae_only, dtype, prefix))


def _component(path: str, name: str, build: Callable[[], Any]) -> Any:
    """Run one build step; shape/key problems become a CheckpointError naming the part."""
    try:
        return build()
    except CheckpointError:
        raise
    except (ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(path, f"{name}: {exc}") from exc


def _log_unused(source: _Source, used_prefixes: Sequence[str]) -> None:
    unused = [k for k in source.shapes if not k.startswith(tuple(used_prefixes))]
    if unused:
        groups = sorted({k.split(".", 1)[0] for k in unused})
        logger.info("checkpoint: ignoring %d tensors outside the SDXL components (%s)", len(unused), ", ".join(groups))


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    unet_dtype: torch.dtype = torch.float32,
    vae_dtype: torch.dtype = torch.float32,
    text_encoder_dtype: torch.dtype = torch.float32,
    unet_storage_dtype: torch.dtype | None = None,
    text_encoder_storage_dtype: torch.dtype | None = None,
) -> SDXLCheckpoint:
    """Load an SDXL base or refiner single-file checkpoint into diffusers/transformers modules.

    ``.safetensors`` is read tensor by tensor into private memory (never mapped);
    ``.ckpt/.pt/.pth`` go only through ``torch.load(weights_only=True)``. Raises ``CheckpointError`` for anything unusable.
    A storage dtype (float8) keeps the UNet's or text encoders' Linear/Conv2d/Embedding weights
    in it, each tensor cast as it is read; those layers upcast to the compute dtype per call.
    """
    path = os.fspath(path)
    encoder_dtypes = _Dtypes(text_encoder_dtype, text_encoder_storage_dtype)
    with _open_source(path) as source:
        kind = _detect_kind(path, list(source.shapes))
        refiner = kind == "refiner"
        g_prefix = layout.CLIP_G_REFINER_PREFIX if refiner else layout.CLIP_G_PREFIX
        text_encoder_2 = _component(
            path, "OpenCLIP-G text encoder", lambda: _build_open_clip(source, g_prefix, encoder_dtypes))
        text_encoder = None
        if not refiner:
            text_encoder = _component(path, "CLIP-L text encoder", lambda: _build_clip_l(source, encoder_dtypes))
        for encoder in (text_encoder, text_encoder_2):
            if encoder is not None and encoder.config.vocab_size < CLIP_VOCAB_SIZE:
                raise CheckpointError(path, f"its text encoder has a vocabulary of {encoder.config.vocab_size} "
                                            f"tokens; SDXL's CLIP tokenizer needs {CLIP_VOCAB_SIZE}")
        pooled_dim = text_encoder_2.config.projection_dim
        unet = _component(path, "UNet", lambda: _build_unet(source, pooled_dim, refiner,
                                                            _Dtypes(unet_dtype, unet_storage_dtype)))
        vae = None
        if source.under(layout.VAE_PREFIX):
            vae = _component(path, "VAE", lambda: _build_vae(source, vae_dtype))
        else:
            logger.warning("checkpoint %s has no VAE (first_stage_model.*)", path)
        used = [layout.UNET_PREFIX, layout.VAE_PREFIX, g_prefix] + ([] if refiner else [layout.CLIP_L_PREFIX])
        _log_unused(source, used)
        metadata, version = source.metadata, source.version
    tokenizer, tokenizer_2 = load_tokenizers()
    return SDXLCheckpoint(
        path=path, kind=kind, unet=unet, vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
        tokenizer=None if refiner else tokenizer, tokenizer_2=tokenizer_2, metadata=metadata, version=version,
    )


def _strip_ignored(converted: tuple[dict[str, torch.Tensor], list[str]]) -> dict[str, torch.Tensor]:
    state, ignored = converted
    if ignored:
        logger.debug("checkpoint: ignoring %s", ", ".join(ignored))
    return state


# --------------------------------------------------------------------------- writing


def original_state_dict(
    *,
    unet: UNet2DConditionModel | None = None,
    vae: AutoencoderKL | None = None,
    text_encoder: CLIPTextModel | None = None,
    text_encoder_2: CLIPTextModelWithProjection | None = None,
    refiner: bool = False,
) -> dict[str, torch.Tensor]:
    """The given modules' weights under their full original single-file keys.

    ``refiner`` puts OpenCLIP-G at ``conditioner.embedders.0.model.`` (the
    refiner has no CLIP-L). Tensors are shared with the modules, not copied.
    """
    out: dict[str, torch.Tensor] = {}
    if unet is not None:
        state = unet.state_dict()
        for d, o in layout.unet_key_map(unet.config, keys=state.keys()).items():
            out[layout.UNET_PREFIX + o] = state[d]
    if vae is not None:
        state = vae.state_dict()
        for d, o in layout.vae_key_map(vae.config, keys=state.keys()).items():
            out[layout.VAE_PREFIX + o] = layout.vae_tensor_to_original(d, state[d])
    if text_encoder is not None:
        if refiner:
            raise ValueError("the SDXL refiner layout has no CLIP-L text encoder")
        out.update(layout.clip_l_to_original(text_encoder.state_dict()))
    if text_encoder_2 is not None:
        prefix = layout.CLIP_G_REFINER_PREFIX if refiner else layout.CLIP_G_PREFIX
        hf = {k if k.startswith(("text_model.", "text_projection")) else "text_model." + k: v
              for k, v in text_encoder_2.state_dict().items()}
        out.update(layout.open_clip_to_original(hf, prefix))
    return out


def save_checkpoint(
    path: str | os.PathLike[str], state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> str:
    """Write a single-file ``.safetensors`` checkpoint (contiguous CPU tensors).

    Written to a temporary name first and renamed, so a crash never leaves
    a half-written file under the final name.
    """
    from safetensors.torch import save_file

    path = os.fspath(path)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    tmp = path + ".partial"
    try:
        save_file(tensors, tmp, metadata={str(k): str(v) for k, v in (metadata or {}).items()})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
