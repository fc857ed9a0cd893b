"""Loading parameters back: from an image's metadata, pasted JSON (ours and upstream's), a preset."""

import json

import numpy as np
import pytest
from PIL import Image

from ldm_patched.modules import model_management as mm
from modules import config, parameters, sdxl_styles
from tests.helpers import pipelines

SMALL = {"base_model": "tiny_sdxl_base.safetensors", "prompt": "a red fox", "negative_prompt": "fog",
         "width": 72, "height": 64, "steps": 2, "seed": 21, "sampler": "dpmpp_2m", "scheduler": "karras",
         "guidance_scale": 6.0, "sharpness": 5.0, "adm_scaler_positive": 1.2, "adm_scaler_negative": 0.9,
         "adm_scaler_end": 0.5, "styles": ["Fooocus Sharp"]}


def test_parameters_read_back_from_an_image_make_the_same_image(pipeline):
    pipeline(mm.Policy.CONSERVATIVE)
    original = pipelines.process_request(dict(SMALL))
    assert "error" not in original.report, original.report
    fields = parameters.from_image(original.images[0])
    for key, value in SMALL.items():
        assert fields[key] == value, key
    again = pipelines.process_request(fields)
    assert "error" not in again.report, again.report
    assert np.array_equal(np.asarray(Image.open(again.images[0])), np.asarray(Image.open(original.images[0])))
    # Pasted JSON (e.g. copied from the history log) reads the same way.
    pasted = Image.open(original.images[0]).text["parameters"]
    assert parameters.from_json(pasted) == fields


def test_upstream_fooocus_metadata_maps_to_request_fields():
    upstream = {"prompt": "a lighthouse", "negative_prompt": "", "styles": "['Fooocus V2', 'Fooocus Sharp']",
                "performance": "Speed", "resolution": "(896, 1152)", "guidance_scale": 4.0, "sharpness": 2.0,
                "adm_guidance": "(1.5, 0.8, 0.3)", "base_model": "juggernautXL_v8Rundiffusion",
                "refiner_model": "None", "refiner_switch": 0.5, "sampler": "dpmpp_2m_sde_gpu",
                "scheduler": "karras", "seed": "12345", "lora_combined_1": "sd_xl_offset_example-lora_1.0 : 0.1",
                "lora_combined_2": "my lora : v2.safetensors : 0.5", "version": "Fooocus v2.5.5"}
    fields = parameters.from_json(json.dumps(upstream))
    assert (fields["width"], fields["height"]) == (896, 1152)
    assert fields["styles"] == ["Fooocus V2", "Fooocus Sharp"]
    assert (fields["adm_scaler_positive"], fields["adm_scaler_negative"], fields["adm_scaler_end"]) == (1.5, 0.8, 0.3)
    assert fields["base_model"] == "juggernautXL_v8Rundiffusion.safetensors"
    assert fields["loras"] == [["sd_xl_offset_example-lora_1.0.safetensors", 0.1], ["my lora : v2.safetensors", 0.5]]
    assert fields["seed"] == 12345 and fields["refiner_model"] == "None"
    assert "version" not in fields and "resolution" not in fields


def test_unreadable_parameters_are_clear_errors(tmp_path):
    with pytest.raises(parameters.ParameterError, match="not valid JSON"):
        parameters.from_json("{oops")
    with pytest.raises(parameters.ParameterError, match="no generation parameters"):
        parameters.from_json({"unrelated": 1})
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    with pytest.raises(parameters.ParameterError, match="no generation parameters in its metadata"):
        parameters.from_image(str(tmp_path / "plain.png"))


def test_preset_values_as_request_fields(tmp_path):
    realistic = parameters.from_config(config.load_config({"config_path": str(tmp_path / "x")}, preset="realistic"))
    assert realistic["base_model"] == "realisticStockPhoto_v20.safetensors"
    assert realistic["loras"] == [["SDXL_FILM_PHOTOGRAPHY_STYLE_V1.safetensors", 0.25]]
    assert (realistic["width"], realistic["height"], realistic["guidance_scale"]) == (896, 1152, 3.0)
    json.dumps(realistic)   # plain JSON values


def test_style_search_matches_every_word():
    names = ["Fooocus V2", "Fooocus Sharp", "SAI 3D Model", "Ink Line Art"]
    assert sdxl_styles.search(names, "foo sh") == ["Fooocus Sharp"]
    assert sdxl_styles.search(names, "  ") == names
    assert sdxl_styles.search(names, "3d") == ["SAI 3D Model"]
