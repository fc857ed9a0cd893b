"""The bad-input catalogue (issue 9): one row per malformed request. Each gets a report
whose error names the field at fault (and the config key where a limit applies), no
images, and the next good request still works. Rows marked `finding` failed before
issue 9 (internal error naming no field, or accepted); the others already held."""

from __future__ import annotations

import math
import re

import pytest

from ldm_patched.modules import model_management as mm
from tests.helpers import pipelines

BASE = "tiny_sdxl_base.safetensors"
GOOD = {"base_model": BASE, "prompt": "a cat", "width": 64, "height": 64, "steps": 1, "seed": 1,
        "sampler": "euler", "scheduler": "normal"}
INF, NAN = math.inf, math.nan

# (row id, request changes, substrings the error must contain)
ROWS = [
    # -- findings of issue 9 --------------------------------------------------------------------
    ("prompt_1mb", {"prompt": "a " * 500_000}, ["'prompt'", "max_prompt_tokens"]),
    ("prompt_over_token_limit", {"prompt": "cat " * 3100}, ["'prompt'", "3100 tokens", "max_prompt_tokens"]),
    ("negative_over_token_limit", {"negative_prompt": "dog " * 3001}, ["'negative_prompt'", "max_prompt_tokens"]),
    ("3000_lora_tags", {"prompt": "a cat " + "<lora:x:0.5>" * 3000}, ["'prompt'", "max_loras_per_request"]),
    ("33_loras", {"loras": [[f"l{i}.safetensors", 0.5] for i in range(33)]}, ["'loras'", "max_loras_per_request"]),
    ("lora_weight_nan", {"loras": [["x.safetensors", NAN]]}, ["'loras'", "finite", "max_lora_weight"]),
    ("lora_weight_inf", {"loras": [["x.safetensors", INF]]}, ["'loras'", "finite"]),
    ("lora_weight_1e308", {"loras": [["x.safetensors", 1e308]]}, ["'loras'", "max_lora_weight"]),
    ("lora_tag_weight_1e308", {"prompt": "a <lora:x:1e308>"}, ["'prompt'", "max_lora_weight"]),
    ("lora_tag_weight_nan", {"prompt": "a <lora:x:nan>"}, ["'prompt'", "finite"]),
    ("lora_tag_weight_not_a_number", {"prompt": "a <lora:x:1.2.3>"}, ["'prompt'", "1.2.3"]),
    ("width_infinity", {"width": INF}, ["'width'", "integer"]),
    ("height_nan", {"height": NAN}, ["'height'", "integer"]),
    ("image_number_infinity", {"image_number": INF}, ["'image_number'"]),
    ("seed_nan", {"seed": NAN}, ["'seed'"]),
    ("steps_infinity", {"steps": -INF}, ["'steps'"]),
    ("guidance_nan", {"guidance_scale": NAN}, ["'guidance_scale'", "finite"]),
    ("refiner_switch_nan", {"refiner_switch": NAN}, ["'refiner_switch'"]),
    ("prompt_lone_surrogate", {"prompt": "a \ud800 cat"}, ["'prompt'", "not valid text"]),
    ("negative_lone_surrogate", {"negative_prompt": "\udfff"}, ["'negative_prompt'", "not valid text"]),
    ("base_model_lone_surrogate", {"base_model": "x\ud800.safetensors"}, ["'base_model'"]),
    ("lora_name_lone_surrogate", {"loras": [["x\ud800.safetensors", 1.0]]}, ["'loras'"]),
    ("aspect_ratio_trailing_text", {"aspect_ratio": "64*64 extra"}, ["'aspect_ratio'"]),
    ("aspect_ratio_x", {"aspect_ratio": "256x256"}, ["'aspect_ratio'"]),
    ("aspect_ratio_not_text", {"aspect_ratio": 64}, ["'aspect_ratio'"]),
    # -- rows that already held ---------------------------------------------------------------
    ("prompt_missing", {"prompt": None}, ["'prompt'"]),
    ("prompt_not_text", {"prompt": 5}, ["'prompt'"]),
    ("width_not_multiple_of_8", {"width": 65}, ["'width'", "multiple of 8"]),
    ("width_too_large", {"width": 100_000}, ["'width'"]),
    ("width_text", {"width": "64"}, ["'width'"]),
    ("width_bool", {"width": True}, ["'width'"]),
    ("image_number_zero", {"image_number": 0}, ["'image_number'"]),
    ("seed_below_minus_one", {"seed": -2}, ["'seed'"]),
    ("steps_zero", {"steps": 0}, ["'steps'"]),
    ("guidance_too_high", {"guidance_scale": 1e9}, ["'guidance_scale'"]),
    ("unknown_sampler", {"sampler": "nope"}, ["sampler", "nope"]),
    ("unknown_scheduler", {"scheduler": "nope"}, ["scheduler", "nope"]),
    ("unknown_performance", {"performance": "Turbo"}, ["Turbo"]),
    ("base_model_missing", {"base_model": "missing.safetensors"}, ["missing.safetensors"]),
    ("base_model_traversal", {"base_model": "../../etc/passwd"}, ["../../etc/passwd"]),
    ("loras_not_a_list", {"loras": "x"}, ["'loras'"]),
    ("lora_item_malformed", {"loras": [["x.safetensors"]]}, ["'loras'"]),
    ("lora_missing", {"loras": [["missing_lora.safetensors", 1.0]]}, ["missing_lora.safetensors"]),
    ("vae_missing", {"vae": "missing_vae.safetensors"}, ["missing_vae.safetensors"]),
]


