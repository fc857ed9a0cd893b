"""The REST APIs through launch.py, driven by the clients their users run: webuiapi for
/sdapi/v1, openai for /v1/images, httpx for Fooocus-API, gradio_client for /generate.

One server for the whole module (tiny demo checkpoints, 64x64, 2 steps, resident policy),
with two API keys, one login and a webhook allow-list, so that callers can be told apart."""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.helpers.webui import free_port, wait_until

REPO_ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 300.0
RUN_TIMEOUT_S = 300.0
CKPT, OTHER = "served.safetensors", "other.safetensors"
ALPHA, BETA = "alpha-key", "beta-key"
LOGIN = ("ann", "secret-pw")
SMALL = {"prompt": "a cat", "base_model": CKPT, "width": 64, "height": 64, "seed": 3, "steps": 2}
FOOOCUS_SMALL = {"prompt": "a cat", "base_model_name": CKPT, "aspect_ratios_selection": "64*64", "image_seed": 3,
                 "advanced_params": {"overwrite_step": 2}}
LONG = {"image_number": 32, "advanced_params": {"overwrite_step": 60}}   # runs long enough to be stopped


@dataclass
class Hook:
    """A webhook receiver: what was posted to it, in order."""

    port: int
    posted: list[dict] = field(default_factory=list)


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log_path: Path
    hook: Hook

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def client(self, key: str | None = ALPHA, **kwargs) -> httpx.Client:
        headers = {"X-API-KEY": key} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=RUN_TIMEOUT_S, **kwargs)


