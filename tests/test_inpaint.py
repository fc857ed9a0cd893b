"""Inpaint / outpaint: image functions, the Fooocus patch and head files, and applying them.

Model files are written here in upstream's published layout (a torch pickle of
{"diffusion_model.<original key>": (uint8 diff, min, max)} and {"head": [C, 5, 3, 3]}),
with original-layout key names spelled out, not derived from our module tree.
"""

import copy

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ldm_patched.modules import model_management as mm
from ldm_patched.modules.model_patcher import ModelPatcher
from modules import inpaint


def _image(height, width, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


# -- outpaint ---------------------------------------------------------------------------------

@pytest.mark.parametrize("directions, shape", [
    (["Top"], (13, 20)), (["bottom"], (13, 20)), (["Left"], (10, 26)), (["right"], (10, 26)),
    (["Left", "Right", "Top", "Bottom"], (16, 32)), ([], (10, 20)),
])
def test_outpaint_extends_by_30_percent_of_each_side(directions, shape):
    image = _image(10, 20)
    out, mask = inpaint.outpaint_canvas(image, None, directions)
    assert out.shape == (*shape, 3) and mask.shape == shape
    assert (mask == 255).sum() == shape[0] * shape[1] - 200   # exactly the new strips


def test_outpaint_fills_with_edge_pixels_and_marks_new_area():
    image = _image(10, 20)
    out, mask = inpaint.outpaint_canvas(image, None, ["left", "top"])
    assert np.array_equal(out[3:, 6:], image)
    assert np.array_equal(out[3:, :6], np.repeat(image[:, :1], 6, axis=1))
    assert np.array_equal(out[:3, 6:], np.repeat(image[:1], 3, axis=0))
    assert (mask[3:, 6:] == 0).all() and (mask[:3] == 255).all() and (mask[:, :6] == 255).all()


def test_outpaint_unknown_direction_names_the_field():
    with pytest.raises(inpaint.InpaintInputError, match="outpaint_selections") as info:
        inpaint.outpaint_canvas(_image(4, 4), None, ["up"])
    assert info.value.field == "outpaint_selections"


# -- masks ------------------------------------------------------------------------------------

def test_mask_from_sketch_alpha_rgb_and_resize():
    sketch = np.zeros((8, 8, 4), np.uint8)
    sketch[2:4, 2:4, 3] = 255                               # drawn stroke: alpha only
    assert (inpaint.mask_from_image(sketch, 8, 8) > 0).sum() == 4
    upload = np.zeros((8, 8, 3), np.uint8)
    upload[0, 0, 1] = 200                                   # any channel above the threshold
    assert inpaint.mask_from_image(upload, 8, 8)[0, 0] == 255
    big = np.zeros((16, 16), np.uint8)
    big[:8, :8] = 255
    resized = inpaint.mask_from_image(big, 8, 8)            # other size: resized, not refused
    assert resized.shape == (8, 8) and resized[:3, :3].all() and not resized[5:, 5:].any()


def test_blank_mask_names_the_field():
    with pytest.raises(inpaint.InpaintInputError, match="inpaint_mask"):
        inpaint.prepare(_image(64, 64), np.zeros((64, 64), np.uint8), side=64)


def test_latent_mask_marks_every_cell_touched_by_the_mask():
    mask = np.zeros((64, 64), np.uint8)
    mask[9, 17] = 255
    mask[40:48, 56:64] = 255
    latent = inpaint.latent_mask(mask, 8, 8)
    assert latent.shape == (1, 1, 8, 8) and latent.dtype == torch.float32
    assert set(latent.unique().tolist()) <= {0.0, 1.0}
    assert latent[0, 0, 1, 2] == 1 and latent[0, 0, 5, 7] == 1 and latent.sum() == 2


# -- crop and paste ---------------------------------------------------------------------------

def test_paste_keeps_pixels_outside_the_feathered_mask_exactly():
    image = _image(96, 128, seed=1)
    mask = np.zeros((96, 128), np.uint8)
    mask[40:50, 60:75] = 255
    job = inpaint.prepare(image, mask, side=64)
    top, bottom, left, right = job.box
    assert top <= 40 and bottom >= 50 and left <= 60 and right >= 75
    assert bottom - top >= 96 * 0.618 and right - left >= 128 * 0.618
    assert job.size[0] % 64 == 0 and job.size[1] % 64 == 0
    generated = _image(*job.size, seed=2)
    out = job.paste(generated)
    ring = inpaint.FEATHER_RINGS
    outside = np.ones((96, 128), bool)
    outside[max(0, 40 - ring):50 + ring, max(0, 60 - ring):75 + ring] = False
    assert np.array_equal(out[outside], image[outside])
    assert not np.array_equal(out[40:50, 60:75], image[40:50, 60:75])


def test_fill_keeps_known_pixels_and_outpaint_uses_whole_canvas():
    image, mask = inpaint.outpaint_canvas(_image(40, 40), None, ["right"])
    job = inpaint.prepare(image, mask, outpaint=True, side=64)
    assert job.box == (0, 40, 0, 52) and job.strength == 1.0
    known = job.mask == 0
    assert np.array_equal(job.fill_pixels[known], job.crop[known])
    assert (job.head_pixels[job.mask > 0] == 128).all()


# -- patch file -------------------------------------------------------------------------------

# Original (ldm) names of the tiny UNet's conv_in, conv_out and first time-embedding layer.
ORIGINAL_TO_MODULE = {
    "input_blocks.0.0.weight": "conv_in.weight",
    "input_blocks.0.0.bias": "conv_in.bias",
    "out.2.weight": "conv_out.weight",
    "time_embed.0.weight": "time_embedding.linear_1.weight",
}


def _write_patch(path, unet, seed=0, keys=ORIGINAL_TO_MODULE):
    generator = torch.Generator().manual_seed(seed)
    shapes = dict(unet.named_parameters())
    data = {}
    for original, ours in keys.items():
        quantized = torch.randint(0, 256, tuple(shapes[ours].shape), dtype=torch.uint8, generator=generator)
        low, high = -0.01 * (1 + torch.rand((), generator=generator)), 0.01 * (1 + torch.rand((), generator=generator))
        data["diffusion_model." + original] = (quantized, low.to(torch.float16), high.to(torch.float16))
    torch.save(data, path)
    return data


def test_patch_file_maps_to_unet_parameters(tmp_path, tiny_components):
    unet = tiny_components["unet"]
    _write_patch(tmp_path / "inpaint_v26.fooocus.patch", unet)
    parsed = inpaint.read_patch_file(str(tmp_path / "inpaint_v26.fooocus.patch"))
    patches = inpaint.patch_weights(parsed, unet)
    assert set(patches) == set(ORIGINAL_TO_MODULE.values())
    ident = patches["conv_in.weight"].identity
    assert ident == inpaint.patch_weights(inpaint.read_patch_file(str(tmp_path / "inpaint_v26.fooocus.patch")),
                                          unet)["conv_in.weight"].identity


def test_patch_applies_by_formula_and_restores_exactly(tmp_path, pipeline, tiny_components):
    pipeline(mm.Policy.RESIDENT)
    unet = copy.deepcopy(tiny_components["unet"])
    path = tmp_path / "inpaint_v26.fooocus.patch"
    data = _write_patch(path, unet)
    originals = {k: v.detach().clone() for k, v in unet.named_parameters()}
    models = inpaint.InpaintModels()
    base = ModelPatcher(unet, mm.get_torch_device(), mm.unet_offload_device(), name="t:unet")
    patched = base.clone()
    taken = patched.add_patches(models.patches(str(path), unet), inpaint.PATCH_STRENGTH)
    assert sorted(taken) == sorted(ORIGINAL_TO_MODULE.values())
    mm.load_models_gpu([patched])
    params = dict(unet.named_parameters())
    for original, ours in ORIGINAL_TO_MODULE.items():
        quantized, low, high = data["diffusion_model." + original]
        diff = quantized.float() / 255.0 * (high.float() - low.float()) + low.float()
        want = (originals[ours].float() + diff).to(params[ours].dtype)
        assert torch.equal(params[ours].detach(), want), ours
    for name, value in params.items():
        if name not in ORIGINAL_TO_MODULE.values():
            assert torch.equal(value.detach(), originals[name]), name
    mm.load_models_gpu([base])
    for name, value in unet.named_parameters():
        assert torch.equal(value.detach(), originals[name]), name


def test_patch_cache_replaces_a_new_file_version(tmp_path, tiny_components):
    unet = tiny_components["unet"]
    path = tmp_path / "inpaint_v26.fooocus.patch"
    _write_patch(path, unet, seed=0)
    models = inpaint.InpaintModels()
    first = models.patches(str(path), unet)
    assert models.patches(str(path), unet) is first
    _write_patch(path, unet, seed=1)
    second = models.patches(str(path), unet)
    assert second is not first
    assert second["conv_in.weight"].identity != first["conv_in.weight"].identity


def test_wrong_kind_of_file_names_the_file(tmp_path, tiny_components):
    unet = tiny_components["unet"]
    lora = tmp_path / "some_lora.safetensors"
    save_file({"lora_unet_conv_in.lora_up.weight": torch.zeros(4, 2)}, str(lora))
    garbage = tmp_path / "garbage.fooocus.patch"
    garbage.write_bytes(b"not a pickle at all" * 10)
    checkpoint = tmp_path / "checkpoint.fooocus.patch"
    torch.save({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(3)}, checkpoint)
    other = tmp_path / "other_model.fooocus.patch"
    torch.save({"diffusion_model.input_blocks.99.0.weight": (torch.zeros(2, dtype=torch.uint8), 0.0, 1.0)}, other)
    misshaped = tmp_path / "misshaped.fooocus.patch"
    torch.save({"diffusion_model.input_blocks.0.0.weight": (torch.zeros(2, dtype=torch.uint8), 0.0, 1.0)}, misshaped)
    for path, why in [(lora, "safetensors"), (garbage, "not a readable"), (checkpoint, "plain tensors"),
                      (other, "name no weight"), (misshaped, "another shape")]:
        with pytest.raises(inpaint.InpaintError, match=why) as info:
            inpaint.InpaintModels().patches(str(path), unet)
        assert path.name in str(info.value)
    with pytest.raises(inpaint.InpaintError, match="some_lora.safetensors"):
        inpaint.read_head_file(str(lora))
    with pytest.raises(inpaint.InpaintError, match="checkpoint.fooocus.patch.*not a Fooocus inpaint head"):
        inpaint.read_head_file(str(checkpoint))


# -- head -------------------------------------------------------------------------------------

def test_head_hook_is_exact_noop_outside_and_adds_feature_inside(tmp_path, pipeline, tiny_components):
    pipeline(mm.Policy.RESIDENT)
    unet = copy.deepcopy(tiny_components["unet"]).eval()
    channels = unet.conv_in.out_channels
    head_file = tmp_path / "fooocus_inpaint_head.pth"
    weight = torch.randn(channels, 5, 3, 3, generator=torch.Generator().manual_seed(3))
    torch.save({"head": weight}, head_file)
    head = inpaint.InpaintModels().head(str(head_file))
    assert head.name == "fooocus_inpaint_head.pth:inpaint_head"

    generator = torch.Generator().manual_seed(4)
    sample = torch.randn(1, 4, 8, 8, generator=generator)
    latent = torch.randn(1, 4, 8, 8, generator=generator)
    mask = (torch.rand(1, 1, 8, 8, generator=generator) > 0.5).float()
    context = torch.randn(1, 77, unet.config.cross_attention_dim, generator=generator)
    text_dim = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    added = {"text_embeds": torch.randn(1, text_dim, generator=generator),
             "time_ids": torch.randn(1, 6, generator=generator)}

    def run():
        with torch.no_grad():
            return unet(sample, 10, encoder_hidden_states=context, added_cond_kwargs=added).sample

    before = run()
    with torch.no_grad():
        plain_conv = unet.conv_in(sample)
    with inpaint.head_applied(unet, head, latent, mask) as feature:
        inside = run()
    after = run()
    assert torch.equal(before, after)                     # hook installed, inactive: bit-exact
    padded = torch.nn.functional.pad(torch.cat([mask, latent], 1), (1, 1, 1, 1), mode="replicate")
    expected = torch.nn.functional.conv2d(padded, weight)
    torch.testing.assert_close(feature, expected)
    assert not torch.equal(before, inside)
    with inpaint.head_applied(unet, head, latent, mask), torch.no_grad():
        torch.testing.assert_close(unet.conv_in(sample), plain_conv + expected)


def test_head_hook_installed_once(tiny_components):
    unet = copy.deepcopy(tiny_components["unet"])
    assert inpaint.install_head_hook(unet) is inpaint.install_head_hook(unet)
    assert len(unet.conv_in._forward_hooks) == 1


def test_quantized_diff_caches_uint8_copy_only_off_host():
    from ldm_patched.modules.lora_adapters import QuantizedDiff

    quantized = torch.arange(6, dtype=torch.uint8).reshape(2, 3)
    patch = QuantizedDiff("file-v1", "diffusion_model.x.weight", quantized, -1.0, 1.0)
    base = torch.zeros(2, 3)
    out = patch.added(base, 0.5, cache=True)
    torch.testing.assert_close(out, 0.5 * (quantized.float() / 255.0 * 2.0 - 1.0))
    assert patch.cache_devices() == [] and patch.factor_bytes() == 6
    meta = torch.device("meta")
    patch.added(base.to(meta), 1.0, cache=True)
    assert patch.cache_devices() == [meta] and patch.cached_bytes(meta) == 6
    patch.drop_cache()
    assert patch.cache_devices() == []


def test_feather_falls_8_per_pixel_outside_the_mask():
    mask = np.zeros((80, 80), np.uint8)
    mask[40, 40] = 255
    soft = inpaint.feather(mask)
    assert soft[40, 40] == 255 and soft[40, 41] == 248 and soft[30, 35] == 256 - 8 * 10
    assert soft[40, 71] == 8 and soft[40, 72] == 0 and soft[0, 0] == 0
