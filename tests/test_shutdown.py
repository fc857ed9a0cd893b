"""Worker.shutdown(stop_tasks=True), what SIGTERM calls: the running task sees Stop,
queued tasks end unrun, the thread ends."""

from __future__ import annotations

import threading

from modules.async_worker import STOPPED_BEFORE_START, TaskControl, Worker

TIMEOUT = 60


class Result:
    def __init__(self, report: dict) -> None:
        self.images: list[str] = []
        self.report = report


def test_shutdown_stops_the_running_task_and_drops_the_queued_ones():
    started = threading.Event()
    ran = []

    def handler(request: dict, control: TaskControl, progress) -> Result:
        ran.append(request["n"])
        started.set()
        stopped = control.stop.wait(TIMEOUT)   # a request polls Stop between steps
        return Result({"stopped": stopped})

    worker = Worker(handler=handler)
    running = worker.submit({"n": 0})
    assert started.wait(TIMEOUT)
    queued = [worker.submit({"n": i}) for i in (1, 2)]
    worker.shutdown(timeout=TIMEOUT, stop_tasks=True)
    assert running.result(0).report == {"stopped": True}
    assert all(STOPPED_BEFORE_START in t.result(0).report["error"] for t in queued)
    assert ran == [0]
