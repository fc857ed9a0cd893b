"""launch.py end to end, for the faults a service operator meets: a loaded checkpoint
truncated or rewritten during a request, images served from a --temp-path outside
the outputs, and SIGTERM during a batch (only whole image files, exit code 0)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from tests.helpers.serving import answers, free_port

REPO_ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 300.0
CHECKPOINT = "served.safetensors"


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log_path: Path
    checkpoints: Path
    temp: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def wait_until(condition, deadline_s: float, what: str, alive=lambda: True) -> None:
    """Poll an observable condition (a port answering, a file appearing)."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if not alive():
            raise AssertionError(f"server exited while waiting for {what}")
        if condition():
            return
        threading.Event().wait(0.2)   # polling interval, not synchronisation
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    from ldm_patched.modules.demo_model import write_demo_checkpoint

    root = tmp_path_factory.mktemp("serving")
    paths = {key: root / key.removeprefix("path_")
             for key in ("path_checkpoints", "path_loras", "path_outputs", "path_embeddings", "path_vae")}
    paths["path_checkpoints"].mkdir()
    write_demo_checkpoint(str(paths["path_checkpoints"] / CHECKPOINT), seed=0)
    temp = root / "somewhere" / "else"   # outside outputs and outside the server's working folder
    # Gradio serves files under its working folder and the system temp folder anyway: the
    # server gets its own of both, so --temp-path lies outside them (like /var/tmp/x).
    cwd, system_temp = root / "cwd", root / "system_temp"
    cwd.mkdir()
    system_temp.mkdir()
    from ldm_patched.modules.demo_model import build_tiny_sdxl
    from tests.helpers.input_image_files import IMAGE_INPUT_SIDE, write_all

    models = {name: root / name for name in ("upscale_models", "controlnet", "clip_vision", "inpaint")}
    for folder in models.values():
        folder.mkdir()
    write_all(models, build_tiny_sdxl(seed=0)["unet"])
    config_file = root / "config.json"
    config_file.write_text(json.dumps({**{k: str(v) for k, v in paths.items()},
                                       **{f"path_{k}": str(v) for k, v in models.items()},
                                       "image_input_side": IMAGE_INPUT_SIDE}))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("path_", "default_"))}
    env.update(config_path=str(config_file), HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False",
               PYTHONUNBUFFERED="1", TMPDIR=str(system_temp))
    log_path = root / "server.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, str(REPO_ROOT / "launch.py"), "--listen", "127.0.0.1", "--port", str(port),
             "--disable-preset-download", "--disable-in-browser", "--disable-image-log", "--temp-path", str(temp)],
            cwd=cwd, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    srv = Server(f"http://127.0.0.1:{port}/", process, log_path, paths["path_checkpoints"], temp)
    try:
        try:
            wait_until(lambda: answers(srv.url), START_TIMEOUT_S, "the server", lambda: process.poll() is None)
        except AssertionError as error:
            raise AssertionError(f"{error}\n--- server log ---\n{srv.log()}") from None
        yield srv
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(60)


def client(server: Server, tmp_path: Path):
    from gradio_client import Client
    return Client(server.url, verbose=False, download_files=str(tmp_path / "dl"), analytics_enabled=False)


REQUEST = {"prompt": "a cat", "base_model": CHECKPOINT, "width": 64, "height": 64, "steps": 2, "seed": 3}


def test_images_come_from_a_temp_path_anywhere(server: Server, tmp_path: Path) -> None:
    gallery, report = client(server, tmp_path).predict(dict(REQUEST), api_name="/generate")
    assert "error" not in report, report
    assert len(gallery) == 1 and Path(gallery[0]).is_file()
    assert list(server.temp.rglob("*.png"))   # the server's copy went to --temp-path


