"""Fooocus's sampling-time tweaks: image sharpness and ADM guidance.

Both act on the numbers that flow through one denoising step and touch no weight,
so changing them never moves or patches a model.

- **Sharpness** (upstream's default 2.0): in each guided step the positive noise
  prediction is blended with an edge-preserving blur of itself (a joint bilateral
  filter guided by the current estimate of the clean image), with weight
  ``0.001 * sharpness * (1 - t / 999)``. The blend is strongest at the first,
  noisiest steps and fades to nothing at t = 0; then classifier-free guidance is
  applied as usual. Blurring the positive side only pushes the guided result
  away from blur, which is what makes images look crisper.
- **ADM guidance** (upstream's defaults 1.5, 0.8, 0.3): SDXL conditions on the
  "original size" of its training images. For the first ``adm_scaler_end`` of the
  timestep range the positive prompt claims a size ``adm_scaler_positive`` times
  larger and the negative one ``adm_scaler_negative`` times that size; after that
  both use the true size. Only the base model's size conditioning is scaled (the
  refiner conditions on an aesthetic score instead).

- **CFG mimicking from TSNR** (upstream's ``adaptive_cfg``, default 7): when the
  guidance scale is above ``adaptive_cfg``, each step's guided prediction blends the
  real guidance with guidance at ``adaptive_cfg``, by the diffusion progress
  ``p = 1 - t / 999``: ``real * p + mimicked * (1 - p)``. The noisy first steps
  follow the milder scale (high scales burn them), the last ones the real one.

With sharpness 0, ADM 1, 1, 0 and the guidance scale at most ``adaptive_cfg`` every
step is exactly the plain step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

# The filter's shape, as upstream documents it: a 13x13 window, spatial and range
# sigmas of 3 (the range measured on the guide normalised to unit deviation), L1
# distance over channels, reflected borders.
KERNEL = 13
SIGMA_SPACE = 3.0
SIGMA_RANGE = 3.0
MAX_TIMESTEP = 999.0


@dataclass(frozen=True)
class Guidance:
    sharpness: float = 0.0
    adm_positive: float = 1.0
    adm_negative: float = 1.0
    adm_end: float = 0.0
    adaptive_cfg: float | None = None   # None: guidance is never mimicked

    @property
    def neutral(self) -> bool:
        return self.sharpness == 0 and (self.adm_end == 0 or (self.adm_positive == 1 and self.adm_negative == 1))

    def adm_active(self, t: float) -> bool:
        """Whether timestep `t` lies in the first `adm_end` of the range (upstream's test:
        t > 999 * (1 - end))."""
        return float(t) > MAX_TIMESTEP * (1.0 - self.adm_end)

    def sharpness_weight(self, t: float) -> float:
        return 0.001 * self.sharpness * (1.0 - float(t) / MAX_TIMESTEP)

    def cfg_at(self, cfg: float, t: float) -> float:
        """The guidance scale step `t` applies. Blending the real and the mimicked guided
        predictions by p is guidance at ``cfg * p + adaptive_cfg * (1 - p)`` (both are
        linear in the scale); at or below adaptive_cfg it is `cfg` itself."""
        if self.adaptive_cfg is None or cfg <= self.adaptive_cfg:
            return cfg
        progress = 1.0 - float(t) / MAX_TIMESTEP
        return cfg * progress + self.adaptive_cfg * (1.0 - progress)


NEUTRAL = Guidance()


def scaled_size_ids(ids: torch.Tensor, t: float, guidance: Guidance, guided: bool) -> torch.Tensor:
    """Base-model time ids ``[h, w, crop_top, crop_left, target_h, target_w]`` per row
    (negative row first when `guided`) with the "original size" of each row scaled
    while ADM is active. Sizes are truncated to whole pixels, as upstream does."""
    if not guidance.adm_active(t):
        return ids
    out = ids.clone()
    scales = [guidance.adm_negative, guidance.adm_positive] if guided else [guidance.adm_positive]
    for row, scale in enumerate(scales):
        height, width = float(ids[row, 4]), float(ids[row, 5])   # the target (true) size
        out[row, 0] = int(height * scale)
        out[row, 1] = int(width * scale)
    return out


def _gaussian_window(size: int, sigma: float, device, dtype) -> torch.Tensor:
    offsets = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    line = torch.exp(-offsets ** 2 / (2 * sigma ** 2))
    line = line / line.sum()
    return (line[:, None] * line[None, :]).reshape(-1)       # [size*size]


def _neighbourhoods(x: torch.Tensor, size: int) -> torch.Tensor:
    """[B, C, size*size, H, W]: each pixel's window, borders reflected."""
    b, c, h, w = x.shape
    pad = size // 2
    # Reflection needs more pixels than the pad; a latent that small (an image under 56 px)
    # repeats its border instead of failing.
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect" if pad < min(h, w) else "replicate")
    return F.unfold(padded, size).reshape(b, c, size * size, h, w)


def joint_bilateral(x: torch.Tensor, guide: torch.Tensor, size: int = KERNEL,
                    sigma_space: float = SIGMA_SPACE, sigma_range: float = SIGMA_RANGE) -> torch.Tensor:
    """Average each pixel of `x` over its window, weighting a neighbour by its distance
    (Gaussian) and by how different the guide is there (Gaussian in the L1 distance
    over channels): edges of the guide are kept, flat areas smoothed."""
    space = _gaussian_window(size, sigma_space, x.device, x.dtype).view(1, 1, -1, 1, 1)
    windows = _neighbourhoods(guide, size)
    distance = (windows - guide.unsqueeze(2)).abs().sum(dim=1, keepdim=True)    # [B, 1, K, H, W]
    weights = space * torch.exp(-0.5 * (distance / sigma_range) ** 2)
    return (_neighbourhoods(x, size) * weights).sum(dim=2) / weights.sum(dim=2)


def anisotropic_filter(x: torch.Tensor, guide: torch.Tensor) -> torch.Tensor:
    """`joint_bilateral` with the guide normalised per image to zero mean, unit deviation."""
    std, mean = torch.std_mean(guide, dim=(1, 2, 3), keepdim=True)
    return joint_bilateral(x, (guide - mean) / (std + 1e-5))


def alpha_bar(alphas_cumprod: torch.Tensor, t: float) -> float:
    """Cumulative signal fraction at a (possibly fractional) timestep, interpolated linearly."""
    t = min(max(float(t), 0.0), len(alphas_cumprod) - 1.0)
    low = int(math.floor(t))
    high = min(low + 1, len(alphas_cumprod) - 1)
    frac = t - low
    return float(alphas_cumprod[low]) * (1 - frac) + float(alphas_cumprod[high]) * frac


def sharpen(eps: torch.Tensor, model_input: torch.Tensor, t: float, guidance: Guidance,
            alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The positive noise prediction with the sharpness blend applied.

    `model_input` is the scaled (variance-preserving) input the UNet saw, so the clean
    image estimate is proportional to ``model_input - sqrt(1 - alpha_bar) * eps`` on
    every scheduler; its scale does not matter because the guide is normalised."""
    weight = guidance.sharpness_weight(t)
    if weight == 0:
        return eps
    a = alpha_bar(alphas_cumprod, t)
    clean = model_input.float() - math.sqrt(1.0 - a) * eps.float()
    degraded = anisotropic_filter(eps.float(), clean)
    return (degraded * weight + eps.float() * (1.0 - weight)).to(eps.dtype)
