"""Shared by the Ray Serve test and benchmark: a local Ray, a model folder, a fleet run.

Imports ray: only import it after ``pytest.importorskip("ray")`` (or in the benchmark).
"""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import httpx
import ray
from ray import serve

from modules import ray_serving

APP = "fooocus"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def model_folders(root: Path, checkpoint: str) -> dict[str, Path]:
    """checkpoints/ (holding `checkpoint`), loras/, outputs/, vae/ and a config.txt naming them."""
    folders = {name: root / name for name in ("checkpoints", "loras", "outputs", "vae")}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(checkpoint, folders["checkpoints"] / Path(checkpoint).name)
    config = root / "config.txt"
    config.write_text(json.dumps({f"path_{name}": str(folder) for name, folder in folders.items()}))
    folders["config"] = config
    return folders


def cpu_spec(folders: dict[str, Path], threads: int = 1) -> ray_serving.ServeSpec:
    """Flags as `launch.py --keep-models-resident --always-cpu` over the tiny model folder."""
    return ray_serving.ServeSpec(
        argv=("--keep-models-resident", "--always-cpu", str(threads), "--disable-preset-download",
              "--disable-metadata"),
        env={"config_path": str(folders["config"]), "HF_HUB_OFFLINE": "1"}, threads=threads)


def start_ray(num_cpus: int, port: int) -> None:
    """A private local Ray (logical CPUs only: replicas reserve 1 each, the ingress 0)."""
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
             object_store_memory=128 * 1024 ** 2, configure_logging=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})


def stop_ray() -> None:
    try:
        serve.shutdown()
    finally:
        ray.shutdown()


def deploy(spec: ray_serving.ServeSpec, *, replicas: int, routing: str = "multiplexed",
           blind_policy: str = "round-robin", seed: int = 0) -> None:
    """A fresh fleet of CPU replicas (1 logical CPU each) behind the ingress."""
    app = ray_serving.build_app(spec, replicas=replicas, num_gpus=0, num_cpus=1, routing=routing,
                                blind_policy=blind_policy, seed=seed)
    serve.run(app, name=APP, route_prefix="/")


def post_all(port: int, requests: list[dict], routing: str | None = None, timeout_s: float = 120) -> list[dict]:
    """POST `requests` one after another to /generate; each response's JSON with "status" added."""
    params = {"routing": routing} if routing else None
    answers = []
    with httpx.Client(timeout=timeout_s) as client:
        for request in requests:
            response = client.post(f"http://127.0.0.1:{port}/generate", json=request, params=params)
            answers.append({**response.json(), "status": response.status_code})
    return answers


def undeploy() -> None:
    serve.delete(APP)
