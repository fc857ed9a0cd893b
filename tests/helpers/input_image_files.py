"""Tiny model files for the input-image features, written under upstream's file names and
in the layouts real files use (see each builder): the upscaler, the IP-Adapter with its
CLIP vision encoder, and the inpaint patch and head.

The builders that take a UNet read only its shapes (`named_parameters()`, `attn_processors`,
layer sizes) and build float32 tensors on the CPU, so the UNet may be on any device, in any
dtype (the benchmark's is on CUDA in fp16); the loaders cast to the serving dtype."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from tests.helpers import controlnet_files
from tests.helpers.ip_adapter_files import tiny_clip_vision, tiny_ip_adapter_state

UPSCALER_FILE = "fooocus_upscaler_s409985e5.bin"
IP_ADAPTER_FILE = "ip-adapter-plus_sdxl_vit-h.bin"
CLIP_VISION_FILE = "clip_vision_vit_h.safetensors"
INPAINT_PATCH_FILE = "inpaint_v26.fooocus.patch"
INPAINT_HEAD_FILE = "fooocus_inpaint_head.pth"

# Original (ldm) names of SDXL UNet layers the tiny UNet has too, with its parameter names.
INPAINT_PATCH_KEYS = {
    "input_blocks.0.0.weight": "conv_in.weight",
    "input_blocks.0.0.bias": "conv_in.bias",
    "out.2.weight": "conv_out.weight",
    "time_embed.0.weight": "time_embedding.linear_1.weight",
}


def tiny_esrgan(seed: int = 0) -> torch.nn.Module:
    """A 4x RRDBNet (ESRGAN) with 8 filters and one block, from spandrel's architecture."""
    from modules import upscaler

    upscaler.import_spandrel()
    from spandrel.architectures.ESRGAN import ESRGAN

    torch.manual_seed(seed)
    return ESRGAN(num_filters=8, num_blocks=1, scale=4).eval()


def write_tiny_upscaler(path: str | Path, seed: int = 0) -> str:
    """A torch pickle in the old ESRGAN key layout real files use (`model.0.weight`,
    `model.1.sub.0.RDB1.conv1.0.weight`, ...)."""
    state = {k: v.clone() for k, v in tiny_esrgan(seed).state_dict().items()}
    torch.save(state, str(path))
    return str(path)


def write_tiny_ip_adapter(ip_path: str | Path, clip_path: str | Path, unet: torch.nn.Module,
                          seed: int = 0) -> tuple[str, str]:
    """IP-Adapter Plus for `unet` as the published pickle ({"image_proj", "ip_adapter"}) and
    its CLIP vision encoder as a transformers-layout safetensors file."""
    torch.save(tiny_ip_adapter_state(unet, seed=seed), str(ip_path))
    clip = tiny_clip_vision(seed)
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(clip_path))
    return str(ip_path), str(clip_path)


def write_tiny_inpaint_patch(path: str | Path, unet: torch.nn.Module, seed: int = 0) -> dict:
    """Upstream's patch pickle: {"diffusion_model.<original key>": (uint8 diff, min, max)}."""
    generator = torch.Generator().manual_seed(seed)
    shapes = {name: tuple(param.shape) for name, param in unet.named_parameters()}   # shapes only: any device
    data = {}
    for original, ours in INPAINT_PATCH_KEYS.items():
        quantized = torch.randint(0, 256, shapes[ours], dtype=torch.uint8, generator=generator)
        low = -0.01 * (1 + torch.rand((), generator=generator))
        high = 0.01 * (1 + torch.rand((), generator=generator))
        data["diffusion_model." + original] = (quantized, low.to(torch.float16), high.to(torch.float16))
    torch.save(data, str(path))
    return data


def write_tiny_inpaint_head(path: str | Path, unet: torch.nn.Module, seed: int = 0) -> str:
    """Upstream's head pickle: {"head": [conv_in channels, 5, 3, 3]}."""
    weight = torch.randn(unet.conv_in.out_channels, 5, 3, 3, generator=torch.Generator().manual_seed(seed)) * 0.01
    torch.save({"head": weight}, str(path))
    return str(path)


def write_all(folders: dict[str, Path], unet: torch.nn.Module, inpaint_files: bool = True) -> None:
    """Every input-image model file into folders["upscale_models" | "controlnet" |
    "clip_vision" | "inpaint"], under upstream's names."""
    write_tiny_upscaler(folders["upscale_models"] / UPSCALER_FILE)
    write_tiny_ip_adapter(folders["controlnet"] / IP_ADAPTER_FILE, folders["clip_vision"] / CLIP_VISION_FILE, unet)
    controlnet_files.write_both(folders["controlnet"], unet)
    if inpaint_files:
        write_tiny_inpaint_patch(folders["inpaint"] / INPAINT_PATCH_FILE, unet)
        write_tiny_inpaint_head(folders["inpaint"] / INPAINT_HEAD_FILE, unet)


def serve(pipeline, unet: torch.nn.Module, monkeypatch, policy, inpaint_files: bool = True) -> dict[str, Path]:
    """The `pipeline` fixture's folders (installed with `policy`) holding every input-image
    model file, and image_input_side small."""
    from modules import config

    folders = pipeline(policy)
    write_all(folders, unet, inpaint_files=inpaint_files)
    monkeypatch.setenv("image_input_side", str(IMAGE_INPUT_SIDE))
    config.reload_config()
    return folders


# -- requests for each mode -------------------------------------------------------------------

IMAGE_INPUT_SIDE = 128   # config key image_input_side for these requests (upstream's 1024 is slow on a CPU)

def png64(pixels: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def picture(width: int, height: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def box_mask(width: int, height: int, box: tuple[int, int, int, int]) -> np.ndarray:
    left, top, right, bottom = box
    mask = np.zeros((height, width), np.uint8)
    mask[top:bottom, left:right] = 255
    return mask


INPUT = picture(96, 64)
MASK = box_mask(96, 64, (8, 8, 24, 24))

# Expected (width, height), worked out by hand from upstream's rules with image_input_side 128.
MODES = {
    # shape ceil of 96x64 is ceil(78.4 / 64) * 64 = 128, within Vary's [128, 256]: unchanged.
    "vary": ({"input_image": png64(INPUT), "uov_method": "Vary (Subtle)"}, (96, 64)),
    # 1.5x is 144x96, shape ceil 128 (not below the side): exactly 1.5x.
    "upscale": ({"input_image": png64(INPUT), "uov_method": "Upscale (1.5x)"}, (144, 96)),
    # Fast 2x: the upscaler alone, resized to 2x; no diffusion.
    "fast upscale": ({"input_image": png64(INPUT), "uov_method": "Upscale (Fast 2x)"}, (192, 128)),
    "image prompt": ({"image_prompts": [[png64(INPUT), 0.5, 0.6, "ImagePrompt"]]}, (64, 64)),
    "pyracanny": ({"image_prompts": [[png64(INPUT), 0.5, 1.0, "PyraCanny"]]}, (64, 64)),
    "cpds": ({"image_prompts": [[png64(INPUT), 0.5, 1.0, "CPDS"]]}, (64, 64)),
    "inpaint": ({"input_image": png64(INPUT), "inpaint_mask": png64(MASK)}, (96, 64)),
    # Outpaint Left adds int(0.3 * 96) = 28 columns.
    "outpaint": ({"input_image": png64(INPUT), "outpaint_selections": ["Left"]}, (124, 64)),
}
