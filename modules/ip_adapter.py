"""Image Prompt: IP-Adapter Plus for SDXL, as extra model kinds under model management.

Files (upstream Fooocus's names and folders):
- ``ip-adapter-plus_sdxl_vit-h.bin`` in ``path_controlnet`` (``models/controlnet``): a torch
  pickle of two dicts, ``image_proj`` (the Resampler: ``latents``, ``proj_in``, ``proj_out``,
  ``norm_out``, ``layers.N.0`` attention, ``layers.N.1`` feed-forward) and ``ip_adapter``
  (``"1.to_k_ip.weight"``, ``"1.to_v_ip.weight"``, ``"3.to_k_ip.weight"``..., one pair per
  cross-attention layer of the UNet, in the UNet's processor order). The diffusers/h94
  ``.safetensors`` export (``image_proj.*``, ``ip_adapter.*``) is read too.
- ``clip_vision_vit_h.safetensors`` in ``path_clip_vision`` (``models/clip_vision``): the
  CLIP ViT-H/14 image encoder in transformers' layout (``vision_model.*``,
  ``visual_projection.weight``); open_clip's layout (``visual.*``) is converted.

Both are read into private memory (never mmap'ed) and each becomes a ``ModelPatcher``
(``"<file>:ip_adapter"``, ``"<file>:clip_vision"``) loaded with ``load_models_gpu``: they
count in the same budget, show in ``/model_status`` and are evicted like any model.

Applying never changes a UNet weight (a resident UNet patches 0 weights for image prompts):
our attention processor is installed once on every cross-attention layer and adds
``weight * attention(q, k_ip, v_ip)`` (the IP-Adapter paper's decoupled cross-attention, as
diffusers' ``IPAdapterAttnProcessor2_0``) only while an ``applied`` context is active on that
UNet; otherwise it calls the layer's original processor, so outputs stay bit-exact.

Request order for the pipeline::

    models = ImagePromptModels()                       # one per model catalogue, kept
    adapter = models.get(ip_path, clip_path)           # loads/reuses per file version
    tokens = adapter.image_tokens([img1, img2])        # CLIP + resampler, cached per pixels
    prepared = adapter.prepare(unet_patcher.model, [ImagePrompt(t, weight, stop) ...])
    with applied(unet_patcher.model, prepared):        # around core.sample
        ... core._predict calls select_batch(unet, rows, t) before each UNet call ...
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ldm_patched.modules import model_management
from ldm_patched.modules.file_version import FileReadError, FileVersion, read_file, read_safetensors
from ldm_patched.modules.model_patcher import ModelPatcher, compute_device_and_dtype
from ldm_patched.modules.sized_cache import SizedCache

IP_ADAPTER_FILE = "ip-adapter-plus_sdxl_vit-h.bin"
CLIP_VISION_FILE = "clip_vision_vit_h.safetensors"
IP_ADAPTER_URL = "https://huggingface.co/lllyasviel/misc/resolve/main/ip-adapter-plus_sdxl_vit-h.bin"
CLIP_VISION_URL = "https://huggingface.co/lllyasviel/misc/resolve/main/clip_vision_vit_h.safetensors"

# Upstream's flags.default_parameters for "ImagePrompt": (stop at, weight).
DEFAULT_STOP = 0.5
DEFAULT_WEIGHT = 0.6
MAX_IMAGE_PROMPTS = 4           # upstream's four image-prompt slots
CLIP_SIZE = 224                 # the encoder's input (IP-Adapter's README: resize, not crop)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
RESAMPLER_HEAD_DIM = 64         # the Resampler's head width (not stored in the file)
TOKEN_CACHE_ENTRIES = 32


class ImagePromptError(ValueError):
    """An image-prompt file or request that cannot be used; the message names the file/field."""


# -- reading files ------------------------------------------------------------------------

def _read_state(path: str) -> tuple[FileVersion, dict]:
    """A .safetensors file (our own private reader) or a torch pickle (weights only)."""
    name = os.path.basename(path)
    try:
        if path.endswith(".safetensors"):
            version, tensors, _ = read_safetensors(path)
            return version, tensors
        version, data = read_file(path)
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (FileReadError, OSError) as error:
        raise ImagePromptError(f"{name}: cannot be read ({error})") from error
    except Exception as error:   # unpickling garbage raises anything
        raise ImagePromptError(f"{name}: not a model file ({type(error).__name__}: {error})") from error
    if not isinstance(state, dict):
        raise ImagePromptError(f"{name}: not an IP-Adapter (the file holds a {type(state).__name__})")
    return version, state


# -- the IP-Adapter module -------------------------------------------------------------

def _split_ip_file(state: dict, name: str) -> tuple[dict, dict]:
    """(image_proj, ip_adapter) dicts from either the pickle or the flat safetensors layout."""
    if "image_proj" in state and "ip_adapter" in state:
        proj, layers = state["image_proj"], state["ip_adapter"]
    else:
        proj = {k[len("image_proj."):]: v for k, v in state.items() if k.startswith("image_proj.")}
        layers = {k[len("ip_adapter."):]: v for k, v in state.items() if k.startswith("ip_adapter.")}
    if not proj or not layers or not isinstance(proj, dict) or not isinstance(layers, dict):
        raise ImagePromptError(f"{name}: not an IP-Adapter (no 'image_proj' and 'ip_adapter' weights; "
                               f"is it a LoRA or a checkpoint?)")
    if "latents" not in proj:
        raise ImagePromptError(f"{name}: an IP-Adapter without a Resampler ('latents'): only the "
                               f"IP-Adapter Plus kind ({IP_ADAPTER_FILE}) is supported")
    return proj, layers


def resampler_to_diffusers(proj: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The Resampler's published key layout -> diffusers' IPAdapterPlusImageProjection layout.

    Per block N: ``layers.N.0`` (norm1, norm2, to_q, to_kv, to_out) is the perceiver
    attention -> ``ln0``, ``ln1``, ``attn.to_q``, ``attn.to_k``/``to_v`` (to_kv split in
    halves), ``attn.to_out.0``; ``layers.N.1`` is LayerNorm, Linear, GELU, Linear ->
    ``ff.0``, ``ff.1.net.0.proj``, ``ff.1.net.2``."""
    renames = {"0.norm1": "ln0", "0.norm2": "ln1", "0.to_q": "attn.to_q", "0.to_out": "attn.to_out.0",
               "1.0": "ff.0", "1.1": "ff.1.net.0.proj", "1.3": "ff.1.net.2"}
    out = {}
    for key, value in proj.items():
        match = re.match(r"^layers\.(\d+)\.(\d\.\w+)\.(weight|bias)$", key)
        if match is None:
            out[key] = value
            continue
        block, part, kind = match.groups()
        prefix = f"layers.{block}."
        if part == "0.to_kv":
            k, v = value.chunk(2, dim=0)
            out[prefix + f"attn.to_k.{kind}"], out[prefix + f"attn.to_v.{kind}"] = k, v
        elif part in renames:
            out[prefix + f"{renames[part]}.{kind}"] = value
        else:
            out[key] = value   # unknown: the strict load names it
    return out


