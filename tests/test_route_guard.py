"""Gradio's own routes under a login (modules/route_guard.py), driven over HTTP as a
browser or a script would: a session belongs to the login that opened it, output files
stay with their owner, bodies are bounded, a job whose client is gone is stopped, and the
queue limit holds however jobs arrive."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from modules import route_guard, webui
from tests.helpers.webui import TIMEOUT, FakeApp, start_fake_app, wait_until

USERS = [("ann", "ann-secret"), ("bob", "bob-secret")]


def close(fake: FakeApp) -> None:
    fake.pipeline.gate.set()
    fake.app.close()  # type: ignore[attr-defined]
    fake.worker.shutdown(TIMEOUT)


@pytest.fixture(scope="module")
def login_app(tmp_path_factory) -> Iterator[FakeApp]:
    fake = start_fake_app(tmp_path_factory.mktemp("guard"), auth=USERS, max_file_size=64 * 1024)
    try:
        yield fake
    finally:
        close(fake)


@pytest.fixture
def fresh(login_app: FakeApp) -> FakeApp:
    """The shared app with its fake pipeline's gate closed again."""
    login_app.pipeline.gate.set()
    wait_until(lambda: login_app.worker.current is None and login_app.worker.pending() == 0, "an idle worker")
    login_app.pipeline.gate.clear()
    login_app.pipeline.started.clear()
    return login_app


def logged_in(fake: FakeApp, user: str | None) -> httpx.Client:
    client = httpx.Client(base_url=fake.url, timeout=TIMEOUT)
    if user is not None:
        password = dict(USERS)[user]
        assert client.post("login", data={"username": user, "password": password}).status_code == 200
    return client


def fn_index(fake: FakeApp, api_name: str) -> int:
    return next(i for i, d in enumerate(fake.app.config["dependencies"]) if d.get("api_name") == api_name)


def join(client: httpx.Client, fake: FakeApp, session: str, request: dict) -> httpx.Response:
    return client.post("gradio_api/queue/join", json={"data": [request], "fn_index": fn_index(fake, "generate"),
                                                      "session_hash": session, "event_data": None})


def test_another_login_cannot_cancel_read_or_take_over_a_session(fresh: FakeApp) -> None:
    ann, bob, nobody = logged_in(fresh, "ann"), logged_in(fresh, "bob"), logged_in(fresh, None)
    assert join(ann, fresh, "ann-session", {"prompt": "ann's", "block": True}).status_code == 200
    assert fresh.pipeline.started.wait(TIMEOUT)
    task = fresh.worker.current
    cancel = {"session_hash": "ann-session", "fn_index": fn_index(fresh, "generate"), "event_id": "x"}
    assert nobody.post("gradio_api/cancel", json=cancel).status_code == 401
    assert bob.post("gradio_api/cancel", json=cancel).status_code == 403
    assert bob.get("gradio_api/queue/data", params={"session_hash": "ann-session"}).status_code == 403
    assert bob.get("gradio_api/heartbeat/ann-session").status_code == 403
    assert join(bob, fresh, "ann-session", {"prompt": "bob's"}).status_code == 403
    assert task is not None and not task.control.stop.is_set() and fresh.worker.pending() == 0
    fresh.pipeline.gate.set()
    with ann.stream("GET", "gradio_api/queue/data", params={"session_hash": "ann-session"}) as stream:
        done = [json.loads(line[5:]) for line in stream.iter_lines() if '"process_completed"' in line]
    assert done and done[0]["output"]["data"][1]["n"] >= 1   # the owner still gets her result


def test_a_call_routes_event_is_read_only_by_the_login_that_posted_it(fresh: FakeApp) -> None:
    ann, bob = logged_in(fresh, "ann"), logged_in(fresh, "bob")
    fresh.pipeline.gate.set()
    posted = ann.post("gradio_api/call/generate", json={"data": [{"prompt": "via call"}]})
    event_id = posted.json()["event_id"]
    assert bob.get(f"gradio_api/call/generate/{event_id}").status_code == 403
    answer = ann.get(f"gradio_api/call/generate/{event_id}")
    assert answer.status_code == 200 and "event: complete" in answer.text


def test_a_page_stop_from_another_login_leaves_the_page_job_alone(fresh: FakeApp) -> None:
    task = fresh.worker.submit({"prompt": "ann's page", "block": True}, owner=webui.page_owner("ann", "token-1"))
    assert fresh.pipeline.started.wait(TIMEOUT)
    config = fresh.app.config
    stop = next(i for i, d in enumerate(config["dependencies"]) if any(
        c["props"].get("elem_id") == "stop_button" for c in config["components"] if c["id"] == d["targets"][0][0]))
    for user in ("bob", "ann"):
        response = logged_in(fresh, user).post("gradio_api/run/predict", json={
            "data": ["token-1"], "fn_index": stop, "session_hash": f"{user}-page", "event_data": None})
        assert response.status_code == 200, response.text
        assert task.control.stop.is_set() == (user == "ann")   # bob's Stop, same token: not his job
    assert task.result(TIMEOUT).report == {"stopped": True}


def test_output_files_and_the_history_log_stay_with_their_owner(fresh: FakeApp) -> None:
    outputs = Path(fresh.cfg.path_outputs) / "2025-01-02"
    outputs.mkdir(parents=True, exist_ok=True)
    (outputs / "log.html").write_text("<p>everyone's prompts</p>")
    ann = logged_in(fresh, "ann")
    assert ann.get(f"gradio_api/file={outputs / 'log.html'}").status_code == 403
    assert ann.get("history/2025-01-02/log.html").status_code == 404
    assert logged_in(fresh, None).get("history/2025-01-02/log.html").status_code == 401