def _hook_server() -> tuple[ThreadingHTTPServer, Hook]:
    hook = Hook(port=free_port())

    class Receiver(BaseHTTPRequestHandler):
        def do_POST(self) -> None:   # noqa: N802 (http.server's name)
            body = self.rfile.read(int(self.headers.get("content-length") or 0))
            hook.posted.append({"path": self.path, "body": json.loads(body or b"{}")})
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args) -> None:
            pass

    return ThreadingHTTPServer(("127.0.0.1", hook.port), Receiver), hook


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    from ldm_patched.modules.demo_model import build_tiny_sdxl, write_demo_checkpoint
    from tests.helpers.input_image_files import IMAGE_INPUT_SIDE
    from tests.helpers.serving import write_unet_lora

    root = tmp_path_factory.mktemp("api")
    paths = {key: root / key.removeprefix("path_") for key in ("path_checkpoints", "path_loras", "path_outputs")}
    for folder in paths.values():
        folder.mkdir()
    write_demo_checkpoint(str(paths["path_checkpoints"] / CKPT), seed=0)
    write_demo_checkpoint(str(paths["path_checkpoints"] / OTHER), seed=1)
    write_unet_lora(build_tiny_sdxl(seed=0)["unet"], paths["path_loras"] / "style.safetensors", seed=1)
    config_file = root / "config.json"
    config_file.write_text(json.dumps({**{k: str(v) for k, v in paths.items()}, "image_input_side": IMAGE_INPUT_SIDE,
                                       **{k: str(root / k) for k in ("path_vae", "path_embeddings", "path_inpaint")}}))
    (root / "cwd").mkdir()
    (root / "tmp").mkdir()
    hook_server, hook = _hook_server()
    threading.Thread(target=hook_server.serve_forever, daemon=True).start()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("path_", "default_", "api_key"))}
    env.update(config_path=str(config_file), HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False",
               PYTHONUNBUFFERED="1", TMPDIR=str(root / "tmp"))
    log_path = root / "server.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, str(REPO_ROOT / "launch.py"), "--listen", "127.0.0.1", "--port", str(port),
             "--disable-preset-download", "--disable-in-browser", "--keep-models-resident", "--disable-image-log",
             "--temp-path", str(root / "temp"), "--api-key", ALPHA, "--api-key", BETA, "--auth", ":".join(LOGIN),
             "--webhook-allow", f"http://127.0.0.1:{hook.port}/hook"],
            cwd=root / "cwd", env=env, stdout=log_file, stderr=subprocess.STDOUT)
    srv = Server(f"http://127.0.0.1:{port}/", process, log_path, hook)

    def up() -> bool:
        try:
            return httpx.get(srv.url + "ping", headers={"X-API-KEY": ALPHA}, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        try:
            wait_until(up, "the server", START_TIMEOUT_S) if process.poll() is None else None
        except AssertionError as error:
            raise AssertionError(f"{error}\n--- server log ---\n{srv.log()}") from None
        yield srv
    finally:
        hook_server.shutdown()
        if process.poll() is None:
            process.kill()
            process.wait(60)


def pixels(data: bytes | str) -> np.ndarray:
    raw = base64.b64decode(data) if isinstance(data, str) else data
    with Image.open(io.BytesIO(raw)) as image:
        return np.asarray(image.convert("RGB"))


def png64(image: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def fooocus(client: httpx.Client, route: str, body: dict) -> httpx.Response:
    return client.post(route, json=body)


def query(client: httpx.Client, job_id: str) -> dict:
    response = client.get("/v1/generation/query-job", params={"job_id": job_id})
    assert response.status_code == 200, response.text
    return response.json()


def finished_job(client: httpx.Client, job_id: str) -> dict:
    wait_until(lambda: query(client, job_id)["job_stage"] in ("SUCCESS", "ERROR"), f"job {job_id}", RUN_TIMEOUT_S)
    return query(client, job_id)


def telemetry(report: dict) -> tuple[int, int]:
    mm = report["model_management"]
    return mm["models_loaded"], mm["weights_patched"]


# -- Fooocus-API (httpx) -----------------------------------------------------------------------

def test_fooocus_api_sync_equals_generate_and_async_repeats_load_nothing(server: Server, tmp_path: Path) -> None:
    from gradio_client import Client

    with server.client() as api:
        answer = fooocus(api, "/v1/generation/text-to-image", {**FOOOCUS_SMALL, "require_base64": True})
        assert answer.status_code == 200, answer.text
        [image] = answer.json()
        assert image["finish_reason"] == "SUCCESS" and image["seed"] == "3"
        gallery, report = Client(server.url, auth=LOGIN, verbose=False, download_files=str(tmp_path),
                                 analytics_enabled=False).predict(dict(SMALL), api_name="/generate")
        assert "error" not in report, report
        assert np.array_equal(pixels(image["base64"]), pixels(Path(gallery[0]).read_bytes()))
        fetched = api.get(image["url"])   # the result route, with the caller's key
        assert fetched.status_code == 200 and np.array_equal(pixels(fetched.content), pixels(image["base64"]))

        job = fooocus(api, "/v1/generation/text-to-image", {**FOOOCUS_SMALL, "async_process": True}).json()
        assert job["job_stage"] in ("WAITING", "RUNNING", "SUCCESS") and job["job_type"] == "Text to Image"
        done = finished_job(api, job["job_id"])
        assert done["job_stage"] == "SUCCESS" and done["job_progress"] == 100
        assert telemetry(done["job_report"]) == (0, 0)   # the same request again: resident, nothing to do
        assert np.array_equal(pixels(api.get(done["job_result"][0]["url"]).content), pixels(image["base64"]))
        history = api.get("/v1/generation/job-history").json()["history"]
        assert job["job_id"] in [item["job_id"] for item in history]

    with server.client(BETA) as other:   # another key: another caller
        assert other.get("/v1/generation/query-job", params={"job_id": job["job_id"]}).status_code == 404
        assert other.get(image["url"]).status_code == 404
        assert job["job_id"] not in json.dumps(other.get("/v1/generation/job-history").json())


def test_fooocus_api_stop_acts_on_the_callers_own_job_only(server: Server) -> None:
    with server.client() as api, server.client(BETA) as other:
        job = fooocus(api, "/v1/generation/text-to-image", {**FOOOCUS_SMALL, **LONG, "async_process": True}).json()
        wait_until(lambda: query(api, job["job_id"])["job_stage"] == "RUNNING", "the long job to start",
                   RUN_TIMEOUT_S)

        def preview() -> str | None:
            return api.get("/v1/generation/query-job",
                           params={"job_id": job["job_id"], "require_step_preview": True}).json()["job_step_preview"]

        seen: list[str | None] = []
        wait_until(lambda: seen.append(preview()) or seen[-1] is not None, "a step preview", RUN_TIMEOUT_S)
        assert pixels(seen[-1]).ndim == 3   # the latents' preview, as a PNG
        assert other.post("/v1/generation/stop").json()["stopped"] == []
        assert other.post("/v1/generation/stop", params={"job_id": job["job_id"]}).status_code == 404
        assert query(api, job["job_id"])["job_stage"] == "RUNNING"
        assert api.post("/v1/generation/stop").json()["stopped"] == [job["job_id"]]
        done = finished_job(api, job["job_id"])
        assert done["job_report"]["stopped"] is True and done["job_stage"] == "SUCCESS"
        assert len([r for r in done["job_result"] if r["finish_reason"] == "SUCCESS"]) < 32


def test_fooocus_api_webhooks_only_where_the_operator_allows(server: Server) -> None:
    allowed = f"http://127.0.0.1:{server.hook.port}/hook/done"
    with server.client() as api:
        refused = fooocus(api, "/v1/generation/text-to-image",
                          {**FOOOCUS_SMALL, "async_process": True, "webhook_url": "http://127.0.0.1:9/steal"})
        assert refused.status_code == 422 and refused.json()["error"]["param"] == "webhook_url"
        job = fooocus(api, "/v1/generation/text-to-image",
                      {**FOOOCUS_SMALL, "async_process": True, "webhook_url": allowed}).json()
        wait_until(lambda: any(p["body"].get("job_id") == job["job_id"] for p in server.hook.posted),
                   "the webhook", RUN_TIMEOUT_S)
    [posted] = [p for p in server.hook.posted if p["body"]["job_id"] == job["job_id"]]
    assert posted["path"] == "/hook/done" and posted["body"]["job_result"][0]["seed"] == "3"


def test_fooocus_api_v1_upload_varies_the_uploaded_image(server: Server) -> None:
    from tests.helpers.input_image_files import INPUT

    image = base64.b64decode(png64(INPUT))
    with server.client() as api:
        answer = api.post("/v1/generation/image-upscale-vary",
                          data={"uov_method": "Vary (Subtle)", "prompt": "a cat", "base_model_name": CKPT,
                                "image_seed": "3", "require_base64": "true",
                                "advanced_params": json.dumps({"overwrite_step": 2})},
                          files={"input_image": ("in.png", image, "image/png")})
    assert answer.status_code == 200, answer.text
    assert pixels(answer.json()[0]["base64"]).shape == (64, 96, 3)   # Vary keeps 96x64 at image_input_side 128


# -- AUTOMATIC1111 (webuiapi) ------------------------------------------------------------------

def _webui(server: Server):
    import webuiapi

    host, port = server.url.removeprefix("http://").rstrip("/").split(":")
    return webuiapi.WebUIApi(host=host, port=int(port), username=LOGIN[0], password=LOGIN[1],
                             sampler="Euler a", steps=2)


def test_sdapi_through_webuiapi(server: Server) -> None:
    api = _webui(server)
    assert {CKPT, OTHER} <= set(api.util_get_model_names())
    assert [lora["name"] for lora in api.get_loras()] == ["style"]
    assert "Euler a" in api.util_get_sampler_names() and "karras" in api.util_get_scheduler_names()
    api.set_options({"sd_model_checkpoint": "served"})   # the default of every API request from now on
    assert api.get_options()["sd_model_checkpoint"] == CKPT
    small = {"prompt": "a dog", "seed": 5, "width": 64, "height": 64, "cfg_scale": 4.0}
    first, again = api.txt2img(**small), api.txt2img(**small)
    assert np.array_equal(np.asarray(first.image), np.asarray(again.image))   # seeds repeat
    assert first.info["all_seeds"] == [5] and first.info["fooocus_report"]["base_model"] == CKPT
    assert telemetry(again.info["fooocus_report"]) == (0, 0)
    styled = api.txt2img(**{**small, "prompt": "a dog <lora:style:1>"})
    assert [lora["file"] for lora in styled.info["fooocus_report"]["loras"]] == ["style.safetensors"]
    assert not np.array_equal(np.asarray(styled.image), np.asarray(first.image))
    other = api.txt2img(**small, override_settings={"sd_model_checkpoint": "other"})
    assert other.info["fooocus_report"]["base_model"] == OTHER
    assert not np.array_equal(np.asarray(other.image), np.asarray(first.image))
    assert api.get_options()["sd_model_checkpoint"] == CKPT   # override_settings: that request alone


def test_sdapi_img2img_varies_at_the_denoise_asked_and_inpaints_with_a_mask(server: Server, tmp_path: Path) -> None:
    """img2img at denoising_strength 0.5 is exactly /generate's Vary (Subtle), whose own
    denoise is 0.5 (the route runs Vary (Strong) with the denoise overwritten)."""
    from gradio_client import Client

    from tests.helpers.input_image_files import INPUT, MASK

    api = _webui(server)
    picture, model = Image.fromarray(INPUT), {"sd_model_checkpoint": CKPT}
    varied = api.img2img(images=[picture], denoising_strength=0.5, prompt="a cat", seed=5, steps=3,
                         override_settings=model)
    assert varied.image.size == (96, 64) and varied.info["fooocus_report"]["overwrite_vary_strength"] == 0.5
    gallery, report = Client(server.url, auth=LOGIN, verbose=False, download_files=str(tmp_path),
                             analytics_enabled=False).predict(
        {"prompt": "a cat", "base_model": CKPT, "input_image": png64(INPUT), "uov_method": "Vary (Subtle)",
         "seed": 5, "steps": 3, "guidance_scale": 7.0, "sampler": "euler_ancestral", "scheduler": "normal"},
        api_name="/generate")
    assert "error" not in report, report
    assert np.array_equal(np.asarray(varied.image.convert("RGB")), pixels(Path(gallery[0]).read_bytes()))
    painted = api.img2img(images=[picture], mask_image=Image.fromarray(MASK), denoising_strength=1.0,
                          prompt="a cat", seed=5, steps=2, override_settings=model)
    out = np.asarray(painted.image.convert("RGB"))
    # Beyond the mask (8..24) and its 32-pixel feathered ring: the input, exactly.
    assert out.shape == INPUT.shape and np.array_equal(out[:, 57:], INPUT[:, 57:])
    assert painted.info["fooocus_report"]["inpaint_strength"] == 1.0


# -- OpenAI images (openai) ----------------------------------------------------------------------

def test_openai_images_n_of_the_size_asked(server: Server) -> None:
    import openai

    client = openai.OpenAI(base_url=server.url + "v1", api_key=ALPHA, max_retries=0)
    assert {CKPT, OTHER} <= {model.id for model in client.models.list()}
    fast = {"steps": 2, "seed": 3}   # our fields, through the client's extra_body
    answer = client.images.generate(prompt="a cat", n=2, size="64x64", model="served", extra_body=fast)
    assert len(answer.data) == 2
    assert [pixels(d.b64_json).shape for d in answer.data] == [(64, 64, 3)] * 2
    assert answer.report["base_model"] == CKPT   # our report rides along
    assert telemetry(answer.report) == (0, 0)   # served at 64x64 before: resident, nothing to do
    urls = client.images.generate(prompt="a cat", n=1, size="64x64", response_format="url", extra_body=fast)
    with server.client() as api:
        assert pixels(api.get(urls.data[0].url).content).shape == (64, 64, 3)
    with pytest.raises(openai.UnprocessableEntityError, match="model"):
        client.images.generate(prompt="a cat", size="64x64", model="dall-e-3")
    with pytest.raises(openai.PermissionDeniedError):
        openai.OpenAI(base_url=server.url + "v1", api_key="wrong", max_retries=0).models.list()


# -- auth, bad input, disconnects ------------------------------------------------------------------

def test_every_route_refuses_without_credentials(server: Server) -> None:
    with server.client() as api:
        paths = api.get("/openapi.json").json()["paths"]
        page = api.get("/docs").text
    routes = [(method.upper(), path) for path, methods in paths.items() for method in methods]
    assert len(routes) >= 35 and ("POST", "/sdapi/v1/txt2img") in routes and ("GET", "/v1/models") in routes
    assert all(f"<code>{path}</code>" in page for path in paths)
    with server.client(None) as anonymous, server.client("not-a-key") as wrong:
        for method, path in routes + [("GET", "/openapi.json"), ("GET", "/docs")]:
            path = path.replace("{job_id}", "0" * 32).replace("{index}", "0")
            assert anonymous.request(method, path).status_code == 401, (method, path)
            assert wrong.request(method, path).status_code == 403, (method, path)
        bad_login = anonymous.get("/ping", auth=(LOGIN[0], "wrong"))
        assert bad_login.status_code == 401 and "Basic" in bad_login.headers["www-authenticate"]
        assert anonymous.get("/ping", auth=LOGIN).status_code == 200


MALFORMED = [
    ("/v1/generation/text-to-image", {"prompt": 3}, "prompt"),
    ("/v1/generation/text-to-image", {"prompt": "x", "image_number": 0}, "image_number"),
    ("/v1/generation/text-to-image", {"prompt": "x", "performance_selection": "Turbo"}, "performance_selection"),
    ("/v1/generation/text-to-image", {"prompt": "x", "base_model_name": "nope.safetensors"}, "base_model_name"),
    ("/v1/generation/text-to-image", {"prompt": "x", "aspect_ratios_selection": "64x64"}, "aspect_ratios_selection"),
    ("/v1/generation/text-to-image", {"prompt": "x", "advanced_params": {"overwrite_step": 999}},
     "advanced_params.overwrite_step"),
    ("/v1/generation/text-to-image", {"prompt": "x", "advanced_params": {"sampler_name": "nope"}},
     "advanced_params.sampler_name"),
    ("/v1/generation/text-to-image", {"prompt": "x", "advanced_params": {"black_out_nsfw": True}},
     "advanced_params.black_out_nsfw"),
    ("/v1/generation/text-to-image", {"prompt": "x", "advanced_params": {"clip_skip": 13}},
     "advanced_params.clip_skip"),
    ("/v1/generation/text-to-image", {"prompt": "x", "loras": [{"model_name": "missing.safetensors"}]}, "loras"),
    ("/v1/generation/text-to-image", {"prompt": "x", "style_selections": ["No Such Style"]}, "style_selections"),
    ("/v2/generation/image-upscale-vary", {"prompt": "x", "input_image": "not-base64!"}, "input_image"),
    ("/v2/generation/image-upscale-vary", {"prompt": "x", "uov_method": "Upscale (Custom)", "input_image": "x"},
     "uov_method"),
    ("/v2/generation/image-inpaint-outpaint", {"input_image": "x", "outpaint_distance_left": 64},
     "outpaint_distance_left"),
    ("/v2/generation/image-prompt", {"image_prompts": [{"cn_img": "x", "cn_type": "FaceSwap"}]}, "image_prompts"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "steps": 0}, "steps"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "width": 65}, "width"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "sampler_name": "Nope"}, "sampler_name"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "enable_hr": True}, "enable_hr"),
    ("/sdapi/v1/txt2img", {"prompt": "x", "override_settings": {"sd_model_checkpoint": "nope"}},
     "override_settings.sd_model_checkpoint"),
    ("/sdapi/v1/txt2img", {"prompt": "x <lora:missing:1>"}, "loras"),
    ("/sdapi/v1/img2img", {"prompt": "x", "init_images": []}, "init_images"),
    ("/sdapi/v1/img2img", {"prompt": "x", "init_images": ["garbage"]}, "init_images"),
    ("/sdapi/v1/options", {"sd_model_checkpoint": "nope"}, "sd_model_checkpoint"),
    ("/sdapi/v1/png-info", {"image": "garbage"}, "image"),
    ("/v1/images/generations", {"prompt": "x", "n": 11}, "n"),
    ("/v1/images/generations", {"prompt": "x", "size": "big"}, "size"),
    ("/v1/images/generations", {"prompt": "x", "size": "65x64"}, "size"),
    ("/v1/images/generations", {"prompt": "x", "model": "dall-e-3"}, "model"),
    ("/v1/images/generations", {"n": 1}, "prompt"),
]


