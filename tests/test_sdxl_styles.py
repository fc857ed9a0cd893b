"""Styles in upstream's sdxl_styles JSON format from the configured folders, upstream's
ordering rules, Random Style, multi-line prompts, and each image's texts as encoded."""

import json
import random

import numpy as np
import pytest
import torch

from ldm_patched.modules import model_management as mm
from modules import config, core, sdxl_styles
from modules.sdxl_styles import FOOOCUS_V2, RANDOM_STYLE, PromptOptions, image_texts
from modules.wildcards import WildcardFolder
from tests.helpers import pipelines

SMALL = {"base_model": "tiny_sdxl_base.safetensors", "prompt": "a cat", "negative_prompt": "blurry",
         "width": 64, "height": 64, "steps": 2, "seed": 5, "sampler": "euler", "scheduler": "normal",
         "guidance_scale": 5.0, "sharpness": 0.0, "adm_scaler_positive": 1.0, "adm_scaler_negative": 1.0,
         "adm_scaler_end": 0.0}
COLORS = ["crimson", "teal", "ochre"]


def write_styles(folder, styles, name="my_styles.json"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(json.dumps(styles), encoding="utf-8")
    return folder


def use_config(monkeypatch, **env):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return config.reload_config()


def options(library, prompt, negative="", styles=(), folder=None, in_order=False):
    return PromptOptions(prompt=prompt, negative_prompt=negative, styles=tuple(styles), library=library,
                         wildcards=folder or WildcardFolder("/nonexistent"), wildcards_in_order=in_order)


def test_an_upstream_style_file_in_a_configured_folder_applies_exactly(pipeline, tmp_path, monkeypatch):
    pipeline(mm.Policy.CONSERVATIVE)
    # Upstream's file name and format: a JSON list of {name, prompt with {prompt}, negative_prompt}
    # (a missing negative_prompt is empty), names in upstream's raw spelling.
    install = write_styles(tmp_path / "Fooocus" / "sdxl_styles", [
        {"name": "fooocus-oil", "prompt": "oil painting of {prompt}, thick brush", "negative_prompt": "photo"},
        {"name": "mre-glow", "prompt": "{prompt}\nsoft glow"}], name="sdxl_styles_fooocus.json")
    (tmp_path / "wildcards").mkdir()
    (tmp_path / "wildcards" / "color.txt").write_text("\n".join(COLORS), encoding="utf-8")
    cfg = use_config(monkeypatch, path_styles=json.dumps([str(config.REPO_ROOT / "sdxl_styles"), str(install)]),
                     path_wildcards=str(tmp_path / "wildcards"))
    names = sdxl_styles.style_names(cfg.path_styles)
    assert names[:3] == [FOOOCUS_V2, RANDOM_STYLE, "Fooocus Enhance"] and names[-2:] == ["Fooocus Oil", "MRE Glow"]
    request = {**SMALL, "prompt": "a [[red,blue]] __color__ cat\nsitting still", "styles": ["Fooocus Oil", "MRE Glow"],
               "image_number": 2}
    styled = pipelines.process_request(request)
    assert "error" not in styled.report, styled.report
    for i, texts in enumerate(styled.report["prompts"]):
        prompt = f"a {['red', 'blue'][i]} {random.Random(5 + i).choice(COLORS)} cat"
        assert texts["full_prompt"] == [f"oil painting of {prompt}, thick brush", prompt, "soft glow", "sitting still"]
        assert texts["full_negative_prompt"] == ["photo", "blurry"]
        assert texts["prompt"] == f"{prompt}\nsitting still" and texts["styles"] == ["Fooocus Oil", "MRE Glow"]
    # The encoders saw exactly those texts: the same as sending them as lines without a style.
    first = styled.report["prompts"][0]
    plain = pipelines.process_request({**SMALL, "prompt": "\n".join(first["full_prompt"]),
                                       "negative_prompt": "photo\nblurry"})
    # (The styled request's two images share a UNet batch: within the batch tolerance of alone.)
    assert pipelines.max_difference(styled.images[0], plain.images[0]) <= pipelines.BATCH_TOLERANCE
    unstyled = pipelines.process_request({**SMALL, "prompt": first["prompt"], "negative_prompt": "blurry"})
    assert pipelines.max_difference(unstyled.images[0], plain.images[0]) > pipelines.BATCH_TOLERANCE
    assert not np.array_equal(pipelines.pixels(styled.images[0]), pipelines.pixels(styled.images[1]))


def test_several_texts_are_encoded_one_by_one_concatenated_and_pooled_summed(pipeline):
    pipeline(mm.Policy.CONSERVATIVE)
    pipe = pipelines.current()
    checkpoint = pipe.catalogue.get_checkpoint(str(config.get_config().path_checkpoints[0] / pipelines.BASE))
    texts = ("a cat", "oil painting, " * 40 + "thick brush", "soft glow")   # the second spans two windows
    singles = [core.encode_prompt(checkpoint.clip, checkpoint.tokenizers, t) for t in texts]
    counts = {"text_encodes": 0}
    joined = pipe.catalogue.encode_texts(checkpoint.clip, checkpoint.tokenizers, texts, 2, counts)
    assert counts["text_encodes"] == 3 and joined.embeds.shape[1] == 77 * 4
    assert torch.equal(joined.embeds, torch.cat([c.embeds for c in singles], dim=1))
    assert torch.equal(joined.pooled, singles[0].pooled + singles[1].pooled)   # the first top_k only


def test_upstreams_own_files_are_read_last_and_a_later_template_wins(tmp_path):
    ours = write_styles(tmp_path / "ours", [{"name": "Fooocus Enhance", "prompt": "{prompt}, ours"},
                                            {"name": "Zeta", "prompt": "{prompt}, zeta"}])
    theirs = tmp_path / "theirs"
    write_styles(theirs, [{"name": "sai-anime", "prompt": "anime {prompt}"}], name="sdxl_styles_sai.json")
    write_styles(theirs, [{"name": "Fooocus Enhance", "prompt": "{prompt}, theirs", "negative_prompt": "x"}],
                 name="sdxl_styles_fooocus.json")
    write_styles(theirs, [{"name": "Alpha", "prompt": "{prompt}, alpha"}], name="zz_mine.json")
    library = sdxl_styles.load_library([ours, theirs])
    assert library.names() == [FOOOCUS_V2, RANDOM_STYLE, "Fooocus Enhance", "Zeta", "Alpha", "SAI Anime"]
    assert library.find("fooocus enhance").prompt == "{prompt}, theirs"


def test_random_style_is_drawn_per_image_from_its_seed_after_the_wildcards(tmp_path):
    library = sdxl_styles.load_library([write_styles(tmp_path / "s", [
        {"name": f"Style {k}", "prompt": f"{{prompt}}, look {k}", "negative_prompt": f"not {k}"} for k in range(5)])])
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "color.txt").write_text("\n".join(COLORS), encoding="utf-8")
    opts = options(library, "a __color__ bird", "dull", [RANDOM_STYLE], WildcardFolder(tmp_path / "w"))
    chosen = set()
    for index, seed in enumerate(range(40, 48)):
        oracle = random.Random(seed)
        color, style = oracle.choice(COLORS), oracle.choice(list(library.styles.values()))
        texts = image_texts(opts, seed, index)
        assert texts.styles == (style.name,)
        assert texts.positive == (f"a {color} bird, look {style.name[-1]}",)
        assert texts.negative == (f"not {style.name[-1]}", "dull")
        chosen.add(style.name)
    assert len(chosen) > 1


