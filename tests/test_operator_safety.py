"""The operator-safety probe (issue 18) as a table, against one launch.py with a login.

Each row names the route or field and the refusal it must get: image fields naming
server files outside the folders the server owns (one message whether the file exists
or not), decompression bombs, numbers too big for a float, a field blamed on another,
the cost cap, and Gradio's own routes used without the login or for files that are not
the caller's. After the table the server still serves, and a reference request's pixels
are what they were before it. (One login can be given on the command line; a second
login's access is tested on the same guard in tests/test_route_guard.py.)
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.helpers.serving import DEMO_CHECKPOINT, LaunchedServer, launched

LOGIN = ("ann", "ann-secret")
REFERENCE = {"prompt": "a cat", "base_model": DEMO_CHECKPOINT, "width": 64, "height": 64, "steps": 2, "seed": 3}
REFUSED_PATH = "neither base64 image data nor an image file in a folder the server owns"
TIMEOUT = 120


def png(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    return buffer.getvalue()


def bomb_png(side: int) -> bytes:
    """A valid PNG header declaring side x side pixels over a one-row IDAT."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * (side * 3 + 1))) + chunk(b"IEND", b""))


class Probe:
    """The server, its folders, a file outside them, and one client per login."""

    def __init__(self, server: LaunchedServer, root: Path) -> None:
        from gradio_client import Client

        self.server, self.root = server, root
        self.secret = root / "elsewhere" / "secret.png"
        self.secret.parent.mkdir()
        self.secret.write_bytes(png(np.full((16, 16, 3), 200, np.uint8)))
        self.client = Client(server.url, auth=LOGIN, verbose=False, analytics_enabled=False,
                             download_files=str(root / "downloads"))
        self.reference = self.generate(REFERENCE)
        assert "error" not in self.reference[1], self.reference[1]

    def generate(self, request: dict) -> tuple[list[str], dict]:
        return self.client.predict(request, api_name="/generate")

    def http(self, logged_in: bool) -> httpx.Client:
        client = httpx.Client(base_url=self.server.url, timeout=TIMEOUT)
        if logged_in:
            assert client.post("login", data=dict(zip(("username", "password"), LOGIN))).status_code == 200
        return client

    def day(self) -> Path:
        return next(p for p in self.server.folders["path_outputs"].iterdir() if (p / "log.html").is_file())


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> Iterator[Probe]:
    root = tmp_path_factory.mktemp("operator_safety")
    with launched(root, ["--auth", ":".join(LOGIN), "--max-upload-size", "1"]) as server:
        yield Probe(server, root)


def vary(image: object) -> dict:
    return {**REFERENCE, "input_image": image, "uov_method": "Vary (Subtle)"}


def _outside(p: Probe) -> str:
    return str(p.secret)


# (row id, field at fault, request (from the probe), substrings the error must hold)
GENERATE_ROWS = [
    ("input_image_outside", "input_image", lambda p: vary(_outside(p)), [REFUSED_PATH]),
    ("input_image_missing", "input_image", lambda p: vary(str(p.root / "no_such.png")), [REFUSED_PATH]),
    ("input_image_server_config", "input_image", lambda p: vary(str(p.root / "config.json")), [REFUSED_PATH]),
    ("input_image_gradio_file_object", "input_image", lambda p: vary({"path": _outside(p)}), [REFUSED_PATH]),
    ("input_image_symlink_in_outputs", "input_image", lambda p: vary(_symlink(p)), [REFUSED_PATH]),
    ("inpaint_mask_outside", "inpaint_mask",
     lambda p: {**REFERENCE, "input_image": _png64(), "inpaint_mask": _outside(p)}, [REFUSED_PATH]),
    ("image_prompt_outside", "image_prompts[0]",
     lambda p: {**REFERENCE, "image_prompts": [[_outside(p), 0.5, 0.6, "ImagePrompt"]]}, [REFUSED_PATH]),
    ("input_image_bomb", "input_image", lambda p: vary(base64.b64encode(bomb_png(100_000)).decode()),
     ["refused before decoding"]),
    ("input_image_tiff", "input_image",
     lambda p: vary(base64.b64encode(png(np.zeros((16, 16, 3), np.uint8), "TIFF")).decode()), ["PNG, JPEG or WebP"]),
    ("guidance_10e400", "guidance_scale", lambda p: {**REFERENCE, "guidance_scale": 10 ** 400}, ["between 0.0 and 30.0"]),
    ("refiner_unknown", "refiner_model", lambda p: {**REFERENCE, "refiner_model": "nope"}, ["nope"]),
    ("cost_cap", "image_number", lambda p: {**REFERENCE, "width": 1152, "height": 896, "steps": 200,
                                            "image_number": 32}, ["max_megapixel_steps", "field 'steps'"]),
]


