"""The page's Input Image panel: Gradio values -> the request's input-image fields
(modules/input_image_page.py), checked against what modules/image_inputs.py parses."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from modules import config, flags, image_inputs
from modules import input_image_page as iip

CFG = config.load_config({"config_path": str(Path(__file__).parent / "no_config.txt")})   # the defaults

INPUT_FIELDS = {"input_image", "uov_method", "inpaint_mask", "outpaint_selections", "inpaint_strength",
                "inpaint_respective_field", "image_prompts"}


def decode(text: str) -> np.ndarray:
    raw = base64.b64decode(text, validate=True)
    assert raw.startswith(b"\x89PNG"), "images go in as PNG"
    return np.asarray(Image.open(io.BytesIO(raw)))


def picture(height: int = 24, width: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def canvas(background: np.ndarray, stroke: tuple[slice, slice] | None = None) -> dict:
    """An ImageMask value as Gradio gives it (type="numpy"): RGBA background, RGBA layers
    that are transparent except where the user drew in white."""
    h, w = background.shape[:2]
    rgba = np.dstack([background, np.full((h, w), 255, np.uint8)])
    layer = np.zeros((h, w, 4), np.uint8)
    if stroke is not None:
        layer[stroke] = (255, 255, 255, 255)
    composite = rgba.copy()
    composite[layer[:, :, 3] > 0] = (255, 255, 255, 255)
    return {"background": rgba, "layers": [layer], "composite": composite}


def test_checkbox_off_sends_none_of_the_fields() -> None:
    for tab in iip.TABS:
        values = iip.InputImageValues(
            enabled=False, tab=tab, uov_image=picture(), uov_method=flags.VARY_SUBTLE,
            image_prompts=(iip.ImagePromptSlot(picture()),), inpaint_canvas=canvas(picture(), np.s_[0:4, 0:4]),
            outpaint=("Left",))
        assert values.to_fields() == {}


def test_uov_tab_sends_the_image_and_the_method() -> None:
    image = picture()
    fields = iip.InputImageValues(enabled=True, tab=iip.TAB_UOV, uov_image=image,
                                  uov_method=flags.UPSCALE_FAST).to_fields()
    assert set(fields) == {"input_image", "uov_method"}
    assert fields["uov_method"] == "Upscale (Fast 2x)"
    assert (decode(fields["input_image"]) == image).all()
    parsed = image_inputs.parse(fields, CFG)
    assert parsed.mode == "uov" and (parsed.image == image).all()


def test_uov_disabled_is_text_to_image_and_a_method_without_an_image_is_an_error() -> None:
    assert iip.InputImageValues(enabled=True, uov_image=picture(), uov_method=flags.UOV_DISABLED).to_fields() == {}
    with pytest.raises(ValueError, match="upload an image"):
        iip.InputImageValues(enabled=True, uov_method=flags.VARY_STRONG).to_fields()


def test_a_transparent_or_grey_upload_becomes_rgb() -> None:
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[:, :4] = (10, 20, 30, 255)           # left half opaque, right half transparent
    rgb = decode(iip.uov_fields(rgba, flags.VARY_SUBTLE)["input_image"])
    assert rgb.shape == (8, 8, 3)
    assert (rgb[:, :4] == (10, 20, 30)).all() and (rgb[:, 4:] == 255).all()
    grey = decode(iip.uov_fields(np.full((8, 8), 77, np.uint8), flags.VARY_SUBTLE)["input_image"])
    assert grey.shape == (8, 8, 3) and (grey == 77).all()


def test_image_prompt_tab_sends_filled_slots_only() -> None:
    first, third = picture(seed=1), picture(16, 16, seed=3)
    slots = (iip.ImagePromptSlot(first, 0.4, 1.2), iip.ImagePromptSlot(None, 0.9, 0.1),
             iip.ImagePromptSlot(third), iip.ImagePromptSlot(None))
    fields = iip.InputImageValues(enabled=True, tab=iip.TAB_IP, image_prompts=slots,
                                  uov_image=picture(), uov_method=flags.VARY_SUBTLE).to_fields()
    assert set(fields) == {"image_prompts"}
    prompts = fields["image_prompts"]
    assert [p[1:] for p in prompts] == [[0.4, 1.2, "ImagePrompt"], [0.5, 0.6, "ImagePrompt"]]
    assert (decode(prompts[0][0]) == first).all() and (decode(prompts[1][0]) == third).all()
    parsed = image_inputs.parse(fields, CFG)
    assert parsed.mode == "" and len(parsed.image_prompts) == 2
    assert iip.InputImageValues(enabled=True, tab=iip.TAB_IP, image_prompts=(iip.ImagePromptSlot(),) * 4
                                ).to_fields() == {}


def test_a_drawn_stroke_becomes_the_white_area_of_the_mask() -> None:
    image = picture(24, 32)
    fields = iip.InputImageValues(enabled=True, tab=iip.TAB_INPAINT,
                                  inpaint_canvas=canvas(image, np.s_[4:10, 20:30])).to_fields()
    assert set(fields) == {"input_image", "inpaint_mask", "inpaint_strength", "inpaint_respective_field"}
    assert (decode(fields["input_image"]) == image).all()   # the image without the white strokes
    mask = decode(fields["inpaint_mask"])
    expected = np.zeros((24, 32), np.uint8)
    expected[4:10, 20:30] = 255
    assert mask.shape == (24, 32) and (mask == expected).all()
    assert fields["inpaint_strength"] == 1.0 and fields["inpaint_respective_field"] == 0.618
    parsed = image_inputs.parse(fields, CFG)
    assert parsed.mode == "inpaint" and parsed.outpaint == []


def test_an_uploaded_mask_merges_with_the_strokes_at_the_image_size() -> None:
    image = picture(16, 16)
    upload = np.zeros((32, 32, 3), np.uint8)   # twice the size: scaled down to the image
    upload[0:8, 0:8] = 255
    fields = iip.inpaint_fields(canvas(image, np.s_[12:16, 12:16]), upload, [], 0.7, 0.3)
    mask = decode(fields["inpaint_mask"])
    assert mask.shape == (16, 16)
    assert (mask[0:4, 0:4] == 255).all() and (mask[12:16, 12:16] == 255).all()
    assert int((mask == 255).sum()) == 16 + 16
    assert fields["inpaint_strength"] == 0.7 and fields["inpaint_respective_field"] == 0.3


def test_outpaint_without_a_mask_sends_the_directions_in_upstream_order() -> None:
    image = picture()
    fields = iip.InputImageValues(enabled=True, tab=iip.TAB_INPAINT, inpaint_canvas=canvas(image),
                                  outpaint=("Top", "Left")).to_fields()
    assert set(fields) == {"input_image", "outpaint_selections", "inpaint_strength", "inpaint_respective_field"}
    assert fields["outpaint_selections"] == ["Left", "Top"]
    assert image_inputs.parse(fields, CFG).outpaint == ["Left", "Top"]


def test_inpaint_needs_an_image_and_something_to_do() -> None:
    assert iip.InputImageValues(enabled=True, tab=iip.TAB_INPAINT).to_fields() == {}
    with pytest.raises(ValueError, match="upload the image"):
        iip.inpaint_fields(None, None, ["Left"])
    with pytest.raises(ValueError, match="draw on the image"):
        iip.inpaint_fields(canvas(picture()), None, [])


def test_file_paths_and_pil_images_are_read(tmp_path: Path) -> None:
    image = picture()
    path = tmp_path / "in.png"
    Image.fromarray(image).save(path)
    for value in (str(path), {"path": str(path)}, Image.fromarray(image)):
        assert (decode(iip.uov_fields(value, flags.VARY_SUBTLE)["input_image"]) == image).all()


# -- image-prompt types and the Developer Debug "Control" options ----------------------------

def test_the_page_offers_upstreams_types_but_faceswap_with_their_defaults() -> None:
    assert iip.IMAGE_PROMPT_TYPES == ("ImagePrompt", "PyraCanny", "CPDS")
    # upstream's flags.default_parameters: (stop at, weight)
    assert [iip.type_defaults(t) for t in ("ImagePrompt", "PyraCanny", "CPDS")] == [(0.5, 0.6), (0.5, 1.0), (0.5, 1.0)]
    fields = iip.image_prompt_fields([iip.ImagePromptSlot(picture(), 0.3, 1.5, "PyraCanny"),
                                      iip.ImagePromptSlot(picture(seed=2), 0.7, 0.9, "CPDS")])
    parsed = image_inputs.parse(fields, CFG)
    assert [(p.kind, p.stop, p.weight) for p in parsed.image_prompts] == [("PyraCanny", 0.3, 1.5), ("CPDS", 0.7, 0.9)]
    assert [p.kind for p in parsed.control_prompts] == ["PyraCanny", "CPDS"] and not parsed.adapter_prompts
    with pytest.raises(ValueError, match="unknown type 'FaceSwap'"):
        iip.image_prompt_fields([iip.ImagePromptSlot(picture(), kind="FaceSwap")])


def test_a_request_without_stop_and_weight_gets_the_types_defaults() -> None:
    image = iip.encode_png(picture())
    parsed = image_inputs.parse({"image_prompts": [[image, None, None, "CPDS"], [image], [image, 0.2, None, "PyraCanny"]]}, CFG)
    assert [(p.kind, p.stop, p.weight) for p in parsed.image_prompts] == [
        ("CPDS", 0.5, 1.0), ("ImagePrompt", 0.5, 0.6), ("PyraCanny", 0.2, 1.0)]


INPAINT = {"input_image", "inpaint_mask", "inpaint_strength", "inpaint_respective_field"}


def _all_tabs(tab: str, control: iip.ControlValues, canvas_stroke=np.s_[0:4, 0:4]) -> iip.InputImageValues:
    return iip.InputImageValues(
        enabled=True, tab=tab, uov_image=picture(seed=5), uov_method=flags.VARY_STRONG,
        image_prompts=(iip.ImagePromptSlot(picture(seed=6), kind="PyraCanny"),),
        inpaint_canvas=canvas(picture(seed=7), canvas_stroke), control=control)


@pytest.mark.parametrize("tab, control, sent", [
    (iip.TAB_IP, iip.ControlValues(), {"image_prompts"}),
    (iip.TAB_UOV, iip.ControlValues(), {"input_image", "uov_method"}),
    (iip.TAB_INPAINT, iip.ControlValues(), INPAINT),
    (iip.TAB_IP, iip.ControlValues(mixing_vary_upscale=True), {"image_prompts", "input_image", "uov_method"}),
    (iip.TAB_UOV, iip.ControlValues(mixing_vary_upscale=True), {"image_prompts", "input_image", "uov_method"}),
    (iip.TAB_IP, iip.ControlValues(mixing_inpaint=True), {"image_prompts", *INPAINT}),
    (iip.TAB_INPAINT, iip.ControlValues(mixing_inpaint=True), {"image_prompts", *INPAINT}),
    # upstream: any mixing option brings the image prompts, whatever tab is shown
    (iip.TAB_INPAINT, iip.ControlValues(mixing_vary_upscale=True), {"image_prompts", *INPAINT}),
    # both: the Image Prompt tab takes Vary/Upscale (one input image per request)
    (iip.TAB_IP, iip.ControlValues(mixing_vary_upscale=True, mixing_inpaint=True),
     {"image_prompts", "input_image", "uov_method"}),
])
def test_mixing_options_send_the_other_tabs_image_as_upstream(tab, control, sent) -> None:
    fields = _all_tabs(tab, control).to_fields()
    assert {k for k in fields if k in INPUT_FIELDS} == sent
    parsed = image_inputs.parse(fields, CFG)
    assert parsed.mode == ("uov" if "uov_method" in sent else "inpaint" if "inpaint_mask" in sent else "")
    assert len(parsed.image_prompts) == ("image_prompts" in sent)


def test_mixing_inpaint_without_a_stroke_sends_the_image_prompts_alone() -> None:
    fields = _all_tabs(iip.TAB_IP, iip.ControlValues(mixing_inpaint=True), canvas_stroke=None).to_fields()
    assert {k for k in fields if k in INPUT_FIELDS} == {"image_prompts"}


def test_control_options_go_with_the_image_prompts_when_changed() -> None:
    control = iip.ControlValues(softness=0.5, canny_low=20, canny_high=200, skip_preprocessors=True,
                                debug_preprocessors=True)
    fields = _all_tabs(iip.TAB_IP, control).to_fields()
    assert {k: fields[k] for k in control.request_fields()} == {
        "controlnet_softness": 0.5, "canny_low_threshold": 20, "canny_high_threshold": 200,
        "skipping_cn_preprocessor": True, "debugging_cn_preprocessor": True}
    assert image_inputs.parse(fields, CFG).control == image_inputs.ControlOptions(0.5, 20, 200, True, True)
    assert not set(_all_tabs(iip.TAB_IP, iip.ControlValues()).to_fields()) & set(control.request_fields())
    assert not set(_all_tabs(iip.TAB_UOV, control).to_fields()) & set(control.request_fields())  # no prompts sent
