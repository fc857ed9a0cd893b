"""The REST routes on a fake worker (no pipeline): the API's own behaviour (queue limits,
history, auth) at the speed of a unit test, through FastAPI's TestClient."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from modules import config as config_module
from modules.api import app as api_app
from modules.api.context import ApiContext, ApiSettings
from modules.async_worker import TaskControl, Worker

TIMEOUT = 30.0
CHECKPOINT = "base.safetensors"


@dataclass
class Result:
    images: list[str]
    report: dict


@dataclass
class GatedPipeline:
    """Writes one PNG per request; a prompt starting with "wait" holds until the gate opens
    (or the task is stopped)."""

    folder: Path
    gate: threading.Event = field(default_factory=threading.Event)
    started: threading.Event = field(default_factory=threading.Event)
    requests: list[dict] = field(default_factory=list)

    def __call__(self, request: dict, control: TaskControl, progress: Callable | None) -> Result:
        self.requests.append(request)
        if str(request.get("prompt", "")).startswith("wait"):
            self.started.set()
            while not (self.gate.is_set() or control.stop.is_set()):
                self.gate.wait(0.01)   # bounded by the test's gate or a stop, checked often
        if control.stop.is_set():
            return Result([], {"stopped": True})
        path = self.folder / f"{len(self.requests)}.png"
        Image.new("RGB", (8, 8), (len(self.requests), 0, 0)).save(path)
        return Result([str(path)], {"seed": 1, "seeds": [1], "n": len(self.requests)})


@dataclass
class FakeApi:
    client: object          # fastapi.testclient.TestClient
    pipeline: GatedPipeline
    worker: Worker
    context: ApiContext


@contextlib.contextmanager
def fake_api(tmp_path: Path, settings: ApiSettings = ApiSettings(), env: dict[str, str] | None = None,
             **worker_options) -> Iterator[FakeApi]:
    """The routes over a GatedPipeline worker and a config of tmp folders (one checkpoint
    file, so requests pass the checks; nothing ever loads it)."""
    from fastapi.testclient import TestClient

    (tmp_path / "ckpt").mkdir(exist_ok=True)
    (tmp_path / "ckpt" / CHECKPOINT).write_bytes(b"")
    cfg = config_module.load_config({"config_path": str(tmp_path / "none.json"), "path_checkpoints": str(tmp_path / "ckpt"),
                                     "path_loras": str(tmp_path / "loras"), "path_outputs": str(tmp_path / "out"),
                                     **(env or {})})
    pipeline = GatedPipeline(tmp_path)
    worker = Worker(handler=pipeline, **worker_options)
    context = api_app.make_context(settings, lambda: worker, lambda: cfg)
    try:
        with TestClient(api_app.build_app(context)) as client:
            yield FakeApi(client, pipeline, worker, context)
    finally:
        pipeline.gate.set()
        worker.shutdown(TIMEOUT)
