"""PyraCanny / CPDS ControlNets: a Control-LoRA file (published layout, tests/helpers) built into
a diffusers ControlNetModel against an oracle, applied in sampling with upstream's stop, weight
and softness, per batch row, and kept resident like any model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from diffusers import ControlNetModel
from ldm_patched.modules import model_management as mm
from ldm_patched.modules.model_patcher import ModelPatcher
from modules import controlnet, core
from tests.helpers import controlnet_files, input_image_files, pipelines
from tests.helpers.input_image_files import INPUT, png64
from tests.helpers.patching import lora_for

BASE = {"prompt": "a cat", "base_model": "tiny_sdxl_base.safetensors", "width": 64, "height": 64,
        "steps": 2, "seed": 5, "performance": "Speed", "sampler": "euler", "scheduler": "normal"}
PICTURE = input_image_files.picture(64, 64, seed=3)


def _inputs(net_or_unet, batch: int = 2, seed: int = 0) -> dict:
    """Random UNet-call inputs for the tiny model (8x8 latents, a 64x64 hint)."""
    gen = torch.Generator().manual_seed(seed)
    return dict(sample=torch.randn(batch, 4, 8, 8, generator=gen), timestep=torch.tensor(500.0),
                encoder_hidden_states=torch.randn(batch, 77, 96, generator=gen),
                added_cond_kwargs={"text_embeds": torch.randn(batch, 32, generator=gen),
                                   "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * batch)})


def _run_net(net, inputs, hint):
    return net(**inputs, controlnet_cond=hint, return_dict=False)


def test_a_control_lora_builds_the_controlnet_diffusers_holds_with_those_weights(tiny_components, tmp_path):
    """Oracle: diffusers' own ControlNetModel.from_unet(unet) with the file's weights set
    directly (the helper's table of diffusers names). Built while a LoRA is merged into the
    UNet: the ControlNet starts from the UNet's originals, not the merged weights."""
    unet = tiny_components["unet"]
    path = tmp_path / controlnet_files.CANNY_FILE
    written = controlnet_files.write_tiny_control_lora(path, unet)
    oracle = ControlNetModel.from_unet(unet)
    oracle.load_state_dict(controlnet_files.oracle_state(unet, written), strict=True)

    patcher = ModelPatcher(unet, "cpu", "cpu", name="unet")
    patcher.add_patches(lora_for(unet, ["down_blocks.1.attentions.0.proj_in.weight", "conv_in.weight"], "x.safetensors"))
    patcher.patch_model()
    try:
        _, tensors = controlnet.read_control_lora(str(path))
        ours = controlnet.build_controlnet(unet, tensors, path.name, torch.float32)
    finally:
        patcher.unpatch_model()
    hint = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    inputs = _inputs(unet)
    with torch.no_grad():
        (down, mid), (want_down, want_mid) = _run_net(ours, inputs, hint), _run_net(oracle, inputs, hint)
    assert len(down) == len(want_down) == 6
    for got, want in zip([*down, mid], [*want_down, want_mid]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert mid.abs().mean() > 0.01   # the control says something


def test_a_file_that_is_no_control_lora_for_this_unet_is_named(tiny_components, tiny_refiner_components, tmp_path):
    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_conv_in.lora_up.weight": torch.zeros(4, 2)}, str(lora))
    with pytest.raises(controlnet.ControlNetError, match="lora.safetensors: not a Control-LoRA"):
        controlnet.read_control_lora(str(lora))
    other = tmp_path / controlnet_files.CPDS_FILE   # made for the refiner's UNet (other widths)
    controlnet_files.write_tiny_control_lora(other, tiny_refiner_components["unet"])
    _, tensors = controlnet.read_control_lora(str(other))
    with pytest.raises(controlnet.ControlNetError, match=controlnet_files.CPDS_FILE):
        controlnet.build_controlnet(tiny_components["unet"], tensors, other.name, torch.float32)


@pytest.fixture(scope="module")
def built_net(tiny_components, tmp_path_factory):
    path = tmp_path_factory.mktemp("cn") / controlnet_files.CANNY_FILE
    controlnet_files.write_tiny_control_lora(path, tiny_components["unet"])
    _, tensors = controlnet.read_control_lora(str(path))
    return controlnet.build_controlnet(tiny_components["unet"], tensors, path.name, torch.float32)


def _control_set(net, weight=1.0, stop=1.0, softness=0.0) -> controlnet.ControlSet:
    hint = controlnet.hint_tensor(PICTURE)
    return controlnet.ControlSet([controlnet.PreparedControl(ModelPatcher(net, "cpu", "cpu"), hint, weight, stop)],
                                 softness)


def _residuals(unet, controls, batch=2, timestep=500.0, seed=0):
    x = _inputs(unet, batch, seed)
    with controlnet.applied(unet, controls):
        return controlnet.residuals(unet, x["sample"], torch.tensor(timestep), x["encoder_hidden_states"],
                                    x["added_cond_kwargs"]["text_embeds"], x["added_cond_kwargs"]["time_ids"])


def test_softness_damps_the_fine_skip_connections_as_upstream(tiny_components, built_net):
    """Upstream's ramp over the n outputs: output k times 1 - softness * (1 - k / (n - 1)):
    the first (finest) skip connection x(1 - softness), the middle block untouched; weight
    scales them all."""
    unet = tiny_components["unet"]
    plain_down, plain_mid = _residuals(unet, _control_set(built_net))
    soft_down, soft_mid = _residuals(unet, _control_set(built_net, weight=0.5, softness=0.4))
    outputs = len(plain_down) + 1
    for k, (soft, plain) in enumerate(zip([*soft_down, soft_mid], [*plain_down, plain_mid])):
        expected = 0.5 * (1.0 - 0.4 * (1.0 - k / (outputs - 1)))
        torch.testing.assert_close(soft, plain * expected, rtol=1e-5, atol=1e-6)


def test_residuals_are_per_batch_row(tiny_components, built_net):
    """A batch of two rows gives each row what it gives alone (rows never mix)."""
    unet = tiny_components["unet"]
    x = _inputs(unet, 2, seed=4)
    both_down, both_mid = _residuals(unet, _control_set(built_net), batch=2, seed=4)
    for row in range(2):
        with controlnet.applied(unet, _control_set(built_net)):
            down, mid = controlnet.residuals(unet, x["sample"][row:row + 1], torch.tensor(500.0),
                                             x["encoder_hidden_states"][row:row + 1],
                                             x["added_cond_kwargs"]["text_embeds"][row:row + 1],
                                             x["added_cond_kwargs"]["time_ids"][row:row + 1])
        for got, want in zip([*down, mid], [*both_down, both_mid]):
            torch.testing.assert_close(got[0], want[row], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("stop, timestep, acts", [(0.5, 600.0, True), (0.5, 400.0, False), (0.0, 999.0, False),
                                                   (1.0, 0.0, True)])
def test_a_control_acts_until_its_stop(tiny_components, built_net, stop, timestep, acts):
    """Progress is upstream's 1 - t/999; a control acts while progress <= stop, never at stop 0."""
    out = _residuals(tiny_components["unet"], _control_set(built_net, stop=stop), timestep=timestep)
    assert (out is not None) == acts


def test_on_an_accelerator_the_sampling_load_takes_the_controlnets_with_the_unet(tiny_components, built_net):
    """Conservative policy on the meta stand-in accelerator: the sampling stage's one load names
    the UNet and the ControlNets applied to it (loading one alone would evict the other), they
    are charged to the device ledger (CheckedManager: ledger == bytes on the device) with
    more working memory, and the next stage's load evicts them like any model."""
    import copy

    from tests.helpers.patching import CPU, META, CheckedManager, meta_settings

    unet = ModelPatcher(copy.deepcopy(tiny_components["unet"]), META, CPU, name="unet")
    net = ModelPatcher(copy.deepcopy(built_net), META, CPU, name="canny:controlnet")
    manager = CheckedManager(meta_settings(1 << 34, mm.Policy.CONSERVATIVE), mm.device_tensor_bytes(META))
    controls = controlnet.ControlSet([controlnet.PreparedControl(net, controlnet.hint_tensor(PICTURE), 1.0, 0.5)])
    assert controlnet.with_controls(unet, 1000) == ([unet], 1000)
    with controlnet.applied(unet.model, controls):
        models, memory = controlnet.with_controls(unet, 1000)
        assert models == [unet, net] and memory > 1000
        manager.load_models(models, memory)
    assert {e.patcher.name for e in manager.loaded} == {"unet", "canny:controlnet"}
    assert next(net.model.parameters()).device == META
    assert manager.used_bytes(META) >= unet.model_size() + net.model_size()
    vae = ModelPatcher(torch.nn.Linear(4, 4), META, CPU, name="vae")
    manager.load_models([vae])
    assert next(net.model.parameters()).device == CPU and [e.patcher.name for e in manager.loaded] == ["vae"]


# -- through the pipeline -------------------------------------------------------------------

@pytest.fixture
def served(pipeline, tiny_components, monkeypatch):
    """`install(policy)`: folders with every input-image model file, the two ControlNets too."""
    return lambda policy: input_image_files.serve(pipeline, tiny_components["unet"], monkeypatch, policy,
                                                  inpaint_files=False)


def run(extra: dict) -> tuple[list[str], dict]:
    result = pipelines.process_request({**BASE, **extra})
    return result.images, result.report


def _prompt(kind: str, stop=None, weight=None, image=PICTURE) -> list:
    return [png64(image), stop, weight, kind]


def _pixels(images: list[str]) -> np.ndarray:
    assert len(images) == 1
    return pipelines.pixels(images[0])


def test_a_control_changes_the_image_and_weight_or_stop_zero_leaves_it(served):
    served(mm.Policy.RESIDENT)
    plain = _pixels(run({})[0])
    for kind in ("PyraCanny", "CPDS"):
        images, report = run({"image_prompts": [_prompt(kind)]})
        assert "error" not in report, report
        assert report["controlnets"] == [{"type": kind, "file": controlnet.CANNY_FILE if kind == "PyraCanny"
                                          else controlnet.CPDS_FILE, "stop": 0.5, "weight": 1.0}]
        assert np.abs(_pixels(images) - plain).max() > 8, kind
    for zero in ({"weight": 0.0}, {"stop": 0.0}):
        images, report = run({"image_prompts": [_prompt("PyraCanny", **zero)]})
        assert "error" not in report, report
        assert np.array_equal(_pixels(images), plain), zero


def test_the_controlnet_runs_on_the_steps_before_its_stop(served):
    """UNet calls counted on the ControlNet: one per step whose progress 1 - t/999 is at most
    the stop (the scheduler's own timesteps), none after."""
    served(mm.Policy.RESIDENT)
    assert "error" not in run({"image_prompts": [_prompt("CPDS")]})[1]
    calls = []
    net = next(p.model for p in [e.patcher for e in mm.get_manager().loaded] if p.name.endswith(":controlnet"))
    hook = net.register_forward_hook(lambda module, args, out: calls.append(1))
    try:
        steps = 6
        assert "error" not in run({"steps": steps, "image_prompts": [_prompt("CPDS", stop=0.4)]})[1]
    finally:
        hook.remove()
    sched = core.make_scheduler("euler", "normal")
    sched.set_timesteps(steps)
    expected = sum(1 for t in sched.timesteps if 1.0 - float(t) / 999.0 <= 0.4)
    assert 0 < expected < steps and len(calls) == expected


def test_resident_second_round_loads_and_patches_nothing(served):
    """Two controls and an ImagePrompt, twice: the second round builds no ControlNet, loads no
    model and patches no weight; the ControlNets are in the registry and the panel's status."""
    served(mm.Policy.RESIDENT)
    request = {"image_prompts": [_prompt("PyraCanny"), _prompt("CPDS", 0.8, 0.7), _prompt("ImagePrompt")]}
    first_images, first = run(request)
    assert "error" not in first, first
    assert first["model_management"]["models_loaded"] > 0
    pipeline = pipelines.current()
    builds = pipeline.catalogue.state.controlnets.builds
    assert builds == 2
    second_images, second = run(request)
    assert second["model_management"]["models_loaded"] == 0
    assert second["model_management"]["weights_patched"] == 0
    assert pipeline.catalogue.state.controlnets.builds == builds
    assert np.array_equal(_pixels(first_images), _pixels(second_images))
    names = [m["name"] for m in pipeline.model_status()["models"]]
    for name in (controlnet.CANNY_FILE, controlnet.CPDS_FILE):
        assert f"{name}:controlnet" in names, names


def test_a_rewritten_control_file_replaces_the_built_controlnet(served, tiny_components):
    folders = served(mm.Policy.RESIDENT)
    request = {"image_prompts": [_prompt("PyraCanny")]}
    before = _pixels(run(request)[0])
    controlnet_files.write_tiny_control_lora(folders["controlnet"] / controlnet.CANNY_FILE, tiny_components["unet"],
                                             seed=9)
    images, report = run(request)
    assert "error" not in report, report
    assert pipelines.current().catalogue.state.controlnets.builds == 2 and len(pipelines.current().catalogue.state.controlnets) == 1
    names = [m["name"] for m in pipelines.current().model_status()["models"]]
    assert names.count(f"{controlnet.CANNY_FILE}:controlnet") == 1   # the old version left the registry
    assert not np.array_equal(_pixels(images), before)


def test_the_request_loras_reach_the_controlnet_and_a_repeat_patches_nothing(served, tiny_components):
    from tests.helpers import lora_files
    folders = served(mm.Policy.RESIDENT)
    lora_files.kohya_lora(tiny_components, folders["loras"] / "style.safetensors")
    request = {"image_prompts": [_prompt("PyraCanny")], "loras": [["style.safetensors", 0.8]]}
    assert "error" not in run(request)[1]
    net = next(e for e in mm.get_manager().loaded if e.patcher.name.endswith(":controlnet"))
    assert net.patcher.patch_sources() == {"style.safetensors": 0.8}
    assert net.signature.keys   # merged into its shared layers
    assert run(request)[1]["model_management"]["weights_patched"] == 0


def test_control_options_preprocessors_and_debug_output(served):
    served(mm.Policy.RESIDENT)
    request = {"image_prompts": [_prompt("PyraCanny"), _prompt("ImagePrompt")]}
    images, report = run({**request, "debugging_cn_preprocessor": True})
    assert "error" not in report, report
    assert report["preprocessed_images"] == 2 and len(images) == 2
    assert report["model_management"]["models_loaded"] <= 3   # the checkpoint's parts, nothing to sample with
    edges = np.asarray(Image.open(images[0]))
    assert edges.shape == (64, 64, 3) and (edges[..., 0] == edges[..., 2]).all() and edges.max() == 255
    assert np.asarray(Image.open(images[1])).shape == (224, 224, 3)   # as the CLIP encoder sees it
    skipped, _ = run({**request, "debugging_cn_preprocessor": True, "skipping_cn_preprocessor": True})
    assert np.array_equal(np.asarray(Image.open(skipped[0])), PICTURE)
    strict, _ = run({**request, "debugging_cn_preprocessor": True, "canny_low_threshold": 250,
                     "canny_high_threshold": 255})
    assert (np.asarray(Image.open(strict[0])) != edges).any()
    plain = _pixels(run(request)[0])
    assert not np.array_equal(_pixels(run({**request, "controlnet_softness": 0.9})[0]), plain)
    assert not np.array_equal(_pixels(run({**request, "skipping_cn_preprocessor": True})[0]), plain)


@pytest.mark.parametrize("extra, message", [
    ({"image_prompts": [[png64(INPUT), 0.5, 0.6, "FaceSwap"]]}, "FaceSwap' is not supported"),
    ({"image_prompts": [[png64(INPUT), 0.5, 0.6, "Depth"]]}, "type must be one of ImagePrompt, PyraCanny, CPDS"),
    ({"image_prompts": [_prompt("CPDS")], "canny_low_threshold": 0}, "'canny_low_threshold'"),
    ({"image_prompts": [_prompt("CPDS")], "controlnet_softness": "high"}, "'controlnet_softness'"),
    ({"image_prompts": [_prompt("CPDS")], "debugging_cn_preprocessor": "yes"}, "'debugging_cn_preprocessor'"),
])
def test_bad_control_fields_are_named(served, extra, message):
    served(mm.Policy.RESIDENT)
    images, report = run(extra)
    assert images == [] and message in report["error"], report


def test_a_missing_or_wrong_control_file_is_named_and_the_server_goes_on(served):
    folders = served(mm.Policy.RESIDENT)
    (folders["controlnet"] / controlnet.CPDS_FILE).unlink()
    images, report = run({"image_prompts": [_prompt("CPDS")]})
    assert images == [] and controlnet.CPDS_FILE in report["error"] and "path_controlnet" in report["error"]
    save_file({"lora_unet_conv_in.lora_up.weight": torch.zeros(4, 2)}, str(folders["controlnet"] / controlnet.CANNY_FILE))
    images, report = run({"image_prompts": [_prompt("PyraCanny")]})
    assert images == [] and "not a Control-LoRA" in report["error"] and "field 'image_prompts'" in report["error"]
    images, report = run({})
    assert "error" not in report and len(images) == 1


def test_pyracanny_and_cpds_through_generate_are_resident_on_the_second_round(served, tmp_path):
    """`/generate` (gradio_client, as API users call it) over the real pipeline in resident mode."""
    from gradio_client import Client

    from modules import config as config_module
    from tests.helpers.webui import running_pipeline_app

    served(mm.Policy.RESIDENT)
    request = {**BASE, "image_prompts": [_prompt("PyraCanny"), _prompt("CPDS", 0.6, 0.8)]}
    with running_pipeline_app(pipelines.current(), config_module.get_config()) as url:
        client = Client(url, verbose=False, download_files=str(tmp_path / "dl"), analytics_enabled=False)
        reports = []
        for _ in range(2):
            gallery, report = client.predict(request, api_name="/generate")
            assert "error" not in report and len(gallery) == 1, report
            reports.append(report)
    assert [r["controlnets"][1]["type"] for r in reports] == ["CPDS", "CPDS"]
    assert reports[0]["model_management"]["models_loaded"] > 0
    assert reports[1]["model_management"]["models_loaded"] == 0
    assert reports[1]["model_management"]["weights_patched"] == 0
