"""The image-prompt preprocessors of the ControlNet types (torch-free: numpy, OpenCV, PIL).

* PyraCanny: Canny edges of each colour channel at nine scales of the image (0.2 to 1.0),
  blended coarse to fine, summed over the channels and stretched between the 1st and 99th
  percentile. Why a pyramid (upstream's note): Stability's Control-LoRA Canny seems trained
  on edge maps of several resolutions, and one resolution misses structure another finds.
* CPDS: contrast-preserving decolourisation (Lu, Xu and Jia, "Contrast Preserving
  Decolorization", ICCP 2012; OpenCV's ``decolor``) of the slightly blurred image, plus how
  far each pixel's colour is from OpenCV's colour-boosted version of it, stretched between
  the 4th and 96th percentile.

Both return an HxW uint8 map; `as_hint` makes the HxWx3 image the ControlNet is given.
"""

from __future__ import annotations

import numpy as np

from modules import flags

CANNY_LOW, CANNY_HIGH = 64, 128             # upstream's Canny threshold defaults
PYRAMID_SCALES = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
PYRAMID_KEEP = 0.75                         # share of the coarser levels when a finer one is added
CANNY_PERCENTILES = (1, 99)
CPDS_BLUR_SIGMA = 0.8
CPDS_PERCENTILES = (4, 96)


def _cv2():
    import cv2   # opencv-python-headless (requirements.txt); imported late: only these two need it
    return cv2


def fill_resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """HxWx3 uint8 resized (Lanczos) to cover width x height with its aspect ratio kept,
    then centre-cropped to exactly that: upstream's "crop and resize" for control images."""
    from PIL import Image

    src_h, src_w = image.shape[:2]
    if (src_w, src_h) == (width, height):
        return image
    if width / height > src_w / src_h:
        new_w, new_h = width, max(height, src_h * width // src_w)
    else:
        new_w, new_h = max(width, src_w * height // src_h), height
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), resample=Image.Resampling.LANCZOS))
    left, top = new_w // 2 - width // 2, new_h // 2 - height // 2
    return np.ascontiguousarray(resized[top:top + height, left:left + width])


def stretch(values: np.ndarray, low_percentile: float, high_percentile: float) -> np.ndarray:
    """float values mapped so that the two percentiles become 0 and 255, clipped, as uint8.
    A map without spread (a flat image has no edges) is all zeros, not a division by zero."""
    low, high = np.percentile(values, (low_percentile, high_percentile))
    if not high > low:
        return np.zeros(values.shape, np.uint8)
    scaled = (values.astype(np.float32) - low) / (high - low) * 255.0
    return np.clip(scaled, 0, 255).astype(np.uint8)


def _channel_edges(image: np.ndarray, low: int, high: int) -> np.ndarray:
    """HxWx3 float32 in {0, 1}: Canny edges of each channel on its own."""
    cv2 = _cv2()
    return np.stack([cv2.Canny(np.ascontiguousarray(image[..., c]), int(low), int(high))
                     for c in range(3)], axis=2).astype(np.float32) / 255.0


def canny_pyramid(image: np.ndarray, low: int = CANNY_LOW, high: int = CANNY_HIGH) -> np.ndarray:
    """PyraCanny's edge map (HxW uint8) of an HxWx3 uint8 image."""
    cv2 = _cv2()
    height, width = image.shape[:2]
    edges = None
    for scale in PYRAMID_SCALES:
        size = (max(1, int(width * scale)), max(1, int(height * scale)))
        level = _channel_edges(cv2.resize(image, size, interpolation=cv2.INTER_AREA), low, high)
        if edges is None:
            edges = level
            continue
        coarser = cv2.resize(edges, size, interpolation=cv2.INTER_LINEAR)
        edges = coarser * PYRAMID_KEEP + level * (1.0 - PYRAMID_KEEP)
    return stretch(edges.sum(axis=2), *CANNY_PERCENTILES)


def decolorize(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(gray HxW, colour boost HxWx3) from OpenCV's contrast-preserving decolourisation.

    OpenCV's solver divides by the image's colour contrast: an image without any (grey, or
    flat) comes back as one constant (0 or 255 depending on the OpenCV version). There the
    luma is the decolourisation and the image is its own boost."""
    cv2 = _cv2()
    gray, boost = cv2.decolor(image)
    if gray.min() == gray.max() and image.min() != image.max():
        return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), image
    return gray, boost


def cpds(image: np.ndarray) -> np.ndarray:
    """CPDS's structure map (HxW uint8) of an HxWx3 uint8 image."""
    cv2 = _cv2()
    blurred = cv2.GaussianBlur(image, (0, 0), CPDS_BLUR_SIGMA)
    gray, boost = decolorize(blurred)
    colour_offset = np.linalg.norm(blurred.astype(np.float32) - boost.astype(np.float32), axis=2)
    return stretch(gray.astype(np.float32) + colour_offset, *CPDS_PERCENTILES)


def as_hint(image: np.ndarray) -> np.ndarray:
    """An HxW map (or an image given as it is) as the HxWx3 uint8 the ControlNet takes."""
    if image.ndim == 2:
        return np.repeat(image[:, :, None], 3, axis=2)
    return image


def control_hint(image: np.ndarray, kind: str, width: int, height: int, low: int = CANNY_LOW,
                 high: int = CANNY_HIGH, skip: bool = False) -> np.ndarray:
    """The HxWx3 hint of one PyraCanny/CPDS image prompt at width x height, as upstream makes
    it: the image fitted to the generation's size, then its type's preprocessor (`skip`: the
    image is a map already, Developer Debug Mode's "Skip Preprocessors")."""
    fitted = fill_resize(image, width, height)
    if skip:
        return fitted
    if kind == flags.PYRACANNY:
        return as_hint(canny_pyramid(fitted, low, high))
    if kind == flags.CPDS:
        return as_hint(cpds(fitted))
    raise ValueError(f"no preprocessor for image-prompt type {kind!r}")
