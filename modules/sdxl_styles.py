"""Prompt styles in upstream Fooocus's ``sdxl_styles/*.json`` format.

A style file is a JSON list of objects with ``name``, ``prompt`` (a template in
which ``{prompt}`` stands for the user's prompt) and ``negative_prompt``. Every
``*.json`` file of each styles folder (config key ``path_styles``) is read, so
upstream's files can be dropped in next to ours. Names are matched the way
upstream's page shows them ("sai-3d-model" is offered as "SAI 3D Model"),
case-insensitively; the first folder, then the first file (by name), that
defines a name wins.

The folder is re-read when a file in it changes, so a new style file is usable
without a restart. "Fooocus V2" is not a file style: it is the prompt
expansion (modules/expansion.py), and is listed first.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

log = logging.getLogger("fooocus_resident.styles")

FOOOCUS_V2 = "Fooocus V2"
PLACEHOLDER = "{prompt}"


class StyleError(ValueError):
    """A style that cannot be used; the message names the style or the file."""


@dataclass(frozen=True)
class Style:
    name: str
    prompt: str
    negative_prompt: str
    source: str   # the file that defined it


@dataclass
class StyleLibrary:
    """The styles of a set of folders, by display name (in load order)."""

    styles: dict[str, Style] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)   # unreadable file -> why
    folders: tuple[Path, ...] = ()

    def names(self) -> list[str]:
        """Every selectable name, Fooocus V2 first (as upstream's list)."""
        return [FOOOCUS_V2, *(s.name for s in self.styles.values())]

    def find(self, name: str) -> Style | None:
        return self.styles.get(_fold(display_name(name)))  # type: ignore[arg-type]


def display_name(raw: str) -> str:
    """Upstream's display form of a style name: dashes as spaces, words capitalised,
    with "3D", "SAI", "MRE" and "(S" kept upper-case."""
    words = raw.replace("-", " ").split()
    shown = " ".join(w[:1].upper() + w[1:].lower() if w else w for w in words)
    for lower, upper in (("3d", "3D"), ("Sai", "SAI"), ("Mre", "MRE"), ("(s", "(S")):
        shown = " ".join(upper if w == lower else w for w in shown.split(" "))
    return shown


def _fold(name: str) -> str:
    return " ".join(name.split()).casefold()


def _parse_file(path: Path) -> list[Style]:
    """The styles of one file; raises StyleError naming the file and the entry."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise StyleError(f"style file {path} cannot be read as JSON: {error}") from None
    if not isinstance(data, list):
        raise StyleError(f"style file {path} must hold a JSON list of styles, got {type(data).__name__}")
    styles = []
    for index, entry in enumerate(data):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"].strip():
            raise StyleError(f"style file {path}, entry {index}: needs a 'name' string")
        for key in ("prompt", "negative_prompt"):
            if not isinstance(entry.get(key, ""), str):
                raise StyleError(f"style file {path}, style {entry['name']!r}: '{key}' must be a string")
        styles.append(Style(name=display_name(entry["name"].strip()), prompt=entry.get("prompt", ""),
                            negative_prompt=entry.get("negative_prompt", ""), source=str(path)))
    return styles


def _style_files(folders: Iterable[Path]) -> list[Path]:
    files = []
    for folder in folders:
        if folder.is_dir():
            files += sorted(p for p in folder.iterdir() if p.suffix.lower() == ".json" and p.is_file())
    return files


def _versions(files: Sequence[Path]) -> tuple:
    out = []
    for path in files:
        try:
            st = path.stat()
        except OSError:
            continue
        out.append((str(path), st.st_size, st.st_mtime_ns))
    return tuple(out)


def load_library(folders: Sequence[Path]) -> StyleLibrary:
    """Read every style file of `folders`. An unreadable file is skipped with a warning
    (and named when a requested style is not found); the others still load."""
    library = StyleLibrary(folders=tuple(folders))
    for path in _style_files(folders):
        try:
            styles = _parse_file(path)
        except StyleError as error:
            log.warning("[Fooocus-Resident] %s", error)
            library.skipped[str(path)] = str(error)
            continue
        for style in styles:
            key = _fold(style.name)
            if key != _fold(FOOOCUS_V2):
                library.styles.setdefault(key, style)
    return library


_lock = threading.Lock()
_cache: dict[tuple, StyleLibrary] = {}


def get_library(folders: Sequence[Path]) -> StyleLibrary:
    """The library of `folders`, re-read only when a style file was added, removed or changed."""
    folders = tuple(Path(f) for f in folders)
    key = (folders, _versions(_style_files(folders)))
    with _lock:
        library = _cache.get(key)
        if library is None:
            _cache.clear()
            library = _cache[key] = load_library(folders)
        return library


def style_names(folders: Sequence[Path]) -> list[str]:
    """Display names of every style (Fooocus V2 first), for the page and the API."""
    return get_library(folders).names()


def search(names: Sequence[str], query: str) -> list[str]:
    """The names containing every word of `query` (case-insensitive), in their order."""
    words = query.casefold().split()
    return [n for n in names if all(w in n.casefold() for w in words)]


def check_names(names: Sequence[str], library: StyleLibrary) -> list[str]:
    """The requested names in display form (duplicates dropped); an unknown name raises
    StyleError saying which, what is close, and where styles are read from."""
    wanted: list[str] = []
    for name in names:
        if _fold(name) == _fold(FOOOCUS_V2):
            shown = FOOOCUS_V2
        else:
            style = library.find(name)
            if style is None:
                raise StyleError(_unknown_message(name, library))
            shown = style.name
        if shown not in wanted:
            wanted.append(shown)
    return wanted


def _unknown_message(name: str, library: StyleLibrary) -> str:
    known = [s.name for s in library.styles.values()]
    close = difflib.get_close_matches(display_name(name), known, n=3, cutoff=0.6)
    where = ", ".join(str(f) for f in library.folders) or "(no styles folder configured)"
    message = f"unknown style {name!r} in field 'styles'"
    if close:
        message += f"; did you mean {', '.join(map(repr, close))}?"
    message += f" ({len(known) + 1} styles known, read from {where}"
    if library.skipped:
        message += "; skipped unreadable files: " + ", ".join(os.path.basename(p) for p in library.skipped)
    return message + ")"


@dataclass(frozen=True)
class StyledPrompt:
    """A prompt after styles: the positive and negative texts (in upstream's order) and
    whether Fooocus V2 expansion was asked for."""

    positive: list[str]
    negative: list[str]
    expansion: bool


def apply_styles(prompt: str, negative: str, names: Sequence[str], library: StyleLibrary) -> StyledPrompt:
    """Upstream's order: each file style's template with the prompt put in; the plain prompt
    first when no template had a ``{prompt}`` slot; the user's negative last. Multi-line
    templates give one text per line. Empty texts are dropped (the prompt stays)."""
    names = check_names(names, library)
    positive: list[str] = []
    negatives: list[str] = []
    placed = False
    for name in names:
        if name == FOOOCUS_V2:
            continue
        style = library.find(name)
        assert style is not None
        placed = placed or PLACEHOLDER in style.prompt
        positive += style.prompt.replace(PLACEHOLDER, prompt).splitlines()
        negatives += style.negative_prompt.splitlines()
    if not placed:
        positive = [prompt, *positive]
    negatives.append(negative)
    positive = [p.strip() for p in positive if p.strip()] or [prompt]
    negatives = [n.strip() for n in negatives if n.strip()]
    return StyledPrompt(positive=positive, negative=negatives, expansion=FOOOCUS_V2 in names)


def join(texts: Sequence[str]) -> str:
    """The texts as one prompt for the encoders (upstream encodes them one by one and
    concatenates; we join them, so long results use the 75-token windows)."""
    return ", ".join(t for t in texts if t)
