"""API jobs: every REST request, sync or async, is one task of the process's worker.

A job has an unguessable id and an owner (the caller's principal, see ``auth``); only its
owner finds it, stops it or reads its images. Unfinished jobs are always kept; finished
ones stay in a bounded history (config key ``max_job_history``) and their images are
served from ``/api/v1/files/{job_id}/{index}`` until they drop out of it. When an async
job finishes, its result goes to the webhook it was given (see ``webhook_target``).

No FastAPI here: ``common`` turns jobs into HTTP answers.
"""

from __future__ import annotations

import base64
import collections
import io
import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from modules.async_worker import STOPPED_BEFORE_START, AsyncTask, TaskState, Worker

log = logging.getLogger(__name__)

# Fooocus-API's job types and stages, by their wire strings.
TEXT_TO_IMAGE = "Text to Image"
UPSCALE_OR_VARY = "Image Upscale or Variation"
INPAINT_OR_OUTPAINT = "Image Inpaint or Outpaint"
IMAGE_PROMPT = "Image Prompt"
WAITING, RUNNING, SUCCESS, ERROR = "WAITING", "RUNNING", "SUCCESS", "ERROR"
FILES_ROUTE = "/api/v1/files"
WEBHOOK_TIMEOUT_S = 10.0


def _now_ms() -> int:
    return int(time.time() * 1000)


@dataclass
class ApiJob:
    """One API request on the worker, and what its answers need."""

    id: str
    owner: str
    job_type: str
    task: AsyncTask
    base_url: str = ""             # where the client reached us: image URLs are built on it
    webhook: str | None = None
    require_base64: bool = False   # Fooocus-API: results carry the images themselves
    created_ms: int = field(default_factory=_now_ms)

    @property
    def finished(self) -> bool:
        return self.task.done()

    @property
    def report(self) -> dict:
        """The pipeline's report once finished ({} before)."""
        if not self.finished:
            return {}
        report = self.task.result().report
        return report if isinstance(report, dict) else {}

    @property
    def images(self) -> list[str]:
        return list(self.task.result().images) if self.finished else []

    @property
    def stopped(self) -> bool:
        report = self.report
        return bool(report.get("stopped")) or report.get("error") == STOPPED_BEFORE_START

    @property
    def error(self) -> str | None:
        error = self.report.get("error")
        return None if not error or error == STOPPED_BEFORE_START else str(error)

    @property
    def stage(self) -> str:
        if not self.finished:
            return RUNNING if self.task.state is TaskState.RUNNING else WAITING
        return ERROR if self.error else SUCCESS

    def seeds(self) -> list[int]:
        """Each image's seed, in order; -1 for the image grid (generate_image_grid), the last."""
        report = self.report
        grid = 1 if report.get("image_grid") else 0
        made = len(self.images) - grid
        seeds = report.get("seeds")
        if isinstance(seeds, list) and len(seeds) == made:
            return [int(s) for s in seeds] + [-1] * grid
        first = int(report.get("seed", -1))
        return [first + i for i in range(made)] + [-1] * grid

    def image_url(self, index: int) -> str:
        return f"{self.base_url.rstrip('/')}{FILES_ROUTE}/{self.id}/{index}"

    def timings(self) -> dict[str, int]:
        """Fooocus-API's job-history times, in ms since the epoch (0: not yet)."""
        task = self.task
        return {"in_queue_mills": self.created_ms,
                "start_mills": int(task.started_at * 1000) if task.started_at else 0,
                "finish_mills": int(task.finished_at * 1000) if task.finished_at else 0}


def preview_png(job: ApiJob) -> str | None:
    """The step preview of a sampling job as base64 PNG, or None."""
    progress = job.task.progress
    if progress.preview is None or progress.stage != "sampling" or job.finished:
        return None
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(progress.preview).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def file_base64(path: str) -> str:
    with open(path, "rb") as handle:
        return base64.b64encode(handle.read()).decode("ascii")


def report_status(report: dict) -> int:
    """The HTTP status a finished request's report calls for: a stop or success is 200;
    the pipeline's internal errors and out-of-memory are the server's (500); every other
    error is the request's (422: a field, a file it names, a mode's needs)."""
    error = str(report.get("error") or "")
    if not error or error == STOPPED_BEFORE_START:
        return 200
    if error.startswith(("internal error", "out of memory")):
        return 500
    return 422


