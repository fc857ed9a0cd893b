"""History log: outputs/<date>/log.html gains one entry per image, append-only, valid HTML."""

import json
import os

import html5lib
import pytest
from PIL import Image

import args_manager
from ldm_patched.modules import model_management as mm
from modules import config, history_log
from tests.helpers import pipelines

SMALL = {"base_model": "tiny_sdxl_base.safetensors", "prompt": "a <b>cat</b> & \"dog\" </pre>", "width": 64,
         "height": 64, "steps": 1, "seed": 3, "negative_prompt": "</table><script>x()</script>"}


def assert_valid_html(path):
    """html5lib's strict mode raises on any WHATWG parse error."""
    with open(path, "rb") as f:
        html5lib.HTMLParser(strict=True).parse(f)


def test_each_image_appends_one_entry_and_the_log_stays_valid(pipeline):
    folders = pipeline(mm.Policy.CONSERVATIVE)
    first = pipelines.process_request({**SMALL, "image_number": 2})
    assert "error" not in first.report, first.report
    log = os.path.join(os.path.dirname(first.images[0]), "log.html")
    assert os.path.dirname(log) == os.path.dirname(str(history_log.log_path(str(folders["outputs"]))))
    assert_valid_html(log)
    before = open(log, "rb").read()
    second = pipelines.process_request({**SMALL, "seed": 9})
    after = open(log, "rb").read()
    assert after.startswith(before) and len(after) > len(before)      # appended, never rewritten
    assert_valid_html(log)
    entries = history_log.read_entries(log)
    images = first.images + second.images
    assert len(entries) == 3
    for entry, image in zip(entries, images):
        assert entry == json.loads(Image.open(image).text["parameters"])
    text = after.decode()
    assert all(text.count(f'src="{os.path.basename(p)}"') == 1 for p in images)
    assert "<script>x()" not in text and "&lt;b&gt;cat" in text


def test_no_log_with_disable_image_log(pipeline, monkeypatch):
    folders = pipeline(mm.Policy.CONSERVATIVE)
    monkeypatch.setattr(args_manager.args, "disable_image_log", True, raising=False)
    config.reload_config()   # the pipeline is handed the flag through the Config
    result = pipelines.process_request(dict(SMALL))
    assert "error" not in result.report
    assert not os.path.exists(os.path.join(os.path.dirname(result.images[0]), "log.html"))
    assert not any(name == "log.html" for _, _, files in os.walk(folders["outputs"]) for name in files)


def test_a_symlink_planted_at_log_html_is_never_written_through(tmp_path):
    folder, victim = tmp_path / "2025-01-01", tmp_path / "victim.txt"
    folder.mkdir()
    victim.write_text("precious")
    (folder / history_log.LOG_NAME).symlink_to(victim)
    with pytest.raises(OSError):
        history_log.append(str(folder), str(folder / "a.png"), {"seed": 1})
    assert victim.read_text() == "precious"
    (folder / history_log.LOG_NAME).unlink()
    (folder / history_log.LOG_NAME).symlink_to(tmp_path / "dangling.html")   # a link to nothing: not created either
    with pytest.raises(OSError):
        history_log.append(str(folder), str(folder / "a.png"), {"seed": 1})
    assert not (tmp_path / "dangling.html").exists()


def test_a_log_that_cannot_be_written_keeps_the_image_and_warns(pipeline, tmp_path):
    import datetime

    folders = pipeline(mm.Policy.CONSERVATIVE)
    day = folders["outputs"] / datetime.date.today().strftime("%Y-%m-%d")
    day.mkdir()
    (day / history_log.LOG_NAME).symlink_to(tmp_path / "elsewhere.html")
    result = pipelines.process_request(dict(SMALL))
    assert len(result.images) == 1 and os.path.isfile(result.images[0]), result.report
    assert "the history log could not be written" in result.report["warnings"]
    assert not (tmp_path / "elsewhere.html").exists()