# Issue 18: a number too big for a float (JSON integers have no limit) and names the pipeline
# resolves late; each error names exactly the field at fault. (row id, changes, field)
FIELD_ROWS = [
    ("guidance_10e400", {"guidance_scale": 10 ** 400}, "guidance_scale"),
    ("refiner_switch_minus_10e400", {"refiner_switch": -10 ** 400}, "refiner_switch"),
    ("sharpness_10e400", {"sharpness": 10 ** 400}, "sharpness"),
    ("adm_end_10e400", {"adm_scaler_end": 10 ** 400}, "adm_scaler_end"),
    ("lora_weight_10e400", {"loras": [["x.safetensors", 10 ** 400]]}, "loras"),
    ("width_10e400", {"width": 10 ** 400}, "width"),
    ("seed_10e400", {"seed": 10 ** 400}, "seed"),
    ("refiner_model_unknown", {"refiner_model": "nope"}, "refiner_model"),
    ("sampler_unknown", {"sampler": "nope"}, "sampler"),
    ("scheduler_unknown", {"scheduler": "nope"}, "scheduler"),
    ("performance_unknown", {"performance": "Turbo"}, "performance"),
]


@pytest.mark.parametrize("changes, field", [pytest.param(c, f, id=i) for i, c, f in FIELD_ROWS])
def test_each_error_names_the_one_field_at_fault(pipeline, changes, field):
    pipeline(mm.Policy.RESIDENT)
    result = pipelines.process_request({**GOOD, **changes})
    error = result.report.get("error")
    assert isinstance(error, str) and result.images == [], result.report
    assert re.findall(r"field '(\w+)'", error) == [field], error
    assert "internal error" not in error and len(error) < 400, error   # a 400-digit number is not echoed whole


@pytest.mark.parametrize("changes, expected", [pytest.param(c, e, id=i) for i, c, e in ROWS])
def test_bad_request_gets_a_field_error_and_the_server_goes_on(pipeline, changes, expected):
    pipeline(mm.Policy.RESIDENT)
    request = {**GOOD, **changes}
    request = {k: v for k, v in request.items() if v is not None}
    result = pipelines.process_request(request)
    error = result.report.get("error")
    assert isinstance(error, str) and result.images == [], result.report
    assert "internal error" not in error
    for part in expected:
        assert part in error, f"{part!r} not in {error!r}"
    assert "/" + "tmp" not in error.replace("../../etc/passwd", "")   # no absolute server path


def test_a_non_object_request_is_refused(pipeline):
    pipeline(mm.Policy.RESIDENT)
    assert "JSON object" in pipelines.process_request([]).report["error"]   # type: ignore[arg-type]


def test_after_the_catalogue_a_good_request_works(pipeline):
    pipeline(mm.Policy.RESIDENT)
    for _, changes, _ in ROWS[:5]:
        pipelines.process_request({k: v for k, v in {**GOOD, **changes}.items() if v is not None})
    result = pipelines.process_request(dict(GOOD))
    assert "error" not in result.report and len(result.images) == 1


def test_reports_and_errors_name_files_relative_to_their_model_folder(pipeline, tiny_checkpoint):
    import shutil

    folders = pipeline(mm.Policy.RESIDENT)
    (folders["checkpoints"] / "sub").mkdir()
    shutil.copy(tiny_checkpoint, folders["checkpoints"] / "sub" / "base.safetensors")
    (folders["checkpoints"] / "sub" / "broken.safetensors").write_bytes(b"\0" * 100)
    good = pipelines.process_request({**GOOD, "base_model": "sub/base.safetensors"}).report
    assert good["base_model"] == "sub/base.safetensors", good
    bad = pipelines.process_request({**GOOD, "base_model": "sub/broken.safetensors"}).report
    assert "sub/broken.safetensors" in bad["error"] and str(folders["checkpoints"]) not in bad["error"]


def test_no_report_error_or_status_carries_an_absolute_server_path(pipeline, tmp_path):
    import json

    from modules import config

    pipeline(mm.Policy.RESIDENT)
    outside = tmp_path / "elsewhere.png"
    outside.write_bytes(b"\x89PNG not really")
    good = pipelines.process_request(dict(GOOD))
    reports = [good.report,
               pipelines.process_request({**GOOD, "styles": ["no such style"]}).report,   # names the styles folder
               pipelines.process_request({**GOOD, "input_image": str(outside), "uov_method": "Vary (Subtle)"}).report]
    assert "error" not in reports[0] and all("error" in r for r in reports[1:]), reports
    folders = [str(tmp_path), str(config.REPO_ROOT), str(config.get_config().temp_root)]
    for shown in [*reports, pipelines.current().model_status()]:
        text = json.dumps(shown, default=str)
        assert not [f for f in folders if f in text], text
    name = good.report["images"][0]   # the image by its name in the outputs folder
    assert good.images[0].endswith(name) and name.count("/") == 1
