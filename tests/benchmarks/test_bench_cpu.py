"""CPU proxy of the side-by-side benchmark: `mid` models (SDXL layout, ~200 M parameters
per base checkpoint), 256x256 requests, all configurations and scenarios in one run; and
the throughput of the CPU kit (the tiny demo model) through launch.py.

    HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -m benchmark tests/benchmarks -k cpu -s

Times go to stdout and $BENCH_OUT (default bench_out/); the assertions are on counts only.
"""

import os

import pytest

from tests.benchmarks.checks import (assert_conservative_repatches, assert_conservative_session_reloads,
                                     assert_resident_session_loads_nothing, assert_resident_steady_state_is_free,
                                     assert_throughput_batches_share_unet_calls)
from tests.benchmarks.harness import BenchOptions, run_benchmark
from tests.benchmarks.launch_kit import REQUEST, run_kit, table

REQUEST_STEPS = REQUEST["steps"]


@pytest.mark.benchmark
def test_cpu_proxy_side_by_side(monkeypatch):
    from ldm_patched.modules import model_management

    monkeypatch.setattr(model_management, "_MANAGER", None)   # restored afterwards
    results = run_benchmark(BenchOptions(size="mid", device="cpu",
                                         repeats=int(os.environ.get("BENCH_REPEATS", "10"))))
    assert_resident_steady_state_is_free(results)
    assert_throughput_batches_share_unet_calls(results)
    assert_conservative_repatches(results)
    assert_resident_session_loads_nothing(results)
    assert_conservative_session_reloads(results)


@pytest.mark.benchmark
def test_cpu_kit_throughput_through_launch():
    """issue 19 through launch.py and gradio_client (tiny demo model, 64x64, 8 steps): the
    times are printed; asserted are the UNet calls and every image against its twin."""
    results = run_kit()
    print(table(results))
    for name, r in results.items():
        steps_of_four = 4 * REQUEST_STEPS
        assert r["unet_calls"]["sequential"] == steps_of_four, name
        assert r["unet_calls"]["concurrent_per_request"] == [REQUEST_STEPS] * 4, name
        assert r["unet_calls"]["image_number_4"] == (steps_of_four if name == "--max-batch 1" else REQUEST_STEPS)
        assert max(r["max_pixel_diff_vs_twins"].values()) <= 1, name
        assert r["other_set"]["served"] and r["other_set"]["max_pixel_diff_vs_alone"] == 0, name
