"""Prompt styles in upstream Fooocus's ``sdxl_styles/*.json`` format, and the texts
each image's prompt becomes (upstream's rules for multi-line prompts, wildcards,
arrays, styles and "Random Style").

A style file is a JSON list of objects with ``name``, ``prompt`` (a template in
which ``{prompt}`` stands for the user's prompt) and ``negative_prompt``. Every
``*.json`` file of each styles folder (config key ``path_styles``, a list) is read,
so upstream's files can be dropped in next to ours, or its folder named in the list.
Names are shown the way upstream shows them ("sai-3d-model" is "SAI 3D Model") and
matched case-insensitively.

Order, as upstream: the folders in their listed order, each folder's files by name,
except upstream's own six style files (``UPSTREAM_FILES``), which are read last, in
upstream's order. A name defined again later takes the later template and keeps its
first place in the list. So with ``path_styles = ["sdxl_styles", "<Fooocus>/sdxl_styles"]``
an upstream install's templates win over ours for the names both have (our "Fooocus
Enhance", "Fooocus Sharp"... are our own templates under upstream's names, there so
that upstream's presets work on a fresh install).

The list offered is "Fooocus V2" (the prompt expansion, modules/expansion.py), then
"Random Style" (a file style drawn per image from the image's seed), then the file
styles. Files are re-read when one changes, so a new style file needs no restart.
A style's hover preview is ``samples/<name, lower case, spaces as _>.jpg`` in a
styles folder, as upstream names them.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import os
import random
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from modules import wildcards

log = logging.getLogger("fooocus_resident.styles")

FOOOCUS_V2 = "Fooocus V2"
RANDOM_STYLE = "Random Style"
PLACEHOLDER = "{prompt}"
# Upstream's own style files, read after every other file in this order (its sdxl_styles.py).
UPSTREAM_FILES = ("sdxl_styles_fooocus.json", "sdxl_styles_sai.json", "sdxl_styles_mre.json",
                  "sdxl_styles_twri.json", "sdxl_styles_diva.json", "sdxl_styles_marc_k3nt3l.json")
SAMPLES_FOLDER = "samples"


class StyleError(ValueError):
    """A style that cannot be used; the message names the style or the file."""


@dataclass(frozen=True)
class Style:
    name: str
    prompt: str
    negative_prompt: str
    source: str   # the file that defined it (the last one, when several did)


@dataclass
class StyleLibrary:
    """The styles of a set of folders, by display name (in list order)."""

    styles: dict[str, Style] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)   # unreadable file -> why
    folders: tuple[Path, ...] = ()

    def names(self) -> list[str]:
        """Every selectable name: Fooocus V2, Random Style, then the file styles (upstream's list)."""
        return [FOOOCUS_V2, RANDOM_STYLE, *(s.name for s in self.styles.values())]

    def find(self, name: str) -> Style | None:
        return self.styles.get(_fold(display_name(name)))

    def sample(self, name: str) -> Path | None:
        """The hover preview of `name`: samples/<name>.jpg in the folder of the file that
        defines it, else in any styles folder; None when there is none."""
        style = self.find(name)
        first = [Path(style.source).parent] if style is not None else []
        file_name = name.lower().replace(" ", "_") + ".jpg"
        for folder in (*first, *self.folders):
            path = Path(folder) / SAMPLES_FOLDER / file_name
            if path.is_file():
                return path
        return None


def display_name(raw: str) -> str:
    """Upstream's display form of a style name: dashes as spaces, each word capitalised,
    then "3d", "Sai", "Mre" and "(s" upper-cased wherever they occur."""
    words = raw.replace("-", " ").split(" ")
    shown = " ".join(w[:1].upper() + w[1:].lower() for w in words)
    for lower, upper in (("3d", "3D"), ("Sai", "SAI"), ("Mre", "MRE"), ("(s", "(S")):
        shown = shown.replace(lower, upper)
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
    """Every folder's ``*.json`` files (subfolders too) by name, upstream's own files last."""
    files = []
    for folder in folders:
        if folder.is_dir():
            found = [Path(root, name) for root, _, names in os.walk(folder, followlinks=True)
                     for name in names if name.lower().endswith(".json") and not name.startswith(".")]
            files += sorted(found, key=lambda p: p.relative_to(folder).as_posix().casefold())
    last = [p for name in UPSTREAM_FILES for p in files if p.name == name]
    return [p for p in files if p not in last] + last


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
    reserved = {_fold(FOOOCUS_V2), _fold(RANDOM_STYLE)}
    for path in _style_files(folders):
        try:
            styles = _parse_file(path)
        except StyleError as error:
            log.warning("[Fooocus-Resident] %s", error)
            library.skipped[str(path)] = str(error)
            continue
        for style in styles:
            key = _fold(style.name)
            if key not in reserved:
                library.styles[key] = style   # a later file's template wins; the place stays
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
    """Display names of every style (Fooocus V2 and Random Style first), for the page and the API."""
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
        if _fold(name) in (_fold(FOOOCUS_V2), _fold(RANDOM_STYLE)):
            shown = FOOOCUS_V2 if _fold(name) == _fold(FOOOCUS_V2) else RANDOM_STYLE
        else:
            style = library.find(name)
            if style is None:
                raise StyleError(_unknown_message(name, library))
            shown = style.name
        if shown not in wanted:
            wanted.append(shown)
    if RANDOM_STYLE in wanted and not library.styles:
        raise StyleError(f"style {RANDOM_STYLE!r} in field 'styles' needs at least one style file "
                         f"({_where(library)})")
    return wanted


def _where(library: StyleLibrary) -> str:
    return "read from " + (", ".join(str(f) for f in library.folders) or "(no styles folder configured)")


def _unknown_message(name: str, library: StyleLibrary) -> str:
    known = [s.name for s in library.styles.values()]
    close = difflib.get_close_matches(display_name(name), known, n=3, cutoff=0.6)
    message = f"unknown style {name!r} in field 'styles'"
    if close:
        message += f"; did you mean {', '.join(map(repr, close))}?"
    message += f" ({len(known) + 2} styles known, {_where(library)}"
    if library.skipped:
        message += "; skipped unreadable files: " + ", ".join(os.path.basename(p) for p in library.skipped)
    return message + ")"


# -- one image's texts --------------------------------------------------------------------

def tidy(text: str) -> str:
    """Upstream's clean-up of a prompt line: runs of spaces folded, commas, dots, spaces and
    line ends stripped at both ends."""
    while "  " in text:
        text = text.replace("  ", " ")
    return text.strip(",. \r\n")


def prompt_lines(text: str) -> list[str]:
    """A prompt's non-empty lines, tidied; [""] for an empty prompt. Line 1 is the prompt,
    the others are extra prompts encoded after it (upstream's multi-line prompts)."""
    return [line for line in (tidy(l) for l in text.splitlines()) if line] or [""]


@dataclass(frozen=True)
class ImageTexts:
    """What one image's prompt became (upstream's "task"): the texts the text encoders see,
    each encoded on its own and concatenated; the pooled outputs of the first `*_top_k`
    texts are summed (Fooocus V2's text, appended last, adds tokens but no pooled output)."""

    prompt: str                       # line 1 after wildcards and arrays
    negative_prompt: str
    extra_positive: tuple[str, ...]   # the other lines, after wildcards
    extra_negative: tuple[str, ...]
    styles: tuple[str, ...]           # the file styles applied, Random Style resolved
    positive: tuple[str, ...]
    negative: tuple[str, ...]
    positive_top_k: int
    negative_top_k: int
    expansion: str = ""

    @property
    def log_prompt(self) -> str:
        """The prompt as upstream records it: every line, wildcards and arrays resolved."""
        return "\n".join((self.prompt, *self.extra_positive))

    @property
    def log_negative_prompt(self) -> str:
        return "\n".join((self.negative_prompt, *self.extra_negative))

    def expanded(self, text: str) -> "ImageTexts":
        """With Fooocus V2's expansion of the prompt as the last positive text."""
        return dataclasses.replace(self, positive=(*self.positive, text), expansion=text)


@dataclass(frozen=True)
class PromptOptions:
    """A request's prompt settings, shared by its images."""

    prompt: str
    negative_prompt: str
    styles: tuple[str, ...]           # checked names (check_names), Fooocus V2 included
    library: StyleLibrary
    wildcards: wildcards.WildcardFolder
    wildcards_in_order: bool = False

    @property
    def expansion(self) -> bool:
        """Fooocus V2 asked for, on a prompt that is not empty (upstream skips it then)."""
        return FOOOCUS_V2 in self.styles and prompt_lines(self.prompt)[0] != ""


def image_texts(options: PromptOptions, seed: int, index: int) -> ImageTexts:
    """Image `index`'s texts, in upstream's order: random.Random(seed) draws the wildcards
    of the prompt, the negative prompt and the extra lines in that order, then Random
    Style picks; each style's template (split into lines) takes the prompt, the prompt
    itself goes first when no template had a ``{prompt}`` slot, the negative prompt
    follows the styles' negatives, then the extra lines; empty texts are dropped."""
    rng = random.Random(seed)
    in_order, folder = options.wildcards_in_order, options.wildcards

    def resolve(line: str) -> str:
        return wildcards.apply_wildcards(line, rng, index, in_order, folder)

    positives, negatives = prompt_lines(options.prompt), prompt_lines(options.negative_prompt)
    prompt = wildcards.apply_arrays(resolve(positives[0]), index)
    negative = resolve(negatives[0])
    extra_positive = tuple(resolve(line) for line in positives[1:])
    extra_negative = tuple(resolve(line) for line in negatives[1:])
    styles: list[str] = []
    positive: list[str] = []
    negative_texts: list[str] = []
    placed = False
    for name in options.styles:
        if name == FOOOCUS_V2:
            continue
        style = (rng.choice(list(options.library.styles.values())) if name == RANDOM_STYLE
                 else options.library.find(name))
        assert style is not None, name   # names were checked
        styles.append(style.name)
        placed = placed or PLACEHOLDER in style.prompt
        positive += style.prompt.replace(PLACEHOLDER, prompt).splitlines()
        negative_texts += style.negative_prompt.splitlines()
    if not placed:
        positive.insert(0, prompt)
    negative_texts.append(negative)
    positive = [t for t in (*positive, *extra_positive) if t != ""] or [prompt]
    negative_texts = [t for t in (*negative_texts, *extra_negative) if t != ""] or [negative]
    return ImageTexts(prompt=prompt, negative_prompt=negative, extra_positive=extra_positive,
                      extra_negative=extra_negative, styles=tuple(styles), positive=tuple(positive),
                      negative=tuple(negative_texts), positive_top_k=len(positive),
                      negative_top_k=len(negative_texts))
