"""LoRA files -> patches, checked against diffusers' own LoRA loader as the oracle."""

import copy
import os

import pytest
import torch
from safetensors.torch import save_file

from ldm_patched.modules import lora as lora_module
from ldm_patched.modules import telemetry
from ldm_patched.modules.file_version import FileVersion
from ldm_patched.modules.lora import LoraError, LoraFileCache, match_lora, text_encoder_lora_names, unet_lora_names
from ldm_patched.modules.model_patcher import ModelPatcher
from ldm_patched.modules.sdxl_layout import unet_key_map
from modules.core import SDXLTextEncoders

CPU = torch.device("cpu")

from tests.helpers.lora_files import TE_LAYERS, UNET_LAYERS, diffusers_fused, kohya_lora, peft_lora
from tests.helpers.lora_files import find_text_layers, find_unet_layers


def _unet_weights(unet, layers: tuple[str, ...] = UNET_LAYERS) -> list[str]:
    return [diffusers + ".weight" for diffusers, _, _ in find_unet_layers(unet, layers)]


def _te_weights(encoder, layers: tuple[str, ...] = TE_LAYERS) -> list[str]:
    return [key for _, key, _ in find_text_layers(encoder, layers)]


def our_patchers(components):
    unet = ModelPatcher(components["unet"], CPU, CPU, "unet")
    clip = ModelPatcher(SDXLTextEncoders(components["text_encoder"], components["text_encoder_2"]), CPU, CPU, "clip")
    return unet, clip


def apply_ours(components, path: str, strength: float):
    unet, clip = our_patchers(components)
    parsed = lora_module.read_lora_file(path)
    match = match_lora(parsed, {"unet": (unet_lora_names(unet.model), unet.model),
                                "clip": (text_encoder_lora_names(clip.model), clip.model)})
    unet.add_patches(match.patches["unet"], strength)
    clip.add_patches(match.patches["clip"], strength)
    unet.patch_model()
    clip.patch_model()
    return unet, clip, match


def assert_same_weights(ours: torch.nn.Module, theirs: torch.nn.Module, changed_at_least: int, original):
    theirs_state = theirs.state_dict()
    changed = 0
    for key, value in ours.state_dict().items():
        assert torch.allclose(value, theirs_state[key], atol=1e-5, rtol=0), key
        changed += not torch.equal(value, original[key])
    assert changed >= changed_at_least


def test_peft_format_merges_like_diffusers_fuse_lora(tiny_components, tmp_path):
    components = copy.deepcopy(tiny_components)
    originals = {name: copy.deepcopy(m.state_dict()) for name, m in components.items()}
    path = peft_lora(components, tmp_path / "lora.safetensors")
    unet, clip, match = apply_ours(components, path, 0.7)
    pipe = diffusers_fused(tiny_components, path, 0.7)
    assert match.unmatched == []
    assert_same_weights(unet.model, pipe.unet, len(match.patches["unet"]), originals["unet"])
    assert_same_weights(clip.model.text_encoder, pipe.text_encoder, 1, originals["text_encoder"])
    assert_same_weights(clip.model.text_encoder_2, pipe.text_encoder_2, 1, originals["text_encoder_2"])


def test_kohya_format_unet_merges_like_diffusers_fuse_lora(tiny_components, tmp_path):
    """Original block names, conv (LoCon) layers and alpha != rank. diffusers 0.42 on
    transformers 5 drops kohya text-encoder keys (it renames them to `to_q_lora`),
    so the text encoders are checked against the peft format in the next test."""
    components = copy.deepcopy(tiny_components)
    original = copy.deepcopy(components["unet"].state_dict())
    path = kohya_lora(components, tmp_path / "lora.safetensors", rank=4, alpha=2.0)
    unet, _, match = apply_ours(components, path, 0.7)
    pipe = diffusers_fused(tiny_components, path, 0.7)
    assert match.unmatched == []
    assert any(p.ndim == 4 for p in (unet.model.get_parameter(k) for k in match.patches["unet"]))
    assert_same_weights(unet.model, pipe.unet, len(match.patches["unet"]), original)


