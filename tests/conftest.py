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
def diffusers_config_dir(tiny_components, tmp_path_factory) -> str:
    """A diffusers config folder for ``tiny_components`` (for ``from_single_file(config=...)``)."""
    from ldm_patched.modules.demo_model import write_diffusers_config_dir

    return write_diffusers_config_dir(tmp_path_factory.mktemp("diffusers_config"), tiny_components)
