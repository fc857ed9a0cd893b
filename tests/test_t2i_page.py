"""The page's Styles tab, preset dropdown, history-log link and "load parameters" box,
driven through the app's own event handlers (no browser)."""

import dataclasses
import html
import json
import re
from pathlib import Path

import args_manager
from modules import config as config_module
from modules import history_log, model_downloader, presets, webui
from modules.async_worker import Worker


def build(tmp_path: Path, monkeypatch, styles: list | None = None, downloads: bool = False, **env_extra: str):
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "juggernautXL_v8Rundiffusion.safetensors").write_bytes(b"x")
    (tmp_path / "styles").mkdir(exist_ok=True)
    (tmp_path / "styles" / "mine.json").write_text(json.dumps(styles or [
        {"name": "Sharp Lines", "prompt": "{prompt}, sharp", "negative_prompt": ""},
        {"name": "Soft Glow", "prompt": "{prompt}, glow", "negative_prompt": ""},
        {"name": "Fooocus Photograph", "prompt": "photo of {prompt}", "negative_prompt": ""},
        {"name": "Fooocus Negative", "prompt": "", "negative_prompt": "bad"}]))
    env = {"config_path": str(tmp_path / "none.txt"), "path_checkpoints": str(tmp_path / "ckpt"),
           "path_styles": str(tmp_path / "styles"), "path_outputs": str(tmp_path / "out"), **env_extra}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(args_manager.args, "disable_preset_download", not downloads, raising=False)
    cfg = config_module.load_config(env)
    return webui.build_app(worker=Worker(handler=lambda *a: None), cfg=cfg, demo_warning=lambda: None,
                           model_status=dict), cfg


def components(app) -> dict[int, dict]:
    return {c["id"]: c for c in app.config["components"]}


def handler(app, elem_id: str, trigger: str):
    """(function, output labels) of the event `trigger` on the component with `elem_id`."""
    comps = components(app)
    for index, dep in enumerate(app.config["dependencies"]):
        if any(comps.get(t[0], {}).get("props", {}).get("elem_id") == elem_id and t[1] == trigger
               for t in dep["targets"]):
            labels = [comps[o]["props"].get("label") or comps[o]["props"].get("elem_id") for o in dep["outputs"]]
            return app.fns[index].fn, labels
    raise AssertionError(f"no {trigger} event on #{elem_id}")


def ancestors(app, elem_id: str) -> list[dict]:
    """The components around the one with `elem_id` in the page's layout, outermost first."""
    comps = components(app)

    def walk(node, path):
        here = comps.get(node["id"], {})
        if here.get("props", {}).get("elem_id") == elem_id:
            return path
        for child in node.get("children", []):
            found = walk(child, path + [here])
            if found is not None:
                return found
        return None

    return walk(app.config["layout"], []) or []


def set_values(labels: list, updates: tuple) -> dict:
    """Label -> value of each update that sets one (skips left out)."""
    out = {}
    for label, update in zip(labels, updates):
        if isinstance(update, dict) and "value" in update:
            out.setdefault(label, []).append(update["value"])
    return out


def test_styles_tab_lists_the_styles_folder_and_search_keeps_the_selection(tmp_path, monkeypatch):
    app, cfg = build(tmp_path, monkeypatch)
    by_id = {c["props"].get("elem_id"): c["props"] for c in components(app).values()}
    assert [c[0] for c in by_id["fr-styles"]["choices"]] == ["Fooocus V2", "Random Style", "Sharp Lines", "Soft Glow",
                                                             "Fooocus Photograph", "Fooocus Negative"]
    search, labels = handler(app, "fr-style-search", "change")
    update = search("soft", ["Sharp Lines"])
    assert update["choices"] == ["Sharp Lines", "Soft Glow"]          # the selection stays listed
    assert search("", [])["choices"][0] == "Fooocus V2"
    clicked, _ = handler(app, "fr-styles", "input")                    # a click: the chosen go on top, in order
    assert clicked("", ["Fooocus Negative", "Sharp Lines"])["choices"][:4] == ["Fooocus Negative", "Sharp Lines",
                                                                            "Fooocus V2", "Random Style"]


def test_fooocus_v2_is_ticked_at_start_only_when_its_model_is_there(tmp_path, monkeypatch):
    from modules import t2i_page
    app, cfg = build(tmp_path, monkeypatch, default_styles=json.dumps(["Fooocus V2", "Sharp Lines"]))
    by_id = {c["props"].get("elem_id"): c["props"] for c in components(app).values()}
    assert by_id["fr-styles"]["value"] == ["Sharp Lines"]          # no expansion model: every run would fail
    folder = tmp_path / "expansion"
    folder.mkdir()
    for name in ("config.json", "positive.txt", "tokenizer.json", "pytorch_model.bin"):
        (folder / name).write_text("x")
    with_model = dataclasses.replace(cfg, path_fooocus_expansion=folder)
    assert t2i_page.default_styles(with_model) == ["Fooocus V2", "Sharp Lines"]


