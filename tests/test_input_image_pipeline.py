"""Vary, Upscale, Image Prompt, Inpaint and Outpaint through the pipeline, on tiny networks
written under upstream's file names: output sizes, errors naming the file or field, what
stays resident, and what the conservative policy reloads."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from ldm_patched.modules import model_management as mm
from modules import config
from tests.helpers import input_image_files, pipelines
from tests.helpers.input_image_files import INPUT, MODES, box_mask, png64

BASE = {"prompt": "a cat", "base_model": "tiny_sdxl_base.safetensors", "width": 64, "height": 64,
        "steps": 2, "seed": 5, "performance": "Speed"}


@pytest.fixture
def served(pipeline, tiny_components, monkeypatch):
    """`install(policy)`: the pipeline fixture's folders with every input-image model file,
    image_input_side small."""
    def install(policy, inpaint_files: bool = True):
        return input_image_files.serve(pipeline, tiny_components["unet"], monkeypatch, policy, inpaint_files)
    return install


def run(extra: dict) -> tuple[list[str], dict]:
    result = pipelines.process_request({**BASE, **extra})
    return result.images, result.report


@pytest.mark.parametrize("mode", list(MODES))
def test_each_mode_makes_an_image_of_the_right_size(served, mode):
    served(mm.Policy.RESIDENT)
    extra, size = MODES[mode]
    images, report = run(extra)
    assert "error" not in report, report
    assert len(images) == 1
    with Image.open(images[0]) as image:
        assert image.size == size


def test_inpaint_keeps_the_pixels_away_from_the_mask(served):
    served(mm.Policy.RESIDENT)
    images, report = run(MODES["inpaint"][0])
    assert "error" not in report, report
    out = np.asarray(Image.open(images[0]).convert("RGB"))
    far = box_mask(96, 64, (0, 0, 96, 64)) > 0
    far[:24 + 33, :24 + 33] = False   # the mask and the 32-pixel feathered ring around it
    assert np.array_equal(out[far], INPUT[far])
    assert not np.array_equal(out[8:24, 8:24], INPUT[8:24, 8:24])   # the masked area was repainted
    assert report["inpaint_patch"] == input_image_files.INPAINT_PATCH_FILE
    assert report["inpaint_head"] == input_image_files.INPAINT_HEAD_FILE


def test_the_parsed_inpaint_patch_is_charged_to_the_host_ledger(served):
    served(mm.Policy.RESIDENT)
    assert "error" not in run(MODES["inpaint"][0])[1]
    status = pipelines.current().model_status()
    host = status.get("host") or status["device_ledger"]   # the CPU device is the host
    unet = dict(pipelines.current().catalogue.state.checkpoints).popitem()[1].unet.model
    quantized = sum(unet.get_parameter(name).numel() for name in input_image_files.INPAINT_PATCH_KEYS.values())
    assert host["caches"]["inpaint_patches"] >= quantized   # one uint8 per patched weight, at least


def test_fast_upscale_encodes_no_prompt(served):
    served(mm.Policy.RESIDENT)
    images, report = run(MODES["fast upscale"][0])
    assert len(images) == 1 and report["model_management"]["text_encodes"] == 0


def test_inpaint_without_the_patch_files_works_by_blending_alone(served):
    served(mm.Policy.RESIDENT, inpaint_files=False)
    images, report = run(MODES["inpaint"][0])
    assert "error" not in report, report
    assert report["inpaint_patch"] is None and "inpaint_head" not in report
    assert report["model_management"]["weights_patched"] == 0


def test_image_prompts_change_the_image_not_the_weights(served):
    served(mm.Policy.RESIDENT)
    plain_images, plain = run({})
    prompted_images, prompted = run(MODES["image prompt"][0])
    assert "error" not in prompted, prompted
    assert prompted["model_management"]["weights_patched"] == 0
    plain_pixels = np.asarray(Image.open(plain_images[0]))
    assert not np.array_equal(plain_pixels, np.asarray(Image.open(prompted_images[0])))
    # weight 0: the processors are a no-op, the same pixels as without image prompts
    zero_images, _ = run({"image_prompts": [[png64(INPUT), 0.5, 0.0, "ImagePrompt"]]})
    assert np.array_equal(plain_pixels, np.asarray(Image.open(zero_images[0])))


@pytest.mark.parametrize("file_name, field", [
    (input_image_files.UPSCALER_FILE, "uov_method"),
    (input_image_files.IP_ADAPTER_FILE, "image_prompts"),
    (input_image_files.CLIP_VISION_FILE, "image_prompts"),
    (input_image_files.INPAINT_PATCH_FILE, None),
])
def test_a_file_of_the_wrong_architecture_is_named_and_the_server_goes_on(served, tmp_path, file_name, field):
    folders = served(mm.Policy.RESIDENT)
    folder = next(f for f in (folders["upscale_models"], folders["controlnet"], folders["clip_vision"],
                              folders["inpaint"]) if (f / file_name).is_file())
    from safetensors.torch import save_file
    import torch
    wrong = tmp_path / "lora.safetensors"   # a kohya LoRA where the model file should be
    save_file({"lora_unet_conv_in.lora_up.weight": torch.zeros(4, 2),
               "lora_unet_conv_in.lora_down.weight": torch.zeros(2, 4)}, str(wrong))
    (folder / file_name).write_bytes(wrong.read_bytes())
    mode = {"uov_method": "upscale", "image_prompts": "image prompt"}.get(field, "inpaint")
    images, report = run(MODES[mode][0])
    assert images == [] and file_name in report["error"], report
    if field:
        assert f"field '{field}'" in report["error"]
    images, report = run({})   # the next request works
    assert "error" not in report and len(images) == 1


def test_a_missing_model_file_names_the_file_and_its_config_key(served):
    folders = served(mm.Policy.RESIDENT)
    (folders["upscale_models"] / input_image_files.UPSCALER_FILE).unlink()
    images, report = run(MODES["upscale"][0])
    assert images == []
    assert input_image_files.UPSCALER_FILE in report["error"] and "path_upscale_models" in report["error"]


@pytest.mark.parametrize("extra, field", [
    ({"uov_method": "Vary (Subtle)"}, "input_image"),
    ({"input_image": png64(INPUT)}, "input_image"),
    ({"input_image": png64(INPUT), "uov_method": "Vary (Medium)"}, "uov_method"),
    ({"input_image": "not an image", "uov_method": "Vary (Subtle)"}, "input_image"),
    ({"input_image": png64(INPUT), "inpaint_mask": png64(np.zeros((64, 96), np.uint8))}, "inpaint_mask"),
    ({"input_image": png64(INPUT), "outpaint_selections": ["Up"]}, "outpaint_selections"),
    ({"image_prompts": [[png64(INPUT), 0.5, 0.6, "FaceSwap"]]}, "image_prompts"),
    ({"image_prompts": [[png64(INPUT)]] * 5}, "image_prompts"),
    ({"image_prompts": [[png64(INPUT), float("nan")]]}, "image_prompts"),
    ({"input_image": png64(INPUT), "uov_method": "Vary (Strong)", "overwrite_vary_strength": 2}, "overwrite_vary_strength"),
    ({"input_image": png64(INPUT), "uov_method": "Upscale (2x)", "overwrite_upscale_strength": "x"},
     "overwrite_upscale_strength"),
])
def test_bad_input_image_fields_are_named(served, extra, field):
    served(mm.Policy.RESIDENT)
    images, report = run(extra)
    assert images == [] and f"'{field}" in report["error"], report


def test_overwrite_vary_strength_is_the_denoise_vary_runs_at(served):
    """Upstream's overwrite slider: Vary (Strong) at 0.5 is exactly Vary (Subtle), whose own
    denoise is 0.5; -1 keeps Strong's own 0.85."""
    served(mm.Policy.RESIDENT)
    vary = {"input_image": png64(INPUT)}
    at_half, report = run({**vary, "uov_method": "Vary (Strong)", "overwrite_vary_strength": 0.5})
    subtle, _ = run({**vary, "uov_method": "Vary (Subtle)"})
    own, _ = run({**vary, "uov_method": "Vary (Strong)", "overwrite_vary_strength": -1})
    assert report["overwrite_vary_strength"] == 0.5
    assert np.array_equal(pipelines.pixels(at_half[0]), pipelines.pixels(subtle[0]))
    assert not np.array_equal(pipelines.pixels(at_half[0]), pipelines.pixels(own[0]))


