"""The web UI and its API: request building, the endpoints, and launch.py end to end."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import numpy as np
from PIL import Image

from modules import config as config_module
from modules import flags, webui
from modules.async_worker import TaskControl, Worker
from tests.helpers.webui import (STATUS, TIMEOUT, FakeApp, FakePipeline, FakeResult, free_port, running_fake_app,
                                 start_fake_app, wait_until)

REPO_ROOT = Path(__file__).resolve().parent.parent
SERVER_START_TIMEOUT_S = 120.0

REPORT_FIELDS = {
    "timings_ms": {"total", "model_management", "text_encode", "sampling", "vae_decode"},
    "model_management": {"bytes_to_device", "bytes_to_offload", "models_loaded", "models_unloaded",
                         "weights_patched", "weights_restored", "lora_files_read"},
    "vram": {"budget_bytes", "resident_bytes", "peak_allocated_bytes"},
}


def wait_for_http(url: str, deadline_s: float, alive: Callable[[], bool] = lambda: True) -> None:
    """Poll ``url`` until it answers 200; fail when ``alive()`` turns False or time is up."""
    deadline = time.monotonic() + deadline_s
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if not alive():
            raise AssertionError(f"server process exited before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError) as error:
            last_error = error
        threading.Event().wait(0.25)  # polling interval, not synchronisation
    raise AssertionError(f"{url} did not answer within {deadline_s} s (last error: {last_error})")


def make_client(url: str, download_dir: Path):  # -> gradio_client.Client
    from gradio_client import Client
    return Client(url, verbose=False, download_files=str(download_dir), analytics_enabled=False)


def check_report_fields(report: dict) -> None:
    assert report["mode"] in ("resident", "conservative")
    assert isinstance(report["seed"], int)
    for section, names in REPORT_FIELDS.items():
        assert names <= set(report[section]), f"report[{section!r}] lacks {names - set(report[section])}"
        for name in names:
            assert isinstance(report[section][name], (int, float)) and not isinstance(report[section][name], bool)


# -- UIValues -> request dict ------------------------------------------------------------

def ui_values(**overrides: object) -> webui.UIValues:
    base = dict(prompt="a cat", negative_prompt="blurry", performance="Speed", aspect_ratio="1152*896",
                image_number=2, seed=-1, base_model="sdxl/base.safetensors", refiner_model="None",
                refiner_switch=0.8, loras=(), sampler="euler", scheduler="karras", guidance_scale=4.0)
    base.update(overrides)
    return webui.UIValues(**base)  # type: ignore[arg-type]


# Styles, sharpness and ADM guidance the page sends by default (config defaults, upstream's ADM).
T2I_DEFAULTS = {"styles": [], "sharpness": 2.0, "adm_scaler_positive": 1.5, "adm_scaler_negative": 0.8,
                "adm_scaler_end": 0.3}


def test_ui_values_become_the_api_request() -> None:
    loras = (webui.LoraValue(True, "a.safetensors", 0.5), webui.LoraValue(False, "b.safetensors", 1.0),
             webui.LoraValue(True, "None", 1.0), webui.LoraValue(True, "c.safetensors", -1.25))
    request = ui_values(loras=loras, aspect_ratio="896*1152", seed=42, image_number=3).to_request()
    assert request == {
        "prompt": "a cat", "negative_prompt": "blurry", "performance": "Speed",
        "width": 896, "height": 1152, "image_number": 3, "seed": 42,
        "base_model": "sdxl/base.safetensors", "refiner_model": "None", "refiner_switch": 0.8,
        "loras": [["a.safetensors", 0.5], ["c.safetensors", -1.25]],
        "sampler": "euler", "scheduler": "karras", "guidance_scale": 4.0, "vae": "Default (model)",
        **T2I_DEFAULTS,
    }
    json.dumps(request)  # must be JSON-able, it is the API payload


def test_ui_request_without_base_model_leaves_the_choice_to_the_pipeline() -> None:
    assert "base_model" not in ui_values(base_model=None).to_request()


# -- plain helpers ---------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "want"), [("0", 0), (" 42 ", 42), (str(2 ** 63 - 1), 2 ** 63 - 1),
                                            ("5320670644829277066", 5320670644829277066)])
def test_seed_text_is_exact(text: str, want: int) -> None:
    assert webui.parse_seed(text, random_seed=False) == want
    assert webui.parse_seed(text, random_seed=True) == -1


@pytest.mark.parametrize("text", ["", "abc", "-1", str(2 ** 63), "1.5"])
def test_bad_seed_text_names_the_field(text: str) -> None:
    with pytest.raises(ValueError, match="Seed"):
        webui.parse_seed(text, random_seed=False)


def test_page_report_carries_seeds_as_strings() -> None:
    big = 5320670644829277066
    shown = webui.display_report({"seed": big, "seeds": [big, big + 1], "mode": "resident"})
    assert shown == {"seed": str(big), "seeds": [str(big), str(big + 1)], "mode": "resident"}
    # What a browser would do with the numbers: the strings survive, the ints do not.
    assert json.loads(json.dumps(shown))["seeds"][1] == "5320670644829277067"
    assert float(big + 1) == float(big)


@pytest.mark.parametrize(("value", "label"), [("1152*896", "1152×896 | 9:7"), ("1024*1024", "1024×1024 | 1:1"),
                                              ("704*1408", "704×1408 | 1:2")])
def test_aspect_ratio_labels_as_upstream(value: str, label: str) -> None:
    assert webui.aspect_ratio_label(value) == label
    assert flags.parse_aspect_ratio(label) == flags.parse_aspect_ratio(value)


def test_distilled_modes_lock_the_controls_they_override() -> None:
    defaults = {"sampler": "dpmpp_2m_sde_gpu", "scheduler": "karras", "guidance": 4.0}
    sampler, scheduler, guidance, refiner, switch, note = webui._lock_updates("Extreme Speed", defaults)
    settings = flags.performance_settings("Extreme Speed")
    assert (sampler["value"], sampler["interactive"]) == (settings.sampler, False)
    assert (scheduler["value"], scheduler["interactive"]) == (settings.scheduler, False)
    assert (guidance["value"], guidance["interactive"]) == (settings.cfg_scale, False)
    assert refiner["interactive"] is False and refiner["value"] == "None" and switch["visible"] is False
    assert "Extreme Speed" in note
    sampler, scheduler, guidance, refiner, _, note = webui._lock_updates("Speed", defaults)
    assert (sampler["value"], sampler["interactive"]) == ("dpmpp_2m_sde_gpu", True)
    assert guidance["interactive"] is True and refiner["interactive"] is True and note == ""


def test_leaving_a_locking_mode_restores_what_the_user_had_unless_something_set_it_since() -> None:
    mine = {"sampler": "euler", "scheduler": "karras", "guidance": 6.5, "refiner": "r.safetensors",
            "refiner_switch": 0.6}
    restore, kept = webui._mode_memory("Speed", mine, None)       # Speed -> Quality: nothing reset
    assert restore == mine and kept is None
    _, kept = webui._mode_memory("Extreme Speed", mine, None)
    lcm = flags.performance_settings("Extreme Speed")
    shown = {**mine, "sampler": lcm.sampler, "scheduler": lcm.scheduler, "guidance": lcm.cfg_scale,
             "refiner": "None"}
    _, kept = webui._mode_memory("Lightning", shown, kept)         # from one locking mode to another
    lightning = flags.performance_settings("Lightning")
    shown = {**shown, "sampler": lightning.sampler, "scheduler": lightning.scheduler}
    restore, kept = webui._mode_memory("Speed", shown, kept)
    assert restore == mine and kept is None
    # A preset applied while locked (guidance 3, switch 0.5) wins over what was kept.
    _, kept = webui._mode_memory("Lightning", mine, None)
    restore, _ = webui._mode_memory("Speed", {**shown, "guidance": 3.0, "refiner_switch": 0.5}, kept)
    assert restore == {**mine, "guidance": 3.0, "refiner_switch": 0.5}


def test_auth_file_is_read_and_bad_entries_are_named(tmp_path: Path) -> None:
    good = tmp_path / "auth.json"
    good.write_text(json.dumps([{"user": "ann", "pass": "pw1"}, {"user": "bob", "pass": "pw2"}]))
    assert webui.auth_pairs(("cli", "pw"), good) == [("cli", "pw"), ("ann", "pw1"), ("bob", "pw2")]
    assert webui.auth_pairs(None, tmp_path / "missing.json") == []
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"user": "ann", "pass": "pw1"}, {"user": "x"}]))
    with pytest.raises(ValueError, match="entry 1"):
        webui.read_auth_file(bad)
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json"):
        webui.read_auth_file(bad)


# -- the app with a fake worker: endpoints and page wiring ----------------------------------

@pytest.fixture
def fake_app(tmp_path: Path) -> Iterator[FakeApp]:
    with running_fake_app(tmp_path) as fake:
        yield fake


def test_api_lists_exactly_generate_model_status_and_free_memory(fake_app: FakeApp, tmp_path: Path) -> None:
    url, _ = fake_app
    info = make_client(url, tmp_path / "dl").view_api(return_format="dict", print_info=False)
    assert set(info["named_endpoints"]) == {"/generate", "/model_status", "/free_memory"}  # page events: private
    assert not info["unnamed_endpoints"]
    params = info["named_endpoints"]["/generate"]["parameters"]
    assert [p["component"] for p in params] == ["Json"]
    assert [r["component"] for r in info["named_endpoints"]["/generate"]["returns"]] == ["File", "Json"]


def test_generate_passes_the_json_object_through_and_returns_files(
        fake_app: FakeApp, tmp_path: Path) -> None:
    url, pipeline = fake_app
    client = make_client(url, tmp_path / "dl")
    request = {"prompt": "a cat", "loras": [["x.safetensors", 0.5]], "seed": 7}
    gallery, report = client.predict(request, api_name="/generate")
    assert pipeline.requests == [request]
    assert report == {"mode": "conservative", "n": 1}
    assert len(gallery) == 1
    downloaded = Path(gallery[0])
    assert downloaded.is_file() and downloaded.resolve().is_relative_to((tmp_path / "dl").resolve())
    with Image.open(downloaded) as image:
        assert image.format == "PNG" and image.size == (16, 8)

    gallery, report = client.predict({"prompt": "fail"}, api_name="/generate")
    assert not gallery and report == {"error": "fake failure"}
    status = client.predict(api_name="/model_status")
    assert status["models"] == STATUS["models"] and "weights patched" in status["last_request"]


def test_generate_rejects_a_non_object(fake_app: FakeApp, tmp_path: Path) -> None:
    url, pipeline = fake_app
    gallery, report = make_client(url, tmp_path / "dl").predict(["not", "a", "dict"], api_name="/generate")
    assert not gallery and "JSON object" in report["error"]
    assert pipeline.requests == []


def test_cancelling_a_queued_api_job_means_it_never_runs(fake_app: FakeApp, tmp_path: Path) -> None:
    client = make_client(fake_app.url, tmp_path / "dl")
    blocker = client.submit({"prompt": "blocker", "block": True}, api_name="/generate")
    assert fake_app.pipeline.started.wait(TIMEOUT)
    queued = make_client(fake_app.url, tmp_path / "dl2").submit({"prompt": "queued"}, api_name="/generate")
    wait_until(lambda: fake_app.worker.pending() == 1, "the second job to reach the worker's queue")
    queued.cancel()
    wait_until(lambda: fake_app.worker.pending() == 0, "the cancelled job to leave the queue")
    fake_app.pipeline.gate.set()
    assert blocker.result(TIMEOUT)[1]["n"] == 1
    after = client.predict({"prompt": "after"}, api_name="/generate")
    assert after[1]["n"] == 2
    assert fake_app.pipeline.order == ["run:blocker", "run:after"]   # "queued" never ran, wrote nothing
    assert sorted(p.name for p in tmp_path.glob("img*.png")) == ["img1.png", "img2.png"]


def test_free_memory_waits_for_the_running_request(fake_app: FakeApp, tmp_path: Path) -> None:
    client = make_client(fake_app.url, tmp_path / "dl")
    running = client.submit({"prompt": "running", "block": True}, api_name="/generate")
    assert fake_app.pipeline.started.wait(TIMEOUT)
    freeing = make_client(fake_app.url, tmp_path / "dl2").submit(api_name="/free_memory")
    # The server still answers (snapshot, not the live registry) while the request runs...
    status = make_client(fake_app.url, tmp_path / "dl3").predict(api_name="/model_status")
    assert status["models"] == STATUS["models"]
    assert fake_app.freed == []   # ...and freeing has not touched the registry yet.
    fake_app.pipeline.gate.set()
    freed = freeing.result(TIMEOUT)
    assert freed["unloaded"] == ["a.safetensors:unet"] and freed["freed_bytes"] == 2 ** 20
    assert running.result(TIMEOUT)[1]["n"] == 1
    assert fake_app.pipeline.order == ["run:running", "free"]


# -- driving the page's own events the way the browser does ---------------------------------

def _components(app: object) -> dict[int, dict]:
    return {c["id"]: c for c in app.config["components"]}  # type: ignore[attr-defined]


def _event(app: object, elem_id: str) -> tuple[int, dict]:
    config = app.config  # type: ignore[attr-defined]
    components = _components(app)
    return next((i, d) for i, d in enumerate(config["dependencies"])
                if any(components.get(t[0], {}).get("props", {}).get("elem_id") == elem_id for t in d["targets"]))


def _inputs(app: object, dep: dict, values: dict[str, object], owner: str) -> list:
    components = _components(app)
    data = []
    for cid in dep["inputs"]:
        component = components[cid]
        props = component["props"]
        if component["type"] == "browserstate":
            data.append(owner)
        else:
            data.append(values.get(props.get("elem_id"), values.get(props.get("label"), props.get("value"))))
    return data


def page_event(fake: FakeApp, elem_id: str, owner: str, values: dict[str, object] | None = None,
               session: str | None = None) -> list[dict]:
    """Join the queue with one page event and read its stream to the end."""
    import httpx

    index, dep = _event(fake.app, elem_id)
    session = session or f"s-{owner}-{elem_id}"
    body = {"data": _inputs(fake.app, dep, values or {}, owner), "fn_index": index, "session_hash": session,
            "event_data": None, "trigger_id": dep["targets"][0][0]}
    joined = httpx.post(fake.url + "gradio_api/queue/join", timeout=TIMEOUT, json=body)
    assert joined.status_code == 200, joined.text
    messages = []
    with httpx.stream("GET", fake.url + f"gradio_api/queue/data?session_hash={session}",
                      timeout=TIMEOUT) as stream:
        for line in stream.iter_lines():
            if line.startswith("data:"):
                messages.append(json.loads(line[5:]))
                if messages[-1].get("msg") == "process_completed":
                    break
    return messages


def page_call(fake: FakeApp, elem_id: str, owner: str, values: dict[str, object] | None = None) -> list:
    """A page event that bypasses the queue (Stop, Skip, a radio's change); its outputs."""
    import httpx

    index, dep = _event(fake.app, elem_id)
    response = httpx.post(fake.url + "gradio_api/run/predict", timeout=TIMEOUT,
                          json={"data": _inputs(fake.app, dep, values or {}, owner), "fn_index": index,
                                "session_hash": f"s-{owner}", "event_data": None,
                                "trigger_id": dep["targets"][0][0]})
    assert response.status_code == 200, response.text
    return response.json().get("data", [])


PAGE_VALUES = {"Prompt": "from the page", "Aspect Ratios": "896*1152", "Random": False, "Seed": "11"}


def test_page_generate_event_submits_the_request_built_from_the_controls(fake_app: FakeApp) -> None:
    messages = page_event(fake_app, "generate_button", "alice", PAGE_VALUES)
    final = messages[-1]
    assert final["msg"] == "process_completed" and final["success"], final
    assert fake_app.pipeline.requests == [{
        "prompt": "from the page", "negative_prompt": "", "performance": "Speed", "width": 896, "height": 1152,
        "image_number": 2, "seed": 11, "refiner_model": "None", "refiner_switch": 0.8, "loras": [],
        "sampler": flags.DEFAULT_SAMPLER, "scheduler": flags.DEFAULT_SCHEDULER, "guidance_scale": 4.0,
        "vae": flags.DEFAULT_VAE, **T2I_DEFAULTS,
    }]
    progress_html, gallery, report = final["output"]["data"][:3]
    assert "Finished" in progress_html and "fr-stage-finished" in progress_html
    assert len(gallery) == 1 and report == {"mode": "conservative", "n": 1}


def upload_png(fake: FakeApp, pixels: np.ndarray) -> dict:
    """Upload a PNG the way the browser does; the FileData an image control then sends."""
    import httpx

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    response = httpx.post(fake.url + "gradio_api/upload", timeout=TIMEOUT,
                          files=[("files", ("in.png", buffer.getvalue(), "image/png"))])
    assert response.status_code == 200, response.text
    return {"path": response.json()[0], "orig_name": "in.png", "meta": {"_type": "gradio.FileData"}}


def test_page_sends_the_input_image_fields_of_the_tab_shown(fake_app: FakeApp) -> None:
    image = np.random.default_rng(0).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    uploaded = upload_png(fake_app, image)
    layer = np.zeros((24, 32, 4), np.uint8)
    layer[2:6, 10:20] = 255
    canvas = {"background": upload_png(fake_app, np.dstack([image, np.full((24, 32), 255, np.uint8)])),
              "layers": [upload_png(fake_app, layer)], "composite": None}
    base = {"Prompt": "with an image", "Random": False, "Seed": "5", "fr-uov-image": uploaded,
            "fr-uov-method": "Vary (Subtle)", "fr-ip-image-1": uploaded, "fr-inpaint-canvas": canvas,
            "fr-outpaint": ["Left"]}
    for owner, values in (("off", {**base, "fr-input-image-checkbox": False}),
                          ("uov", {**base, "fr-input-image-checkbox": True, "fr-input-image-tab": "uov"}),
                          ("ip", {**base, "fr-input-image-checkbox": True, "fr-input-image-tab": "ip"}),
                          ("inpaint", {**base, "fr-input-image-checkbox": True, "fr-input-image-tab": "inpaint"})):
        final = page_event(fake_app, "generate_button", owner, values)[-1]
        assert final["msg"] == "process_completed" and final["success"], final
    off, uov, ip, inpaint = fake_app.pipeline.requests
    decode = lambda text: np.asarray(Image.open(io.BytesIO(base64.b64decode(text))))  # noqa: E731
    input_fields = {"input_image", "uov_method", "inpaint_mask", "outpaint_selections", "inpaint_strength",
                    "inpaint_respective_field", "image_prompts"}
    assert not input_fields & set(off) and off["prompt"] == "with an image"
    assert {k for k in uov if k in input_fields} == {"input_image", "uov_method"}
    assert uov["uov_method"] == "Vary (Subtle)" and (decode(uov["input_image"]) == image).all()
    assert {k for k in ip if k in input_fields} == {"image_prompts"}
    assert len(ip["image_prompts"]) == 1 and ip["image_prompts"][0][1:] == [0.5, 0.6, "ImagePrompt"]
    assert (decode(ip["image_prompts"][0][0]) == image).all()
    assert {k for k in inpaint if k in input_fields} == {"input_image", "inpaint_mask", "outpaint_selections",
                                                         "inpaint_strength", "inpaint_respective_field"}
    assert (decode(inpaint["input_image"]) == image).all() and inpaint["outpaint_selections"] == ["Left"]
    assert (decode(inpaint["inpaint_mask"]) == np.where(layer[:, :, 3] > 0, 255, 0)).all()
    assert (inpaint["inpaint_strength"], inpaint["inpaint_respective_field"]) == (1.0, 0.618)


def test_the_inpaint_method_presets_the_options_and_the_additional_prompt_goes_first(fake_app: FakeApp) -> None:
    """"Improve Detail" (upstream's): no inpaint patch, strength 0.5, respective field 0, the
    outpaint directions cleared and hidden; the additional prompt becomes the prompt's first line."""
    image = np.random.default_rng(2).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    layer = np.zeros((24, 32, 4), np.uint8)
    layer[2:6, 10:20] = 255
    updates = page_call(fake_app, "fr-inpaint-method", "erin",
                        {"fr-inpaint-method": "Improve Detail (face, hand, eyes, etc.)"})
    prompt_box, outpaint, no_initial_latent, engine, strength, respective = updates
    assert prompt_box["visible"] is True and outpaint == {"__type__": "update", "visible": False, "value": []}
    assert (no_initial_latent["value"], engine["value"], strength["value"], respective["value"]) == (
        False, "None", 0.5, 0.0)
    canvas = {"background": upload_png(fake_app, np.dstack([image, np.full((24, 32), 255, np.uint8)])),
              "layers": [upload_png(fake_app, layer)], "composite": None}
    values = {"Prompt": "a portrait", "Random": False, "Seed": "5", "fr-input-image-checkbox": True,
              "fr-input-image-tab": "inpaint", "fr-inpaint-canvas": canvas,
              "fr-inpaint-additional-prompt": "detailed eyes", "fr-inpaint-engine": engine["value"],
              "fr-inpaint-strength": strength["value"], "fr-inpaint-respective-field": respective["value"]}
    final = page_event(fake_app, "generate_button", "erin", values)[-1]
    assert final["msg"] == "process_completed" and final["success"], final
    request = fake_app.pipeline.requests[-1]
    assert request["prompt"] == "detailed eyes\na portrait" and request["inpaint_engine"] == "None"
    assert (request["inpaint_strength"], request["inpaint_respective_field"]) == (0.5, 0.0)
    modify = page_call(fake_app, "fr-inpaint-method", "erin",
                       {"fr-inpaint-method": "Modify Content (add objects, change background, etc.)"})
    assert (modify[2]["value"], modify[3]["value"], modify[4]["value"], modify[5]["value"]) == (True, "v2.6", 1.0, 0.0)
    default = page_call(fake_app, "fr-inpaint-method", "erin", {"fr-inpaint-method": "Inpaint or Outpaint (default)"})
    assert default[0] == {"__type__": "update", "visible": False, "value": ""}   # the additional prompt cleared
    assert (default[1]["visible"], default[5]["value"]) == (True, 0.618)


def test_page_sends_pyracanny_and_cpds_with_the_control_tab_options(fake_app: FakeApp) -> None:
    """The Type radio offers the ControlNet types; the Control tab's options (upstream's
    labels) go with them; "Mixing Image Prompt and Vary/Upscale" sends the other tab's image."""
    image = np.random.default_rng(1).integers(0, 256, (24, 32, 3), dtype=np.uint8)
    uploaded = upload_png(fake_app, image)
    values = {"Prompt": "controlled", "Random": False, "Seed": "5", "fr-input-image-checkbox": True,
              "fr-input-image-tab": "ip", "fr-ip-image-0": uploaded, "fr-ip-type-0": "PyraCanny",
              "fr-ip-stop-0": 0.5, "fr-ip-weight-0": 1.0, "fr-ip-image-2": uploaded, "fr-ip-type-2": "CPDS",
              "fr-uov-image": uploaded, "fr-uov-method": "Vary (Subtle)", "Mixing Image Prompt and Vary/Upscale": True,
              "Softness of ControlNet": 0.5, "Canny Low Threshold": 32, "Canny High Threshold": 96}
    final = page_event(fake_app, "generate_button", "carol", values)[-1]
    assert final["msg"] == "process_completed" and final["success"], final
    request = fake_app.pipeline.requests[-1]
    assert [p[1:] for p in request["image_prompts"]] == [[0.5, 1.0, "PyraCanny"], [0.5, 0.6, "CPDS"]]
    assert request["uov_method"] == "Vary (Subtle)" and "input_image" in request
    assert (request["controlnet_softness"], request["canny_low_threshold"], request["canny_high_threshold"]) == (
        0.5, 32, 96)
    radio = next(c for c in _components(fake_app.app).values() if c["props"].get("elem_id") == "fr-ip-type-0")
    assert [choice[0] for choice in radio["props"]["choices"]] == ["ImagePrompt", "PyraCanny", "CPDS"]
    stop, weight = page_call(fake_app, "fr-ip-type-1", "carol", {"fr-ip-type-1": "CPDS"})   # its defaults
    assert (stop["value"], weight["value"]) == (0.5, 1.0)


def test_page_sends_the_developer_debug_controls(fake_app: FakeApp) -> None:
    """Changed Debug Tools / FreeU / Inpaint values go into the request under upstream's names;
    the inpaint ones only with an inpaint (here: none), so this stays a text-to-image request."""
    values = {**PAGE_VALUES, "fr-clip-skip": 1, "fr-adaptive-cfg": 5.0, "fr-overwrite-step": 12,
              "fr-refiner-swap-method": "separate", "fr-disable-seed-increment": True, "fr-metadata-scheme": "a1111",
              "fr-freeu-enabled": True, "fr-freeu-s2": 0.5, "fr-inpaint-engine": "v1", "fr-invert-mask": True}
    final = page_event(fake_app, "generate_button", "dora", values)[-1]
    assert final["msg"] == "process_completed" and final["success"], final
    request = fake_app.pipeline.requests[-1]
    debug = {k: request[k] for k in request.keys() - {"prompt", "negative_prompt", "performance", "width", "height",
                                                      "image_number", "seed", "refiner_model", "refiner_switch",
                                                      "loras", "sampler", "scheduler", "guidance_scale", "vae",
                                                      *T2I_DEFAULTS}}
    assert debug == {"clip_skip": 1, "adaptive_cfg": 5.0, "steps": 12, "refiner_swap_method": "separate",
                     "disable_seed_increment": True, "metadata_scheme": "a1111", "freeu_enabled": True,
                     "freeu_b1": 1.01, "freeu_b2": 1.02, "freeu_s1": 0.99, "freeu_s2": 0.5}


def test_a_distilled_mode_freezes_the_debug_controls_it_ignores(fake_app: FakeApp) -> None:
    index, dep = _event(fake_app.app, "fr-performance")
    components = _components(fake_app.app)
    names = [components[i]["props"].get("elem_id") for i in dep["outputs"]]
    for performance, interactive in (("Lightning", False), ("Speed", True)):
        updates = dict(zip(names, page_call(fake_app, "fr-performance", "fay", {"fr-performance": performance})))
        assert updates["fr-adaptive-cfg"]["interactive"] is interactive, performance
        assert updates["fr-refiner-swap-method"]["interactive"] is interactive, performance


def test_the_image_prompt_advanced_box_resets_the_slots_options(fake_app: FakeApp) -> None:
    """Upstream's: ticking or unticking it puts every slot back to ImagePrompt at its Stop At / Weight."""
    index, dep = _event(fake_app.app, "fr-ip-advanced")
    components = _components(fake_app.app)
    names = [components[i]["props"].get("elem_id") for i in dep["outputs"]]
    updates = dict(zip(names, page_call(fake_app, "fr-ip-advanced", "gus", {"fr-ip-advanced": False})))
    assert [updates[f"fr-ip-type-{i}"] for i in range(4)] == ["ImagePrompt"] * 4
    assert [(updates[f"fr-ip-stop-{i}"], updates[f"fr-ip-weight-{i}"]) for i in range(4)] == [(0.5, 0.6)] * 4
    assert updates["fr-ip-advanced-0"]["visible"] is False


def test_the_debug_tabs_show_with_the_developer_debug_box(fake_app: FakeApp) -> None:
    [shown] = page_call(fake_app, "fr-debug-mode", "dora", {"fr-debug-mode": True})
    assert shown["visible"] is True
    column = next(c for c in _components(fake_app.app).values() if c["props"].get("elem_id") == "fr-debug-column")
    assert column["props"]["visible"] is False   # hidden on a fresh page


def test_made_up_page_tokens_share_their_clients_queue_cap(tmp_path: Path) -> None:
    """A page's owner token is whatever its browser sends: new tokens from one address still
    count against that address's max_queue_per_client."""
    import httpx

    fake = start_fake_app(tmp_path, settings={"max_queue_per_client": "1"})
    try:
        blocker = fake.worker.submit({"prompt": "hold the worker", "block": True}, owner="server")
        assert fake.pipeline.started.wait(TIMEOUT)
        index, dep = _event(fake.app, "generate_button")
        body = {"data": _inputs(fake.app, dep, PAGE_VALUES, "token-1"), "fn_index": index,
                "session_hash": "s-token-1", "event_data": None, "trigger_id": dep["targets"][0][0]}
        assert httpx.post(fake.url + "gradio_api/queue/join", timeout=TIMEOUT, json=body).status_code == 200
        wait_until(lambda: fake.worker.pending() == 1, "the first page task queued")
        answers: list = []
        second = threading.Thread(target=lambda: answers.append(
            page_event(fake, "generate_button", "token-2", PAGE_VALUES)[-1]))
        second.start()
        # Refused at once, or (the bug) queued behind the first: either ends the wait.
        wait_until(lambda: answers or fake.worker.pending() >= 2, "the second page task answered or queued")
        fake.pipeline.gate.set()
        second.join(TIMEOUT)
        assert answers and "max_queue_per_client" in json.dumps(answers[0]), answers
        assert blocker.result(TIMEOUT).report is not None
    finally:
        fake.pipeline.gate.set()
        fake.app.close()  # type: ignore[attr-defined]
        fake.worker.shutdown(TIMEOUT)


def test_a_foreign_page_stop_leaves_the_job_alone(fake_app: FakeApp) -> None:
    # "block" is not a page control: submit the blocking job for alice's page through the worker.
    task = fake_app.worker.submit({"prompt": "mine", "block": True}, owner=webui.page_owner(None, "alice"))
    assert fake_app.pipeline.started.wait(TIMEOUT)
    page_call(fake_app, "stop_button", "mallory")
    page_call(fake_app, "skip_button", "mallory")
    assert not task.control.stop.is_set() and not task.control.skip.is_set()
    page_call(fake_app, "stop_button", "alice")
    assert task.result(TIMEOUT).report == {"stopped": True}


def test_a_page_stop_cannot_reach_an_api_job(fake_app: FakeApp, tmp_path: Path) -> None:
    client = make_client(fake_app.url, tmp_path / "dl")
    job = client.submit({"prompt": "api job", "block": True}, api_name="/generate")
    assert fake_app.pipeline.started.wait(TIMEOUT)
    running = fake_app.worker.current
    assert running is not None and running.owner == webui.api_owner("ip:127.0.0.1")
    page_call(fake_app, "stop_button", client.session_hash)   # the API client's own session hash
    page_call(fake_app, "stop_button", "")
    assert not running.control.stop.is_set()
    fake_app.pipeline.gate.set()
    assert job.result(TIMEOUT)[1]["n"] == 1


def test_page_has_the_controls_and_the_demo_banner(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    (ckpt / "sub").mkdir(parents=True)
    (ckpt / "sub" / "model.safetensors").write_bytes(b"x")
    (tmp_path / "loras").mkdir()
    (tmp_path / "loras" / "style.safetensors").write_bytes(b"x")
    cfg = config_module.load_config({"config_path": str(tmp_path / "no_config.json"),
                                     "path_checkpoints": str(ckpt), "path_loras": str(tmp_path / "loras")})
    app = webui.build_app(worker=Worker(handler=FakePipeline(tmp_path)), cfg=cfg,
                          demo_warning=lambda: "random demo weights", model_status=dict)
    props = [c.get("props", {}) for c in app.config["components"]]
    by_label = {p.get("label"): p for p in props if p.get("label")}
    assert by_label["Base Model (SDXL only)"]["value"] == "sub/model.safetensors"
    assert [c[0] for c in by_label["Performance"]["choices"]] == flags.Performance.values()
    assert ["None", "None"] in by_label["Refiner"]["choices"] or ("None", "None") in by_label["Refiner"]["choices"]
    assert by_label["Refiner Switch At"]["visible"] is False   # no refiner chosen
    assert ["1152×896 | 9:7", "1152*896"] in [list(c) for c in by_label["Aspect Ratios"]["choices"]]
    lora_dropdowns = [p for p in props if str(p.get("label", "")).startswith("LoRA ")]
    assert len(lora_dropdowns) == 5   # upstream's default_max_lora_number
    assert all(any(c[0] == "style.safetensors" for c in p["choices"]) for p in lora_dropdowns)
    weights = [p for p in props if "fr-lora-weight" in (p.get("elem_classes") or [])]
    assert len(weights) == 5
    assert all((p["minimum"], p["maximum"]) == (-2.0, 2.0) for p in weights)   # default_loras_min/max_weight
    banners = [p for p in props if "random demo weights" in str(p.get("value", ""))]
    assert len(banners) == 1 and banners[0]["visible"] is True
    for label in ("Prompt", "Negative prompt", "Image Number", "Sampler", "Scheduler", "Seed", "Random",
                  "Guidance Scale", "Images", "Report", "Output Format", "Advanced"):
        assert label in by_label, label
    assert by_label["Seed"]["visible"] is False and by_label["Random"]["value"] is True
    buttons = {p.get("value"): p for p in props if p.get("elem_id") in ("stop_button", "skip_button")}
    assert set(buttons) == {"Stop", "Skip"} and not any(b["visible"] for b in buttons.values())


def test_no_banner_without_demo_model(tmp_path: Path) -> None:
    cfg = config_module.load_config({"config_path": str(tmp_path / "no_config.json"),
                                     "path_checkpoints": str(tmp_path / "ckpt")})
    app = webui.build_app(worker=Worker(handler=FakePipeline(tmp_path)), cfg=cfg,
                          demo_warning=lambda: None, model_status=dict)
    banner = next(c["props"] for c in app.config["components"] if c["props"].get("elem_id") == "demo-banner")
    assert banner["visible"] is False


def test_auth_puts_a_login_in_front_of_the_api(tmp_path: Path) -> None:
    import httpx

    fake = start_fake_app(tmp_path, auth=[("ann", "secret")])
    try:
        assert httpx.get(fake.url + "config", timeout=TIMEOUT).status_code == 401
        with pytest.raises(Exception):
            make_client(fake.url, tmp_path / "dl")
        from gradio_client import Client
        client = Client(fake.url, auth=("ann", "secret"), verbose=False, download_files=str(tmp_path / "dl"),
                        analytics_enabled=False)
        assert client.predict({"prompt": "a cat"}, api_name="/generate")[1]["n"] == 1
    finally:
        fake.app.close()  # type: ignore[attr-defined]
        fake.worker.shutdown(TIMEOUT)


def test_uploads_over_the_limit_are_refused(tmp_path: Path) -> None:
    import httpx

    fake = start_fake_app(tmp_path, max_file_size=1024)
    try:
        small = httpx.post(fake.url + "gradio_api/upload", timeout=TIMEOUT,
                           files={"files": ("a.bin", b"x" * 100)})
        big = httpx.post(fake.url + "gradio_api/upload", timeout=TIMEOUT,
                         files={"files": ("b.bin", b"x" * 4096)})
        assert small.status_code == 200, small.text
        assert big.status_code == 413, big.text
    finally:
        fake.app.close()  # type: ignore[attr-defined]
        fake.worker.shutdown(TIMEOUT)


async def _collect(updates: object, until: Callable[[tuple], bool] | None = None,
                   on_match: Callable[[], None] | None = None) -> list[tuple]:
    seen = []
    async for update in updates:  # type: ignore[attr-defined]
        seen.append(update)
        if until is not None and on_match is not None and until(update):
            on_match()
    return seen


def test_follow_task_streams_progress_preview_and_images_then_the_result(tmp_path: Path) -> None:
    import asyncio

    import numpy as np

    @dataclass
    class Event:
        image_index: int
        image_count: int
        step: int
        steps: int
        message: str
        stage: str = "sampling"
        preview: object = None
        image: str | None = None

    gate = threading.Event()

    def handler(request: dict, control: TaskControl, progress: Callable) -> FakeResult:
        progress(Event(0, 2, 1, 2, "Sampling image 1/2, step 1/2", preview=np.zeros((4, 4, 3), np.uint8)))
        progress(Event(0, 2, 2, 2, "Saved image 1/2", stage="saving", image="/first.png"))
        gate.wait(TIMEOUT)
        return FakeResult(["/first.png", "/second.png"], {"mode": "conservative", "seed": 2 ** 62 + 1})

    worker = Worker(handler=handler)
    try:
        task = worker.submit({"prompt": "a"})
        seen = asyncio.run(_collect(webui.follow_task(task, worker, demo_warning=lambda: None),
                                    until=lambda u: "Saved image 1/2" in u[0], on_match=gate.set))
        assert any("fr-preview" in u[0] and "data:image/png;base64," in u[0] for u in seen) or \
            task.progress.version >= 2   # the preview may be folded into a later update
        assert any(u[1] == ["/first.png"] for u in seen)   # a finished image shows before the end
        final = seen[-1]
        assert final[1] == ["/first.png", "/second.png"]
        assert final[2] == {"mode": "conservative", "seed": str(2 ** 62 + 1)}
        assert final[7] == str(2 ** 62 + 1)   # the seed written back, exact
        assert final[3]["visible"] is False and final[4]["visible"] is True and final[5]["visible"] is False
        assert 'value="100.0"' in final[0]
    finally:
        gate.set()
        worker.shutdown(TIMEOUT)


def test_progress_looks_different_for_errors_and_stops() -> None:
    from modules.async_worker import TaskProgress

    styles = {stage: webui.progress_html(TaskProgress(percent=40, text=stage, stage=stage))
              for stage in ("sampling", "error", "stopped", "finished")}
    assert 'class="fr-progress fr-stage-error"' in styles["error"]
    assert 'class="fr-progress fr-stage-stopped"' in styles["stopped"]
    assert len(set(styles.values())) == 4


def test_closing_follow_task_stops_the_task_when_nobody_may_reconnect(tmp_path: Path) -> None:
    import asyncio

    seen_stop = threading.Event()
    started = threading.Event()

    def handler(request: dict, control: TaskControl, progress: Callable) -> FakeResult:
        started.set()
        if control.stop.wait(TIMEOUT):
            seen_stop.set()
        return FakeResult([], {"stopped": True})

    worker = Worker(handler=handler)

    async def open_then_close() -> None:
        updates = webui.follow_task(task, worker, demo_warning=lambda: None)   # no followers: grace 0
        await updates.__anext__()
        assert started.wait(TIMEOUT)
        await updates.aclose()  # what Gradio does when the page goes away

    try:
        task = worker.submit({"prompt": "a"})
        asyncio.run(open_then_close())
        assert seen_stop.wait(TIMEOUT)
        assert task.result(TIMEOUT).report == {"stopped": True}
    finally:
        worker.shutdown(TIMEOUT)


def test_a_page_that_comes_back_keeps_its_task(tmp_path: Path) -> None:
    gate = threading.Event()
    worker = Worker(handler=lambda request, control, progress: (gate.wait(TIMEOUT), FakeResult([], {}))[1])
    followers = webui.Followers(lambda: worker, grace_s=3600)   # the timer never fires in this test
    try:
        task = worker.submit({"prompt": "a"}, owner=webui.page_owner(None, "alice"))
        followers.attach(task)
        followers.detach(task)          # the page reloads...
        followers.attach(task)          # ...and its new page follows the same task
        followers._stop_if_orphan(task)   # the grace period ends
        assert not task.control.stop.is_set()
        followers.detach(task)          # the page goes away for good
        followers._stop_if_orphan(task)
        assert task.control.stop.is_set()
    finally:
        gate.set()
        worker.shutdown(TIMEOUT)


# -- launch.py end to end (demo checkpoint, real pipeline) ---------------------------------

@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log_path: Path
    checkpoints: Path
    outputs: Path
    loras: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    if not (REPO_ROOT / "modules" / "default_pipeline.py").is_file():
        pytest.skip("modules/default_pipeline.py is not there yet")
    root = tmp_path_factory.mktemp("launch")
    paths = {key: root / key.removeprefix("path_")
             for key in ("path_checkpoints", "path_loras", "path_outputs", "path_embeddings", "path_vae")}
    config_file = root / "config.json"
    config_file.write_text(json.dumps({k: str(v) for k, v in paths.items()}))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("path_", "default_"))}
    env.update(config_path=str(config_file), HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False",
               PYTHONUNBUFFERED="1")
    log_path = root / "server.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, str(REPO_ROOT / "launch.py"), "--listen", "127.0.0.1", "--port", str(port),
             "--disable-preset-download", "--disable-in-browser"],
            cwd=root, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    srv = Server(f"http://127.0.0.1:{port}/", process, log_path, paths["path_checkpoints"], paths["path_outputs"],
                 paths["path_loras"])
    try:
        try:
            wait_for_http(srv.url, SERVER_START_TIMEOUT_S, alive=lambda: process.poll() is None)
        except AssertionError as error:
            raise AssertionError(f"{error}\n--- server log ---\n{srv.log()}") from None
        yield srv
    finally:
        process.terminate()
        try:
            process.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(TIMEOUT)


