"""FreeU, as upstream Fooocus applies it to the base UNet (ComfyUI's FreeU_V2 variant).

In the UNet's decoder, at each output block whose backbone features (the decoder's
hidden state before it is joined with the skip connection) have 4x or 2x the UNet's
first channel count, FreeU
- scales the first half of the backbone channels by ``1 + (b - 1) * m``, where ``m`` is
  the channel-mean of the features min-max normalised over each image ("structure-based"
  scaling of the v2 paper, not diffusers' constant ``b`` of v1), and
- scales the lowest frequencies of the skip connection by ``s`` (a 2x2 window around the
  centre of its shifted 2D Fourier spectrum).
``(b1, s1)`` act at 4x the first channel count, ``(b2, s2)`` at 2x.

A forward-time change: pre-hooks on the decoder's ResNet blocks, registered for one
sampling run and removed after it. No weight is patched and nothing moves, so a request
without FreeU runs exactly as before; while they are on, the compiled UNet runs eager
(`active`), so no compiled graph ever contains them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class FreeU:
    b1: float
    b2: float
    s1: float
    s2: float


def fourier_filter(x: torch.Tensor, scale: float, threshold: int = 1) -> torch.Tensor:
    """`x` with the frequencies within `threshold` of the spectrum's centre times `scale`."""
    spectrum = torch.fft.fftshift(torch.fft.fftn(x.float(), dim=(-2, -1)), dim=(-2, -1))
    height, width = x.shape[-2:]
    mask = torch.ones(x.shape[-2:], device=x.device)
    mask[height // 2 - threshold:height // 2 + threshold, width // 2 - threshold:width // 2 + threshold] = scale
    filtered = torch.fft.ifftn(torch.fft.ifftshift(spectrum * mask, dim=(-2, -1)), dim=(-2, -1)).real
    return filtered.to(x.dtype)


def scale_backbone(h: torch.Tensor, b: float) -> torch.Tensor:
    """The first half of `h`'s channels times 1 + (b - 1) * (channel mean, min-max normalised per image)."""
    mean = h.mean(dim=1, keepdim=True)
    flat = mean.flatten(1)
    low = flat.min(dim=1).values.view(-1, 1, 1, 1)
    high = flat.max(dim=1).values.view(-1, 1, 1, 1)
    factor = (b - 1.0) * (mean - low) / (high - low) + 1.0
    half = h.shape[1] // 2
    return torch.cat([h[:, :half] * factor, h[:, half:]], dim=1)


class _DecoderHook:
    """Pre-hook of one decoder ResNet: its input is [backbone, skip] along channels."""

    def __init__(self, backbone_channels: int, b: float, s: float) -> None:
        self.channels, self.b, self.s = backbone_channels, b, s

    def __call__(self, module, args):
        joined, *rest = args
        h, skip = joined[:, :self.channels], joined[:, self.channels:]
        return (torch.cat([scale_backbone(h, self.b), fourier_filter(skip, self.s)], dim=1), *rest)


def _decoder_resnets(unet: torch.nn.Module) -> Iterator[tuple[torch.nn.Module, int]]:
    """(ResNet, backbone channels of its input) of each decoder block of a diffusers UNet: the
    first ResNet of a block takes the previous block's output, the others the block's own."""
    channels = list(reversed(unet.config.block_out_channels))
    for index, block in enumerate(unet.up_blocks):
        previous = channels[max(index - 1, 0)]
        for position, resnet in enumerate(block.resnets):
            yield resnet, previous if position == 0 else resnet.out_channels


@contextlib.contextmanager
def applied(unet: torch.nn.Module, settings: FreeU | None) -> Iterator[None]:
    """FreeU on `unet` (a diffusers UNet2DConditionModel) for the duration of the block."""
    if settings is None:
        yield
        return
    first = unet.config.block_out_channels[0]
    scales = {first * 4: (settings.b1, settings.s1), first * 2: (settings.b2, settings.s2)}
    handles = [resnet.register_forward_pre_hook(_DecoderHook(channels, *scales[channels]))
               for resnet, channels in _decoder_resnets(unet) if channels in scales]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def active(unet: torch.nn.Module) -> bool:
    """Whether FreeU hooks are on this UNet now (the compiled forward must not run it): read
    from the UNet's own decoder hooks, so no registry outside the model can go stale."""
    return any(isinstance(hook, _DecoderHook) for block in getattr(unet, "up_blocks", ())
               for resnet in block.resnets for hook in resnet._forward_pre_hooks.values())