def _session() -> list[dict]:
    return [{}] + [MODES[m][0] for m in ("vary", "upscale", "image prompt", "inpaint")]


def test_resident_second_round_loads_and_merges_nothing(served):
    """A Fooocus session (text to image, vary, upscale, image prompt, inpaint), twice: the
    second round loads no model and merges no weight (the inpaint patch set is reached
    again: restored for text to image, merged back for inpaint only without kept variants,
    which a CPU device never keeps)."""
    served(mm.Policy.RESIDENT)
    for request in _session():
        assert "error" not in run(request)[1]
    second = [run(request)[1]["model_management"] for request in _session()]
    assert [m["models_loaded"] for m in second] == [0] * 5
    assert [m["lora_files_read"] for m in second] == [0] * 5
    # only the inpaint patch's keys change, and only between text-to-image and inpaint
    patched = [m["weights_patched"] for m in second]
    assert patched[:4] == [0] * 4 and patched[4] == len(input_image_files.INPAINT_PATCH_KEYS)


def test_conservative_reloads_the_models_every_request(served):
    served(mm.Policy.CONSERVATIVE)
    for request in _session():
        assert "error" not in run(request)[1]
    second = [run(request)[1]["model_management"] for request in _session()]
    assert all(m["models_loaded"] > 0 for m in second), second


