"""The weight changes a LoRA-family file can describe, one class per adapter kind.

Every adapter answers the same four questions, so `lora.LoraPatch` (the
`WeightPatch` model_patcher sees) treats them alike and resident diff
patching, exact restore and the device factor cache work the same for all:

  delta_shape()          the shape of the change, for the fit check (None: unknown)
  tensors()              the factors it holds (memory accounting)
  prepare(device)        its factors as float32 on `device`, laid out for `apply`
  apply(base, alpha, p)  base + alpha * change, a new float32 tensor

The formulas are the published ones (LyCORIS for LoCon/LoHa/LoKr/GLoRA, the
DoRA paper for weight decomposition); `scale` is alpha / rank where the file
gives an alpha, 1 otherwise. Conventions for factor layouts are those the
trainers write (kohya-ss sd-scripts, LyCORIS).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

Prepared = Any


def _f32(tensor: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if tensor is None else tensor.to(device, torch.float32, non_blocking=True)


def _nbytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _scale(alpha: float | None, rank: int) -> float:
    return 1.0 if alpha is None else alpha / rank


def _add(base: torch.Tensor, delta: torch.Tensor, alpha: float) -> torch.Tensor:
    """base + alpha * delta, where delta may be a flattened view of base's shape."""
    return base.add(delta.reshape(base.shape), alpha=alpha)


def _tucker(core: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """LyCORIS' CP/Tucker rebuild: core [i, j, *k], wa [i, out], wb [j, in] -> [out, in, *k]."""
    return torch.einsum("ij...,ip,jr->pr...", core, wa, wb)


# -- LoRA and LoCon ---------------------------------------------------------------------

@dataclass(eq=False)
class LoraFactors:
    """LoRA / LoCon: delta = alpha/rank * up @ (mid) @ down; or a full `diff`.

    `mid` is LoCon's Tucker core [rank, rank, kh, kw] between 1x1 up/down convs.
    """

    up: torch.Tensor | None = None
    down: torch.Tensor | None = None
    mid: torch.Tensor | None = None
    alpha: float | None = None
    diff: torch.Tensor | None = None

    kind = "lora"

    @property
    def rank(self) -> int:
        assert self.down is not None
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return _scale(self.alpha, self.rank)

    def delta_shape(self) -> tuple[int, ...]:
        if self.diff is not None:
            return tuple(self.diff.shape)
        assert self.up is not None and self.down is not None
        if self.mid is not None:
            return (self.up.shape[0], self.down.shape[1], *self.mid.shape[2:])
        return (self.up.shape[0], *self.down.shape[1:])

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.up, self.down, self.mid, self.diff) if t is not None]

    def nbytes(self) -> int:
        return _nbytes(self.tensors())

    def prepare(self, device: torch.device) -> Prepared:
        """(up, down, mid, diff) as float32, up/down flattened to 2-D matrices."""
        up, down = _f32(self.up, device), _f32(self.down, device)
        return (None if up is None else up.flatten(1), None if down is None else down.flatten(1),
                _f32(self.mid, device), _f32(self.diff, device))

    def apply(self, base: torch.Tensor, alpha: float, prepared: Prepared) -> torch.Tensor:
        up, down, mid, diff = prepared
        if diff is not None:
            return _add(base, diff, alpha)
        alpha *= self.scale
        if mid is not None:
            # up[p,i] * mid[i,j,k,l] * down[j,r] -> [p,r,k,l]
            return _add(base, torch.einsum("ijkl,jr,pi->prkl", mid, down, up), alpha)
        # Linear and conv LoRAs alike are one matrix product on the weight's 2-D view.
        return torch.addmm(base.reshape(base.shape[0], -1), up, down, alpha=alpha).view(base.shape)


# -- LoHa -------------------------------------------------------------------------------

