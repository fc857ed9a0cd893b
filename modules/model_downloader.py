"""Fetch model files over HTTP(S), never hanging and never raising.

``download_file`` writes to ``<dest>.part`` and renames it into place only
when the whole body has arrived, so a half-downloaded checkpoint never looks
like a model. Every network wait is bounded (connect and each read), and any
failure -- no network, HTTP error, short body, disk error -- returns False.
"""

from __future__ import annotations

import http.client
import logging
import os
import shutil
import socket
import sys
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Callable, TextIO

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
DEFAULT_TIMEOUT_S = 30.0
CONNECTIVITY_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class ModelSource:
    """A model file and where upstream Fooocus gets it."""

    file_name: str
    url: str


# The default preset's checkpoint of upstream Fooocus 2.5, from its Hugging Face mirror.
DEFAULT_CHECKPOINT = ModelSource(
    "juggernautXL_v8Rundiffusion.safetensors",
    "https://huggingface.co/lllyasviel/fav_models/resolve/main/fav/juggernautXL_v8Rundiffusion.safetensors",
)


def host_reachable(url: str, timeout_s: float = CONNECTIVITY_TIMEOUT_S) -> bool:
    """True when a TCP connection to the URL's host and port opens within ``timeout_s``.

    A cheap check before a download, so an offline machine fails in seconds.
    The name lookup is not covered by socket timeouts, so the whole attempt runs
    in a daemon thread and we wait for it at most ``timeout_s``.
    """
    parts = urllib.parse.urlsplit(url)
    if not parts.hostname:
        return False
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:  # a port that is not a number
        return False
    outcome: list[bool] = []
    finished = threading.Event()

    def attempt() -> None:
        try:
            with socket.create_connection((parts.hostname, port), timeout=timeout_s):
                outcome.append(True)
        except OSError:
            outcome.append(False)
        finally:
            finished.set()

    threading.Thread(target=attempt, name="connectivity-check", daemon=True).start()
    return finished.wait(timeout_s) and outcome == [True]


def _first_hop(url: str) -> str:
    """The URL whose host urllib will connect to: the proxy's, when one applies."""
    try:
        parts = urllib.parse.urlsplit(url)
        proxy = urllib.request.getproxies().get(parts.scheme)
        if proxy and parts.hostname and not urllib.request.proxy_bypass(parts.hostname):
            return proxy if "://" in proxy else f"http://{proxy}"
    except ValueError:
        pass
    return url


@dataclass
class _ProgressBar:
    total: int | None
    stream: TextIO
    width: int = 30
    last_print: float = 0.0
    done: int = 0

    def update(self, n: int, force: bool = False) -> None:
        self.done += n
        now = time.monotonic()
        if not force and now - self.last_print < 0.5:
            return
        self.last_print = now
        mib = self.done / 2 ** 20
        if self.total:
            frac = min(self.done / self.total, 1.0)
            filled = int(frac * self.width)
            bar = "#" * filled + "-" * (self.width - filled)
            line = f"\r[{bar}] {frac * 100:5.1f}% {mib:8.1f} / {self.total / 2 ** 20:.1f} MiB"
        else:
            line = f"\r{mib:8.1f} MiB"
        self.stream.write(line)
        self.stream.flush()

    def close(self) -> None:
        self.update(0, force=True)
        self.stream.write("\n")
        self.stream.flush()


def download_file(url: str, dest_path: str | os.PathLike[str], timeout_s: float = DEFAULT_TIMEOUT_S,
                  progress_stream: TextIO | None = None,
                  on_progress: Callable[[int, int | None], None] | None = None) -> bool:
    """Download ``url`` to ``dest_path``; True on success, False on any failure.

    A connectivity check (at most 3 s) runs first; then ``timeout_s`` bounds
    the connect and every single read (a stalled server fails after that long
    without data). With an HTTP(S) proxy configured in the environment the
    check goes to the proxy. An existing ``dest_path`` is left alone and
    counts as success. Progress goes to ``progress_stream`` (default stderr) and, when
    given, to ``on_progress(bytes so far, total bytes or None)`` (the page's bar).
    """
    dest = os.fspath(dest_path)
    if os.path.isfile(dest):
        return True
    part = dest + ".part"
    stream = progress_stream if progress_stream is not None else sys.stderr
    if not host_reachable(_first_hop(url), min(timeout_s, CONNECTIVITY_TIMEOUT_S)):
        log.warning("download of %s skipped: its host does not answer (offline?)", url)
        return False
    try:
        os.makedirs(os.path.dirname(os.path.abspath(dest)), exist_ok=True)
        request = urllib.request.Request(url, headers={"User-Agent": "Fooocus-Resident"})
        print(f"Downloading {url}\n  to {dest}", file=stream, flush=True)
        with urllib.request.urlopen(request, timeout=timeout_s) as response, open(part, "wb") as out:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            bar = _ProgressBar(total, stream)
            while True:
                chunk = response.read(CHUNK_BYTES)
                if not chunk:
                    break
                out.write(chunk)
                bar.update(len(chunk))
                if on_progress is not None:
                    on_progress(bar.done, total)
            bar.close()
        if total is not None and bar.done != total:
            raise OSError(f"incomplete download: {bar.done} of {total} bytes")
        shutil.move(part, dest)
        return True
    except (OSError, http.client.HTTPException, ValueError) as error:
        # URLError and socket timeouts are OSErrors; a cut-off body is an HTTPException;
        # ValueError covers malformed URLs.
        log.warning("download of %s failed: %s", url, error)
    except Exception as error:  # never let a download take the caller down
        log.warning("download of %s failed unexpectedly: %s: %s", url, type(error).__name__, error)
    try:
        os.remove(part)
    except OSError:
        pass
    return False
