"""The task queue: one worker thread runs generation requests in order, compatible ones together.

The UI and the API both call ``runtime.get_worker().submit(request)`` and get an
``AsyncTask`` back. The task carries the request, a ``TaskControl`` (the Stop
and Skip events the pipeline polls), the latest progress, timestamps and a
``concurrent.futures.Future`` that resolves to the pipeline's ``RequestResult``.

One thread, one FIFO queue, so the model registry is only ever touched from that
thread. When it takes a task, queued tasks the pipeline gives the same batch key
(``PipelineLike.batch_key``: same models, size, sampler...) join it, whole requests
in queue order up to the batch cap (``max_batch`` images; default what the budget
holds), and the pipeline's ``process_batch`` runs them together in shared UNet
batches, each with its own progress, Stop/Skip and result. Tasks of other keys
keep their place: they wait for that one batch, never longer. ``batch_window_ms``
waits that long for compatible tasks to arrive (default 0). A plain handler (or a
pipeline without ``process_batch``) runs one task at a time. A handler that raises
does not kill the thread; its exception becomes a result whose report holds ``"error"``.

Jobs belong to an owner (a page's login and browser token, an API client's login
or address): ``stop_owned``/``skip_owned`` act only on that owner's tasks, so one
client can never stop another's. ``stop`` on a queued task resolves it at once
and it never runs (a cancelled or disconnected API call uses this).

Work that touches the model registry from outside a request (``/free_memory``,
unloading one model, the ``/model_status`` snapshot) goes through ``call``: it
runs on the worker thread between two tasks, so it waits for a running request
and never sees the registry half-way through one.

The handler is handed in: the process's worker runs its pipeline's
``process_request`` (``modules/runtime.py`` wires the two); tests pass fakes. The
types both sides share live in ``modules/task_types.py``, so this module never
imports the pipeline.
"""

from __future__ import annotations

import concurrent.futures
import enum
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from modules.task_types import BatchKey, TaskControl

log = logging.getLogger(__name__)

STOPPED_BEFORE_START = "stopped before start"
QUEUE_FULL = "queue full"
_WAKE = object()  # queue item that only wakes the thread to run pending calls


class ResultLike(Protocol):
    """What a handler returns (``task_types.RequestResult`` has this shape)."""

    images: list[str]
    report: dict


class ProgressLike(Protocol):
    """What a handler reports (``task_types.ProgressEvent`` has this shape)."""

    image_index: int
    image_count: int
    step: int
    steps: int
    message: str


Handler = Callable[[dict, TaskControl, Callable[[Any], None] | None], ResultLike]
ErrorResultFactory = Callable[[str], ResultLike]


class QueueFull(RuntimeError):
    """A request refused at submission: the queue, or its owner's share of it, is full."""


@dataclass
class FailedResult:
    """Error result used when the handler is not the default pipeline."""

    images: list[str] = field(default_factory=list)
    report: dict = field(default_factory=dict)


