"""The web UI and its API: request building, the endpoints, and launch.py end to end."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from PIL import Image

from modules import config as config_module
from modules import flags, webui
from modules.async_worker import TaskControl, Worker

REPO_ROOT = Path(__file__).resolve().parent.parent
SERVER_START_TIMEOUT_S = 120.0
TIMEOUT = 10.0

REPORT_FIELDS = {
    "timings_ms": {"total", "model_management", "text_encode", "sampling", "vae_decode"},
    "model_management": {"bytes_to_device", "bytes_to_offload", "models_loaded", "models_unloaded",
                         "weights_patched", "weights_restored", "lora_files_read"},
    "vram": {"budget_bytes", "resident_bytes", "peak_allocated_bytes"},
}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    }
    json.dumps(request)  # must be JSON-able, it is the API payload


def test_ui_request_without_base_model_leaves_the_choice_to_the_pipeline() -> None:
    assert "base_model" not in ui_values(base_model=None).to_request()


# -- the app with a fake worker: endpoints and page wiring ----------------------------------

@dataclass
class FakeResult:
    images: list[str]
    report: dict


@dataclass
class FakePipeline:
    image_dir: Path
    requests: list[dict] = field(default_factory=list)
    gate: threading.Event = field(default_factory=threading.Event)
    started: threading.Event = field(default_factory=threading.Event)

    def __call__(self, request: dict, control: TaskControl, progress: Callable | None) -> FakeResult:
        self.requests.append(request)
        if request.get("block"):
            self.started.set()
            self.gate.wait(TIMEOUT)
        if request.get("prompt") == "fail":
            return FakeResult([], {"error": "fake failure"})
        path = self.image_dir / f"img{len(self.requests)}.png"
        Image.new("RGB", (16, 8), (255, 0, 0)).save(path)
        return FakeResult([str(path)], {"mode": "conservative", "n": len(self.requests)})


@dataclass
class FakeApp:
    url: str
    pipeline: FakePipeline
    app: object  # gr.Blocks

    def __iter__(self) -> Iterator[object]:  # `url, pipeline = fake_app`
        return iter((self.url, self.pipeline))


@pytest.fixture
def fake_app(tmp_path: Path) -> Iterator[FakeApp]:
    pipeline = FakePipeline(tmp_path)
    worker = Worker(handler=pipeline)
    cfg = config_module.load_config({"config_path": str(tmp_path / "no_config.json"),
                                     "path_checkpoints": str(tmp_path / "ckpt"),
                                     "path_loras": str(tmp_path / "loras"),
                                     "path_outputs": str(tmp_path / "out")})
    app = webui.build_app(worker=worker, cfg=cfg, demo_warning=lambda: "demo weights in use",
                          model_status=lambda: {"models": [], "mode": "conservative"})
    port = free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield FakeApp(f"http://127.0.0.1:{port}/", pipeline, app)
    finally:
        pipeline.gate.set()
        app.close()
        worker.shutdown(TIMEOUT)


def test_api_lists_exactly_generate_and_model_status(fake_app: FakeApp, tmp_path: Path) -> None:
    url, _ = fake_app
    info = make_client(url, tmp_path / "dl").view_api(return_format="dict", print_info=False)
    assert set(info["named_endpoints"]) == {"/generate", "/model_status"}  # page events are private
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
    assert client.predict(api_name="/model_status") == {"models": [], "mode": "conservative"}


def test_generate_rejects_a_non_object(fake_app: FakeApp, tmp_path: Path) -> None:
    url, pipeline = fake_app
    gallery, report = make_client(url, tmp_path / "dl").predict(["not", "a", "dict"], api_name="/generate")
    assert not gallery and "JSON object" in report["error"]
    assert pipeline.requests == []


def test_page_generate_event_submits_the_request_built_from_the_controls(fake_app: FakeApp) -> None:
    """Drive the page's Generate event the way the browser does (queue join + SSE stream)."""
    import httpx

    config = fake_app.app.config  # type: ignore[attr-defined]
    components = {c["id"]: c for c in config["components"]}
    index, dep = next((i, d) for i, d in enumerate(config["dependencies"])
                      if any(components[t[0]]["props"].get("value") == "Generate" for t in d["targets"]))
    data = []
    for cid in dep["inputs"]:
        props = components[cid]["props"]
        data.append({"Prompt": "from the page", "Aspect ratio": "896*1152",
                     "Seed (-1: random)": 11}.get(props.get("label"), props.get("value")))
    session = "test-session"
    joined = httpx.post(fake_app.url + "gradio_api/queue/join", timeout=TIMEOUT,
                        json={"data": data, "fn_index": index, "session_hash": session,
                              "event_data": None, "trigger_id": dep["targets"][0][0]})
    assert joined.status_code == 200, joined.text
    messages = []
    with httpx.stream("GET", fake_app.url + f"gradio_api/queue/data?session_hash={session}",
                      timeout=TIMEOUT) as stream:
        for line in stream.iter_lines():
            if line.startswith("data:"):
                messages.append(json.loads(line[5:]))
                if messages[-1].get("msg") == "process_completed":
                    break
    final = messages[-1]
    assert final["msg"] == "process_completed" and final["success"], final
    assert fake_app.pipeline.requests == [{
        "prompt": "from the page", "negative_prompt": "", "performance": "Speed", "width": 896, "height": 1152,
        "image_number": 2, "seed": 11, "refiner_model": "None", "refiner_switch": 0.8, "loras": [],
        "sampler": flags.DEFAULT_SAMPLER, "scheduler": flags.DEFAULT_SCHEDULER, "guidance_scale": 4.0,
        "vae": flags.DEFAULT_VAE,
    }]
    progress_html, gallery, report = final["output"]["data"][:3]
    assert "Finished" in progress_html
    assert len(gallery) == 1 and report == {"mode": "conservative", "n": 1}


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
    assert by_label["Base model"]["value"] == "sub/model.safetensors"
    assert [c[0] for c in by_label["Performance"]["choices"]] == flags.Performance.values()
    assert ["None", "None"] in by_label["Refiner"]["choices"] or ("None", "None") in by_label["Refiner"]["choices"]
    lora_dropdowns = [p for p in props if p.get("label") == "File"]
    assert len(lora_dropdowns) == webui.LORA_SLOTS
    assert all(any(c[0] == "style.safetensors" for c in p["choices"]) for p in lora_dropdowns)
    weights = [p for p in props if p.get("label") == "Weight"]
    assert all((p["minimum"], p["maximum"]) == webui.LORA_WEIGHT_RANGE for p in weights)
    banners = [p for p in props if "random demo weights" in str(p.get("value", ""))]
    assert len(banners) == 1 and banners[0]["visible"] is True
    for label in ("Prompt", "Negative prompt", "Aspect ratio", "Image number", "Sampler", "Scheduler",
                  "Guidance scale", "Refiner switch at", "Images", "Report"):
        assert label in by_label, label


