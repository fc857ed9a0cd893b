"""The task queue: FIFO order, Stop/Skip reach the handler, errors never kill the thread."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from modules.task_types import BatchKey, ProgressEvent
from modules.async_worker import STOPPED_BEFORE_START, AsyncTask, TaskControl, TaskState, Worker, progress_percent

TIMEOUT = 10.0  # generous upper bound for events that should happen in milliseconds


@dataclass
class FakeResult:
    images: list[str]
    report: dict


@dataclass
class Recorder:
    """A fake pipeline: records request order; 'block' requests wait for a gate."""

    order: list[str] = field(default_factory=list)
    started: dict[str, threading.Event] = field(default_factory=dict)
    gates: dict[str, threading.Event] = field(default_factory=dict)
    seen: dict[str, dict[str, bool]] = field(default_factory=dict)

    def gate(self, name: str) -> threading.Event:
        self.started.setdefault(name, threading.Event())
        return self.gates.setdefault(name, threading.Event())

    def __call__(self, request: dict, control: TaskControl,
                 progress: Callable[[ProgressEvent], None] | None) -> FakeResult:
        name = request["prompt"]
        self.order.append(name)
        if request.get("raise"):
            raise RuntimeError(f"boom in {name}")
        if progress is not None:
            progress(ProgressEvent(0, 2, 1, 4, f"{name}: step 1"))
        if name in self.gates:
            self.started[name].set()
            # Wait until the test releases us or sets stop/skip; bounded by TIMEOUT.
            released = self.gates[name]
            for _ in range(int(TIMEOUT / 0.01)):
                if released.is_set() or control.stop.is_set() or control.skip.is_set():
                    break
                released.wait(0.01)
        self.seen[name] = {"stop": control.stop.is_set(), "skip": control.skip.is_set()}
        if control.stop.is_set():
            return FakeResult([], {"error": "stopped"})
        return FakeResult([f"{name}.png"], {"prompt": name, "skipped": control.skip.is_set()})


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def worker(recorder: Recorder) -> Iterator[Worker]:
    w = Worker(handler=recorder)
    yield w
    for gate in recorder.gates.values():
        gate.set()
    w.shutdown(TIMEOUT)


def test_tasks_run_in_submission_order(worker: Worker, recorder: Recorder) -> None:
    first_gate = recorder.gate("a")  # hold "a" so the others queue up behind it
    tasks = [worker.submit({"prompt": p}) for p in ("a", "b", "c", "d")]
    assert recorder.started["a"].wait(TIMEOUT)
    assert worker.pending() == 3
    assert [t.state for t in tasks] == [TaskState.RUNNING, TaskState.QUEUED, TaskState.QUEUED, TaskState.QUEUED]
    first_gate.set()
    results = [t.result(TIMEOUT) for t in tasks]
    assert recorder.order == ["a", "b", "c", "d"]
    assert [r.images for r in results] == [["a.png"], ["b.png"], ["c.png"], ["d.png"]]
    assert all(t.state is TaskState.FINISHED for t in tasks)
    assert all(t.created_at <= t.started_at <= t.finished_at for t in tasks)  # type: ignore[operator]
    # Tasks never overlap: each starts after the previous one finished.
    for prev, nxt in zip(tasks, tasks[1:]):
        assert prev.finished_at <= nxt.started_at  # type: ignore[operator]


def test_stop_owned_reaches_running_handler(worker: Worker, recorder: Recorder) -> None:
    recorder.gate("long")
    task = worker.submit({"prompt": "long"}, owner="alice")
    assert recorder.started["long"].wait(TIMEOUT)
    assert worker.current is task
    assert worker.stop_owned("alice") == [task]
    result = task.result(TIMEOUT)
    assert recorder.seen["long"] == {"stop": True, "skip": False}
    assert result.report == {"error": "stopped"}
    assert worker.current is None


def test_skip_owned_reaches_running_handler(worker: Worker, recorder: Recorder) -> None:
    recorder.gate("long")
    task = worker.submit({"prompt": "long"}, owner="alice")
    assert recorder.started["long"].wait(TIMEOUT)
    assert worker.skip_owned("alice") is task
    result = task.result(TIMEOUT)
    assert recorder.seen["long"] == {"stop": False, "skip": True}
    assert result.images == ["long.png"] and result.report["skipped"] is True


def test_stop_and_skip_without_running_task_are_noops(worker: Worker) -> None:
    assert worker.stop_owned("alice") == []
    assert worker.skip_owned("alice") is None


def test_a_foreign_owner_cannot_stop_or_skip(worker: Worker, recorder: Recorder) -> None:
    gate = recorder.gate("mine")
    mine = worker.submit({"prompt": "mine"}, owner="alice")
    queued = worker.submit({"prompt": "queued"}, owner="alice")
    assert recorder.started["mine"].wait(TIMEOUT)
    for intruder in ("bob", None):
        assert worker.stop_owned(intruder) == []
        assert worker.skip_owned(intruder) is None
    assert not mine.control.stop.is_set() and not mine.control.skip.is_set()
    assert not queued.done()
    assert worker.tasks_of("alice") == [mine, queued] and worker.tasks_of("bob") == []
    gate.set()
    assert mine.result(TIMEOUT).images == ["mine.png"]
    assert queued.result(TIMEOUT).images == ["queued.png"]
    assert recorder.seen["mine"] == {"stop": False, "skip": False}
    assert worker.tasks_of("alice") == []


def test_stop_owned_stops_the_running_task_and_drops_the_queued_ones(worker: Worker, recorder: Recorder) -> None:
    recorder.gate("running")
    running = worker.submit({"prompt": "running"}, owner="alice")
    other = worker.submit({"prompt": "other"}, owner="bob")
    queued = worker.submit({"prompt": "queued"}, owner="alice")
    assert recorder.started["running"].wait(TIMEOUT)
    assert worker.stop_owned("alice") == [running, queued]
    assert queued.result(TIMEOUT).report == {"error": STOPPED_BEFORE_START}
    assert running.result(TIMEOUT).report == {"error": "stopped"}
    assert other.result(TIMEOUT).images == ["other.png"]
    assert recorder.order == ["running", "other"]   # "queued" never ran
    assert queued.progress.stage == "stopped"


def test_call_waits_for_the_running_task_and_runs_before_the_next(worker: Worker, recorder: Recorder) -> None:
    gate = recorder.gate("running")
    running = worker.submit({"prompt": "running"})
    queued = worker.submit({"prompt": "queued"})
    assert recorder.started["running"].wait(TIMEOUT)
    threads: list[str] = []

    def free() -> str:
        recorder.order.append("call")
        threads.append(threading.current_thread().name)
        return "freed"

    future = worker.call(free)
    assert not future.done()   # the running task is not interrupted
    gate.set()
    assert future.result(TIMEOUT) == "freed"
    queued.result(TIMEOUT)
    assert running.result(TIMEOUT).images == ["running.png"]
    assert recorder.order == ["running", "call", "queued"]
    assert threads == ["fooocus-worker"]


def test_call_runs_when_idle_and_passes_exceptions(worker: Worker) -> None:
    assert worker.call(lambda: 42).result(TIMEOUT) == 42

    def broken() -> None:
        raise KeyError("no such model")

    with pytest.raises(KeyError, match="no such model"):
        worker.call(broken).result(TIMEOUT)


def test_status_snapshot_is_published_by_the_worker_thread(recorder: Recorder) -> None:
    calls: list[str] = []
    registry = {"models": ["a"]}

    def status() -> dict:
        calls.append(threading.current_thread().name)
        return {"models": list(registry["models"])}

    w = Worker(handler=recorder, status=status)
    try:
        first = w.status_snapshot(TIMEOUT)
        assert first == {"models": ["a"]}
        registry["models"].append("b")
        assert w.status_snapshot(TIMEOUT) == first   # a snapshot, not a live view
        w.submit({"prompt": "x"}).result(TIMEOUT)
        w.call(lambda: None).result(TIMEOUT)   # the snapshot after the task is published by now
        assert w.status_snapshot(TIMEOUT) == {"models": ["a", "b"]}
        assert set(calls) == {"fooocus-worker"}
    finally:
        w.shutdown(TIMEOUT)


def test_stopping_a_queued_task_cancels_it_before_start(worker: Worker, recorder: Recorder) -> None:
    gate = recorder.gate("running")
    running = worker.submit({"prompt": "running"})
    queued = worker.submit({"prompt": "queued"})
    after = worker.submit({"prompt": "after"})
    assert recorder.started["running"].wait(TIMEOUT)
    worker.stop(queued)
    # Resolved at once, while the first task is still running.
    assert queued.done() and not running.done()
    assert queued.result(0).images == []
    assert queued.result(0).report == {"error": STOPPED_BEFORE_START}
    gate.set()
    assert after.result(TIMEOUT).images == ["after.png"]
    assert running.result(TIMEOUT).images == ["running.png"]
    assert recorder.order == ["running", "after"]  # the handler never saw "queued"
    assert queued.started_at is None


def test_handler_exception_becomes_error_result_and_worker_survives(worker: Worker, recorder: Recorder) -> None:
    bad = worker.submit({"prompt": "bad", "raise": True})
    good = worker.submit({"prompt": "good"})
    bad_result = bad.result(TIMEOUT)
    assert bad_result.images == []
    assert "RuntimeError" in bad_result.report["error"] and "boom in bad" in bad_result.report["error"]
    assert bad.progress.text.startswith("Error:")
    assert good.result(TIMEOUT).images == ["good.png"]


def test_handler_returning_garbage_is_an_error() -> None:
    w = Worker(handler=lambda request, control, progress: None)  # type: ignore[arg-type, return-value]
    try:
        result = w.submit({"prompt": "x"}).result(TIMEOUT)
        assert result.images == [] and "NoneType" in result.report["error"]
    finally:
        w.shutdown(TIMEOUT)


def test_custom_error_result_factory_is_used() -> None:
    made: list[str] = []

    def factory(message: str) -> FakeResult:
        made.append(message)
        return FakeResult([], {"error": message, "mode": "test"})

    def raising(request: dict, control: TaskControl, progress: object) -> FakeResult:
        raise ValueError("bad field")

    w = Worker(handler=raising, error_result=factory)
    try:
        result = w.submit({"prompt": "x"}).result(TIMEOUT)
        assert result.report == {"error": "ValueError: bad field", "mode": "test"}
        assert made == ["ValueError: bad field"]
    finally:
        w.shutdown(TIMEOUT)


def test_progress_events_update_task_and_wake_waiters(worker: Worker, recorder: Recorder) -> None:
    gate = recorder.gate("p")
    task = worker.submit({"prompt": "p"})
    assert recorder.started["p"].wait(TIMEOUT)
    # The fake reported image 0 of 2, step 1 of 4 before blocking ("Starting" may come first).
    snap = task.wait_for_update(0, TIMEOUT)
    while snap.text != "p: step 1" and not task.done():
        snap = task.wait_for_update(snap.version, TIMEOUT)
    assert snap.percent == pytest.approx(100 * 0.9 * (1 / 4) / 2)   # step 1 of 4, image 1 of 2
    assert (snap.image_index, snap.image_count, snap.step, snap.steps) == (0, 2, 1, 4)
    gate.set()
    task.result(TIMEOUT)
    final = task.wait_for_update(snap.version, TIMEOUT)
    assert final.percent == 100.0 and final.text == "Finished"


def test_progress_keeps_every_stage_in_order_even_between_polls() -> None:
    """A page that polls snapshots can miss a short stage; the snapshot's history cannot."""
    task = AsyncTask(request={"prompt": "stages"})
    seen = task.progress.version
    for stage in ("loading", "encoding", "sampling", "sampling", "decoding", "saving", "finished"):
        task.set_progress(50.0, stage, stage=stage)
    latest = task.wait_for_update(seen, TIMEOUT)
    assert latest.stage == "finished"
    assert latest.stages == ("queued", "loading", "encoding", "sampling", "decoding", "saving", "finished")