def test_malformed_bodies_answer_422_naming_the_field_and_change_nothing(server: Server) -> None:
    with server.client() as api:
        reference = fooocus(api, "/v1/generation/text-to-image", {**FOOOCUS_SMALL, "require_base64": True}).json()
        for route, body, wanted in MALFORMED:
            answer = api.post(route, json=body)
            assert answer.status_code == 422, (route, body, answer.text)
            error = answer.json()["error"]
            assert error["param"] == wanted and f"field '{wanted}" in error["message"], (route, body, error)
        assert api.post("/v1/generation/text-to-image", content=b"{not json",
                        headers={"content-type": "application/json"}).status_code == 422
        after = fooocus(api, "/v1/generation/text-to-image", {**FOOOCUS_SMALL, "require_base64": True}).json()
    assert server.process.poll() is None
    assert np.array_equal(pixels(after[0]["base64"]), pixels(reference[0]["base64"]))


def test_a_developer_debug_advanced_param_takes_effect(server: Server) -> None:
    """advanced_params.clip_skip reaches the pipeline: another CLIP layer, another image; the
    default (2) is the image without it."""
    with server.client() as api:
        def image(**advanced) -> np.ndarray:
            body = {**FOOOCUS_SMALL, "require_base64": True,
                    "advanced_params": {**FOOOCUS_SMALL["advanced_params"], **advanced}}
            return pixels(fooocus(api, "/v1/generation/text-to-image", body).json()[0]["base64"])
        plain, skip_one, skip_two = image(), image(clip_skip=1), image(clip_skip=2)
    assert not np.array_equal(plain, skip_one) and np.array_equal(plain, skip_two)


def test_a_sync_request_whose_client_goes_away_is_stopped(server: Server) -> None:
    body = json.dumps({"prompt": "a long one", "batch_size": 32, "steps": 60, "width": 64, "height": 64}).encode()
    auth = base64.b64encode(":".join(LOGIN).encode()).decode()
    host, port = server.url.removeprefix("http://").rstrip("/").split(":")
    with socket.create_connection((host, int(port))) as raw:
        raw.sendall(b"POST /sdapi/v1/txt2img HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    b"Authorization: Basic " + auth.encode() + b"\r\nContent-Length: " + str(len(body)).encode()
                    + b"\r\n\r\n" + body)
        with server.client(None, auth=LOGIN) as api:
            def running() -> str | None:
                state = api.get("/sdapi/v1/progress").json()
                return state["current_task"] if state["state"]["sampling_step"] > 0 else None

            wait_until(lambda: running() is not None, "the sync job to sample", RUN_TIMEOUT_S)
            job_id = running()
    with server.client(None, auth=LOGIN) as api:   # the connection is closed: the job stops
        done = finished_job(api, job_id)
    assert done["job_report"]["stopped"] is True
    assert len(done["job_result"]) < 32
