"""Fooocus V2 prompt expansion on a tiny random GPT-2 (built in tests/helpers.py, no network)."""

import json

import pytest
import torch
from PIL import Image

import args_manager
from ldm_patched.modules import model_management as mm
from ldm_patched.modules import telemetry
from ldm_patched.modules.model_patcher import ModelPatcher
from modules import config, expansion
from tests.helpers.expansion import EXPANSION_WORDS, build_tiny_expansion
from tests.helpers.patching import CPU, META, meta_settings
from tests.helpers import pipelines

SMALL = {"base_model": "tiny_sdxl_base.safetensors", "prompt": "a cat", "negative_prompt": "",
         "width": 64, "height": 64, "steps": 1, "seed": 11, "sampler": "euler", "scheduler": "normal",
         "guidance_scale": 5.0, "styles": ["Fooocus V2"], "sharpness": 0.0}


@pytest.fixture
def tiny_expansion(tmp_path):
    folder = build_tiny_expansion(tmp_path / "fooocus_expansion")
    yield folder
    expansion.drop()


@pytest.fixture
def cpu_manager():
    mm.configure(mm.MemorySettings(policy=mm.Policy.CONSERVATIVE, budget_bytes=1 << 33, total_bytes=1 << 33))
    yield
    expansion.drop()


def counted(action) -> telemetry.MoveCounters:
    before = telemetry.snapshot()
    action()
    return telemetry.snapshot().minus(before)


def test_same_seed_same_expansion_other_seed_another(tiny_expansion, cpu_manager):
    model = expansion.get_expansion(tiny_expansion, allow_download=False)
    first = model("a cat, glowing", 1234)
    assert first == model("a cat, glowing", 1234)
    assert first == model("a cat, glowing", 1234 + 2 ** 32)     # the seed is taken mod 2**32, as upstream
    others = {model("a cat, glowing", seed) for seed in range(1, 6)}
    assert len(others - {first}) >= 3
    assert first.startswith("a cat, glowing,")
    added = first[len("a cat, glowing,"):].replace(",", " ").split()
    assert added and set(added) <= set(EXPANSION_WORDS)           # only words of positive.txt
    assert len(added) == len(set(added))                          # no word twice


def test_expansion_fills_whole_prompt_windows(tiny_expansion, cpu_manager):
    model = expansion.get_expansion(tiny_expansion, allow_download=False)
    text = "a cat, " + "cat " * 71        # 75 GPT-2 tokens with the comma: nothing to add
    assert len(model.tokenizer(expansion.tidy(text) + ",").input_ids) == 75
    assert model(text, 1) == expansion.tidy(text)
    assert model("", 1) == ""
    assert model("  a   cat ..", 3).startswith("a cat,")


def test_missing_files_refuse_fooocus_v2_saying_where_they_go(pipeline, tmp_path, monkeypatch):
    pipeline(mm.Policy.CONSERVATIVE)
    empty = tmp_path / "prompt_expansion" / "fooocus_expansion"
    monkeypatch.setenv("path_fooocus_expansion", str(empty))
    monkeypatch.setattr(args_manager.args, "disable_preset_download", True, raising=False)
    config.reload_config()
    refused = pipelines.process_request(dict(SMALL))
    assert refused.images == []
    error = refused.report["error"]
    # Where the files go, by the folder's config key (clients never see the server's paths).
    assert "Fooocus V2" in error and "path_fooocus_expansion" in error and "pytorch_model.bin" in error
    assert str(tmp_path) not in error
    assert "positive.txt" in error
    fine = pipelines.process_request({**SMALL, "styles": []})
    assert "error" not in fine.report and len(fine.images) == 1


def test_requests_use_one_expansion_per_image_seed(pipeline, tiny_expansion, monkeypatch):
    pipeline(mm.Policy.RESIDENT)
    monkeypatch.setenv("path_fooocus_expansion", str(tiny_expansion))
    config.reload_config()
    result = pipelines.process_request({**SMALL, "image_number": 2})
    assert "error" not in result.report, result.report
    first, second = result.report["prompt_expansions"]
    model = expansion.get_expansion(tiny_expansion, allow_download=False)
    assert (first, second) == (model("a cat", 11), model("a cat", 12))
    meta = [json.loads(Image.open(p).text["parameters"]) for p in result.images]
    # As upstream, the expansion (which starts with the prompt) is encoded as a text of its own.
    assert [m["full_prompt"] for m in meta] == [["a cat", first], ["a cat", second]]
    assert [m["prompt_expansion"] for m in meta] == [first, second]
    again = pipelines.process_request({**SMALL, "image_number": 2})
    assert again.report["prompt_expansions"] == [first, second]
    moved = again.report["model_management"]
    assert (moved["models_loaded"], moved["bytes_to_device"], moved["text_encodes"]) == (0, 0, 0)
    status = pipelines.current().model_status()
    assert "fooocus_expansion" in [m["name"] for m in status["models"]]
    assert status["prompt_expansion"]["loaded"] is True


def test_resident_expansion_loads_once_then_moves_nothing(tiny_expansion):
    mm.configure(meta_settings(1 << 30, mm.Policy.RESIDENT))
    model = expansion.get_expansion(tiny_expansion, allow_download=False)
    first = counted(lambda: mm.load_models_gpu([model.patcher]))
    assert first.models_loaded == 1 and first.bytes_to_device > 0
    other = ModelPatcher(torch.nn.Linear(8, 8), META, CPU, name="unet")
    for _ in range(3):
        mm.load_models_gpu([other])
        again = counted(lambda: mm.load_models_gpu([model.patcher]))
        assert (again.models_loaded, again.bytes_to_device, again.bytes_to_offload) == (0, 0, 0)
    entry = [m for m in mm.get_manager().status()["models"] if m["name"] == "fooocus_expansion"]
    assert entry and entry[0]["bytes"] >= sum(p.numel() * 4 for p in model.patcher.model.parameters())


def test_conservative_policy_offloads_the_expansion_like_upstream(tiny_expansion):
    mm.configure(meta_settings(1 << 30, mm.Policy.CONSERVATIVE, always_offload_from_vram=True))
    model = expansion.get_expansion(tiny_expansion, allow_download=False)
    clip = ModelPatcher(torch.nn.Linear(8, 8), META, CPU, name="clip")
    for _ in range(2):
        loaded = counted(lambda: mm.load_models_gpu([model.patcher]))
        assert loaded.models_loaded == 1 and loaded.bytes_to_device > 0
        offloaded = counted(lambda: mm.load_models_gpu([clip]))
        assert offloaded.models_unloaded >= 1 and offloaded.bytes_to_offload > 0
        assert all(p.device == CPU for p in model.patcher.model.parameters())
