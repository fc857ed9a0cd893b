"""Image files: encode (PNG, JPEG, WebP) with the generation parameters readable back,
and commit each file whole or not at all.

Encoder choice (measured on this project's 2-core CPU, 1024x1024 RGB, best of 5, see
docs/BENCHMARKS.md): Pillow PNG level 1 ~1100 ms, Pillow level 0 ~500 ms, OpenCV
level 0 ~300 ms, pyvips level 0 ~60 ms, fpng ~35 ms (files ~10 % larger than zlib
level 1). fpng (`fpng` on PyPI, MIT, a small nanobind wrapper of Rich Geldreich's
single-file encoder) is used for PNG; it has one maintainer, so it is optional: without
it, Pillow writes the PNG. fpng writes no text chunks, so the parameters are inserted
as a standard tEXt chunk after IHDR (any PNG reader sees them, Pillow as `.text`).
JPEG (libjpeg-turbo) and WebP go through Pillow with the parameters as EXIF
ImageDescription (JSON, ASCII-escaped so no character is lost).

Commit: the bytes go to a hidden temporary file in the target folder, created exclusively
under a random name (nothing planted at a name can be written through), are flushed and
then linked to the final name (link refuses to replace a file, so two images of the
same second never overwrite each other) and the temporary name removed. A process
killed at any moment leaves either no file or a whole one under a visible name.
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import os
import secrets
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin

log = logging.getLogger("fooocus_resident.outputs")

EXTENSIONS = {"png": ".png", "jpeg": ".jpg", "webp": ".webp"}
EXIF_IMAGE_DESCRIPTION = 0x010E
EXIF_SOFTWARE = 0x0131
SOFTWARE = "Fooocus-Resident"
JPEG_QUALITY = 95
WEBP_QUALITY = 90
JPEG_EXIF_ROOM = 60_000

try:
    import fpng as _fpng
except Exception:   # not installed, or no wheel for this platform: Pillow writes PNGs
    _fpng = None


@dataclass(frozen=True)
class SavedImage:
    path: str
    warning: str | None = None   # set when the image went to the temp folder instead


def png_encoder() -> str:
    return "fpng" if _fpng is not None else "pillow"


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _with_text(png: bytes, text: dict[str, str]) -> bytes:
    """tEXt chunks (Latin-1 keyword and text) right after IHDR."""
    ihdr_end = 8 + 8 + 13 + 4   # signature, IHDR length+type, IHDR data, CRC
    chunks = b"".join(_png_chunk(b"tEXt", k.encode("latin-1") + b"\0" + v.encode("latin-1"))
                      for k, v in text.items())
    return png[:ihdr_end] + chunks + png[ihdr_end:]


def encode(pixels: np.ndarray, fmt: str, parameters: dict | None) -> bytes:
    """HxWx3 uint8 -> file bytes in `fmt`, with `parameters` (JSON) unless None."""
    # ensure_ascii: the JSON is plain ASCII, so Latin-1 PNG text and EXIF ASCII keep every character.
    text = None if parameters is None else json.dumps(parameters, default=str, ensure_ascii=True)
    if fmt == "png":
        meta = {} if text is None else {"parameters": text, "software": SOFTWARE}
        if _fpng is not None:
            return _with_text(bytes(_fpng.from_ndarray(np.ascontiguousarray(pixels))), meta)
        info = PngImagePlugin.PngInfo()
        for key, value in meta.items():
            info.add_text(key, value)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, "PNG", pnginfo=info, compress_level=1)
        return buffer.getvalue()
    if fmt not in EXTENSIONS:
        raise ValueError(f"unknown output format {fmt!r}; one of {', '.join(EXTENSIONS)}")
    exif = Image.Exif()
    if text is not None and fmt == "jpeg" and len(text) > JPEG_EXIF_ROOM:
        # A JPEG's EXIF segment holds at most 64 KB: very long prompts are left out.
        short = {k: v for k, v in (parameters or {}).items() if k not in ("prompt", "negative_prompt")}
        text = json.dumps({**short, "prompts_left_out": "too long for JPEG EXIF"}, default=str)
    if text is not None:
        exif[EXIF_IMAGE_DESCRIPTION] = text
        exif[EXIF_SOFTWARE] = SOFTWARE
    buffer = io.BytesIO()
    options = {"quality": JPEG_QUALITY} if fmt == "jpeg" else {"quality": WEBP_QUALITY, "method": 0}
    Image.fromarray(pixels).save(buffer, fmt.upper(), exif=exif.tobytes(), **options)
    return buffer.getvalue()


def read_parameters(path: str) -> dict | None:
    """The parameters a file was saved with (any of the three formats), or None."""
    with Image.open(path) as image:
        image.load()
        text = image.text.get("parameters") if hasattr(image, "text") else None
        if text is None:
            text = image.getexif().get(EXIF_IMAGE_DESCRIPTION)
    return None if text is None else json.loads(text)


def commit(data: bytes, folder: Path, stem: str, extension: str) -> str:
    """Write `data` as folder/stem[_n]extension, whole or not at all; returns the path."""
    folder.mkdir(parents=True, exist_ok=True)
    temp = _exclusive_temp(folder, stem)
    try:
        with open(temp.fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        for suffix in itertools.count():
            path = folder / (f"{stem}{extension}" if suffix == 0 else f"{stem}_{suffix}{extension}")
            try:
                os.link(temp.path, path)   # atomic, never replaces a file and never follows a symlink
                return str(path)
            except FileExistsError:
                continue
            except OSError:   # a file system without hard links: rename if the name is free
                if os.path.lexists(path):
                    continue
                os.replace(temp.path, path)
                return str(path)
    finally:
        if os.path.lexists(temp.path):
            os.unlink(temp.path)
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class _TempFile:
    fd: int
    path: Path


def _exclusive_temp(folder: Path, stem: str) -> _TempFile:
    """A new hidden file under a random name, created exclusively (O_EXCL, O_NOFOLLOW): a
    file or symlink planted in the folder beforehand is never opened or written through."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    while True:
        path = folder / f".{stem}.{secrets.token_hex(8)}.partial"
        try:
            return _TempFile(os.open(path, flags, 0o666), path)
        except FileExistsError:
            continue


def save(pixels: np.ndarray, parameters: dict, fmt: str, folder: Path, fallback: Path, stem: str,
         metadata: bool = True) -> SavedImage:
    """Encode and commit into `folder`; when that folder cannot be written, into
    `fallback` with a warning (the image is never thrown away)."""
    data = encode(pixels, fmt, parameters if metadata else None)
    try:
        return SavedImage(commit(data, folder, stem, EXTENSIONS[fmt]))
    except OSError as error:
        if folder == fallback:
            raise
        warning = (f"could not write to the output folder ({error.strerror or type(error).__name__}); "
                   f"the image was saved to the temporary folder instead")
        log.warning("%s: %s", folder, warning)
        return SavedImage(commit(data, fallback, stem, EXTENSIONS[fmt]), warning)
