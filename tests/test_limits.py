"""Limits that are not one request's fields: the queue length and the conditioning cache."""

from __future__ import annotations

import threading

from ldm_patched.modules import model_management as mm
from modules import config
from modules.async_worker import TaskControl, Worker
from tests.helpers import pipelines

TIMEOUT = 60


class Result:
    def __init__(self, text: str) -> None:
        self.images: list[str] = []
        self.report = {"text": text}


def test_a_full_queue_answers_queue_full_at_once_and_later_requests_run():
    started, release = threading.Event(), threading.Event()

    def handler(request: dict, control: TaskControl, progress) -> Result:
        started.set()
        release.wait(TIMEOUT)
        return Result(request["prompt"])

    worker = Worker(handler=handler, max_pending=2)
    try:
        running = worker.submit({"prompt": "running"})
        assert started.wait(TIMEOUT)
        queued = [worker.submit({"prompt": f"queued {i}"}) for i in range(2)]
        refused = worker.submit({"prompt": "one too many"})
        assert refused.done()
        error = refused.result(0).report["error"]
        assert "queue full" in error and "max_queue_length" in error
        release.set()
        assert [t.result(TIMEOUT).report["text"] for t in (running, *queued)] == ["running", "queued 0", "queued 1"]
        assert worker.submit({"prompt": "after"}).result(TIMEOUT).report["text"] == "after"
    finally:
        release.set()
        worker.shutdown(TIMEOUT)


def test_the_process_worker_takes_its_queue_length_from_the_config(monkeypatch, tmp_path):
    from modules import runtime

    monkeypatch.setenv("config_path", str(tmp_path / "none.txt"))
    monkeypatch.setenv("max_queue_length", "3")
    config.reload_config()
    monkeypatch.setattr(runtime, "_worker", None)
    try:
        assert runtime.get_worker().max_pending == 3
    finally:
        monkeypatch.undo()
        config.reload_config()


def test_queue_size_flag_wins_over_the_config_and_each_client_gets_its_share(monkeypatch, tmp_path):
    import args_manager
    from modules import runtime

    monkeypatch.setenv("config_path", str(tmp_path / "none.txt"))
    monkeypatch.setenv("max_queue_length", "3")
    monkeypatch.setenv("max_queue_per_client", "2")
    monkeypatch.setattr(args_manager.args, "queue_size", 7, raising=False)   # --queue-size 7
    config.reload_config()
    monkeypatch.setattr(runtime, "_worker", None)
    try:
        worker = runtime.get_worker()
        assert (worker.max_pending, worker.max_pending_per_owner) == (7, 2)
    finally:
        monkeypatch.undo()
        config.reload_config()


def test_conditioning_cache_is_bounded_in_bytes_and_counted(pipeline, monkeypatch):
    pipeline(mm.Policy.RESIDENT)
    request = {"base_model": "tiny_sdxl_base.safetensors", "width": 64, "height": 64, "steps": 1, "seed": 1}
    pipelines.process_request({**request, "prompt": "warm up"})
    one = pipelines.current().catalogue.state.conditions_bytes() // 2   # prompt and negative: two entries
    assert one > 0
    limit_mb = 3.5 * one / 2 ** 20   # room for three conditionings, not more
    monkeypatch.setenv("max_conditioning_cache_mb", repr(limit_mb))
    config.reload_config()
    for index in range(6):
        report = pipelines.process_request({**request, "prompt": f"prompt number {index}"}).report
        assert "error" not in report, report
        assert report["model_management"]["conditioning_cache_bytes"] <= limit_mb * 2 ** 20
    status = pipelines.current().model_status()["conditioning_cache"]
    assert status["entries"] == 3 and status["bytes"] == pipelines.current().catalogue.state.conditions_bytes()


def test_the_cost_cap_refuses_a_request_before_loading_anything(pipeline, monkeypatch):
    """The probe's 200 steps x 32 images at the default size: refused at once, naming the
    fields and the key; the cap follows its config key, and a request within it runs."""
    pipeline(mm.Policy.RESIDENT)
    base = {"base_model": "tiny_sdxl_base.safetensors", "prompt": "a cat", "seed": 1}
    report = pipelines.process_request({**base, "width": 1152, "height": 896, "steps": 200,
                                        "image_number": 32}).report
    error = report["error"]
    for part in ("1152x896", "200 steps", "32 image", "6606 megapixel-steps", "max_megapixel_steps",
                 "'width'", "'steps'", "'image_number'"):
        assert part in error, (part, error)
    assert report["model_management"]["models_loaded"] == 0
    small = {**base, "width": 64, "height": 64, "steps": 2, "image_number": 1}   # 0.008 megapixel-steps
    monkeypatch.setenv("max_megapixel_steps", "0.0082")
    config.reload_config()
    assert "error" not in pipelines.process_request(small).report
    assert "max_megapixel_steps" in pipelines.process_request({**small, "steps": 3}).report["error"]
