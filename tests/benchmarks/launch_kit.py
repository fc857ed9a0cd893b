"""Throughput through launch.py on the CPU kit (issue 19): the demo checkpoint (tiny random
SDXL, written at start), 64x64, Speed at 8 steps, gradio_client as the client, resident.

Per server (default flags, `--batch-window-ms 150`, then `--max-batch 1`), after a warm-up
of both LoRA sets, each timed three times (median):

* 4 sequential single requests (seeds s..s+3): the baseline, and every image's twin;
* one request with image_number 4 (seeds s..s+3);
* 4 concurrent clients, one request each (seeds s..s+3);

then once more the 4 concurrent requests with a request of another LoRA set sent among
them (its twin ran alone before). Prints the times, the speed-ups against the sequential
singles, the UNet calls, the requests per batch, the largest pixel difference of every
image against its single-request twin, and whether the other set's request was served
(its image against its twin) and when it finished.

    HF_HUB_OFFLINE=1 .venv/bin/python -m tests.benchmarks.launch_kit [--out kit.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from tests.helpers.serving import answers, free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 300.0
REQUEST = {"prompt": "a lighthouse on a cliff at dawn", "negative_prompt": "blurry", "performance": "Speed",
           "steps": 8, "width": 64, "height": 64, "styles": [], "seed": 100}
OTHER_LORA = "other_set.safetensors"
WINDOW_MS = 150   # the window row's --batch-window-ms: above the arrival spread of 4 gradio_client calls here (~125 ms)


def configurations(window_ms: float = WINDOW_MS) -> dict[str, list[str]]:
    return {"batched": [], f"batched --batch-window-ms {window_ms:g}": ["--batch-window-ms", f"{window_ms:g}"],
            "--max-batch 1": ["--max-batch", "1"]}


@dataclass
class Server:
    url: str
    process: subprocess.Popen
    log_path: Path

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()


def start_server(root: Path, flags: list[str]) -> Server:
    """launch.py --keep-models-resident over `root`'s folders (the demo checkpoint is written at start)."""
    paths = {key: root / key.removeprefix("path_") for key in
             ("path_checkpoints", "path_loras", "path_outputs", "path_embeddings", "path_vae")}
    for path in paths.values():
        path.mkdir(parents=True, exist_ok=True)
    config = root / "config.json"
    config.write_text(json.dumps({k: str(v) for k, v in paths.items()}))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("path_", "default_"))}
    env.update(config_path=str(config), HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False", PYTHONUNBUFFERED="1")
    log_path = root / "server.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen([sys.executable, str(REPO_ROOT / "launch.py"), "--port", str(port),
                                    "--keep-models-resident", "--disable-preset-download", "--disable-in-browser",
                                    *flags], cwd=root, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    server = Server(f"http://127.0.0.1:{port}/", process, log_path)
    deadline = time.monotonic() + START_TIMEOUT_S
    while not answers(server.url):
        if process.poll() is not None or time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"launch.py did not start:\n{log_path.read_text(errors='replace')[-3000:]}")
        threading.Event().wait(0.2)   # polling the port, not synchronisation
    return server


def write_other_lora(folder: Path) -> None:
    from ldm_patched.modules.demo_model import build_tiny_sdxl
    from tests.helpers.serving import write_unet_lora

    write_unet_lora(build_tiny_sdxl(seed=0)["unet"], folder / OTHER_LORA, seed=5)


def _client(server: Server, downloads: Path):
    from gradio_client import Client

    return Client(server.url, download_files=str(downloads), verbose=False, analytics_enabled=False)


def _generate(client, request: dict) -> dict:
    return _checked(client.predict(request, api_name="/generate")[1])


def _checked(report: dict) -> dict:
    if "error" in report:
        raise RuntimeError(f"request failed: {report['error']}")
    return report


def _pixels(path: str) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


def _max_difference(images: list[str], twins: list[str]) -> int:
    return max(int(np.abs(_pixels(a) - _pixels(b)).max()) for a, b in zip(images, twins))


