"""Developer Debug Mode's inpaint options through the pipeline on the tiny models: the mask
grown or shrunk (OpenCV's morphology is the oracle), inverted, the engine choosing its
patch file, the empty initial latent, and Debug Inpaint Preprocessing returning the
prepared crop and mask without a UNet call."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from PIL import Image

from ldm_patched.modules import model_management as mm
from modules import inpaint
from tests.helpers import input_image_files, pipelines
from tests.helpers.input_image_files import INPUT, MASK, MODES

BASE = {"prompt": "a cat", "base_model": "tiny_sdxl_base.safetensors", "steps": 2, "seed": 5,
        "performance": "Speed", **MODES["inpaint"][0]}
KERNEL = np.ones((3, 3), np.uint8)


@pytest.fixture
def served(pipeline, tiny_components, monkeypatch):
    """(folders, tiny UNet): every input-image model file (the v2.6 patch and the head) served."""
    unet = tiny_components["unet"]
    return input_image_files.serve(pipeline, unet, monkeypatch, mm.Policy.RESIDENT), unet


def run(extra: dict) -> tuple[list[str], dict]:
    result = pipelines.process_request({**BASE, **extra})
    assert "error" not in result.report, result.report
    return result.images, result.report


def expected_crop_mask(full_mask: np.ndarray) -> np.ndarray:
    return inpaint.prepare(INPUT, full_mask, side=input_image_files.IMAGE_INPUT_SIDE).mask


@pytest.mark.parametrize("pixels", [5, -3])
def test_erode_or_dilate_is_opencvs_square_morphology(pixels):
    blob = np.zeros((40, 50), np.uint8)
    blob[10:25, 12:30] = 255
    blob[0:6, 44:50] = 255   # at the corner: the border must not grow or eat it
    oracle = (cv2.dilate(blob, KERNEL, iterations=pixels) if pixels > 0
              else cv2.erode(blob, KERNEL, iterations=-pixels))
    assert np.array_equal(inpaint.erode_or_dilate(blob, pixels), oracle)


@pytest.mark.parametrize("extra, full_mask", [
    ({"inpaint_erode_or_dilate": 4}, cv2.dilate(MASK, KERNEL, iterations=4)),
    ({"inpaint_erode_or_dilate": -3}, cv2.erode(MASK, KERNEL, iterations=3)),
    ({"invert_mask_checkbox": True}, 255 - MASK),
    ({"inpaint_erode_or_dilate": 2, "invert_mask_checkbox": True}, 255 - cv2.dilate(MASK, KERNEL, iterations=2)),
])
def test_debug_preprocessing_returns_the_changed_mask_without_sampling(served, extra, full_mask):
    images, report = run({"debugging_inpaint_preprocessor": True, **extra})
    assert report["unet_calls"] == 0 and report["preprocessed_images"] == 2
    fill, mask = (np.asarray(Image.open(path).convert("RGB")) for path in images)
    assert np.array_equal(mask[..., 0], expected_crop_mask(full_mask))
    assert fill.shape == mask.shape


@pytest.mark.parametrize("engine, patch", [("v1", "inpaint.fooocus.patch"), ("v2.6", "inpaint_v26.fooocus.patch"),
                                           ("v2.5", None), ("None", None)])
def test_the_engine_picks_its_patch_file(served, engine, patch):
    folders, unet = served
    input_image_files.write_tiny_inpaint_patch(folders["inpaint"] / "inpaint.fooocus.patch", unet, seed=1)
    _, report = run({"inpaint_engine": engine})
    assert report["inpaint_patch"] == patch and report["inpaint_engine"] == engine
    assert ("inpaint_head" in report) == (patch is not None)   # the head goes with a patch


def test_an_unknown_engine_is_named(served):
    result = pipelines.process_request({**BASE, "inpaint_engine": "v3"})
    assert "inpaint_engine" in result.report["error"]


def test_disabling_the_initial_latent_repaints_differently_and_keeps_the_outside(served):
    plain, _ = run({})
    empty, _ = run({"inpaint_disable_initial_latent": True})
    a, b = (np.asarray(Image.open(p[0]).convert("RGB")) for p in (plain, empty))
    assert not np.array_equal(a[8:24, 8:24], b[8:24, 8:24])
    far = np.ones(MASK.shape, bool)
    far[:24 + 33, :24 + 33] = False
    assert np.array_equal(b[far], INPUT[far])
