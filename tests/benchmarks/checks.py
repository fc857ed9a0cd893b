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
