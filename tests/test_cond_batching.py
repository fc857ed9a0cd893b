"""Prompt and negative of different 75-token window counts: padded into one UNet batch
only while that costs a small factor, else run as two batches of their own sizes."""

from __future__ import annotations

import pytest
import torch

from ldm_patched.modules.model_patcher import ModelPatcher
from modules import core

WINDOW = 77


def conditioning(unet: torch.nn.Module, windows: int, seed: int) -> core.Conditioning:
    generator = torch.Generator().manual_seed(seed)
    context = unet.config.cross_attention_dim
    pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    return core.Conditioning(embeds=torch.randn(1, windows * WINDOW, context, generator=generator),
                             pooled=torch.randn(1, pooled, generator=generator))


def run_step(unet: torch.nn.Module, positive_windows: int, negative_windows: int) -> tuple[torch.Tensor, list]:
    """One guided prediction; returns it and (batch, tokens) of every UNet call."""
    calls = []

    def record(_module, args, kwargs):
        hidden = kwargs["encoder_hidden_states"]
        calls.append((hidden.shape[0], hidden.shape[1]))

    handle = unet.register_forward_pre_hook(record, with_kwargs=True)
    try:
        patcher = ModelPatcher(unet, torch.device("cpu"), torch.device("cpu"), name="unet")
        stage = core.UNetStage(patcher, conditioning(unet, positive_windows, 1), conditioning(unet, negative_windows, 2))
        sched = core.make_scheduler("euler", "normal")
        sched.set_timesteps(2)
        latents = torch.randn(1, unet.config.in_channels, 8, 8, generator=torch.Generator().manual_seed(3))
        with torch.inference_mode():
            pred = core._predict(stage, sched, latents, sched.timesteps[0], 5.0, 64, 64)
    finally:
        handle.remove()
    return pred, calls


def tokens(calls: list) -> int:
    return sum(batch * length for batch, length in calls)


def test_23_against_19_windows_costs_about_what_23_against_23_costs(tiny_components):
    unet = tiny_components["unet"]
    _, mismatched = run_step(unet, 23, 19)
    _, matched = run_step(unet, 23, 23)
    assert matched == [(2, 23 * WINDOW)]
    assert tokens(mismatched) <= tokens(matched)           # not the 437-window lcm (19x the work)
    assert sorted(mismatched) == [(1, 19 * WINDOW), (1, 23 * WINDOW)]


def test_separate_batches_give_the_padded_batch_result(tiny_components, monkeypatch):
    unet = tiny_components["unet"]
    split, calls = run_step(unet, 5, 2)   # lcm 10 = 5x the shortest: over the limit
    assert len(calls) == 2
    monkeypatch.setattr(core, "MAX_PAD_FACTOR", 1000)
    padded, calls = run_step(unet, 5, 2)
    assert calls == [(2, 10 * WINDOW)]
    torch.testing.assert_close(split, padded, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("positive, negative", [(2, 1), (3, 2), (4, 1), (1, 1)])
def test_small_factors_still_share_one_batch(tiny_components, positive, negative):
    """Unchanged path where the padding is cheap: same single batch of two as before."""
    _, calls = run_step(tiny_components["unet"], positive, negative)
    import math
    assert calls == [(2, math.lcm(positive, negative) * WINDOW)]
