"""`--compile-unet`: the UNet forward through `torch.compile`, kept across requests.

Why it can stay valid in a resident process: dynamo lifts a module's parameters
into graph inputs and guards on their metadata (shape, dtype, device, strides),
not on their values, so a LoRA switch or a return to an earlier set changes no
guard and recompiles nothing; the compiled code reads the new values. Inductor's
`freezing` (which would bake weights into the graph as constants) stays off. The
timestep is passed as a tensor (a Python number would be specialised per step)
and shapes are static (`dynamic=False`: one graph per shape, no dynamic
recompile on the second shape). With CUDA graphs (mode "reduce-overhead") the
parameters are static inputs read at fixed addresses; our patcher writes LoRA
merges and restores in place (`param.data.copy_`), so a graph captured once per
shape is replayed after switches.

The patcher's `model` stays the plain module: model management moves and
patches it as before. This holder only keeps one compiled callable and, per
module identity, which input shapes it has compiled, so it can tell a first
compile (new module or new shape) from a recompilation (a compile at a shape
already compiled, e.g. after conservative mode moved the module to another
device: acceptable there, and counted).
"""

from __future__ import annotations

import logging
import time
import weakref
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

from ldm_patched.modules.model_patcher import is_streamed
from modules import freeu

log = logging.getLogger("fooocus_resident.compile")

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDAGRAPH_MODES = ("reduce-overhead", "max-autotune")
# Dynamo's cache is per code object: every UNet (base, refiner, other checkpoints) and
# every shape shares one forward. Its default limit (8) would silently fall back to eager.
RECOMPILE_LIMIT = 64


@dataclass(frozen=True)
class CompileSettings:
    """What `--compile-unet`, `--compile-backend` and `--compile-mode` ask for."""

    enabled: bool = False
    backend: str = "inductor"
    mode: str | None = None   # inductor only; None: "reduce-overhead" on CUDA, "default" elsewhere

    def resolved_mode(self, device: torch.device) -> str | None:
        """The inductor mode for a device (other backends take no mode)."""
        if self.backend != "inductor":
            return None
        if self.mode is not None:
            return self.mode
        return "reduce-overhead" if device.type == "cuda" else "default"


def settings_from_args(args: object) -> CompileSettings:
    """Flags -> settings (reads attributes, so it needs no import of args_manager)."""
    return CompileSettings(enabled=bool(getattr(args, "compile_unet", False)),
                           backend=getattr(args, "compile_backend", None) or "inductor",
                           mode=getattr(args, "compile_mode", None))


def check_backend(backend: str) -> None:
    """A clear error for a backend name torch does not know."""
    known = torch._dynamo.list_backends(exclude_tags=())
    if backend not in known:
        raise ValueError(f"--compile-backend {backend!r} is not a torch.compile backend; "
                         f"available: {', '.join(sorted(known))}")


def _unet_forward(unet: torch.nn.Module, sample: torch.Tensor, timestep: torch.Tensor,
                  encoder_hidden_states: torch.Tensor, text_embeds: torch.Tensor,
                  time_ids: torch.Tensor, down_residuals: list[torch.Tensor] | None = None,
                  mid_residual: torch.Tensor | None = None) -> torch.Tensor:
    """The one call that gets compiled; the module is an argument, so dynamo guards on
    its identity and every UNet gets its own entry under one compiled function. The
    residuals are a ControlNet's (modules/controlnet.py), added to the skip connections
    and the middle block; None without a control."""
    control = ({} if down_residuals is None else
               {"down_block_additional_residuals": down_residuals, "mid_block_additional_residual": mid_residual})
    return unet(sample, timestep, encoder_hidden_states=encoder_hidden_states,
                added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids}, return_dict=False,
                **control)[0]


def _shapes(value: torch.Tensor | list[torch.Tensor] | None) -> tuple:
    """What a compiled graph is specialised on, per input: shape and dtype (of each tensor of a list)."""
    if value is None:
        return ()
    if isinstance(value, torch.Tensor):
        return (tuple(value.shape), value.dtype)
    return tuple(_shapes(t) for t in value)


def _graphs_compiled() -> int:
    """Dynamo's process-wide count of graphs it has compiled (a graph break adds one)."""
    from torch._dynamo.utils import counters
    return int(counters["stats"]["unique_graphs"])


@dataclass
class _ModuleEntry:
    module: "weakref.ref[torch.nn.Module]"
    shapes: set = field(default_factory=set)   # input signatures compiled for this module
    failed: str | None = None                  # compile error: this module runs eager


