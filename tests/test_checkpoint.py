"""Single-file SDXL checkpoints: key layout, config inference, round trips, errors."""

import os
import random

import pytest
import torch
from safetensors.torch import save_file

from ldm_patched.modules import sdxl_layout as layout
from ldm_patched.modules.checkpoint import (
    TOKENIZER_DIR,
    CheckpointError,
    infer_clip_config,
    infer_unet_config,
    infer_vae_config,
    load_checkpoint,
    load_tokenizers,
    original_state_dict,
    save_checkpoint,
)
from ldm_patched.modules.demo_model import write_demo_checkpoint, write_diffusers_config_dir
from tests.helpers import sdxl_family

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")


class NotATensor:
    """Pickled into a .ckpt to check that weights_only refuses it."""


def assert_same_params(expected: torch.nn.Module, actual: torch.nn.Module, name: str) -> None:
    a, b = expected.state_dict(), actual.state_dict()
    assert a.keys() == b.keys(), name
    for key in a:
        assert b[key].device.type != "meta", f"{name}.{key} was never loaded"
        assert torch.equal(a[key], b[key]), f"{name}.{key} differs"


def public_config(module: torch.nn.Module) -> dict:
    config = module.config
    items = config.to_dict().items() if hasattr(config, "to_dict") else dict(config).items()
    return {k: v for k, v in items if not k.startswith("_")}


# --------------------------------------------------------------------------- tokenizer


