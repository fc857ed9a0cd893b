"""Styles: upstream's sdxl_styles JSON format, the styles folder, request field and config default."""

import json

import numpy as np
import pytest
from PIL import Image

from ldm_patched.modules import model_management as mm
from modules import config, sdxl_styles
from tests.helpers import pipelines

SMALL = {"base_model": "tiny_sdxl_base.safetensors", "prompt": "a cat", "negative_prompt": "blurry",
         "width": 64, "height": 64, "steps": 2, "seed": 5, "sampler": "euler", "scheduler": "normal",
         "guidance_scale": 5.0, "sharpness": 0.0, "adm_scaler_positive": 1.0, "adm_scaler_negative": 1.0,
         "adm_scaler_end": 0.0}


def write_styles(folder, styles, name="my_styles.json"):
    folder.mkdir(exist_ok=True)
    (folder / name).write_text(json.dumps(styles), encoding="utf-8")
    return folder


def use_styles_folder(monkeypatch, folder):
    monkeypatch.setenv("path_styles", str(folder))
    config.reload_config()


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


def parameters(path):
    return json.loads(Image.open(path).text["parameters"])


def test_style_from_folder_changes_prompt_and_negative_as_its_template_says(pipeline, tmp_path, monkeypatch):
    pipeline(mm.Policy.CONSERVATIVE)
    use_styles_folder(monkeypatch, write_styles(tmp_path / "styles", [
        {"name": "oil-paint", "prompt": "oil painting of {prompt}, thick brush", "negative_prompt": "photo"}]))
    styled = pipelines.process_request({**SMALL, "styles": ["Oil Paint"]})
    assert "error" not in styled.report, styled.report
    meta = parameters(styled.images[0])
    assert meta["full_prompt"] == "oil painting of a cat, thick brush"
    assert meta["full_negative_prompt"] == "photo, blurry"
    # The encoders saw exactly those texts: the same as asking for them without a style.
    plain = pipelines.process_request({**SMALL, "prompt": "oil painting of a cat, thick brush",
                                              "negative_prompt": "photo, blurry"})
    unstyled = pipelines.process_request(dict(SMALL))
    assert np.array_equal(pixels(styled.images[0]), pixels(plain.images[0]))
    assert not np.array_equal(pixels(styled.images[0]), pixels(unstyled.images[0]))


def test_unknown_style_is_a_clear_error_and_the_server_keeps_serving(pipeline, tmp_path, monkeypatch):
    pipeline(mm.Policy.CONSERVATIVE)
    use_styles_folder(monkeypatch, write_styles(tmp_path / "styles", [
        {"name": "Cinematic Glow", "prompt": "{prompt}, glow", "negative_prompt": ""}]))
    bad = pipelines.process_request({**SMALL, "styles": ["Cinematic Glo"]})
    assert bad.images == []
    assert "unknown style 'Cinematic Glo'" in bad.report["error"]
    assert "Cinematic Glow" in bad.report["error"]       # the close match is offered
    assert "<path_styles>" in bad.report["error"] and str(tmp_path) not in bad.report["error"]   # the folder by its key
    good = pipelines.process_request({**SMALL, "styles": ["cinematic glow"]})
    assert "error" not in good.report and len(good.images) == 1


def test_default_styles_apply_when_the_request_names_none(pipeline, tmp_path, monkeypatch):
    pipeline(mm.Policy.CONSERVATIVE)
    monkeypatch.setenv("default_styles", json.dumps(["Tagged"]))
    use_styles_folder(monkeypatch, write_styles(tmp_path / "styles", [
        {"name": "Tagged", "prompt": "{prompt}, tagged", "negative_prompt": "untagged"}]))
    result = pipelines.process_request(dict(SMALL))
    assert parameters(result.images[0])["full_prompt"] == "a cat, tagged"
    explicit_none = pipelines.process_request({**SMALL, "styles": []})
    assert parameters(explicit_none.images[0])["full_prompt"] == "a cat"


def test_styles_without_placeholder_keep_the_prompt_first_and_multiline_templates_split(tmp_path):
    library = sdxl_styles.load_library([write_styles(tmp_path / "s", [
        {"name": "Suffix Only", "prompt": "dramatic light", "negative_prompt": "dull\nflat"},
        {"name": "Two Lines", "prompt": "{prompt}\nsecond line", "negative_prompt": ""}])])
    only = sdxl_styles.apply_styles("a dog", "ugly", ["Suffix Only"], library)
    assert only.positive == ["a dog", "dramatic light"]
    assert only.negative == ["dull", "flat", "ugly"]
    both = sdxl_styles.apply_styles("a dog", "", ["Two Lines", "Suffix Only"], library)
    assert both.positive == ["a dog", "second line", "dramatic light"]
    assert not both.expansion
    assert sdxl_styles.apply_styles("a dog", "", ["fooocus v2"], library).expansion


def test_upstream_names_are_matched_in_their_display_form(tmp_path):
    library = sdxl_styles.load_library([write_styles(tmp_path / "s", [
        {"name": "sai-3d-model", "prompt": "{prompt}, 3d", "negative_prompt": ""},
        {"name": "mre-manga", "prompt": "{prompt}, manga", "negative_prompt": ""}])])
    assert library.names() == ["Fooocus V2", "SAI 3D Model", "MRE Manga"]
    assert sdxl_styles.check_names(["SAI 3D Model", "sai-3d-model", "mre manga"], library) == [
        "SAI 3D Model", "MRE Manga"]


def test_a_broken_file_is_skipped_and_named_when_a_style_is_missing(tmp_path):
    folder = write_styles(tmp_path / "s", [{"name": "Good", "prompt": "{prompt}", "negative_prompt": ""}])
    (folder / "broken.json").write_text("[{\"name\": ", encoding="utf-8")
    (folder / "wrong.json").write_text(json.dumps([{"prompt": "no name"}]), encoding="utf-8")
    library = sdxl_styles.load_library([folder])
    assert library.names() == ["Fooocus V2", "Good"]
    assert set(library.skipped) == {str(folder / "broken.json"), str(folder / "wrong.json")}
    assert "entry 0: needs a 'name'" in library.skipped[str(folder / "wrong.json")]
    with pytest.raises(sdxl_styles.StyleError, match="broken.json"):
        sdxl_styles.check_names(["Missing"], library)


def test_a_new_style_file_is_picked_up_without_a_restart(tmp_path):
    folder = write_styles(tmp_path / "s", [{"name": "One", "prompt": "{prompt}", "negative_prompt": ""}])
    assert sdxl_styles.style_names([folder]) == ["Fooocus V2", "One"]
    write_styles(folder, [{"name": "Two", "prompt": "{prompt}", "negative_prompt": ""}], name="more.json")
    assert sdxl_styles.style_names([folder]) == ["Fooocus V2", "Two", "One"]   # files in name order


def test_shipped_styles_load_and_each_uses_the_prompt_or_only_adds_a_negative():
    library = sdxl_styles.load_library([config.REPO_ROOT / "sdxl_styles"])
    assert not library.skipped
    assert len(library.styles) >= 5
    for style in library.styles.values():
        assert "{prompt}" in style.prompt or (not style.prompt and style.negative_prompt), style
