"""Image Prompt (IP-Adapter Plus) on tiny random networks: files, registry, processor, oracle."""

import copy
import os

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ldm_patched.modules import model_management as mm
from modules import ip_adapter as ipa
from tests.helpers.ip_adapter_files import tiny_clip_vision, tiny_ip_adapter_state, to_open_clip


@pytest.fixture
def manager():
    mm.configure(mm.MemorySettings(policy=mm.Policy.RESIDENT, budget_bytes=1 << 32, total_bytes=1 << 32))
    yield mm.get_manager()
    mm.get_manager().unload_all()


@pytest.fixture
def unet(tiny_components):
    return copy.deepcopy(tiny_components["unet"])


@pytest.fixture
def files(tmp_path, unet):
    clip = tiny_clip_vision()
    clip_path = tmp_path / "clip_vision" / ipa.CLIP_VISION_FILE
    clip_path.parent.mkdir()
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, str(clip_path))
    state = tiny_ip_adapter_state(unet)
    ip_path = tmp_path / "controlnet" / ipa.IP_ADAPTER_FILE
    ip_path.parent.mkdir()
    torch.save(state, ip_path)
    return {"ip": str(ip_path), "clip": str(clip_path), "state": state, "clip_model": clip}


def image(seed: int, size=(40, 56)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


def unet_inputs(batch: int = 2, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return dict(sample=torch.randn(batch, 4, 8, 8, generator=gen), timestep=torch.tensor(500.0),
                encoder_hidden_states=torch.randn(batch, 77, 96, generator=gen),
                added_cond_kwargs={"text_embeds": torch.randn(batch, 32, generator=gen),
                                   "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * batch)})


def run(unet, **extra):
    with torch.inference_mode():
        return unet(**unet_inputs(), **extra).sample


def prepared_for(files, unet, manager, weight=0.6, stop=0.5, images=(image(1),)):
    adapter = ipa.ImagePromptModels().get(files["ip"], files["clip"])
    tokens = adapter.image_tokens(list(images))
    return adapter, adapter.prepare(unet, [ipa.ImagePrompt(t, weight, stop) for t in tokens])


# -- files ---------------------------------------------------------------------------------

def test_loads_both_files_and_registers_patchers(files, unet, manager):
    adapter = ipa.ImagePromptModels().get(files["ip"], files["clip"])
    assert adapter.ip.name == f"{ipa.IP_ADAPTER_FILE}:ip_adapter"
    assert adapter.clip.name == f"{ipa.CLIP_VISION_FILE}:clip_vision"
    adapter.image_tokens([image(1)])
    names = {m["name"] for m in manager.status()["models"]}
    assert {adapter.ip.name, adapter.clip.name} <= names
    assert manager.ledger(mm.HOST)["caches"]["image_prompt_tokens"] > 0


def test_clip_vision_matches_the_original_in_both_layouts(files, tmp_path, manager):
    original = files["clip_model"]
    pixels = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        want = original(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
    layouts = {"hf": original.state_dict(), "open_clip": to_open_clip(original.state_dict())}
    for name, state in layouts.items():
        path = tmp_path / f"{name}.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
        _, loaded = ipa._read_state(str(path))
        model = ipa.build_clip_vision(loaded, path.name, torch.float32)
        with torch.inference_mode():
            got = model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_safetensors_ip_adapter_layout_loads(files, tmp_path, unet):
    flat = {f"{part}.{k}": v.contiguous() for part, d in files["state"].items() for k, v in d.items()}
    path = tmp_path / "ip-adapter-plus_sdxl_vit-h.safetensors"
    save_file(flat, str(path))
    _, state = ipa._read_state(str(path))
    module = ipa.build_ip_adapter(state, path.name, torch.float32)
    assert len(module.to_k_ip) == len(ipa.cross_attention_layers(unet))


@pytest.mark.parametrize("kind", ["lora", "checkpoint", "garbage", "resampler-less"])
def test_wrong_files_name_the_file(files, tmp_path, kind, tiny_checkpoint, manager):
    path = tmp_path / f"wrong_{kind}.bin"
    if kind == "lora":
        path = tmp_path / "wrong_lora.safetensors"
        save_file({"lora_unet_down_blocks_1_attentions_0_proj_in.lora_up.weight": torch.zeros(4, 2)}, str(path))
    elif kind == "checkpoint":
        path = tmp_path / "wrong_checkpoint.safetensors"
        path.write_bytes(open(tiny_checkpoint, "rb").read())
    elif kind == "garbage":
        path.write_bytes(os.urandom(300))
    else:
        torch.save({"image_proj": {"proj.weight": torch.zeros(4, 4)}, "ip_adapter": files["state"]["ip_adapter"]},
                   path)
    with pytest.raises(ipa.ImagePromptError, match=path.name):
        ipa.ImagePromptModels().get(str(path), files["clip"])


def test_wrong_clip_vision_file_named(files, tmp_path, manager):
    path = tmp_path / "not_clip.safetensors"
    save_file({"foo.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(ipa.ImagePromptError, match="not_clip.safetensors"):
        ipa.ImagePromptModels().get(files["ip"], str(path))


def test_sd15_width_ip_adapter_refused_for_this_unet(tmp_path, files, unet, manager):
    path = tmp_path / "ip-adapter-plus_sd15.bin"
    torch.save(tiny_ip_adapter_state(unet, context_width=48), path)
    adapter = ipa.ImagePromptModels().get(str(path), files["clip"])
    tokens = adapter.image_tokens([image(1)])
    with pytest.raises(ipa.ImagePromptError, match="ip-adapter-plus_sd15.bin.*width 48"):
        adapter.prepare(unet, [ipa.ImagePrompt(tokens[0])])


def test_new_file_version_replaces_the_old(files, unet, manager):
    models = ipa.ImagePromptModels()
    first = models.get(files["ip"], files["clip"])
    first.image_tokens([image(1)])
    torch.save(tiny_ip_adapter_state(unet, seed=5), files["ip"])
    second = models.get(files["ip"], files["clip"])
    assert second.ip is not first.ip
    assert manager.find(first.ip) is None   # forgotten by the registry
    assert models.get(files["ip"], files["clip"]) is second


# -- tokens ----------------------------------------------------------------------------

def test_image_tokens_cached_per_pixels(files, manager):
    adapter = ipa.ImagePromptModels().get(files["ip"], files["clip"])
    a, b = adapter.image_tokens([image(1), image(2)])
    calls = adapter.encoder_calls
    again = adapter.image_tokens([image(2), image(1).copy()])
    assert adapter.encoder_calls == calls
    assert again[0] is b and again[1] is a
    assert a.cond.shape == (1, 4, 96) and a.uncond.shape == (1, 4, 96)
    assert not torch.equal(a.cond, b.cond) and torch.equal(a.uncond, b.uncond)
    adapter.image_tokens([image(3)])
    assert adapter.encoder_calls == calls + 1


def test_tokens_are_clip_penultimate_through_resampler(files, manager):
    adapter = ipa.ImagePromptModels().get(files["ip"], files["clip"])
    img = image(4)
    [tokens] = adapter.image_tokens([img])
    with torch.inference_mode():
        hidden = files["clip_model"](pixel_values=ipa.clip_pixels(img), output_hidden_states=True).hidden_states[-2]
        zero = files["clip_model"](pixel_values=torch.zeros(1, 3, 224, 224), output_hidden_states=True).hidden_states[-2]
        torch.testing.assert_close(tokens.cond, adapter.module.image_proj(hidden), rtol=0, atol=1e-5)
        torch.testing.assert_close(tokens.uncond, adapter.module.image_proj(zero), rtol=0, atol=1e-5)


def test_more_than_four_prompts_refused(files, unet, manager):
    adapter = ipa.ImagePromptModels().get(files["ip"], files["clip"])
    tokens = adapter.image_tokens([image(1)])
    with pytest.raises(ipa.ImagePromptError, match="image_prompts"):
        adapter.prepare(unet, [ipa.ImagePrompt(tokens[0])] * 5)


def test_signature_is_content_identity(files, manager):
    adapter = ipa.ImagePromptModels().get(files["ip"], files["clip"])
    a, b = adapter.image_tokens([image(1), image(2)])
    sig = ipa.image_prompt_signature
    assert sig([ipa.ImagePrompt(a, 0.6, 0.5)]) == sig([ipa.ImagePrompt(adapter.image_tokens([image(1)])[0], 0.6, 0.5)])
    assert sig([ipa.ImagePrompt(a, 0.6, 0.5)]) != sig([ipa.ImagePrompt(a, 0.7, 0.5)])
    assert sig([ipa.ImagePrompt(a, 0.6, 0.5)]) != sig([ipa.ImagePrompt(a, 0.6, 0.4)])
    assert sig([ipa.ImagePrompt(a, 0.6, 0.5)]) != sig([ipa.ImagePrompt(b, 0.6, 0.5)])
    assert sig([]) == "none"


# -- applying --------------------------------------------------------------------------

def test_installed_processor_is_bit_exact_without_context(unet):
    before = run(unet)
    ipa.install(unet)
    ipa.install(unet)   # idempotent
    assert all(isinstance(a.processor, ipa.ImagePromptAttnProcessor) for a in ipa.cross_attention_layers(unet))
    assert torch.equal(run(unet), before)
    from diffusers.models.attention_processor import AttnProcessor2_0
    unet.set_attn_processor(AttnProcessor2_0())   # someone resets processors: installed again
    ipa.install(unet)
    assert all(isinstance(a.processor, ipa.ImagePromptAttnProcessor) for a in ipa.cross_attention_layers(unet))
    ipa.install(unet)   # and not stacked
    assert all(not isinstance(a.processor.original, ipa.ImagePromptAttnProcessor)
               for a in ipa.cross_attention_layers(unet))
    assert torch.equal(run(unet), before)


def test_context_changes_output_weight_zero_does_not_and_weights_untouched(files, unet, manager):
    baseline = run(unet)
    weights = {k: v.clone() for k, v in unet.state_dict().items()}
    _, prepared = prepared_for(files, unet, manager)
    with ipa.applied(unet, prepared):
        changed = run(unet)
    assert not torch.allclose(changed, baseline)
    _, zero = prepared_for(files, unet, manager, weight=0.0)
    with ipa.applied(unet, zero):
        assert torch.equal(run(unet), baseline)
    assert torch.equal(run(unet), baseline)   # context left
    assert all(torch.equal(v, weights[k]) for k, v in unet.state_dict().items())


def test_stop_at_honoured(files, unet, manager):
    """A prompt acts while upstream's progress 1 - t/999 (from select_batch) is below its stop."""
    baseline = run(unet)
    _, prepared = prepared_for(files, unet, manager, stop=0.5)
    with ipa.applied(unet, prepared):
        assert not torch.equal(run(unet), baseline)                   # before any step: progress 0
        ipa.select_batch(unet, [False, True], timestep=999.0)
        assert not torch.equal(run(unet), baseline)
        ipa.select_batch(unet, [False, True], timestep=999.0 * 0.51)   # progress 0.49
        assert not torch.equal(run(unet), baseline)
        ipa.select_batch(unet, [False, True], timestep=999.0 * 0.5)    # progress 0.5: stopped
        assert torch.equal(run(unet), baseline)
        ipa.select_batch(unet, [False, True], timestep=400.0)          # progress 0.6 > stop
        assert torch.equal(run(unet), baseline)


def test_separate_batches_match_the_cfg_batch(files, unet, manager):
    """core runs [negative, positive] in one batch or, for very different prompt lengths,
    each alone: select_batch says which; the rows must match the joint batch's halves."""
    _, prepared = prepared_for(files, unet, manager)
    inputs = unet_inputs()
    halves = [{k: (v[i:i + 1] if torch.is_tensor(v) and v.ndim else v) for k, v in inputs.items()} for i in (0, 1)]
    for h, i in zip(halves, (0, 1)):
        h["added_cond_kwargs"] = {k: v[i:i + 1] for k, v in inputs["added_cond_kwargs"].items()}
    with torch.inference_mode(), ipa.applied(unet, prepared):
        ipa.select_batch(unet, [False, True])
        joint = unet(**inputs).sample
        ipa.select_batch(unet, [False])
        negative = unet(**halves[0]).sample
        ipa.select_batch(unet, [True])
        positive = unet(**halves[1]).sample
    torch.testing.assert_close(torch.cat([negative, positive]), joint, rtol=0, atol=1e-5)


def test_matches_diffusers_ip_adapter_processor(files, unet, manager):
    """Oracle: diffusers' own IP-Adapter loading (its converters, IPAdapterAttnProcessor2_0)
    on a copy of the UNet, same file, same image embeds, scale = weight."""
    weight = 0.7
    adapter, prepared = prepared_for(files, unet, manager, weight=weight, stop=1.0, images=(image(9),))
    oracle = copy.deepcopy(unet)   # before anything is installed on `unet`
    oracle._load_ip_adapter_weights([files["state"]], low_cpu_mem_usage=False)
    for proc in oracle.attn_processors.values():
        if hasattr(proc, "scale"):
            proc.scale = [weight]
    clip = files["clip_model"]
    with torch.inference_mode():
        cond = clip(pixel_values=ipa.clip_pixels(image(9)), output_hidden_states=True).hidden_states[-2]
        uncond = clip(pixel_values=torch.zeros(1, 3, 224, 224), output_hidden_states=True).hidden_states[-2]
        inputs = unet_inputs()
        embeds = torch.cat([uncond, cond])[:, None]   # [batch, images, tokens, width]
        want = oracle(**{**inputs, "added_cond_kwargs": {**inputs["added_cond_kwargs"],
                                                          "image_embeds": [embeds]}}).sample
    with ipa.applied(unet, prepared):
        got = run(unet)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert not torch.allclose(run(unet), want, atol=1e-3)


def test_select_batch_without_context_is_noop(unet):
    ipa.select_batch(unet, [False, True], timestep=1.0)   # never installed
    ipa.install(unet)
    ipa.select_batch(unet, [False, True], timestep=1.0)   # installed, inactive


def test_nested_context_refused(files, unet, manager):
    _, prepared = prepared_for(files, unet, manager)
    with ipa.applied(unet, prepared):
        with pytest.raises(ipa.ImagePromptError):
            with ipa.applied(unet, prepared):
                pass


def test_prepared_kv_follow_the_unet_device_and_dtype_once(files, unet, manager):
    _, prepared = prepared_for(files, unet, manager)
    prompt = prepared.prompts[0]
    prompt.to(torch.device("cpu"), torch.float64)
    k, weight = prompt.keys[0], prompt.weight_tensor
    assert k.dtype == prompt.values[0].dtype == weight.dtype == torch.float64 and weight.item() == prompt.weight
    prompt.to(torch.device("cpu"), torch.float64)
    assert prompt.keys[0] is k and prompt.weight_tensor is weight   # moved once, kept


def test_clip_vision_working_memory_estimate():
    assert mm.working_memory_bytes("clip_vision", 224, 224, 2, torch.float16) == 2 * 32 * 1024 * 1024
