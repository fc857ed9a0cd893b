"""download_file against a local HTTP server: success, HTTP errors, short bodies, stalls."""

from __future__ import annotations

import io
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from modules import model_downloader

BODY = bytes(range(256)) * 4096 * 3  # 3 MiB: several chunks
STALL_RELEASE_S = 10.0


class Handler(BaseHTTPRequestHandler):
    release: threading.Event

    def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
        pass

    def do_GET(self) -> None:
        if self.path == "/model.safetensors":
            self.send_response(200)
            self.send_header("Content-Length", str(len(BODY)))
            self.end_headers()
            self.wfile.write(BODY)
        elif self.path == "/short":
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"x" * 10)
            self.close_connection = True
        elif self.path == "/stall":
            self.send_response(200)
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.flush()
            self.release.wait(STALL_RELEASE_S)  # never sends the body within the client's timeout
        else:
            self.send_error(404)


@pytest.fixture
def http_base() -> Iterator[str]:
    release = threading.Event()
    handler = type("BoundHandler", (Handler,), {"release": release})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        release.set()
        server.shutdown()
        server.server_close()


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_download_writes_the_file_and_removes_the_part_file(http_base: str, tmp_path: Path) -> None:
    dest = tmp_path / "sub" / "model.safetensors"
    out = io.StringIO()
    assert model_downloader.download_file(f"{http_base}/model.safetensors", dest, timeout_s=5,
                                          progress_stream=out)
    assert dest.read_bytes() == BODY
    assert not Path(str(dest) + ".part").exists()
    assert "100.0%" in out.getvalue()  # the progress bar reached the end


def test_existing_file_is_kept(http_base: str, tmp_path: Path) -> None:
    dest = tmp_path / "model.safetensors"
    dest.write_bytes(b"mine")
    assert model_downloader.download_file(f"{http_base}/model.safetensors", dest, progress_stream=io.StringIO())
    assert dest.read_bytes() == b"mine"


@pytest.mark.parametrize("path", ["/missing", "/short"])
def test_failed_download_returns_false_and_leaves_nothing(http_base: str, tmp_path: Path, path: str) -> None:
    dest = tmp_path / "model.safetensors"
    assert not model_downloader.download_file(f"{http_base}{path}", dest, timeout_s=5, progress_stream=io.StringIO())
    assert list(tmp_path.iterdir()) == []


def test_stalled_server_fails_within_the_timeout(http_base: str, tmp_path: Path) -> None:
    dest = tmp_path / "model.safetensors"
    started = time.monotonic()
    assert not model_downloader.download_file(f"{http_base}/stall", dest, timeout_s=0.5,
                                              progress_stream=io.StringIO())
    assert time.monotonic() - started < STALL_RELEASE_S / 2
    assert list(tmp_path.iterdir()) == []


def test_unreachable_host_fails_fast(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{closed_port()}/model.safetensors"
    started = time.monotonic()
    assert not model_downloader.host_reachable(url, timeout_s=3)
    assert not model_downloader.download_file(url, tmp_path / "m.safetensors", progress_stream=io.StringIO())
    assert time.monotonic() - started < 6
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("url", ["not a url", "http://", "http://127.0.0.1:notaport/x"])
def test_malformed_urls_are_false_not_exceptions(url: str, tmp_path: Path) -> None:
    assert not model_downloader.host_reachable(url, timeout_s=1)
    assert not model_downloader.download_file(url, tmp_path / "m", timeout_s=1, progress_stream=io.StringIO())


def test_host_reachable_sees_a_listening_server(http_base: str) -> None:
    assert model_downloader.host_reachable(http_base + "/anything", timeout_s=3)


def test_default_checkpoint_source_is_the_upstream_default_model() -> None:
    src = model_downloader.DEFAULT_CHECKPOINT
    assert src.file_name == "juggernautXL_v8Rundiffusion.safetensors"
    assert src.url.startswith("https://huggingface.co/lllyasviel/fav_models/")
    assert src.url.endswith("/" + src.file_name)
