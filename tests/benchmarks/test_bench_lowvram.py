"""Small GPUs (issue 20): SDXL under budgets of 4, 6 and 8 GB, half the UNet and whole, s/step
and total per request, in both policies (tests/benchmarks/lowvram.py).

    HF_HUB_OFFLINE=1 python -m pytest -m benchmark tests/benchmarks/test_bench_lowvram.py -s

The CUDA run is skipped (by tests/conftest.py) where torch.cuda.is_available() is False; the CPU
proxy runs the same rows at `mid` size. Assertions are on counts and pixels, never on times.
"""

import os

import pytest

from tests.benchmarks.lowvram import LowVramOptions, run_lowvram_benchmark


def check_rows(results: dict) -> None:
    """Budgets short of the UNet stream, 'whole' streams nothing, every row draws the same image."""
    for row in results["rows"]:
        assert row["same_image_as_whole"], row
        if row["budget"] == "whole":
            assert row["unet"]["placement"] == "whole" and row["bytes_streamed"] == 0, row
        if row["budget"] == "half_unet":
            assert row["unet"]["placement"] == "partial" and row["bytes_streamed"] > 0, row
            assert row["bytes_streamed"] >= row["steps"] * row["unet"]["streamed_bytes"], row


@pytest.mark.benchmark
def test_cpu_proxy_lowvram(monkeypatch):
    from ldm_patched.modules import model_management

    monkeypatch.setattr(model_management, "_MANAGER", None)   # restored afterwards
    check_rows(run_lowvram_benchmark(LowVramOptions(device="cpu", repeats=int(os.environ.get("BENCH_REPEATS", "2")))))


@pytest.mark.benchmark
@pytest.mark.cuda
def test_cuda_sdxl_lowvram(monkeypatch):
    from ldm_patched.modules import model_management

    monkeypatch.setattr(model_management, "_MANAGER", None)
    check_rows(run_lowvram_benchmark(LowVramOptions(device="cuda", repeats=int(os.environ.get("BENCH_REPEATS", "3")))))