def test_a_styles_sample_picture_is_the_hover_preview(tmp_path, monkeypatch):
    samples = tmp_path / "styles" / "samples"
    samples.mkdir(parents=True)
    (samples / "soft_glow.jpg").write_bytes(b"jpeg")      # upstream's name: lower case, spaces as _
    app, cfg = build(tmp_path, monkeypatch)
    holder = next(c["props"]["value"] for c in components(app).values()
                  if c["props"].get("elem_id") == "fr-style-samples-holder")
    data = html.unescape(re.search(r'data-samples="([^"]*)"', holder).group(1))
    assert json.loads(data) == {"Soft Glow": f"/gradio_api/file={samples / 'soft_glow.jpg'}"}
    assert str(samples) in webui.allowed_paths(cfg)
    assert "fr-style-samples" in webui.PAGE_JS       # the page script reads that map


def test_ui_styles_and_guidance_go_into_the_request():
    values = webui.UIValues(prompt="a cat", negative_prompt="", performance="Speed", aspect_ratio="1152*896",
                            image_number=1, seed=1, base_model=None, refiner_model=None, refiner_switch=0.8,
                            loras=(), sampler="euler", scheduler="karras", guidance_scale=4.0,
                            styles=("Sharp Lines",), sharpness=3.0, adm_scaler_positive=1.2,
                            adm_scaler_negative=0.9, adm_scaler_end=0.5)
    request = values.to_request()
    assert (request["styles"], request["sharpness"], request["adm_scaler_positive"], request["adm_scaler_negative"],
            request["adm_scaler_end"]) == (["Sharp Lines"], 3.0, 1.2, 0.9, 0.5)


def test_preset_dropdown_applies_a_preset_without_restart(tmp_path, monkeypatch):
    app, cfg = build(tmp_path, monkeypatch)
    assert not any(a.get("type") == "accordion" and not a["props"].get("open", True)
                   for a in ancestors(app, "fr-preset-note"))        # its note shows outside any closed box
    by_id = {c["props"].get("elem_id"): c["props"] for c in components(app).values()}
    assert {"default", "lightning", "realistic"} <= {c[0] for c in by_id["fr-preset"]["choices"]}
    apply, labels = handler(app, "fr-preset", "change")
    updates = apply("realistic")
    values = set_values(labels, updates)
    assert values["Base Model (SDXL only)"] == ["realisticStockPhoto_v20.safetensors"]
    assert values["Guidance Scale"] == [3.0] and values["Aspect Ratios"] == ["896*1152"]
    assert values["Styles"] == [["Fooocus Photograph", "Fooocus Negative"]]   # no expansion model: no Fooocus V2
    assert values["LoRA 1"] == ["SDXL_FILM_PHOTOGRAPHY_STYLE_V1.safetensors"] and values["LoRA 2"] == ["None"]
    assert "Prompt" not in values                         # an empty preset prompt keeps the typed one
    assert labels[-1] == "fr-preset-note" and updates[-1].startswith("Preset realistic applied.")
    assert "Fooocus V2 is left out" in updates[-1]
    lightning = set_values(labels, apply("lightning"))
    assert lightning["Performance"] == ["Lightning"]
    assert apply("no-such")[-1].startswith("Error: unknown preset 'no-such'")
    playground = apply("playground_v2.5")
    if "edm_playground_v2.5" not in webui.supported_schedulers():
        assert "Scheduler" not in set_values(labels, playground) and "edm_playground_v2.5" in playground[-1]


def test_a_presets_model_files_download_when_allowed(tmp_path, monkeypatch):
    app, cfg = build(tmp_path, monkeypatch, downloads=True)
    fetched = []

    def fake_download(url, dest, on_progress=None, **_):
        fetched.append((url, Path(dest)))
        on_progress(3, 4)
        return False   # e.g. offline: the note says so and the preset still applies

    monkeypatch.setattr(model_downloader, "download_file", fake_download)
    apply, labels = handler(app, "fr-preset", "change")
    updates = apply("anime")
    assert fetched == [("https://huggingface.co/mashb1t/fav_models/resolve/main/fav/animaPencilXL_v500.safetensors",
                        tmp_path / "ckpt" / "animaPencilXL_v500.safetensors")]
    assert "could not download animaPencilXL_v500.safetensors" in updates[-1]
    assert set_values(labels, updates)["Base Model (SDXL only)"] == ["animaPencilXL_v500.safetensors"]


