"""The pipeline a test runs requests through.

The `pipeline` fixture (tests/conftest.py) installs a fresh `Pipeline` per policy switch;
tests call `process_request` here or use `current()` for its state. Outside that fixture
a default pipeline is made on first use.
"""

from __future__ import annotations

from modules.default_pipeline import Pipeline
from modules.task_types import RequestResult

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