def test_kohya_text_encoder_names_merge_like_the_peft_format(tiny_components, tmp_path):
    kohya_parts, peft_parts = copy.deepcopy(tiny_components), copy.deepcopy(tiny_components)
    rank = 4
    _, kohya_clip, kohya_match = apply_ours(
        kohya_parts, kohya_lora(kohya_parts, tmp_path / "k.safetensors", rank=rank, alpha=rank), 0.7)
    _, peft_clip, _ = apply_ours(peft_parts, peft_lora(peft_parts, tmp_path / "p.safetensors", rank=rank), 0.7)
    assert len(kohya_match.patches["clip"]) == len(_te_weights(kohya_parts["text_encoder"])) + len(
        _te_weights(kohya_parts["text_encoder_2"]))
    peft_state = peft_clip.model.state_dict()
    for key, value in kohya_clip.model.state_dict().items():
        assert torch.equal(value, peft_state[key]), key


def test_removing_every_lora_restores_every_weight_bit_exactly(tiny_components, tmp_path):
    components = copy.deepcopy(tiny_components)
    originals = {name: copy.deepcopy(m.state_dict()) for name, m in components.items()}
    unet, clip, _ = apply_ours(components, kohya_lora(components, tmp_path / "a.safetensors"), 1.3)
    unet.unpatch_model()
    clip.unpatch_model()
    for name, module in components.items():
        for key, value in module.state_dict().items():
            assert torch.equal(value, originals[name][key]), f"{name}.{key}"


def test_diffusers_block_names_in_kohya_layout_match_the_same_weights(tiny_components, tmp_path):
    """`lora_unet_down_blocks_...` (LCM/Lightning/Hyper-SD style) and the original names
    address the same parameters."""
    unet = tiny_components["unet"]
    key = _unet_weights(unet)[0]
    shape = unet.get_parameter(key).shape
    names = unet_lora_names(unet)
    diffusers_name = "lora_unet_" + key[: -len(".weight")].replace(".", "_")
    original_name = "lora_unet_" + unet_key_map(dict(unet.config))[key][: -len(".weight")].replace(".", "_")
    assert diffusers_name != original_name
    assert names[diffusers_name] == names[original_name] == key


def test_file_cache_reads_each_version_once(tiny_components, tmp_path):
    path = kohya_lora(tiny_components, tmp_path / "a.safetensors")
    cache = LoraFileCache()
    before = telemetry.snapshot()
    first = cache.get(path)
    assert cache.get(path) is first
    assert telemetry.snapshot().minus(before).lora_files_read == 1
    os.utime(path, ns=(1, 1))   # a new version of the file
    assert cache.get(path) is not first
    assert telemetry.snapshot().minus(before).lora_files_read == 2


def test_bad_files_fail_with_the_file_name(tiny_components, tmp_path):
    unet, clip = our_patchers(tiny_components)
    targets = {"unet": (unet_lora_names(unet.model), unet.model),
               "clip": (text_encoder_lora_names(clip.model), clip.model)}
    pickled = tmp_path / "old.ckpt"
    torch.save({"x": torch.zeros(1)}, pickled)
    with pytest.raises(LoraError, match="old.ckpt"):
        lora_module.read_lora_file(str(pickled))
    other = tmp_path / "sd15_lora.safetensors"
    save_file({"lora_unet_input_blocks_1_1_proj_in.lora_up.weight": torch.zeros(320, 4),
               "lora_unet_input_blocks_1_1_proj_in.lora_down.weight": torch.zeros(4, 320),
               "lora_foo_bar.lora_up.weight": torch.zeros(2, 2), "lora_foo_bar.lora_down.weight": torch.zeros(2, 2)},
              str(other))
    with pytest.raises(LoraError, match="sd15_lora.safetensors"):
        match_lora(lora_module.read_lora_file(str(other)), targets)
    key = _unet_weights(unet.model)[0]
    shape = unet.model.get_parameter(key).shape
    wrong = tmp_path / "wrong.safetensors"
    name = "lora_unet_" + key[: -len(".weight")].replace(".", "_")
    save_file({f"{name}.lora_up.weight": torch.zeros(shape[0] + 1, 2),
               f"{name}.lora_down.weight": torch.zeros(2, *shape[1:])}, str(wrong))
    with pytest.raises(LoraError, match="wrong.safetensors.*" + name):
        match_lora(lora_module.read_lora_file(str(wrong)), targets)
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(os.urandom(256))
    with pytest.raises(LoraError, match="corrupt.safetensors"):
        lora_module.read_lora_file(str(corrupt))


