"""Image files: formats with readable metadata, whole-or-nothing commits, the writer
thread, the temp-folder fallback and a clear error for an unusable output folder."""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm_patched.modules import model_management as mm
from modules import config as config_module
from modules import image_output, parameters, webui
from tests.helpers import pipelines

REPO_ROOT = Path(__file__).resolve().parent.parent
SMALL = {"base_model": "tiny_sdxl_base.safetensors", "prompt": "a cät ☕", "width": 64, "height": 64, "steps": 1,
         "seed": 5, "sampler": "euler", "scheduler": "normal"}


def use_config(monkeypatch, **changes) -> config_module.Config:
    cfg = dataclasses.replace(config_module.get_config(), **changes)
    monkeypatch.setattr(config_module, "_cached", cfg)
    return cfg


@pytest.mark.parametrize("fmt, pil_format, extension", [("png", "PNG", ".png"), ("jpeg", "JPEG", ".jpg"),
                                                        ("webp", "WEBP", ".webp")])
def test_every_output_format_with_its_parameters_readable_back(pipeline, fmt, pil_format, extension):
    pipeline(mm.Policy.RESIDENT)
    result = pipelines.process_request({**SMALL, "output_format": fmt, "image_number": 2})
    assert "error" not in result.report, result.report
    assert result.report["output_format"] == fmt and len(result.images) == 2
    for path, seed in zip(result.images, (5, 6)):
        assert path.endswith(extension)
        with Image.open(path) as image:
            assert image.format == pil_format and image.size == (64, 64)
        fields = parameters.read_parameters(path)
        assert fields["seed"] == seed and fields["prompt"] == SMALL["prompt"]


def test_png_pixels_are_exact_and_the_default_format_comes_from_the_config(pipeline, monkeypatch):
    pipeline(mm.Policy.RESIDENT)
    png = pipelines.process_request(dict(SMALL)).images[0]
    use_config(monkeypatch, default_output_format="webp")
    webp = pipelines.process_request(dict(SMALL)).images[0]
    assert png.endswith(".png") and webp.endswith(".webp")
    rgb = np.asarray(Image.open(png).convert("RGB"))
    pixels = np.asarray(Image.open(webp).convert("RGB")).astype(int)
    assert np.abs(pixels - rgb).mean() < 20   # lossy, but the same picture


def test_png_encoder_output_decodes_to_the_pixels_with_metadata():
    pixels = np.random.default_rng(0).integers(0, 256, (48, 40, 3), dtype=np.uint8)
    # Text beyond Latin-1 (an a1111-scheme prompt) goes into an iTXt chunk.
    data = image_output.encode(pixels, "png", image_output.Metadata("ü ☕, a cat\nSteps: 2", "a1111"))
    from io import BytesIO
    with Image.open(BytesIO(data)) as image:
        image.load()
        assert np.array_equal(np.asarray(image.convert("RGB")), pixels)
        assert image.text["parameters"] == "ü ☕, a cat\nSteps: 2" and image.text["fooocus_scheme"] == "a1111"
    with Image.open(BytesIO(image_output.encode(pixels, "png", None))) as image:
        image.load()
        assert "parameters" not in image.text


def test_the_save_runs_on_the_writer_and_the_request_waits_only_for_the_commits(pipeline, monkeypatch):
    pipeline(mm.Policy.RESIDENT)
    events: list[tuple[str, str]] = []
    real_encode, real_commit = image_output.encode, image_output.commit

    def encode(*args, **kwargs):
        events.append(("encode", threading.current_thread().name))
        return real_encode(*args, **kwargs)

    def commit(*args, **kwargs):
        path = real_commit(*args, **kwargs)
        events.append(("commit", threading.current_thread().name))
        return path

    monkeypatch.setattr(image_output, "encode", encode)
    monkeypatch.setattr(image_output, "commit", commit)
    request_thread = threading.current_thread().name
    result = pipelines.process_request({**SMALL, "image_number": 3})
    events.append(("returned", request_thread))
    assert [e for e, _ in events] == ["encode", "commit"] * 3 + ["returned"]
    assert all(name.startswith("image-writer") for _, name in events[:-1])   # never the request's thread
    assert all(os.path.isfile(p) for p in result.images)