def _resampler_shape(proj: dict[str, torch.Tensor]) -> dict[str, int]:
    latents = proj["latents"]
    hidden = int(latents.shape[2])
    depth = len({int(k.split(".")[1]) for k in proj if k.startswith("layers.")})
    inner_ff = int(proj["layers.0.1.1.weight"].shape[0])
    return dict(embed_dims=int(proj["proj_in.weight"].shape[1]), output_dims=int(proj["proj_out.weight"].shape[0]),
                hidden_dims=hidden, depth=depth, dim_head=RESAMPLER_HEAD_DIM,
                heads=max(1, int(proj["layers.0.0.to_q.weight"].shape[0]) // RESAMPLER_HEAD_DIM),
                num_queries=int(latents.shape[1]), ffn_ratio=inner_ff / hidden)


def _kv_pairs(layers: dict[str, torch.Tensor], name: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (to_k_ip, to_v_ip) weights in the file's layer order (its numbers ascending)."""
    numbers = sorted({int(k.split(".")[0]) for k in layers if re.match(r"^\d+\.to_[kv]_ip\.weight$", k)})
    if not numbers:
        raise ImagePromptError(f"{name}: not an IP-Adapter (no 'N.to_k_ip.weight' layers)")
    pairs = []
    for n in numbers:
        k, v = layers.get(f"{n}.to_k_ip.weight"), layers.get(f"{n}.to_v_ip.weight")
        if k is None or v is None or k.ndim != 2 or k.shape != v.shape:
            raise ImagePromptError(f"{name}: layer {n} lacks a matching to_k_ip/to_v_ip pair")
        pairs.append((k, v))
    widths = {int(k.shape[1]) for k, _ in pairs}
    if len(widths) != 1:
        raise ImagePromptError(f"{name}: to_k_ip layers disagree on the context width ({sorted(widths)})")
    return pairs


class IPAdapterPlus(torch.nn.Module):
    """The Resampler (diffusers' IPAdapterPlusImageProjection) and the per-layer to_k_ip /
    to_v_ip projections, one module so one patcher moves and accounts all of it."""

    def __init__(self, shape: dict[str, int], kv_shapes: Sequence[tuple[int, int]]) -> None:
        from diffusers.models.embeddings import IPAdapterPlusImageProjection

        super().__init__()
        self.image_proj = IPAdapterPlusImageProjection(**shape)
        self.to_k_ip = torch.nn.ModuleList(torch.nn.Linear(i, o, bias=False) for o, i in kv_shapes)
        self.to_v_ip = torch.nn.ModuleList(torch.nn.Linear(i, o, bias=False) for o, i in kv_shapes)

    @property
    def context_width(self) -> int:
        return self.to_k_ip[0].in_features

    @property
    def clip_width(self) -> int:
        return self.image_proj.proj_in.in_features


def build_ip_adapter(state: dict, name: str, dtype: torch.dtype) -> IPAdapterPlus:
    """An IPAdapterPlus holding the file's tensors (cast to `dtype`), or ImagePromptError."""
    from accelerate import init_empty_weights

    proj, layers = _split_ip_file(state, name)
    pairs = _kv_pairs(layers, name)
    try:
        shape = _resampler_shape(proj)
        with init_empty_weights():
            module = IPAdapterPlus(shape, [tuple(k.shape) for k, _ in pairs])
        weights = {f"image_proj.{k}": v for k, v in resampler_to_diffusers(proj).items()}
        for i, (k, v) in enumerate(pairs):
            weights[f"to_k_ip.{i}.weight"], weights[f"to_v_ip.{i}.weight"] = k, v
        weights = {k: v.to(dtype) for k, v in weights.items()}
        module.load_state_dict(weights, strict=True, assign=True)
    except (KeyError, RuntimeError, IndexError, ValueError, AttributeError) as error:
        raise ImagePromptError(f"{name}: not a usable IP-Adapter Plus Resampler ({error})") from error
    return module.eval().requires_grad_(False)


# -- the CLIP vision encoder -----------------------------------------------------------

def _open_clip_to_transformers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """open_clip's ``visual.*`` layout -> transformers' CLIPVisionModelWithProjection keys."""
    out = {"vision_model.embeddings.class_embedding": state["visual.class_embedding"],
           "vision_model.embeddings.patch_embedding.weight": state["visual.conv1.weight"],
           "vision_model.embeddings.position_embedding.weight": state["visual.positional_embedding"],
           "visual_projection.weight": state["visual.proj"].t().contiguous()}
    simple = {"visual.ln_pre": "vision_model.pre_layrnorm", "visual.ln_post": "vision_model.post_layernorm"}
    block = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
             "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}
    for key, value in state.items():
        for old, new in simple.items():
            if key.startswith(old + "."):
                out[new + key[len(old):]] = value
        match = re.match(r"^visual\.transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)$", key)
        if not match:
            continue
        n, part, kind = match.groups()
        prefix = f"vision_model.encoder.layers.{n}."
        if part == "attn" or part == "attn.in_proj":
            continue
        if part in block:
            out[prefix + f"{block[part]}.{kind}"] = value
    for key, value in state.items():
        match = re.match(r"^visual\.transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)$", key)
        if match:
            n, kind = match.groups()
            for proj, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0)):
                out[f"vision_model.encoder.layers.{n}.self_attn.{proj}.{kind}"] = part
    return out