def test_launch_creates_the_demo_checkpoint_and_warns(server: Server) -> None:
    assert (server.checkpoints / "fooocus_resident_demo_random.safetensors").is_file()
    log = server.log()
    assert "WARNING" in log and "NOISE" in log
    assert str(server.checkpoints.resolve()) in log


def test_launch_serves_generate_end_to_end(server: Server, tmp_path: Path) -> None:
    client = make_client(server.url, tmp_path / "dl")
    gallery, report = client.predict({"prompt": "a cat", "steps": 2, "width": 64, "height": 64},
                                     api_name="/generate")
    assert "error" not in report, report
    check_report_fields(report)
    assert report["mode"] == "conservative"
    assert len(gallery) == 1
    for path in gallery:
        assert Path(path).is_file()
        with Image.open(path) as image:
            assert image.format == "PNG" and image.size == (64, 64)
    # The server wrote its own copy under path_outputs.
    assert list(server.outputs.rglob("*.png"))

    status = client.predict(api_name="/model_status")
    assert isinstance(status, dict) and status

    gallery, report = client.predict({"prompt": "a cat", "base_model": "does_not_exist.safetensors"},
                                     api_name="/generate")
    assert not gallery
    assert isinstance(report["error"], str) and "does_not_exist.safetensors" in report["error"]

    gallery, report = client.predict({"prompt": "a dog", "steps": 2, "width": 64, "height": 64, "seed": 5},
                                     api_name="/generate")
    assert "error" not in report, report
    assert report["seed"] == 5 and len(gallery) == 1 and Path(gallery[0]).is_file()
    assert server.process.poll() is None


