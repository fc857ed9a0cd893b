"""Command-line flags: upstream Fooocus's flags plus our resident-model ones.

How the arguments get parsed (once):

* ``launch.py`` calls ``args_manager.init(sys.argv[1:])`` before it imports
  anything that reads flags.
* Everyone else (tests, tools, ``modules.*``) just reads ``args_manager.args``.
  Until ``init`` runs it holds the defaults, i.e. ``parse_args([])``; importing
  this module never looks at ``sys.argv``, so pytest's own arguments or another
  tool's arguments can't leak in.

``init`` updates the existing namespace object in place, so a reference taken
before ``init`` (``from args_manager import args``) still sees the parsed
values. Reading ``args_manager.args`` is still the recommended spelling.

Beyond argparse's own fields, ``parse_args`` adds derived fields:

* ``always_offload_from_vram`` = not ``disable_offload_from_vram`` (Fooocus
  offloads by default);
* ``in_browser`` is False when ``--disable-in-browser`` is given;
* ``model_policy`` is ``"resident"`` or ``"conservative"``;
* ``vram_budget_bytes`` is ``--vram-budget`` in bytes, or None.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path

DEFAULT_HOST = "127.0.0.1"
LISTEN_ALL_HOST = "0.0.0.0"
DEFAULT_PORT = 7865
# --always-cpu given without a thread count: keep torch's own thread count.
# Truthy on purpose, so `if args.always_cpu:` means "CPU mode" as upstream.
ALWAYS_CPU_DEFAULT_THREADS = -1

POLICY_RESIDENT = "resident"
POLICY_CONSERVATIVE = "conservative"

_GIB = 1024 ** 3
PRESETS_DIR = Path(__file__).resolve().parent / "presets"
THEMES = ("light", "dark")
LANGUAGE_DEFAULT = "default"   # upstream's value; the page is English only
DEFAULT_MAX_UPLOAD_MB = 50


def available_presets(folder: Path = PRESETS_DIR) -> list[str]:
    """Preset names (``presets/NAME.json``) that exist, sorted."""
    return sorted(p.stem for p in folder.glob("*.json")) if folder.is_dir() else []


def _auth(text: str) -> tuple[str, str]:
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise argparse.ArgumentTypeError("--auth takes USER:PASSWORD (both non-empty)")
    return user, password


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"port must be an integer, got {text!r}") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be in 1..65535, got {value}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def _http_url(text: str) -> str:
    from urllib.parse import urlsplit

    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise argparse.ArgumentTypeError(f"expected an http:// or https:// URL, got {text!r}")
    return text


def _milliseconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of milliseconds, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected a finite number of milliseconds >= 0, got {text!r}")
    return value


def _gigabytes(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"VRAM budget must be a number of GB, got {text!r}") from None
    # nan/inf would poison the budget arithmetic later; reject them here.
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"VRAM budget must be a finite number of GB > 0, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The full parser; a fresh object each call, so tests can't share state."""
    p = argparse.ArgumentParser(
        prog="launch.py",
        description="Fooocus-Resident: an SDXL image generator that keeps models "
                    "and their LoRA patches resident between requests.",
    )

    # --- server and browser -------------------------------------------------
    p.add_argument("--listen", type=str, nargs="?", const=LISTEN_ALL_HOST, default=DEFAULT_HOST,
                   metavar="IP",
                   help=f"address the web server binds to (default {DEFAULT_HOST}); "
                        f"given without a value it binds {LISTEN_ALL_HOST}, i.e. every interface")
    p.add_argument("--port", type=_port, default=DEFAULT_PORT,
                   help=f"TCP port of the web server (default {DEFAULT_PORT})")
    p.add_argument("--share", action="store_true",
                   help="upstream: a public Gradio link; here it needs the internet, so a warning is "
                        "logged and the server stays local")
    p.add_argument("--auth", type=_auth, default=None, metavar="USER:PASSWORD",
                   help="require this login for the page and the API (auth.json, a list of "
                        "{\"user\", \"pass\"}, in the repository root is read too)")
    p.add_argument("--max-upload-size", type=_positive_int, default=DEFAULT_MAX_UPLOAD_MB, metavar="MB",
                   help=f"largest file the server accepts as an upload (default {DEFAULT_MAX_UPLOAD_MB} MB)")
    p.add_argument("--theme", type=str, choices=THEMES, default=None,
                   help="page colour theme (default: the browser's)")
    p.add_argument("--language", type=str, default=LANGUAGE_DEFAULT, metavar="LANG",
                   help="UI language; only English exists, other values log a warning")
    p.add_argument("--multi-user", action="store_true",
                   help="upstream compatibility: jobs always belong to their own session here")
    # --- HTTP APIs (Fooocus-API, AUTOMATIC1111 sdapi, OpenAI images) ----------
    p.add_argument("--api-key", "--apikey", action="append", default=None, metavar="KEY", dest="api_key",
                   help="require this key on the REST APIs (header X-API-KEY or Authorization: Bearer); "
                        "may be given several times, and the config key api_key adds one more")
    p.add_argument("--queue-size", type=_positive_int, default=None, metavar="N",
                   help="requests that may wait in the queue, page and APIs together (default: config "
                        "key max_queue_length, 100); a full queue answers HTTP 429")
    p.add_argument("--webhook-url", type=_http_url, default=None, metavar="URL",
                   help="POST every finished asynchronous API job to this URL (Fooocus-API's webhook)")
    p.add_argument("--webhook-allow", type=_http_url, action="append", default=None, metavar="URL_PREFIX",
                   help="[ours] a request's own webhook_url is honoured when it starts with this prefix "
                        "(scheme, host and port exactly); may be given several times")
    browser = p.add_mutually_exclusive_group()
    browser.add_argument("--in-browser", action="store_true",
                         help="open the UI in a web browser once the server is up (the default)")
    browser.add_argument("--disable-in-browser", action="store_true",
                         help="do not open a web browser at start")

    # --- presets, paths, logging ---------------------------------------------
    p.add_argument("--preset", type=str, default=None, metavar="NAME",
                   help="apply presets/NAME.json over config.txt (environment variables still win)")
    p.add_argument("--output-path", type=str, default=None, metavar="PATH",
                   help="folder for generated images; overrides path_outputs from config.txt")
    p.add_argument("--temp-path", type=str, default=None, metavar="PATH",
                   help="folder for temporary files (default: the system temp folder)")
    p.add_argument("--disable-preset-download", action="store_true",
                   help="never download the model files a preset names")
    p.add_argument("--always-download-new-model", action="store_true",
                   help="download a preset's models even when other checkpoints are present")
    p.add_argument("--disable-image-log", action="store_true",
                   help="do not write generated images and the HTML log to the output folder")
    p.add_argument("--disable-metadata", action="store_true",
                   help="do not embed generation parameters in saved images")

    # --- where models live (conservative policy: upstream meanings) -----------
    vram = p.add_mutually_exclusive_group()
    vram.add_argument("--always-gpu", action="store_true",
                      help="keep every model on the GPU, never offload")
    vram.add_argument("--always-high-vram", action="store_true",
                      help="treat the GPU as large: keep models there after use")
    vram.add_argument("--always-normal-vram", action="store_true",
                      help="treat the GPU as mid-sized (load whole models, offload between stages)")
    vram.add_argument("--always-low-vram", action="store_true",
                      help="treat the GPU as small: load models part by part")
    vram.add_argument("--always-no-vram", action="store_true",
                      help="keep weights in system memory and stream them to the GPU for each use")
    vram.add_argument("--always-cpu", type=_positive_int, nargs="?", const=ALWAYS_CPU_DEFAULT_THREADS,
                      default=None, metavar="CPU_NUM_THREADS",
                      help="run everything on the CPU; optionally set the number of CPU threads")
    p.add_argument("--disable-offload-from-vram", action="store_true",
                   help="do not evict other models from VRAM on each load (upstream offloads by default)")
    p.add_argument("--vae-in-cpu", action="store_true",
                   help="run the VAE on the CPU")
    p.add_argument("--gpu-device-id", type=_non_negative_int, default=None, metavar="DEVICE_ID",
                   help="index of the CUDA device to use")

    # --- ours: the resident policy -------------------------------------------
    p.add_argument("--keep-models-resident", action="store_true",
                   help="[ours] resident policy: keep models and their LoRA patches on the device "
                        "between requests; evict least-recently-used models only when the VRAM "
                        "budget needs room")
    p.add_argument("--vram-budget", type=_gigabytes, default=None, metavar="GB",
                   help="[ours] device memory models may fill, in GB (default: free at start plus "
                        "what this process holds, minus a reserve of 1.5 GB + 5%%); counted, not "
                        "re-measured, by both policies; more than the device has is an error")
    p.add_argument("--check-memory-accounting", action="store_true",
                   help="[ours] debug: after each request, log the device ledger against the bytes "
                        "of the tensors really on the device")

    # --- ours: batching -----------------------------------------------------------
    p.add_argument("--max-batch", type=_positive_int, default=None, metavar="N",
                   help="[ours] most images in one UNet batch: a request's images and compatible queued "
                        "requests share batches up to N (default: as many as the memory budget allows; "
                        "1: one image at a time, as upstream)")
    p.add_argument("--batch-window-ms", type=_milliseconds, default=0.0, metavar="MS",
                   help="[ours] after taking a request, wait up to MS milliseconds for compatible requests "
                        "to join its batch (default 0: only those already queued)")

    # --- ours: compiled UNet ------------------------------------------------------
    p.add_argument("--compile-unet", action="store_true",
                   help="[ours] run the UNet through torch.compile, compiled once per image shape and "
                        "kept across requests and LoRA switches (the first request of a shape is slow)")
    p.add_argument("--compile-backend", type=str, default="inductor", metavar="NAME",
                   help="[ours] torch.compile backend for --compile-unet (default inductor; "
                        "aot_eager compiles fast and generates no code)")
    p.add_argument("--compile-mode", choices=("default", "reduce-overhead", "max-autotune",
                                              "max-autotune-no-cudagraphs"), default=None,
                   help="[ours] inductor mode for --compile-unet (default: reduce-overhead, i.e. CUDA "
                        "graphs, on a GPU; default elsewhere)")

    # --- precision -------------------------------------------------------------
    fp = p.add_mutually_exclusive_group()
    fp.add_argument("--all-in-fp32", action="store_true", help="run every model in float32")
    fp.add_argument("--all-in-fp16", action="store_true", help="run every model in float16")

    fp_unet = p.add_mutually_exclusive_group()
    fp_unet.add_argument("--unet-in-bf16", action="store_true", help="store the UNet in bfloat16")
    fp_unet.add_argument("--unet-in-fp16", action="store_true", help="store the UNet in float16")
    fp_unet.add_argument("--unet-in-fp8-e4m3fn", action="store_true",
                         help="store the UNet weights in float8 (e4m3fn)")
    fp_unet.add_argument("--unet-in-fp8-e5m2", action="store_true",
                         help="store the UNet weights in float8 (e5m2)")

    fp_vae = p.add_mutually_exclusive_group()
    fp_vae.add_argument("--vae-in-fp16", action="store_true", help="run the VAE in float16")
    fp_vae.add_argument("--vae-in-fp32", action="store_true", help="run the VAE in float32")
    fp_vae.add_argument("--vae-in-bf16", action="store_true", help="run the VAE in bfloat16")

    fp_clip = p.add_mutually_exclusive_group()
    fp_clip.add_argument("--clip-in-fp8-e4m3fn", action="store_true",
                         help="store the text encoders in float8 (e4m3fn)")
    fp_clip.add_argument("--clip-in-fp8-e5m2", action="store_true",
                         help="store the text encoders in float8 (e5m2)")
    fp_clip.add_argument("--clip-in-fp16", action="store_true", help="run the text encoders in float16")
    fp_clip.add_argument("--clip-in-fp32", action="store_true", help="run the text encoders in float32")

    # --- attention ---------------------------------------------------------------
    attn = p.add_mutually_exclusive_group()
    attn.add_argument("--attention-split", action="store_true",
                      help="compute attention in slices to save memory")
    attn.add_argument("--attention-quad", action="store_true",
                      help="use sub-quadratic (chunked) attention")
    attn.add_argument("--attention-pytorch", action="store_true",
                      help="use PyTorch's scaled_dot_product_attention")
    p.add_argument("--disable-xformers", action="store_true",
                   help="do not use xformers even when it is installed")
    return p