def test_multi_line_prompts_and_templates_give_upstreams_texts(tmp_path):
    library = sdxl_styles.load_library([write_styles(tmp_path / "s", [
        {"name": "Suffix Only", "prompt": "dramatic light", "negative_prompt": "dull\nflat"},
        {"name": "Two Lines", "prompt": "{prompt}\nsecond line", "negative_prompt": ""},
        {"name": "Negative Only", "prompt": "", "negative_prompt": "ugly"}])])
    texts = image_texts(options(library, "  a   dog ,\n\n extra. ", "bad\nworse", ["Suffix Only"]), 1, 0)
    assert (texts.prompt, texts.extra_positive, texts.extra_negative) == ("a dog", ("extra",), ("worse",))
    assert texts.positive == ("a dog", "dramatic light", "extra") and texts.positive_top_k == 3
    assert texts.negative == ("dull", "flat", "bad", "worse") and texts.log_negative_prompt == "bad\nworse"
    both = image_texts(options(library, "a dog", "", ["Two Lines", "Suffix Only", "Negative Only"]), 1, 0)
    assert both.positive == ("a dog", "second line", "dramatic light") and both.negative == ("dull", "flat", "ugly")
    assert options(library, "a dog", styles=[FOOOCUS_V2]).expansion
    assert not options(library, " , ", styles=[FOOOCUS_V2]).expansion     # no expansion of an empty prompt
    expanded = image_texts(options(library, "a dog"), 1, 0).expanded("a dog, cosy")
    assert expanded.positive == ("a dog", "a dog, cosy") and expanded.positive_top_k == 1