def test_bundled_tokenizers_match_clip():
    from transformers import CLIPTokenizer

    direct = CLIPTokenizer(os.path.join(TOKENIZER_DIR, "vocab.json"), os.path.join(TOKENIZER_DIR, "merges.txt"))
    assert direct("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    first, second = load_tokenizers()
    assert len(first) == 49408
    assert first("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert (first.pad_token, second.pad_token, second.pad_token_id) == ("<|endoftext|>", "!", 0)
    padded = second("a cat", padding="max_length", max_length=8).input_ids
    assert padded == [49406, 320, 2368, 49407, 0, 0, 0, 0]


# --------------------------------------------------------------------------- (a) base round trip


def test_base_round_trip_is_exact(tiny_components, tiny_checkpoint):
    loaded = load_checkpoint(tiny_checkpoint)
    assert loaded.kind == "base" and loaded.path == tiny_checkpoint
    assert loaded.metadata == {"title": "tiny base"}
    for name in COMPONENTS:
        assert_same_params(tiny_components[name], getattr(loaded, name), name)
        # inferred-from-shapes configs reproduce the source configs exactly
        assert public_config(getattr(loaded, name)) == public_config(tiny_components[name]), name
    assert loaded.tokenizer_2.pad_token == "!" and loaded.tokenizer.pad_token == "<|endoftext|>"


def test_dtypes_are_applied_per_component(tiny_components, tiny_checkpoint):
    loaded = load_checkpoint(tiny_checkpoint, unet_dtype=torch.float16, vae_dtype=torch.bfloat16)
    assert {p.dtype for p in loaded.unet.parameters()} == {torch.float16}
    assert {p.dtype for p in loaded.vae.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in loaded.text_encoder_2.parameters()} == {torch.float32}
    weight = tiny_components["unet"].conv_in.weight
    assert torch.equal(loaded.unet.conv_in.weight, weight.half())


def test_written_file_uses_original_layout(tiny_checkpoint):
    from safetensors import safe_open

    with safe_open(tiny_checkpoint, "pt") as f:
        keys = set(f.keys())
        q = f.get_tensor("first_stage_model.encoder.mid.attn_1.q.weight")
        proj = f.get_tensor("conditioner.embedders.1.model.text_projection")
        in_proj = f.get_tensor("conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight")
    assert q.shape == (64, 64, 1, 1)  # 1x1 conv in the original, Linear in diffusers
    assert proj.shape == (64, 32)  # [width, projection]
    assert in_proj.shape == (3 * 64, 64)
    assert "model.diffusion_model.input_blocks.3.0.op.weight" in keys  # the single downsampler
    assert "model.diffusion_model.output_blocks.2.2.conv.weight" in keys  # upsampler after a transformer
    assert "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight" in keys
    assert not any(k.startswith(("unet.", "vae.", "text_model.")) for k in keys)


def test_pickle_checkpoint_with_state_dict_wrapper_loads(tiny_components, tmp_path):
    path = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": original_state_dict(**tiny_components), "global_step": 7}, path)
    loaded = load_checkpoint(path)
    assert loaded.metadata == {}
    for name in COMPONENTS:
        assert_same_params(tiny_components[name], getattr(loaded, name), name)


def test_checkpoint_without_vae_loads_with_vae_none(tiny_components, tmp_path):
    parts = {k: v for k, v in tiny_components.items() if k != "vae"}
    path = save_checkpoint(tmp_path / "no_vae.safetensors", original_state_dict(**parts))
    loaded = load_checkpoint(path)
    assert loaded.vae is None
    assert_same_params(tiny_components["unet"], loaded.unet, "unet")


def test_demo_checkpoint_is_deterministic(tiny_checkpoint, tmp_path):
    from safetensors.torch import load_file

    demo = load_file(write_demo_checkpoint(tmp_path / "demo.safetensors", seed=0))
    ours = load_file(tiny_checkpoint)
    assert demo.keys() == ours.keys()
    assert all(torch.equal(demo[k], ours[k]) for k in ours)
    other = load_file(write_demo_checkpoint(tmp_path / "demo1.safetensors", seed=1))
    assert not torch.equal(other["model.diffusion_model.out.2.weight"], ours["model.diffusion_model.out.2.weight"])


def test_tiny_models_give_finite_varied_outputs(tiny_checkpoint):
    ckpt = load_checkpoint(tiny_checkpoint)
    ids = ckpt.tokenizer(["a photo of a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    ids2 = ckpt.tokenizer_2(["a photo of a cat"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        h1 = ckpt.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        out2 = ckpt.text_encoder_2(ids2, output_hidden_states=True)
        context = torch.cat([h1, out2.hidden_states[-2]], dim=-1)
        time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])
        latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        eps = ckpt.unet(latent, torch.tensor([500]), encoder_hidden_states=context,
                        added_cond_kwargs={"text_embeds": out2.text_embeds, "time_ids": time_ids}).sample
        image = ckpt.vae.decode(latent).sample
    for out in (context, eps, image):
        assert torch.isfinite(out).all() and out.std() > 1e-3


# --------------------------------------------------------------------------- (b) peer oracle


def test_diffusers_from_single_file_agrees(tiny_components, tiny_checkpoint, diffusers_config_dir):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_single_file(
        tiny_checkpoint, config=diffusers_config_dir, local_files_only=True
    )
    ours = load_checkpoint(tiny_checkpoint)
    for name in COMPONENTS:
        assert_same_params(getattr(ours, name), getattr(pipe, name), name)
    assert pipe.tokenizer_2.pad_token == "!"
    assert pipe.scheduler.config.timestep_spacing == "leading" and pipe.scheduler.config.steps_offset == 1


# --------------------------------------------------------------------------- (c) refiner


def test_refiner_round_trip(tiny_refiner_components, tiny_refiner_checkpoint, tmp_path):
    loaded = load_checkpoint(tiny_refiner_checkpoint)
    assert loaded.kind == "refiner"
    assert loaded.text_encoder is None and loaded.tokenizer is None
    assert loaded.unet.config.addition_time_embed_dim == 8  # 72 = 32 pooled + 5 * 8
    for name in ("unet", "vae", "text_encoder_2"):
        assert_same_params(tiny_refiner_components[name], getattr(loaded, name), name)
        assert public_config(getattr(loaded, name)) == public_config(tiny_refiner_components[name]), name
    # the refiner keeps OpenCLIP-G under embedders.0
    state = original_state_dict(refiner=True, text_encoder_2=loaded.text_encoder_2)
    assert all(k.startswith("conditioner.embedders.0.model.") for k in state)

    from diffusers import StableDiffusionXLImg2ImgPipeline

    config_dir = write_diffusers_config_dir(tmp_path / "refiner_config", tiny_refiner_components)
    pipe = StableDiffusionXLImg2ImgPipeline.from_single_file(
        tiny_refiner_checkpoint, config=config_dir, local_files_only=True
    )
    for name in ("unet", "vae", "text_encoder_2"):
        assert_same_params(getattr(loaded, name), getattr(pipe, name), name)


# --------------------------------------------------------------------------- (d) errors


def assert_refused(path, *words):
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert os.path.basename(str(path)) in message
    for word in words:
        assert word in message, message
    assert isinstance(info.value, ValueError)


def test_missing_file(tmp_path):
    assert_refused(tmp_path / "absent_model.safetensors", "not found")


@pytest.mark.parametrize("name", ["random_bytes.safetensors", "random_bytes.ckpt"])
def test_corrupt_file(tmp_path, name):
    path = tmp_path / name
    # fixed bytes: random ones could start with a pickle GLOBAL opcode and read as "unsafe" instead
    path.write_bytes(random.Random(1234).randbytes(4096))
    assert_refused(path, "corrupt")


def test_sd15_checkpoint_is_named(tmp_path):
    path = tmp_path / "sd15_like.safetensors"
    save_file({
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(10, 8),
        "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.zeros(8),
        "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(32, 4, 3, 3),
        "model.diffusion_model.out.2.weight": torch.zeros(4, 32, 3, 3),
    }, str(path))
    assert_refused(path, "SD 1.x")


def test_sd2_checkpoint_is_named(tmp_path):
    path = tmp_path / "sd2_like.safetensors"
    save_file({"cond_stage_model.model.token_embedding.weight": torch.zeros(10, 8),
               "model.diffusion_model.out.2.weight": torch.zeros(4, 32, 3, 3)}, str(path))
    assert_refused(path, "SD 2.x")


def test_unknown_layout_lists_prefixes(tmp_path):
    path = tmp_path / "lora_like.safetensors"
    save_file({"lora_unet_down.alpha": torch.zeros(1), "something.else": torch.zeros(2)}, str(path))
    assert_refused(path, "unknown layout", "lora_unet_down", "something")


def test_pickle_with_objects_is_refused(tmp_path):
    path = tmp_path / "unsafe.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.out.2.weight": torch.zeros(1)}, "extra": NotATensor()}, path)
    assert_refused(path, "weights_only", "NotATensor")


