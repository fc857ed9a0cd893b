"""Plain (Gradio-free) helpers behind the page's Styles tab, preset dropdown,
history-log link and "load parameters" box; modules/webui.py wires them to controls.

Every function returns plain values, so they are tested without a browser.
"""

from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import Any, Callable, Sequence

from modules import config as config_module
from modules import history_log, parameters, presets, sdxl_styles


def style_names(cfg: config_module.Config) -> list[str]:
    """Every style the styles folders offer (Fooocus V2 and Random Style first)."""
    return sdxl_styles.style_names(cfg.path_styles)


def filtered_styles(query: str, selected: list[str] | None, cfg: config_module.Config) -> list[str]:
    """The choices the Styles tab shows: the selected styles first, in the order they were
    chosen (so a search never drops a selection), then the matches of the search."""
    selected = list(selected or [])
    matches = sdxl_styles.search(style_names(cfg), query or "")
    return selected + [name for name in matches if name not in selected]


def default_styles(cfg: config_module.Config) -> list[str]:
    """The styles ticked when the page opens: the config's (or --preset's) default styles that
    exist, without Fooocus V2 while its model is not there (every Generate would fail)."""
    names = style_names(cfg)
    chosen = [n for n in cfg.default_styles if n in names]
    return chosen if expansion_ready(cfg) else [n for n in chosen if n != sdxl_styles.FOOOCUS_V2]


def file_url(path: str | os.PathLike) -> str:
    """The URL Gradio serves a file of an allowed folder at."""
    return f"/gradio_api/file={os.path.abspath(path)}"


def samples_folders(cfg: config_module.Config) -> list[str]:
    """Where hover previews may be served from: each styles folder's samples/."""
    return [str(Path(folder) / sdxl_styles.SAMPLES_FOLDER) for folder in cfg.path_styles]


def style_samples_html(cfg: config_module.Config) -> str:
    """The styles that have a preview picture (samples/<name>.jpg, as upstream names them)
    and its URL, as data for the page's hover preview."""
    library = sdxl_styles.get_library(cfg.path_styles)
    samples = {name: file_url(path) for name in library.names() if (path := library.sample(name)) is not None}
    return f'<div id="fr-style-samples" hidden data-samples="{html.escape(json.dumps(samples), quote=True)}"></div>'


def expansion_ready(cfg: config_module.Config) -> bool:
    """Whether Fooocus V2 can run: its model folder is complete, or only the weights are
    missing and may be downloaded."""
    from modules import expansion
    missing = expansion.missing_files(Path(cfg.path_fooocus_expansion))
    return not missing or (cfg.downloads and all(m.startswith(expansion.WEIGHT_FILES[0]) for m in missing))


def preset_fields(name: str, on_progress: Callable[[str, int, int | None], None] | None = None,
                  samplers: Sequence[str] | None = None, schedulers: Sequence[str] | None = None
                  ) -> tuple[dict[str, Any], str]:
    """The request fields a preset sets (its values over config.txt), for the page's controls,
    and the note the page shows. The preset's model files are downloaded first when
    downloads are allowed. A value the page cannot take (Fooocus V2 without its model, a
    sampler or scheduler the sampling code lacks) is left out and the note says so."""
    cfg = config_module.with_preset(name)
    notes = [f"Preset {name} applied."]
    if cfg.downloads and presets.missing_downloads(cfg):
        notes += presets.download_models(cfg, on_progress)
        cfg = config_module.with_preset(name)   # a fetched default model replaces an older fallback
    fields = parameters.from_config(cfg)
    if sdxl_styles.FOOOCUS_V2 in fields["styles"] and not expansion_ready(cfg):
        fields["styles"] = [s for s in fields["styles"] if s != sdxl_styles.FOOOCUS_V2]
        notes.append(f"Fooocus V2 is left out: its prompt-expansion model is not in {cfg.path_fooocus_expansion}.")
    notes += unavailable(fields, samplers, schedulers)
    return fields, " ".join(notes)


def unavailable(fields: dict[str, Any], samplers: Sequence[str] | None, schedulers: Sequence[str] | None) -> list[str]:
    """Drop a sampler or scheduler the sampling code lacks from `fields` (the page keeps its
    current one); one note for each."""
    notes = []
    for key, known in (("sampler", samplers), ("scheduler", schedulers)):
        if known is not None and key in fields and fields[key] not in known:
            notes.append(f"The {key} {fields.pop(key)!r} is not available here yet; the current one is kept.")
    return notes


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
    """Request fields from an uploaded image's metadata (either scheme, any format), else
    from pasted parameters (JSON, or a1111 text). Raises parameters.ParameterError saying
    what is wrong."""
    if image_path:
        return parameters.read_parameters(image_path)
    if pasted and pasted.strip():
        return parameters.parse_metadata(pasted, None, source="pasted parameters")
    raise parameters.ParameterError("upload an image or paste parameters (JSON or a1111 text) first")
