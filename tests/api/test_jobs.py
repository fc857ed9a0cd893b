"""API jobs on a fake worker: the bounded queue and each client's share of it (429), the
bounded history, and where results may be posted."""

from __future__ import annotations

import pytest

from modules.api import jobs
from modules.api.context import ApiSettings
from tests.helpers.api import TIMEOUT, fake_api
from tests.helpers.webui import wait_until

KEYS = ("alpha", "beta", "gamma")
ASYNC = {"async_process": True}


def post(api, key: str, prompt: str):
    return api.client.post("/v1/generation/text-to-image", json={"prompt": prompt, **ASYNC},
                           headers={"X-API-KEY": key})


def test_a_full_queue_and_a_client_at_its_share_answer_429(tmp_path):
    with fake_api(tmp_path, ApiSettings(api_keys=KEYS), max_pending=2, max_pending_per_owner=1) as api:
        running = post(api, "alpha", "wait: running")
        assert running.status_code == 200 and api.pipeline.started.wait(TIMEOUT)
        assert post(api, "alpha", "wait: queued").status_code == 200
        own_share = post(api, "alpha", "one too many for alpha")
        assert own_share.status_code == 429 and "max_queue_per_client" in own_share.json()["detail"]
        assert post(api, "beta", "wait: beta's").status_code == 200   # another client still gets in
        full = post(api, "gamma", "the queue is full")
        assert full.status_code == 429 and "max_queue_length" in full.json()["detail"]
        api.pipeline.gate.set()
        wait_until(lambda: api.context.jobs.unfinished() == 0, "the queue to drain", TIMEOUT)
        assert post(api, "gamma", "after").status_code == 200
    assert [r["prompt"] for r in api.pipeline.requests[:3]] == ["wait: running", "wait: queued", "wait: beta's"]


def test_the_history_keeps_the_last_finished_jobs_only(tmp_path):
    with fake_api(tmp_path, ApiSettings(api_keys=KEYS), env={"max_job_history": "2"}) as api:
        headers = {"X-API-KEY": "alpha"}
        answers = [api.client.post("/v1/generation/text-to-image", json={"prompt": f"p{i}"}, headers=headers).json()
                   for i in range(3)]
        urls = [answer[0]["url"] for answer in answers]
        assert [api.client.get(url, headers=headers).status_code for url in urls] == [404, 200, 200]
        history = api.client.get("/v1/generation/job-history", headers=headers).json()["history"]
        assert [h["job_id"] for h in history] == [url.split("/")[-2] for url in urls[1:]]


@pytest.mark.parametrize("url, allowed", [
    ("http://hooks.local:8000/fooocus/done", True),
    ("http://hooks.local:8000/fooocus", True),
    ("https://hooks.local:8000/fooocus/done", False),    # another scheme
    ("http://hooks.local:8001/fooocus/done", False),     # another port
    ("http://hooks.local.evil:8000/fooocus/done", False),
    ("http://hooks.local:8000/other", False),
    ("http://operator.local/notify", True),              # --webhook-url itself
])
def test_a_request_webhook_must_fall_under_the_operators_allow_list(url, allowed):
    assert jobs.webhook_allowed(url, "http://operator.local/notify", ("http://hooks.local:8000/fooocus",)) is allowed


@pytest.mark.parametrize("report, status", [
    ({}, 200), ({"stopped": True}, 200), ({"error": "stopped before start"}, 200),
    ({"error": "field 'width' must be a multiple of 8, got 65"}, 422),
    ({"error": "internal error: KeyError: 'x'"}, 500), ({"error": "out of memory on cuda:0 twice: ..."}, 500),
])
def test_a_reports_error_decides_the_http_status(report, status):
    assert jobs.report_status(report) == status