@dataclass(eq=False)
class LohaFactors:
    """LoHa (LyCORIS): delta = alpha/rank * (w1a @ w1b) ⊙ (w2a @ w2b).

    With Tucker cores t1/t2 (conv layers), each factor is rebuilt as
    einsum(t [r, r, kh, kw], wa [r, out], wb [r, in]) instead of wa @ wb.
    """

    w1a: torch.Tensor
    w1b: torch.Tensor
    w2a: torch.Tensor
    w2b: torch.Tensor
    t1: torch.Tensor | None = None
    t2: torch.Tensor | None = None
    alpha: float | None = None

    kind = "loha"

    @property
    def rank(self) -> int:
        return self.w1b.shape[0]

    def delta_shape(self) -> tuple[int, ...]:
        if self.t1 is not None:
            return (self.w1a.shape[1], self.w1b.shape[1], *self.t1.shape[2:])
        return (self.w1a.shape[0], self.w1b.shape[1])

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.w1a, self.w1b, self.w2a, self.w2b, self.t1, self.t2) if t is not None]

    def nbytes(self) -> int:
        return _nbytes(self.tensors())

    def prepare(self, device: torch.device) -> Prepared:
        return tuple(_f32(t, device) for t in (self.w1a, self.w1b, self.w2a, self.w2b, self.t1, self.t2))

    def apply(self, base: torch.Tensor, alpha: float, prepared: Prepared) -> torch.Tensor:
        w1a, w1b, w2a, w2b, t1, t2 = prepared
        if t1 is not None and t2 is not None:
            first, second = _tucker(t1, w1a, w1b), _tucker(t2, w2a, w2b)
        else:
            first, second = w1a @ w1b, w2a @ w2b
        return _add(base, first * second, alpha * _scale(self.alpha, self.rank))


# -- LoKr -------------------------------------------------------------------------------

@dataclass(eq=False)
class LokrFactors:
    """LoKr (LyCORIS): delta = scale * kron(w1, w2).

    Each of w1, w2 is stored whole (`lokr_w1`, `lokr_w2`) or as a low-rank pair
    (`_a @ _b`); w2 of a conv may be a Tucker rebuild from `lokr_t2`. alpha/rank
    scales the product only when a factor is low-rank (rank = that pair's inner
    dimension, w2's when both are); whole factors carry their own scale.
    """

    w1: torch.Tensor | None = None
    w1a: torch.Tensor | None = None
    w1b: torch.Tensor | None = None
    w2: torch.Tensor | None = None
    w2a: torch.Tensor | None = None
    w2b: torch.Tensor | None = None
    t2: torch.Tensor | None = None
    alpha: float | None = None

    kind = "lokr"

    def is_complete(self) -> bool:
        has_w1 = self.w1 is not None or (self.w1a is not None and self.w1b is not None)
        has_w2 = self.w2 is not None or (self.w2a is not None and self.w2b is not None)
        return has_w1 and has_w2

    @property
    def scale(self) -> float:
        rank = None
        if self.w1 is None:
            rank = self.w1b.shape[0]
        if self.w2 is None:
            rank = self.w2b.shape[0]
        return 1.0 if rank is None or self.alpha is None else self.alpha / rank

    def _w1_shape(self) -> tuple[int, ...]:
        return tuple(self.w1.shape) if self.w1 is not None else (self.w1a.shape[0], self.w1b.shape[1])

    def _w2_shape(self) -> tuple[int, ...]:
        if self.w2 is not None:
            return tuple(self.w2.shape)
        if self.t2 is not None:
            return (self.w2a.shape[1], self.w2b.shape[1], *self.t2.shape[2:])
        return (self.w2a.shape[0], self.w2b.shape[1])

    def delta_shape(self) -> tuple[int, ...]:
        (a, b), w2 = self._w1_shape()[:2], self._w2_shape()
        return (a * w2[0], b * w2[1], *w2[2:])

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.w1, self.w1a, self.w1b, self.w2, self.w2a, self.w2b, self.t2) if t is not None]

    def nbytes(self) -> int:
        return _nbytes(self.tensors())

    def prepare(self, device: torch.device) -> Prepared:
        return tuple(_f32(t, device) for t in (self.w1, self.w1a, self.w1b, self.w2, self.w2a, self.w2b, self.t2))

    def apply(self, base: torch.Tensor, alpha: float, prepared: Prepared) -> torch.Tensor:
        w1, w1a, w1b, w2, w2a, w2b, t2 = prepared
        if w1 is None:
            w1 = w1a @ w1b
        if w2 is None:
            w2 = _tucker(t2, w2a, w2b) if t2 is not None else w2a @ w2b
        if w2.ndim > w1.ndim:
            w1 = w1.reshape(*w1.shape, *([1] * (w2.ndim - w1.ndim)))
        # kron needs contiguous inputs (an einsum result may be a strided view).
        return _add(base, torch.kron(w1.contiguous(), w2.contiguous()), alpha * self.scale)


