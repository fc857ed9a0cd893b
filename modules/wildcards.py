"""Wildcards and array prompts, with upstream Fooocus's rules.

Wildcards: ``__name__`` in a prompt line stands for a line of ``name.txt`` in the
wildcards folder (config key ``path_wildcards``; subfolders are searched too, a
file is known by its name without ``.txt``). Each image draws its own line with
``random.Random(image seed)``, one draw per placeholder in the order they appear,
or, with ``read_wildcards_in_order``, takes line ``image index mod line count``.
An inserted line may hold wildcards again; they are resolved in further rounds,
at most ``MAX_ROUNDS`` (upstream's 64), so a file that names itself stops there.
Empty lines do not count; a name with no file (or an empty one) stays in the text
as the plain word, with a warning.

Arrays: ``[[red, blue, green]]`` in the main prompt line chooses one of its
comma-separated items (taken as written, spaces included) per image: image i takes
combination ``i mod (product of the array lengths)``, the first array changing
fastest, so raising the image number walks through every combination.
"""

from __future__ import annotations

import functools
import logging
import os
import random
import re
import threading
from pathlib import Path

log = logging.getLogger("fooocus_resident.wildcards")

MAX_ROUNDS = 64
PLACEHOLDER = re.compile(r"__([\w-]+)__")
ARRAY = re.compile(r"\[\[(.*?)\]\]")


class WildcardFolder:
    """The ``.txt`` files of one folder, by name (listed once per request: make one per request);
    each file's lines are read once per version of the file."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    @functools.cached_property
    def files(self) -> dict[str, Path]:
        """name -> file. A name found twice: the one nearest the folder's top, then by path."""
        found: dict[str, Path] = {}
        if not self.folder.is_dir():
            return found
        paths = [Path(root, name) for root, _, names in os.walk(self.folder, followlinks=True)
                 for name in names if name.lower().endswith(".txt") and not name.startswith(".")]
        for path in sorted(paths, key=lambda p: (len(p.relative_to(self.folder).parts), p.as_posix())):
            found.setdefault(path.stem, path)
        return found

    def words(self, name: str) -> list[str]:
        """The non-empty lines of ``name.txt``; [] when there is no such file."""
        path = self.files.get(name)
        return [] if path is None else _lines(path)


_lock = threading.Lock()
_cache: dict[str, tuple[tuple[int, int], list[str]]] = {}


def _lines(path: Path) -> list[str]:
    try:
        st = path.stat()
        version = (st.st_size, st.st_mtime_ns)
        with _lock:
            cached = _cache.get(str(path))
        if cached is not None and cached[0] == version:
            return cached[1]
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line != ""]
    except (OSError, UnicodeDecodeError) as error:
        log.warning("[Wildcards] %s cannot be read: %s", path, error)
        return []
    with _lock:
        _cache[str(path)] = (version, lines)
    return lines


def apply_wildcards(text: str, rng: random.Random, index: int, in_order: bool, folder: WildcardFolder) -> str:
    """`text` with every ``__name__`` replaced (see the module docstring)."""
    for _ in range(MAX_ROUNDS):
        names = PLACEHOLDER.findall(text)
        if not names:
            return text
        for name in names:
            words = folder.words(name)
            if words:
                word = words[index % len(words)] if in_order else rng.choice(words)
            else:
                log.warning("[Wildcards] %s.txt is missing or empty in %s; using %r as a plain word",
                            name, folder.folder, name)
                word = name
            text = text.replace(f"__{name}__", word, 1)
    log.warning("[Wildcards] still unresolved after %d rounds (a wildcard that names itself?): %s",
                MAX_ROUNDS, text)
    return text


def apply_arrays(text: str, index: int) -> str:
    """`text` with each ``[[a, b, ...]]`` replaced by the item of combination `index`."""
    arrays = ARRAY.findall(text)
    if not arrays:
        return text
    options = [array.split(",") for array in arrays]
    combinations = 1
    for items in options:
        combinations *= len(items)
    rest = index % combinations
    for array, items in zip(arrays, options):
        rest, pick = divmod(rest, len(items))
        text = text.replace(f"[[{array}]]", items[pick], 1)
    return text
