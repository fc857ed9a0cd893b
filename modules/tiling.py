"""Running a network over a large image in overlapping tiles, blended by weight.

The upscaler and the VAE (encode and decode of large images) use it: each tile fits the
working memory budgeted for one tile, and `interrupt` is called before every tile, so a
Stop takes effect between two tiles instead of after the whole image.
"""

from __future__ import annotations

from collections.abc import Callable
from fractions import Fraction

import torch


def tile_starts(size: int, tile: int, overlap: int, multiple: int = 1) -> list[int]:
    """Tile origins along one axis: full-size tiles at most `tile - overlap` apart, the
    last one flush with the end (no thin edge tile). With `multiple`, every origin is a
    multiple of it (a downscaling network maps them to whole output positions)."""
    if size <= tile:
        return [0]
    stride = max((tile - overlap) // multiple * multiple, multiple)
    starts = list(range(0, size - tile, stride))
    return starts + [size - tile]


def blend_ramp(length: int, start: int, size: int, overlap: int) -> torch.Tensor:
    """Blend weights along one axis of a tile (input units): 0 within overlap/4 of an
    edge that lies inside the image, rising linearly to 1 over the middle half of the
    overlap. Positions next to a tile's inner edge see padding instead of their
    neighbours, so they get no weight; image borders keep full weight."""
    margin, rise = overlap // 4, max(overlap - 2 * (overlap // 4), 1)
    d = torch.arange(length, dtype=torch.float32)
    w = torch.ones(length)
    if start > 0:
        w = torch.minimum(w, ((d - margin + 1) / rise).clamp(0, 1))
    if start + length < size:
        w = torch.minimum(w, ((length - d - margin) / rise).clamp(0, 1))
    return w


def _scaled(weights: torch.Tensor, scale: Fraction) -> torch.Tensor:
    """Input-unit weights at the output's resolution: repeated to upscale, averaged per
    block to downscale."""
    if scale.numerator > 1:
        weights = weights.repeat_interleave(scale.numerator)
    if scale.denominator > 1:
        weights = weights.view(-1, scale.denominator).mean(dim=1)
    return weights


def run_tiled(run: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor, tile: int, overlap: int,
              scale: Fraction, interrupt: Callable[[], None] | None = None) -> torch.Tensor:
    """[1,C,H,W] -> [1,C',H*scale,W*scale]: `run` on each overlapping tile (at most
    tile x tile input positions), the results blended by weight. `interrupt` runs before
    each tile and may raise to stop. With a downscaling `scale` (1/8: the VAE encoder) H, W
    and `tile` are multiples of its denominator."""
    if overlap < 0 or tile <= overlap:
        raise ValueError(f"tile ({tile}) must be larger than overlap ({overlap}) >= 0")
    _, _, height, width = image.shape
    den = scale.denominator
    if height % den or width % den or tile % den:
        raise ValueError(f"a 1/{den} scale needs sizes and tile in multiples of {den}, got {height}x{width}, {tile}")
    tile_h, tile_w = min(tile, height), min(tile, width)
    total = weight = None
    for y in tile_starts(height, tile, overlap, den):
        wy = _scaled(blend_ramp(tile_h, y, height, overlap), scale)
        for x in tile_starts(width, tile, overlap, den):
            if interrupt is not None:
                interrupt()
            wx = _scaled(blend_ramp(tile_w, x, width, overlap), scale)
            out = run(image[..., y:y + tile_h, x:x + tile_w])
            if total is None:
                total = out.new_zeros((1, out.shape[1], int(height * scale), int(width * scale)))
                weight = out.new_zeros((1, 1, int(height * scale), int(width * scale)))
            mask = (wy[:, None] * wx[None, :]).to(out)[None, None]
            oy, ox = int(y * scale), int(x * scale)
            total[..., oy:oy + out.shape[-2], ox:ox + out.shape[-1]] += out * mask
            weight[..., oy:oy + out.shape[-2], ox:ox + out.shape[-1]] += mask
    return total / weight