# -- GLoRA ------------------------------------------------------------------------------

@dataclass(eq=False)
class GloraFactors:
    """GLoRA (LyCORIS): delta = scale * (W @ a1 @ a2 + b1 @ b2), W the weight itself.

    LyCORIS wrote an older layout (delta = W @ a2 @ a1 + b2 @ b1, rank = a1 rows);
    the factor shapes tell the two apart.
    """

    a1: torch.Tensor
    a2: torch.Tensor
    b1: torch.Tensor
    b2: torch.Tensor
    alpha: float | None = None

    kind = "glora"

    def old_layout(self, shape: tuple[int, ...]) -> bool:
        """Which layout the factors are in, for a weight of `shape`. A square weight
        fits both; ComfyUI reads it as the old layout only when a2 has `out` rows."""
        a1, a2, b1, b2 = self.a1, self.a2, self.b1, self.b2
        new = b2.shape[0] == b1.shape[1] == a1.shape[1] == a2.shape[0]
        old = b2.shape[1] == b1.shape[0] == a1.shape[0] == a2.shape[1]
        if old and new:
            return a2.shape[0] == shape[0] and shape[0] == shape[1]
        return old

    def delta_shape(self) -> None:
        return None   # depends on the layout, which depends on the weight: see `fits`

    def fits(self, shape: tuple[int, ...]) -> bool:
        """Does the change have `shape` (its flattened 2-D view) in the layout it is read in?"""
        if len(shape) < 2:
            return False
        width = int(torch.Size(shape[1:]).numel())
        if self.old_layout(shape):
            return (self.b2.shape[0], self.b1[0].numel()) == (shape[0], width) and self.a2.shape[0] == width
        return ((self.b1.shape[0], self.b2[0].numel()) == (shape[0], width)
                and self.a1.shape[0] == self.a2.shape[1] == shape[1])

    def tensors(self) -> list[torch.Tensor]:
        return [self.a1, self.a2, self.b1, self.b2]

    def nbytes(self) -> int:
        return _nbytes(self.tensors())

    def prepare(self, device: torch.device) -> Prepared:
        return tuple(_f32(t, device).flatten(1) for t in (self.a1, self.a2, self.b1, self.b2))

    def apply(self, base: torch.Tensor, alpha: float, prepared: Prepared) -> torch.Tensor:
        a1, a2, b1, b2 = prepared
        old = self.old_layout(tuple(base.shape))
        if old:
            flat = base.reshape(base.shape[0], -1)
            delta = b2 @ b1 + flat @ a2 @ a1
        else:
            # W's input-channel axis (dim 1) goes through a1 then a2; kernel dims ride along.
            mixed = torch.einsum("oi...,ij->oj...", torch.einsum("oi...,ij->oj...", base, a1), a2)
            delta = mixed.reshape(base.shape[0], -1) + b1 @ b2
        rank = self.a1.shape[0] if old else self.a2.shape[0]
        return _add(base, delta, alpha * _scale(self.alpha, rank))


# -- DoRA -------------------------------------------------------------------------------

