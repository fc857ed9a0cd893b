"""What the worker and the pipeline exchange about one task, in a module of its own.

Torch-free and free of imports from either side: the worker (`async_worker`) and the
pipeline (`default_pipeline`) both import these types, so neither imports the other.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any


@dataclass
class TaskControl:
    """What the pipeline polls between steps."""

    stop: threading.Event = field(default_factory=threading.Event)  # abort the task
    skip: threading.Event = field(default_factory=threading.Event)  # finish the current image early, go on


@dataclass
class ProgressEvent:
    """One progress report of a running request."""

    image_index: int
    image_count: int
    step: int
    steps: int
    message: str
    stage: str = "sampling"      # loading, encoding, sampling, skipped, decoding, saving
    preview: Any = None          # small RGB uint8 array (sampling), every few steps
    image: str | None = None     # path of an image that has just been written (saving)
    images: int = 1              # images from image_index on that this step advanced (a UNet batch)


@dataclass
class RequestResult:
    """The images a request wrote and its report (the report has "error" when it failed)."""

    images: list[str]
    report: dict


@dataclass(frozen=True)
class BatchKey:
    """What the pipeline tells the worker about a queued request, so compatible ones join one
    batch: requests with equal `key`s may share UNet batches."""

    key: Any
    images: int      # images the request makes
    capacity: int    # images one batch of this kind may hold (the memory budget's answer now)


class RequestError(ValueError):
    """A request that cannot run as asked; the message says which field and why."""


class StopRequested(Exception):
    """Raised inside a request when its task was asked to stop."""