class TaskState(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(frozen=True)
class TaskProgress:
    """A snapshot of a task's progress; replaced whole, never mutated."""

    percent: float = 0.0
    text: str = "Waiting in queue"
    image_index: int = 0
    image_count: int = 0
    step: int = 0
    steps: int = 0
    stage: str = "queued"   # queued, loading, encoding, sampling, decoding, saving, finished, stopped, error
    preview: Any = None     # small RGB uint8 array of the image being sampled, or None
    images: tuple[str, ...] = ()   # images finished so far, in order
    stages: tuple[str, ...] = ("queued",)   # every stage this task has been in, in order (a page polling
                                   # snapshots can miss a stage shorter than its polling interval)
    version: int = 0  # bumps on every update; lets waiters see "something changed"


# An image's part of the bar that its sampling steps fill; decoding and saving it is the
# rest, so the bar reaches 100 % when the request has finished, not while it still decodes.
SAMPLING_SHARE = 0.9


def progress_percent(event: ProgressLike) -> float:
    """Overall percentage of a request from one per-step event.

    ``image_index`` is 0-based; ``step`` counts completed steps of that image and of the
    ``images`` - 1 after it that sample in the same UNet batch (optional, default 1).
    """
    count = max(int(event.image_count), 1)
    steps = max(int(event.steps), 1)
    index = min(max(int(event.image_index), 0), count - 1)
    images = min(max(int(getattr(event, "images", 1)), 1), count - index)
    step = min(max(int(event.step), 0), steps)
    return max(0.0, 100.0 * (index + images * SAMPLING_SHARE * step / steps) / count)


_task_ids = itertools.count(1)


@dataclass
class AsyncTask:
    """One request on its way through the worker."""

    request: dict
    owner: str | None = None   # who may stop/skip it; None: nobody but the server itself
    client: str | None = None  # whose share of the queue it takes (max_queue_per_client); None: the owner's
    control: TaskControl = field(default_factory=TaskControl)
    id: int = field(default_factory=lambda: next(_task_ids))
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    finished_at: float | None = None
    state: TaskState = TaskState.QUEUED
    _progress: TaskProgress = field(default_factory=TaskProgress)
    _changed: threading.Condition = field(default_factory=threading.Condition, repr=False)

    @property
    def share(self) -> str | None:
        """The key its queue share is counted under: the client, else the owner."""
        return self.client if self.client is not None else self.owner

    # -- progress ---------------------------------------------------------------

    @property
    def progress(self) -> TaskProgress:
        return self._progress

    def set_progress(self, percent: float, text: str, **details: Any) -> None:
        """Replace the snapshot; finished images and the latest preview carry over unless given."""
        with self._changed:
            details.setdefault("images", self._progress.images)
            stage = details.get("stage", TaskProgress.stage)
            seen = self._progress.stages
            details["stages"] = seen if seen and seen[-1] == stage else seen + (stage,)
            if details.get("stage", "sampling") == "sampling":
                details.setdefault("preview", self._progress.preview)
            self._progress = TaskProgress(percent=percent, text=text,
                                          version=self._progress.version + 1, **details)
            self._changed.notify_all()

    def report_progress(self, event: ProgressLike) -> None:
        """The callback handed to the handler: record one pipeline event.

        Optional event fields: ``stage``, ``preview`` (an RGB array) and ``image``
        (the path of an image that has just been written)."""
        image = getattr(event, "image", None)
        with self._changed:
            images = self._progress.images + ((str(image),) if image else ())
            details: dict[str, Any] = {"images": images, "stage": str(getattr(event, "stage", "sampling"))}
            preview = getattr(event, "preview", None)
            if preview is not None:
                details["preview"] = preview
            # Never backwards: a batch's images finish sampling together, then are saved one by one.
            self.set_progress(max(self._progress.percent, progress_percent(event)), str(event.message),
                              image_index=int(event.image_index), image_count=int(event.image_count),
                              step=int(event.step), steps=int(event.steps), **details)

    def wait_for_update(self, seen_version: int, timeout: float) -> TaskProgress:
        """Block until progress moves past ``seen_version``, the task ends, or ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while self._progress.version <= seen_version and not self.future.done():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._changed.wait(remaining)
            return self._progress

    # -- lifecycle ---------------------------------------------------------------

    def done(self) -> bool:
        return self.future.done()

    def result(self, timeout: float | None = None) -> ResultLike:
        """The RequestResult; blocks until the task has finished (or been cancelled)."""
        return self.future.result(timeout)

    def _finish(self, result: ResultLike) -> bool:
        """Resolve the future once; returns False if it was already resolved."""
        with self._changed:
            if self.future.done():
                return False
            self.state = TaskState.FINISHED
            self.finished_at = time.time()
            self.future.set_result(result)
            self._changed.notify_all()
            return True


StatusHook = Callable[[], dict]


class PipelineLike(Protocol):
    """What the worker needs of the pipeline it owns (``default_pipeline.Pipeline``)."""

    def process_request(self, request: dict, control: TaskControl | None = None,
                        progress: Callable[[Any], None] | None = None) -> ResultLike: ...

    def model_status(self) -> dict: ...

    def flush_writer(self) -> None: ...

    # Optional (a pipeline without them runs one task at a time):
    # def batch_key(self, request: dict) -> BatchKey | None: ...
    # def process_batch(self, requests: list[dict], controls: list[TaskControl],
    #                   progresses: list[Callable[[Any], None]]) -> list[ResultLike]: ...


def _failed(message: str) -> ResultLike:
    return FailedResult(images=[], report={"error": message})


class Worker:
    """One daemon thread taking AsyncTasks from a FIFO queue."""

    def __init__(self, handler: Handler | None = None, error_result: ErrorResultFactory | None = None,
                 name: str = "fooocus-worker", status: StatusHook | None = None,
                 max_pending: int | None = None,
                 pipeline_factory: Callable[[], PipelineLike] | None = None,
                 max_pending_per_owner: int | None = None,
                 max_batch: int | None = None, batch_window_ms: float = 0.0) -> None:
        """Either `handler` (and optionally `status`) or `pipeline_factory`: the worker then
        makes its one pipeline on first use and runs every request through it, compatible
        queued ones together (`max_batch` images at most, None: the pipeline's answer; 1: never)."""
        self._handler = handler
        self._pipeline_factory = pipeline_factory
        self._pipeline: PipelineLike | None = None
        self.max_pending = max_pending   # None: unbounded
        self.max_pending_per_owner = max_pending_per_owner   # queued tasks one owner may have; None: no cap
        self.max_batch = max_batch
        self.batch_window_ms = batch_window_ms
        self._keys: dict[int, BatchKey | None] = {}   # task id -> its batch key, asked once
        self._error_result = error_result
        self._status_hook = status
        self._name = name
        self._queue: queue.Queue[Any] = queue.Queue()
        self._calls: queue.SimpleQueue[tuple[Callable[[], Any], concurrent.futures.Future]] = queue.SimpleQueue()
        self._lock = threading.RLock()   # re-entrant: finishing a task runs its callbacks
        self._thread: threading.Thread | None = None
        self._running: list[AsyncTask] = []            # the task, or the batch, running now
        self._unfinished: dict[int, AsyncTask] = {}   # queued and running tasks, by id
        self._status: dict | None = None              # the last published registry snapshot
        self.last_report: dict | None = None          # the report of the last finished task
        self._closed = False

    # -- public API -----------------------------------------------------------------

    def submit(self, request: dict, owner: str | None = None, client: str | None = None) -> AsyncTask:
        """Queue a request for ``owner``; returns at once. A full queue gives a task already
        finished with a "queue full" error (the caller reports it like any other error).
        ``client`` is whose queue share it takes when that is not the owner: a page's owner
        is a token its browser chose, so the page's login or address is capped instead."""
        try:
            return self.try_submit(request, owner, client)
        except QueueFull as refused:
            task = AsyncTask(request=request, owner=owner, client=client)
            task._finish(self._make_error(str(refused)))
            return task

    def try_submit(self, request: dict, owner: str | None = None, client: str | None = None) -> AsyncTask:
        """``submit``, but a full queue (or a client at its cap) raises QueueFull instead,
        for callers that answer it apart from other errors (HTTP 429)."""
        task = AsyncTask(request=request, owner=owner, client=client)
        share = task.share
        with self._lock:
            if self._closed:
                raise RuntimeError("worker is shut down")
            if self.max_pending is not None and self.pending() >= self.max_pending:
                raise QueueFull(f"{QUEUE_FULL}: {self.pending()} requests are waiting (config key "
                                f"max_queue_length / --queue-size = {self.max_pending}); try again later")
            cap = self.max_pending_per_owner
            if cap is not None and share is not None and self._queued_of(share) >= cap:
                raise QueueFull(f"{QUEUE_FULL} for this client: it has {cap} requests waiting (config key "
                                f"max_queue_per_client = {cap}); wait for one to start")
            self._ensure_thread()
            self._unfinished[task.id] = task
            self._queue.put(task)
        task.future.add_done_callback(lambda _: self._forget(task))
        log.debug("task %d queued (%d waiting)", task.id, self.pending())
        return task

    def _queued_of(self, share: str) -> int:
        return sum(1 for t in self._unfinished.values() if t.share == share and t.state is TaskState.QUEUED)

    @property
    def current(self) -> AsyncTask | None:
        """The running task (the first of a running batch)."""
        running = self._running
        return running[0] if running else None

    def running(self) -> list[AsyncTask]:
        """Every task running now (several when they share a batch)."""
        return list(self._running)

    def pending(self) -> int:
        """Tasks queued and not started."""
        with self._lock:
            return sum(1 for t in self._unfinished.values() if t.state is TaskState.QUEUED)

    def tasks_of(self, owner: str | None) -> list[AsyncTask]:
        """``owner``'s unfinished tasks, oldest first (nobody owns the owner-less ones)."""
        if owner is None:
            return []
        with self._lock:
            return sorted((t for t in self._unfinished.values() if t.owner == owner), key=lambda t: t.id)

    def stop(self, task: AsyncTask) -> None:
        """Abort ``task``: a running one sees control.stop; a queued one ends now and never runs."""
        with self._lock:
            task.control.stop.set()
            if task.state is TaskState.QUEUED:
                task.set_progress(0.0, "Stopped before start", stage="stopped")
                task._finish(self._make_error(STOPPED_BEFORE_START))

    def skip(self, task: AsyncTask) -> None:
        """Ask ``task`` to drop the image it is sampling and go on with the next one."""
        if task.state is TaskState.RUNNING:
            task.control.skip.set()

    def stop_owned(self, owner: str | None) -> list[AsyncTask]:
        """Stop every task of ``owner`` (running and queued); returns them."""
        tasks = self.tasks_of(owner)
        for task in tasks:
            self.stop(task)
        return tasks

    def skip_owned(self, owner: str | None) -> AsyncTask | None:
        """Skip the current image of ``owner``'s running task, if it has one."""
        if owner is None:
            return None
        for task in self._running:
            if task.owner == owner:
                self.skip(task)
                return task
        return None

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run ``fn`` on the worker thread before the next task starts (after the running one).

        The registry snapshot is republished afterwards."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            if self._closed:
                raise RuntimeError("worker is shut down")
            self._ensure_thread()
            self._calls.put((fn, future))
            self._queue.put(_WAKE)
        return future

    def status_snapshot(self, timeout: float | None = None) -> dict:
        """The registry as the worker last published it (never read from the caller's thread)."""
        snapshot = self._status
        if snapshot is None:
            self.call(lambda: None).result(timeout)   # publishes one
            snapshot = self._status
        return dict(snapshot or {})

    def shutdown(self, timeout: float | None = None, stop_tasks: bool = False) -> None:
        """End the thread after the queued tasks; with `stop_tasks` (SIGTERM), queued
        tasks end unrun and the running one is stopped at its next step instead."""
        with self._lock:
            self._closed = True
            thread = self._thread
            if stop_tasks:
                for task in self._running:
                    task.control.stop.set()
                while True:
                    try:
                        queued = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if queued is not None and queued is not _WAKE:
                        queued.control.stop.set()
                        queued._finish(self._make_error(STOPPED_BEFORE_START))
            if thread is not None:
                self._queue.put(None)
        if thread is not None:
            thread.join(timeout)
        if self._pipeline is not None:
            self._pipeline.flush_writer()   # every image already made is committed to disk

    # -- internals ----------------------------------------------------------------

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._thread.start()

    def _forget(self, task: AsyncTask) -> None:
        with self._lock:
            self._unfinished.pop(task.id, None)
            self._keys.pop(task.id, None)

    def pipeline(self) -> PipelineLike | None:
        """The pipeline this worker owns (made on first use), or None with a plain handler.
        Its state is the worker thread's: other threads only read what it publishes."""
        with self._lock:
            if self._pipeline is None and self._pipeline_factory is not None:
                self._pipeline = self._pipeline_factory()
            return self._pipeline

    def _resolve_handler(self) -> Handler:
        if self._handler is None:
            pipeline = self.pipeline()
            if pipeline is None:
                raise RuntimeError("the worker has neither a handler nor a pipeline")
            self._handler = pipeline.process_request
            if self._status_hook is None:
                self._status_hook = pipeline.model_status
        return self._handler

    def _make_error(self, message: str) -> ResultLike:
        factory = self._error_result or _failed
        try:
            return factory(message)
        except Exception:  # a broken factory must not lose the error
            log.exception("error-result factory failed")
            return _failed(message)

    def _run_calls(self) -> None:
        """Run the pending calls; each one's caller sees the snapshot published after it."""
        while True:
            try:
                fn, future = self._calls.get_nowait()
            except queue.Empty:
                return
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn()
            except BaseException as e:  # handed to the caller
                self._publish_status()
                future.set_exception(e)
            else:
                self._publish_status()
                future.set_result(result)

    def _publish_status(self) -> None:
        """Snapshot the registry on this thread; readers get a copy, never the live dicts."""
        if self._status_hook is None and self._handler is None:
            try:
                self._resolve_handler()
            except Exception:
                log.exception("could not load the pipeline for the status snapshot")
        if self._status_hook is None:
            self._status = {}
            return
        try:
            self._status = self._status_hook()
        except Exception as e:
            log.exception("model status snapshot failed")
            self._status = {"error": f"{type(e).__name__}: {e}"}

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            self._run_calls()
            if item is None:
                return
            if item is _WAKE:
                continue
            task: AsyncTask = item
            if self._status is None:   # readers during the first task get a snapshot too
                self._publish_status()
            if task.done():  # stopped while queued
                continue
            tasks = self._batch_for(task)
            with self._lock:
                tasks = [t for t in tasks if not t.done()]   # stopped while the batch was joined
                for t in tasks:
                    t.state = TaskState.RUNNING
                    t.started_at = time.time()
                self._running = tasks
            try:
                if len(tasks) == 1:
                    self._execute(tasks[0])
                elif tasks:
                    self._execute_batch(tasks)
            finally:
                with self._lock:
                    self._running = []
                self._publish_status()

    # -- batches -------------------------------------------------------------------

    def _batching_pipeline(self) -> Any:
        """The pipeline when it runs batches (and the cap allows more than one image), else None."""
        if self.max_batch == 1 or self._pipeline_factory is None:
            return None
        pipeline = self.pipeline()
        if not (hasattr(pipeline, "batch_key") and hasattr(pipeline, "process_batch")):
            return None
        return pipeline

    def _key(self, pipeline: Any, task: AsyncTask) -> BatchKey | None:
        if task.id not in self._keys:
            try:
                self._keys[task.id] = pipeline.batch_key(task.request)
            except Exception:   # the task's own run reports what is wrong with it
                log.exception("batch key of task %d", task.id)
                self._keys[task.id] = None
        return self._keys[task.id]

    def _batch_for(self, task: AsyncTask) -> list[AsyncTask]:
        """`task` and the queued tasks that join it: the same batch key, whole requests in queue
        order, as long as their images fit the cap; for `batch_window_ms`, also those arriving."""
        pipeline = self._batching_pipeline()
        key = None if pipeline is None else self._key(pipeline, task)
        if key is None:
            return [task]
        cap = self.max_batch or key.capacity
        tasks, images = [task], key.images
        deadline = time.monotonic() + self.batch_window_ms / 1000
        while images < cap:
            images = self._join(pipeline, key.key, cap, tasks, images)
            remaining = deadline - time.monotonic()
            if images >= cap or remaining <= 0:
                break
            with self._queue.not_empty:   # notified by every put: a task (or a call) arrived
                self._queue.not_empty.wait(remaining)
        return tasks

    def _join(self, pipeline: Any, key: Any, cap: int, tasks: list[AsyncTask], images: int) -> int:
        """Move the queued tasks of `key` that fit into `tasks`; returns the images now in it."""
        with self._queue.mutex:
            queued = [t for t in self._queue.queue if isinstance(t, AsyncTask)]
        for other in queued:
            if images >= cap:
                break
            if other.done():
                continue
            found = self._key(pipeline, other)
            if found is None or found.key != key or images + found.images > cap:
                continue
            with self._queue.mutex:   # only this thread takes from the queue: it is still there
                self._queue.queue.remove(other)
            tasks.append(other)
            images += found.images
        return images

    def _execute_batch(self, tasks: list[AsyncTask]) -> None:
        for task in tasks:
            task.set_progress(0.0, "Starting", stage="loading")
        try:
            results = self.pipeline().process_batch([t.request for t in tasks], [t.control for t in tasks],
                                                    [t.report_progress for t in tasks])
            if len(results) != len(tasks) or not all(hasattr(r, "images") and hasattr(r, "report")
                                                     for r in results):
                raise TypeError(f"process_batch returned {len(results)} results for {len(tasks)} tasks")
        except Exception as e:  # the thread must survive anything a batch does
            log.exception("batch of tasks %s failed", [t.id for t in tasks])
            results = [self._make_error(f"{type(e).__name__}: {e}") for _ in tasks]
        for task, result in zip(tasks, results):
            self._finish_task(task, result)

    def _execute(self, task: AsyncTask) -> None:
        task.set_progress(0.0, "Starting", stage="loading")
        try:
            handler = self._resolve_handler()
            result = handler(task.request, task.control, task.report_progress)
            if not hasattr(result, "images") or not hasattr(result, "report"):
                raise TypeError(f"handler returned {type(result).__name__}, not a RequestResult")
        except Exception as e:  # the thread must survive anything a request does
            log.exception("task %d failed", task.id)
            result = self._make_error(f"{type(e).__name__}: {e}")
        self._finish_task(task, result)

    def _finish_task(self, task: AsyncTask, result: ResultLike) -> None:
        report = result.report if isinstance(result.report, dict) else {}
        self.last_report = report
        error, stopped = report.get("error"), report.get("stopped") or task.control.stop.is_set()
        if error:
            text, stage = f"Error: {error}", "error"
        elif stopped:
            text, stage = f"Stopped ({len(result.images)} image(s) kept)", "stopped"
        else:
            text, stage = "Finished", "finished"
        task.set_progress(100.0 if stage == "finished" else task.progress.percent, text, stage=stage,
                          images=tuple(map(str, result.images)),
                          image_index=task.progress.image_index, image_count=task.progress.image_count,
                          step=task.progress.step, steps=task.progress.steps)
        task._finish(result)