class CompiledUNets:
    """The compiled UNet callable plus per-module bookkeeping; counters are cumulative,
    a request reads its share with `mark()` / `report_since()`."""

    def __init__(self, settings: CompileSettings | None = None) -> None:
        self.settings = settings or CompileSettings()
        self.counts: Counter = Counter()
        self._entries: dict[int, _ModuleEntry] = {}
        self._compiled: dict[str | None, Any] = {}   # resolved mode -> compiled function
        if self.settings.enabled:
            check_backend(self.settings.backend)
            limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
            torch._dynamo.config.recompile_limit = limit

    @property
    def enabled(self) -> bool:
        return self.settings.enabled

    def __call__(self, unet: torch.nn.Module, sample: torch.Tensor, timestep: torch.Tensor,
                 encoder_hidden_states: torch.Tensor, text_embeds: torch.Tensor,
                 time_ids: torch.Tensor, control: tuple[list[torch.Tensor], torch.Tensor] | None = None
                 ) -> torch.Tensor:
        """UNet noise prediction, compiled when enabled (eager otherwise, or after a compile error).
        `control`: (skip-connection residuals, middle-block residual) of ControlNets, or None."""
        inputs = (sample, timestep, encoder_hidden_states, text_embeds, time_ids, *(control or (None, None)))
        entry = self._entry(unet) if self.enabled else None
        if entry is not None and is_streamed(unet):
            # Streaming swaps weights in and out in hooks around each layer: that runs eager.
            self.counts["streamed_eager_calls"] += 1
            entry = None
        if entry is not None and freeu.active(unet):
            # FreeU's hooks are on for this request only: eager, so no compiled graph holds them.
            self.counts["freeu_eager_calls"] += 1
            entry = None
        if entry is None or entry.failed:
            self.counts["eager_calls"] += 1
            return _unet_forward(unet, *inputs)
        return self._call_compiled(unet, entry, inputs)

    def _call_compiled(self, unet: torch.nn.Module, entry: _ModuleEntry, inputs: tuple) -> torch.Tensor:
        mode = self.settings.resolved_mode(inputs[0].device)
        cudagraphs = mode in CUDAGRAPH_MODES and inputs[0].device.type == "cuda"
        signature = tuple(_shapes(t) for t in inputs)
        before, started = _graphs_compiled(), time.perf_counter()
        try:
            if cudagraphs:   # each call is a new inference step: earlier outputs may be reused
                torch.compiler.cudagraph_mark_step_begin()
            out = self._function(mode)(unet, *inputs)
        except torch.OutOfMemoryError:
            raise
        except Exception as error:  # a backend that cannot compile this model: run it eager
            if signature in entry.shapes:
                raise
            entry.failed = f"{type(error).__name__}: {error}"
            self.counts["fallbacks"] += 1
            log.error("[Fooocus-Resident] compiling the UNet failed, running it eager: %s", entry.failed)
            self.counts["eager_calls"] += 1
            return _unet_forward(unet, *inputs)
        graphs = _graphs_compiled() - before
        self.counts["compiled_calls"] += 1
        if graphs:
            self.counts["graphs_compiled"] += graphs
            self.counts["recompilations" if signature in entry.shapes else "first_compiles"] += graphs
            self.counts["compile_ms"] += (time.perf_counter() - started) * 1000
        entry.shapes.add(signature)
        # CUDA-graph outputs live in the graph's pool and the next replay overwrites them.
        return out.clone() if cudagraphs else out

    def _function(self, mode: str | None):
        function = self._compiled.get(mode)
        if function is None:
            options = {"mode": mode} if mode is not None else {}
            # dynamic=False: one static graph per shape (what CUDA graphs and inductor's
            # tuning want); a new size or batch compiles once, a weight change never.
            function = torch.compile(_unet_forward, backend=self.settings.backend, dynamic=False, **options)
            self._compiled[mode] = function
        return function

    def _entry(self, unet: torch.nn.Module) -> _ModuleEntry:
        entry = self._entries.get(id(unet))
        if entry is None or entry.module() is not unet:   # new module, or a reused id
            self._entries = {k: e for k, e in self._entries.items() if e.module() is not None}
            entry = self._entries[id(unet)] = _ModuleEntry(weakref.ref(unet))
        return entry

    def mark(self) -> Counter:
        return Counter(self.counts)

    def report_since(self, mark: Counter) -> dict[str, Any]:
        """This request's part of the report: did it run compiled, did it compile, how often
        it recompiled a shape it had already compiled."""
        delta = Counter(self.counts)
        delta.subtract(mark)
        return {"enabled": self.enabled, "backend": self.settings.backend if self.enabled else None,
                "mode": self.settings.mode,
                "ran_compiled": delta["compiled_calls"] > 0, "compiled": delta["graphs_compiled"] > 0,
                "compiled_calls": delta["compiled_calls"], "eager_calls": delta["eager_calls"],
                "graphs_compiled": delta["graphs_compiled"], "first_compiles": delta["first_compiles"],
                "recompilations": delta["recompilations"], "compile_ms": round(delta["compile_ms"], 3),
                "fallbacks": delta["fallbacks"], "streamed_eager_calls": delta["streamed_eager_calls"],
                "freeu_eager_calls": delta["freeu_eager_calls"]}
