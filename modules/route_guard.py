"""Guards on the routes Gradio serves, installed as an ASGI middleware inside Gradio's app.

Gradio's own checks stop at "is someone logged in" (and `/cancel`, `/heartbeat` and
`/stream` check nothing). Under a login (--auth / auth.json) this adds who:

* A session hash belongs to the login that first used it (queue/join, run, call,
  heartbeat); another login naming it gets 403. Reading a session's results
  (`/queue/data`, `GET /call/<api>/<event id>`), cancelling its events (`/cancel`) and
  its heartbeat need its own login. An event id answered by `POST /call/<api>` is a
  session of the login that posted it.
* Files of the outputs and temp folders (the history log, every user's images, named
  by date, time and seed) are not served by Gradio's file route: clients get their own
  images through their session's results. With `shared_history_log` (a config key)
  every logged-in user may read them, and the page links the log.

With or without a login:

* The history log and its images are served at ``/history/<date>/log.html``, a path
  relative to the outputs folder (without a login, or with `shared_history_log`).
* A JSON body is read whole here and refused (413) past twice ``--max-upload-size``
  before Gradio parses it.
* Which sessions have a result stream open is recorded (`Presence`): `/generate` stops a
  job whose client went away (its stream dropped, or never opened). A call that skips
  the queue (`/run/<api>`) is present while its own connection is open; one that names
  no session gets a fresh one, so its job can tell.

Policy stays in `RouteGuard` (plain methods, testable without HTTP); `GuardMiddleware`
only reads requests and answers. Gradio's private queue is never touched.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

API_PREFIX = "/gradio_api"
MAX_SESSIONS = 20_000              # sessions remembered (owner, presence); the oldest are forgotten
READER_GRACE_S = 30.0              # a job whose client opens no result stream this long is stopped
MULTIPART_ROUTES = ("/upload", "/component_server", "/process_recording")   # Gradio limits these itself
DIRECT_ROUTES = ("/run/", "/api/")   # calls that skip the queue and answer on their own connection
BODY_LIMIT_FACTOR = 2              # a JSON body may be twice --max-upload-size (base64 adds a third)
DEFAULT_BODY_LIMIT = 100 * 2 ** 20


@dataclass(frozen=True)
class Refusal:
    status: int
    message: str


@dataclass(frozen=True)
class GuardedRequest:
    """What the guard decides on: one HTTP request to a Gradio route."""

    method: str
    route: str                      # below /gradio_api, e.g. "/queue/join"
    query: dict[str, str]
    body: dict[str, Any] | None     # a JSON object body, if any
    user: str | None                # the login, None when not logged in
    login: bool                     # the app has a login at all

    @property
    def session(self) -> str | None:
        """The session hash the request names (body, query or path)."""
        if self.route.startswith("/heartbeat/"):
            return self.route.removeprefix("/heartbeat/")
        if self.route == "/queue/data":
            return self.query.get("session_hash")
        value = (self.body or {}).get("session_hash")
        return value if isinstance(value, str) and value else None


class _Bounded(OrderedDict):
    """An insertion-ordered dict that forgets its oldest entries past `limit`."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def __setitem__(self, key: Any, value: Any) -> None:
        super().__setitem__(key, value)
        while len(self) > self.limit:
            self.popitem(last=False)


@dataclass
class Presence:
    """Open result streams per session, and when the last one closed (monotonic)."""

    open: dict[str, int] = field(default_factory=dict)
    closed_at: _Bounded = field(default_factory=lambda: _Bounded(MAX_SESSIONS))

    def opened(self, session: str) -> None:
        self.open[session] = self.open.get(session, 0) + 1

    def closed(self, session: str) -> None:
        left = self.open.get(session, 1) - 1
        if left > 0:
            self.open[session] = left
        else:
            self.open.pop(session, None)
        self.closed_at[session] = time.monotonic()

    def gone(self, session: str, since: float, grace_s: float) -> bool:
        """The client of a job submitted at `since` is gone: no stream of its session is
        open, and one closed after `since` (dropped: a job's own stream stays open until
        it completes) or none has been open for `grace_s`."""
        if self.open.get(session):
            return False
        closed = self.closed_at.get(session)
        return (closed is not None and closed > since) or time.monotonic() - since > grace_s


