"""Plain (Gradio-free) helpers behind the page's Styles tab, preset dropdown,
history-log link and "load parameters" box; modules/webui.py wires them to controls.

Every function returns plain values, so they are tested without a browser.
"""

from __future__ import annotations

import html
import os
from typing import Any

from modules import config as config_module
from modules import history_log, parameters, presets, sdxl_styles


def style_names(cfg: config_module.Config) -> list[str]:
    """Every style the styles folders offer (Fooocus V2 first)."""
    return sdxl_styles.style_names(cfg.path_styles)


def filtered_styles(query: str, selected: list[str] | None, cfg: config_module.Config) -> list[str]:
    """The choices the Styles tab shows for a search: the selected styles first (so a
    search never drops a selection), then the matches."""
    selected = list(selected or [])
    matches = sdxl_styles.search(style_names(cfg), query or "")
    return selected + [name for name in matches if name not in selected]


def preset_fields(name: str) -> dict[str, Any]:
    """The request fields a preset sets (its values over config.txt), for the page's controls."""
    return parameters.from_config(config_module.with_preset(name))


def preset_choices() -> list[str]:
    return presets.available()


HISTORY_ROUTE = "/history/"   # served by modules/route_guard.py from the outputs folder


def history_link_html(cfg: config_module.Config, shown: bool = True) -> str:
    """A link to today's history log (a path relative to the outputs folder, no server
    path); nothing when this page's login may not read the shared log."""
    if not shown:
        return ""
    outputs = str(cfg.path_outputs)
    relative = os.path.relpath(history_log.log_path(outputs), outputs).replace(os.sep, "/")
    href = html.escape(HISTORY_ROUTE + relative, quote=True)
    return (f'<a href="{href}" target="_blank" rel="noopener" id="fr-history-link">'
            f'History log</a>')


def loaded_fields(image_path: str | None, pasted: str | None) -> dict[str, Any]:
    """Request fields from an uploaded image's metadata, else from pasted JSON. Raises
    parameters.ParameterError saying what is wrong."""
    if image_path:
        return parameters.from_image(image_path)
    if pasted and pasted.strip():
        return parameters.from_json(pasted)
    raise parameters.ParameterError("upload an image or paste parameters (JSON) first")
