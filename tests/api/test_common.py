"""What every route shares: the body limit (declared or chunked), errors naming the field,
uploads over the limit, and image fields that name a result of our own file route."""

from __future__ import annotations

import base64

from modules.api.context import ApiSettings
from tests.helpers.api import fake_api

SETTINGS = ApiSettings(api_keys=("alpha", "beta"), max_upload_bytes=100_000)
ALPHA, BETA = {"X-API-KEY": "alpha"}, {"X-API-KEY": "beta"}
ROUTE = "/v1/generation/text-to-image"


def test_bodies_over_the_limit_are_refused_declared_or_chunked(tmp_path):
    def chunks():
        yield b'{"prompt": "'
        for _ in range(200):
            yield b"x" * 10_000   # 2 MB, over 100 kB x 6 images x 4/3 + 1 MB
        yield b'"}'

    with fake_api(tmp_path, SETTINGS) as api:
        declared = api.client.post(ROUTE, content=b"x" * 2_000_000, headers={**ALPHA, "content-type": "application/json"})
        chunked = api.client.post(ROUTE, content=chunks(), headers={**ALPHA, "content-type": "application/json"})
        upload = api.client.post("/v1/generation/image-upscale-vary", data={"uov_method": "Vary (Subtle)"},
                                 files={"input_image": ("a.png", b"x" * 150_000, "image/png")}, headers=ALPHA)
        assert api.pipeline.requests == []   # nothing reached the worker
    assert declared.status_code == chunked.status_code == upload.status_code == 413
    assert "--max-upload-size" in chunked.json()["detail"]
    assert upload.json()["error"]["param"] == "input_image"


def test_a_body_that_is_not_json_names_no_field_but_says_so(tmp_path):
    with fake_api(tmp_path, SETTINGS) as api:
        answer = api.client.post(ROUTE, content=b"{nope", headers={**ALPHA, "content-type": "application/json"})
    assert answer.status_code == 422 and answer.json()["error"]["param"] is None
    assert answer.json()["error"]["message"].startswith("the body: JSON decode error")


def test_an_image_field_may_name_the_callers_own_result_and_no_one_elses(tmp_path):
    with fake_api(tmp_path, SETTINGS) as api:
        url = api.client.post(ROUTE, json={"prompt": "first"}, headers=ALPHA).json()[0]["url"]
        vary = {"prompt": "again", "uov_method": "Vary (Subtle)", "input_image": url}
        assert api.client.post("/v2/generation/image-upscale-vary", json=vary, headers=ALPHA).status_code == 200
        sent = api.pipeline.requests[-1]["input_image"]
        assert base64.b64decode(sent) == (tmp_path / "1.png").read_bytes()   # the file, as base64
        other = api.client.post("/v2/generation/image-upscale-vary", json=vary, headers=BETA)
        assert other.status_code == 422 and other.json()["error"]["param"] == "input_image"
        elsewhere = api.client.post("/v2/generation/image-upscale-vary",
                                    json={**vary, "input_image": "https://example.com/cat.png"}, headers=ALPHA)
        assert elsewhere.status_code == 422 and "no downloads" in elsewhere.json()["detail"]
        assert len(api.pipeline.requests) == 2