def _png64() -> str:
    return base64.b64encode(png(np.zeros((16, 16, 3), np.uint8))).decode()


def _symlink(p: Probe) -> str:
    link = p.server.folders["path_outputs"] / "planted.png"
    if not link.is_symlink():
        link.symlink_to(p.secret)
    return str(link)


@pytest.mark.parametrize("field, request_of, expected", [pytest.param(f, r, e, id=i) for i, f, r, e in GENERATE_ROWS])
def test_generate_refuses_naming_the_field(probe: Probe, field, request_of, expected) -> None:
    gallery, report = probe.generate(request_of(probe))
    error = report.get("error", "")
    assert gallery == [] and f"field '{field}'" in error, report
    assert all(part in error for part in expected), error
    assert "internal error" not in error and str(probe.root) not in error and len(error) < 600, error


def test_a_path_refusal_says_nothing_about_whether_the_file_exists(probe: Probe) -> None:
    errors = {probe.generate(request_of(probe))[1]["error"] for i, _, request_of, _ in GENERATE_ROWS
              if i.startswith("input_image_") and i not in ("input_image_bomb", "input_image_tiff")}
    assert len(errors) == 1, errors


def _ann_event(p: Probe) -> str:
    with contextlib.closing(p.http(logged_in=True)) as ann:
        return ann.post("gradio_api/call/generate", json={"data": [REFERENCE]}).json()["event_id"]


# (row id, route, logged in, the call (probe, client) -> response, expected status)
ROUTE_ROWS = [
    ("cancel_without_login", "POST /gradio_api/cancel", False,
     lambda p, c: c.post("gradio_api/cancel", json={"session_hash": p.client.session_hash, "fn_index": 0,
                                                    "event_id": "x"}), 401),
    ("heartbeat_without_login", "GET /gradio_api/heartbeat/<session>", False,
     lambda p, c: c.get(f"gradio_api/heartbeat/{p.client.session_hash}"), 401),
    ("queue_data_without_login", "GET /gradio_api/queue/data", False,
     lambda p, c: c.get("gradio_api/queue/data", params={"session_hash": p.client.session_hash}), 401),
    ("call_result_without_login", "GET /gradio_api/call/generate/<id>", False,
     lambda p, c: c.get(f"gradio_api/call/generate/{_ann_event(p)}"), 401),
    ("log_html_through_the_file_route", "GET /gradio_api/file=<outputs>/log.html", True,
     lambda p, c: c.get(f"gradio_api/file={p.day() / 'log.html'}"), 403),
    ("an_output_image_through_the_file_route", "GET /gradio_api/file=<outputs>/<image>", True,
     lambda p, c: c.get(f"gradio_api/file={next(p.day().glob('*.png'))}"), 403),
    ("history_not_shared", "GET /history/<day>/log.html", True,
     lambda p, c: c.get(f"history/{p.day().name}/log.html"), 404),
    ("body_past_twice_the_upload_limit", "POST /gradio_api/queue/join", True,
     lambda p, c: c.post("gradio_api/queue/join", content=b'{"data": ["' + b"x" * (2 * 2 ** 20 + 1) + b'"]}',
                         headers={"content-type": "application/json"}), 413),
]


@pytest.mark.parametrize("route, logged_in, call, status",
                         [pytest.param(r, u, c, s, id=i) for i, r, u, c, s in ROUTE_ROWS])
def test_gradio_routes_refuse_without_the_login_or_the_ownership(probe: Probe, route, logged_in, call, status) -> None:
    with contextlib.closing(probe.http(logged_in)) as client:
        response = call(probe, client)
    assert response.status_code == status, (route, response.status_code, response.text[:300])
    assert str(probe.root) not in response.text


def test_after_the_table_the_server_serves_the_same_pixels(probe: Probe) -> None:
    assert probe.server.process.poll() is None, probe.server.log()[-3000:]
    gallery, report = probe.generate(REFERENCE)
    assert "error" not in report, report
    before, after = (np.asarray(Image.open(g[0]).convert("RGB")) for g in (probe.reference[0], gallery))
    assert np.array_equal(before, after)
    assert str(probe.root) not in json.dumps(report)   # no server path in a report either
