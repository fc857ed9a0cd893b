"""The side-by-side benchmark at SDXL size on a CUDA GPU: real SDXL base/refiner
shapes with random weights, fp16 UNet and text encoders, the VAE in what
`model_management.dtype_for` picks (bf16 on Ampere and newer), 1024x1024 requests.

    HF_HUB_OFFLINE=1 python -m pytest -m "benchmark and cuda" tests/benchmarks -s

Skipped (by tests/conftest.py) where torch.cuda.is_available() is False. Same harness
entry point as the dry run in tests/test_benchmark_dry_run.py; assertions are on counts only.
The run includes diffusers' StableDiffusionXLPipeline as the peer row and
`resident --compile-unet` (inductor, CUDA graphs) against eager `resident`.
"""

import os

import pytest

from tests.benchmarks.checks import (assert_compiled_runs_without_recompiling, assert_conservative_repatches,
                                     assert_conservative_session_reloads, assert_resident_session_loads_nothing,
                                     assert_resident_steady_state_is_free,
                                     assert_throughput_batches_share_unet_calls)
from tests.benchmarks.harness import COMPILED, BenchOptions, run_benchmark


@pytest.mark.benchmark
@pytest.mark.cuda
def test_cuda_sdxl_side_by_side(monkeypatch):
    from ldm_patched.modules import model_management

    monkeypatch.setattr(model_management, "_MANAGER", None)   # restored afterwards
    results = run_benchmark(BenchOptions(size="sdxl", device="cuda",
                                         repeats=int(os.environ.get("BENCH_REPEATS", "10"))))
    assert results["models"]["dtypes"]["unet"] == "torch.float16"
    assert_resident_steady_state_is_free(results)
    assert_throughput_batches_share_unet_calls(results)
    assert_conservative_repatches(results)
    assert_resident_session_loads_nothing(results)
    assert_conservative_session_reloads(results)
    assert_compiled_runs_without_recompiling(results, COMPILED)
    assert results["peer"]["requests"]   # diffusers' pipeline ran in the same run