def test_load_parameters_from_pasted_json_sets_the_controls(tmp_path, monkeypatch):
    app, cfg = build(tmp_path, monkeypatch)
    load, labels = handler(app, "fr-param-load", "click")
    pasted = json.dumps({"prompt": "a lighthouse", "seed": 1234, "styles": ["Soft Glow", "Gone Style"],
                         "sharpness": 7.0, "guidance_scale": 6.0, "width": 1152, "height": 896,
                         "loras": [{"file": "x.safetensors", "weight": 0.4, "matched_keys": 3}]})
    updates = load(None, pasted)
    values = set_values(labels, updates)
    assert values["Prompt"] == ["a lighthouse"] and values["Image Sharpness"] == [7.0]
    assert values["Random"] == [False] and values["Seed"] == ["1234"]
    assert values["Styles"] == [["Soft Glow"]]            # a style this install lacks is left out
    assert values["Aspect Ratios"] == ["1152*896"] and values["LoRA 1"] == ["x.safetensors"]
    assert load(None, "{broken")[-1].startswith("Error:") and load(None, "")[-1].startswith("Error:")
    a1111 = set_values(labels, load(None, "a harbour\nNegative prompt: rain\nSteps: 20, Sampler: Euler a, "
                                         "CFG scale: 7, Seed: 99, Size: 1152x896"))
    assert a1111["Prompt"] == ["a harbour"] and a1111["Negative prompt"] == ["rain"] and a1111["Seed"] == ["99"]
    assert a1111["Sampler"] == ["euler_ancestral"] and a1111["Guidance Scale"] == [7.0]


def test_load_parameters_and_presets_set_the_developer_debug_controls(tmp_path, monkeypatch):
    """Loaded steps that are not the mode's go to "Forced Overwrite of Sampling Step" (upstream's
    loader), the mode's own set it back to -1; CLIP skip, TSNR CFG, swap method and FreeU follow."""
    app, cfg = build(tmp_path, monkeypatch)
    load, labels = handler(app, "fr-param-load", "click")
    values = set_values(labels, load(None, json.dumps({
        "prompt": "x", "performance": "Speed", "steps": 17, "clip_skip": 1, "adaptive_cfg": 5.5,
        "refiner_swap_method": "separate", "freeu_enabled": True, "freeu_b1": 1.2, "disable_seed_increment": True})))
    assert values["Forced Overwrite of Sampling Step"] == [17] and values["CLIP Skip"] == [1]
    assert values["CFG Mimicking from TSNR"] == [5.5] and values["Refiner swap method"] == ["separate"]
    assert values["Enabled"] == [True] and values["B1"] == [1.2] and values["Disable seed increment"] == [True]
    mode_steps = set_values(labels, load(None, json.dumps({"prompt": "x", "performance": "Speed"})))
    assert mode_steps["Forced Overwrite of Sampling Step"] == [-1] and "CLIP Skip" not in mode_steps


def test_a_preset_sets_the_developer_debug_controls(tmp_path, monkeypatch):
    """Upstream's preset keys default_overwrite_step, default_clip_skip, default_cfg_tsnr."""
    app, cfg = build(tmp_path, monkeypatch)
    apply, labels = handler(app, "fr-preset", "change")
    preset = set_values(labels, apply("realistic"))
    assert preset["Forced Overwrite of Sampling Step"] == [-1] and preset["CLIP Skip"] == [2]
    assert preset["CFG Mimicking from TSNR"] == [7.0] and preset["Inpaint Engine"] == ["v2.6"]
    assert set_values(labels, apply("playground_v2.5"))["Inpaint Engine"] == ["None"]   # its default_inpaint_engine_version


def test_upstreams_checkbox_keys_open_the_panels(tmp_path, monkeypatch):
    """default_advanced_checkbox, default_image_prompt_checkbox, default_developer_debug_mode_checkbox."""
    app, cfg = build(tmp_path, monkeypatch, default_advanced_checkbox="true", default_image_prompt_checkbox="true",
                     default_developer_debug_mode_checkbox="true")
    by_id = {c["props"].get("elem_id"): c["props"] for c in components(app).values()}
    for box, panel in (("fr-advanced-checkbox", "fr-advanced-column"), ("fr-input-image-checkbox",
                                                                        "fr-input-image-panel"),
                       ("fr-debug-mode", "fr-debug-column")):
        assert by_id[box]["value"] is True and by_id[panel]["visible"] is True, box


