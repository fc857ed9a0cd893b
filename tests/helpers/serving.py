"""Builders for the serving tests (file faults, limits, outputs): small files in the
layouts real trainers write, and launch.py started on its own folders."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
DEMO_CHECKPOINT = "served.safetensors"


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


@dataclass
class LaunchedServer:
    url: str
    process: subprocess.Popen
    log_path: Path
    folders: dict[str, Path]   # config key -> folder

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


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


@contextlib.contextmanager
def launched(root: Path, args: list[str], settings: dict | None = None,
             start_timeout_s: float = 300.0) -> Iterator[LaunchedServer]:
    """launch.py on a free port over folders under `root` (the demo checkpoint written
    first), with `args` and config `settings`; killed afterwards."""
    from ldm_patched.modules.demo_model import write_demo_checkpoint

    folders = {key: root / key.removeprefix("path_") for key in
               ("path_checkpoints", "path_loras", "path_outputs", "path_embeddings", "path_vae", "path_inputs")}
    folders["path_checkpoints"].mkdir(parents=True)
    write_demo_checkpoint(str(folders["path_checkpoints"] / DEMO_CHECKPOINT), seed=0)
    config_file = root / "config.json"
    config_file.write_text(json.dumps({**{k: str(v) for k, v in folders.items()}, **(settings or {})}))
    (root / "cwd").mkdir()
    (root / "system_temp").mkdir()   # the server's own temp folder (Gradio's uploads live under it)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("path_", "default_"))}
    env.update(config_path=str(config_file), HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False",
               PYTHONUNBUFFERED="1", TMPDIR=str(root / "system_temp"))
    port = free_port()
    log_path = root / "server.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen([sys.executable, str(REPO_ROOT / "launch.py"), "--listen", "127.0.0.1",
                                    "--port", str(port), "--disable-preset-download", "--disable-in-browser", *args],
                                   cwd=root / "cwd", env=env, stdout=log_file, stderr=subprocess.STDOUT)
    server = LaunchedServer(f"http://127.0.0.1:{port}/", process, log_path, folders)
    try:
        deadline = time.monotonic() + start_timeout_s
        while not answers(server.url):
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the server did not start\n--- server log ---\n{server.log()}")
            threading.Event().wait(0.2)   # polling interval, not synchronisation
        yield server
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(60)
