"""Metadata both ways: upstream's fooocus and a1111 schemes (fixtures built from the field
names upstream's meta_parser writes and reads), AUTOMATIC1111's own files, our PNG/JPEG/WebP
read back, and presets as request fields."""

import dataclasses
import hashlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from ldm_patched.modules import model_management as mm
from modules import config, parameters, sdxl_styles
from tests.helpers import lora_files, pipelines

SMALL = {"base_model": "tiny_sdxl_base.safetensors", "prompt": "a red fox\nin the snow", "negative_prompt": "fog",
         "width": 72, "height": 64, "steps": 2, "seed": 21, "sampler": "dpmpp_2m", "scheduler": "karras",
         "guidance_scale": 6.0, "sharpness": 5.0, "adm_scaler_positive": 1.2, "adm_scaler_negative": 0.9,
         "adm_scaler_end": 0.5, "styles": ["Fooocus Sharp"]}

# Upstream's fooocus scheme, field by field as its async_worker.save_and_log and
# FooocusMetadataParser.to_string write them (json.dumps of the sorted dict).
UPSTREAM_FOOOCUS = {
    "adm_guidance": "(1.5, 0.8, 0.3)", "base_model": "juggernautXL_v8Rundiffusion", "base_model_hash": "7bc1c4d8a1",
    "full_negative_prompt": ["blurry, washed out", "fog"], "full_prompt": ["a lighthouse, crisp", "at dusk"],
    "guidance_scale": 4.0, "lora_combined_1": "sd_xl_offset_example-lora_1.0 : 0.1",
    "lora_combined_2": "sdxl_lcm_lora : 1.0", "loras": [["sd_xl_offset_example-lora_1.0", 0.1, "4852686128"]],
    "metadata_scheme": "fooocus", "negative_prompt": "fog", "performance": "Speed", "prompt": "a lighthouse\nat dusk",
    "prompt_expansion": "", "refiner_model": "None", "refiner_switch": 0.5, "resolution": "(896, 1152)",
    "sampler": "dpmpp_2m_sde_gpu", "scheduler": "karras", "seed": "12345", "sharpness": 2.0, "steps": 30,
    "styles": "['Fooocus V2', 'Fooocus Sharp']", "vae": "Default (model)", "version": "Fooocus v2.5.5"}
FOOOCUS_EXPECTED = {
    "prompt": "a lighthouse\nat dusk", "negative_prompt": "fog", "styles": ["Fooocus V2", "Fooocus Sharp"],
    "performance": "Speed", "width": 896, "height": 1152, "guidance_scale": 4.0, "sharpness": 2.0,
    "adm_scaler_positive": 1.5, "adm_scaler_negative": 0.8, "adm_scaler_end": 0.3,
    "base_model": "sdxl/juggernautXL_v8Rundiffusion.safetensors", "refiner_model": "None", "refiner_switch": 0.5,
    "sampler": "dpmpp_2m_sde_gpu", "scheduler": "karras", "vae": "Default (model)", "seed": 12345,
    "loras": [["sd_xl_offset_example-lora_1.0.safetensors", 0.1]]}   # the performance LoRA is not sent back

# Upstream's a1111 scheme (A1111MetadataParser.to_string): the joined full prompt, then its keys.
UPSTREAM_A1111 = (
    "oil painting of a lighthouse, thick brush, a lighthouse, crisp, a lighthouse, golden light\n"
    "Negative prompt: photo, soft, fog\n"
    'Steps: 20, Sampler: DPM++ 2M SDE Karras, Seed: 12345, Size: 896x1152, CFG scale: 4.0, Sharpness: 2.0, '
    'ADM Guidance: "(1.5, 0.8, 0.3)", Model: juggernautXL_v8Rundiffusion, Model hash: 7bc1c4d8a1, '
    'Performance: Speed, Scheduler: karras, VAE: Default (model), Raw prompt: a lighthouse, '
    'Raw negative prompt: fog, Lora hashes: "sd_xl_offset_example-lora_1.0: 4852686128", '
    'Lora weights: "sd_xl_offset_example-lora_1.0: 0.1", Version: Fooocus v2.5.5')


