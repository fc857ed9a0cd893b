"""Requests end to end on tiny models: parity with diffusers, both policies, errors, Stop."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from ldm_patched.modules import model_management as mm
from ldm_patched.modules.checkpoint import load_checkpoint
from ldm_patched.modules.lora import read_lora_file, match_lora, text_encoder_lora_names, unet_lora_names
from ldm_patched.modules.model_patcher import ModelPatcher
from modules import core, default_pipeline
from modules.task_types import TaskControl
from tests.helpers.lora_files import kohya_lora
from tests.helpers import pipelines
from tests.helpers.pipelines import BASE, SMALL, pixels
from modules import generation_request

def layer_lora(components, path, layers: tuple[str, ...], rank: int = 2) -> str:
    """A kohya LoRA over the UNet layers whose names contain one of `layers` (no text encoder)."""
    return kohya_lora(components, path, rank=rank, alpha=float(rank), unet_layers=layers, te_layers=())


def test_same_image_as_diffusers_pipeline(pipeline, tiny_checkpoint, diffusers_config_dir):
    from diffusers import StableDiffusionXLPipeline

    pipeline(mm.Policy.CONSERVATIVE)
    ours = pipelines.process_request(dict(SMALL))
    assert "error" not in ours.report, ours.report
    pipe = StableDiffusionXLPipeline.from_single_file(tiny_checkpoint, config=diffusers_config_dir,
                                                      local_files_only=True)
    theirs = pipe(prompt=SMALL["prompt"], negative_prompt=SMALL["negative_prompt"], width=64, height=64,
                  num_inference_steps=3, guidance_scale=5.0, output_type="np",
                  generator=torch.Generator("cpu").manual_seed(SMALL["seed"])).images[0]
    difference = np.abs(pixels(ours.images[0]) - np.round(theirs * 255)).max()
    assert difference <= 2
    assert pixels(ours.images[0]).std() > 1  # a real picture, not a constant


@pytest.mark.parametrize("name", ["SSD-1B", "KOALA-700M"])
def test_distilled_checkpoint_gives_diffusers_pipelines_image(name, pipeline, tiny_family_checkpoint, tmp_path):
    """SDXL distillations upstream loads (fewer transformers, a one-resnet or no mid block)."""
    from diffusers import StableDiffusionXLPipeline

    from ldm_patched.modules.demo_model import write_diffusers_config_dir

    path, parts = tiny_family_checkpoint(name)
    folders = pipeline(mm.Policy.RESIDENT)
    shutil.copy(path, folders["checkpoints"] / os.path.basename(path))
    ours = pipelines.process_request({**SMALL, "base_model": os.path.basename(path)})
    assert "error" not in ours.report, ours.report
    pipe = StableDiffusionXLPipeline.from_single_file(path, config=write_diffusers_config_dir(tmp_path / "c", parts),
                                                      local_files_only=True)
    theirs = pipe(prompt=SMALL["prompt"], negative_prompt=SMALL["negative_prompt"], width=64, height=64,
                  num_inference_steps=3, guidance_scale=5.0, output_type="np",
                  generator=torch.Generator("cpu").manual_seed(SMALL["seed"])).images[0]
    assert np.abs(pixels(ours.images[0]) - np.round(theirs * 255)).max() <= 2
    assert pixels(ours.images[0]).std() > 1


def test_repeated_request_moves_and_patches_nothing_when_resident(pipeline, tiny_components):
    folders = pipeline(mm.Policy.RESIDENT)
    kohya_lora(tiny_components, folders["loras"] / "style.safetensors")
    request = {**SMALL, "loras": [["style.safetensors", 0.8]]}
    reports = [pipelines.process_request(dict(request)).report for _ in range(4)]
    assert "error" not in reports[0] and reports[0]["model_management"]["weights_patched"] > 0
    for report in reports[1:]:
        moved = report["model_management"]
        assert (moved["models_loaded"], moved["weights_patched"], moved["bytes_to_device"],
                moved["lora_files_read"], moved["text_encodes"]) == (0, 0, 0, 0, 0)


def test_guidance_1_encodes_the_prompt_once_and_gives_the_same_image(pipeline, tiny_components):
    """Extreme Speed (cfg 1) never reads the negative prompt: upstream encodes only the positive;
    a Speed request at guidance 1 samples the same way. Conservative keeps no cache, so the
    count is the encodes themselves."""
    folders = pipeline(mm.Policy.CONSERVATIVE)
    kohya_lora(tiny_components, folders["loras"] / "sdxl_lcm_lora.safetensors")
    distilled = pipelines.process_request({**SMALL, "performance": "Extreme Speed", "steps": 2})
    plain = pipelines.process_request({**SMALL, "guidance_scale": 1.0, "steps": 2})
    guided = pipelines.process_request({**SMALL, "steps": 2})
    assert [r.report["model_management"]["text_encodes"] for r in (distilled, plain, guided)] == [1, 1, 2]
    other_negative = pipelines.process_request({**SMALL, "guidance_scale": 1.0, "steps": 2, "negative_prompt": "x"})
    assert np.array_equal(pixels(plain.images[0]), pixels(other_negative.images[0]))


def test_conservative_loads_and_patches_every_request(pipeline, tiny_components):
    folders = pipeline(mm.Policy.CONSERVATIVE)
    kohya_lora(tiny_components, folders["loras"] / "style.safetensors")
    request = {**SMALL, "loras": [["style.safetensors", 0.8]]}
    for _ in range(3):
        moved = pipelines.process_request(dict(request)).report["model_management"]
        assert moved["models_loaded"] > 0 and moved["weights_patched"] > 0


def test_same_pixels_in_both_policies_and_after_lora_round_trip(pipeline, tiny_components):
    folders = pipeline(mm.Policy.CONSERVATIVE)
    kohya_lora(tiny_components, folders["loras"] / "a.safetensors")
    layer_lora(tiny_components, folders["loras"] / "b.safetensors", ("ff.net.2", "conv2"))
    with_a = {**SMALL, "loras": [["a.safetensors", 1.0]]}
    with_b = {**SMALL, "loras": [["b.safetensors", 1.0]]}
    conservative = pixels(pipelines.process_request(dict(with_a)).images[0])
    pipeline(mm.Policy.RESIDENT)
    first = pixels(pipelines.process_request(dict(with_a)).images[0])
    other = pixels(pipelines.process_request(dict(with_b)).images[0])
    again = pixels(pipelines.process_request(dict(with_a)).images[0])
    assert np.array_equal(conservative, first) and np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_lora_switch_patches_only_the_changed_keys(pipeline, tiny_components):
    folders = pipeline(mm.Policy.RESIDENT)
    layer_lora(tiny_components, folders["loras"] / "a.safetensors", ("attn1.to_q", "attn2.to_k"))
    layer_lora(tiny_components, folders["loras"] / "b.safetensors", ("ff.net.0.proj", "conv1"))
    a_keys = len(read_lora_file(str(folders["loras"] / "a.safetensors")).layers)
    b_keys = len(read_lora_file(str(folders["loras"] / "b.safetensors")).layers)
    run = lambda loras: pipelines.process_request({**SMALL, "loras": loras}).report["model_management"]  # noqa
    run([["a.safetensors", 1.0]])
    add_b = run([["a.safetensors", 1.0], ["b.safetensors", 0.5]])
    assert (add_b["weights_patched"], add_b["weights_restored"], add_b["models_loaded"]) == (b_keys, 0, 0)
    drop_a = run([["b.safetensors", 0.5]])
    assert (drop_a["weights_patched"], drop_a["weights_restored"], drop_a["models_loaded"]) == (0, a_keys, 0)


def test_small_budget_evicts_least_recently_used_and_stays_within_it(pipeline, monkeypatch):
    pipeline(mm.Policy.RESIDENT)
    monkeypatch.setattr(mm, "working_memory_bytes", lambda *a, **k: 0)
    checkpoint = pipelines.current().catalogue.get_checkpoint(generation_request.resolve_checkpoint(BASE, _config()))
    sizes = {name: p.model_size() for name, p in
             (("clip", checkpoint.clip), ("unet", checkpoint.unet), ("vae", checkpoint.vae))}
    budget = sizes["clip"] + sizes["unet"]        # two of three fit; the VAE makes it tight
    assert budget < sum(sizes.values()) and budget >= max(sizes.values()) + min(sizes.values())
    pipeline(mm.Policy.RESIDENT, budget=budget)
    manager = mm.get_manager()
    evicted = []
    original_evict = manager._evict
    monkeypatch.setattr(manager, "_evict", lambda entry: (evicted.append(entry.patcher.name.split(":")[1]),
                                                          original_evict(entry)))
    for prompt in ("a cat", "a dog"):
        report = pipelines.process_request({**SMALL, "prompt": prompt})
        assert "error" not in report.report
        assert report.report["vram"]["resident_bytes"] <= budget
    # Request 1: encoders, UNet, then the VAE needs room: the encoders (least recent) go.
    # Request 2: the encoders need room: of UNet and VAE the UNet is older; then the UNet
    # needs room and the VAE is now the older of the two outside that load.
    assert evicted[:3] == ["text_encoders", "unet", "vae"]


def test_budget_too_small_for_one_request_still_succeeds(pipeline):
    pipeline(mm.Policy.RESIDENT, budget=1024)
    report = pipelines.process_request(dict(SMALL)).report
    assert "error" not in report and report["model_management"]["over_budget"]
    assert report["vram"]["resident_bytes"] <= 1024
    assert pipelines.process_request(dict(SMALL)).images


def checksums(module: torch.nn.Module) -> dict[str, float]:
    return {k: float(v.double().sum()) for k, v in module.state_dict().items()}


@pytest.mark.parametrize("policy", list(mm.Policy))
def test_stop_mid_sampling_leaves_consistent_weights(policy, pipeline, tiny_components, tiny_checkpoint):
    folders = pipeline(policy)
    kohya_lora(tiny_components, folders["loras"] / "style.safetensors")
    request = {**SMALL, "loras": [["style.safetensors", 0.6]], "steps": 4}
    uninterrupted = pixels(pipelines.process_request(dict(request)).images[0])
    control = TaskControl()

    def stop_at_step_two(event):
        if event.stage == "sampling" and event.step == 2:
            control.stop.set()
    stopped = pipelines.process_request(dict(request), control, stop_at_step_two)
    assert stopped.report.get("stopped") and stopped.images == []
    assert np.array_equal(pixels(pipelines.process_request(dict(request)).images[0]), uninterrupted)

    fresh = load_checkpoint(tiny_checkpoint)
    original_unet = checksums(fresh.unet)
    unet = ModelPatcher(fresh.unet, torch.device("cpu"), torch.device("cpu"))
    clip = ModelPatcher(core.SDXLTextEncoders(fresh.text_encoder, fresh.text_encoder_2), torch.device("cpu"),
                        torch.device("cpu"))
    match = match_lora(read_lora_file(str(folders["loras"] / "style.safetensors")),
                       {"unet": (unet_lora_names(unet.model), unet.model),
                        "clip": (text_encoder_lora_names(clip.model), clip.model)})
    unet.add_patches(match.patches["unet"], 0.6)
    clip.add_patches(match.patches["clip"], 0.6)
    unet.patch_model()
    clip.patch_model()
    resident = next(iter(pipelines.current().catalogue.state.checkpoints.values()))
    if policy is mm.Policy.RESIDENT:  # the patched state stays, with the request's signature
        assert checksums(resident.unet.model) == checksums(unet.model)
        assert checksums(resident.clip.model) == checksums(clip.model)
    else:  # the VAE load evicted the UNet, restoring its originals
        assert checksums(resident.unet.model) == original_unet


def test_skip_drops_the_first_image_of_the_batch_at_the_next_step_and_the_other_goes_on(pipeline):
    pipeline(mm.Policy.RESIDENT)
    control = TaskControl()
    sampling = []

    def skip_at_the_first_step(event):
        if event.stage == "sampling" and event.step:
            sampling.append((event.image_index, event.images, event.step))
            if event.step == 1:
                control.skip.set()
    request = {**SMALL, "image_number": 2, "steps": 3}
    result = pipelines.process_request(dict(request), control, skip_at_the_first_step)
    # Both images sample in one batch; the Skip asked during step 1 is taken after step 2,
    # whose progress is then the second image's alone, and the last call has its rows only.
    assert sampling == [(0, 2, 1), (1, 1, 2), (1, 1, 3)]
    assert result.report["unet_calls"] == 3 and result.report["unet_rows_per_call"] == {"4": 2, "2": 1}
    assert len(result.images) == 1
    assert result.report["skipped"] == [SMALL["seed"]] and result.report["seeds"] == [SMALL["seed"] + 1]
    alone = pipelines.process_request({**request, "image_number": 1, "seed": SMALL["seed"] + 1})
    assert pipelines.max_difference(result.images[0], alone.images[0]) <= pipelines.BATCH_TOLERANCE


def test_stop_keeps_the_images_already_decoded_and_drops_the_batch_it_ends(pipeline, monkeypatch):
    pipeline(mm.Policy.RESIDENT)
    pipelines.use_max_batch(monkeypatch, 2)   # images 1-2 in one batch, image 3 in the next
    control = TaskControl()
    events = []

    def stop_in_the_second_batch(event):
        events.append(event)
        if event.stage == "sampling" and event.image_index == 2 and event.step == 1:
            control.stop.set()
    request = {**SMALL, "image_number": 3, "steps": 2}
    result = pipelines.process_request(dict(request), control, stop_in_the_second_batch)
    assert result.report.get("stopped") and "error" not in result.report
    assert len(result.images) == 2 and all(os.path.isfile(p) for p in result.images)
    for seed, path in zip((SMALL["seed"], SMALL["seed"] + 1), result.images):
        alone = pipelines.process_request({**request, "image_number": 1, "seed": seed})
        assert pipelines.max_difference(path, alone.images[0]) <= pipelines.BATCH_TOLERANCE
    stages = [e.stage for e in events]
    assert stages[:2] == ["loading", "encoding"] and "decoding" in stages
    assert events[0].message == f"Loading {BASE}"   # the loading stage names the checkpoint
    previews = [e.preview for e in events if e.preview is not None]
    assert previews and previews[0].dtype == np.uint8 and previews[0].ndim == 3 and previews[0].shape[2] == 3


def _config():
    from modules import config
    return config.get_config()


def test_bad_checkpoints_and_loras_fail_clearly_and_the_next_request_works(pipeline, tiny_components):
    folders = pipeline(mm.Policy.RESIDENT)
    checkpoints, loras = folders["checkpoints"], folders["loras"]
    (checkpoints / "corrupt.safetensors").write_bytes(os.urandom(1000))
    save_file({"cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(4, 4),
               "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)},
              str(checkpoints / "sd15.safetensors"))
    torch.save({"x": torch.zeros(1)}, loras / "pickled.ckpt")
    save_file({"lora_unet_foo_bar.lora_up.weight": torch.zeros(2, 2),
               "lora_unet_foo_bar.lora_down.weight": torch.zeros(2, 2)}, str(loras / "other_arch.safetensors"))
    layer_lora(tiny_components, loras / "good.safetensors", ("attn1.to_q",))
    parsed = read_lora_file(str(loras / "good.safetensors"))
    name = next(iter(parsed.layers))
    save_file({f"{name}.lora_up.weight": torch.zeros(999, 2),
               f"{name}.lora_down.weight": parsed.layers[name].down.contiguous()}, str(loras / "wrong_shape.safetensors"))
    good = pipelines.process_request(dict(SMALL))
    cases = [({"base_model": "corrupt.safetensors"}, "corrupt.safetensors"),
             ({"base_model": "sd15.safetensors"}, "sd15.safetensors"),
             ({"base_model": "missing.safetensors"}, "missing.safetensors"),
             ({"loras": [["pickled.ckpt", 1.0]]}, "pickled.ckpt"),
             ({"loras": [["other_arch.safetensors", 1.0]]}, "other_arch.safetensors"),
             ({"loras": [["wrong_shape.safetensors", 1.0]]}, "wrong_shape.safetensors"),
             ({"sampler": "no_such_sampler"}, "no_such_sampler"),
             ({"width": 100000}, "width")]
    for change, named in cases:
        result = pipelines.process_request({**SMALL, **change})
        assert result.images == [] and named in result.report["error"], (change, result.report.get("error"))
        after = pipelines.process_request(dict(SMALL))
        assert "error" not in after.report
        assert np.array_equal(pixels(after.images[0]), pixels(good.images[0]))


def test_sd15_error_says_what_was_found(pipeline):
    folders = pipeline(mm.Policy.CONSERVATIVE)
    save_file({"cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(4, 4),
               "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)},
              str(folders["checkpoints"] / "sd15.safetensors"))
    error = pipelines.process_request({**SMALL, "base_model": "sd15.safetensors"}).report["error"]
    assert "1.x" in error or "1.5" in error


def test_image_files_carry_parameters_and_seeds_count_up(pipeline):
    pipeline(mm.Policy.RESIDENT)
    result = pipelines.process_request({**SMALL, "image_number": 2, "seed": 41})
    assert result.report["seeds"] == [41, 42]
    parameters = [json.loads(Image.open(p).text["parameters"]) for p in result.images]
    assert [p["seed"] for p in parameters] == ["41", "42"]   # upstream's fooocus scheme writes text
    assert parameters[0]["prompt"] == "a cat"
    assert not np.array_equal(pixels(result.images[0]), pixels(result.images[1]))


def test_refiner_takes_over_at_the_switch_step(pipeline, tiny_refiner_checkpoint):
    folders = pipeline(mm.Policy.RESIDENT)
    shutil.copy(tiny_refiner_checkpoint, folders["checkpoints"] / "refiner.safetensors")
    request = {**SMALL, "steps": 4}
    alone = pipelines.process_request(dict(request))
    switched = pipelines.process_request({**request, "refiner_model": "refiner.safetensors",
                                                 "refiner_switch": 0.5})
    never = pipelines.process_request({**request, "refiner_model": "refiner.safetensors",
                                              "refiner_switch": 1.0})
    assert switched.report["refiner_model"] == "refiner.safetensors"
    assert not np.array_equal(pixels(switched.images[0]), pixels(alone.images[0]))
    assert np.array_equal(pixels(never.images[0]), pixels(alone.images[0]))
    as_base = pipelines.process_request({**request, "base_model": "refiner.safetensors"})
    assert "refiner" in as_base.report["error"]


def test_lora_prompt_tags(pipeline, tiny_components):
    folders = pipeline(mm.Policy.RESIDENT)
    kohya_lora(tiny_components, folders["loras"] / "style.safetensors")
    tagged = pipelines.process_request({**SMALL, "prompt": "a cat <lora:style:0.8>"})
    listed = pipelines.process_request({**SMALL, "loras": [["style.safetensors", 0.8]]})
    assert tagged.report["loras"] == listed.report["loras"] and tagged.report["loras"][0]["weight"] == 0.8
    assert np.array_equal(pixels(tagged.images[0]), pixels(listed.images[0]))


def test_a_long_prompt_is_not_cut_at_77_tokens(pipeline):
    pipeline(mm.Policy.RESIDENT)
    words = " ".join(f"word{i}" for i in range(40))            # > 75 tokens
    cut = pipelines.process_request({**SMALL, "prompt": words})
    longer = pipelines.process_request({**SMALL, "prompt": words + " and a red hat on top"})
    assert "error" not in longer.report
    # Words past the first window change the image: they were encoded, not dropped.
    assert not np.array_equal(pixels(cut.images[0]), pixels(longer.images[0]))


def test_standalone_vae_from_the_vae_folder(pipeline, tiny_components, tmp_path):
    from ldm_patched.modules.checkpoint import original_state_dict, save_checkpoint
    from ldm_patched.modules.demo_model import build_tiny_sdxl
    from modules import config

    vae_folder = pipeline(mm.Policy.RESIDENT)["vae"]
    assert config.get_config().path_vae[0] == vae_folder
    strip = lambda state: {k[len("first_stage_model."):]: v for k, v in state.items()}  # noqa: E731
    save_checkpoint(vae_folder / "same.safetensors", strip(original_state_dict(vae=tiny_components["vae"])))
    save_checkpoint(vae_folder / "other.safetensors", strip(original_state_dict(vae=build_tiny_sdxl(seed=5)["vae"])))
    save_checkpoint(vae_folder / "not_a_vae.safetensors", {"foo.weight": torch.zeros(2)})
    default = pipelines.process_request(dict(SMALL))
    same = pipelines.process_request({**SMALL, "vae": "same.safetensors"})
    other = pipelines.process_request({**SMALL, "vae": "other.safetensors"})
    assert same.report["vae"] == "same.safetensors"
    assert np.array_equal(pixels(same.images[0]), pixels(default.images[0]))
    assert not np.array_equal(pixels(other.images[0]), pixels(default.images[0]))
    bad = pipelines.process_request({**SMALL, "vae": "not_a_vae.safetensors"})
    assert bad.images == [] and "not_a_vae.safetensors" in bad.report["error"]
    assert "error" not in pipelines.process_request(dict(SMALL)).report


def test_png_writing_overlaps_sampling_of_the_next_image(pipeline, monkeypatch):
    import threading

    pipeline(mm.Policy.RESIDENT)
    pipelines.use_max_batch(monkeypatch, 1)   # one image per UNet batch: the next samples while one saves
    second_image_sampling = threading.Event()
    seen = []
    real_save = default_pipeline.save_image

    def save_after_next_image_started(pixels_, parameters, cfg, *rest):
        if parameters.fields["seed"] == str(SMALL["seed"]):   # the first image: wait for the second to start sampling
            seen.append(second_image_sampling.wait(timeout=30))
        return real_save(pixels_, parameters, cfg, *rest)

    def on_progress(event):
        if event.image_index == 1:
            second_image_sampling.set()
    monkeypatch.setattr(default_pipeline, "save_image", save_after_next_image_started)
    result = pipelines.process_request({**SMALL, "image_number": 2}, None, on_progress)
    assert seen == [True] and len(result.images) == 2 and all(os.path.exists(p) for p in result.images)