def test_no_banner_without_demo_model(tmp_path: Path) -> None:
    cfg = config_module.load_config({"config_path": str(tmp_path / "no_config.json"),
                                     "path_checkpoints": str(tmp_path / "ckpt")})
    app = webui.build_app(worker=Worker(handler=FakePipeline(tmp_path)), cfg=cfg,
                          demo_warning=lambda: None, model_status=dict)
    banner = next(c["props"] for c in app.config["components"] if c["props"].get("elem_id") == "demo-banner")
    assert banner["visible"] is False


def test_follow_task_streams_progress_then_the_result(tmp_path: Path) -> None:
    @dataclass
    class Event:
        image_index: int
        image_count: int
        step: int
        steps: int
        message: str

    gate, reported = threading.Event(), threading.Event()

    def handler(request: dict, control: TaskControl, progress: Callable) -> FakeResult:
        progress(Event(0, 1, 1, 2, "step 1 of 2"))
        reported.set()
        gate.wait(TIMEOUT)
        return FakeResult(["/x.png"], {"mode": "conservative"})

    worker = Worker(handler=handler)
    try:
        task = worker.submit({"prompt": "a"})
        updates = webui.follow_task(task, worker, demo_warning=lambda: None)
        assert reported.wait(TIMEOUT)
        seen: list[tuple] = []
        for update in updates:
            seen.append(update)
            if "step 1 of 2" in update[0]:
                gate.set()  # let it finish once the page has shown the step
        assert any("step 1 of 2" in u[0] and 'value="50.0"' in u[0] for u in seen)
        final = seen[-1]
        assert final[1] == ["/x.png"] and final[2] == {"mode": "conservative"}
        assert final[3]["visible"] is False
        assert 'value="100.0"' in final[0]
    finally:
        gate.set()
        worker.shutdown(TIMEOUT)


def test_closing_follow_task_stops_the_task(tmp_path: Path) -> None:
    seen_stop = threading.Event()
    started = threading.Event()

    def handler(request: dict, control: TaskControl, progress: Callable) -> FakeResult:
        started.set()
        if control.stop.wait(TIMEOUT):
            seen_stop.set()
        return FakeResult([], {"stopped": True})

    worker = Worker(handler=handler)
    try:
        task = worker.submit({"prompt": "a"})
        updates = webui.follow_task(task, worker, demo_warning=lambda: None)
        next(updates)
        assert started.wait(TIMEOUT)
        updates.close()  # what Gradio does when the page goes away
        assert seen_stop.wait(TIMEOUT)
        assert task.result(TIMEOUT).report == {"stopped": True}
    finally:
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
    from tests.test_lora import kohya_lora

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