# The Developer Debug fields as upstream's save_and_log records them (adaptive_cfg when not
# default_cfg_tsnr 7.0, clip_skip when > 1, freeu as the text of (b1, b2, s1, s2) when on;
# overwrite_switch when > 0 and refiner_swap_method when not 'joint', both only with a refiner).
UPSTREAM_FOOOCUS_DEBUG = {
    **UPSTREAM_FOOOCUS, "refiner_model": "sd_xl_refiner_1.0", "refiner_model_hash": "7440042bbd",
    "adaptive_cfg": 5.5, "clip_skip": 3, "overwrite_switch": 12, "refiner_swap_method": "vae",
    "freeu": "(1.1, 1.2, 0.6, 0.4)"}
DEBUG_EXPECTED = {"adaptive_cfg": 5.5, "clip_skip": 3, "overwrite_switch": 12, "refiner_swap_method": "vae",
                  "freeu_enabled": True, "freeu_b1": 1.1, "freeu_b2": 1.2, "freeu_s1": 0.6, "freeu_s2": 0.4}
# A1111MetadataParser.to_string puts them after the refiner, before the LoRAs, as
# Adaptive CFG, Clip skip, Overwrite Switch, Refiner Swap Method, FreeU (quoted: it has commas).
UPSTREAM_A1111_DEBUG = UPSTREAM_A1111.replace(
    "Raw negative prompt: fog, ",
    'Raw negative prompt: fog, Refiner: sd_xl_refiner_1.0, Refiner hash: 7440042bbd, Adaptive CFG: 5.5, '
    'Clip skip: 3, Overwrite Switch: 12, Refiner Swap Method: vae, FreeU: "(1.1, 1.2, 0.6, 0.4)", ')


@pytest.fixture
def cfg(tmp_path):
    """A config whose folders hold the files the fixtures name (one in a subfolder)."""
    for folder, name in (("ckpt/sdxl", "juggernautXL_v8Rundiffusion.safetensors"),
                         ("loras", "sd_xl_offset_example-lora_1.0.safetensors")):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / name).write_bytes(b"x")
    (tmp_path / "styles").mkdir()
    (tmp_path / "styles" / "s.json").write_text(json.dumps([
        {"name": "Fooocus Sharp", "prompt": "{prompt}, crisp", "negative_prompt": "soft"},
        {"name": "Oil", "prompt": "oil painting of {prompt}, thick brush", "negative_prompt": "photo"},
        {"name": "Plain", "prompt": "{prompt}", "negative_prompt": ""}]))
    return config.load_config({"config_path": str(tmp_path / "none.txt"), "path_checkpoints": str(tmp_path / "ckpt"),
                               "path_loras": str(tmp_path / "loras"), "path_styles": str(tmp_path / "styles")})


def png_with(text_chunks: dict) -> bytes:
    info = PngImagePlugin.PngInfo()
    for key, value in text_chunks.items():
        info.add_text(key, value)
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "PNG", pnginfo=info)
    return buffer.getvalue()


def jpeg_with(tags: dict, sub_ifd: dict | None = None) -> bytes:
    exif = Image.Exif()
    for tag, value in tags.items():
        exif[tag] = value
    for tag, value in (sub_ifd or {}).items():
        exif.get_ifd(0x8769)[tag] = value
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "JPEG", exif=exif.tobytes())
    return buffer.getvalue()