def _derive(ns: argparse.Namespace, parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Cross-flag checks argparse can't express, and the derived fields."""
    ns.always_offload_from_vram = not ns.disable_offload_from_vram
    ns.in_browser = not ns.disable_in_browser
    ns.model_policy = POLICY_RESIDENT if ns.keep_models_resident else POLICY_CONSERVATIVE
    ns.vram_budget_bytes = None if ns.vram_budget is None else int(ns.vram_budget * _GIB)
    return ns


def preset_error(name: str | None, folder: Path = PRESETS_DIR) -> str | None:
    """Why ``--preset name`` cannot be used (listing the presets that exist), or None.

    Checked at start by launch.py, not by the parser: parsing never reads files."""
    if name is None or name in available_presets(folder):
        return None
    found = available_presets(folder)
    return (f"--preset {name}: no such preset (no file presets/{name}.json); "
            f"presets available: {', '.join(found) if found else 'none'}")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` strictly (unknown flags exit with code 2).

    ``None`` means no arguments -- not ``sys.argv`` -- so a stray call never
    picks up a foreign command line.
    """
    parser = build_parser()
    ns = parser.parse_args(list(argv) if argv is not None else [])
    return _derive(ns, parser)


def init(argv: Sequence[str]) -> argparse.Namespace:
    """Parse the real command line into ``args`` (called once by launch.py)."""
    parsed = parse_args(argv)
    # Update in place: modules that already hold `args` see the new values.
    vars(args).clear()
    vars(args).update(vars(parsed))
    return args


args: argparse.Namespace = parse_args([])