@dataclass(eq=False)
class DoraFactors:
    """DoRA: W' = W + scale*delta, then every column (or row) of W' rescaled to the
    file's magnitude `dora_scale`; strength s blends linearly: W + s*(W'' - W).

    The axis comes from the shape of `dora_scale`: [1, in, ...] (LyCORIS' default,
    also what ComfyUI and Fooocus assume) normalises per input channel, i.e. the
    norm runs over the output axis; [out, 1, ...] or a flat [out] vector (LyCORIS
    `wd_on_out`, peft's magnitude vector) normalises per output channel.
    """

    inner: Any
    dora_scale: torch.Tensor

    @property
    def kind(self) -> str:
        return f"dora+{self.inner.kind}"

    def delta_shape(self) -> tuple[int, ...] | None:
        return self.inner.delta_shape()

    def fits(self, shape: tuple[int, ...]) -> bool | None:
        inner = getattr(self.inner, "fits", None)
        return None if inner is None else inner(shape)

    def tensors(self) -> list[torch.Tensor]:
        return [*self.inner.tensors(), self.dora_scale]

    def nbytes(self) -> int:
        return _nbytes(self.tensors())

    def prepare(self, device: torch.device) -> Prepared:
        return self.inner.prepare(device), _f32(self.dora_scale, device)

    def per_output(self, shape: torch.Size) -> bool:
        scale = self.dora_scale
        if scale.ndim >= 2 and scale.shape[0] == 1 and scale.numel() == shape[1]:
            return False
        if scale.numel() == shape[0]:
            return True
        raise ValueError(f"dora_scale of shape {tuple(scale.shape)} fits neither axis of a weight {tuple(shape)}")

    def apply(self, base: torch.Tensor, alpha: float, prepared: Prepared) -> torch.Tensor:
        inner, magnitude = prepared
        changed = self.inner.apply(base, 1.0, inner)
        if self.per_output(base.shape):
            norm = changed.reshape(changed.shape[0], -1).norm(dim=1)
            shape = (-1, *([1] * (base.ndim - 1)))
        else:
            norm = changed.transpose(0, 1).reshape(changed.shape[1], -1).norm(dim=1)
            shape = (1, -1, *([1] * (base.ndim - 2)))
        decomposed = changed * (magnitude.reshape(shape) / norm.reshape(shape))
        return base.add(decomposed - base, alpha=alpha)


# -- Fooocus quantised diff ------------------------------------------------------------

@dataclass(eq=False)
class QuantizedDiff:
    """A `WeightPatch` (see model_patcher) for one weight of a Fooocus `.fooocus.patch` file.

    Those files store a full diff per weight, quantised to uint8 with the tensor's own
    range: diff = q / 255 * (max - min) + min, evaluated in float32 in that order (as
    upstream's "fooocus" patch type does), and added at the patch strength. Keeping the
    uint8 form (a quarter of float32) is what makes a 2.6 G-parameter diff affordable to
    keep resident; it is decoded on the weight's device at merge time.

    `file` identifies the file version (content identity: a rewritten file is another
    patch), `name` the key inside the file.
    """

    file: Any
    name: str
    quantized: torch.Tensor
    low: float
    high: float
    # device -> the uint8 copy kept there (cache=True; never on the host, which holds the original)
    _on_device: dict = field(default_factory=dict)

    kind = "fooocus"

    @property
    def identity(self) -> Any:
        return (self.file, self.name, self.kind)

    @property
    def source(self) -> str:
        return os.path.basename(self.file.path)

    def delta_shape(self) -> tuple[int, ...]:
        return tuple(self.quantized.shape)

    def tensors(self) -> list[torch.Tensor]:
        return [self.quantized]

    def nbytes(self) -> int:
        return _nbytes(self.tensors())

    def decoded(self, device: torch.device) -> torch.Tensor:
        """The float32 diff on `device` (upstream's formula and order of operations)."""
        q = self._on_device.get(device)
        if q is None:
            q = self.quantized.to(device, non_blocking=True)
        low = torch.tensor(self.low, dtype=torch.float32, device=device)
        high = torch.tensor(self.high, dtype=torch.float32, device=device)
        return (q.to(torch.float32) / 255.0) * (high - low) + low

    def added(self, base: torch.Tensor, alpha: float, cache: bool = False) -> torch.Tensor:
        device = base.device
        if cache and device.type != "cpu" and device not in self._on_device:
            self._on_device[device] = self.quantized.to(device, non_blocking=True)
        return _add(base, self.decoded(device), alpha)

    def cached_bytes(self, device: torch.device) -> int:
        q = self._on_device.get(device)
        return 0 if q is None else _nbytes([q])

    def cache_devices(self) -> list[torch.device]:
        return list(self._on_device)

    def factor_bytes(self) -> int:
        """The uint8 copy `added(..., cache=True)` keeps on a device."""
        return self.nbytes()

    def drop_cache(self) -> None:
        self._on_device.clear()
