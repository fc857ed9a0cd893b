"""Presets: ``presets/NAME.json`` files in upstream Fooocus's format.

A preset is a JSON object of config keys (``default_model``, ``default_loras``,
``default_cfg_scale``, ``default_sample_sharpness``, ``default_styles``...) laid
over config.txt: by ``--preset NAME`` at start, by a request's ``preset`` field,
or by the page's preset dropdown (no restart). Keys this project does not know
(upstream's ``default_enhance_checkbox``, ``default_inpaint_mask_model``...) are
accepted and ignored, with one log line per preset file version naming them.

This module finds and reads the files (modules/config.py parses the values) and
fetches a preset's model files (``checkpoint_downloads``, ``lora_downloads``,
``embeddings_downloads``, ``vae_downloads``) when downloads are allowed.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from pathlib import Path
from typing import Any, Callable, Iterable

log = logging.getLogger("fooocus_resident.presets")

PRESETS_DIR = Path(__file__).resolve().parent.parent / "presets"
_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_. -]*$")


class PresetError(ValueError):
    """A preset that cannot be used; the message names it and lists the presets there are."""


def available(folder: Path | None = None) -> list[str]:
    """Names of the presets in `folder` (default: the repo's presets/), sorted."""
    folder = Path(folder or PRESETS_DIR)
    if not folder.is_dir():
        return []
    return sorted(p.stem for p in folder.glob("*.json") if p.is_file() and not p.name.startswith("."))


def path_of(name: str, folder: Path | None = None) -> Path:
    """The file of preset `name`; a name that is not a plain file name, or has no file,
    raises PresetError listing the presets that exist."""
    folder = Path(folder or PRESETS_DIR)
    path = folder / f"{name}.json"
    if not isinstance(name, str) or not _NAME.match(name) or not path.is_file():
        names = available(folder)
        raise PresetError(f"unknown preset {name!r}; available presets: {', '.join(names) or '(none)'} "
                          f"(files NAME.json in {folder})")
    return path


_lock = threading.Lock()
_reported: set[tuple[str, int, int]] = set()


def read(name: str, known_keys: Iterable[str], folder: Path | None = None) -> tuple[dict[str, Any], Path]:
    """The preset's values for `known_keys` and its path. Unknown keys are dropped, logged
    once per version of the file."""
    path = path_of(name, folder)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PresetError(f"preset {path} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise PresetError(f"preset {path} must hold a JSON object, got {type(data).__name__}")
    known = set(known_keys)
    unknown = sorted(k for k in data if k not in known)
    if unknown:
        st = path.stat()
        version = (str(path), st.st_size, st.st_mtime_ns)
        with _lock:
            first = version not in _reported
            _reported.add(version)
        if first:
            log.info("[Fooocus-Resident] preset %s: ignoring keys this version does not use: %s",
                     name, ", ".join(unknown))
    return {k: v for k, v in data.items() if k in known}, path


# (config key of the downloads, config key of the folders they go to)
DOWNLOAD_KEYS = (("checkpoint_downloads", "path_checkpoints"), ("lora_downloads", "path_loras"),
                 ("embeddings_downloads", "path_embeddings"), ("vae_downloads", "path_vae"))


def missing_downloads(cfg) -> list[tuple[str, str, Path]]:
    """(file name, URL, destination) of each listed model file no folder of its kind holds.
    A preset whose default model fell back to one of its previous_default_models downloads
    no checkpoint (as upstream)."""
    out = []
    for key, folders_key in DOWNLOAD_KEYS:
        if key == "checkpoint_downloads" and cfg.default_model in cfg.previous_default_models:
            continue
        folders = getattr(cfg, folders_key)
        for name, url in getattr(cfg, key):
            if not any((Path(folder) / name).is_file() for folder in folders):
                out.append((name, url, Path(folders[0]) / name))
    return out


def download_models(cfg, on_progress: Callable[[str, int, int | None], None] | None = None) -> list[str]:
    """Fetch the missing model files a preset (or config.txt) lists, unless downloads are off
    (--disable-preset-download). Returns one message per file that could not be fetched.
    `on_progress(file name, bytes so far, total or None)` follows each download."""
    if not cfg.downloads:
        return []
    from modules import model_downloader

    failed = []
    for name, url, dest in missing_downloads(cfg):
        log.info("[Fooocus-Resident] downloading %s for the preset", name)
        report = None if on_progress is None else (lambda done, total, name=name: on_progress(name, done, total))
        if not model_downloader.download_file(url, dest, on_progress=report):
            failed.append(f"could not download {name} from {url}")
    return failed
