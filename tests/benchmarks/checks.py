"""Deterministic properties of a benchmark run (counts, never times), shared by the
CPU proxy, the CUDA run and the dry run."""

from __future__ import annotations

from typing import Any


def requests_of(results: dict[str, Any], scenario: str, configuration: str) -> list[dict[str, Any]]:
    return results["results"][scenario][configuration]["requests"]


def assert_resident_steady_state_is_free(results: dict[str, Any]) -> None:
    """After the warm-up, a repeated request moves, loads and patches nothing."""
    for request in requests_of(results, "steady", "resident"):
        moved = request["model_management"]
        assert (moved["bytes_to_device"], moved["bytes_to_offload"], moved["weights_patched"],
                moved["weights_restored"], moved["models_loaded"]) == (0, 0, 0, 0, 0), moved


def assert_conservative_repatches(results: dict[str, Any]) -> None:
    """Upstream's default re-merges every LCM LoRA key on every request (DESIGN.md §1)."""
    keys = results["models"]["lora"]["keys"]
    for request in requests_of(results, "steady", "conservative"):
        assert request["model_management"]["weights_patched"] == keys, request["model_management"]
        assert request["model_management"]["models_loaded"] > 0


def assert_compiled_runs_without_recompiling(results: dict[str, Any], configuration: str) -> None:
    """After the warm-ups, every request of the compiled configuration runs compiled and
    compiles nothing, LoRA switches included."""
    for scenario, per_config in results["results"].items():
        for request in per_config.get(configuration, {}).get("requests", []):
            compiled = request["compile"]
            assert compiled["ran_compiled"], (scenario, compiled)
            assert (compiled["graphs_compiled"], compiled["recompilations"]) == (0, 0), (scenario, compiled)


# -- fooocus_session (text to image, Vary, Upscale, Image Prompt, Inpaint) ----------------
#
# CPU blind spot: on the CPU the load and offload devices are the same, so bytes moved are
# 0 in EVERY configuration and cannot tell resident from conservative there. What differs
# on the CPU, and what these checks rely on to show upstream's per-request reload, are the
# counts: models_loaded and weights_patched / weights_restored. The byte checks below hold
# trivially on the CPU and mean something only on a GPU.

SESSION = "fooocus_session"


def _inpaint_patch_keys() -> int:
    from tests.helpers.input_image_files import INPAINT_PATCH_KEYS

    return len(INPAINT_PATCH_KEYS)


def assert_resident_session_loads_nothing(results: dict[str, Any]) -> None:
    """`resident`, after the warm-up round: no model loaded, no LoRA file read, no byte
    moved; the only weights written are the inpaint patch's keys, switched between text to
    image (restored: it follows an inpaint in every round) and inpaint (patched). Where a
    device keeps merged variants (a GPU with room) the inpaint request copies its keys back
    from them (weights_patched == weights_from_variants: no merge); the CPU keeps no
    variants, so there the inpaint request merges exactly the patch's keys again."""
    keys = _inpaint_patch_keys()
    keeps_variants = results["options"]["device"] != "cpu"
    requests = requests_of(results, SESSION, "resident")
    assert {r["mode"] for r in requests} == {"text-to-image", "vary", "upscale", "image prompt", "inpaint"}
    for request in requests:
        m, mode = request["model_management"], request["mode"]
        assert (m["models_loaded"], m["lora_files_read"], m["bytes_to_device"], m["bytes_to_offload"]) \
            == (0, 0, 0, 0), (mode, m)
        assert m["weights_patched"] == (keys if mode == "inpaint" else 0), (mode, m)
        assert m["weights_restored"] == (keys if mode == "text-to-image" else 0), (mode, m)
        merged = m["weights_patched"] - m["weights_from_variants"]
        if keeps_variants:
            assert merged == 0, (mode, m)
        else:
            assert m["weights_from_variants"] == 0, (mode, m)
            assert merged == (keys if mode == "inpaint" else 0), (mode, m)


def assert_conservative_session_reloads(results: dict[str, Any]) -> None:
    """`conservative` (upstream's default): every counted request of the session loads
    models again, as upstream does per request."""
    for request in requests_of(results, SESSION, "conservative"):
        assert request["model_management"]["models_loaded"] > 0, (request["mode"], request["model_management"])


# -- throughput (issue 19) ------------------------------------------------------------------

def assert_throughput_batches_share_unet_calls(results: dict[str, Any]) -> None:
    """One image at a time costs `steps` UNet calls per request. Batched, the round starts
    with every client's first request queued, and they run as one UNet batch: `steps` calls
    for all of them, so at most steps x (requests - clients + 1) in the round."""
    from tests.benchmarks.harness import EAGER, THROUGHPUT, UNBATCHED

    per_config = results["results"][THROUGHPUT]
    clients = per_config[EAGER]["clients"]
    for performance, batched in per_config[EAGER]["per_performance"].items():
        alone = per_config[UNBATCHED]["per_performance"][performance]
        assert alone["unet_calls"] == alone["steps"] * alone["requests"], (performance, alone)
        assert batched["unet_calls"] <= batched["steps"] * (batched["requests"] - clients + 1), (performance, batched)
        assert batched["largest_unet_batch_rows"] >= clients, (performance, batched)
