"""Entry point: flags -> paths and a checkpoint ready -> model management -> web UI.

    python launch.py [--listen [IP]] [--port N] [--keep-models-resident] [--vram-budget GB] [Fooocus flags]
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Gradio phones home for analytics and version checks unless told not to.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import args_manager  # noqa: E402  (sys.path first)

if TYPE_CHECKING:
    from modules.config import Config

log = logging.getLogger("fooocus_resident.launch")
SHUTDOWN_TIMEOUT_S = 60.0   # a running task stops at its next step; this bounds a stuck one

@dataclass(frozen=True)
class CheckpointSetup:
    """What ``ensure_checkpoint`` found or made."""

    path: str | None  # the file it downloaded or created; None when checkpoints were already there
    demo: bool        # True when the random demo checkpoint is what will be used


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stdout, force=True)
    for noisy in ("httpx", "httpcore", "urllib3", "gradio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def warn_loudly(lines: list[str]) -> None:
    """Log lines between two bars of '!', for what an operator must not miss."""
    bar = "!" * 78
    for line in [bar, *lines, bar]:
        log.warning(line)


def warn_demo(path: str, checkpoint_folder: Path) -> None:
    warn_loudly([
        "NO SDXL CHECKPOINT FOUND: using the built-in DEMO checkpoint",
        f"  {path}",
        "It has RANDOM weights: every image it makes is NOISE.",
        "Put a real SDXL checkpoint (.safetensors), e.g. juggernautXL_v8Rundiffusion.safetensors,",
        f"into {checkpoint_folder.resolve()}",
        "and choose it in the UI (or as \"base_model\" in API requests).",
    ])


def ensure_checkpoint(cfg: Config, allow_download: bool, always_download: bool = False) -> CheckpointSetup:
    """Make sure at least one checkpoint exists: the preset's model, else the demo one.

    `always_download` (--always-download-new-model) fetches the preset's model even
    when other checkpoints are there, as upstream does."""
    from modules import config, model_downloader
    from modules.generation_request import DEMO_CHECKPOINT_NAME

    folder = cfg.path_checkpoints[0]
    files = config.list_model_files(cfg.path_checkpoints)
    real = [f for f in files if os.path.basename(f) != DEMO_CHECKPOINT_NAME]
    wanted = model_downloader.DEFAULT_CHECKPOINT.file_name
    if real and not (always_download and allow_download and wanted not in map(os.path.basename, real)):
        return CheckpointSetup(path=None, demo=False)
    if allow_download:
        source = model_downloader.DEFAULT_CHECKPOINT
        dest = folder / source.file_name
        log.info("no checkpoint in %s: downloading %s", folder.resolve(), source.file_name)
        if model_downloader.download_file(source.url, dest):
            return CheckpointSetup(path=str(dest), demo=False)
        log.warning("could not download %s", source.url)
    if real:
        return CheckpointSetup(path=None, demo=False)
    demo = folder / DEMO_CHECKPOINT_NAME
    if not demo.is_file():
        from ldm_patched.modules.demo_model import write_demo_checkpoint

        write_demo_checkpoint(str(demo))
    warn_demo(str(demo.resolve()), folder)
    return CheckpointSetup(path=str(demo), demo=True)


def startup_warnings(args) -> list[str]:
    """What the operator should hear about the flags given (nothing here stops the start)."""
    warnings = []
    if args.share:
        warnings.append("--share needs a public tunnel on the internet; it is not used: "
                        "the server stays local (use --listen to serve your network)")
    if args.language not in (args_manager.LANGUAGE_DEFAULT, "en", "en_US", "English"):
        warnings.append(f"--language {args.language}: the page is in English only")
    return warnings


def auth_or_warning(args, host: str) -> tuple[list[tuple[str, str]], str | None]:
    """Logins from --auth and auth.json; a warning when every interface is served without one."""
    from modules import webui

    pairs = webui.auth_pairs(args.auth, ROOT / "auth.json")
    if host == args_manager.LISTEN_ALL_HOST and not pairs:
        return pairs, ("--listen serves every network interface WITHOUT a login: anyone who can reach "
                       "this machine can use it (add --auth USER:PASSWORD or an auth.json)")
    return pairs, None


def main(argv: list[str]) -> int:
    args = args_manager.init(argv)
    setup_logging()
    problem = args_manager.preset_error(args.preset)
    if problem:
        log.error("%s", problem)
        print(f"launch.py: error: {problem}", file=sys.stderr)
        return 2
    for warning in startup_warnings(args):
        log.warning("%s", warning)
    if args.multi_user:
        log.info("--multi-user: jobs always belong to their own browser or API session here")

    import torch

    if args.always_cpu is not None and args.always_cpu > 0:
        torch.set_num_threads(args.always_cpu)
        log.info("CPU threads: %d", args.always_cpu)

    from modules import config

    try:
        cfg = config.reload_config()  # reads args_manager.args (preset, --output-path)
        cfg.ensure_folders()
    except config.ConfigError as error:   # names the key and the file; no traceback
        log.error("%s", error)
        return 2

    from ldm_patched.modules import model_management as mm

    try:
        mm.configure(mm.settings_from_args(args))
    except mm.BudgetError as error:
        log.error("%s", error)
        return 2
    if args.compile_unet:
        from modules import compiled_unet, core

        try:
            core.configure_compile(compiled_unet.settings_from_args(args))
        except ValueError as error:   # an unknown --compile-backend
            log.error("%s", error)
            return 2

    # --disable-preset-download means "no downloads at all".
    if cfg.downloads:   # the preset's model files (checkpoint_downloads...), fetched at start as upstream does
        from modules import presets

        for problem in presets.download_models(cfg):
            log.warning("%s", problem)
        cfg = config.reload_config()   # a fetched default model replaces a previous_default_models fallback
    ensure_checkpoint(cfg, allow_download=not args.disable_preset_download,
                      always_download=args.always_download_new_model)

    from modules import webui

    host = args.listen
    try:
        auth, warning = auth_or_warning(args, host)
    except ValueError as error:
        log.error("%s", error)
        return 2
    if warning:
        log.warning("%s", warning)
    from modules import runtime
    from modules.api import app as api_app
    from modules.api import auth as api_auth
    from modules.api.context import ApiSettings

    api_settings = ApiSettings.from_args(args, cfg, auth)
    exposed = api_auth.exposure_warning(host, api_settings)
    if exposed:
        warn_loudly([exposed])
    api = api_app.make_context(api_settings, runtime.get_worker)
    app = webui.build_app()
    url_host = "127.0.0.1" if host == args_manager.LISTEN_ALL_HOST else host
    log.info("starting the web UI at http://%s:%d/ (bound to %s%s)", url_host, args.port, host,
             ", login required" if auth else "")
    stop = install_signal_handlers()
    app.launch(server_name=host, server_port=args.port,
               inbrowser=args.in_browser and host != args_manager.LISTEN_ALL_HOST,
               allowed_paths=webui.allowed_paths(cfg), auth=auth or None,
               max_file_size=args.max_upload_size * 1024 ** 2, prevent_thread_lock=True,
               **launch_keywords(app, cfg, args.theme, api_app.app_kwargs(api)))
    while not stop.wait(1.0):
        pass
    log.info("stopping: the running task stops, its finished images are written")
    shut_down(app)
    return 0


def launch_keywords(app, cfg: Config, theme: str | None, api_kwargs: dict) -> dict:
    """The page's launch keywords (css, js, the route guard) with the REST routes added to
    the FastAPI app Gradio builds: one app, one port, one worker."""
    from modules import webui

    keywords = webui.launch_options(app, cfg, theme)
    keywords["app_kwargs"] = {**keywords.get("app_kwargs", {}), **api_kwargs}
    return keywords


def install_signal_handlers() -> threading.Event:
    """SIGTERM and SIGINT set the returned event; the main thread then shuts down in order."""
    stop = threading.Event()

    def handler(_signum: int, _frame: object) -> None:
        stop.set()   # nothing else here: the handler may interrupt code holding locks

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, handler)
    return stop


def shut_down(app: object) -> None:
    """Stop the running task (its finished images are still written), drop the queued
    ones, wait for every image file to be committed, then close the server."""
    from modules import runtime

    runtime.shutdown(SHUTDOWN_TIMEOUT_S)
    app.close()   # type: ignore[attr-defined]
    log.info("shut down cleanly")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
