"""The web app with a fake worker (its endpoints and page wiring without the pipeline),
shared by tests/test_webui.py and the browser suite."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from modules import config as config_module
from modules import webui
from modules.async_worker import TaskControl, Worker

TIMEOUT = 30.0   # generous: CI shares 2 cores; a wait ends as soon as its condition holds


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class FakeResult:
    images: list[str]
    report: dict


@dataclass
class FakePipeline:
    """Writes one PNG per image; "block" requests wait for the gate (or a Stop) first."""

    image_dir: Path
    requests: list[dict] = field(default_factory=list)
    order: list[str] = field(default_factory=list)
    gate: threading.Event = field(default_factory=threading.Event)
    started: threading.Event = field(default_factory=threading.Event)

    def __call__(self, request: dict, control: TaskControl, progress: Callable | None) -> FakeResult:
        self.requests.append(request)
        self.order.append(f"run:{request.get('prompt')}")
        if request.get("block"):
            self.started.set()
            while not (self.gate.is_set() or control.stop.is_set()):
                self.gate.wait(0.01)   # bounded by the test's gate/stop, checked often
        if control.stop.is_set():
            return FakeResult([], {"stopped": True})
        if request.get("prompt") == "fail":
            return FakeResult([], {"error": "fake failure"})
        path = self.image_dir / f"img{len(self.requests)}.png"
        Image.new("RGB", (16, 8), (255, 0, 0)).save(path)
        return FakeResult([str(path)], {"mode": "conservative", "n": len(self.requests)})


@dataclass
class FakeApp:
    url: str
    pipeline: FakePipeline
    app: object  # gr.Blocks
    worker: Worker
    freed: list[str]
    cfg: config_module.Config

    def __iter__(self) -> Iterator[object]:  # `url, pipeline = fake_app`
        return iter((self.url, self.pipeline))


STATUS = {"models": [{"name": "a.safetensors:unet", "device": "cpu", "bytes": 2 ** 20}], "mode": "conservative"}


def start_fake_app(tmp_path: Path, settings: dict[str, str] | None = None, **launch: object) -> FakeApp:
    """The app over a fake pipeline, launched; `settings` are config keys (as environment
    values), and max_queue_length also bounds the worker's queue."""
    pipeline = FakePipeline(tmp_path)
    cfg = config_module.load_config({"config_path": str(tmp_path / "no_config.json"),
                                     "path_checkpoints": str(tmp_path / "ckpt"),
                                     "path_loras": str(tmp_path / "loras"),
                                     "path_outputs": str(tmp_path / "out"), **(settings or {})})
    worker = Worker(handler=pipeline, status=lambda: dict(STATUS),
                    max_pending=cfg.max_queue_length if "max_queue_length" in (settings or {}) else None,
                    max_pending_per_owner=cfg.max_queue_per_client if "max_queue_per_client" in (settings or {})
                    else None)
    freed: list[str] = []

    def free_memory() -> dict:
        freed.append("free")
        pipeline.order.append("free")
        return {"unloaded": ["a.safetensors:unet"], "freed_bytes": 2 ** 20}

    app = webui.build_app(worker=worker, cfg=cfg, demo_warning=lambda: "demo weights in use",
                          free_memory=free_memory, reconnect_grace_s=0)
    port = free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
               **{**webui.launch_options(app, cfg), "allowed_paths": webui.allowed_paths(cfg), **launch})
    return FakeApp(f"http://127.0.0.1:{port}/", pipeline, app, worker, freed, cfg)


def wait_until(condition: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    """Poll a condition that another process/thread makes true (bounded)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        threading.Event().wait(0.02)


@contextlib.contextmanager
def running_fake_app(tmp_path: Path, **launch: object) -> Iterator[FakeApp]:
    """`start_fake_app`, closed afterwards (a blocked request is released first)."""
    fake = start_fake_app(tmp_path, **launch)
    try:
        yield fake
    finally:
        fake.pipeline.gate.set()
        fake.app.close()  # type: ignore[attr-defined]
        fake.worker.shutdown(TIMEOUT)


@contextlib.contextmanager
def running_pipeline_app(pipeline: object, cfg: config_module.Config) -> Iterator[str]:
    """The web app over a real `Pipeline` (in this process, its worker thread running it);
    yields the URL. Images are served from the config's output and temp folders."""
    worker = Worker(pipeline_factory=lambda: pipeline)
    app = webui.build_app(worker=worker, cfg=cfg, demo_warning=lambda: None, reconnect_grace_s=0)
    port = free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
               allowed_paths=webui.allowed_paths(cfg))
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        app.close()  # type: ignore[attr-defined]
        worker.shutdown(TIMEOUT)