def test_missing_unet_tensor_is_reported(tiny_checkpoint, tmp_path):
    from safetensors.torch import load_file

    state = load_file(tiny_checkpoint)
    del state["model.diffusion_model.output_blocks.0.1.proj_out.weight"]
    path = save_checkpoint(tmp_path / "truncated.safetensors", state)
    assert_refused(path, "UNet", "output_blocks.0.1.proj_out.weight")


def test_unsupported_extension(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(b"\0" * 16)
    assert_refused(path, "extension")


# --------------------------------------------------------------------------- (e) SDXL-size shapes


SDXL_BASE_UNET = {
    "sample_size": 128,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [320, 640, 1280],
    "layers_per_block": 2,
    "transformer_layers_per_block": [1, 2, 10],
    "attention_head_dim": [5, 10, 20],
    "cross_attention_dim": 2048,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "use_linear_projection": True,
    "in_channels": 4,
    "out_channels": 4,
    "norm_num_groups": 32,
}
SDXL_REFINER_UNET = {
    **SDXL_BASE_UNET,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [384, 768, 1536, 1536],
    "transformer_layers_per_block": 4,
    "attention_head_dim": [6, 12, 24, 24],
    "cross_attention_dim": 1280,
    "projection_class_embeddings_input_dim": 2560,
}


def original_unet_shapes(config: dict) -> dict:
    """Original-layout shapes of a real-size UNet, built on the meta device (no memory)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    state = unet.state_dict()
    return {o: tuple(state[d].shape) for d, o in layout.unet_key_map(unet.config).items()}


@pytest.mark.parametrize("config,refiner", [(SDXL_BASE_UNET, False), (SDXL_REFINER_UNET, True)])
def test_sdxl_unet_config_inferred_from_shapes(config, refiner):
    shapes = original_unet_shapes(config)
    inferred = infer_unet_config(shapes, pooled_dim=1280, refiner=refiner)
    assert {k: inferred[k] for k in config} == config
    assert "time_embedding_dim" not in inferred


def test_sdxl_unet_key_map_matches_known_original_keys():
    base = original_unet_shapes(SDXL_BASE_UNET)
    assert len(base) == 1680
    key_map = layout.unet_key_map(SDXL_BASE_UNET)
    assert key_map["down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.weight"] == \
        "input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"
    assert key_map["add_embedding.linear_2.bias"] == "label_emb.0.2.bias"
    assert key_map["up_blocks.0.upsamplers.0.conv.weight"] == "output_blocks.2.2.conv.weight"
    assert key_map["up_blocks.2.resnets.2.conv_shortcut.weight"] == "output_blocks.8.0.skip_connection.weight"
    assert base["input_blocks.6.0.op.weight"] == (640, 640, 3, 3)
    assert base["middle_block.1.transformer_blocks.9.attn2.to_k.weight"] == (1280, 2048)
    assert base["label_emb.0.0.weight"] == (1280, 2816)
    refiner = original_unet_shapes(SDXL_REFINER_UNET)
    assert refiner["output_blocks.2.1.conv.weight"] == (1536, 1536, 3, 3)  # no transformer on that level
    assert refiner["output_blocks.8.2.conv.weight"] == (768, 768, 3, 3)
    assert max(int(k.split(".")[1]) for k in refiner if k.startswith("input_blocks.")) == 11
    inverse = layout.invert_key_map(key_map)
    assert inverse["middle_block.2.emb_layers.1.weight"] == "mid_block.resnets.1.time_emb_proj.weight"


def test_sdxl_vae_key_map_and_config():
    from diffusers import AutoencoderKL

    config = {"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "latent_channels": 4,
              "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4}
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(config)
    state = vae.state_dict()
    shapes = {o: tuple(layout.vae_tensor_to_original(d, state[d]).shape)
              for d, o in layout.vae_key_map(vae.config).items()}
    assert shapes["decoder.up.0.block.0.nin_shortcut.weight"] == (128, 256, 1, 1)  # reversed order
    assert shapes["decoder.up.3.upsample.conv.weight"] == (512, 512, 3, 3)
    assert shapes["encoder.mid.attn_1.q.weight"] == (512, 512, 1, 1)
    inferred = infer_vae_config(shapes)
    assert {k: inferred[k] for k in config} == config
    assert inferred["scaling_factor"] == 0.13025


def test_sdxl_text_encoder_layouts_and_configs():
    from accelerate import init_empty_weights
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    with init_empty_weights():
        big_g = CLIPTextModelWithProjection(CLIPTextConfig(
            hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
            projection_dim=1280, hidden_act="gelu", vocab_size=49408))
    original = layout.open_clip_to_original(big_g.state_dict())
    assert original["conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight"].shape == (3840, 1280)
    assert original["conditioner.embedders.1.model.positional_embedding"].shape == (77, 1280)
    back, ignored = layout.open_clip_from_original(original)
    assert ignored == [] and back.keys() == big_g.state_dict().keys()
    config = infer_clip_config({k: tuple(v.shape) for k, v in back.items()}, open_clip=True)
    assert (config["num_hidden_layers"], config["num_attention_heads"], config["projection_dim"]) == (32, 20, 1280)
    assert (config["intermediate_size"], config["hidden_act"]) == (5120, "gelu")
    clip_l = {"embeddings.token_embedding.weight": (49408, 768), "embeddings.position_embedding.weight": (77, 768),
              **{f"encoder.layers.{i}.mlp.fc1.weight": (3072, 768) for i in range(12)}}
    config = infer_clip_config(clip_l, open_clip=False)
    assert (config["num_hidden_layers"], config["num_attention_heads"], config["hidden_act"]) == (12, 12, "quick_gelu")


def test_open_clip_fusion_order_round_trips():
    """q, k, v fuse in that order and split back bit-exactly (random data, tiny width)."""
    gen = torch.Generator().manual_seed(3)
    hf = {f"text_model.encoder.layers.0.self_attn.{p}_proj.{k}": torch.randn(4, 4, generator=gen)
          if k == "weight" else torch.randn(4, generator=gen) for p in "qkv" for k in ("weight", "bias")}
    hf["text_projection.weight"] = torch.randn(3, 4, generator=gen)
    original = layout.open_clip_to_original(hf, prefix="p.")
    fused = original["p.transformer.resblocks.0.attn.in_proj_weight"]
    assert torch.equal(fused[4:8], hf["text_model.encoder.layers.0.self_attn.k_proj.weight"])
    assert torch.equal(original["p.text_projection"], hf["text_projection.weight"].t())
    back, _ = layout.open_clip_from_original(original, prefix="p.")
    assert back.keys() == hf.keys() and all(torch.equal(back[k], hf[k]) for k in hf)


def test_a_text_encoder_with_a_small_vocabulary_is_refused_by_name(tiny_components, tmp_path):
    import copy

    from ldm_patched.modules.checkpoint import CheckpointError, load_checkpoint, original_state_dict, save_checkpoint

    parts = copy.deepcopy(tiny_components)
    state = original_state_dict(**parts)
    key = "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight"
    state[key] = state[key][:1000].clone()
    path = save_checkpoint(tmp_path / "small_vocab.safetensors", state)
    with pytest.raises(CheckpointError, match="small_vocab.safetensors.*1000 tokens"):
        load_checkpoint(path)


# --------------------------------------------------------------------------- (f) the SDXL family by shape


def _family_depths(name: str) -> tuple[list[int], list[int], int]:
    _, down, up, middle = sdxl_family.UPSTREAM_LAYOUTS[name]
    return down, up, middle


@pytest.mark.parametrize("name", sdxl_family.FAMILY)
def test_family_configs_restate_upstreams_block_layouts(name):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(sdxl_family.published_unet(name))
    assert sdxl_family.block_depths(unet) == _family_depths(name)
    assert [len(b.resnets) for b in unet.down_blocks] == sdxl_family.UPSTREAM_LAYOUTS[name][0]


@pytest.mark.parametrize("name", sdxl_family.DISTILLED)
def test_distilled_sdxl_unet_config_inferred_from_shapes(name):
    """SDXL-size SSD-1B, Segmind-Vega and KOALA key shapes (meta device) -> a config whose
    UNet has the published config's every key and shape and upstream's block depths."""
    from diffusers import UNet2DConditionModel

    published = sdxl_family.published_unet(name)
    inferred = infer_unet_config(original_unet_shapes(published), pooled_dim=1280)
    with torch.device("meta"):
        ours, theirs = UNet2DConditionModel.from_config(inferred), UNet2DConditionModel.from_config(published)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    assert sdxl_family.block_depths(ours) == _family_depths(name)


@pytest.mark.parametrize("name", sdxl_family.DISTILLED)
def test_distilled_checkpoint_round_trip(name, tiny_family_checkpoint):
    path, parts = tiny_family_checkpoint(name)
    ours = load_checkpoint(path)
    for component in COMPONENTS:
        assert_same_params(parts[component], getattr(ours, component), component)
    assert sdxl_family.block_depths(ours.unet) == _family_depths(name)


# the two layouts furthest from SDXL: the up path differs from the down path and the mid
# block is one resnet; one resnet per level and no mid block at all
@pytest.mark.parametrize("name", ["SSD-1B", "KOALA-700M"])
def test_distilled_checkpoint_loads_as_diffusers_single_file_loader_does(name, tiny_family_checkpoint, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    path, parts = tiny_family_checkpoint(name)
    ours = load_checkpoint(path)
    pipe = StableDiffusionXLPipeline.from_single_file(
        path, config=write_diffusers_config_dir(tmp_path / "config", parts), local_files_only=True)
    for component in COMPONENTS:
        assert_same_params(getattr(pipe, component), getattr(ours, component), component)
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    context = torch.randn(1, 77, 96, generator=torch.Generator().manual_seed(2))
    cond = {"text_embeds": torch.randn(1, 32), "time_ids": torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]])}
    with torch.no_grad():
        expected = pipe.unet(latent, 500, encoder_hidden_states=context, added_cond_kwargs=cond).sample
        got = ours.unet(latent, 500, encoder_hidden_states=context, added_cond_kwargs=cond).sample
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)   # same weights; kernels may differ


def test_every_original_unet_key_of_a_distilled_file_has_its_lora_names(tiny_family_checkpoint):
    """kohya (`lora_unet_<original path>`) and ComfyUI (`diffusion_model.<original path>`) names of
    every weight in an SSD-1B file reach the parameter holding that weight."""
    from safetensors.torch import load_file

    from ldm_patched.modules.lora import unet_lora_names

    path, _ = tiny_family_checkpoint("SSD-1B")
    unet = load_checkpoint(path).unet
    names, params = unet_lora_names(unet), dict(unet.named_parameters())
    weights = {k[len(layout.UNET_PREFIX):]: v for k, v in load_file(path).items()
               if k.startswith(layout.UNET_PREFIX) and k.endswith(".weight")}
    assert "output_blocks.2.1.transformer_blocks.9.attn2.to_k.weight" in weights   # depth 10 on the way up
    assert "middle_block.1.proj_in.weight" not in weights and "middle_block.0.in_layers.2.weight" in weights
    for original, tensor in weights.items():
        module = original[: -len(".weight")]
        for name in ("lora_unet_" + module.replace(".", "_"), "diffusion_model." + module):
            assert torch.equal(params[names[name]], tensor), name
