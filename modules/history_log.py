"""The history log: ``outputs/<date>/log.html``, one entry per saved image.

Entries are appended as each image is written; the file is never rewritten, so
a crash or a second process can at worst leave the last entry short, never lose
earlier ones. The file is valid HTML at every moment: the head is written when
the file is created, and an HTML document may end without its ``</body>`` and
``</html>`` end tags, so each entry is simply added at the end.

Each entry shows the image, its file name and its parameters, and carries the
parameters as JSON (the page loads them back from there, or from the image's
metadata).
"""

from __future__ import annotations

import datetime
import html
import json
import os
import threading
from typing import Any

LOG_NAME = "log.html"

_HEAD = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Fooocus-Resident log {day}</title>
<style>
body {{ font-family: sans-serif; background: #1f1f24; color: #e8e8ec; margin: 1em; }}
.entry {{ display: flex; gap: 1em; padding: 0.8em 0; border-bottom: 1px solid #3a3a44; }}
.entry img {{ max-width: 256px; max-height: 256px; border-radius: 6px; }}
table {{ border-collapse: collapse; font-size: 0.85em; }}
td {{ padding: 0.15em 0.6em; vertical-align: top; }}
td.key {{ color: #9da3b4; white-space: nowrap; }}
pre {{ white-space: pre-wrap; word-break: break-all; font-size: 0.8em; }}
</style>
</head>
<body>
<h1>Fooocus-Resident log {day}</h1>
"""

_lock = threading.Lock()


def _value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str)


def render_entry(image_path: str, parameters: dict, when: datetime.datetime | None = None) -> str:
    """One image's entry: thumbnail (linked), file name, time, parameter table and JSON."""
    name = os.path.basename(image_path)
    when = when or datetime.datetime.now()
    rows = "".join(f'<tr><td class="key">{html.escape(str(k))}</td><td>{html.escape(_value(v))}</td></tr>'
                   for k, v in parameters.items())
    data = html.escape(json.dumps(parameters, default=str), quote=True)
    ref = html.escape(name, quote=True)
    return (f'<div class="entry" id="{ref}">'
            f'<a href="{ref}"><img src="{ref}" alt="{ref}" loading="lazy"></a>'
            f'<div><p><b>{html.escape(name)}</b> {when.strftime("%H:%M:%S")}</p>'
            f'<table>{rows}</table>'
            f'<details><summary>parameters (JSON)</summary><pre class="parameters">{data}</pre></details>'
            f'</div></div>\n')


def append(folder: str, image_path: str, parameters: dict) -> str:
    """Add `image_path`'s entry to `folder`/log.html (created with its head on first use);
    returns the log's path."""
    path = os.path.join(folder, LOG_NAME)
    entry = render_entry(image_path, parameters)
    day = os.path.basename(os.path.normpath(folder))
    with _lock:
        try:
            with _open_log(path, os.O_CREAT | os.O_EXCL) as new:
                new.write(_HEAD.format(day=html.escape(day)))
        except FileExistsError:
            pass
        with _open_log(path, 0) as log_file:
            log_file.write(entry)
    return path


def _open_log(path: str, extra_flags: int):
    """The log opened for appending, never through a symlink planted at its name (the
    server may run as root: a planted link would make it write anywhere)."""
    flags = os.O_WRONLY | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0) | extra_flags
    return open(os.open(path, flags, 0o666), "a", encoding="utf-8")


def log_path(outputs: str, day: datetime.date | None = None) -> str:
    """Where the log of `day` (today by default) is, under the outputs folder."""
    day = day or datetime.date.today()
    return os.path.join(outputs, day.strftime("%Y-%m-%d"), LOG_NAME)


def read_entries(path: str) -> list[dict]:
    """The parameters of every entry of a log, in order (from their JSON)."""
    import re
    text = open(path, encoding="utf-8").read()
    return [json.loads(html.unescape(m)) for m in re.findall(r'<pre class="parameters">(.*?)</pre>', text, re.S)]