def test_refresh_all_files_lists_new_presets_too(tmp_path, monkeypatch):
    app, cfg = build(tmp_path, monkeypatch)
    folder = tmp_path / "presets"
    folder.mkdir()
    (folder / "mine.json").write_text(json.dumps({"default_cfg_scale": 5.0}))
    monkeypatch.setattr(presets, "PRESETS_DIR", folder)
    refresh, labels = handler(app, "fr-refresh-files", "click")
    preset = dict(zip(labels, refresh()))["Preset"]
    assert [c[0] if isinstance(c, (list, tuple)) else c for c in preset["choices"]] == ["mine"]


def test_the_metadata_scheme_shows_only_with_metadata_saved(tmp_path, monkeypatch):
    app, cfg = build(tmp_path, monkeypatch)
    toggle, labels = handler(app, "fr-save-metadata", "change")
    assert labels == ["Metadata Scheme"] and toggle(False)["visible"] is False and toggle(True)["visible"] is True


def test_the_history_log_link_is_set_again_after_each_run(tmp_path, monkeypatch):
    """As upstream's: a run past midnight logs into the next day's folder."""
    from types import SimpleNamespace

    app, cfg = build(tmp_path, monkeypatch)
    comps = components(app)
    deps = app.config["dependencies"]
    generate = next(i for i, d in enumerate(deps)
                    if any(comps.get(t[0], {}).get("props", {}).get("elem_id") == "generate_button" for t in d["targets"]))
    after = [i for i, d in enumerate(deps) if d.get("trigger_after") == generate
             and [comps[o]["props"].get("elem_id") for o in d["outputs"]] == ["fr-history"]]
    assert len(after) == 1
    target = Path(history_log.log_path(str(cfg.path_outputs)))
    assert f'href="/history/{target.parent.name}/log.html"' in app.fns[after[0]].fn(SimpleNamespace(username=None))


def test_upstreams_page_default_keys_set_the_starting_values(tmp_path, monkeypatch):
    app, cfg = build(tmp_path, monkeypatch, default_max_lora_number="3", default_loras_min_weight="-1",
                     default_loras_max_weight="1.5", default_max_image_number="8", default_uov_method="Vary (Subtle)",
                     default_inpaint_method="Improve Detail (face, hand, eyes, etc.)",
                     default_invert_mask_checkbox="true", default_image_prompt_advanced_checkbox="true",
                     default_selected_image_input_tab_id="inpaint_tab", default_inpaint_engine_version="v2.5",
                     default_overwrite_upscale="0.3")
    props = [c["props"] for c in components(app).values()]
    by_id = {p.get("elem_id"): p for p in props}
    weights = [p for p in props if "fr-lora-weight" in (p.get("elem_classes") or [])]
    assert len(weights) == 3 and all((p["minimum"], p["maximum"]) == (-1.0, 1.5) for p in weights)
    assert next(p for p in props if p.get("label") == "Image Number")["maximum"] == 8
    assert by_id["fr-uov-method"]["value"] == "Vary (Subtle)" and by_id["fr-invert-mask"]["value"] is True
    assert by_id["fr-ip-advanced"]["value"] is True and by_id["fr-ip-advanced-0"]["visible"] is True
    assert by_id["fr-input-image-tab"]["value"] == "inpaint" and by_id["fr-input-image-tabs"]["selected"] == "inpaint"
    # Improve Detail's own settings; the other methods would use default_inpaint_engine_version.
    assert (by_id["fr-inpaint-engine"]["value"], by_id["fr-inpaint-strength"]["value"],
            by_id["fr-inpaint-respective-field"]["value"]) == ("None", 0.5, 0.0)
    assert by_id["fr-inpaint-additional-prompt"]["visible"] is True and by_id["fr-outpaint"]["visible"] is False
    assert by_id["fr-overwrite-upscale-strength"]["value"] == 0.3
    method, labels = handler(app, "fr-inpaint-method", "change")
    assert dict(zip(labels, method("Inpaint or Outpaint (default)")))["Inpaint Engine"]["value"] == "v2.5"


def test_history_log_link_points_at_todays_log(tmp_path, monkeypatch):
    app, cfg = build(tmp_path, monkeypatch)
    link = next(c["props"]["value"] for c in components(app).values() if c["props"].get("elem_id") == "fr-history")
    target = Path(history_log.log_path(str(cfg.path_outputs)))
    assert f'href="/history/{target.parent.name}/log.html"' in link   # by its place in the outputs, no server path
    assert str(tmp_path) not in link