def test_upstream_fooocus_scheme_png_and_jpeg_load_every_field(cfg, tmp_path):
    text = json.dumps(dict(sorted(UPSTREAM_FOOOCUS.items())))
    png = png_with({"parameters": text, "fooocus_scheme": "fooocus"})
    assert parameters.read_parameters(png, cfg) == FOOOCUS_EXPECTED
    (tmp_path / "up.png").write_bytes(png)
    assert parameters.read_parameters(str(tmp_path / "up.png"), cfg) == FOOOCUS_EXPECTED
    # Upstream's get_exif: UserComment (0x9286) = the text, MakerNote (0x927C) = the scheme.
    jpeg = jpeg_with({0x9286: text, 0x0131: "Fooocus v2.5.5", 0x927C: "fooocus"})
    assert parameters.read_parameters(jpeg, cfg) == FOOOCUS_EXPECTED


def test_upstream_a1111_scheme_png_loads_every_field_and_its_styles(cfg):
    fields = parameters.read_parameters(png_with({"parameters": UPSTREAM_A1111, "fooocus_scheme": "a1111"}), cfg)
    assert fields == {
        "prompt": "a lighthouse", "negative_prompt": "fog", "styles": ["Fooocus V2", "Oil", "Fooocus Sharp"],
        "steps": 20, "sampler": "dpmpp_2m_sde", "scheduler": "karras", "seed": 12345, "width": 896, "height": 1152,
        "guidance_scale": 4.0, "sharpness": 2.0, "adm_scaler_positive": 1.5, "adm_scaler_negative": 0.8,
        "adm_scaler_end": 0.3, "base_model": "sdxl/juggernautXL_v8Rundiffusion.safetensors", "performance": "Speed",
        "vae": "Default (model)", "loras": [["sd_xl_offset_example-lora_1.0.safetensors", 0.1]]}
    # Without the scheme chunk, text that is not JSON is read as a1111 too.
    assert parameters.read_parameters(png_with({"parameters": UPSTREAM_A1111}), cfg) == fields


def test_upstream_fooocus_scheme_debug_fields_load(cfg):
    text = json.dumps(dict(sorted(UPSTREAM_FOOOCUS_DEBUG.items())))
    fields = parameters.read_parameters(png_with({"parameters": text, "fooocus_scheme": "fooocus"}), cfg)
    assert fields == {**FOOOCUS_EXPECTED, "refiner_model": "sd_xl_refiner_1.0.safetensors", **DEBUG_EXPECTED}
    # Upstream's distilled modes record the adaptive cfg they ran, 1.0.
    assert parameters.from_json({**UPSTREAM_FOOOCUS, "adaptive_cfg": 1.0}, cfg=cfg)["adaptive_cfg"] == 1.0


def test_upstream_a1111_scheme_debug_fields_load(cfg):
    fields = parameters.read_parameters(png_with({"parameters": UPSTREAM_A1111_DEBUG, "fooocus_scheme": "a1111"}),
                                        cfg)
    assert {k: fields[k] for k in (*DEBUG_EXPECTED, "refiner_model")} == {
        **DEBUG_EXPECTED, "refiner_model": "sd_xl_refiner_1.0.safetensors"}
    # AUTOMATIC1111's own "Clip skip" is the same layer count.
    text = "a cat\nSteps: 24, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x768, Clip skip: 2"
    assert parameters.read_parameters(png_with({"parameters": text}), cfg)["clip_skip"] == 2


def test_automatic1111s_own_png_and_jpeg_load(cfg):
    text = ("a cat <lora:x:0.5>, looking up\nNegative prompt: ugly\nSteps: 24, Sampler: Euler a, Schedule type: "
            "Karras, CFG scale: 7, Seed: 1, Size: 512x768, Model hash: 31e35c80fc, Model: sd_xl_base_1.0, "
            "Version: v1.9.4")
    expected = {"prompt": "a cat <lora:x:0.5>, looking up", "negative_prompt": "ugly", "steps": 24,
                "sampler": "euler_ancestral", "scheduler": "karras", "guidance_scale": 7.0, "seed": 1, "width": 512,
                "height": 768, "base_model": "sd_xl_base_1.0.safetensors"}
    assert parameters.read_parameters(png_with({"parameters": text}), cfg) == expected
    # A1111 (piexif) keeps it as UserComment in the Exif sub-IFD, UTF-16 after its "UNICODE" prefix.
    jpeg = jpeg_with({}, {0x9286: b"UNICODE\0" + text.encode("utf-16-be")})
    assert parameters.read_parameters(jpeg, cfg) == expected


