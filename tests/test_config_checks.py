"""Config values are checked at start, naming the key and the file: NaN and 1e999,
out-of-range defaults, a non-UTF-8 file, config_path naming a folder, the limit keys."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from modules.config import ConfigError, load_config

REPO_ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "config.txt"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


@pytest.mark.parametrize("key, raw", [
    ("default_cfg_scale", "NaN"), ("default_cfg_scale", "Infinity"), ("default_cfg_scale", "1e999"),
    ("default_refiner_switch", "-Infinity"), ("max_lora_weight", "1e999"), ("max_prompt_tokens", "1e999"),
])
def test_non_finite_numbers_in_the_file_name_key_or_file(tmp_path, key, raw):
    path = write(tmp_path, f'{{"{key}": {raw}}}')
    with pytest.raises(ConfigError) as caught:
        load_config({"config_path": str(path)})
    message = str(caught.value)
    assert str(path) in message and (key in message or raw in message)


@pytest.mark.parametrize("key, value", [("default_cfg_scale", 31), ("default_refiner_switch", 1.5),
                                        ("max_queue_length", 0), ("max_loras_per_request", -1),
                                        ("max_conditioning_cache_mb", 0), ("default_output_format", "gif")])
def test_out_of_range_values_fail_at_start_naming_the_key(tmp_path, key, value):
    path = write(tmp_path, json.dumps({key: value}))
    with pytest.raises(ConfigError, match=key):
        load_config({"config_path": str(path)})


def test_default_lora_weights_beyond_the_limit_fail_at_start(tmp_path):
    path = write(tmp_path, json.dumps({"default_loras": [["style.safetensors", 25.0]], "max_lora_weight": 10}))
    with pytest.raises(ConfigError) as caught:
        load_config({"config_path": str(path)})
    message = str(caught.value)
    assert "default_loras" in message and "style.safetensors" in message and str(path) in message
    within = write(tmp_path, json.dumps({"default_loras": [["style.safetensors", -10.0]], "max_lora_weight": 10}))
    assert load_config({"config_path": str(within)}).default_loras[0].weight == -10.0


def test_env_nan_names_the_variable(tmp_path):
    with pytest.raises(ConfigError, match="environment variable default_cfg_scale"):
        load_config({"config_path": str(tmp_path / "none"), "default_cfg_scale": "NaN"})


def test_limit_keys_have_defaults_and_can_be_set(tmp_path):
    defaults = load_config({"config_path": str(tmp_path / "none")})
    assert (defaults.max_prompt_tokens, defaults.max_loras_per_request, defaults.max_queue_length) == (3000, 32, 100)
    assert defaults.max_lora_weight == 10.0 and defaults.default_output_format == "png"
    path = write(tmp_path, json.dumps({"max_prompt_tokens": 150, "default_output_format": "webp"}))
    changed = load_config({"config_path": str(path)})
    assert changed.max_prompt_tokens == 150 and changed.default_output_format == "webp"


def test_a_non_utf8_config_names_the_file(tmp_path):
    path = write(tmp_path, b'{"default_prompt": "caf\xe9"}')
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config({"config_path": str(path)})


def test_config_path_naming_a_folder_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="not a file"):
        load_config({"config_path": str(tmp_path)})


def test_launch_refuses_a_bad_config_without_a_traceback(tmp_path):
    path = write(tmp_path, b'{"default_cfg_scale": NaN}')
    env = {k: v for k, v in os.environ.items() if not k.startswith(("path_", "default_"))}
    env.update(config_path=str(path), HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, str(REPO_ROOT / "launch.py"), "--disable-preset-download",
                           "--disable-in-browser"], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 2 and str(path) in output and "Traceback" not in output, output