class JobBook:
    """The API's jobs by id: unfinished ones always, finished ones up to ``history_size``."""

    def __init__(self, worker: Callable[[], Worker], history_size: Callable[[], int],
                 on_finished: Callable[[ApiJob], None] | None = None) -> None:
        self._worker = worker
        self._history_size = history_size
        self._on_finished = on_finished
        self._lock = threading.Lock()
        self._jobs: dict[str, ApiJob] = {}
        self._finished: collections.deque[str] = collections.deque()

    def submit(self, request: dict, owner: str, job_type: str, **details: Any) -> ApiJob:
        """Queue ``request`` for ``owner`` (``details``: ApiJob's other fields); raises
        async_worker.QueueFull when refused."""
        task = self._worker().try_submit(request, owner=owner)
        job = ApiJob(id=uuid.uuid4().hex, owner=owner, job_type=job_type, task=task, **details)
        with self._lock:
            self._jobs[job.id] = job
        task.future.add_done_callback(lambda _: self._finish(job))
        return job

    def get(self, job_id: str, owner: str) -> ApiJob | None:
        """The job, if ``owner`` owns it: another caller's job is as absent as an unknown one."""
        with self._lock:
            job = self._jobs.get(job_id)
        return job if job is not None and job.owner == owner else None

    def of(self, owner: str) -> list[ApiJob]:
        """``owner``'s jobs, oldest first."""
        with self._lock:
            return [job for job in self._jobs.values() if job.owner == owner]

    def unfinished(self) -> int:
        with self._lock:
            return sum(1 for job in self._jobs.values() if not job.finished)

    def stop(self, job: ApiJob) -> None:
        self._worker().stop(job.task)

    def skip(self, job: ApiJob) -> None:
        self._worker().skip(job.task)

    def _finish(self, job: ApiJob) -> None:
        with self._lock:
            self._finished.append(job.id)
            while len(self._finished) > max(self._history_size(), 0):
                self._jobs.pop(self._finished.popleft(), None)
        if self._on_finished is not None:
            try:
                self._on_finished(job)
            except Exception:   # a notification must never break the worker's callbacks
                log.exception("job %s: finish callback failed", job.id)


# -- webhooks ----------------------------------------------------------------------------------

def _origin_and_path(url: str) -> tuple[tuple[str, str, int | None], str]:
    parts = urlsplit(url)
    return (parts.scheme.lower(), (parts.hostname or "").lower(), parts.port), parts.path or "/"


def webhook_allowed(url: str, operator_url: str | None, allowed: tuple[str, ...]) -> bool:
    """A request's own webhook is used only where the operator said so: the --webhook-url
    itself, or under a --webhook-allow prefix with the same scheme, host and port."""
    if url == operator_url:
        return True
    origin, path = _origin_and_path(url)
    for prefix in allowed:
        allowed_origin, allowed_path = _origin_and_path(prefix)
        if origin == allowed_origin and path.startswith(allowed_path):
            return True
    return False


def webhook_payload(job: ApiJob) -> dict[str, Any]:
    """What Fooocus-API posts: the job id and its images (URLs and seeds)."""
    return {"job_id": job.id, "job_type": job.job_type, "job_stage": job.stage,
            "job_status": job.error or ("Stopped" if job.stopped else "Finished"),
            "job_result": [{"url": job.image_url(i), "seed": str(seed)} for i, seed in enumerate(job.seeds())]}


class WebhookSender:
    """Posts finished jobs to their webhook, one at a time on its own thread (never the
    worker's); redirects are not followed, so the allow-list cannot be stepped around."""

    def __init__(self, post: Callable[[str, dict], None] | None = None) -> None:
        self._post = post or _post_json
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pending: queue.SimpleQueue[tuple[str, dict]] = queue.SimpleQueue()

    def __call__(self, job: ApiJob) -> None:
        if not job.webhook:
            return
        self._pending.put((job.webhook, webhook_payload(job)))
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="fooocus-webhooks", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            url, payload = self._pending.get()
            try:
                self._post(url, payload)
            except Exception as error:   # the receiver's problem: log it, keep serving
                log.warning("webhook %s failed: %s", url, error)


def _post_json(url: str, payload: dict) -> None:
    import httpx

    httpx.post(url, json=payload, timeout=WEBHOOK_TIMEOUT_S, follow_redirects=False).raise_for_status()