class RouteGuard:
    """Who may use which Gradio route (see the module docstring)."""

    def __init__(self, outputs: Path, temp: Path, shared_history: bool = False) -> None:
        self.outputs, self.temp, self.shared_history = Path(outputs), Path(temp), shared_history
        self.owners: _Bounded = _Bounded(MAX_SESSIONS)     # session hash -> login
        self.event_sessions: _Bounded = _Bounded(MAX_SESSIONS)   # POST /call event id -> its session
        self.presence = Presence()
        self.active = False            # set when the middleware is installed: presence is then known
        self._lock = threading.Lock()

    # -- sessions -----------------------------------------------------------------------

    def claim(self, session: str, user: str | None) -> bool:
        """Tie `session` to `user` if nobody has it; False when another login has it."""
        with self._lock:
            owner = self.owners.setdefault(session, user)
            return owner == user

    def session_of_event(self, event_id: str) -> str:
        return self.event_sessions.get(event_id, event_id)

    def note_event(self, event_id: str, session: str | None, user: str | None) -> None:
        """`POST /call` answered `event_id`: its results are read under `session`
        (the event id itself when the body named none)."""
        session = session or event_id
        with self._lock:
            self.event_sessions[event_id] = session
            self.owners.setdefault(session, user)

    # -- decisions ----------------------------------------------------------------------

    def refusal(self, request: GuardedRequest) -> Refusal | None:
        """None when `request` may go on to Gradio; claims the session it opens. Routes not
        named here are Gradio's to check (config, info, upload, startup-events...)."""
        route, session = request.route, request.session
        if route.startswith(("/file=", "/file/")):
            rule = "file"
        elif route.startswith("/stream/"):
            rule = "login"      # Gradio checks nothing there; this app streams no inputs
        elif route.startswith("/call/") and request.method == "GET":
            rule, session = "read", self.session_of_event(route.rsplit("/", 1)[-1])
        elif route in ("/queue/data", "/cancel"):
            rule = "read"
        elif route == "/queue/join" or route.startswith(("/heartbeat/", "/run/", "/api/", "/call/")):
            rule = "open"
        else:
            return None
        if not request.login:
            return None
        if request.user is None:
            return Refusal(401, "Not authenticated: log in first")
        if rule == "file":
            return self._file_refusal(route.partition("=")[2] if route.startswith("/file=") else route[6:])
        if rule == "login" or (rule == "open" and session is None):
            return None   # POST /call without a session: the event id it answers is claimed then
        return self._owned(session, request.user, claim=rule == "open")

    def _owned(self, session: str | None, user: str, claim: bool) -> Refusal | None:
        if session is None:
            return Refusal(400, "no session_hash given")
        if claim and self.claim(session, user):
            return None
        with self._lock:
            owner = self.owners.get(session)
        if owner == user:
            return None
        return Refusal(403, "this session belongs to another login")

    def _file_refusal(self, path: str) -> Refusal | None:
        """Outputs and temp files through Gradio's file route: only when the history is shared."""
        if self.shared_history or not self._in_output_folders(path):
            return None
        return Refusal(403, "output files are served to the login that made them, through its own results "
                            "(config key shared_history_log shares the history log with every login)")

    def _in_output_folders(self, path: str) -> bool:
        try:
            real = Path(os.path.realpath(path))
            return any(real.is_relative_to(os.path.realpath(f)) for f in (self.outputs, self.temp))
        except (OSError, ValueError):
            return False

    def history_file(self, relative: str, login: bool) -> Path | None:
        """The file /history/<relative> serves (under the outputs folder, symlinks resolved),
        or None: absent, outside, or a login without a shared history."""
        if login and not self.shared_history:
            return None
        root = Path(os.path.realpath(self.outputs))
        try:
            real = Path(os.path.realpath(root / relative.lstrip("/")))
        except (OSError, ValueError):
            return None
        return real if real.is_relative_to(root) and real.is_file() else None

    def history_shown(self, login: bool) -> bool:
        """Whether the page links the history log (who may read it)."""
        return not login or self.shared_history

    def client_gone(self, session: str | None, since: float) -> bool:
        """The client of a job submitted at `since` (monotonic) under `session` is gone."""
        return self.active and session is not None and self.presence.gone(session, since, READER_GRACE_S)


def client_key(username: str | None, host: str | None) -> str:
    """Who a job belongs to for the per-owner queue cap: the login, else the client's address."""
    return f"user:{username}" if username else f"ip:{host or 'unknown'}"


# -- the ASGI side -------------------------------------------------------------------------

def app_kwargs(guard: RouteGuard) -> dict[str, Any]:
    """What `Blocks.launch(app_kwargs=...)` (or `mount_gradio_app`) needs to install the guard
    inside the FastAPI app Gradio builds."""
    from starlette.middleware import Middleware

    return {"middleware": [Middleware(GuardMiddleware, guard=guard)]}


