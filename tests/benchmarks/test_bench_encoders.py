"""Image encoders for the save (issue 12): time per 1024x1024 RGB image, file size.

Prints a table, asserts nothing about time. Encoders that are not installed are
listed as such (OpenCV and pyvips are not dependencies; install them into a scratch
folder and put it on PYTHONPATH to compare). Run:
    HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -m benchmark tests/benchmarks/test_bench_encoders.py -s
"""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
from PIL import Image

from modules import image_output


def _photo_like(size: int = 1024) -> np.ndarray:
    """Gradients plus sensor-like noise: between a flat render and pure noise."""
    y, x = np.mgrid[0:size, 0:size]
    smooth = np.stack([(x / 4) % 256, (y / 4) % 256, ((x + y) / 8) % 256], -1)
    noise = np.random.default_rng(0).normal(0, 12, smooth.shape)
    return np.clip(smooth + noise, 0, 255).astype(np.uint8)


def _pillow(fmt: str, **options):
    def encode(pixels: np.ndarray) -> bytes:
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, fmt, **options)
        return buffer.getvalue()
    return encode


def _candidates() -> dict:
    found = {"pillow png level 1": _pillow("PNG", compress_level=1),
             "pillow png level 0": _pillow("PNG", compress_level=0),
             "ours: png (" + image_output.png_encoder() + ", + tEXt)": lambda p: image_output.encode(p, "png", image_output.Metadata("{}")),
             "ours: jpeg q95 (pillow)": lambda p: image_output.encode(p, "jpeg", image_output.Metadata("{}")),
             "ours: webp q90 method 0 (pillow)": lambda p: image_output.encode(p, "webp", image_output.Metadata("{}"))}
    try:
        import cv2
        found["opencv png level 0"] = lambda p: cv2.imencode(".png", p[..., ::-1], [cv2.IMWRITE_PNG_COMPRESSION, 0])[1]
        found["opencv png level 1"] = lambda p: cv2.imencode(".png", p[..., ::-1], [cv2.IMWRITE_PNG_COMPRESSION, 1])[1]
    except ImportError:
        found["opencv"] = None
    try:
        import pyvips

        def vips(level):
            return lambda p: pyvips.Image.new_from_memory(p.tobytes(), p.shape[1], p.shape[0], 3,
                                                          "uchar").pngsave_buffer(compression=level, filter=0)
        found["pyvips png level 0"], found["pyvips png level 1"] = vips(0), vips(1)
    except (ImportError, OSError):
        found["pyvips"] = None
    return found


@pytest.mark.benchmark
def test_encoders_on_a_1024_image():
    pixels = _photo_like()
    print(f"\n{'encoder':40s} {'best of 5 ms':>12s} {'MB':>6s}")
    for name, encode in _candidates().items():
        if encode is None:
            print(f"{name:40s} {'not installed':>12s}")
            continue
        times = []
        for _ in range(5):
            start = time.perf_counter()
            data = encode(pixels)
            times.append(time.perf_counter() - start)
        print(f"{name:40s} {min(times) * 1000:12.1f} {len(bytes(data)) / 1e6:6.2f}")