def test_peft_alpha_from_the_file_metadata_scales_like_diffusers(tiny_components, tmp_path):
    """diffusers writes lora_alpha into `lora_adapter_metadata`; the scale is alpha / r."""
    import json

    from safetensors import safe_open

    components = copy.deepcopy(tiny_components)
    original = copy.deepcopy(components["unet"].state_dict())
    plain = peft_lora(components, tmp_path / "plain.safetensors", rank=4)
    with safe_open(plain, framework="pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys() if k.startswith("unet.")}
    path = tmp_path / "alpha.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt", "lora_adapter_metadata": json.dumps(
        {"unet.r": 4, "unet.lora_alpha": 8, "unet.target_modules": ["to_q"]})})
    unet, _, match = apply_ours(components, str(path), 0.5)
    assert {f.alpha for f in lora_module.read_lora_file(str(path)).layers.values()} == {8.0}
    pipe = diffusers_fused(tiny_components, str(path), 0.5)
    assert_same_weights(unet.model, pipe.unet, len(match.patches["unet"]), original)


def test_locon_mid_and_full_diff_layers():
    """Tucker LoCon (lora_mid) and `diff` layers, against the delta written out another way."""
    gen = torch.Generator().manual_seed(3)
    out_ch, in_ch, rank = 6, 5, 3
    up = torch.randn(out_ch, rank, 1, 1, generator=gen)
    down = torch.randn(rank, in_ch, 1, 1, generator=gen)
    mid = torch.randn(rank, rank, 3, 3, generator=gen)
    base = torch.randn(out_ch, in_ch, 3, 3, generator=gen)
    factors = lora_module.LoraFactors(up=up, down=down, mid=mid, alpha=1.5)
    assert lora_module._fits(factors, base.shape)
    patch = lora_module.LoraPatch(FileVersion("x", 1, 1), "layer", factors)
    # up . mid . down per kernel position: [kh, kw, out, in] -> [out, in, kh, kw]
    expected = (up.flatten(1) @ mid.permute(2, 3, 0, 1) @ down.flatten(1)).permute(2, 3, 0, 1)
    got = patch.added(base, 0.5)
    assert torch.allclose(got, base + 0.5 * (1.5 / rank) * expected, atol=1e-5)
    diff = torch.randn(out_ch, in_ch, 3, 3, generator=gen)
    full = lora_module.LoraPatch(FileVersion("x", 1, 1), "layer", lora_module.LoraFactors(diff=diff))
    assert torch.allclose(full.added(base, 2.0), base + 2.0 * diff)


def test_kohya_lora_on_a_distilled_checkpoint_merges_like_diffusers_fuse_lora(tiny_family_checkpoint, tmp_path):
    """SSD-1B's up path keeps 4, 4, 10 transformers where SDXL has 10, 10, 10 and its mid block is
    one resnet: original block names still reach the weights diffusers' loader puts them on."""
    from ldm_patched.modules.checkpoint import load_checkpoint

    path, _ = tiny_family_checkpoint("SSD-1B")
    loaded = load_checkpoint(path)
    components = {name: getattr(loaded, name) for name in ("unet", "vae", "text_encoder", "text_encoder_2")}
    original = copy.deepcopy(components["unet"].state_dict())
    lora = kohya_lora(components, tmp_path / "ssd.safetensors", rank=4, alpha=2.0)
    pipe = diffusers_fused(components, lora, 0.7)
    unet, _, match = apply_ours(components, lora, 0.7)
    assert match.unmatched == []
    assert any(k.startswith("up_blocks.0.attentions.2.transformer_blocks.9.") for k in match.patches["unet"])
    assert_same_weights(unet.model, pipe.unet, len(match.patches["unet"]), original)