def measure(server: Server, downloads: Path, repeats: int = 3) -> dict[str, Any]:
    """The three ways to make four images (each timed `repeats` times, the median kept), and
    the other set's request submitted while four compatible ones are in flight."""
    client = _client(server, downloads / "main")
    other = {**REQUEST, "loras": [[OTHER_LORA, 0.8]], "seed": 900}
    _generate(client, dict(REQUEST))            # warm-up: models loaded, prompt encoded
    other_alone = _generate(client, dict(other))["images"]   # the other set's twin (and its warm-up)
    _generate(client, dict(REQUEST))            # back to the first set
    singles = [{**REQUEST, "seed": REQUEST["seed"] + i} for i in range(4)]
    clients = [_client(server, downloads / f"c{i}") for i in range(5)]

    def sequential() -> list[dict]:
        return [_generate(client, dict(r)) for r in singles]

    def image_number_4() -> dict:
        return _generate(client, {**REQUEST, "image_number": 4})

    def concurrent(requests: list[dict]) -> tuple[list[dict], list[float]]:
        """Each request from its own client, sent together; (reports, seconds to each one's end)."""
        done = [0.0] * len(requests)
        started = time.perf_counter()
        jobs = [c.submit(dict(r), api_name="/generate") for c, r in zip(clients, requests)]
        for i, job in enumerate(jobs):
            job.add_done_callback(lambda _, i=i: done.__setitem__(i, time.perf_counter() - started))
        reports = [_checked(job.result()[1]) for job in jobs]
        return reports, done

    timed = {"sequential": [], "image_number_4": [], "concurrent": []}
    for _ in range(repeats):
        timed["sequential"].append(_timed(sequential))
        timed["image_number_4"].append(_timed(image_number_4))
        timed["concurrent"].append(_timed(lambda: concurrent(singles)))
    seconds = {name: statistics.median(t for t, _ in runs) for name, runs in timed.items()}
    seq, four, (conc, _) = (timed[name][-1][1] for name in ("sequential", "image_number_4", "concurrent"))
    twins = [r["images"][0] for r in seq]
    # The other set's request goes in between the compatible ones: it is served, and waits
    # for at most the batch that was running when it came.
    mixed, done = concurrent([*singles[:2], other, *singles[2:]])
    return {
        "seconds": seconds,
        "speedup_image_number_4": seconds["sequential"] / seconds["image_number_4"],
        "speedup_concurrent": seconds["sequential"] / seconds["concurrent"],
        "unet_calls": {"sequential": sum(r["unet_calls"] for r in seq), "image_number_4": four["unet_calls"],
                       "concurrent_per_request": [r["unet_calls"] for r in conc]},
        "unet_rows_per_call": {"image_number_4": four["unet_rows_per_call"],
                               "concurrent": [r["unet_rows_per_call"] for r in conc]},
        "concurrent_batches": [r.get("batch", {}).get("requests", 1) for r in conc],
        "max_pixel_diff_vs_twins": {"image_number_4": _max_difference(four["images"], twins),
                                    "concurrent": _max_difference([r["images"][0] for r in conc], twins)},
        "other_set": {"served": "error" not in mixed[2],
                      "max_pixel_diff_vs_alone": _max_difference(mixed[2]["images"], other_alone),
                      "batches_of_the_others": [r.get("batch", {}).get("requests", 1) for i, r in enumerate(mixed)
                                                if i != 2],
                      "done_s": done[2], "all_done_s": max(done)},
    }


def _timed(run) -> tuple[float, Any]:
    started = time.perf_counter()
    result = run()
    return time.perf_counter() - started, result


def run_kit(window_ms: float = WINDOW_MS) -> dict[str, Any]:
    results = {}
    with tempfile.TemporaryDirectory(prefix="fooocus_kit_") as tmp:
        for name, flags in configurations(window_ms).items():
            root = Path(tmp) / name.replace(" ", "_").strip("-")
            (root / "loras").mkdir(parents=True)
            write_other_lora(root / "loras")
            server = start_server(root, flags)
            try:
                results[name] = measure(server, root / "downloads")
            finally:
                server.stop()
    return results


def table(results: dict[str, Any]) -> str:
    lines = ["| configuration | 4 sequential s | image_number 4 s (speed-up) | 4 concurrent s (speed-up) "
             "| concurrent: requests per batch | UNet calls: sequential / image_number 4 / each concurrent "
             "| max pixel diff vs twins (n4 / concurrent) | other set meanwhile: served, diff, done / all done s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in results.items():
        calls, other, s = r["unet_calls"], r["other_set"], r["seconds"]
        lines.append(f"| {name} | {s['sequential']:.2f} | {s['image_number_4']:.2f} ({r['speedup_image_number_4']:.2f}x) "
                     f"| {s['concurrent']:.2f} ({r['speedup_concurrent']:.2f}x) | {r['concurrent_batches']} "
                     f"| {calls['sequential']} / {calls['image_number_4']} / {calls['concurrent_per_request']} "
                     f"| {r['max_pixel_diff_vs_twins']['image_number_4']} / {r['max_pixel_diff_vs_twins']['concurrent']} "
                     f"| {other['served']}, {other['max_pixel_diff_vs_alone']}, {other['done_s']:.2f} / "
                     f"{other['all_done_s']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="write the numbers as JSON here")
    parser.add_argument("--window-ms", type=float, default=WINDOW_MS, help="--batch-window-ms of the window row")
    args = parser.parse_args(argv)
    results = run_kit(args.window_ms)
    print(table(results))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
