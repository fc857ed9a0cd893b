"""Performance modes and name tables."""

from __future__ import annotations

import pytest

from modules import flags
from modules.flags import Performance, parse_aspect_ratio, performance_settings


@pytest.mark.parametrize(
    ("mode", "steps", "lora", "weight", "sampler", "scheduler"),
    [
        ("Extreme Speed", 8, "sdxl_lcm_lora.safetensors", 1.0, "lcm", "lcm"),
        ("Lightning", 4, "sdxl_lightning_4step_lora.safetensors", 1.0, "euler", "sgm_uniform"),
        ("Hyper-SD", 4, "sdxl_hyper_sd_4step_lora.safetensors", 0.8, "dpmpp_sde_gpu", "karras"),
    ],
)
def test_distilled_modes_pin_lora_sampler_and_cfg(mode: str, steps: int, lora: str, weight: float,
                                                  sampler: str, scheduler: str) -> None:
    s = performance_settings(mode)
    assert s.performance.value == mode
    assert s.steps == steps
    assert s.is_distilled and s.lora is not None
    assert (s.lora.file_name, s.lora.weight) == (lora, weight)
    assert s.lora.url.startswith("https://huggingface.co/") and s.lora.url.endswith("/" + lora)
    assert (s.sampler, s.scheduler, s.cfg_scale) == (sampler, scheduler, 1.0)
    assert s.refiner_enabled is False
    # Whatever a mode pins must be a name the rest of the code can look up.
    assert s.sampler in flags.SAMPLER_NAMES and s.scheduler in flags.SCHEDULER_NAMES


@pytest.mark.parametrize(("mode", "steps"), [("Quality", 60), ("Speed", 30)])
def test_full_modes_leave_sampling_to_the_request(mode: str, steps: int) -> None:
    s = performance_settings(mode)
    assert s.steps == steps
    assert not s.is_distilled
    assert (s.sampler, s.scheduler, s.cfg_scale) == (None, None, None)
    assert s.refiner_enabled is True


def test_lookup_accepts_enum_and_loose_spelling() -> None:
    assert performance_settings(Performance.LIGHTNING).steps == 4
    assert performance_settings("  extreme   SPEED ").performance is Performance.EXTREME_SPEED
    assert performance_settings("hyper-sd").performance is Performance.HYPER_SD
    assert str(Performance.HYPER_SD) == "Hyper-SD"


def test_unknown_mode_names_itself_and_valid_modes() -> None:
    with pytest.raises(ValueError) as exc:
        performance_settings("Turbo")
    msg = str(exc.value)
    assert "'Turbo'" in msg
    for valid in ("Quality", "Speed", "Extreme Speed", "Lightning", "Hyper-SD"):
        assert repr(valid) in msg


def test_settings_are_immutable() -> None:
    s = performance_settings("Speed")
    with pytest.raises(AttributeError):
        s.steps = 1  # type: ignore[misc]


def test_performance_lora_files_are_the_three_distilled_loras() -> None:
    assert set(flags.PERFORMANCE_LORA_FILES) == {
        "sdxl_lcm_lora.safetensors", "sdxl_lightning_4step_lora.safetensors",
        "sdxl_hyper_sd_4step_lora.safetensors",
    }


def test_name_tables_have_no_duplicates_and_include_defaults() -> None:
    for table in (flags.SAMPLER_NAMES, flags.SCHEDULER_NAMES, flags.SDXL_ASPECT_RATIOS):
        assert len(set(table)) == len(table)
    assert flags.DEFAULT_SAMPLER in flags.SAMPLER_NAMES
    assert flags.DEFAULT_SCHEDULER in flags.SCHEDULER_NAMES
    assert flags.DEFAULT_ASPECT_RATIO in flags.SDXL_ASPECT_RATIOS


def test_aspect_ratios_are_sdxl_sized() -> None:
    # Every entry is a multiple of 64 and close to one megapixel, like SDXL's buckets.
    for text in flags.SDXL_ASPECT_RATIOS:
        w, h = parse_aspect_ratio(text)
        assert w % 64 == 0 and h % 64 == 0
        assert 0.9e6 < w * h < 1.1e6


@pytest.mark.parametrize(
    ("text", "size"),
    [("1152*896", (1152, 896)), ("1024×1024", (1024, 1024)), ("1152×896 ∣ 9:7", (1152, 896)),
     (" 704 * 1408 ", (704, 1408))],
)
def test_parse_aspect_ratio_forms(text: str, size: tuple[int, int]) -> None:
    assert parse_aspect_ratio(text) == size


@pytest.mark.parametrize("text", ["", "1152", "0*896", "1152*896px", "wide", "64*64 extra", "256x256",
                                  "1152×896 ∣ 9:7 and more"])
def test_parse_aspect_ratio_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_aspect_ratio(text)
