"""Image fields (modules/image_inputs.py): where a named file may come from, and what is
refused before it is decoded (issue 18). Torch-free: no pipeline is involved."""

from __future__ import annotations

import base64
import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from modules import config, image_inputs
from modules.task_types import RequestError


def png_bytes(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    return buffer.getvalue()


PIXELS = np.random.default_rng(0).integers(0, 256, (16, 24, 3), dtype=np.uint8)


@pytest.fixture
def owned(tmp_path, monkeypatch):
    """A config whose inputs, outputs and temp folders (and Gradio's upload folder) are under
    tmp_path/server; returns (cfg, folders, a file outside them all)."""
    server = tmp_path / "server"
    folders = {name: server / name for name in ("inputs", "outputs", "temp", "gradio")}
    for folder in folders.values():
        folder.mkdir(parents=True)
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(folders["gradio"]))
    cfg = config.load_config({"config_path": str(tmp_path / "none.txt"), "path_inputs": str(folders["inputs"]),
                              "path_outputs": str(folders["outputs"])},
                             cli={"temp_path": folders["temp"]})
    secret = tmp_path / "elsewhere" / "secret.png"
    secret.parent.mkdir()
    secret.write_bytes(png_bytes(PIXELS))
    return cfg, folders, secret


def vary(image: object) -> dict:
    return {"input_image": image, "uov_method": "Vary (Subtle)"}


def refusal(cfg: config.Config, request: dict) -> str:
    with pytest.raises(RequestError) as caught:
        image_inputs.parse(request, cfg)
    return str(caught.value)


def test_a_path_outside_the_owned_folders_reads_nothing_and_says_what_a_missing_file_says(owned):
    cfg, folders, secret = owned
    (folders["outputs"] / "link.png").symlink_to(secret)          # a symlink is resolved first
    (folders["inputs"] / "up").symlink_to(secret.parent, target_is_directory=True)
    names = {
        "outside": str(secret),
        "outside, as Gradio's file object": {"path": str(secret)},
        "missing": str(folders["outputs"] / "no_such.png"),
        "missing outside": str(secret.parent / "no_such.png"),
        "a folder": str(folders["outputs"]),
        "dot-dot out of the inputs folder": "../../elsewhere/secret.png",
        "symlink in the outputs to outside": str(folders["outputs"] / "link.png"),
        "through a symlinked folder": "up/secret.png",
    }
    messages = {what: refusal(cfg, vary(name)) for what, name in names.items()}
    assert len(set(messages.values())) == 1, messages   # nothing tells a file that exists from one that does not
    message = messages["outside"]
    assert "field 'input_image'" in message and "path_inputs" in message
    assert str(secret.parent) not in message and "secret" not in message


@pytest.mark.parametrize("field", ["input_image", "inpaint_mask", "image_prompts"])
def test_every_image_field_keeps_to_the_owned_folders(owned, field):
    cfg, _, secret = owned
    good = base64.b64encode(png_bytes(PIXELS)).decode()
    request = {"input_image": good, "inpaint_mask": good, "outpaint_selections": []}
    if field == "image_prompts":
        request = {"image_prompts": [[str(secret), 0.5, 0.6, "ImagePrompt"]]}
    else:
        request[field] = str(secret)
    assert f"field '{field if field != 'image_prompts' else 'image_prompts[0]'}'" in refusal(cfg, request)


def test_files_in_the_owned_folders_are_read(owned):
    cfg, folders, _ = owned
    for name, folder in folders.items():
        (folder / f"{name}.png").write_bytes(png_bytes(PIXELS))
    for value in ["inputs.png",                                   # relative: in path_inputs
                  str(folders["inputs"] / "inputs.png"), str(folders["outputs"] / "outputs.png"),
                  str(folders["temp"] / "temp.png"), {"path": str(folders["gradio"] / "gradio.png")}]:
        assert np.array_equal(image_inputs.parse(vary(value), cfg).image, PIXELS), value


def test_base64_that_starts_like_a_path_is_still_data(owned):
    """JPEG's base64 starts with "/9j/": it is data, not a path to look up."""
    cfg, _, _ = owned
    jpeg = base64.b64encode(png_bytes(PIXELS, "JPEG")).decode()
    assert jpeg.startswith("/9j/")
    assert image_inputs.parse(vary(jpeg), cfg).image.shape == PIXELS.shape


def bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height over an IDAT of one row: a few bytes
    that would decode to width x height x 3 bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * (width * 3 + 1)))
            + chunk(b"IEND", b""))


@pytest.mark.parametrize("width, height, expected", [
    (100_000, 100_000, "refused before decoding"),     # beyond Pillow's MAX_IMAGE_PIXELS
    (5000, 16, "at most 4096 pixels per side"),
])
def test_an_image_too_large_is_refused_from_its_header(owned, monkeypatch, width, height, expected):
    cfg, _, _ = owned
    decoded = []
    monkeypatch.setattr(Image.Image, "load", lambda self: decoded.append(self.size))
    message = refusal(cfg, vary(base64.b64encode(bomb_png(width, height)).decode()))
    assert "field 'input_image'" in message and expected in message
    assert decoded == []   # no pixel was decoded


def test_only_png_jpeg_and_webp_are_opened(owned):
    """PIL opens dozens of formats (EPS through Ghostscript); clients send these three."""
    cfg, _, _ = owned
    tiff = base64.b64encode(png_bytes(PIXELS, "TIFF")).decode()
    message = refusal(cfg, vary(tiff))
    assert "field 'input_image'" in message and "PNG, JPEG or WebP" in message
    webp = base64.b64encode(png_bytes(PIXELS, "WEBP")).decode()
    assert image_inputs.parse(vary(webp), cfg).image.shape == PIXELS.shape


def test_a_number_too_big_for_a_float_names_its_field(owned):
    cfg, _, _ = owned
    good = base64.b64encode(png_bytes(PIXELS)).decode()
    message = refusal(cfg, {"input_image": good, "inpaint_mask": good, "inpaint_strength": 10 ** 400})
    assert "field 'inpaint_strength'" in message and len(message) < 200
    message = refusal(cfg, {"image_prompts": [[good, 10 ** 400]]})
    assert "image_prompts" in message and "stop" in message and len(message) < 200


def test_the_file_is_opened_without_following_a_symlink_swapped_in(owned, monkeypatch):
    """Between the check and the read the name could become a symlink: the read refuses it."""
    cfg, folders, secret = owned
    name = folders["inputs"] / "swapped.png"
    name.write_bytes(png_bytes(PIXELS))
    checked = image_inputs._owned_file

    def swap_after_check(text, where):
        path = checked(text, where)
        os.replace(name, folders["inputs"] / "original.png")
        name.symlink_to(secret)
        return path
    monkeypatch.setattr(image_inputs, "_owned_file", swap_after_check)
    assert "field 'input_image'" in refusal(cfg, vary(str(name)))
