"""Builders for the serving tests (file faults, limits, outputs): small files in the
layouts real trainers write."""

from __future__ import annotations

import os
import socket
import urllib.error
import urllib.request

import torch
from safetensors.torch import save_file


def write_unet_lora(unet: torch.nn.Module, path: str | os.PathLike[str], seed: int, layer: str = "attn2.to_k",
                    rank: int = 2) -> str:
    """A kohya LoRA (`lora_unet_<diffusers path>.lora_up/lora_down/alpha`) over the UNet's
    linear weights whose name contains `layer`; random factors from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for key, param in unet.named_parameters():
        if layer not in key or not key.endswith(".weight") or param.dim() != 2:
            continue
        name = "lora_unet_" + key[: -len(".weight")].replace(".", "_")
        tensors[f"{name}.lora_up.weight"] = torch.randn(param.shape[0], rank, generator=generator)
        tensors[f"{name}.lora_down.weight"] = torch.randn(rank, param.shape[1], generator=generator)
        tensors[f"{name}.alpha"] = torch.tensor(float(rank))
    assert tensors, f"no UNet layer matches {layer!r}"
    save_file(tensors, str(path))
    return str(path)


def rewrite_in_place(path: str | os.PathLike[str], data: bytes, keep_mtime: bool = True) -> None:
    """Overwrite a file's bytes in place (same inode), as `cp -p new path` does, and
    set its mtime back like `cp -p`/`rsync -t`/unzip (only ctime then tells).

    The kernel stamps ctime from a coarse clock (a few ms): a rewrite within the same
    tick as the file's creation is repeated until the clock has moved, as any real
    rewrite later than the file's last change would be."""
    before = os.stat(path)
    for _ in range(100_000):
        with open(path, "r+b") as handle:
            handle.write(data)
            handle.truncate(len(data))
        if keep_mtime:
            os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
        if os.stat(path).st_ctime_ns != before.st_ctime_ns:
            return
    raise AssertionError(f"ctime of {path} never moved")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers(url: str) -> bool:
    """True when `url` answers 200 (a server that has started)."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False
