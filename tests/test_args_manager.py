"""The CLI: upstream flag meanings, our resident flags, and parse-once semantics."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import args_manager
from args_manager import build_parser, parse_args

REPO_ROOT = Path(__file__).resolve().parent.parent


def _exit_code(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    return exc.value.code, capsys.readouterr().err


def test_defaults_match_upstream_meanings() -> None:
    a = parse_args([])
    assert (a.listen, a.port) == ("127.0.0.1", 7865)
    assert a.always_offload_from_vram is True  # Fooocus offloads unless told not to
    assert a.in_browser is True
    assert a.model_policy == "conservative"
    assert a.vram_budget is None and a.vram_budget_bytes is None
    assert a.always_cpu is None


def test_none_argv_does_not_read_sys_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["launch.py", "--port", "9999", "--bogus"])
    assert parse_args(None).port == 7865


@pytest.mark.parametrize(
    ("argv", "expected"),
    [(["--listen"], "0.0.0.0"), (["--listen", "192.168.1.5"], "192.168.1.5"), ([], "127.0.0.1")],
)
def test_listen_optional_value(argv: list[str], expected: str) -> None:
    assert parse_args(argv).listen == expected


def test_listen_without_value_followed_by_other_flag() -> None:
    a = parse_args(["--listen", "--port", "8000"])
    assert (a.listen, a.port) == ("0.0.0.0", 8000)


@pytest.mark.parametrize("port", ["0", "65536", "http"])
def test_bad_port_is_rejected(port: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _exit_code(["--port", port], capsys)
    assert code == 2 and "--port" in err


@pytest.mark.parametrize(
    "pair",
    [
        ["--always-gpu", "--always-low-vram"],
        ["--always-high-vram", "--always-no-vram"],
        ["--always-normal-vram", "--always-cpu"],
        ["--always-cpu", "4", "--always-gpu"],
        ["--all-in-fp16", "--all-in-fp32"],
        ["--unet-in-fp16", "--unet-in-fp8-e4m3fn"],
        ["--vae-in-fp16", "--vae-in-bf16"],
        ["--clip-in-fp16", "--clip-in-fp32"],
        ["--attention-split", "--attention-pytorch"],
        ["--in-browser", "--disable-in-browser"],
    ],
)
def test_mutually_exclusive_flags_exit_2(pair: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _exit_code(pair, capsys)
    assert code == 2
    assert "not allowed with argument" in err


def test_flags_from_different_groups_combine() -> None:
    a = parse_args(["--always-high-vram", "--unet-in-fp16", "--vae-in-fp32", "--clip-in-fp16",
                    "--attention-pytorch", "--vae-in-cpu", "--gpu-device-id", "1"])
    assert a.always_high_vram and a.unet_in_fp16 and a.vae_in_fp32 and a.clip_in_fp16
    assert a.attention_pytorch and a.vae_in_cpu and a.gpu_device_id == 1
    assert not (a.always_gpu or a.always_low_vram or a.unet_in_bf16)


def test_always_cpu_optional_thread_count(capsys: pytest.CaptureFixture[str]) -> None:
    assert parse_args(["--always-cpu"]).always_cpu == args_manager.ALWAYS_CPU_DEFAULT_THREADS
    assert parse_args(["--always-cpu"]).always_cpu  # truthy: "CPU mode on"
    assert parse_args(["--always-cpu", "6"]).always_cpu == 6
    code, _ = _exit_code(["--always-cpu", "0"], capsys)
    assert code == 2


def test_disable_offload_derives_always_offload() -> None:
    assert parse_args(["--disable-offload-from-vram"]).always_offload_from_vram is False


def test_disable_in_browser() -> None:
    assert parse_args(["--disable-in-browser"]).in_browser is False


def test_vram_budget_parses_to_bytes_with_resident_policy() -> None:
    a = parse_args(["--keep-models-resident", "--vram-budget", "70.5"])
    assert a.model_policy == "resident"
    assert a.vram_budget == 70.5
    assert a.vram_budget_bytes == int(70.5 * 1024 ** 3)


@pytest.mark.parametrize("value", ["0", "-4", "nan", "inf", "lots"])
def test_vram_budget_rejects_non_positive_or_non_finite(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _exit_code(["--keep-models-resident", "--vram-budget", value], capsys)
    assert code == 2
    assert "--vram-budget" in err


def test_vram_budget_also_bounds_the_conservative_policy() -> None:
    # Both policies account free memory against the budget (DESIGN.md §3).
    a = parse_args(["--vram-budget", "20"])
    assert a.model_policy == "conservative" and a.vram_budget_bytes == 20 * 1024 ** 3


def test_unknown_flag_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _exit_code(["--not-a-fooocus-flag"], capsys)
    assert code == 2 and "--not-a-fooocus-flag" in err


def test_paths_and_switches() -> None:
    a = parse_args(["--preset", "lightning", "--output-path", "/tmp/out", "--temp-path", "/tmp/t",
                    "--disable-image-log", "--disable-metadata", "--disable-preset-download",
                    "--always-download-new-model", "--disable-xformers"])
    assert (a.preset, a.output_path, a.temp_path) == ("lightning", "/tmp/out", "/tmp/t")
    assert a.disable_image_log and a.disable_metadata and a.disable_preset_download
    assert a.always_download_new_model and a.disable_xformers


def test_init_updates_shared_namespace_in_place() -> None:
    held = args_manager.args  # what `from args_manager import args` would have captured
    snapshot = dict(vars(held))
    try:
        returned = args_manager.init(["--port", "9001", "--keep-models-resident"])
        assert returned is held
        assert held.port == 9001 and held.model_policy == "resident"
    finally:
        vars(held).clear()
        vars(held).update(snapshot)


def test_every_flag_has_help_and_ours_are_marked() -> None:
    actions = [a for a in build_parser()._actions if a.option_strings and a.dest != "help"]
    assert all(a.help for a in actions)
    ours = {a.option_strings[0] for a in actions if a.help.startswith("[ours]")}
    assert ours == {"--keep-models-resident", "--vram-budget", "--check-memory-accounting", "--compile-unet",
                    "--compile-backend", "--compile-mode", "--webhook-allow", "--max-batch",
                    "--batch-window-ms"}


def test_batch_flags_reach_the_config_and_bad_values_are_refused() -> None:
    from modules import config

    args = parse_args(["--max-batch", "3", "--batch-window-ms", "20"])
    assert (config._cli_settings(args)["max_batch"], config._cli_settings(args)["batch_window_ms"]) == (3, 20.0)
    assert config._cli_settings(parse_args([]))["max_batch"] is None
    for bad in (["--max-batch", "0"], ["--batch-window-ms", "-1"], ["--batch-window-ms", "nan"]):
        with pytest.raises(SystemExit):
            parse_args(bad)


def test_importing_ignores_the_real_command_line() -> None:
    # A fresh interpreter whose argv would be invalid for our parser.
    code = "import args_manager; print(args_manager.args.port)"
    out = subprocess.run([sys.executable, "-c", code, "--port", "1", "--junk"], cwd=REPO_ROOT,
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "7865"


# -- upstream flags that the page/server honour --------------------------------------------

def test_upstream_server_flags_are_accepted() -> None:
    a = parse_args(["--share", "--theme", "dark", "--language", "en", "--multi-user",
                    "--auth", "ann:pa:ss", "--max-upload-size", "10"])
    assert a.share and a.multi_user and a.theme == "dark" and a.language == "en"
    assert a.auth == ("ann", "pa:ss") and a.max_upload_size == 10
    d = parse_args([])
    assert (d.share, d.theme, d.language, d.auth) == (False, None, "default", None)
    assert d.max_upload_size == args_manager.DEFAULT_MAX_UPLOAD_MB


def test_api_flags_take_fooocus_apis_spellings_too() -> None:
    a = parse_args(["--apikey", "k1", "--api-key", "k2", "--queue-size", "5", "--webhook-url", "http://h:1/x",
                    "--webhook-allow", "https://hooks.local/a", "--webhook-allow", "http://10.0.0.2:8000/"])
    assert a.api_key == ["k1", "k2"] and a.queue_size == 5 and a.webhook_url == "http://h:1/x"
    assert a.webhook_allow == ["https://hooks.local/a", "http://10.0.0.2:8000/"]
    d = parse_args([])
    assert (d.api_key, d.queue_size, d.webhook_url, d.webhook_allow) == (None, None, None, None)


@pytest.mark.parametrize("argv", [["--auth", "nopassword"], ["--auth", ":pw"], ["--theme", "purple"],
                                  ["--max-upload-size", "0"], ["--queue-size", "0"], ["--webhook-url", "ftp://x/y"],
                                  ["--webhook-allow", "hooks.local/a"]])
def test_bad_server_flags_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _exit_code(argv, capsys)
    assert code == 2 and argv[0] in err


def test_share_and_language_warn_and_start_anyway() -> None:
    import launch

    warnings = launch.startup_warnings(parse_args(["--share", "--language", "fr"]))
    assert any("--share" in w and "local" in w for w in warnings)
    assert any("fr" in w and "English only" in w for w in warnings)
    assert launch.startup_warnings(parse_args([])) == []


def test_listen_everywhere_without_auth_warns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import launch

    monkeypatch.setattr(launch, "ROOT", tmp_path)   # no auth.json there
    _, warning = launch.auth_or_warning(parse_args(["--listen"]), "0.0.0.0")
    assert warning and "WITHOUT a login" in warning
    assert launch.auth_or_warning(parse_args(["--listen", "127.0.0.1"]), "127.0.0.1") == ([], None)
    pairs, warning = launch.auth_or_warning(parse_args(["--listen", "--auth", "a:b"]), "0.0.0.0")
    assert pairs == [("a", "b")] and warning is None
    (tmp_path / "auth.json").write_text('[{"user": "ann", "pass": "pw"}]')
    assert launch.auth_or_warning(parse_args(["--listen"]), "0.0.0.0") == ([("ann", "pw")], None)


def test_unknown_preset_is_a_clear_start_error_listing_the_presets(tmp_path: Path) -> None:
    assert args_manager.preset_error("realistic", tmp_path) == (
        "--preset realistic: no such preset (no file presets/realistic.json); presets available: none")
    (tmp_path / "anime.json").write_text("{}")
    (tmp_path / "lightning.json").write_text("{}")
    assert args_manager.preset_error("lightning", tmp_path) is None
    assert args_manager.preset_error(None, tmp_path) is None
    assert args_manager.preset_error("realistic", tmp_path).endswith("presets available: anime, lightning")
    missing = "no_such_preset_xyz"
    result = subprocess.run([sys.executable, str(REPO_ROOT / "launch.py"), "--preset", missing],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 2
    assert f"--preset {missing}: no such preset" in result.stderr and "presets available:" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
