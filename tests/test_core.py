"""Sampler/scheduler mapping and the SDXL micro-conditioning."""

import pytest
import torch

from modules import core, flags
from modules.webui import supported_samplers, supported_schedulers


def test_every_offered_sampler_builds_with_the_normal_schedule_and_steps():
    assert "dpmpp_2m_sde_gpu" in supported_samplers() and "karras" in supported_schedulers()
    for sampler in supported_samplers():
        scheduler = core.make_scheduler(sampler, "normal")
        scheduler.set_timesteps(4)
        # dpm_adaptive chooses its calls as it goes: only the first is known before it runs
        assert len(scheduler.timesteps) >= (1 if sampler == "dpm_adaptive" else 4), sampler


def test_the_page_offers_upstreams_every_sampler_and_scheduler():
    assert supported_samplers() == list(flags.SAMPLER_NAMES)
    assert supported_schedulers() == list(flags.SCHEDULER_NAMES)


def test_each_performance_mode_pair_is_supported():
    for mode in flags.Performance:
        settings = flags.performance_settings(mode)
        if settings.sampler:
            core.make_scheduler(settings.sampler, settings.scheduler)


def test_karras_changes_the_sigmas_and_trailing_spacing_reaches_the_last_timestep():
    normal, karras = core.make_scheduler("euler", "normal"), core.make_scheduler("euler", "karras")
    normal.set_timesteps(8)
    karras.set_timesteps(8)
    assert not torch.allclose(normal.sigmas, karras.sigmas)
    uniform = core.make_scheduler("euler", "sgm_uniform")
    uniform.set_timesteps(4)
    assert int(uniform.timesteps[0]) == 999   # Lightning's trailing schedule starts at the last step


def test_unknown_names_list_the_available_ones():
    with pytest.raises(ValueError, match="no_such.*euler"):
        core.make_scheduler("no_such", "normal")
    with pytest.raises(ValueError, match="weird.*karras"):
        core.make_scheduler("euler", "weird")
    with pytest.raises(ValueError, match="karras.*lcm"):
        core.make_scheduler("lcm", "karras")   # LCM has no Karras sigmas: refused, not ignored


def test_time_ids_follow_sdxl_base_and_refiner_conditioning():
    base = core.time_ids(1152, 896, refiner=False, aesthetic=6.0, device="cpu", dtype=torch.float32)
    refiner = core.time_ids(1152, 896, refiner=True, aesthetic=2.5, device="cpu", dtype=torch.float32)
    assert base.tolist() == [[896, 1152, 0, 0, 896, 1152]]
    assert refiner.tolist() == [[896, 1152, 0, 0, 2.5]]


def test_long_prompts_are_encoded_in_windows_not_cut():
    from ldm_patched.modules.checkpoint import load_tokenizers

    tokenizer, tokenizer_2 = load_tokenizers()
    short = "a photo of a cat"
    assert core.token_windows(tokenizer, short).tolist() == [tokenizer(
        short, padding="max_length", max_length=77, truncation=True).input_ids]
    assert core.token_windows(tokenizer_2, short)[0].tolist() == tokenizer_2(
        short, padding="max_length", max_length=77, truncation=True).input_ids
    long = " ".join(["cat"] * 100)
    windows = core.token_windows(tokenizer, long)
    assert windows.shape == (2, 77)
    assert int((windows == tokenizer.convert_tokens_to_ids("cat</w>")).sum()) == 100
    assert windows[:, 0].tolist() == [tokenizer.bos_token_id] * 2


def test_conditionings_of_different_lengths_share_a_batch():
    a, b = torch.zeros(1, 77, 4), torch.ones(1, 154, 4)
    same = core._same_length([a, b])
    assert [t.shape[1] for t in same] == [154, 154] and torch.equal(same[1], b)
