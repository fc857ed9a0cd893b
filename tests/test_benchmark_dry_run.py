"""Dry run of the benchmark harness (default suite): the entry point the CUDA benchmark
uses, on tiny models on the CPU, every configuration and scenario, two counted
requests each (fooocus_session: one round of its five modes), plus the diffusers peer
and the compiled configuration (aot_eager).
Checks the output files and the counts that make the comparison meaningful; never times."""

import json

import pytest

from ldm_patched.modules import model_management
from tests.benchmarks import harness, models
from tests.benchmarks.checks import (assert_compiled_runs_without_recompiling, assert_conservative_repatches,
                                     assert_conservative_session_reloads, assert_resident_session_loads_nothing,
                                     assert_resident_steady_state_is_free,
                                     assert_throughput_batches_share_unet_calls, requests_of)

SUMMARY_FIELDS = ("timings_ms", "counts", "peak_allocated_bytes", "ratio_total", "ratio_model_management",
                  "requests", "step_ms", "compile", "warmup_compile")


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
        assert set(per_config) == {n for n in harness.CONFIGURATIONS if harness.runs(n, scenario)}, scenario
        for summary in per_config.values():
            assert set(SUMMARY_FIELDS) <= set(summary)
            assert set(summary["timings_ms"]) == set(harness.TIMINGS)
            assert all(set(v) == {"median", "p90"} for v in summary["timings_ms"].values())
            assert set(summary["counts"]) == set(harness.COUNTS)
            assert all(set(v) == {"sum", "median"} for v in summary["counts"].values())
            assert len(summary["requests"]) == results["options"]["counted_requests"][scenario]
    assert results["options"]["counted_requests"] == {**{s: 2 for s in harness.SCENARIOS},
                                                      harness.SESSION: len(harness.SESSION_MODES),
                                                      harness.THROUGHPUT: harness.THROUGHPUT_CLIENTS * 2}
    assert results["results"]["steady"]["conservative"]["ratio_total"] == pytest.approx(1.0)
    for key in ("cpu", "torch", "date", "git_commit"):
        assert results["machine"][key]


def test_resident_steady_state_moves_and_patches_nothing(dry_run):
    assert_resident_steady_state_is_free(dry_run[0])
    for request in requests_of(dry_run[0], "steady", "resident"):
        assert request["model_management"]["text_encodes"] == 0
    assert dry_run[0]["results"]["steady"]["resident"]["cached_lora_files"] == harness.CACHED_LORA_FILES


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
    steady = [n for n in harness.CONFIGURATIONS if harness.runs(n, "steady")]
    assert len(rows) == len(steady) + 2   # + compiled-vs-eager: resident, compiled
    assert harness.PEER_HEADER in markdown and harness.COMPILE_HEADER in markdown
    assert f"| {harness.PEER} (LCM LoRA fused in" in markdown


def test_the_peer_is_diffusers_pipeline_drawing_the_same_picture(dry_run):
    results, _ = dry_run
    peer = results["peer"]
    assert len(peer["requests"]) == 2 and peer["steps"] == results["options"]["extreme_speed_steps"]
    assert peer["timings_ms"]["total"]["median"] > 0 and peer["lora_load_and_fuse_ms"] > 0
    for name, summary in results["results"]["steady"].items():
        # Same weights, LoRA, request and seed: the ratio compares like with like (CPU, float32).
        assert summary["max_pixel_diff_vs_peer"] <= 2, name
        assert summary["ratio_total_vs_peer"] > 0


def test_the_peer_fuses_the_lora_into_copies_not_into_the_benchmarked_modules(dry_run):
    results, _ = dry_run
    # Had the fuse touched bench_base's own modules, conservative's first load would see
    # LoRA-merged "originals"; every configuration draws the peer's picture only if not.
    diffs = {n: s["max_pixel_diff_vs_peer"] for n, s in results["results"]["steady"].items()}
    assert set(diffs) == {n for n in harness.CONFIGURATIONS if harness.runs(n, "steady")} and max(diffs.values()) <= 2


