"""Fooocus-API bodies onto our request, one field to one field: only what the client sent
goes in (our config's defaults do the rest, as for /generate), and what we have no feature
for is refused, naming the field as the client spelled it."""

from __future__ import annotations

import pytest

from modules.api import fooocus_api as fa
from modules.api.common import ApiError


def same(value, field: str):
    return f"{field}:{value}"


# The text-to-image example of Fooocus-API's docs (docs/api_doc_en.md), with our file names.
DOCS_EXAMPLE = {
    "prompt": "a girl in the ground", "negative_prompt": "", "style_selections": ["Fooocus Sharp"],
    "performance_selection": "Speed", "aspect_ratios_selection": "1152*896", "image_number": 1, "image_seed": -1,
    "sharpness": 2, "guidance_scale": 4, "base_model_name": "juggernaut.safetensors", "refiner_model_name": "None",
    "refiner_switch": 0.5, "loras": [{"model_name": "offset.safetensors", "weight": 0.1},
                                     {"enabled": False, "model_name": "off.safetensors", "weight": 1}],
    "advanced_params": {"adm_scaler_positive": 1.5, "adm_scaler_negative": 0.6, "adm_scaler_end": 0.3,
                        "refiner_swap_method": "joint", "adaptive_cfg": 7, "sampler_name": "dpmpp_2m_sde_gpu",
                        "scheduler_name": "karras", "overwrite_step": -1, "overwrite_switch": -1,
                        "overwrite_width": -1, "overwrite_height": -1, "overwrite_vary_strength": -1,
                        "overwrite_upscale_strength": -1, "mixing_image_prompt_and_vary_upscale": False,
                        "mixing_image_prompt_and_inpaint": False, "debugging_cn_preprocessor": False,
                        "skipping_cn_preprocessor": False, "controlnet_softness": 0.25, "canny_low_threshold": 64,
                        "canny_high_threshold": 128, "inpaint_engine": "v1", "freeu_enabled": False,
                        "freeu_b1": 1.01, "freeu_b2": 1.02, "freeu_s1": 0.99, "freeu_s2": 0.95},
    "require_base64": False, "async_process": True}


def test_the_docs_example_maps_one_to_one():
    request = fa.to_request(fa.CommonRequest.model_validate(DOCS_EXAMPLE), same)
    assert request == {
        "prompt": "a girl in the ground", "negative_prompt": "", "styles": ["Fooocus Sharp"],
        "performance": "Speed", "aspect_ratio": "1152*896", "image_number": 1, "seed": -1, "sharpness": 2.0,
        "guidance_scale": 4.0, "base_model": "juggernaut.safetensors", "refiner_model": "None",
        "refiner_switch": 0.5, "loras": [["offset.safetensors", 0.1]],   # the disabled one is left out
        "adm_scaler_positive": 1.5, "adm_scaler_negative": 0.6, "adm_scaler_end": 0.3,
        "overwrite_vary_strength": -1.0, "overwrite_upscale_strength": -1.0,   # -1: the method's own
        "inpaint_engine": "v1", "sampler": "dpmpp_2m_sde_gpu", "scheduler": "karras",
        # Developer Debug fields it sent: the request fields of the same names
        "refiner_swap_method": "joint", "adaptive_cfg": 7.0, "freeu_enabled": False,
        "freeu_b1": 1.01, "freeu_b2": 1.02, "freeu_s1": 0.99, "freeu_s2": 0.95,
        # its Control tab's
        "controlnet_softness": 0.25, "canny_low_threshold": 64, "canny_high_threshold": 128,
        "skipping_cn_preprocessor": False, "debugging_cn_preprocessor": False}


def test_fields_not_sent_stay_out_so_the_config_decides():
    assert fa.to_request(fa.CommonRequest.model_validate({"prompt": "x"}), same) == {"prompt": "x"}
    overwritten = fa.to_request(fa.CommonRequest.model_validate(
        {"prompt": "x", "save_extension": "jpg",
         "advanced_params": {"overwrite_step": 2, "overwrite_width": 64, "overwrite_height": 96,
                             "overwrite_switch": 1, "vae_name": "sdxl_vae.safetensors"}}), same)
    # overwrite_switch is a step there too ("Forced Overwrite of Refiner Switch Step", -1..200)
    assert overwritten == {"prompt": "x", "output_format": "jpeg", "steps": 2, "width": 64, "height": 96,
                           "overwrite_switch": 1, "vae": "sdxl_vae.safetensors"}
    metadata = fa.to_request(fa.CommonRequest.model_validate(
        {"prompt": "x", "save_meta": False, "meta_scheme": "a1111", "read_wildcards_in_order": True}), same)
    assert metadata == {"prompt": "x", "save_metadata_to_images": False, "metadata_scheme": "a1111",
                        "read_wildcards_in_order": True}


