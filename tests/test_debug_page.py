"""Developer Debug Mode's page values as request fields; the request parser is the oracle
for what the server then does with them."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from modules import config as config_module
from modules.debug_page import DebugValues, loaded_values
from modules.generation_request import GenerationRequest
from modules.image_inputs import InpaintOptions


def load(tmp_path: Path, **keys: object) -> config_module.Config:
    import json
    path = tmp_path / "config.txt"
    path.write_text(json.dumps(keys))
    return config_module.load_config({"config_path": str(path)})


def parsed(fields: dict, cfg: config_module.Config) -> GenerationRequest:
    return GenerationRequest.from_dict({"prompt": "a boat", **fields}, cfg)


def test_an_untouched_panel_sends_nothing(tmp_path: Path) -> None:
    for cfg in (load(tmp_path), load(tmp_path, default_clip_skip=1, default_cfg_tsnr=5.0, default_overwrite_step=12,
                                    default_metadata_scheme="a1111", default_save_metadata_to_images=False)):
        defaults = DebugValues.defaults(cfg)
        assert defaults.request_fields(defaults, {"prompt": "a boat"}) == {}


def test_the_initial_values_are_what_the_server_takes_for_missing_fields(tmp_path: Path) -> None:
    cfg = load(tmp_path, default_clip_skip=1, default_cfg_tsnr=5.0, default_overwrite_step=12,
               default_overwrite_switch=9)
    request, defaults = parsed({}, cfg), DebugValues.defaults(cfg)
    assert (request.clip_skip, request.adaptive_cfg, request.steps, request.overwrite_switch) == (
        defaults.clip_skip, defaults.adaptive_cfg, defaults.steps, defaults.overwrite_switch) == (1, 5.0, 12, 9)


def test_changed_values_reach_the_request(tmp_path: Path) -> None:
    cfg = load(tmp_path)
    defaults = DebugValues.defaults(cfg)
    chosen = dataclasses.replace(defaults, refiner_swap_method="vae", adaptive_cfg=4.5, clip_skip=1, steps=12,
                                 overwrite_switch=7, overwrite_width=512, overwrite_height=640,
                                 disable_preview=True, disable_seed_increment=True, read_wildcards_in_order=True,
                                 metadata_scheme="a1111", save_metadata_to_images=False, freeu_enabled=True,
                                 freeu_s1=3.5, generate_image_grid=True)
    request = parsed(chosen.request_fields(defaults, {}), cfg)
    assert (request.refiner_swap_method, request.adaptive_cfg, request.clip_skip, request.steps) == ("vae", 4.5, 1, 12)
    assert (request.overwrite_switch, request.width, request.height) == (7, 512, 640)
    assert request.disable_preview and request.disable_seed_increment and request.read_wildcards_in_order
    assert (request.metadata_scheme, request.save_metadata_to_images) == ("a1111", False)
    assert request.freeu == (1.01, 1.02, 3.5, 0.95) and request.generate_image_grid


def test_a_value_set_back_to_the_built_in_default_still_wins_over_config(tmp_path: Path) -> None:
    """config.txt says 12 steps and CLIP skip 1; the page set to -1 (the mode's) and 2 sends both."""
    cfg = load(tmp_path, default_overwrite_step=12, default_clip_skip=1)
    defaults = DebugValues.defaults(cfg)
    fields = dataclasses.replace(defaults, steps=-1, clip_skip=2).request_fields(defaults, {})
    assert fields == {"steps": -1, "clip_skip": 2}
    request = parsed(fields, cfg)
    assert request.steps is None and request.clip_skip == 2


def test_freeu_factors_go_only_with_freeu_on(tmp_path: Path) -> None:
    defaults = DebugValues.defaults(load(tmp_path))
    assert dataclasses.replace(defaults, freeu_b1=1.3).request_fields(defaults, {}) == {}


@pytest.mark.parametrize("other", [{}, {"input_image": "x"}])
def test_input_image_overwrites_go_only_with_their_mode(tmp_path: Path, other: dict) -> None:
    """The vary/upscale strengths only with an Upscale or Variation, the inpaint options only
    with an inpaint or outpaint: a text-to-image request stays one."""
    defaults = DebugValues.defaults(load(tmp_path))
    chosen = dataclasses.replace(defaults, overwrite_vary_strength=0.4, inpaint_engine="v1",
                                 inpaint_erode_or_dilate=8, invert_mask_checkbox=True)
    assert chosen.request_fields(defaults, other) == {}
    assert chosen.request_fields(defaults, {"uov_method": "Vary (Subtle)"}) == {"overwrite_vary_strength": 0.4}
    inpaint = chosen.request_fields(defaults, {"inpaint_mask": "m"})
    assert inpaint == {"inpaint_engine": "v1", "inpaint_erode_or_dilate": 8, "invert_mask_checkbox": True}


def test_the_inpaint_options_parse_as_the_image_inputs_read_them(tmp_path: Path) -> None:
    import numpy as np
    from modules import image_inputs, input_image_page
    cfg = load(tmp_path)
    defaults = DebugValues.defaults(cfg)
    chosen = dataclasses.replace(defaults, inpaint_engine="v2.5", inpaint_erode_or_dilate=-4,
                                 inpaint_disable_initial_latent=True, debugging_inpaint_preprocessor=True)
    request = {"input_image": input_image_page.encode_png(np.zeros((16, 16, 3), np.uint8)),
               "outpaint_selections": ["Left"]}
    inputs = image_inputs.parse({**request, **chosen.request_fields(defaults, request)}, cfg)
    assert inputs.inpaint == InpaintOptions(erode_or_dilate=-4, invert_mask=False, engine="v2.5",
                                            disable_initial_latent=True, debug_preprocessor=True)


def test_loaded_fields_set_the_controls_and_steps_follow_upstreams_loader() -> None:
    assert loaded_values({"clip_skip": 1, "adaptive_cfg": 5.0, "steps": 17, "prompt": "x"}) == {
        "clip_skip": 1, "adaptive_cfg": 5.0, "steps": 17}
    assert loaded_values({"performance": "Speed"}) == {"steps": -1, "freeu_enabled": False}   # the mode's steps
    assert loaded_values({"prompt": "x"}) == {}


def test_a_forced_size_is_rounded_down_to_a_multiple_of_8(tmp_path: Path) -> None:
    """As upstream's latent (size // 8 pixels); the server refuses other sizes."""
    cfg = load(tmp_path)
    defaults = DebugValues.defaults(cfg)
    fields = dataclasses.replace(defaults, overwrite_width=517, overwrite_height=100).request_fields(defaults, {})
    assert fields == {"overwrite_width": 512, "overwrite_height": 96}
    assert (parsed(fields, cfg).width, parsed(fields, cfg).height) == (512, 96)


def test_default_inpaint_engine_version_is_the_servers_default_and_the_pages(tmp_path: Path) -> None:
    import numpy as np
    from modules import image_inputs, input_image_page
    cfg = load(tmp_path, default_inpaint_engine_version="v1")
    request = {"input_image": input_image_page.encode_png(np.zeros((16, 16, 3), np.uint8)),
               "outpaint_selections": ["Left"]}
    assert image_inputs.parse(request, cfg).inpaint.engine == "v1"
    assert DebugValues.defaults(cfg).inpaint_engine == DebugValues.initial(cfg).inpaint_engine == "v1"