def test_progress_never_goes_back_when_a_batch_saves_its_images() -> None:
    task = AsyncTask(request={"prompt": "batch"})
    task.report_progress(ProgressEvent(0, 4, 8, 8, "Decoding images 1-4/4", stage="decoding", images=4))
    task.report_progress(ProgressEvent(0, 4, 8, 8, "Saved image 1/4", stage="saving"))   # 22.5 % on its own
    assert task.progress.percent == pytest.approx(90.0) and task.progress.text == "Saved image 1/4"


def test_wait_for_update_times_out_without_change() -> None:
    task = AsyncTask(request={"prompt": "idle"})
    snap = task.wait_for_update(task.progress.version, 0.05)
    assert snap.version == 0 and snap.text == "Waiting in queue"


@pytest.mark.parametrize(("event", "want"), [
    (ProgressEvent(0, 1, 0, 10, ""), 0.0),
    (ProgressEvent(0, 1, 5, 10, ""), 45.0),     # sampling fills 90 % of an image's part
    (ProgressEvent(1, 2, 5, 10, ""), 72.5),
    (ProgressEvent(0, 2, 10, 10, ""), 45.0),    # image 1 decodes: image 2 has not begun
    (ProgressEvent(1, 2, 10, 10, ""), 95.0),    # the last image decodes: not 100 % before "finished"
    (ProgressEvent(5, 2, 99, 10, ""), 95.0),    # out-of-range values are clamped
    (ProgressEvent(0, 0, 0, 0, ""), 0.0),       # degenerate counts don't divide by zero
    (ProgressEvent(0, 4, 5, 10, "", images=4), 45.0),   # four images in one UNet batch, half way
    (ProgressEvent(2, 4, 5, 10, "", images=4), 72.5),   # a batch never counts past the last image
])
def test_progress_percent(event: ProgressEvent, want: float) -> None:
    assert progress_percent(event) == pytest.approx(want)