@pytest.mark.parametrize("performance", ["Quality", "Speed", "Extreme Speed", "Lightning", "Hyper-SD"])
def test_every_performance_mode_through_the_api(server: Server, tmp_path: Path, performance: str) -> None:
    from ldm_patched.modules.demo_model import build_tiny_sdxl
    from tests.helpers.lora_files import kohya_lora

    # LoRA files under the names Fooocus expects, shaped for the demo checkpoint (seed 0).
    for name in ("sdxl_lcm_lora.safetensors", "sdxl_lightning_4step_lora.safetensors",
                 "sdxl_hyper_sd_4step_lora.safetensors"):
        if not (server.loras / name).exists():
            kohya_lora(build_tiny_sdxl(seed=0), server.loras / name)
    client = make_client(server.url, tmp_path / "dl")
    steps = {"Quality": 2, "Speed": 2}.get(performance)
    request = {"prompt": "a cat", "performance": performance, "width": 64, "height": 64,
               **({"steps": steps} if steps else {})}
    gallery, report = client.predict(request, api_name="/generate")
    assert "error" not in report, report
    assert len(gallery) == 1 and report["performance"] == performance
    expected = {"Extreme Speed": ("lcm", 8, "sdxl_lcm_lora.safetensors"),
                "Lightning": ("euler", 4, "sdxl_lightning_4step_lora.safetensors"),
                "Hyper-SD": ("dpmpp_sde_gpu", 4, "sdxl_hyper_sd_4step_lora.safetensors")}.get(performance)
    if expected:
        assert (report["sampler"], report["steps"], report["loras"][-1]["file"]) == expected
        assert report["cfg"] == 1.0 and report["loras"][-1]["matched_keys"] > 0


