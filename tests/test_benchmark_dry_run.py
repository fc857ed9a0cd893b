"""Dry run of the benchmark harness (default suite): the entry point the CUDA benchmark
uses, on tiny models on the CPU, every configuration and scenario, two counted
requests each. Checks the output files and the counts that make the comparison
meaningful; never times."""

import json

import pytest

from ldm_patched.modules import model_management
from tests.benchmarks import harness, models
from tests.benchmarks.checks import (assert_conservative_repatches, assert_resident_steady_state_is_free,
                                     requests_of)

SUMMARY_FIELDS = ("timings_ms", "counts", "peak_allocated_bytes", "ratio_total", "ratio_model_management",
                  "requests")


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_out")
    patch = pytest.MonkeyPatch()
    patch.setattr(model_management, "_MANAGER", None)   # the run's manager does not leak out
    try:
        harness.run_benchmark(harness.BenchOptions(size="tiny", device="cpu", repeats=2, out_dir=out),
                              log=lambda line: None)
    finally:
        patch.undo()
    return json.loads((out / "results.json").read_text()), (out / "results.md").read_text()


def test_every_scenario_and_configuration_has_every_metric(dry_run):
    results, _ = dry_run
    assert set(results["results"]) == set(harness.SCENARIOS)
    for scenario, per_config in results["results"].items():
        assert set(per_config) == set(harness.CONFIGURATIONS), scenario
        for summary in per_config.values():
            assert set(SUMMARY_FIELDS) <= set(summary)
            assert set(summary["timings_ms"]) == set(harness.TIMINGS)
            assert all(set(v) == {"median", "p90"} for v in summary["timings_ms"].values())
            assert set(summary["counts"]) == set(harness.COUNTS)
            assert all(set(v) == {"sum", "median"} for v in summary["counts"].values())
            assert len(summary["requests"]) == 2
    assert results["results"]["steady"]["conservative"]["ratio_total"] == pytest.approx(1.0)
    for key in ("cpu", "torch", "date", "git_commit"):
        assert results["machine"][key]


def test_resident_steady_state_moves_and_patches_nothing(dry_run):
    assert_resident_steady_state_is_free(dry_run[0])
    for request in requests_of(dry_run[0], "steady", "resident"):
        assert request["model_management"]["text_encodes"] == 0


def test_conservative_steady_state_repatches_the_lcm_lora_every_request(dry_run):
    assert_conservative_repatches(dry_run[0])


def test_resident_lora_switch_touches_only_the_lora_keys(dry_run):
    results, _ = dry_run
    keys = results["models"]["lora"]["keys"]
    requests = requests_of(results, "lora_switch", "resident")
    assert [r["lora_on"] for r in requests] == [True, False]   # every counted request is a switch
    switch_on, switch_off = (r["model_management"] for r in requests)
    assert (switch_on["weights_patched"], switch_on["weights_restored"], switch_on["models_loaded"]) == (keys, 0, 0)
    assert (switch_off["weights_patched"], switch_off["weights_restored"], switch_off["models_loaded"]) == (0, keys, 0)
    assert switch_on["bytes_to_device"] == switch_off["bytes_to_device"] == 0


def test_lora_covers_every_attention_feed_forward_projection_and_resnet_layer(dry_run, tiny_components):
    results, _ = dry_run
    targets = models.lora_targets(tiny_components["unet"])
    assert results["models"]["lora"]["keys"] == len(targets)
    for kind in models.LORA_LAYERS:
        assert any(path.endswith("." + kind) for path, _ in targets), kind


def test_markdown_has_the_table(dry_run):
    results, markdown = dry_run
    assert harness.TABLE_HEADER in markdown
    rows = [line for line in markdown.splitlines() if line.startswith("| steady |")]
    assert len(rows) == len(harness.CONFIGURATIONS)


def test_cpu_configurations_go_through_the_real_flags():
    settings = {name: harness.settings_for(name, "cpu") for name in harness.CONFIGURATIONS}
    assert settings["resident"].policy is model_management.Policy.RESIDENT
    assert settings["conservative"].policy is model_management.Policy.CONSERVATIVE
    assert settings["conservative"].always_offload_from_vram
    assert all(s.vram_state is model_management.VRAMState.DISABLED for s in settings.values())
    assert harness.configuration_flags("conservative --always-gpu", "cuda") == ["--always-gpu"]
