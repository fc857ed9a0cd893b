"""Tiled runs (modules/tiling.py): tiles cover the image, blend to the untiled result where a
network sees only nearby positions, and a Stop between two tiles ends the run."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch

from modules import tiling


def test_tile_starts_cover_the_axis_with_full_tiles():
    for size, tile, overlap, multiple in [(1000, 512, 32, 1), (513, 512, 32, 1), (100, 512, 32, 1),
                                          (2000, 256, 64, 1), (2048, 1024, 256, 8), (1000, 96, 40, 8)]:
        starts = tiling.tile_starts(size, tile, overlap, multiple)
        assert starts[0] == 0 and min(size, starts[-1] + tile) == size
        assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))
        assert all(s % multiple == 0 for s in starts)


def pool8(x: torch.Tensor) -> torch.Tensor:
    """A downscaling 'encoder' that sees only its own 8x8 block (and a 3x3 blur around it)."""
    blurred = torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    return torch.nn.functional.avg_pool2d(blurred, 8)


def nearest8(x: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.interpolate(x, scale_factor=8, mode="nearest")


@pytest.mark.parametrize("run, scale, size", [(pool8, Fraction(1, 8), (96, 160)), (nearest8, Fraction(8), (12, 20))])
def test_tiles_blend_to_the_untiled_result(run, scale, size):
    x = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(0))
    tile = 48 if scale < 1 else 8
    tiled = tiling.run_tiled(run, x, tile=tile, overlap=tile // 2, scale=scale)
    assert tiled.shape == run(x).shape
    if scale < 1:   # blocks away from tile edges see the same pixels as in one pass
        torch.testing.assert_close(tiled[..., 1:-1, 1:-1], run(x)[..., 1:-1, 1:-1], atol=0.02, rtol=0)
    else:
        torch.testing.assert_close(tiled, run(x))


def test_an_interrupt_between_tiles_stops_the_run():
    calls = []

    class Stop(Exception):
        pass

    def interrupt():
        if calls:
            raise Stop

    with pytest.raises(Stop):
        tiling.run_tiled(lambda t: calls.append(t.shape) or nearest8(t), torch.rand(1, 3, 32, 32), tile=8,
                         overlap=4, scale=Fraction(8), interrupt=interrupt)
    assert len(calls) == 1   # 49 tiles; only the first ran