def test_input_image_models_show_in_the_model_status(served):
    served(mm.Policy.RESIDENT)
    for mode in ("upscale", "image prompt", "inpaint"):
        assert "error" not in run(MODES[mode][0])[1]
    names = [m["name"] for m in pipelines.current().model_status()["models"]]
    for suffix in (":upscaler", ":ip_adapter", ":clip_vision", ":inpaint_head"):
        assert any(n.endswith(suffix) for n in names), names
    json.dumps(pipelines.current().model_status())   # JSON-able for /model_status


def test_every_mode_runs_compiled_and_a_second_round_recompiles_nothing(served, use_compiler):
    """`--compile-unet` with the input-image features: the image-prompt processors, the
    ControlNets' residuals (inputs of the compiled UNet; the ControlNets run eager), the inpaint
    head and patch, and img2img's partial schedules all run through the compiled UNet. The
    first round may compile a graph per shape and per feature; the second compiles nothing,
    and every image equals the eager one."""
    diffusion = [m for m in MODES if m != "fast upscale"]
    use_compiler(enabled=False)
    served(mm.Policy.RESIDENT)
    eager = {m: pipelines.pixels(run(MODES[m][0])[0][0]) for m in diffusion}

    use_compiler(enabled=True, backend="aot_eager")
    served(mm.Policy.RESIDENT)   # a fresh registry: the UNet loads anew
    first = {m: run(MODES[m][0]) for m in diffusion}
    assert all("error" not in report for _, report in first.values()), first
    after_first = pipelines.graphs_compiled()
    for mode in diffusion:
        images, report = run(MODES[mode][0])
        assert "error" not in report, (mode, report)
        compile_report = report["compile"]
        assert compile_report["ran_compiled"] and compile_report["eager_calls"] == 0, (mode, compile_report)
        assert compile_report["graphs_compiled"] == 0, (mode, compile_report)
        assert np.abs(pipelines.pixels(images[0]) - eager[mode]).max() <= 1, mode
    assert pipelines.graphs_compiled() == after_first