@pytest.mark.parametrize("fault", ["truncate", "overwrite"])
def test_a_loaded_checkpoint_changed_during_a_request_never_kills_the_server(server: Server, tmp_path: Path,
                                                                           fault: str) -> None:
    from ldm_patched.modules.demo_model import write_demo_checkpoint

    path = server.checkpoints / CHECKPOINT
    original = path.read_bytes()
    other = tmp_path / "other.safetensors"
    write_demo_checkpoint(str(other), seed=1)
    c = client(server, tmp_path)
    gallery, report = c.predict(dict(REQUEST), api_name="/generate")   # loaded and in use
    assert "error" not in report, report
    job = c.submit({**REQUEST, "image_number": 4, "steps": 4}, api_name="/generate")
    with open(path, "r+b") as handle:   # cp other model.safetensors / a truncation, in place
        if fault == "truncate":
            handle.truncate(len(original) // 2)
        else:
            handle.write(other.read_bytes())
    gallery, report = job.result(timeout=600)
    assert server.process.poll() is None, server.log()[-3000:]
    if "error" in report:   # the change was seen first: a clear error naming the file, no server path
        assert CHECKPOINT in report["error"] and str(server.checkpoints) not in report["error"]
    else:
        assert len(gallery) == 4
    gallery, report = c.predict(dict(REQUEST), api_name="/generate")   # the file as it is now
    if fault == "truncate":
        assert CHECKPOINT in report["error"] and "internal error" not in report["error"]
    else:
        assert "error" not in report, report
    replacement = tmp_path / "restore.safetensors"
    replacement.write_bytes(original)
    os.replace(replacement, path)
    gallery, report = c.predict(dict(REQUEST), api_name="/generate")
    assert "error" not in report and len(gallery) == 1, report
    status = c.predict(api_name="/model_status")
    assert status["checkpoints"] == [CHECKPOINT]   # one version of the path, the newest


def test_a_lora_rewritten_keeping_size_and_mtime_is_read_again(server: Server, tmp_path: Path) -> None:
    import numpy as np

    from ldm_patched.modules.demo_model import build_tiny_sdxl
    from tests.helpers.serving import rewrite_in_place, write_unet_lora

    unet = build_tiny_sdxl(seed=0)["unet"]
    path = server.checkpoints.parent / "loras" / "style.safetensors"
    path.parent.mkdir(exist_ok=True)
    write_unet_lora(unet, path, seed=1)
    other = write_unet_lora(unet, tmp_path / "other.safetensors", seed=2)
    c = client(server, tmp_path)
    request = {**REQUEST, "loras": [["style.safetensors", 1.0]]}
    first, report = c.predict(dict(request), api_name="/generate")
    assert "error" not in report, report
    before = os.stat(path)
    rewrite_in_place(path, Path(other).read_bytes())   # cp -p: same size, same mtime
    assert os.stat(path).st_ctime_ns != before.st_ctime_ns
    second, report = c.predict(dict(request), api_name="/generate")
    assert "error" not in report, report
    assert report["model_management"]["lora_files_read"] == 1
    pixels = [np.asarray(Image.open(g[0]).convert("RGB")) for g in (first, second)]
    assert not np.array_equal(*pixels)


def test_every_input_image_mode_through_generate(server: Server, tmp_path: Path) -> None:
    """Vary, Upscale, Image Prompt, Inpaint and Outpaint through `/generate`: an image of
    the mode's size each (sizes worked out in tests/test_input_image_pipeline.py)."""
    from tests.helpers.input_image_files import MODES

    api = client(server, tmp_path)
    for mode, (extra, size) in MODES.items():
        gallery, report = api.predict({**REQUEST, **extra}, api_name="/generate")
        assert "error" not in report, (mode, report)
        with Image.open(gallery[0]) as image:
            assert image.size == size, mode
    gallery, report = api.predict({**REQUEST, "input_image": "garbage", "uov_method": "Vary (Strong)"},
                                  api_name="/generate")
    assert gallery == [] and "field 'input_image'" in report["error"]


def test_sigterm_during_a_batch_leaves_only_whole_images_and_exits_0(server: Server, tmp_path: Path) -> None:
    before = set(server.temp.rglob("*.png"))
    job = client(server, tmp_path).submit({**REQUEST, "image_number": 8, "steps": 12, "seed": 100},
                                          api_name="/generate")
    wait_until(lambda: len(set(server.temp.rglob("*.png")) - before) >= 1, 600, "the first image of the batch",
               lambda: server.process.poll() is None)
    server.process.send_signal(signal.SIGTERM)
    code = server.process.wait(120)
    assert code == 0, server.log()[-3000:]
    written = set(server.temp.rglob("*.png")) - before
    assert 1 <= len(written) <= 8
    for path in written:
        with Image.open(path) as image:
            image.load()   # a whole file: every byte of the image data is there
            assert image.size == (64, 64) and "parameters" in image.text
    leftovers = [p for p in server.temp.rglob("*") if p.is_file() and p.suffix != ".png"]
    assert leftovers == []
    assert "shut down cleanly" in server.log()
    del job
