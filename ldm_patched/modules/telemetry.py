"""Counters of what model management actually did: bytes moved, weights written.

The counters are bumped at the places where the work happens (the patcher when
it moves a module or writes a weight, the LoRA cache when it reads a file), and
a request reads the difference between two snapshots. One worker thread runs
requests, so a process-wide accumulator is enough.
"""

from __future__ import annotations

import dataclasses
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator


@dataclass
class MoveCounters:
    bytes_to_device: int = 0
    bytes_to_offload: int = 0
    models_loaded: int = 0
    models_unloaded: int = 0
    weights_patched: int = 0
    weights_restored: int = 0
    weights_from_variants: int = 0   # of weights_patched: copied from a kept merged variant, no merge
    lora_files_read: int = 0
    # Partial residency: weights brought onto the device for one forward (copies, dropped after).
    bytes_streamed: int = 0
    groups_streamed: int = 0
    management_seconds: float = 0.0

    def minus(self, earlier: "MoveCounters") -> "MoveCounters":
        return MoveCounters(**{f.name: getattr(self, f.name) - getattr(earlier, f.name)
                               for f in dataclasses.fields(self)})

    def plus(self, other: "MoveCounters") -> "MoveCounters":
        return MoveCounters(**{f.name: getattr(self, f.name) + getattr(other, f.name)
                               for f in dataclasses.fields(self)})

    def as_report(self) -> dict[str, int]:
        """The `model_management` block of the per-request report (DESIGN.md §4)."""
        return {f.name: int(getattr(self, f.name)) for f in dataclasses.fields(self)
                if f.name != "management_seconds"}


COUNTERS = MoveCounters()


def count(**amounts: int) -> None:
    for name, amount in amounts.items():
        setattr(COUNTERS, name, getattr(COUNTERS, name) + amount)


def snapshot() -> MoveCounters:
    return dataclasses.replace(COUNTERS)


@contextmanager
def management_timer() -> Iterator[None]:
    """Time spent deciding, moving and patching; nested timers count once."""
    if getattr(management_timer, "_depth", 0):
        yield
        return
    management_timer._depth = 1  # type: ignore[attr-defined]
    start = time.perf_counter()
    try:
        yield
    finally:
        COUNTERS.management_seconds += time.perf_counter() - start
        management_timer._depth = 0  # type: ignore[attr-defined]
