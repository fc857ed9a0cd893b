"""Image files: encode (PNG, JPEG, WebP) with the generation parameters readable back,
and commit each file whole or not at all.

Metadata goes where upstream Fooocus puts it (its private_logger and meta_parser): in a
PNG the text chunks ``parameters`` (the text of modules/parameters.py's scheme) and
``fooocus_scheme`` ("fooocus" or "a1111"); in a JPEG or WebP the EXIF UserComment
(0x9286, written as ASCII text, as upstream does: JSON escapes keep every character of
the fooocus scheme, non-ASCII characters of an a1111 text become "?") and MakerNote
(0x927C, the scheme). ``read_metadata`` reads those, AUTOMATIC1111's UserComment in the
Exif sub-IFD (with its character-code prefix) and this project's earlier files (EXIF
ImageDescription).

Encoder choice (measured on this project's 2-core CPU, 1024x1024 RGB, best of 5, see
docs/BENCHMARKS.md): Pillow PNG level 1 ~1100 ms, Pillow level 0 ~500 ms, OpenCV
level 0 ~300 ms, pyvips level 0 ~60 ms, fpng ~35 ms (files ~10 % larger than zlib
level 1). fpng (`fpng` on PyPI, MIT, a small nanobind wrapper of Rich Geldreich's
single-file encoder) is used for PNG; it has one maintainer, so it is optional: without
it, Pillow writes the PNG. fpng writes no text chunks, so the parameters are inserted
as standard tEXt chunks (iTXt for text beyond Latin-1) after IHDR (any PNG reader sees
them, Pillow as `.text`). JPEG (libjpeg-turbo) and WebP go through Pillow.

Commit: the bytes go to a hidden temporary file in the target folder, created exclusively
under a random name (nothing planted at a name can be written through), are flushed and
then linked to the final name (link refuses to replace a file, so two images of the
same second never overwrite each other) and the temporary name removed. A process
killed at any moment leaves either no file or a whole one under a visible name.
"""

from __future__ import annotations

import io
import itertools
import logging
import math
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
EXIF_IMAGE_DESCRIPTION = 0x010E   # where this project's earlier files kept their parameters
EXIF_SOFTWARE = 0x0131
EXIF_USER_COMMENT = 0x9286
EXIF_MAKER_NOTE = 0x927C
EXIF_IFD = 0x8769
SOFTWARE = "Fooocus-Resident"
JPEG_QUALITY = 95
WEBP_QUALITY = 90
JPEG_EXIF_ROOM = 60_000   # a JPEG's EXIF segment holds at most 64 KB
SCHEMES = ("fooocus", "a1111")


@dataclass(frozen=True)
class Metadata:
    """What a file carries: the parameters' text and the scheme it is written in."""

    text: str
    scheme: str = "fooocus"

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


def _text_chunk(key: str, value: str) -> bytes:
    """tEXt (Latin-1) when the text allows it, else iTXt (UTF-8), as Pillow chooses."""
    try:
        return _png_chunk(b"tEXt", key.encode("latin-1") + b"\0" + value.encode("latin-1"))
    except UnicodeEncodeError:
        # keyword, no compression (flag, method), empty language tag and translated keyword
        return _png_chunk(b"iTXt", key.encode("latin-1") + b"\0\0\0\0\0" + value.encode("utf-8"))


def _with_text(png: bytes, text: dict[str, str]) -> bytes:
    """Text chunks right after IHDR."""
    ihdr_end = 8 + 8 + 13 + 4   # signature, IHDR length+type, IHDR data, CRC
    chunks = b"".join(_text_chunk(k, v) for k, v in text.items())
    return png[:ihdr_end] + chunks + png[ihdr_end:]


def metadata_room(fmt: str) -> int | None:
    """The longest metadata text a file of `fmt` holds (None: no limit that matters)."""
    return JPEG_EXIF_ROOM if fmt == "jpeg" else None


