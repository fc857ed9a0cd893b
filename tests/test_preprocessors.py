"""PyraCanny and CPDS preprocessors on synthetic images, against what the published
algorithms imply (worked out by hand, not read from the code)."""

from __future__ import annotations

import numpy as np
import pytest

from modules import preprocessors


def _step(left: int, right: int, size: int = 96, at: int = 48) -> np.ndarray:
    image = np.full((size, size, 3), left, np.uint8)
    image[:, at:] = right
    return image


def test_canny_thresholds_follow_the_sobel_gradient_of_a_step():
    """OpenCV's Canny compares |dx| + |dy| of the 3x3 Sobel operator, which is 4x a step's
    height: a step of 30 grey levels has gradient 120 at every pyramid level (area
    resizing splits a step over two pixels, the central difference still spans it all)."""
    step = _step(100, 130)
    assert preprocessors.canny_pyramid(step, 100, 110).max() == 255
    assert not preprocessors.canny_pyramid(step, 125, 130).any()


def test_canny_edges_sit_on_the_step_and_nowhere_else():
    edges = preprocessors.canny_pyramid(_step(0, 200))
    assert edges.shape == (96, 96) and edges.dtype == np.uint8
    columns = np.nonzero(edges.any(axis=0))[0]
    # the coarsest level (0.2: 5 pixels per pixel) blurs the line by a few of its pixels
    assert columns.min() >= 48 - 10 and columns.max() <= 48 + 10
    assert abs(int(edges.sum(axis=0).argmax()) - 48) <= 1
    # a vertical step: every row away from the border is the same
    assert (edges[10:-10] == edges[10]).all()


def test_a_flat_image_has_no_edges_and_no_nan():
    assert not preprocessors.canny_pyramid(np.full((64, 64, 3), 90, np.uint8)).any()
    assert not preprocessors.cpds(np.full((64, 64, 3), 90, np.uint8)).any()


def test_cpds_keeps_the_contrast_of_colours_of_equal_luma():
    """The paper's point: red (255, 0, 0) and green (0, 130, 0) have the same luma
    (0.299 * 255 = 0.587 * 130 = 76), so a plain grey conversion loses the boundary;
    contrast-preserving decolourisation keeps the two apart."""
    rng = np.random.default_rng(0)
    image = np.zeros((64, 96, 3), np.float32)
    image[:, :48] = (255, 0, 0)
    image[:, 48:] = (0, 130, 0)
    image = np.clip(image + rng.normal(0, 5, image.shape), 0, 255).astype(np.uint8)
    luma = image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    assert abs(luma[:, :40].mean() - luma[:, 56:].mean()) < 2
    structure = preprocessors.cpds(image)
    assert abs(float(structure[:, :40].mean()) - float(structure[:, 56:].mean())) > 150


def test_cpds_of_a_grey_image_is_its_stretched_luma():
    """Grey halves 60 | 180: no colour, so the map is the grey itself stretched between its
    4th and 96th percentiles (60 and 180): 0 on the left, 255 on the right."""
    structure = preprocessors.cpds(_step(60, 180, size=64))
    assert (structure[:, :44] == 0).all() and (structure[:, 52:] == 255).all()
    assert (np.diff(structure[0].astype(int)) >= 0).all()   # the blurred boundary rises


@pytest.mark.parametrize("size, target", [((60, 90), (64, 48)), ((90, 60), (48, 64)), ((64, 64), (64, 64))])
def test_fill_resize_covers_the_target_and_crops_the_centre(size, target):
    height, width = size
    image = np.zeros((height, width, 3), np.uint8)
    image[:, width // 2:] = 255                       # left half black, right half white
    out = preprocessors.fill_resize(image, *target)
    assert out.shape == (target[1], target[0], 3)
    middle = target[0] // 2
    assert out[:, :middle - 3].max() <= 8 and out[:, middle + 3:].min() >= 247   # still centred
