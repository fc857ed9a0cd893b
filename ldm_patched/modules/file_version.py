"""Which version of a model file is loaded, and reading it into private memory.

A loaded file must never be a live view of the file on disk: `cp new.safetensors
model.safetensors` (an in-place rewrite) or a truncation while the server runs
would otherwise change the weights under a running model, or kill the process
with SIGBUS when a page that no longer exists is touched. So tensors are read
with ordinary reads into memory this process owns (never `mmap`), and the
file's version is taken from the open descriptor, before and after reading: a
file that changed while it was being read is refused rather than half-used.

Peak host memory: tensors are read one at a time on demand (`SafetensorsReader.get`),
so loading a 7 GB checkpoint needs its weights once plus one tensor (a cast to
another dtype frees the read copy at once), not the file twice as reading the
whole file into `bytes` and then parsing it would.
"""

from __future__ import annotations

import json
import os
import stat
import struct
from dataclasses import dataclass
import torch

MAX_HEADER_BYTES = 100 * 1024 * 1024   # safetensors' own limit

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
}


class FileReadError(ValueError):
    """A model file that cannot be read as asked; `reason` says why (the caller names the file)."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{os.path.basename(path)}: {reason}")


@dataclass(frozen=True)
class FileVersion:
    """One version of a file: the same path rewritten (even keeping size and mtime,
    as `cp -p`, `rsync -t` or unzip do) or replaced by another file is another
    version, because the inode or the ctime (which no tool can set back) differ."""

    path: str
    size: int
    mtime_ns: int
    ctime_ns: int = 0
    device: int = 0
    inode: int = 0

    @staticmethod
    def from_stat(path: str, st: os.stat_result) -> "FileVersion":
        return FileVersion(os.path.abspath(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns,
                           st.st_dev, st.st_ino)

    @staticmethod
    def of(path: str) -> "FileVersion":
        """The version now on disk; FileReadError (naming the file) when it cannot be stat'ed."""
        try:
            st = os.stat(path)
        except OSError as error:
            raise FileReadError(path, f"cannot be read: {error.strerror or error}") from error
        if not stat.S_ISREG(st.st_mode):
            raise FileReadError(path, "not a regular file")
        return FileVersion.from_stat(path, st)

    @property
    def name(self) -> str:
        return os.path.basename(self.path)

    def same_path(self, other: "FileVersion") -> bool:
        return self.path == other.path


def _read_exact(fd: int, offset: int, length: int, into: memoryview, path: str) -> None:
    done = 0
    while done < length:
        got = os.preadv(fd, [into[done:]], offset + done)
        if got <= 0:
            raise FileReadError(path, f"truncated: expected {length} bytes at offset {offset}, got {done}")
        done += got


@dataclass
class _Entry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int


class SafetensorsReader:
    """A .safetensors file opened for reading into private memory.

    `shapes` and `metadata` come from the header; `get(key)` reads one tensor
    with pread into a fresh tensor. `check_unchanged()` raises if the file is
    not the version that was opened (call it after the last `get`).
    """

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        try:
            self.version = FileVersion.from_stat(self.path, os.fstat(self._fd))
            self._entries, self.metadata = self._parse_header()
        except BaseException:
            os.close(self._fd)
            raise
        self.shapes = {k: e.shape for k, e in self._entries.items()}

    def _parse_header(self) -> tuple[dict[str, _Entry], dict[str, str]]:
        size = self.version.size
        head = bytearray(8)
        _read_exact(self._fd, 0, 8, memoryview(head), self.path)
        (length,) = struct.unpack("<Q", head)
        if length > MAX_HEADER_BYTES or 8 + length > size:
            raise FileReadError(self.path, f"corrupt safetensors header (length {length}, file {size} bytes)")
        raw = bytearray(length)
        _read_exact(self._fd, 8, length, memoryview(raw), self.path)
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as error:
            raise FileReadError(self.path, f"corrupt safetensors header ({error})") from None
        if not isinstance(header, dict):
            raise FileReadError(self.path, "corrupt safetensors header (not a JSON object)")
        metadata = header.pop("__metadata__", None) or {}
        if not isinstance(metadata, dict):
            raise FileReadError(self.path, "corrupt safetensors header (__metadata__ is not an object)")
        data_size = size - 8 - length
        entries = {}
        for key, info in header.items():
            entries[key] = self._entry(key, info, data_size, 8 + length)
        return entries, {str(k): str(v) for k, v in metadata.items()}

    def _entry(self, key: str, info: object, data_size: int, base: int) -> _Entry:
        try:
            dtype = _DTYPES[info["dtype"]]   # type: ignore[index]
            shape = tuple(int(s) for s in info["shape"])   # type: ignore[index]
            begin, end = (int(x) for x in info["data_offsets"])   # type: ignore[index]
        except (KeyError, TypeError, ValueError) as error:
            raise FileReadError(self.path, f"corrupt safetensors header entry {key!r} ({error!r})") from None
        numel = 1
        for s in shape:
            if s < 0:
                raise FileReadError(self.path, f"tensor {key!r} has a negative dimension")
            numel *= s
        itemsize = torch.empty((), dtype=dtype).element_size()
        if not 0 <= begin <= end <= data_size or end - begin != numel * itemsize:
            raise FileReadError(self.path, f"tensor {key!r} lies outside the file or has the wrong size "
                                           f"(file truncated?)")
        return _Entry(dtype, shape, base + begin, base + end)

    def get(self, key: str) -> torch.Tensor:
        entry = self._entries[key]
        length = entry.end - entry.begin
        buffer = torch.empty(length, dtype=torch.uint8)
        if length:
            _read_exact(self._fd, entry.begin, length, memoryview(buffer.numpy()), self.path)
        return buffer.view(entry.dtype).reshape(entry.shape)

    def keys(self) -> list[str]:
        return list(self._entries)

    def dtype(self, key: str) -> torch.dtype:
        """A tensor's dtype, from the header (nothing read)."""
        return self._entries[key].dtype

    def check_unchanged(self) -> None:
        """Refuse a file that was rewritten while it was read (its tensors may mix two versions)."""
        now = FileVersion.from_stat(self.path, os.fstat(self._fd))
        if now != self.version:
            raise FileReadError(self.path, "the file changed on disk while it was being read; try again")

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> "SafetensorsReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_file(path: str) -> tuple[FileVersion, bytes]:
    """The whole file in private memory (a torch pickle, say), with the version read;
    FileReadError if it changed while being read."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        version = FileVersion.from_stat(path, os.fstat(fd))
        data = bytearray(version.size)
        _read_exact(fd, 0, version.size, memoryview(data), path)
        if FileVersion.from_stat(path, os.fstat(fd)) != version:
            raise FileReadError(path, "the file changed on disk while it was being read; try again")
        return version, bytes(data)
    finally:
        os.close(fd)


def read_safetensors(path: str) -> tuple[FileVersion, dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor of a .safetensors file in private memory, with the version read."""
    with SafetensorsReader(path) as reader:
        tensors = {k: reader.get(k) for k in reader.keys()}
        reader.check_unchanged()
        return reader.version, tensors, reader.metadata

