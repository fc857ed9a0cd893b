"""Who a REST caller is: API keys (X-API-KEY, Bearer), --auth logins (HTTP Basic), or,
with neither configured, the caller's address; and when the operator is warned."""

from __future__ import annotations

import base64

import pytest
from starlette.requests import Request

from modules.api.auth import authenticate, exposure_warning
from modules.api.common import ApiError
from modules.api.context import ApiSettings

KEYS = ApiSettings(api_keys=("k1", "k2"))
LOGINS = ApiSettings(logins=(("ann", "pw"), ("bob", "pw2")))
BOTH = ApiSettings(api_keys=("k1",), logins=(("ann", "pw"),))


def request(headers: dict[str, str] | None = None, host: str = "10.0.0.2") -> Request:
    return Request({"type": "http", "method": "GET", "path": "/", "client": (host, 5000),
                    "headers": [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]})


def basic(user: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def owner(settings: ApiSettings, headers: dict | None = None, host: str = "10.0.0.2") -> str:
    return authenticate(request(headers, host), settings).owner


def refusal(settings: ApiSettings, headers: dict | None = None) -> ApiError:
    with pytest.raises(ApiError) as caught:
        authenticate(request(headers), settings)
    return caught.value


def test_without_keys_or_logins_callers_are_told_apart_by_address():
    assert owner(ApiSettings()) != owner(ApiSettings(), host="10.0.0.3")
    assert owner(ApiSettings(), {"X-API-KEY": "anything"}) == owner(ApiSettings())


def test_an_api_key_in_either_header_is_one_caller_and_each_key_another():
    assert owner(KEYS, {"X-API-KEY": "k1"}) == owner(KEYS, {"Authorization": "Bearer k1"})
    assert owner(KEYS, {"X-API-KEY": "k1"}) != owner(KEYS, {"X-API-KEY": "k2"})
    assert "k1" not in owner(KEYS, {"X-API-KEY": "k1"})   # owners never carry the secret
    assert refusal(KEYS, {"X-API-KEY": "k3"}).status == 403
    missing = refusal(KEYS)
    assert missing.status == 401 and "X-API-KEY" in missing.message and missing.headers is None


def test_a_login_is_http_basic_and_a_wrong_one_asks_again():
    assert owner(LOGINS, basic("ann", "pw")) != owner(LOGINS, basic("bob", "pw2"))
    for headers in (basic("ann", "pw2"), basic("eve", "pw"), {"Authorization": "Basic %%%"}, None):
        refused = refusal(LOGINS, headers)
        assert refused.status == 401 and refused.headers["WWW-Authenticate"].startswith("Basic")


def test_with_both_configured_either_credential_works():
    assert owner(BOTH, {"X-API-KEY": "k1"}) != owner(BOTH, basic("ann", "pw"))
    assert refusal(BOTH, {"X-API-KEY": "nope"}).status == 403
    assert "HTTP Basic" in refusal(BOTH).message and "X-API-KEY" in refusal(BOTH).message


@pytest.mark.parametrize("host, settings, warned", [
    ("0.0.0.0", ApiSettings(), True), ("192.168.1.5", ApiSettings(), True), ("my-host", ApiSettings(), True),
    ("127.0.0.1", ApiSettings(), False), ("::1", ApiSettings(), False), ("localhost", ApiSettings(), False),
    ("0.0.0.0", KEYS, False), ("0.0.0.0", LOGINS, False),
])
def test_serving_other_machines_without_a_key_or_login_is_warned(host, settings, warned):
    assert (exposure_warning(host, settings) is not None) is warned


def test_keys_come_from_the_flags_and_the_config_key_once_each(tmp_path):
    from args_manager import parse_args
    from modules import config as config_module

    cfg = config_module.load_config({"config_path": str(tmp_path / "none"), "api_key": "from-config"})
    settings = ApiSettings.from_args(parse_args(["--api-key", "k1", "--apikey", "from-config", "--max-upload-size",
                                                 "2"]), cfg, [("ann", "pw")])
    assert settings.api_keys == ("k1", "from-config") and settings.logins == (("ann", "pw"),)
    assert settings.max_upload_bytes == 2 * 2 ** 20 and not settings.open
    assert ApiSettings.from_args(parse_args([]), config_module.load_config(
        {"config_path": str(tmp_path / "none")}), []).open