def test_compiled_configuration_recompiles_nothing_across_lora_switches(dry_run):
    results, _ = dry_run
    assert results["options"]["compile_backend"] == "aot_eager"
    assert_compiled_runs_without_recompiling(results, harness.COMPILED)
    for scenario in harness.CONFIGURATION_SCENARIOS[harness.COMPILED]:
        summary = results["results"][scenario][harness.COMPILED]
        for request in summary["requests"]:
            assert request["compile"]["ran_compiled"], scenario
            assert (request["compile"]["graphs_compiled"], request["compile"]["recompilations"]) == (0, 0), scenario
        assert summary["step_ms"]["median"] > 0
        eager = results["results"][scenario][harness.EAGER]
        assert not any(r["compile"]["ran_compiled"] for r in eager["requests"])
    # The warm-ups compiled the two shapes (Extreme Speed batch 1, Speed with cfg batch 2) once.
    warmups = [results["results"][s][harness.COMPILED]["warmup_compile"] for s in ("steady", "lora_switch")]
    assert warmups[0]["graphs_compiled"] >= 1 and warmups[1]["graphs_compiled"] >= 1
    assert warmups[0]["recompilations"] == warmups[1]["recompilations"] == 0
    switches = requests_of(results, "lora_switch", harness.COMPILED)
    assert [r["lora_on"] for r in switches] == [True, False]
    assert switches[0]["model_management"]["weights_patched"] == results["models"]["lora"]["keys"]


def test_cpu_configurations_go_through_the_real_flags():
    settings = {name: harness.settings_for(name, "cpu") for name in harness.CONFIGURATIONS}
    assert settings["resident"].policy is model_management.Policy.RESIDENT
    assert settings["conservative"].policy is model_management.Policy.CONSERVATIVE
    assert settings["conservative"].always_offload_from_vram
    assert all(s.vram_state is model_management.VRAMState.DISABLED for s in settings.values())
    assert harness.configuration_flags("conservative --always-gpu", "cuda") == ["--always-gpu"]


def test_fooocus_session_goes_round_its_modes_at_the_run_side(dry_run):
    results, markdown = dry_run
    side, given = results["options"]["side"], results["options"]["session_input_side"]
    expected = {"text-to-image": side, "vary": side, "upscale": 2 * given, "image prompt": side, "inpaint": given}
    for name, summary in results["results"][harness.SESSION].items():
        assert [r["mode"] for r in summary["requests"]] == list(harness.SESSION_MODES), name
        assert [r["mode"] for r in summary["warmup"]] == list(harness.SESSION_MODES), name
        assert set(summary["per_mode"]) == set(harness.SESSION_MODES)
        for request in summary["requests"]:
            # Vary generates at side, Upscale (2x) doubles the input, Inpaint pastes into it
            size = expected[request["mode"]]
            assert request["image_size"] == [size, size], (name, request["mode"], request["image_size"])
        modes = {r["mode"]: r for r in summary["requests"]}
        assert modes["upscale"]["timings_ms"]["input_image"] > 0 and modes["image prompt"]["timings_ms"]["input_image"] > 0
        assert modes["text-to-image"]["timings_ms"]["input_image"] == 0
    assert harness.SESSION_HEADER in markdown
    rows = [line for line in markdown.splitlines() if line.startswith("| inpaint |")]
    assert len(rows) == len(results["results"][harness.SESSION])


def test_resident_fooocus_session_loads_nothing_and_switches_only_the_inpaint_patch(dry_run):
    assert_resident_session_loads_nothing(dry_run[0])


def test_conservative_fooocus_session_reloads_every_request(dry_run):
    # On the CPU bytes moved are 0 in every configuration (load device = offload device):
    # what tells upstream's per-request reload apart here is models_loaded.
    assert_conservative_session_reloads(dry_run[0])


def test_throughput_batches_the_queued_clients_and_one_at_a_time_does_not(dry_run):
    results, markdown = dry_run
    assert_throughput_batches_share_unet_calls(results)
    assert set(results["results"][harness.THROUGHPUT]) == {harness.EAGER, harness.UNBATCHED}
    for summary in results["results"][harness.THROUGHPUT].values():
        for performance in ("Extreme Speed", "Speed"):
            round_ = summary["per_performance"][performance]
            assert round_["requests"] == harness.THROUGHPUT_CLIENTS and round_["images_per_s"] > 0
    assert harness.THROUGHPUT_HEADER in markdown