def test_input_image_work_is_capped_before_it_starts(served, monkeypatch):
    """From an input image the working size is the image's: the cost cap and the largest side
    apply to it, and nothing is upscaled or encoded first."""
    served(mm.Policy.RESIDENT)
    calls = []
    from modules import core, upscaler
    monkeypatch.setattr(upscaler, "upscale", lambda *a, **k: calls.append("upscale"))
    monkeypatch.setattr(core, "encode", lambda *a, **k: calls.append("encode"))
    wide = png64(np.zeros((16, 2056, 3), np.uint8))
    images, report = run({"input_image": wide, "uov_method": "Upscale (2x)"})
    assert images == [] and "'input_image'" in report["error"] and "4112x32" in report["error"], report
    monkeypatch.setenv("max_megapixel_steps", "0.001")
    config.reload_config()
    for mode in ("vary", "inpaint"):
        images, report = run(MODES[mode][0])
        assert images == [] and "max_megapixel_steps" in report["error"] and "'input_image'" in report["error"]
    assert calls == []


@pytest.mark.parametrize("mode, stage", [("upscale", "upscaler"), ("vary", "vae_encode"), ("text", "vae_decode")])
def test_a_stop_ends_the_upscaler_and_the_vae_at_the_next_tile(served, monkeypatch, mode, stage):
    """Stop pressed while the first tile of a stage runs: no other tile, UNet step or VAE
    pass runs after it (counted, not timed), and the request ends stopped."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from modules import core, upscaler
    from modules.task_types import TaskControl

    served(mm.Policy.RESIDENT)
    monkeypatch.setattr(core, "VAE_TILE_ABOVE", 0)           # tiles at this tiny size, as at a large one
    monkeypatch.setattr(core, "VAE_TILE", 32)
    monkeypatch.setattr(core, "VAE_TILE_OVERLAP", 16)
    monkeypatch.setattr(upscaler, "UPSCALE_TILE", 16)
    monkeypatch.setattr(upscaler, "UPSCALE_OVERLAP", 8)
    control, work = TaskControl(), []

    def counted(cls, name, kind):
        real = getattr(cls, name)

        def call(self, *args, **kwargs):
            work.append((kind, control.stop.is_set()))
            if kind == stage:
                control.stop.set()   # the Stop arrives while this stage's first tile runs
            return real(self, *args, **kwargs)
        monkeypatch.setattr(cls, name, call)

    counted(AutoencoderKL, "encode", "vae_encode")
    counted(AutoencoderKL, "decode", "vae_decode")
    counted(UNet2DConditionModel, "forward", "unet")
    counted(upscaler.UpscalerModule, "forward", "upscaler")
    extra = {} if mode == "text" else MODES[mode][0]
    result = pipelines.process_request({**BASE, **extra, "image_number": 2}, control)
    assert result.report.get("stopped") is True and result.images == [], result.report
    stage_calls = [kind for kind, _ in work if kind == stage]
    assert stage_calls == [stage], work   # one tile of several, then nothing
    assert [kind for kind, after_stop in work if after_stop] == [], work


@pytest.mark.parametrize("mode", ["vary", "image prompt", "inpaint"])
def test_an_input_image_requests_images_share_one_unet_batch_each_as_its_seed_alone(served, mode):
    """Its images start from the same input, each with its own seed: one UNet batch (the
    request does not join others'), each image within BATCH_TOLERANCE of its seed alone."""
    served(mm.Policy.RESIDENT)
    extra = MODES[mode][0]
    images, report = run({**extra, "image_number": 2})
    assert "error" not in report, report
    assert report["unet_rows_per_call"] == {"4": report["unet_calls"]} and len(images) == 2
    assert pipelines.current().batch_key({**BASE, **extra}) is None
    for i, path in enumerate(images):
        alone, _ = run({**extra, "seed": BASE["seed"] + i})
        assert pipelines.max_difference(path, alone[0]) <= pipelines.BATCH_TOLERANCE
