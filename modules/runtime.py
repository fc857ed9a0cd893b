"""The process's worker and the one pipeline it owns, made on first use.

The web UI, the API endpoints and `launch.py` share them. This module is the only
place that knows both the worker (`async_worker`) and the pipeline
(`default_pipeline`); neither of those imports the other.
"""

from __future__ import annotations

import threading

from modules.async_worker import Worker

_lock = threading.Lock()
_worker: Worker | None = None


def _new_pipeline():
    from modules.default_pipeline import Pipeline   # late: torch and diffusers load on first use

    return Pipeline()


def get_worker() -> Worker:
    """The process's worker (its thread starts on first submit, its pipeline on first use)."""
    global _worker
    with _lock:
        if _worker is None:
            import args_manager
            from modules import config  # torch-free

            cfg = config.get_config()
            queue_size = getattr(args_manager.args, "queue_size", None)   # --queue-size wins over the key
            _worker = Worker(max_pending=queue_size or cfg.max_queue_length, pipeline_factory=_new_pipeline,
                             max_pending_per_owner=cfg.max_queue_per_client, max_batch=cfg.max_batch,
                             batch_window_ms=cfg.batch_window_ms)
        return _worker


def demo_model_in_use() -> str | None:
    """The page's demo-checkpoint warning, from the worker's pipeline."""
    pipeline = get_worker().pipeline()
    return None if pipeline is None else pipeline.demo_model_in_use()


def shutdown(timeout: float) -> None:
    """Stop the running task and drop the queued ones; every finished image is committed."""
    get_worker().shutdown(timeout=timeout, stop_tasks=True)
