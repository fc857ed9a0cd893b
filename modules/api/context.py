"""What every API route needs: the settings the operator chose, the worker, the config,
the job book and the options a client may change (A1111's default checkpoint)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from modules import config as config_module
from modules.api.jobs import JobBook
from modules.async_worker import Worker

MB = 2 ** 20
# Base64 makes an image 4/3 larger; a body holds at most the input image, its mask and
# four image prompts, each up to --max-upload-size.
IMAGES_PER_BODY = 6


@dataclass(frozen=True)
class ApiSettings:
    """The operator's choices for the REST APIs (flags and config keys)."""

    api_keys: tuple[str, ...] = ()
    logins: tuple[tuple[str, str], ...] = ()   # --auth and auth.json: HTTP Basic
    webhook_url: str | None = None             # --webhook-url: every async job's result goes there
    webhook_allow: tuple[str, ...] = ()        # --webhook-allow: prefixes a request's webhook_url may use
    max_upload_bytes: int = 50 * MB            # one uploaded image (--max-upload-size)

    @property
    def max_body_bytes(self) -> int:
        return self.max_upload_bytes * IMAGES_PER_BODY * 4 // 3 + MB

    @property
    def open(self) -> bool:
        """No key and no login: anyone who reaches the port may use the APIs."""
        return not self.api_keys and not self.logins

    @staticmethod
    def from_args(args, cfg: config_module.Config, logins: list[tuple[str, str]]) -> "ApiSettings":
        keys = [k for k in (args.api_key or []) + [cfg.api_key] if k]
        return ApiSettings(api_keys=tuple(dict.fromkeys(keys)), logins=tuple(logins),
                           webhook_url=args.webhook_url, webhook_allow=tuple(args.webhook_allow or ()),
                           max_upload_bytes=args.max_upload_size * MB)


class ApiOptions:
    """What clients may change for every API request: the default checkpoint
    (A1111's ``sd_model_checkpoint``); None keeps config.txt's ``default_model``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._checkpoint: str | None = None

    @property
    def checkpoint(self) -> str | None:
        with self._lock:
            return self._checkpoint

    def set_checkpoint(self, name: str | None) -> None:
        with self._lock:
            self._checkpoint = name


@dataclass
class ApiContext:
    settings: ApiSettings
    worker: Callable[[], Worker]
    config: Callable[[], config_module.Config]
    jobs: JobBook
    options: ApiOptions

    def default_model(self) -> str:
        """The checkpoint a request that names none gets ("" lets the pipeline pick)."""
        return self.options.checkpoint or self.config().default_model