def encode(pixels: np.ndarray, fmt: str, metadata: Metadata | None) -> bytes:
    """HxWx3 uint8 -> file bytes in `fmt`, with `metadata` unless None."""
    if fmt == "png":
        meta = {} if metadata is None else {"parameters": metadata.text, "fooocus_scheme": metadata.scheme,
                                            "software": SOFTWARE}
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
    if metadata is not None:
        exif[EXIF_USER_COMMENT] = metadata.text
        exif[EXIF_SOFTWARE] = SOFTWARE
        exif[EXIF_MAKER_NOTE] = metadata.scheme
    buffer = io.BytesIO()
    options = {"quality": JPEG_QUALITY} if fmt == "jpeg" else {"quality": WEBP_QUALITY, "method": 0}
    Image.fromarray(pixels).save(buffer, fmt.upper(), exif=exif.tobytes(), **options)
    return buffer.getvalue()


def _exif_text(value) -> str | None:
    """An EXIF text: str as Pillow gives it, or UserComment bytes with their 8-byte
    character-code prefix (UNICODE is UTF-16, big-endian unless a BOM says otherwise)."""
    if value is None or isinstance(value, str):
        return value
    data = bytes(value)
    if data.startswith(b"UNICODE\0"):
        body = data[8:]
        if body[:2] in (b"\xff\xfe", b"\xfe\xff"):
            return body.decode("utf-16", errors="replace")
        little = len(body) > 1 and body[1:2] == b"\0" and body[0:1] != b"\0"
        return body.decode("utf-16-le" if little else "utf-16-be", errors="replace")
    if data[:8] in (b"ASCII\0\0\0", b"\0" * 8):
        data = data[8:]
    return data.decode("utf-8", errors="replace").rstrip("\0")


def read_metadata(source: bytes | str | os.PathLike | Image.Image) -> tuple[str | None, str | None]:
    """(parameters text, scheme or None) of an image file (bytes, path or opened image);
    (None, None) when it carries none."""
    image = Image.open(io.BytesIO(source)) if isinstance(source, (bytes, bytearray)) else (
        source if isinstance(source, Image.Image) else Image.open(source))
    try:
        image.load()
        info = image.info or {}
        text, scheme = info.get("parameters"), info.get("fooocus_scheme")
        if text is None:
            exif = image.getexif()
            sub = exif.get_ifd(EXIF_IFD)
            text = _exif_text(exif.get(EXIF_USER_COMMENT) or sub.get(EXIF_USER_COMMENT))
            scheme = _exif_text(exif.get(EXIF_MAKER_NOTE) or sub.get(EXIF_MAKER_NOTE))
            if not text:
                text, scheme = _exif_text(exif.get(EXIF_IMAGE_DESCRIPTION)), None
    finally:
        if image is not source:
            image.close()
    text = text.decode("utf-8", errors="replace") if isinstance(text, bytes) else text
    return (text or None), (scheme if scheme in SCHEMES else None)


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


def save(pixels: np.ndarray, metadata: Metadata | None, fmt: str, folder: Path, fallback: Path,
         stem: str) -> SavedImage:
    """Encode and commit into `folder`; when that folder cannot be written, into
    `fallback` with a warning (the image is never thrown away)."""
    data = encode(pixels, fmt, metadata)
    try:
        return SavedImage(commit(data, folder, stem, EXTENSIONS[fmt]))
    except OSError as error:
        if folder == fallback:
            raise
        warning = (f"could not write to the output folder ({error.strerror or type(error).__name__}); "
                   f"the image was saved to the temporary folder instead")
        log.warning("%s: %s", folder, warning)
        return SavedImage(commit(data, fallback, stem, EXTENSIONS[fmt]), warning)


def grid_shape(count: int) -> tuple[int, int]:
    """(rows, columns) of a grid of `count` images, as upstream's image wall lays them out:
    as many columns as the square root rounded up, then as many rows as that needs."""
    columns = math.ceil(math.sqrt(count))
    return math.ceil(count / columns), columns


def grid(images: list[np.ndarray]) -> np.ndarray | None:
    """The HxWx3 images side by side, row by row, empty cells black; None (no grid, as
    upstream) for fewer than two images or images of different sizes."""
    if len(images) < 2 or any(image.ndim != 3 or image.shape != images[0].shape for image in images):
        return None
    rows, columns = grid_shape(len(images))
    height, width, channels = images[0].shape
    wall = np.zeros((rows * height, columns * width, channels), dtype=np.uint8)
    for index, image in enumerate(images):
        row, column = divmod(index, columns)
        wall[row * height:(row + 1) * height, column * width:(column + 1) * width] = image
    return wall
