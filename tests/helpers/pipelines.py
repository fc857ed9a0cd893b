"""The pipeline a test runs requests through.

The `pipeline` fixture (tests/conftest.py) installs a fresh `Pipeline` per policy switch;
tests call `process_request` here or use `current()` for its state. Outside that fixture
a default pipeline is made on first use.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from modules.default_pipeline import Pipeline
from modules.task_types import RequestResult

# A small request on conftest's tiny base checkpoint, and how tests read an image back.
BASE = "tiny_sdxl_base.safetensors"
SMALL = {"base_model": BASE, "prompt": "a cat", "negative_prompt": "blurry", "width": 64, "height": 64, "steps": 3, "seed": 7,
         "sampler": "euler", "scheduler": "normal", "guidance_scale": 5.0}


def pixels(path: str) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


def max_difference(path: str, other: str) -> int:
    """Largest pixel difference (0-255) between two image files."""
    return int(np.abs(pixels(path) - pixels(other)).max())


# An image of a UNet batch against the same seed alone on the CPU in float32: batched
# matrix products round differently in the last bits, which can move a pixel by one level.
BATCH_TOLERANCE = 1


def use_max_batch(monkeypatch, images: int) -> None:
    """The process's config with --max-batch `images` (for one test: monkeypatch undoes it)."""
    import dataclasses

    from modules import config

    monkeypatch.setattr(config, "_cached", dataclasses.replace(config.get_config(), max_batch=images))


def graphs_compiled() -> int:
    """Dynamo's own process-wide count of graphs compiled: the oracle for "nothing recompiled"."""
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


_current: Pipeline | None = None


def install(pipeline: Pipeline | None = None) -> Pipeline:
    """Make `pipeline` (or a fresh one) the one tests run requests through."""
    global _current
    _current = pipeline or Pipeline()
    return _current


def current() -> Pipeline:
    return _current or install()


def process_request(request, control=None, progress=None) -> RequestResult:
    return current().process_request(request, control, progress)