def test_our_earlier_files_still_load(cfg):
    earlier = {"prompt": "a cat", "seed": 3, "width": 64, "height": 64, "styles": ["Plain"],
               "loras": [{"file": "a.safetensors", "weight": 0.5, "matched_keys": 3}]}
    png = png_with({"parameters": json.dumps(earlier)})
    jpeg = jpeg_with({0x010E: json.dumps(earlier)})   # EXIF ImageDescription
    for data in (png, jpeg):
        assert parameters.read_parameters(data, cfg) == {**{k: earlier[k] for k in ("prompt", "seed", "width",
                                                                                   "height", "styles")},
                                                         "loras": [["a.safetensors", 0.5]]}


def _written(**debug) -> dict:
    """Our writer's fields for one image with a refiner, the scheme's text of each scheme."""
    texts = sdxl_styles.image_texts(sdxl_styles.PromptOptions("a cat", "", (), sdxl_styles.StyleLibrary(),
                                                              wildcards=None), 1, 0)
    made = {scheme: parameters.image_metadata(
        texts, expansion=False, performance="Speed", steps=30, width=64, height=64, guidance_scale=4.0,
        sharpness=2.0, adm=(1.5, 0.8, 0.3), base_model="sdxl/juggernautXL_v8Rundiffusion.safetensors",
        refiner_model=debug.pop("refiner_model", "refiner.safetensors"), refiner_switch=0.5, sampler="euler",
        scheduler="karras", vae="Default (model)", seed=1, loras=[], scheme=scheme, save=True, **debug)
        for scheme in ("fooocus", "a1111")}
    return {scheme: metadata.text() for scheme, metadata in made.items()}


def test_our_debug_fields_are_written_as_upstreams_and_read_back(cfg):
    written = _written(adaptive_cfg=5.5, clip_skip=3, overwrite_switch=12, refiner_swap_method="separate",
                       freeu=(1.1, 1.2, 0.6, 0.4))
    data = json.loads(written["fooocus"])
    assert {k: data[k] for k in ("adaptive_cfg", "clip_skip", "overwrite_switch", "refiner_swap_method",
                                 "freeu")} == {"adaptive_cfg": 5.5, "clip_skip": 3, "overwrite_switch": 12,
                                               "refiner_swap_method": "separate", "freeu": "(1.1, 1.2, 0.6, 0.4)"}
    assert ('Refiner: refiner, Adaptive CFG: 5.5, Clip skip: 3, Overwrite Switch: 12, '   # no files: no hashes
            'Refiner Swap Method: separate, FreeU: "(1.1, 1.2, 0.6, 0.4)", Version: ') in written["a1111"]
    expected = {**DEBUG_EXPECTED, "refiner_swap_method": "separate"}
    for scheme, text in written.items():
        fields = parameters.parse_metadata(text, scheme, cfg=cfg)
        assert {k: fields.get(k) for k in expected} == expected, scheme
    # Our earlier layout (the request's own fields) keeps them too, typed.
    assert parameters.from_json({"prompt": "x", **expected, "clip_skip": "3"}, cfg=cfg) == {"prompt": "x", **expected}
    unreadable = {"clip_skip": 2.5, "adaptive_cfg": "nan", "refiner_swap_method": "both", "freeu": "(1, 2)"}
    assert parameters.from_json({"prompt": "x", **unreadable}, cfg=cfg) == {"prompt": "x"}


