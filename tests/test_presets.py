"""Presets: upstream's presets/*.json format, by --preset and by a request's `preset` field."""

import json
import logging

import pytest

from ldm_patched.modules import model_management as mm
from modules import config, presets
from modules.config import ConfigError, load_config
from tests.helpers import pipelines

SMALL = {"base_model": "tiny_sdxl_base.safetensors", "prompt": "a cat", "width": 64, "height": 64,
         "steps": 1, "seed": 3}


@pytest.fixture
def presets_dir(tmp_path, monkeypatch):
    folder = tmp_path / "presets"
    folder.mkdir()
    monkeypatch.setattr(presets, "PRESETS_DIR", folder)
    return folder


def write(folder, name, data):
    (folder / f"{name}.json").write_text(json.dumps(data), encoding="utf-8")


def test_shipped_presets_parse_and_name_upstreams_files(tmp_path):
    env = {"config_path": str(tmp_path / "absent.txt")}
    assert {"default", "lightning", "realistic"} <= set(presets.available())
    default = load_config(env, preset="default")
    assert default.default_model == "juggernautXL_v8Rundiffusion.safetensors"
    assert [(l.name, l.weight) for l in default.default_loras] == [("sd_xl_offset_example-lora_1.0.safetensors", 0.1)]
    assert (default.default_sampler, default.default_scheduler) == ("dpmpp_2m_sde_gpu", "karras")
    assert str(load_config(env, preset="lightning").default_performance) == "Lightning"
    realistic = load_config(env, preset="realistic")
    assert realistic.default_model == "realisticStockPhoto_v20.safetensors"
    assert realistic.default_cfg_scale == 3.0 and realistic.default_size == (896, 1152)
    from modules import sdxl_styles
    library = sdxl_styles.load_library([config.REPO_ROOT / "sdxl_styles"])
    for name in ("default", "lightning", "realistic"):
        sdxl_styles.check_names(load_config(env, preset=name).default_styles, library)   # all shipped


def test_unknown_keys_are_ignored_with_one_log_line(presets_dir, tmp_path, caplog):
    write(presets_dir, "mine", {"default_cfg_scale": 6.5, "default_max_lora_number": 5,
                                "default_inpaint_engine_version": "None"})
    env = {"config_path": str(tmp_path / "absent.txt")}
    with caplog.at_level(logging.INFO, logger="fooocus_resident.presets"):
        first = load_config(env, preset="mine")
        load_config(env, preset="mine")
    assert first.default_cfg_scale == 6.5
    lines = [r.getMessage() for r in caplog.records if "ignoring keys" in r.getMessage()]
    assert lines == ["[Fooocus-Resident] preset mine: ignoring keys this version does not use: "
                     "default_inpaint_engine_version, default_max_lora_number"]


def test_unknown_or_escaping_preset_names_list_the_presets(presets_dir, tmp_path):
    write(presets_dir, "alpha", {})
    write(presets_dir, "beta", {})
    (tmp_path / "outside.json").write_text("{}")
    env = {"config_path": str(tmp_path / "absent.txt")}
    for name in ("gamma", "../outside"):
        with pytest.raises(ConfigError, match="available presets: alpha, beta"):
            load_config(env, preset=name)


def test_request_preset_applies_its_values_and_request_fields_win(pipeline, presets_dir, monkeypatch):
    pipeline(mm.Policy.CONSERVATIVE)
    write(presets_dir, "mine", {"default_cfg_scale": 6.5, "default_sampler": "dpmpp_2m",
                                "default_scheduler": "karras", "default_sample_sharpness": 0.0,
                                "default_styles": ["Fooocus Sharp"], "default_prompt_negative": "fog",
                                "unknown_upstream_key": 1})
    applied = pipelines.process_request({**SMALL, "preset": "mine"})
    assert "error" not in applied.report, applied.report
    report = applied.report
    assert (report["cfg"], report["sampler"], report["scheduler"], report["preset"]) == (6.5, "dpmpp_2m", "karras", "mine")
    assert report["styles"] == ["Fooocus Sharp"] and report["guidance"]["sharpness"] == 0.0
    meta = json.loads(__import__("PIL.Image", fromlist=["Image"]).open(applied.images[0]).text["parameters"])
    assert meta["negative_prompt"] == "fog"
    plain = pipelines.process_request(dict(SMALL)).report
    assert plain["cfg"] != 6.5 and plain["styles"] == []
    explicit = pipelines.process_request({**SMALL, "preset": "mine", "guidance_scale": 2.0,
                                                 "styles": []}).report
    assert explicit["cfg"] == 2.0 and explicit["styles"] == [] and explicit["sampler"] == "dpmpp_2m"
    missing = pipelines.process_request({**SMALL, "preset": "nope"}).report
    assert "unknown preset 'nope'" in missing["error"] and "mine" in missing["error"]