def test_a_file_is_committed_whole_or_not_at_all(tmp_path, monkeypatch):
    folder = tmp_path / "day"

    def broken_fsync(_fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError):
        image_output.commit(b"x" * 1000, folder, "img", ".png")
    assert list(folder.iterdir()) == []   # neither a partial file nor a final name
    monkeypatch.undo()
    first = image_output.commit(b"a", folder, "img", ".png")
    second = image_output.commit(b"b", folder, "img", ".png")   # same second, same seed: never overwritten
    assert Path(first).read_bytes() == b"a" and Path(second).read_bytes() == b"b"
    assert sorted(p.name for p in folder.iterdir()) == ["img.png", "img_1.png"]


def test_an_unwritable_output_folder_still_returns_the_images_with_a_warning(pipeline, monkeypatch, tmp_path):
    folders = pipeline(mm.Policy.RESIDENT)
    day = datetime.datetime.now().strftime("%Y-%m-%d")
    (folders["outputs"] / day).write_text("a file where the day's folder should be")
    use_config(monkeypatch, temp_path=tmp_path / "elsewhere")
    result = pipelines.process_request({**SMALL, "image_number": 2})
    assert "error" not in result.report, result.report
    assert len(result.images) == 2 and "output folder" in result.report["warnings"][0]
    for path in result.images:
        assert Path(path).is_relative_to(tmp_path / "elsewhere") and Path(path).is_file()


def test_disable_image_log_writes_to_the_temp_path_which_the_server_may_serve(pipeline, monkeypatch, tmp_path):
    folders = pipeline(mm.Policy.RESIDENT)
    cfg = use_config(monkeypatch, image_log=False, temp_path=tmp_path / "anywhere" / "x")
    result = pipelines.process_request(dict(SMALL))
    assert Path(result.images[0]).is_relative_to(tmp_path / "anywhere" / "x")
    assert not list(folders["outputs"].rglob("*.png")) and "warnings" not in result.report
    assert str(tmp_path / "anywhere" / "x") in webui.allowed_paths(cfg)


def test_path_outputs_naming_a_file_is_a_clear_start_error(tmp_path):
    not_a_folder = tmp_path / "outputs.txt"
    not_a_folder.write_text("x")
    config_file = tmp_path / "config.txt"
    config_file.write_text(json.dumps({"path_outputs": str(not_a_folder),
                                       "path_checkpoints": str(tmp_path / "ck")}))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("path_", "default_"))}
    env.update(config_path=str(config_file), HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, str(REPO_ROOT / "launch.py"), "--disable-preset-download",
                           "--disable-in-browser"], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert "path_outputs" in output and "is a file" in output and str(config_file) in output
    assert "Traceback" not in output


def test_a_symlink_planted_at_a_temporary_name_is_never_written_through(tmp_path, monkeypatch):
    """The temporary file gets an unpredictable name, created exclusively: a symlink planted
    where the old writer put it (`.<stem>.<pid>.partial`) leaves its target alone."""
    folder, victim = tmp_path / "day", tmp_path / "victim.txt"
    folder.mkdir()
    victim.write_bytes(b"precious")
    (folder / f".img.{os.getpid()}.partial").symlink_to(victim)
    linked = []
    real_link = os.link
    monkeypatch.setattr(os, "link", lambda src, dst: (linked.append(Path(src).name), real_link(src, dst))[1])
    path = image_output.commit(b"image bytes", folder, "img", ".png")
    image_output.commit(b"image bytes", folder, "img", ".png")
    assert victim.read_bytes() == b"precious"
    assert Path(path).read_bytes() == b"image bytes" and not Path(path).is_symlink()
    assert len(set(linked)) == 2 and f".img.{os.getpid()}.partial" not in linked   # a new random name each time
    assert sorted(p.name for p in folder.iterdir() if not p.is_symlink()) == ["img.png", "img_1.png"]