def test_a_body_past_twice_the_upload_limit_is_refused_unparsed(fresh: FakeApp) -> None:
    ann = logged_in(fresh, "ann")
    response = join(ann, fresh, "ann-big", {"prompt": "x" * (2 * 64 * 1024 + 1)})
    assert response.status_code == 413 and "max-upload-size" in response.text
    assert fresh.pipeline.requests[-1:] != [{"prompt": "x" * (2 * 64 * 1024 + 1)}]


def test_a_shared_history_is_served_to_every_login_and_only_inside_the_outputs(tmp_path: Path) -> None:
    fake = start_fake_app(tmp_path, {"shared_history_log": "true"}, auth=USERS)
    try:
        day = Path(fake.cfg.path_outputs) / "2025-01-02"
        day.mkdir(parents=True)
        (day / "log.html").write_text("<p>shared</p>")
        (tmp_path / "secret.txt").write_text("not an output")
        (day / "link.html").symlink_to(tmp_path / "secret.txt")
        bob = logged_in(fake, "bob")
        assert bob.get("history/2025-01-02/log.html").text == "<p>shared</p>"
        assert bob.get("history/2025-01-02/link.html").status_code == 404          # a symlink out of the outputs
        assert bob.get("history/../secret.txt").status_code == 404
        assert logged_in(fake, None).get("history/2025-01-02/log.html").status_code == 401
    finally:
        close(fake)


def test_a_job_whose_client_is_gone_is_stopped(tmp_path: Path, monkeypatch) -> None:
    """/gradio_api/call/generate: the result stream dropped (a killed client) stops the job;
    a job whose stream never opens is stopped after the grace period."""
    fake = start_fake_app(tmp_path)
    try:
        with httpx.Client(base_url=fake.url, timeout=TIMEOUT) as client:
            event_id = client.post("gradio_api/call/generate",
                                   json={"data": [{"prompt": "long", "block": True}]}).json()["event_id"]
            assert fake.pipeline.started.wait(TIMEOUT)
            task = fake.worker.current
            with client.stream("GET", f"gradio_api/call/generate/{event_id}") as stream:
                assert stream.status_code == 200   # reading... then the client dies
            wait_until(lambda: task.control.stop.is_set(), "the job of a dropped stream to stop")
            assert task.result(TIMEOUT).report == {"stopped": True}
            monkeypatch.setattr(route_guard, "READER_GRACE_S", 1.0)
            fake.pipeline.started.clear()
            client.post("gradio_api/call/generate", json={"data": [{"prompt": "unread", "block": True}]})
            assert fake.pipeline.started.wait(TIMEOUT)
            unread = fake.worker.current
            wait_until(lambda: unread.control.stop.is_set(), "the job nobody reads to stop")
    finally:
        close(fake)


def test_the_queue_limit_holds_for_jobs_through_gradios_call_route(tmp_path: Path) -> None:
    """More jobs than Gradio's default 40 slots: each reaches the worker at once, so the
    worker's max_queue_length refuses the surplus instead of Gradio queueing it unseen."""
    limit, sent = 48, 60
    fake = start_fake_app(tmp_path, {"max_queue_length": str(limit)})
    submitted = []
    real_submit = fake.worker.submit
    fake.worker.submit = lambda request, owner=None: submitted.append(real_submit(request, owner)) or submitted[-1]
    try:
        with httpx.Client(base_url=fake.url, timeout=TIMEOUT) as client:
            for i in range(sent):
                assert client.post("gradio_api/call/generate",
                                   json={"data": [{"prompt": f"job {i}", "block": True}]}).status_code == 200
        wait_until(lambda: len(submitted) == sent, "every job to reach the worker")
        refused = [t for t in submitted if t.done() and "queue full" in t.result().report.get("error", "")]
        assert fake.worker.pending() == limit and len(refused) == sent - limit - 1   # one is running
    finally:
        close(fake)


def test_a_call_that_skips_the_queue_is_present_while_its_connection_is_open(tmp_path: Path) -> None:
    """POST /gradio_api/run/generate answers on its own connection: its job is not taken
    for abandoned while that is open, and is stopped when it drops."""
    import threading

    fake = start_fake_app(tmp_path)
    guard: route_guard.RouteGuard = fake.app.route_guard  # type: ignore[attr-defined]
    dropped = threading.Event()

    def call() -> None:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(fake.url + "gradio_api/run/generate", timeout=httpx.Timeout(TIMEOUT, read=2.0),
                       json={"data": [{"prompt": "direct", "block": True}]})
        dropped.set()

    caller = threading.Thread(target=call)
    try:
        caller.start()
        assert fake.pipeline.started.wait(TIMEOUT)
        task = fake.worker.current
        wait_until(lambda: bool(guard.presence.open), "the call to count as present")
        (session,) = guard.presence.open
        assert not guard.client_gone(session, since=-1e9)   # open: present, however long ago it began
        assert dropped.wait(TIMEOUT)
        wait_until(lambda: task.control.stop.is_set(), "the job of a dropped call to stop")
        assert guard.client_gone(session, since=-1e9)
    finally:
        caller.join(TIMEOUT)
        close(fake)
