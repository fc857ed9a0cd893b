"""The process's worker owns one pipeline; the worker and the pipeline never import each other."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from modules import runtime
from modules.async_worker import Worker

REPO_ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 60


def _imported_after(module: str) -> set[str]:
    """The project modules a fresh interpreter has loaded after importing `module`."""
    code = f"import sys, {module}; print(' '.join(m for m in sys.modules if m.startswith('modules.')))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True,
                         check=True, timeout=TIMEOUT)
    return set(out.stdout.split())


def test_the_worker_and_the_pipeline_do_not_import_each_other() -> None:
    assert "modules.default_pipeline" not in _imported_after("modules.async_worker")
    assert "modules.async_worker" not in _imported_after("modules.default_pipeline")


def test_the_pipeline_keeps_no_module_level_state() -> None:
    from modules import default_pipeline

    assert not hasattr(default_pipeline, "STATE")
    one, two = default_pipeline.Pipeline(), default_pipeline.Pipeline()
    assert one.catalogue is not two.catalogue and one.catalogue.state.checkpoints is not two.catalogue.state.checkpoints


def test_get_worker_is_a_singleton_owning_one_pipeline() -> None:
    worker = runtime.get_worker()
    assert worker is runtime.get_worker()
    pipeline = worker.pipeline()
    assert pipeline is not None and pipeline is worker.pipeline()
    assert type(pipeline).__name__ == "Pipeline"


def test_a_worker_runs_requests_through_the_pipeline_it_made() -> None:
    made: list[object] = []

    class Recorder:
        def __init__(self) -> None:
            self.requests: list[dict] = []
            self.flushed = 0
            made.append(self)

        def process_request(self, request, control=None, progress=None):
            self.requests.append(request)
            from modules.task_types import RequestResult
            return RequestResult(images=[], report={"seen": len(self.requests)})

        def model_status(self) -> dict:
            return {"requests": len(self.requests)}

        def flush_writer(self) -> None:
            self.flushed += 1

    worker = Worker(pipeline_factory=Recorder)
    try:
        first = worker.submit({"prompt": "a"}).result(TIMEOUT)
        second = worker.submit({"prompt": "b"}).result(TIMEOUT)
        assert (first.report["seen"], second.report["seen"]) == (1, 2)   # one pipeline, both requests
        assert worker.status_snapshot(TIMEOUT) == {"requests": 2}
    finally:
        worker.shutdown(TIMEOUT)
    assert len(made) == 1 and made[0].flushed == 1   # shutdown commits the pipeline's image files
