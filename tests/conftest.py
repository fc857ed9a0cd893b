"""Shared fixtures: tiny random SDXL models and checkpoint files (no network, no weights in git).

Session-scoped modules are shared by every test: do not modify them in place
(deep-copy first, or load a fresh copy from ``tiny_checkpoint``).
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before any Hugging Face import: tests never touch the network

import pytest


@pytest.fixture(scope="session")
def tiny_components():
    """Tiny random SDXL base modules: unet, vae, text_encoder, text_encoder_2 (seed 0)."""
    from ldm_patched.modules.demo_model import build_tiny_sdxl

    return build_tiny_sdxl(seed=0)


@pytest.fixture(scope="session")
def tiny_refiner_components():
    """Tiny random SDXL refiner modules: unet, vae, text_encoder_2 (seed 0)."""
    from ldm_patched.modules.demo_model import build_tiny_sdxl

    return build_tiny_sdxl(seed=0, refiner=True)


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_components, tmp_path_factory) -> str:
    """Path of a single-file base checkpoint holding exactly ``tiny_components``."""
    from ldm_patched.modules.checkpoint import original_state_dict, save_checkpoint

    path = tmp_path_factory.mktemp("ckpt") / "tiny_sdxl_base.safetensors"
    return save_checkpoint(path, original_state_dict(**tiny_components), {"title": "tiny base"})


@pytest.fixture(scope="session")
def tiny_refiner_checkpoint(tiny_refiner_components, tmp_path_factory) -> str:
    """Path of a single-file refiner checkpoint holding exactly ``tiny_refiner_components``."""
    from ldm_patched.modules.checkpoint import original_state_dict, save_checkpoint

    path = tmp_path_factory.mktemp("ckpt") / "tiny_sdxl_refiner.safetensors"
    return save_checkpoint(path, original_state_dict(refiner=True, **tiny_refiner_components))


@pytest.fixture(scope="session")
def tiny_family_checkpoint(tmp_path_factory):
    """`tiny_family_checkpoint(name)` -> (path, source components): a tiny single-file
    checkpoint in the block layout of an SDXL family member (tests/helpers/sdxl_family.py)."""
    from ldm_patched.modules.checkpoint import original_state_dict, save_checkpoint
    from ldm_patched.modules.demo_model import build_tiny_sdxl
    from tests.helpers import sdxl_family

    folder = tmp_path_factory.mktemp("family")
    made: dict[str, tuple[str, dict]] = {}

    def get(name: str) -> tuple[str, dict]:
        if name not in made:
            parts = build_tiny_sdxl(seed=1 + sdxl_family.FAMILY.index(name), unet_config=sdxl_family.tiny_unet(name))
            made[name] = (save_checkpoint(folder / f"tiny_{name}.safetensors", original_state_dict(**parts)), parts)
        return made[name]

    return get


@pytest.fixture(scope="session")
def diffusers_config_dir(tiny_components, tmp_path_factory) -> str:
    """A diffusers config folder for ``tiny_components`` (for ``from_single_file(config=...)``)."""
    from ldm_patched.modules.demo_model import write_diffusers_config_dir

    return write_diffusers_config_dir(tmp_path_factory.mktemp("diffusers_config"), tiny_components)


@pytest.fixture
def pipeline(tmp_path, monkeypatch, tiny_checkpoint):
    """Factory: a fresh pipeline state over a tmp model folder holding the tiny base checkpoint.

    `pipeline(policy, budget=..., **settings)` installs a model manager with that policy on the
    CPU (other `MemorySettings` fields as given, e.g. `vram_state`) and returns the folders
    {checkpoints, loras, outputs, vae}; call it again to switch policy (the registry and
    pipeline caches start empty each time).
    """
    import json
    import shutil

    from ldm_patched.modules import model_management as mm
    from modules import config
    from tests.helpers import pipelines

    folders = {name: tmp_path / name for name in ("checkpoints", "loras", "outputs", "vae", "upscale_models",
                                                  "controlnet", "clip_vision", "inpaint")}
    for folder in folders.values():
        folder.mkdir()
    shutil.copy(tiny_checkpoint, folders["checkpoints"] / "tiny_sdxl_base.safetensors")
    config_file = tmp_path / "config.txt"
    config_file.write_text(json.dumps({"path_checkpoints": str(folders["checkpoints"]),
                                       "path_loras": str(folders["loras"]),
                                       "path_outputs": str(folders["outputs"]),
                                       "path_vae": str(folders["vae"]),
                                       **{f"path_{name}": str(folders[name])
                                          for name in ("upscale_models", "controlnet", "clip_vision", "inpaint")}}))
    monkeypatch.setenv("config_path", str(config_file))
    config.reload_config()

    def install(policy, budget: int = 10 * 1024 ** 3, **settings):
        mm.configure(mm.MemorySettings(policy=policy, budget_bytes=budget, total_bytes=budget, **settings))
        pipelines.install()   # the registry and every pipeline cache start empty
        return folders

    yield install
    mm.get_manager().unload_all()
    pipelines.install()
    monkeypatch.undo()
    config.reload_config()


@pytest.fixture
def use_compiler(monkeypatch):
    """`use_compiler(**CompileSettings)`: a compiled-UNet holder for one test (as `--compile-unet`
    would make); dynamo's caches are reset afterwards."""
    import torch

    from modules import compiled_unet, core

    def install(**settings) -> compiled_unet.CompiledUNets:
        holder = compiled_unet.CompiledUNets(compiled_unet.CompileSettings(**settings))
        monkeypatch.setattr(core, "UNET_COMPILER", holder)
        return holder

    with torch._dynamo.config.patch(recompile_limit=torch._dynamo.config.recompile_limit):   # restored after
        yield install
    torch._dynamo.reset()


def pytest_collection_modifyitems(config, items):
    """Skip `cuda`-marked tests, with the reason, where no CUDA device is present."""
    cuda_items = [item for item in items if item.get_closest_marker("cuda") is not None]
    if not cuda_items:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device: torch.cuda.is_available() is False")
    for item in cuda_items:
        item.add_marker(skip)
