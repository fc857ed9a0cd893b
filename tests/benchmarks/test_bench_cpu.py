"""CPU proxy of the side-by-side benchmark: `mid` models (SDXL layout, ~200 M parameters
per base checkpoint), 256x256 requests, all configurations and scenarios in one run.

    HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -m benchmark tests/benchmarks -k cpu -s

Times go to stdout and $BENCH_OUT (default bench_out/); the assertions are on counts only.
"""

import os

import pytest

from tests.benchmarks.checks import (assert_conservative_repatches, assert_conservative_session_reloads,
                                     assert_resident_session_loads_nothing, assert_resident_steady_state_is_free)
from tests.benchmarks.harness import BenchOptions, run_benchmark


@pytest.mark.benchmark
def test_cpu_proxy_side_by_side(monkeypatch):
    from ldm_patched.modules import model_management

    monkeypatch.setattr(model_management, "_MANAGER", None)   # restored afterwards
    results = run_benchmark(BenchOptions(size="mid", device="cpu",
                                         repeats=int(os.environ.get("BENCH_REPEATS", "10"))))
    assert_resident_steady_state_is_free(results)
    assert_conservative_repatches(results)
    assert_resident_session_loads_nothing(results)
    assert_conservative_session_reloads(results)