class GuardMiddleware:
    """Reads each request to a Gradio route, asks `RouteGuard`, answers a refusal or hands
    the request on (its body replayed); tracks result streams for `Presence`."""

    def __init__(self, app: Callable, guard: RouteGuard) -> None:
        self.app, self.guard = app, guard
        guard.active = True

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = _route(scope)
        gradio = scope.get("app")
        login = getattr(gradio, "auth", None) is not None or getattr(gradio, "auth_dependency", None) is not None
        if route.startswith("/history/") and scope["method"] in ("GET", "HEAD"):
            if login and await _user(gradio, scope) is None:
                return await _answer(send, Refusal(401, "Not authenticated: log in first"))
            return await self._history(scope, receive, send, route.removeprefix("/history/"), login)
        if not route.startswith(API_PREFIX + "/"):
            return await self.app(scope, receive, send)
        sub = route[len(API_PREFIX):]
        body: dict | None = None
        client_receive = receive
        direct = scope["method"] == "POST" and sub.startswith(DIRECT_ROUTES)
        if scope["method"] == "POST" and not sub.startswith(MULTIPART_ROUTES):
            raw = await _read_body(receive, _body_limit(gradio))
            if raw is None:
                return await _answer(send, Refusal(413, "request body too large (at most twice --max-upload-size)"))
            body = _json_object(raw)
            if direct and body is not None and not body.get("session_hash"):
                # A call that skips the queue answers on its own connection: a session of its
                # own lets the job see that connection go away.
                body["session_hash"] = uuid.uuid4().hex
                raw = json.dumps(body).encode()
            receive = _replay(raw)
        user = await _user(gradio, scope) if login else None
        request = GuardedRequest(scope["method"], sub, _query(scope), body, user, login)
        refusal = self.guard.refusal(request)
        if refusal is not None:
            return await _answer(send, refusal)
        if sub.startswith("/call/") and scope["method"] == "POST":
            send = self._noting_event(send, request)
        if direct and request.session is not None:
            return await self._direct(scope, receive, send, request.session, client_receive)
        session = (self.guard.session_of_event(sub.rsplit("/", 1)[-1]) if sub.startswith("/call/")
                   and scope["method"] == "GET" else request.session if sub == "/queue/data" else None)
        if session is None:
            return await self.app(scope, receive, send)
        await self._stream(scope, receive, send, session)

    def _noting_event(self, send: Callable, request: GuardedRequest) -> Callable:
        """Wrap `send` to read the event id `POST /call` answers before the client sees it."""
        chunks: list[bytes] = []

        async def noting(message: dict) -> None:
            if message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
                if message.get("more_body"):
                    return
                answer = _json_object(b"".join(chunks))
                if answer and isinstance(answer.get("event_id"), str):
                    self.guard.note_event(answer["event_id"], request.session, request.user)
                message = {**message, "body": b"".join(chunks)}
            await send(message)
        return noting

    async def _stream(self, scope: dict, receive: Callable, send: Callable, session: str) -> None:
        presence = self.guard.presence
        presence.opened(session)
        try:
            await self.app(scope, receive, send)
        finally:
            presence.closed(session)

    async def _direct(self, scope: dict, receive: Callable, send: Callable, session: str,
                      client_receive: Callable) -> None:
        """A call answered on its own connection: present while it is open. Starlette does
        not cancel a handler whose client went away, so the disconnect is watched here."""
        presence = self.guard.presence
        presence.opened(session)
        closed = False

        async def watch() -> None:
            nonlocal closed
            while (await client_receive())["type"] != "http.disconnect":
                pass
            closed = True
            presence.closed(session)

        watcher = asyncio.ensure_future(watch())
        try:
            await self.app(scope, receive, send)
        finally:
            watcher.cancel()
            if not closed:
                presence.closed(session)

    async def _history(self, scope: dict, receive: Callable, send: Callable, relative: str, login: bool) -> None:
        from starlette.responses import FileResponse

        path = self.guard.history_file(relative, login)
        if path is None:
            return await _answer(send, Refusal(404, "not found"))
        await FileResponse(path)(scope, receive, send)


def _route(scope: dict) -> str:
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


def _query(scope: dict) -> dict[str, str]:
    values = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    return {k: v[0] for k, v in values.items() if v}


def _body_limit(gradio: Any) -> int:
    try:
        size = gradio.get_blocks().max_file_size
    except Exception:   # not launched through Blocks.launch: no upload limit known
        size = None
    return BODY_LIMIT_FACTOR * int(size) if size else DEFAULT_BODY_LIMIT


async def _read_body(receive: Callable, limit: int) -> bytes | None:
    """The whole body, or None as soon as it passes `limit` bytes."""
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] != "http.request":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body"):
            break
    return b"".join(chunks)


def _replay(raw: bytes) -> Callable:
    sent = False

    async def receive() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": raw, "more_body": False}
        return {"type": "http.disconnect"}
    return receive


def _json_object(raw: bytes) -> dict | None:
    try:
        value = json.loads(raw) if raw else None
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


async def _user(gradio: Any, scope: dict) -> str | None:
    """The login of a request, as Gradio's own `get_current_user` finds it."""
    from starlette.requests import Request

    request = Request(scope)
    dependency = getattr(gradio, "auth_dependency", None)
    if dependency is not None:
        user = dependency(request)
        return await user if inspect.isawaitable(user) else user
    cookie = getattr(gradio, "cookie_id", "")
    token = request.cookies.get(f"access-token-{cookie}") or request.cookies.get(f"access-token-unsecure-{cookie}")
    return getattr(gradio, "tokens", {}).get(token)


async def _answer(send: Callable, refusal: Refusal) -> None:
    body = json.dumps({"detail": refusal.message}).encode()
    await send({"type": "http.response.start", "status": refusal.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
