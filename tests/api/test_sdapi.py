"""A1111 names and bodies onto our request: samplers and schedulers (A1111's tables), the
exact payloads webuiapi sends, and what is refused rather than silently ignored."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from modules import config as config_module
from modules.api import sdapi
from modules.api.common import ApiError
from tests.helpers.input_image_files import INPUT, MASK

OURS = ({"euler", "euler_ancestral", "dpmpp_2m", "dpmpp_2m_sde_gpu", "dpmpp_3m_sde_gpu", "heun"},
        {"normal", "karras", "exponential", "sgm_uniform"})


@pytest.mark.parametrize("sampler, scheduler, expected", [
    ("Euler a", "automatic", ("euler_ancestral", "normal")),       # A1111: Euler a has no scheduler of its own
    ("Euler a", "Karras", ("euler_ancestral", "karras")),           # a label works as well as a name
    ("DPM++ 2M", "automatic", ("dpmpp_2m", "karras")),              # DPM++ 2M's own is karras
    ("DPM++ 2M SDE", None, ("dpmpp_2m_sde_gpu", "exponential")),    # ... DPM++ 2M SDE's exponential
    ("DPM++ 2M Karras", None, ("dpmpp_2m", "karras")),              # the scheduler in the old name
    ("DPM++ 3M SDE Exponential", "automatic", ("dpmpp_3m_sde_gpu", "exponential")),
    ("k_euler", "uniform", ("euler", "normal")),                    # an alias; A1111's uniform is our normal
    ("euler", "sgm_uniform", ("euler", "sgm_uniform")),             # our own names pass through
    (None, None, (None, None)),                                     # not sent: the config's defaults
])
def test_a1111_samplers_map_onto_ours(sampler, scheduler, expected):
    assert sdapi.sampler_and_scheduler(sampler, scheduler, OURS) == expected


@pytest.mark.parametrize("sampler, scheduler, field", [
    ("LMS", None, "sampler_name"),              # A1111 has it, we do not
    ("Euler b", None, "sampler_name"),
    ("Euler", "beta", "scheduler"),
    ("Heun", "polyexponential", "scheduler"),
])
def test_names_we_cannot_run_fail_naming_the_field(sampler, scheduler, field):
    with pytest.raises(ApiError) as refused:
        sdapi.sampler_and_scheduler(sampler, scheduler, OURS)
    assert refused.value.param == field and refused.value.status == 422


def captured_payload(call) -> dict:
    """What webuiapi posts for `call(api)`, captured before it would leave the process."""
    import webuiapi

    api = webuiapi.WebUIApi(baseurl="http://127.0.0.1:9/sdapi/v1")   # nothing listens: no extensions found
    sent: list[dict] = []

    class Answer:
        status_code = 200

        @staticmethod
        def json() -> dict:
            return {"images": [], "info": "{}", "parameters": {}}

    api.session.post = lambda url, json: sent.append(json) or Answer()
    call(api)
    return sent[0]


@pytest.fixture
def cfg(tmp_path):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "other.safetensors").write_bytes(b"")
    return config_module.load_config({"config_path": str(tmp_path / "none"), "path_checkpoints": str(tmp_path / "ckpt")})


def same(value, field: str):
    return f"{field}:{value}"


def test_webuiapis_txt2img_payload_is_accepted_whole_and_mapped(cfg):
    payload = captured_payload(lambda api: api.txt2img(prompt="a dog <lora:style:0.8>", negative_prompt="blur",
                                                       seed=5, steps=3, width=64, height=96, batch_size=2,
                                                       override_settings={"sd_model_checkpoint": "other"}))
    body = sdapi.Txt2ImgRequest.model_validate(payload)
    request, ignored = sdapi.to_request(body, cfg, same)
    assert request == {"prompt": "a dog <lora:style:0.8>", "negative_prompt": "blur", "styles": [], "seed": 5,
                       "steps": 3, "guidance_scale": 7.0, "sampler": "euler_ancestral", "scheduler": "normal",
                       "width": 64, "height": 96, "image_number": 2, "base_model": "other.safetensors"}
    assert ignored == []


def test_webuiapis_img2img_is_a_vary_at_its_denoise_and_with_a_mask_an_inpaint(cfg):
    picture = Image.fromarray(INPUT)
    vary = sdapi.Img2ImgRequest.model_validate(captured_payload(
        lambda api: api.img2img(images=[picture], denoising_strength=0.4, prompt="a cat")))
    request, _ = sdapi.to_request(vary, cfg, same)
    assert request["uov_method"] == "Vary (Strong)" and request["overwrite_vary_strength"] == 0.4
    assert request["input_image"].startswith("init_images:data:image/png;base64,")
    assert "width" not in request and "inpaint_mask" not in request   # Vary sizes its output itself
    inpaint = sdapi.Img2ImgRequest.model_validate(captured_payload(
        lambda api: api.img2img(images=[picture], mask_image=Image.fromarray(MASK), denoising_strength=0.9)))
    request, _ = sdapi.to_request(inpaint, cfg, same)
    assert request["inpaint_strength"] == 0.9 and request["inpaint_mask"].startswith("mask:")
    assert "uov_method" not in request


@pytest.mark.parametrize("change, field", [
    ({"enable_hr": True}, "enable_hr"),
    ({"restore_faces": True}, "restore_faces"),
    ({"subseed_strength": 0.5}, "subseed_strength"),
    ({"script_name": "x/y/z plot"}, "script_name"),
    ({"alwayson_scripts": {"ControlNet": {"args": [{"enabled": True, "module": "canny"}]}}},
     "alwayson_scripts.ControlNet"),
    ({"batch_size": 8, "n_iter": 5}, "batch_size"),
])
def test_what_would_be_silently_dropped_is_refused(cfg, change, field):
    with pytest.raises(ApiError) as refused:
        sdapi.to_request(sdapi.Txt2ImgRequest.model_validate({"prompt": "x", **change}), cfg, same)
    assert refused.value.param == field


def test_clip_stop_at_last_layers_is_clip_skip(cfg):
    """2-12 is our clip_skip; 1 (A1111's default, the penultimate layer for SDXL there) keeps ours."""
    for value, expected in ((3, {"clip_skip": 3}), (1, {})):
        body = sdapi.Txt2ImgRequest.model_validate({"prompt": "x", "override_settings": {"CLIP_stop_at_last_layers": value}})
        request, _ = sdapi.to_request(body, cfg, same)
        assert request == {"prompt": "x", "image_number": 1, **expected}


def test_disabled_extensions_and_unknown_settings_pass(cfg):
    body = sdapi.Txt2ImgRequest.model_validate({
        "prompt": "x", "alwayson_scripts": {"ControlNet": {"args": []}, "ADetailer": {"args": [False]}},
        "override_settings": {"CLIP_stop_at_last_layers": 1, "eta_noise_seed_delta": 31337}, "eta": 0.5})
    request, ignored = sdapi.to_request(body, cfg, same)
    assert request == {"prompt": "x", "image_number": 1} and ignored == ["eta_noise_seed_delta"]


def test_memory_reads_our_ledgers():
    status = {"device": "cuda:0", "device_ledger": {"budget_bytes": 100, "used_bytes": 30},
              "host": {"budget_bytes": 1000, "used_bytes": 200},
              "cache_stats": {"high_water_bytes": {"cuda:0": 60}, "out_of_memory": 1}}
    answer = sdapi.memory_answer(status)
    assert answer["cuda"]["system"] == {"free": 70, "used": 30, "total": 100}
    assert answer["ram"] == {"free": 800, "used": 200, "total": 1000}
    assert answer["cuda"]["active"]["peak"] == 60 and answer["cuda"]["events"]["oom"] == 1
    assert json.dumps(answer["fooocus"]) == json.dumps(status)
    assert "error" in sdapi.memory_answer({"device": "cpu", "device_ledger": {}})["cuda"]


def _b64(image: Image.Image, fmt: str, **options) -> str:
    import base64
    import io
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return base64.b64encode(buffer.getvalue()).decode()


def test_png_info_reads_both_schemes_and_jpeg_exif():
    """Files laid out as upstream Fooocus writes them: a PNG with an a1111 ``parameters`` text
    (``fooocus_scheme`` a1111), a JPEG with the fooocus JSON in EXIF UserComment (0x9286) and
    the scheme in MakerNote (0x927C)."""
    from PIL import PngImagePlugin

    text = "a harbour\nNegative prompt: rain\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 99, Size: 64x64"
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    info.add_text("fooocus_scheme", "a1111")
    png = sdapi.png_info_answer(_b64(Image.new("RGB", (64, 64)), "PNG", pnginfo=info))
    assert png["info"] == text and png["items"] == {"fooocus_scheme": "a1111"}
    assert (png["parameters"]["prompt"], png["parameters"]["negative_prompt"], png["parameters"]["seed"]) == (
        "a harbour", "rain", 99)
    exif = Image.Exif()
    exif[0x9286] = json.dumps({"prompt": "a boat", "negative_prompt": "", "resolution": "(64, 96)", "seed": "7",
                               "performance": "Speed", "guidance_scale": 4.0})
    exif[0x927C] = "fooocus"
    jpeg = sdapi.png_info_answer(_b64(Image.new("RGB", (64, 96)), "JPEG", exif=exif.tobytes()))
    assert (jpeg["parameters"]["prompt"], jpeg["parameters"]["seed"], jpeg["parameters"]["height"]) == ("a boat", 7, 96)