def test_debug_fields_upstream_leaves_out_stay_out(cfg):
    defaults = _written()
    data = json.loads(defaults["fooocus"])
    assert data["clip_skip"] == 2 and "Clip skip: 2" in defaults["a1111"]   # upstream's default 2 is > 1
    for key, label in (("adaptive_cfg", "Adaptive CFG"), ("overwrite_switch", "Overwrite Switch"),
                       ("refiner_swap_method", "Refiner Swap Method"), ("freeu", "FreeU")):
        assert key not in data and f"{label}:" not in defaults["a1111"]
    no_refiner = _written(refiner_model=None, clip_skip=1, overwrite_switch=12, refiner_swap_method="vae")
    data = json.loads(no_refiner["fooocus"])
    assert not {"clip_skip", "overwrite_switch", "refiner_swap_method"} & set(data)
    assert not any(f"{label}:" in no_refiner["a1111"] for label in ("Clip skip", "Overwrite", "Swap"))
    fields = parameters.parse_metadata(no_refiner["fooocus"], "fooocus", cfg=cfg)
    assert not set(DEBUG_EXPECTED) & set(fields)


def test_our_images_carry_upstreams_fields_and_load_back(pipeline, tiny_components):
    folders = pipeline(mm.Policy.RESIDENT)
    (folders["loras"] / "sub").mkdir()
    lora = lora_files.kohya_lora(tiny_components, str(folders["loras"] / "sub" / "style_lora.safetensors"))
    request = {**SMALL, "loras": [["sub/style_lora.safetensors", 0.7]], "adaptive_cfg": 5.5, "clip_skip": 3,
               "freeu_enabled": True, "freeu_b1": 1.1, "freeu_b2": 1.2, "freeu_s1": 0.6, "freeu_s2": 0.4}
    made = {fmt: pipelines.process_request({**request, "output_format": fmt}) for fmt in ("png", "jpeg")}
    for fmt, result in made.items():
        assert "error" not in result.report, result.report
        fields = parameters.read_parameters(result.images[0])
        assert fields == {**{k: v for k, v in request.items() if k != "output_format"}, "vae": "Default (model)",
                          "refiner_model": "None", "refiner_switch": 0.8, "performance": "Speed"}, fmt
    # What upstream's FooocusMetadataParser and load_parameter_button_click read, in its formats.
    png = Image.open(made["png"].images[0])
    assert png.text["fooocus_scheme"] == "fooocus"
    data = json.loads(png.text["parameters"])
    assert eval(data["styles"]) == ["Fooocus Sharp"] and eval(data["resolution"]) == (72, 64)
    assert eval(data["adm_guidance"]) == (1.2, 0.9, 0.5)
    assert data["lora_combined_1"].split(" : ") == ["style_lora", "0.7"]
    assert (data["base_model"], data["refiner_model"], data["vae"]) == ("tiny_sdxl_base", "None", "Default (model)")
    assert (int(data["seed"]), data["steps"], data["metadata_scheme"]) == (21, 2, "fooocus")
    assert (data["adaptive_cfg"], data["clip_skip"], data["freeu"]) == (5.5, 3, "(1.1, 1.2, 0.6, 0.4)")
    assert data["prompt"] == "a red fox\nin the snow" and data["full_prompt"] == ["a red fox, crisp focus, defined "
                                                                                  "edges, high local contrast, clear "
                                                                                  "textures", "in the snow"]
    jpeg = Image.open(made["jpeg"].images[0]).getexif()
    assert json.loads(jpeg[0x9286]) == data and jpeg[0x927C] == "fooocus"
    # The a1111 scheme: its text, with the AutoV2 hashes (sha256, 10 hex digits) of the files.
    a1111 = pipelines.process_request({**request, "metadata_scheme": "a1111"})
    text = Image.open(a1111.images[0]).text["parameters"]
    base = config.get_config().path_checkpoints[0] / "tiny_sdxl_base.safetensors"
    assert f"Model hash: {hashlib.sha256(base.read_bytes()).hexdigest()[:10]}" in text
    assert f"style_lora: {hashlib.sha256(Path(lora).read_bytes()).hexdigest()[:10]}" in text
    assert Image.open(a1111.images[0]).text["fooocus_scheme"] == "a1111"
    from_fooocus = parameters.read_parameters(made["png"].images[0])
    for key in ("refiner_model", "refiner_switch"):   # the a1111 scheme names a refiner only when one ran
        from_fooocus.pop(key)
    assert parameters.read_parameters(a1111.images[0]) == from_fooocus
    again = pipelines.process_request(parameters.read_parameters(made["jpeg"].images[0]))
    assert np.array_equal(pipelines.pixels(again.images[0]), pipelines.pixels(made["png"].images[0]))