def test_base_and_refiner_through_the_api(server: Server, tmp_path: Path) -> None:
    from ldm_patched.modules.demo_model import write_demo_checkpoint

    refiner = server.checkpoints / "demo_refiner.safetensors"
    if not refiner.exists():
        write_demo_checkpoint(refiner, seed=1, refiner=True)
    client = make_client(server.url, tmp_path / "dl")
    request = {"prompt": "a cat", "steps": 4, "width": 64, "height": 64, "seed": 3,
               "base_model": "fooocus_resident_demo_random.safetensors"}
    _, alone = client.predict(request, api_name="/generate")
    gallery, report = client.predict({**request, "refiner_model": "demo_refiner.safetensors",
                                      "refiner_switch": 0.5}, api_name="/generate")
    assert "error" not in report, report
    assert report["refiner_model"] == "demo_refiner.safetensors" and len(gallery) == 1
    # The refiner's UNet and encoders were loaded in addition to the base's.
    assert report["model_management"]["models_loaded"] > alone["model_management"]["models_loaded"]


def test_free_memory_and_model_status_through_the_client_during_a_request(server: Server, tmp_path: Path) -> None:
    """Freeing while a request runs waits for it and never corrupts it: the request's
    pixels equal those of the same request run alone, and the registry ends up empty."""
    client = make_client(server.url, tmp_path / "dl")
    request = {"prompt": "a tree", "steps": 3, "width": 64, "height": 64, "seed": 21, "image_number": 2,
               "base_model": "fooocus_resident_demo_random.safetensors"}   # other tests add checkpoints
    first_gallery, first = client.predict(request, api_name="/generate")
    assert "error" not in first, first
    alone = [np.asarray(Image.open(p).convert("RGB")) for p in first_gallery]

    job = client.submit(request, api_name="/generate")
    other = make_client(server.url, tmp_path / "dl2")
    status = other.predict(api_name="/model_status")
    assert isinstance(status.get("models"), list) and "weights patched" in status["last_request"]
    freed = other.predict(api_name="/free_memory")
    gallery, report = job.result(timeout=SERVER_START_TIMEOUT_S)
    assert "error" not in report, report
    assert len(report["images"]) == len(gallery) == 2
    for path, expected in zip(gallery, alone):
        assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), expected)
    assert isinstance(freed["freed_bytes"], int) and isinstance(freed["unloaded"], list)
    assert other.predict(api_name="/free_memory")["status"]["models"] == []
    assert other.predict(api_name="/model_status")["models"] == []