@dataclass
class BatchingRecorder:
    """A fake pipeline that runs batches: a request's batch key is its "key" (None: alone),
    its images its "n"; one batch holds 4 images. Batches wait for `gate` when it is given."""

    batches: list[list[str]] = field(default_factory=list)
    asked: threading.Event = field(default_factory=threading.Event)   # a batch key was asked for
    running: threading.Event = field(default_factory=threading.Event)
    gate: threading.Event | None = None

    def batch_key(self, request: dict) -> BatchKey | None:
        self.asked.set()
        return None if request.get("key") is None else BatchKey(request["key"], request.get("n", 1), capacity=4)

    def process_batch(self, requests, controls, progresses) -> list[FakeResult]:
        self.batches.append([r["prompt"] for r in requests])
        self.running.set()
        if self.gate is not None:
            assert self.gate.wait(TIMEOUT)
        return [FakeResult([f"{r['prompt']}.png"], {"skipped": c.skip.is_set()}) for r, c in zip(requests, controls)]

    def process_request(self, request, control=None, progress=None) -> FakeResult:
        return self.process_batch([request], [control or TaskControl()], [progress])[0]

    def model_status(self) -> dict:
        return {}

    def flush_writer(self) -> None:
        pass


def _held_worker(pipeline: BatchingRecorder, **options) -> tuple[Worker, threading.Event]:
    """A worker kept busy (by a call) until the returned event is set, so tasks queue up."""
    worker = Worker(pipeline_factory=lambda: pipeline, **options)
    held = threading.Event()
    worker.call(lambda: held.wait(TIMEOUT))
    return worker, held