def _vision_config(state: dict[str, torch.Tensor]):
    """A CLIPVisionConfig inferred from the tensors (ViT-H/14 for the real file)."""
    from transformers import CLIPVisionConfig

    patch = state["vision_model.embeddings.patch_embedding.weight"]
    width, patch_size = int(patch.shape[0]), int(patch.shape[2])
    positions = int(state["vision_model.embeddings.position_embedding.weight"].shape[0])
    side = math.isqrt(positions - 1)
    if side * side != positions - 1:
        raise ValueError(f"{positions} positions is not a square grid plus a class token")
    depth = len({k.split(".")[3] for k in state if k.startswith("vision_model.encoder.layers.")})
    # Every published CLIP ViT (L, H, bigG) has 16 heads; tiny test encoders use 64-wide heads.
    heads = 16 if width >= 1024 else max(1, width // 64)
    openai_l = width == 1024 and depth == 24   # OpenAI's ViT-L uses quick_gelu, open_clip's gelu
    return CLIPVisionConfig(
        hidden_size=width, intermediate_size=int(state["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0]),
        projection_dim=int(state["visual_projection.weight"].shape[0]), num_hidden_layers=depth,
        num_attention_heads=heads, image_size=side * patch_size, patch_size=patch_size,
        num_channels=int(patch.shape[1]), hidden_act="quick_gelu" if openai_l else "gelu", layer_norm_eps=1e-5)


def build_clip_vision(state: dict, name: str, dtype: torch.dtype) -> torch.nn.Module:
    """A transformers CLIPVisionModelWithProjection with the file's tensors, or ImagePromptError."""
    from accelerate import init_empty_weights
    from transformers import CLIPVisionModelWithProjection

    if "visual.conv1.weight" in state:
        state = _open_clip_to_transformers(state)
    if "vision_model.embeddings.patch_embedding.weight" not in state:
        raise ImagePromptError(f"{name}: not a CLIP vision encoder (no 'vision_model.embeddings.patch_embedding' "
                               f"or open_clip 'visual.conv1' weights)")
    state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
    try:
        config = _vision_config(state)
        with init_empty_weights():
            model = CLIPVisionModelWithProjection(config)
        model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    except (KeyError, RuntimeError, IndexError, ValueError) as error:
        raise ImagePromptError(f"{name}: not a usable CLIP vision encoder ({error})") from error
    return model.eval().requires_grad_(False)


# -- images ------------------------------------------------------------------------------

def image_digest(image: np.ndarray) -> str:
    """Content identity of an image: its shape and pixels."""
    image = np.ascontiguousarray(image)
    hasher = hashlib.sha256(repr((image.shape, str(image.dtype))).encode())
    hasher.update(image.tobytes())
    return hasher.hexdigest()


def _check_image(image: object, index: int) -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim not in (2, 3):
        raise ImagePromptError(f"image_prompts[{index}]: expected an HxWx3 uint8 image")
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    if image.shape[2] == 4:   # RGBA over white, as upstream's HWC3
        rgb, alpha = image[..., :3].astype(np.float32), image[..., 3:].astype(np.float32) / 255.0
        image = (rgb * alpha + 255.0 * (1.0 - alpha)).clip(0, 255).round().astype(np.uint8)
    if image.shape[2] != 3 or min(image.shape[:2]) < 1:
        raise ImagePromptError(f"image_prompts[{index}]: expected an HxWx3 uint8 image, got shape {image.shape}")
    return image


def clip_pixels(image: np.ndarray, size: int = CLIP_SIZE) -> torch.Tensor:
    """[1, 3, size, size] normalized pixels: resized (stretched, Lanczos) to the encoder's
    square as upstream does (IP-Adapter's README), then CLIP's mean/std."""
    from PIL import Image

    resized = np.asarray(Image.fromarray(image).resize((size, size), resample=Image.LANCZOS))
    pixels = torch.from_numpy(resized.astype(np.float32) / 255.0).permute(2, 0, 1)[None]
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (pixels - mean) / std


# -- requests ------------------------------------------------------------------------------

@dataclass(frozen=True)
class ImageTokens:
    """The Resampler's tokens of one image ([1, queries, context]) and of the empty image."""

    cond: torch.Tensor
    uncond: torch.Tensor
    identity: tuple   # (image sha256, IP-Adapter version, CLIP vision version)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.cond, self.uncond))


@dataclass(frozen=True)
class ImagePrompt:
    tokens: ImageTokens
    weight: float = DEFAULT_WEIGHT
    stop: float = DEFAULT_STOP


@dataclass
class PreparedPrompt:
    """One image prompt's K/V per cross-attention layer, computed once per request:
    to_k_ip/to_v_ip are the same for every step, so applying them per step would be 70
    pairs of matmuls a step for nothing (upstream precomputes them too)."""

    keys: list[torch.Tensor]     # per layer [2, queries, width]: row 0 uncond, row 1 cond
    values: list[torch.Tensor]
    weight: float
    stop: float
    weight_tensor: torch.Tensor | None = None

    def to(self, device: torch.device, dtype: torch.dtype) -> "PreparedPrompt":
        """Keys, values and weight on the UNet's device and dtype. Prepared where the UNet
        was (it may have been offloaded then): the first step moves them once, for good.
        The weight is a tensor so that a compiled UNet reads it as an input: a float would
        be a constant of the graph, and each new weight a recompilation."""
        if self.keys[0].device != device or self.keys[0].dtype != dtype:
            self.keys = [k.to(device, dtype) for k in self.keys]
            self.values = [v.to(device, dtype) for v in self.values]
        w = self.weight_tensor
        if w is None or w.device != device or w.dtype != dtype:
            self.weight_tensor = torch.tensor(self.weight, device=device, dtype=dtype)
        return self


@dataclass
class PreparedImagePrompts:
    prompts: list[PreparedPrompt]
    signature: str


def image_prompt_signature(prompts: Sequence[ImagePrompt]) -> str:
    """Content identity of what a request applies: file versions, image hashes, weights, stops."""
    if not prompts:
        return "none"
    parts = [(p.tokens.identity, float(p.weight), float(p.stop)) for p in prompts]
    return hashlib.sha1(repr(parts).encode()).hexdigest()[:16]


def check_prompts(prompts: Sequence[ImagePrompt]) -> None:
    if len(prompts) > MAX_IMAGE_PROMPTS:
        raise ImagePromptError(f"image_prompts: at most {MAX_IMAGE_PROMPTS} image prompts, got {len(prompts)}")
    for i, p in enumerate(prompts):
        if not (math.isfinite(p.weight) and math.isfinite(p.stop)) or not 0.0 <= p.stop <= 1.0:
            raise ImagePromptError(f"image_prompts[{i}]: weight must be finite and stop in [0, 1]")


# -- the loaded pair of files ----------------------------------------------------------

class ImagePromptAdapter:
    """One IP-Adapter file with one CLIP vision file: patchers and the token cache."""

    def __init__(self, ip_patcher: ModelPatcher, clip_patcher: ModelPatcher, ip_version: FileVersion,
                 clip_version: FileVersion, cache: SizedCache[tuple, ImageTokens]) -> None:
        self.ip = ip_patcher
        self.clip = clip_patcher
        self.ip_version = ip_version
        self.clip_version = clip_version
        self._cache = cache
        self.encoder_calls = 0    # CLIP forwards run (tests count cache hits with it)

    @property
    def module(self) -> IPAdapterPlus:
        return self.ip.model   # type: ignore[return-value]

    def image_tokens(self, images: Sequence[np.ndarray]) -> list[ImageTokens]:
        """Per image its tokens and the empty image's; cached per pixels and file versions."""
        checked = [_check_image(image, i) for i, image in enumerate(images)]
        keys = [(image_digest(image), self.ip_version, self.clip_version) for image in checked]
        missing = [(k, image) for k, image in zip(keys, checked) if k not in self._cache]
        if missing:
            uncond = self._uncond()
            encoded = self._encode(torch.cat([clip_pixels(image) for _, image in missing]))
            for (key, _), cond in zip(missing, encoded):
                self._remember(key, ImageTokens(cond=cond[None], uncond=uncond, identity=key))
        result = []
        for key in keys:
            self._cache.move_to_end(key)
            result.append(self._cache[key])
        return result

    def _uncond(self) -> torch.Tensor:
        """Tokens of the all-zero (normalized) image: the unconditional side, as in the
        IP-Adapter reference code and diffusers."""
        key = ("<zero image>", self.ip_version, self.clip_version)
        if key not in self._cache:
            zero = torch.zeros(1, 3, CLIP_SIZE, CLIP_SIZE)
            self._remember(key, ImageTokens(cond=self._encode(zero), uncond=torch.empty(0), identity=key))
        return self._cache[key].cond

    def _remember(self, key: tuple, tokens: ImageTokens) -> None:
        self._cache[key] = tokens
        while len(self._cache) > TOKEN_CACHE_ENTRIES:
            self._cache.popitem(last=False)

    @torch.inference_mode()
    def _encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """[n, queries, context] Resampler tokens of normalized pixels (penultimate CLIP layer)."""
        model_management.load_models_gpu(
            [self.clip, self.ip], model_management.working_memory_bytes(
                "clip_vision", CLIP_SIZE, CLIP_SIZE, pixels.shape[0], self.clip.model_dtype()))
        self.encoder_calls += 1
        pixels = pixels.to(self.clip.load_device, self.clip.model_dtype())
        hidden = self.clip.model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        tokens = self.module.image_proj(hidden.to(self.ip.model_dtype()))
        return tokens.to("cpu", torch.float32)   # small; the request moves them to the UNet

    @torch.inference_mode()
    def prepare(self, unet: torch.nn.Module, prompts: Sequence[ImagePrompt]) -> PreparedImagePrompts:
        """K/V of every prompt for every cross-attention layer of `unet`, on its device/dtype
        (checked against the UNet: layer count and widths)."""
        check_prompts(prompts)
        self._check_unet(unet)
        unet_device, unet_dtype = compute_device_and_dtype(unet)   # streamed or float8 weights: where it computes
        model_management.load_models_gpu([self.ip])
        device, dtype = self.ip.load_device, self.ip.model_dtype()
        prepared = []
        for p in prompts:
            both = torch.cat([p.tokens.uncond, p.tokens.cond]).to(device, dtype)
            keys = [layer(both).to(unet_device, unet_dtype) for layer in self.module.to_k_ip]
            values = [layer(both).to(unet_device, unet_dtype) for layer in self.module.to_v_ip]
            prepared.append(PreparedPrompt(keys, values, float(p.weight), float(p.stop)))
        return PreparedImagePrompts(prepared, image_prompt_signature(prompts))

    def _check_unet(self, unet: torch.nn.Module) -> None:
        layers = cross_attention_layers(unet)
        name = self.ip_version.name
        width = self.module.context_width
        unet_width = layers[0].to_k.in_features if layers else None
        if unet_width != width:
            raise ImagePromptError(f"{name}: made for a UNet with cross-attention width {width}, "
                                   f"this UNet has {unet_width} (an SD 1.5 IP-Adapter on SDXL?)")
        if len(layers) != len(self.module.to_k_ip):
            raise ImagePromptError(f"{name}: has {len(self.module.to_k_ip)} cross-attention layers, "
                                   f"this UNet has {len(layers)}")
        for i, (attn, k) in enumerate(zip(layers, self.module.to_k_ip)):
            if attn.to_k.out_features != k.out_features:
                raise ImagePromptError(f"{name}: layer {i} is {k.out_features} wide, the UNet's "
                                       f"{attn.to_k.out_features}")


class ImagePromptModels:
    """The loaded image-prompt files, keyed by file version: a new version of a path
    replaces the old (its module is forgotten by the registry). Holds no module globals,
    so a model catalogue owns one and tests make their own."""

    def __init__(self) -> None:
        self._ip: dict[str, tuple[FileVersion, ModelPatcher]] = {}
        self._clip: dict[str, tuple[FileVersion, ModelPatcher]] = {}
        self._tokens: SizedCache[tuple, ImageTokens] = SizedCache(ImageTokens.nbytes)
        self._adapters: dict[tuple[FileVersion, FileVersion], ImagePromptAdapter] = {}

    def get(self, ip_path: str, clip_path: str) -> ImagePromptAdapter:
        ip_version, ip = self._load(self._ip, ip_path, build_ip_adapter, "ip_adapter")
        clip_version, clip = self._load(self._clip, clip_path, build_clip_vision, "clip_vision")
        if ip.model.clip_width != clip.model.config.hidden_size:
            raise ImagePromptError(f"{ip_version.name}: expects CLIP features {ip.model.clip_width} wide, "
                                   f"{clip_version.name} gives {clip.model.config.hidden_size}")
        self._register_cache()
        key = (ip_version, clip_version)
        adapter = self._adapters.get(key)
        if adapter is None:
            self._adapters = {k: a for k, a in self._adapters.items() if k[0] in self._current_versions()
                              and k[1] in self._current_versions()}
            adapter = self._adapters[key] = ImagePromptAdapter(ip, clip, ip_version, clip_version, self._tokens)
        return adapter

    def _register_cache(self) -> None:
        """Charge the cached tokens (host memory) to the host ledger; freeable in the first tier."""
        model_management.get_manager().register_cache("image_prompt_tokens", model_management.HOST,
                                                      self._tokens.nbytes, self._tokens.clear)

    def _current_versions(self) -> set[FileVersion]:
        return {v for v, _ in self._ip.values()} | {v for v, _ in self._clip.values()}

    def _load(self, table: dict, path: str, build: Callable, part: str) -> tuple[FileVersion, ModelPatcher]:
        name = os.path.basename(path)
        try:
            version = FileVersion.of(path)
        except FileReadError as error:
            raise ImagePromptError(f"{name}: {error.reason}") from error
        held = table.get(version.path)
        if held is not None and held[0] == version:
            return held
        if held is not None:
            self._drop(held[1])
            del table[version.path]
            self._tokens.clear()   # keys hold versions: old entries could never hit again
        manager = model_management.get_manager()
        version, state = _read_state(path)
        module = build(state, name, manager.dtype_for("text_encoder"))
        patcher = ModelPatcher(module, manager.device, manager.offload_device(), name=f"{name}:{part}")
        table[version.path] = (version, patcher)
        return version, patcher

    @staticmethod
    def _drop(patcher: ModelPatcher) -> None:
        model_management.get_manager().forget(patcher.model)

    def drop(self) -> None:
        """Forget every loaded file (a new manager, or tests)."""
        for table in (self._ip, self._clip):
            for _, patcher in table.values():
                self._drop(patcher)
            table.clear()
        self._tokens.clear()
        self._adapters.clear()


# -- applying to a UNet ----------------------------------------------------------------

def cross_attention_layers(unet: torch.nn.Module) -> list[torch.nn.Module]:
    """The UNet's cross-attention (``attn2``) modules in diffusers' processor order (down,
    up, mid blocks), which is the order of the IP-Adapter file's odd layer numbers."""
    from diffusers.models.attention_processor import Attention

    return [m for n, m in unet.named_modules() if isinstance(m, Attention) and n.endswith("attn2")]


@dataclass
class _Active:
    """What one `applied` context contributes, read by every processor of its UNet.

    `live` (the prompts that act on the next UNet call) and `rows` are decided here, in
    `select_batch`, outside the UNet: a compiled UNet then sees only a list of tensors and
    a few booleans, so the sampling progress (a new float every step) never becomes a guard
    of its graph."""

    prompts: list[PreparedPrompt]
    rows: list[bool] | None = None          # per conditioning block: True = positive
    live: list[PreparedPrompt] = field(default_factory=list)

    def select(self, progress: float, device: torch.device, dtype: torch.dtype) -> None:
        """The prompts still acting at `progress` (upstream's 1 - t/999), moved to the UNet."""
        self.live = [p.to(device, dtype) for p in self.prompts if p.weight != 0.0 and progress < p.stop]


@dataclass
class _Slot:
    """Shared by the processors installed on one UNet: the active context, if any."""

    active: _Active | None = None
    layers: int = 0


class ImagePromptAttnProcessor:
    """Cross-attention with image-prompt K/V added while a context is active.

    Installed once per UNet module and left there: installing per request would rebuild
    processors (and invalidate a compiled graph) every time. Inactive, it calls the layer's
    original processor, so the UNet's output is bit-exact with no image prompt."""

    def __init__(self, original, slot: _Slot, index: int) -> None:
        self.original = original
        self.slot = slot
        self.index = index

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        active = self.slot.active
        if active is None or not active.live or encoder_hidden_states is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        return self._with_prompts(attn, hidden_states, encoder_hidden_states, attention_mask, active)

    def _with_prompts(self, attn, hidden_states, context, attention_mask, active):
        batch = hidden_states.shape[0]
        residual = hidden_states
        query = attn.to_q(hidden_states)
        if attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        heads = attn.heads
        head_dim = query.shape[-1] // heads
        split = lambda t: t.view(t.shape[0], -1, heads, head_dim).transpose(1, 2)  # noqa: E731
        query, key, value = split(query), split(attn.to_k(context)), split(attn.to_v(context))
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, key.shape[2], batch)
            attention_mask = attention_mask.view(batch, heads, -1, attention_mask.shape[-1])
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask)
        rows = _row_kinds(active.rows, batch, hidden_states.device)
        for p in active.live:
            k_ip = split(p.keys[self.index][rows])
            v_ip = split(p.values[self.index][rows])
            out = out + p.weight_tensor * F.scaled_dot_product_attention(query, k_ip, v_ip)
        out = out.transpose(1, 2).reshape(batch, -1, heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def _row_kinds(rows: list[bool] | None, batch: int, device) -> torch.Tensor:
    """Per batch row, 0 (uncond K/V) or 1 (cond). Without a selection a batch of two
    halves is core's CFG batch [negative, positive]; an odd batch is all positive."""
    if rows is None:
        rows = [False, True] if batch % 2 == 0 else [True]
    if batch % len(rows):
        raise ImagePromptError(f"image prompts: a batch of {batch} rows cannot hold {len(rows)} conditionings")
    kinds = torch.tensor([int(r) for r in rows], device=device)
    return kinds.repeat_interleave(batch // len(rows))


_SLOT_ATTRIBUTE = "_fooocus_image_prompt_slot"


def _slot_of(unet: torch.nn.Module) -> _Slot | None:
    """The slot installed on `unet` (kept on the module itself: found in O(1) per call)."""
    return unet.__dict__.get(_SLOT_ATTRIBUTE)


def install(unet: torch.nn.Module) -> _Slot:
    """Put our processor on every cross-attention layer of `unet`, once (idempotent)."""
    slot = _slot_of(unet)
    layers = cross_attention_layers(unet)
    if slot is not None and all(isinstance(a.processor, ImagePromptAttnProcessor) and a.processor.slot is slot
                                for a in layers):
        return slot
    # First time, or someone replaced processors since (set_attn_processor): wrap what is there.
    layers_original = [a.processor.original if isinstance(a.processor, ImagePromptAttnProcessor) else a.processor
                       for a in layers]
    for attn in layers:
        if attn.group_norm is not None or attn.spatial_norm is not None or attn.norm_q is not None:
            raise ImagePromptError("image prompts: this UNet's cross-attention layers have norms "
                                   "the image-prompt processor does not handle")
    slot = _Slot(layers=len(layers))
    for i, (attn, original) in enumerate(zip(layers, layers_original)):
        attn.set_processor(ImagePromptAttnProcessor(original, slot, i))
    unet.__dict__[_SLOT_ATTRIBUTE] = slot
    return slot


@contextmanager
def applied(unet: torch.nn.Module, prepared: PreparedImagePrompts) -> Iterator[_Active]:
    """Image prompts act on `unet` inside this block, from the start of sampling until each
    prompt's stop; `select_batch` tells the progress (upstream's 1 - t/999) before each call."""
    slot = install(unet)
    if slot.active is not None:
        raise ImagePromptError("image prompts are already applied to this UNet")
    for p in prepared.prompts:
        if len(p.keys) != slot.layers:
            raise ImagePromptError(f"image prompts were prepared for {len(p.keys)} layers, "
                                   f"this UNet has {slot.layers}")
    slot.active = _Active(list(prepared.prompts))
    slot.active.select(0.0, *compute_device_and_dtype(unet))
    try:
        yield slot.active
    finally:
        slot.active = None


def select_batch(unet: torch.nn.Module, rows: Sequence[bool], timestep: float | torch.Tensor | None = None) -> None:
    """Tell the image-prompt processors of `unet` what the next UNet call's batch holds:
    per conditioning block, True for positive (image tokens) and False for negative (the
    empty image's), each block `batch / len(rows)` rows; and the timestep. A no-op when no
    image prompt is applied, so core may call it on every prediction."""
    slot = _slot_of(unet)
    if slot is None or slot.active is None:
        return
    slot.active.rows = [bool(r) for r in rows]
    if timestep is not None:
        slot.active.select(1.0 - float(timestep) / 999.0, *compute_device_and_dtype(unet))
