"""The "Resident memory" panel and its two actions, without Gradio.

What the page and the ``/model_status`` / ``/free_memory`` endpoints show and
do about the model registry. The actions (``free_memory``, ``unload_model``)
touch the registry, so callers run them through ``Worker.call`` (on the worker
thread, between requests); rendering only reads a status snapshot that the
worker published, so it never iterates live registry structures.

Status keys are read with ``.get``: the registry's ``status()`` grows (a
``host`` section, per-device ledgers) and the panel must not break on a key it
does not know or that is not there yet.
"""

from __future__ import annotations

import html
from typing import Any

MB = 1024 ** 2
GB = 1024 ** 3
MODEL_COLUMNS = ("Checkpoint", "Part", "Device", "MB", "Placement", "LoRA set", "Last used")


# -- actions (call on the worker thread) ---------------------------------------------------

def _manager():
    from ldm_patched.modules import model_management
    return model_management.get_manager()


def _resident() -> list[tuple[str, int, Any]]:
    """(name, bytes, module) of each registered model; worker thread only."""
    return [(e.patcher.name, int(e.resident_bytes()), e.module) for e in list(_manager().loaded)]


def free_memory() -> dict:
    """Unload every model and free every cache tier (between requests none is in use);
    returns what was freed, on the device and host ledgers together."""
    before = _resident()
    freed = _manager().unload_all()
    after = {name for name, _, _ in _resident()}
    return {"unloaded": [name for name, _, _ in before if name not in after], "freed_bytes": freed}


def unload_model(name: str) -> dict:
    """Unload the registered model called ``name``; a clear error when there is none."""
    for entry_name, size, module in _resident():
        if entry_name == name:
            _manager().forget(module)
            return {"unloaded": [name], "freed_bytes": size}
    names = ", ".join(n for n, _, _ in _resident()) or "none"
    raise ValueError(f"no resident model named {name!r} (resident: {names})")


# -- reading a status snapshot -------------------------------------------------------------

def resident_names(status: dict) -> list[str]:
    return [str(m.get("name", "?")) for m in status.get("models") or [] if isinstance(m, dict)]


def summary_line(report: dict | None) -> str:
    """One line about a request's model management: '0 MB moved · 0 weights patched · 0.1 ms'
    (and the bytes streamed in, when some models were partially resident)."""
    if not report:
        return "No request yet"
    mm = report.get("model_management") or {}
    moved = (mm.get("bytes_to_device") or 0) + (mm.get("bytes_to_offload") or 0)
    ms = (report.get("timings_ms") or {}).get("model_management", 0) or 0
    streamed = mm.get("bytes_streamed") or 0
    return (f"{moved / MB:.0f} MB moved · {mm.get('weights_patched', 0)} weights patched · "
            f"{ms:.1f} ms" + (f" · {streamed / MB:.0f} MB streamed" if streamed else ""))


def warning_text(status: dict, report: dict | None) -> str | None:
    """Over budget or out of memory, in the last request or in the registry."""
    report = report or {}
    if "out of memory" in str(report.get("error", "")).lower():
        return f"Out of memory in the last request: {report['error']}"
    if (report.get("model_management") or {}).get("over_budget"):
        return "The last request's models did not fit in the budget: it ran the conservative way."
    budget, used = status.get("budget_bytes"), status.get("resident_bytes")
    if isinstance(budget, (int, float)) and isinstance(used, (int, float)) and budget and used > budget:
        return f"Resident models use {used / GB:.2f} GB, over the budget of {budget / GB:.2f} GB."
    return None


def _bar(label: str, used: Any, budget: Any) -> str:
    if not isinstance(used, (int, float)) or not isinstance(budget, (int, float)) or budget <= 0:
        return ""
    fraction = max(0.0, min(1.0, used / budget))
    over = " fr-over" if used > budget else ""
    return (f'<div class="fr-mem-row"><span class="fr-mem-label">{html.escape(label)}</span>'
            f'<div class="fr-mem-bar{over}" role="meter" aria-valuenow="{used}" aria-valuemax="{budget}">'
            f'<div style="width:{fraction * 100:.1f}%"></div></div>'
            f'<span class="fr-mem-nums">{used / GB:.2f} / {budget / GB:.2f} GB</span></div>')