def test_unknown_style_is_a_clear_error_and_the_server_keeps_serving(pipeline, tmp_path, monkeypatch):
    pipeline(mm.Policy.CONSERVATIVE)
    use_config(monkeypatch, path_styles=str(write_styles(tmp_path / "styles", [
        {"name": "Cinematic Glow", "prompt": "{prompt}, glow", "negative_prompt": ""}])))
    bad = pipelines.process_request({**SMALL, "styles": ["Cinematic Glo"]})
    assert bad.images == []
    assert "unknown style 'Cinematic Glo'" in bad.report["error"]
    assert "Cinematic Glow" in bad.report["error"]       # the close match is offered
    assert "<path_styles>" in bad.report["error"] and str(tmp_path) not in bad.report["error"]   # the folder by its key
    good = pipelines.process_request({**SMALL, "styles": ["cinematic glow"]})
    assert "error" not in good.report and len(good.images) == 1


def test_default_styles_apply_when_the_request_names_none(pipeline, tmp_path, monkeypatch):
    pipeline(mm.Policy.CONSERVATIVE)
    use_config(monkeypatch, default_styles=json.dumps(["Tagged"]), path_styles=str(write_styles(
        tmp_path / "styles", [{"name": "Tagged", "prompt": "{prompt}, tagged", "negative_prompt": "untagged"}])))
    result = pipelines.process_request(dict(SMALL))
    assert result.report["prompts"][0]["full_prompt"] == ["a cat, tagged"]
    explicit_none = pipelines.process_request({**SMALL, "styles": []})
    assert explicit_none.report["prompts"][0]["full_prompt"] == ["a cat"]


def test_upstream_names_are_matched_in_their_display_form(tmp_path):
    library = sdxl_styles.load_library([write_styles(tmp_path / "s", [
        {"name": "sai-3d-model", "prompt": "{prompt}, 3d", "negative_prompt": ""},
        {"name": "mre-manga", "prompt": "{prompt}, manga", "negative_prompt": ""}])])
    assert library.names() == [FOOOCUS_V2, RANDOM_STYLE, "SAI 3D Model", "MRE Manga"]
    assert sdxl_styles.check_names(["SAI 3D Model", "sai-3d-model", "mre manga", "random style"], library) == [
        "SAI 3D Model", "MRE Manga", RANDOM_STYLE]


def test_a_broken_file_is_skipped_and_named_when_a_style_is_missing(tmp_path):
    folder = write_styles(tmp_path / "s", [{"name": "Good", "prompt": "{prompt}", "negative_prompt": ""}])
    (folder / "broken.json").write_text("[{\"name\": ", encoding="utf-8")
    (folder / "wrong.json").write_text(json.dumps([{"prompt": "no name"}]), encoding="utf-8")
    library = sdxl_styles.load_library([folder])
    assert library.names() == [FOOOCUS_V2, RANDOM_STYLE, "Good"]
    assert set(library.skipped) == {str(folder / "broken.json"), str(folder / "wrong.json")}
    assert "entry 0: needs a 'name'" in library.skipped[str(folder / "wrong.json")]
    with pytest.raises(sdxl_styles.StyleError, match="broken.json"):
        sdxl_styles.check_names(["Missing"], library)
    with pytest.raises(sdxl_styles.StyleError, match="Random Style"):
        sdxl_styles.check_names([RANDOM_STYLE], sdxl_styles.load_library([tmp_path / "none"]))


def test_a_new_style_file_is_picked_up_without_a_restart(tmp_path):
    folder = write_styles(tmp_path / "s", [{"name": "One", "prompt": "{prompt}", "negative_prompt": ""}])
    assert sdxl_styles.style_names([folder])[2:] == ["One"]
    write_styles(folder, [{"name": "Two", "prompt": "{prompt}", "negative_prompt": ""}], name="more.json")
    assert sdxl_styles.style_names([folder])[2:] == ["Two", "One"]   # files in name order


def test_shipped_styles_are_a_real_choice_with_upstreams_preset_names():
    library = sdxl_styles.load_library([config.REPO_ROOT / "sdxl_styles"])
    assert not library.skipped
    assert len(library.styles) >= 40
    for style in library.styles.values():
        assert "{prompt}" in style.prompt or (not style.prompt and style.negative_prompt), style
    presets_styles = {"Fooocus Enhance", "Fooocus Sharp", "Fooocus Photograph", "Fooocus Negative",
                      "Fooocus Cinematic", "Fooocus Semi Realistic", "Fooocus Masterpiece", "Fooocus Pony"}
    assert presets_styles <= {s.name for s in library.styles.values()}