def test_image_routes_put_their_images_and_modes_in():
    uov = fa.to_request(fa.ImgUpscaleOrVaryRequestJson.model_validate(
        {"prompt": "x", "uov_method": "Vary (Subtle)", "input_image": "IMG",
         "image_prompts": [{"cn_img": "IP", "cn_stop": 0, "cn_weight": 0.8}, {"cn_img": None}]}), same)
    assert uov["uov_method"] == "Vary (Subtle)" and uov["input_image"] == "input_image:IMG"
    assert uov["image_prompts"] == [["image_prompts[0].cn_img:IP", None, 0.8, "ImagePrompt"]]   # 0: the default
    inpaint = fa.to_request(fa.ImgInpaintOrOutpaintRequestJson.model_validate(
        {"prompt": "a hat", "input_image": "IMG", "input_mask": "MASK", "inpaint_additional_prompt": "red",
         "outpaint_selections": ["Left"], "advanced_params": {"inpaint_strength": 0.7}}), same)
    assert inpaint["prompt"] == "red\na hat"   # upstream puts the additional prompt first
    assert (inpaint["inpaint_mask"], inpaint["outpaint_selections"], inpaint["inpaint_strength"]) == (
        "input_mask:MASK", ["Left"], 0.7)


@pytest.mark.parametrize("body, model, field", [
    ({"advanced_params": {"black_out_nsfw": True}}, fa.CommonRequest, "advanced_params.black_out_nsfw"),
    ({"input_image": "I", "outpaint_distance_top": 100}, fa.ImgInpaintOrOutpaintRequestJson,
     "outpaint_distance_top"),
])
def test_features_we_lack_are_refused_not_dropped(body, model, field):
    with pytest.raises(ApiError) as refused:
        fa.to_request(model.model_validate({"prompt": "x", **body}), same)
    assert refused.value.param == field and refused.value.status == 422


def test_developer_debug_advanced_params_carry_over():
    request = fa.to_request(fa.CommonRequest.model_validate(
        {"prompt": "x", "advanced_params": {"clip_skip": 1, "adaptive_cfg": 5, "refiner_swap_method": "vae",
                                            "freeu_enabled": True, "freeu_b2": 1.3, "freeu_s1": 3.0,
                                            "disable_seed_increment": True, "disable_preview": True,
                                            "disable_intermediate_results": True, "generate_image_grid": True}}),
                            same)
    assert request == {"prompt": "x", "clip_skip": 1, "adaptive_cfg": 5.0, "refiner_swap_method": "vae",
                       "freeu_enabled": True, "freeu_b2": 1.3, "freeu_s1": 3.0, "disable_seed_increment": True,
                       "disable_preview": True, "disable_intermediate_results": True, "generate_image_grid": True}
    control = fa.to_request(fa.CommonRequest.model_validate(
        {"prompt": "x", "advanced_params": {"canny_low_threshold": 40, "skipping_cn_preprocessor": True,
                                            "debugging_cn_preprocessor": True}}), same)
    assert control == {"prompt": "x", "canny_low_threshold": 40, "skipping_cn_preprocessor": True,
                       "debugging_cn_preprocessor": True}


def test_the_image_grid_answers_last_with_seed_minus_one():
    from modules.api import jobs
    from modules.task_types import RequestResult

    class Done:
        def done(self):
            return True

        def result(self):
            return RequestResult(images=["a.png", "b.png", "grid.png"],
                                 report={"seed": 5, "seeds": [5, 5], "image_grid": {"image": "grid.png"}})

    job = jobs.ApiJob(id="j", owner="o", job_type="t", task=Done())
    assert [r.seed for r in fa.image_results(job, False)] == ["5", "5", "-1"]


def test_our_field_names_in_errors_become_theirs():
    from modules.api.common import rename_fields

    message = "field 'seed' must be an integer; field 'steps' must be between 1 and 200; field 'image_prompts[1]'"
    assert rename_fields(message, fa.NAMES) == ("field 'image_seed' must be an integer; field "
                                                "'advanced_params.overwrite_step' must be between 1 and 200; "
                                                "field 'image_prompts[1]'")