def test_refiner_debug_fields_load_back_from_our_images(pipeline, tiny_refiner_checkpoint):
    folders = pipeline(mm.Policy.RESIDENT)
    shutil.copy(tiny_refiner_checkpoint, folders["checkpoints"] / "refiner.safetensors")
    request = {**SMALL, "steps": 4, "refiner_model": "refiner.safetensors", "overwrite_switch": 3,
               "refiner_swap_method": "separate"}
    for scheme in ("fooocus", "a1111"):
        result = pipelines.process_request({**request, "metadata_scheme": scheme})
        assert "error" not in result.report, result.report
        fields = parameters.read_parameters(result.images[0])
        assert {k: fields.get(k) for k in ("refiner_model", "overwrite_switch", "refiner_swap_method")} == {
            "refiner_model": "refiner.safetensors", "overwrite_switch": 3, "refiner_swap_method": "separate"}, scheme


def test_save_metadata_to_images_off_writes_none_and_the_log_still_records(tmp_path):
    from modules import default_pipeline, history_log
    cfg = config.load_config({"config_path": str(tmp_path / "none.txt"), "path_outputs": str(tmp_path / "out")})
    texts = sdxl_styles.image_texts(sdxl_styles.PromptOptions("a cat", "", (), sdxl_styles.StyleLibrary(),
                                                              wildcards=None), 1, 0)
    metadata = parameters.image_metadata(
        texts, expansion=False, performance="Speed", steps=2, width=8, height=8, guidance_scale=4.0, sharpness=2.0,
        adm=(1.5, 0.8, 0.3), base_model="a.safetensors", refiner_model=None, refiner_switch=0.8, sampler="euler",
        scheduler="karras", vae="Default (model)", seed=1, loras=[], scheme="fooocus", save=False)
    saved = default_pipeline.save_image(np.zeros((16, 24, 3), np.uint8), metadata, cfg, "png")
    assert "parameters" not in Image.open(saved.path).text
    entry, = history_log.read_entries(history_log.log_path(str(cfg.path_outputs)))
    assert entry["metadata_scheme"] is False and entry["resolution"] == "(24, 16)"   # the size saved


def test_vary_records_the_size_it_generated(pipeline, monkeypatch):
    pipeline(mm.Policy.CONSERVATIVE)
    monkeypatch.setattr(config, "_cached", dataclasses.replace(config.get_config(), image_input_side=64))
    from tests.helpers.input_image_files import picture, png64
    result = pipelines.process_request({**SMALL, "styles": [], "input_image": png64(picture(120, 48)),
                                        "uov_method": "Vary (Subtle)"})
    assert "error" not in result.report, result.report
    saved = Image.open(result.images[0])
    assert saved.size != (SMALL["width"], SMALL["height"])
    fields = parameters.read_parameters(result.images[0])
    assert (fields["width"], fields["height"]) == saved.size


def test_unreadable_parameters_are_clear_errors(tmp_path):
    with pytest.raises(parameters.ParameterError, match="not valid JSON"):
        parameters.from_json("{oops")
    with pytest.raises(parameters.ParameterError, match="no generation parameters"):
        parameters.from_json({"unrelated": 1})
    Image.new("RGB", (8, 8)).save(tmp_path / "plain.png")
    with pytest.raises(parameters.ParameterError, match="no generation parameters in its metadata"):
        parameters.read_parameters(str(tmp_path / "plain.png"))
    with pytest.raises(parameters.ParameterError, match="not an image"):
        parameters.read_parameters(b"not an image at all")


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
