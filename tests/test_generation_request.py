"""generation_request.check_request: what an HTTP API refuses before queueing, each error
naming the field at fault (nothing is loaded: the model files only have to exist)."""

from __future__ import annotations

import pytest

from modules import config as config_module
from modules.generation_request import check_request
from modules.task_types import RequestError
from tests.helpers.input_image_files import INPUT, png64


@pytest.fixture
def cfg(tmp_path):
    for folder in ("checkpoints", "loras", "vae"):
        (tmp_path / folder).mkdir()
    (tmp_path / "checkpoints" / "base.safetensors").write_bytes(b"")
    (tmp_path / "loras" / "style.safetensors").write_bytes(b"")
    return config_module.load_config({"config_path": str(tmp_path / "none"), "path_outputs": str(tmp_path / "out"),
                                      **{f"path_{f}": str(tmp_path / f) for f in ("checkpoints", "loras", "vae")}})


GOOD = {"prompt": "a cat <lora:style:0.5>", "base_model": "base.safetensors", "loras": [["style.safetensors", 1]],
        "sampler": "euler", "scheduler": "karras"}


def test_a_good_request_passes_and_comes_back_parsed(cfg):
    req = check_request(dict(GOOD), cfg, samplers={"euler"}, schedulers={"karras"})
    assert (req.base_model, req.sampler, req.loras) == ("base.safetensors", "euler", [("style.safetensors", 1.0)])


@pytest.mark.parametrize("change, field", [
    ({"sampler": "lms"}, "sampler"),                        # a Fooocus name the sampling code lacks
    ({"scheduler": "beta"}, "scheduler"),
    ({"refiner_model": "nope.safetensors"}, "refiner_model"),
    ({"vae": "nope.safetensors"}, "vae"),
    ({"base_model": "nope.safetensors"}, "base_model"),
    ({"prompt": "a <lora:missing:1>"}, "loras"),
    ({"styles": ["No Such Style"]}, "styles"),
    ({"input_image": "garbage", "uov_method": "Vary (Strong)"}, "input_image"),
    ({"input_image": png64(INPUT), "uov_method": "Vary (Strong)", "overwrite_vary_strength": 1.5},
     "overwrite_vary_strength"),
])
def test_each_refusal_names_its_field(cfg, change, field):
    with pytest.raises((RequestError, ValueError), match=f"field '{field}"):
        check_request({**GOOD, **change}, cfg, samplers={"euler"}, schedulers={"karras"})


def test_a_mode_that_imposes_its_sampler_is_not_blamed_for_the_requests(cfg):
    check_request({**GOOD, "sampler": "lms", "performance": "Extreme Speed"}, cfg,
                  samplers={"euler", "lcm"}, schedulers={"karras", "lcm"})