def _host(status: dict) -> tuple[Any, Any]:
    host = status.get("host")
    if not isinstance(host, dict):
        return None, None
    used = host.get("used_bytes", host.get("resident_bytes"))
    return used, host.get("budget_bytes")


def _model_rows(status: dict) -> str:
    rows = []
    for model in status.get("models") or []:
        if not isinstance(model, dict):
            continue
        name = str(model.get("name", "?"))
        checkpoint, _, part = name.rpartition(":")
        sources = model.get("patch_sources")
        lora_text = (", ".join(f"{name} ({strength:g})" for name, strength in sources.items())
                     if isinstance(sources, dict) and sources
                     else f"{model.get('patched_keys', 0)} keys patched" if model.get("patched_keys")
                     else "none")
        cells = (checkpoint or name, part or "-", model.get("device", "?"),
                 f"{(model.get('bytes') or 0) / MB:.1f}", _placement_text(model), lora_text, model.get("last_used", "-"))
        # Each cell names its column: on a phone the page's CSS stacks a row's cells under their names.
        rows.append("<tr>" + "".join(f'<td data-label="{html.escape(column)}">{html.escape(str(cell))}</td>'
                                     for column, cell in zip(MODEL_COLUMNS, cells)) + "</tr>")
    if not rows:
        return '<p class="fr-mem-empty">No model is resident.</p>'
    head = "".join(f"<th>{html.escape(column)}</th>" for column in MODEL_COLUMNS)
    return f'<table class="fr-mem-table"><thead><tr>{head}</tr></thead><tbody>' + "".join(rows) + "</tbody></table>"


def _placement_text(model: dict) -> str:
    """'whole', or how much of a partially resident model stays and how much streams per step."""
    placement = model.get("placement", "whole")
    if placement == "whole":
        return "whole"
    resident, streamed = model.get("resident_bytes") or 0, model.get("streamed_bytes") or 0
    return (f"{placement}: {resident / MB:.1f} MB resident, {streamed / MB:.1f} MB streamed "
            f"({model.get('streamed_groups', 0)} layers)")


def _lora_rows(status: dict) -> str:
    files = status.get("lora_files")
    if isinstance(files, list) and files:
        items = "".join(f"<li>{html.escape(str(f.get('name', f)) if isinstance(f, dict) else str(f))}"
                        + (f" ({f['bytes'] / MB:.1f} MB)" if isinstance(f, dict) and "bytes" in f else "")
                        + "</li>" for f in files)
        return f'<div class="fr-mem-loras">Cached LoRA files:<ul>{items}</ul></div>'
    count = status.get("lora_files_cached")
    return f'<div class="fr-mem-loras">Cached LoRA files: {count if count is not None else 0}</div>'


def panel_html(status: dict, report: dict | None) -> str:
    """The whole panel as HTML (escaped), from a snapshot and the last request's report."""
    if status.get("error"):
        return f'<div class="fr-mem"><p class="fr-mem-warning">{html.escape(str(status["error"]))}</p></div>'
    host_used, host_budget = _host(status)
    warning = warning_text(status, report)
    return (
        '<div class="fr-mem">'
        f'<div class="fr-mem-head">Policy: <b>{html.escape(str(status.get("mode", "?")))}</b> · '
        f'Device: <b>{html.escape(str(status.get("device", "?")))}</b></div>'
        + _bar("Device", status.get("resident_bytes"), status.get("budget_bytes"))
        + _bar("Host", host_used, host_budget)
        + _model_rows(status) + _lora_rows(status)
        + f'<div class="fr-mem-summary">Last request: {html.escape(summary_line(report))}</div>'
        + (f'<p class="fr-mem-warning">⚠ {html.escape(warning)}</p>' if warning else "")
        + "</div>")