@pytest.mark.parametrize("max_batch", [None, 1])
def test_queued_tasks_of_one_batch_key_join_the_first_in_order_up_to_the_cap(max_batch) -> None:
    pipeline = BatchingRecorder()
    worker, held = _held_worker(pipeline, max_batch=max_batch)
    try:
        queued = [("a", "A", 1), ("b", "B", 1), ("c", "A", 1), ("d", "A", 2), ("e", "A", 1), ("f", None, 1)]
        tasks = [worker.submit({"prompt": p, "key": k, "n": n}) for p, k, n in queued]
        held.set()
        assert [t.result(TIMEOUT).images for t in tasks] == [[f"{p}.png"] for p, _, _ in queued]
    finally:
        worker.shutdown(TIMEOUT)
    if max_batch == 1:   # --max-batch 1: one task at a time, as upstream
        assert pipeline.batches == [[p] for p, _, _ in queued]
    else:   # a, c and d fill the 4 images; b (another key) waits for that one batch only
        assert pipeline.batches == [["a", "c", "d"], ["b"], ["e"], ["f"]]


def test_the_batch_window_waits_for_a_compatible_task_to_arrive() -> None:
    pipeline = BatchingRecorder()
    worker = Worker(pipeline_factory=lambda: pipeline, batch_window_ms=600_000)   # ends when the batch is full
    try:
        first = worker.submit({"prompt": "a", "key": "A", "n": 3})
        assert pipeline.asked.wait(TIMEOUT)   # the worker has taken it and waits for more
        late = worker.submit({"prompt": "b", "key": "A"})
        assert first.result(TIMEOUT).images == ["a.png"] and late.result(TIMEOUT).images == ["b.png"]
    finally:
        worker.shutdown(TIMEOUT)
    assert pipeline.batches == [["a", "b"]]


def test_skip_owned_reaches_the_owners_task_inside_a_running_batch() -> None:
    pipeline = BatchingRecorder(gate=threading.Event())
    worker, held = _held_worker(pipeline)
    try:
        alice = worker.submit({"prompt": "a", "key": "A"}, owner="alice")
        bob = worker.submit({"prompt": "b", "key": "A"}, owner="bob")
        held.set()
        assert pipeline.running.wait(TIMEOUT)
        assert worker.running() == [alice, bob] and worker.current is alice
        assert worker.skip_owned("bob") is bob
        pipeline.gate.set()
        assert (alice.result(TIMEOUT).report, bob.result(TIMEOUT).report) == ({"skipped": False}, {"skipped": True})
    finally:
        worker.shutdown(TIMEOUT)


def test_submit_after_shutdown_is_refused(recorder: Recorder) -> None:
    w = Worker(handler=recorder)
    w.shutdown(TIMEOUT)
    with pytest.raises(RuntimeError):
        w.submit({"prompt": "late"})
