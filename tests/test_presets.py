"""Presets: upstream's presets/*.json format, by --preset and by a request's `preset` field."""

import json
import logging
from pathlib import Path

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


# Upstream's presets/*.json values (model files, numbers, flags), preset by preset.
UPSTREAM = {
    "default": ("juggernautXL_v8Rundiffusion.safetensors", 4.0, "Speed", "1152*896",
                ["Fooocus V2", "Fooocus Enhance", "Fooocus Sharp"]),
    "lightning": ("juggernautXL_v8Rundiffusion.safetensors", 4.0, "Lightning", "1152*896",
                  ["Fooocus V2", "Fooocus Enhance", "Fooocus Sharp"]),
    "realistic": ("realisticStockPhoto_v20.safetensors", 3.0, "Speed", "896*1152",
                  ["Fooocus V2", "Fooocus Photograph", "Fooocus Negative"]),
    "anime": ("animaPencilXL_v500.safetensors", 6.0, "Speed", "896*1152",
              ["Fooocus V2", "Fooocus Semi Realistic", "Fooocus Masterpiece"]),
    "lcm": ("juggernautXL_v8Rundiffusion.safetensors", 4.0, "Extreme Speed", "1152*896",
            ["Fooocus V2", "Fooocus Enhance", "Fooocus Sharp"]),
    "playground_v2.5": ("playground-v2.5-1024px-aesthetic.fp16.safetensors", 2.0, "Speed", "1024*1024",
                        ["Fooocus V2"]),
    "pony_v6": ("ponyDiffusionV6XL.safetensors", 7.0, "Speed", "896*1152", ["Fooocus Pony"]),
    "sai": ("sd_xl_base_1.0_0.9vae.safetensors", 7.0, "Speed", "1152*896", ["Fooocus V2", "Fooocus Cinematic"]),
}


def test_shipped_presets_carry_upstreams_values(tmp_path):
    from modules import sdxl_styles
    env = {"config_path": str(tmp_path / "absent.txt")}
    assert set(UPSTREAM) <= set(presets.available())
    library = sdxl_styles.load_library([config.REPO_ROOT / "sdxl_styles"])
    for name, (model, cfg_scale, performance, aspect, styles) in UPSTREAM.items():
        preset = load_config(env, preset=name)
        assert (preset.default_model, preset.default_cfg_scale, str(preset.default_performance),
                preset.default_aspect_ratio, list(preset.default_styles)) == (model, cfg_scale, performance, aspect,
                                                                             styles), name
        assert preset.default_overwrite_step == -1 and preset.checkpoint_downloads[0][0] == model, name
        sdxl_styles.check_names(preset.default_styles, library)   # every style exists here
    default = load_config(env, preset="default")
    assert [(l.name, l.weight) for l in default.default_loras] == [("sd_xl_offset_example-lora_1.0.safetensors", 0.1)]
    assert "juggernautXL_v7Rundiffusion.safetensors" in default.previous_default_models
    assert load_config(env, preset="realistic").previous_default_models == ("realisticStockPhoto_v10.safetensors",)
    sai = load_config(env, preset="sai")
    assert (sai.default_refiner, sai.default_refiner_switch) == ("sd_xl_refiner_1.0_0.9vae.safetensors", 0.75)
    assert [n for n, _ in sai.checkpoint_downloads] == [sai.default_model, sai.default_refiner]
    pony = load_config(env, preset="pony_v6")
    assert pony.default_vae == "ponyDiffusionV6XL_vae.safetensors" and pony.vae_downloads[0][0] == pony.default_vae
    playground = load_config(env, preset="playground_v2.5")
    assert (playground.default_sampler, playground.default_scheduler) == ("dpmpp_2m", "edm_playground_v2.5")


def test_preset_downloads_honour_the_flags_and_previous_default_models(presets_dir, tmp_path, monkeypatch):
    from modules import model_downloader
    fetched = []

    def fake_download(url, dest, on_progress=None, **_):
        fetched.append((url, str(dest)))
        Path(dest).parent.mkdir(parents=True, exist_ok=True)
        Path(dest).write_bytes(b"model")
        if on_progress is not None:
            on_progress(5, 5)
        return True

    monkeypatch.setattr(model_downloader, "download_file", fake_download)
    write(presets_dir, "mine", {"default_model": "new.safetensors", "previous_default_models": ["old.safetensors"],
                                "checkpoint_downloads": {"new.safetensors": "https://host.invalid/new.safetensors"},
                                "lora_downloads": {"style.safetensors": "https://host.invalid/style.safetensors"},
                                "vae_downloads": {"v.safetensors": "https://host.invalid/v.safetensors"}})
    folders = {key: tmp_path / key for key in ("path_checkpoints", "path_loras", "path_vae")}
    env = {"config_path": str(tmp_path / "absent.txt"), **{k: str(v) for k, v in folders.items()}}
    (folders["path_checkpoints"]).mkdir()
    (folders["path_checkpoints"] / "old.safetensors").write_bytes(b"old")
    older = load_config(env, preset="mine")
    assert older.default_model == "old.safetensors"          # the older model is used, the new one not fetched
    progress = []
    assert presets.download_models(older, lambda *a: progress.append(a)) == []
    assert fetched == [("https://host.invalid/style.safetensors", str(folders["path_loras"] / "style.safetensors")),
                       ("https://host.invalid/v.safetensors", str(folders["path_vae"] / "v.safetensors"))]
    assert progress == [("style.safetensors", 5, 5), ("v.safetensors", 5, 5)]
    newest = load_config(env, preset="mine", cli={"always_download_new_model": True})
    assert newest.default_model == "new.safetensors"
    presets.download_models(newest)
    assert fetched[-1] == ("https://host.invalid/new.safetensors", str(folders["path_checkpoints"] / "new.safetensors"))
    assert presets.missing_downloads(newest) == []          # everything is there now: nothing more to fetch
    (folders["path_checkpoints"] / "new.safetensors").unlink()
    assert presets.download_models(load_config(env, preset="mine", cli={"downloads": False,
                                                                        "always_download_new_model": True})) == []
    assert len(fetched) == 3                                 # --disable-preset-download: nothing fetched


def test_the_playground_preset_runs_with_its_edm_scheduler(pipeline):
    pipeline(mm.Policy.CONSERVATIVE)
    report = pipelines.process_request({**SMALL, "preset": "playground_v2.5", "styles": []}).report
    assert "error" not in report
    assert (report["sampler"], report["scheduler"]) == ("dpmpp_2m", "edm_playground_v2.5")


def test_unknown_keys_are_ignored_with_one_log_line(presets_dir, tmp_path, caplog):
    write(presets_dir, "mine", {"default_cfg_scale": 6.5, "default_enhance_checkbox": True,
                                "default_inpaint_mask_model": "sam", "default_inpaint_engine_version": "None"})
    env = {"config_path": str(tmp_path / "absent.txt")}
    with caplog.at_level(logging.INFO, logger="fooocus_resident.presets"):
        first = load_config(env, preset="mine")
        load_config(env, preset="mine")
    assert (first.default_cfg_scale, first.default_inpaint_engine_version) == (6.5, "None")
    lines = [r.getMessage() for r in caplog.records if "ignoring keys" in r.getMessage()]
    assert lines == ["[Fooocus-Resident] preset mine: ignoring keys this version does not use: "
                     "default_enhance_checkbox, default_inpaint_mask_model"]


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
