"""Who is calling a REST route, and whether they may.

Credentials, as the clients send them:

* an API key (``--api-key``, config key ``api_key``) in ``X-API-KEY`` (Fooocus-API) or
  ``Authorization: Bearer`` (the openai client);
* a login of ``--auth`` / ``auth.json`` as HTTP Basic (A1111's ``--api-auth``; webuiapi's
  ``set_auth``).

With keys or logins configured, a request without valid credentials gets 401 (none given,
or a wrong login) or 403 (a wrong key). Without either, the APIs are open and callers are
told apart by their address. The principal's ``owner`` is what jobs belong to: one key,
one login or one address; nobody else sees, stops or reads its jobs.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import secrets
from dataclasses import dataclass

from fastapi import Request

from modules.api.common import ApiError
from modules.api.context import ApiSettings

REALM = 'Basic realm="Fooocus-Resident", charset="UTF-8"'


@dataclass(frozen=True)
class Principal:
    owner: str   # the worker-task owner: "rest:key:<hash>", "rest:user:<name>" or "rest:addr:<host>"


def _key_owner(key: str) -> str:
    return "rest:key:" + hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]


def _offered_key(request: Request) -> str | None:
    key = request.headers.get("x-api-key")
    if key:
        return key
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    return value.strip() if scheme.lower() == "bearer" and value.strip() else None


def _offered_login(request: Request) -> tuple[str, str] | None:
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        user, sep, password = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError):
        raise ApiError(401, "the Authorization header is not valid HTTP Basic (base64 of user:password)",
                       headers={"WWW-Authenticate": REALM}) from None
    return (user, password) if sep else None


def authenticate(request: Request, settings: ApiSettings) -> Principal:
    """The caller, or ApiError 401/403 with a message saying what to send."""
    if settings.open:
        host = request.client.host if request.client else "unknown"
        return Principal(owner=f"rest:addr:{host}")
    key = _offered_key(request)
    if key is not None and settings.api_keys:
        for known in settings.api_keys:
            if secrets.compare_digest(key.encode("utf-8"), known.encode("utf-8")):
                return Principal(owner=_key_owner(known))
        raise ApiError(403, "invalid API key (sent in X-API-KEY or Authorization: Bearer)")
    login = _offered_login(request)
    if login is not None and settings.logins:
        user, password = login
        for known_user, known_password in settings.logins:
            if (secrets.compare_digest(user.encode("utf-8"), known_user.encode("utf-8"))
                    and secrets.compare_digest(password.encode("utf-8"), known_password.encode("utf-8"))):
                return Principal(owner=f"rest:user:{known_user}")
        raise ApiError(401, "wrong user name or password (HTTP Basic, the --auth logins)",
                       headers={"WWW-Authenticate": REALM})
    wanted = " or ".join(w for w, on in (("an API key in X-API-KEY or Authorization: Bearer", settings.api_keys),
                                         ("an --auth login as HTTP Basic", settings.logins)) if on)
    headers = {"WWW-Authenticate": REALM} if settings.logins else None
    raise ApiError(401, f"authentication required: send {wanted}", headers=headers)


def exposure_warning(host: str, settings: ApiSettings) -> str | None:
    """A loud warning when the APIs serve other machines without any key or login."""
    if not settings.open or _loopback(host):
        return None
    return (f"the REST APIs (Fooocus-API, /sdapi/v1, /v1/images) listen on {host} WITHOUT an API key or login: "
            f"anyone who reaches this port can generate images and list the models; add --api-key KEY "
            f"(or --auth USER:PASSWORD)")


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:   # a host name: only localhost is known to stay on this machine
        return False
