"""config.txt + environment overrides, and model file discovery."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import args_manager
from modules import config as cfg
from modules.config import ConfigError, LoraSetting, list_model_files, load_config, resolve_model_file
from modules.flags import Performance


def _env_with_config(tmp_path: Path, data: object, **env: str) -> dict[str, str]:
    path = tmp_path / "config.txt"
    path.write_text(json.dumps(data), encoding="utf-8")
    return {"config_path": str(path), **env}


def test_missing_config_file_gives_repo_relative_defaults(tmp_path: Path) -> None:
    c = load_config({"config_path": str(tmp_path / "absent.txt")})
    assert c.path_checkpoints == (cfg.REPO_ROOT / "models" / "checkpoints",)
    assert c.path_loras == (cfg.REPO_ROOT / "models" / "loras",)
    assert c.path_outputs == cfg.REPO_ROOT / "outputs"
    assert c.default_performance is Performance.SPEED
    assert c.default_size == (1152, 896)
    assert not (tmp_path / "absent.txt").exists()  # we never write config.txt


def test_default_config_path_is_repo_root() -> None:
    assert load_config({}).config_path == cfg.REPO_ROOT / "config.txt"


def test_config_file_values_and_path_lists(tmp_path: Path) -> None:
    env = _env_with_config(tmp_path, {
        "path_checkpoints": ["ckpts", str(tmp_path / "more")],
        "path_loras": "my/loras",
        "path_outputs": ["out1", "out2"],
        "default_model": "tiny.safetensors",
        "default_cfg_scale": 3,
        "default_performance": "Lightning",
        "default_image_number": 1,
        "default_aspect_ratio": "1024×1024 ∣ 1:1",
        "default_styles": ["Fooocus V2"],  # upstream key we don't use: ignored
    })
    c = load_config(env)
    assert c.path_checkpoints == (cfg.REPO_ROOT / "ckpts", tmp_path / "more")
    assert c.path_loras == (cfg.REPO_ROOT / "my" / "loras",)
    assert c.path_outputs == cfg.REPO_ROOT / "out1"
    assert c.default_model == "tiny.safetensors"
    assert c.default_cfg_scale == 3.0 and isinstance(c.default_cfg_scale, float)
    assert c.default_performance is Performance.LIGHTNING
    assert c.default_aspect_ratio == "1024*1024"


def test_env_overrides_config_file(tmp_path: Path) -> None:
    env = _env_with_config(
        tmp_path,
        {"default_model": "from_file.safetensors", "default_cfg_scale": 5.0, "path_loras": "a"},
        default_model="from_env.safetensors",          # not JSON: raw string
        default_cfg_scale="2.5",                       # JSON number
        path_loras=json.dumps(["x", "/abs/y"]),        # JSON list
        default_prompt="123",                          # text key: stays text
        default_loras='[["lcm.safetensors", 0.5], [false, "off.safetensors", 1], [true, "None", 1]]',
    )
    c = load_config(env)
    assert c.default_model == "from_env.safetensors"
    assert c.default_cfg_scale == 2.5
    assert c.path_loras == (cfg.REPO_ROOT / "x", Path("/abs/y"))
    assert c.default_prompt == "123"
    assert c.default_loras == (
        LoraSetting("lcm.safetensors", 0.5, True),
        LoraSetting("off.safetensors", 1.0, False),
    )


def test_env_plain_string_for_path_key(tmp_path: Path) -> None:
    c = load_config({"config_path": str(tmp_path / "none.txt"), "path_checkpoints": str(tmp_path)})
    assert c.path_checkpoints == (tmp_path,)


@pytest.mark.parametrize(
    ("key", "value"),
    [("default_cfg_scale", "high"), ("default_image_number", "0"), ("default_sampler", "warp_drive"),
     ("default_performance", "Turbo"), ("path_checkpoints", "[]"), ("default_loras", '[["a"]]'),
     ("default_aspect_ratio", "square"), ("default_metadata_scheme", "exif"),
     ("default_save_metadata_to_images", '"yes"'), ("default_overwrite_step", "0"),
     ("default_overwrite_switch", "201"), ("default_clip_skip", "13"), ("default_cfg_tsnr", "0.5"),
     ("default_black_out_nsfw", "true"), ("default_max_lora_number", "0"), ("default_max_image_number", "33"),
     ("default_selected_image_input_tab_id", "describe_tab"), ("default_inpaint_engine_version", "v3"),
     ("default_inpaint_method", "Repaint"),
     ("checkpoint_downloads", '{"../../etc/x.safetensors": "https://h/x"}'),
     ("lora_downloads", '{"a.safetensors": "file:///etc/passwd"}'), ("previous_default_models", '"old"')],
)
def test_bad_env_value_names_key_and_source(tmp_path: Path, key: str, value: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config({"config_path": str(tmp_path / "none.txt"), key: value})
    assert key in str(exc.value) and "environment variable" in str(exc.value)


def test_invalid_json_config_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "config.txt"
    path.write_text("{not json", encoding="utf-8")
    with pytest.raises(ConfigError, match="config.txt"):
        load_config({"config_path": str(path)})


def test_bad_value_in_file_names_the_file(tmp_path: Path) -> None:
    env = _env_with_config(tmp_path, {"default_image_number": "two"})
    with pytest.raises(ConfigError) as exc:
        load_config(env)
    assert "default_image_number" in str(exc.value) and str(tmp_path) in str(exc.value)


def test_output_path_override_beats_env(tmp_path: Path) -> None:
    c = load_config({"config_path": str(tmp_path / "x"), "path_outputs": "from_env"},
                    output_path=str(tmp_path / "cli"))
    assert c.path_outputs == tmp_path / "cli"


def test_unknown_preset_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no-such-preset"):
        load_config({"config_path": str(tmp_path / "x")}, preset="no-such-preset")


def test_get_config_caches_and_reload_rereads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("config_path", str(tmp_path / "none.txt"))
    monkeypatch.setenv("default_model", "first.safetensors")
    monkeypatch.setattr(args_manager, "args", args_manager.parse_args(["--output-path", str(tmp_path)]))
    try:
        first = cfg.reload_config()
        assert first.default_model == "first.safetensors"
        assert first.path_outputs == tmp_path  # --output-path reaches the cached config
        monkeypatch.setenv("default_model", "second.safetensors")
        assert cfg.get_config() is first
        assert cfg.reload_config().default_model == "second.safetensors"
    finally:
        monkeypatch.undo()
        cfg.reload_config()  # leave the process-wide cache as other tests expect


def test_ensure_folders_creates_them(tmp_path: Path) -> None:
    c = load_config({"config_path": str(tmp_path / "x"), "path_checkpoints": str(tmp_path / "c"),
                     "path_loras": str(tmp_path / "l"), "path_embeddings": str(tmp_path / "e"),
                     "path_vae": str(tmp_path / "v"), "path_outputs": str(tmp_path / "o")})
    c.ensure_folders()
    assert all((tmp_path / d).is_dir() for d in "clevo")


def test_config_is_frozen(tmp_path: Path) -> None:
    c = load_config({"config_path": str(tmp_path / "x")})
    with pytest.raises(AttributeError):
        c.default_model = "x"  # type: ignore[misc]


# --- model files -----------------------------------------------------------------

@pytest.fixture
def model_tree(tmp_path: Path) -> tuple[Path, Path]:
    a, b = tmp_path / "a", tmp_path / "b"
    for rel in ["base.safetensors", "sub/deeper/lora.ckpt", "notes.txt", "Zeta.PT",
                ".hidden.safetensors", ".cache/x.safetensors"]:
        (a / rel).parent.mkdir(parents=True, exist_ok=True)
        (a / rel).write_bytes(b"a")
    for rel in ["base.safetensors", "extra.bin", "weights.pth"]:
        (b / rel).parent.mkdir(parents=True, exist_ok=True)
        (b / rel).write_bytes(b"b")
    return a, b


def test_list_model_files_recursive_filtered_sorted(model_tree: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = model_tree
    names = list_model_files([a, b, tmp_path / "missing"])
    assert names == ["base.safetensors", "extra.bin", "sub/deeper/lora.ckpt", "weights.pth", "Zeta.PT"]
    assert list_model_files(str(a), extensions=(".ckpt",)) == ["sub/deeper/lora.ckpt"]


def test_resolve_model_file_first_folder_wins(model_tree: tuple[Path, Path]) -> None:
    a, b = model_tree
    assert resolve_model_file("base.safetensors", [a, b]) == str(a / "base.safetensors")
    assert resolve_model_file("base.safetensors", [b, a]) == str(b / "base.safetensors")
    assert resolve_model_file("sub/deeper/lora.ckpt", [b, a]) == str(a / "sub" / "deeper" / "lora.ckpt")
    assert resolve_model_file(str(b / "extra.bin"), [a, b]) == str(b / "extra.bin")


def test_resolve_missing_file_names_file_and_folders(model_tree: tuple[Path, Path]) -> None:
    a, b = model_tree
    with pytest.raises(FileNotFoundError) as exc:
        resolve_model_file("nope.safetensors", [a, b])
    msg = str(exc.value)
    assert "nope.safetensors" in msg and str(a) in msg and str(b) in msg


@pytest.mark.parametrize("name", ["../b/extra.bin", "/etc/hostname"])
def test_resolve_refuses_names_outside_the_folders(model_tree: tuple[Path, Path], name: str) -> None:
    a, _ = model_tree
    with pytest.raises(FileNotFoundError):
        resolve_model_file(name, [a])


def test_resolve_allows_symlinked_model_files(tmp_path: Path) -> None:
    store, folder = tmp_path / "store", tmp_path / "models"
    store.mkdir(), folder.mkdir()
    (store / "real.safetensors").write_bytes(b"x")
    (folder / "link.safetensors").symlink_to(store / "real.safetensors")
    assert resolve_model_file("link.safetensors", [folder]) == str(folder / "link.safetensors")
    assert list_model_files([folder]) == ["link.safetensors"]


def test_the_lora_weight_range_must_be_a_range(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="default_loras_min_weight.*default_loras_max_weight"):
        load_config({"config_path": str(tmp_path / "none.txt"), "default_loras_min_weight": "1",
                     "default_loras_max_weight": "1"})
