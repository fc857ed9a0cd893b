"""Ray Serve deployment: route each request to the replica where what it needs is resident.

Only ``serve_ray.py`` (and its tests and benchmark) import this module: ray is an
optional dependency (requirements-ray.txt) and nothing else in the project needs it.

Layout of the application:

* ``Ingress`` (no GPU, many concurrent requests) takes the same JSON object as
  the web UI's ``/generate``, works out the request's *resident set id* (what it
  needs resident: checkpoint file version, refiner, VAE, the LoRA set with
  weights, the performance mode's LoRA) and forwards it to ``Worker`` with that
  id as Ray Serve's multiplexed model id. Ray's router then prefers a replica
  that reported the id (requests whose set is resident somewhere go there) and
  otherwise the replica holding the fewest sets.
* ``Worker`` replicas (one GPU each, or ``num_cpus`` on the CPU) each run the same
  pipeline and model management as ``launch.py``: one request at a time
  (``max_ongoing_requests=1``), ``default_pipeline.Pipeline.process_request``, the
  manager configured from the same flags. The multiplexed "model" a replica
  loads is only a marker that tells Ray the set is resident here; the replica's
  own budget and tiers decide what it actually frees.

With ``routing="blind"`` the ingress sends no id and the router spreads requests
content-blind (round-robin or seeded random): the baseline of an ordinary load
balancer, for tests and the benchmark.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import os
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from ray import serve
from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter  # Ray's default
from ray.serve.request_router import PendingRequest, RunningReplica

log = logging.getLogger("fooocus_resident.ray")

ROUTINGS = ("multiplexed", "blind")            # by resident set id / content-blind
BLIND_POLICIES = ("round-robin", "random")
DEFAULT_SET_BYTES = 7 * 1024 ** 3   # an SDXL checkpoint in fp16 with its text encoders and VAE
ID_LENGTH = 16                      # hex digits of sha256 kept: 64 bits, ample for a fleet's sets


class RequestRejected(ValueError):
    """A request the ingress cannot route (bad field, missing file); the message names it."""


# -- what a request needs resident ------------------------------------------------------

def _file_version(kind: str, path: str, folders) -> dict:
    """A file by its name inside its model folder plus size and mtime: stable across nodes
    that hold copies of the same file (copied with their mtime), different for a rewritten
    file, and the same whether a request names it or gets it as the default."""
    st = os.stat(path)
    name = os.path.relpath(path, _folder_of(path, folders)).replace(os.sep, "/")
    return {"kind": kind, "name": name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def resident_set(request: dict, cfg) -> dict:
    """The parts of a request that decide what must be resident, as plain JSON data.

    Names are resolved in the model folders exactly as ``default_pipeline`` resolves
    them (config.txt, environment, defaults), so a request that names nothing and one
    that names the defaults get the same set. Raises RequestRejected for a request the
    pipeline would refuse before loading anything."""
    from modules import generation_request as dp
    from modules import flags
    from modules.config import ConfigError

    try:
        req = dp.GenerationRequest.from_dict(request, cfg)
        _, tag_loras = dp.split_lora_tags(req.prompt)
        settings = flags.performance_settings(req.performance)
        base_path = dp.resolve_checkpoint(req.base_model, cfg)
        parts = [_file_version("base", base_path, cfg.path_checkpoints)]
        if (req.refiner_model and req.refiner_model != flags.NONE_NAME and settings.refiner_enabled
                and req.refines(req.steps or settings.steps)):
            refiner_path = dp.resolve_checkpoint(req.refiner_model, cfg, "refiner_model")
            if refiner_path != base_path:
                parts.append(_file_version("refiner", refiner_path, cfg.path_checkpoints))
        if req.vae not in ("", flags.DEFAULT_VAE, flags.NONE_NAME):
            from modules import config as config_module
            parts.append(_file_version("vae", config_module.resolve_model_file(req.vae, cfg.path_vae), cfg.path_vae))
        loras = [(name, weight) for name, weight in req.loras + tag_loras]
        for name, weight in loras:
            parts.append({**_file_version("lora", dp.resolve_lora(name, cfg), cfg.path_loras), "weight": float(weight)})
        if settings.lora is not None:
            parts.append(_performance_lora(settings.lora, cfg))
    except (dp.RequestError, ConfigError, ValueError, FileNotFoundError) as error:
        raise RequestRejected(dp.scrub_paths(str(error), cfg)) from error
    return {"parts": parts}


def _folder_of(path: str, folders) -> str:
    """The model folder that holds `path` (its parent when none does)."""
    for folder in folders:
        if os.path.abspath(path).startswith(os.path.abspath(str(folder)) + os.sep):
            return str(folder)
    return os.path.dirname(path)


def _performance_lora(lora, cfg) -> dict:
    """The mode's LoRA by file version, or by name alone while it is not downloaded yet
    (the replica downloads it or fails the request with the file's name)."""
    from modules import config as config_module

    try:
        path = config_module.resolve_model_file(lora.file_name, cfg.path_loras)
    except FileNotFoundError:
        return {"kind": "performance_lora", "name": lora.file_name, "weight": float(lora.weight)}
    return {**_file_version("performance_lora", path, cfg.path_loras), "weight": float(lora.weight)}


def resident_set_id(parts: dict) -> str:
    """A stable short hash of ``resident_set``'s data: the multiplexed model id."""
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:ID_LENGTH]


# -- sizing ------------------------------------------------------------------------------

def sets_per_replica(budget_bytes: int, set_bytes: int, kept_sets: int) -> int:
    """``max_num_models_per_replica``: how many resident sets one replica advertises.

    floor(budget / bytes per set), at least 1 (a replica always serves the set it was
    sent), at most the number of patched LoRA sets the pipeline keeps (past that a set
    Ray believes resident would already have been dropped by the replica)."""
    if set_bytes <= 0:
        raise ValueError(f"bytes per set must be > 0, got {set_bytes}")
    return max(1, min(kept_sets, budget_bytes // set_bytes))


def estimated_set_bytes(cfg) -> int:
    """Bytes one resident set costs, estimated as the largest checkpoint file on disk (a
    new checkpoint costs its weights; a full-coverage LoRA's kept variant costs up to the
    UNet's): DEFAULT_SET_BYTES when the folder holds none."""
    from modules import config as config_module

    sizes = []
    for name in config_module.list_model_files(cfg.path_checkpoints):
        try:
            sizes.append(os.path.getsize(config_module.resolve_model_file(name, cfg.path_checkpoints)))
        except (OSError, FileNotFoundError):
            continue
    return max(sizes) if sizes else DEFAULT_SET_BYTES


# -- process setup shared by ingress and worker --------------------------------------------

@dataclass(frozen=True)
class ServeSpec:
    """What every process of the app needs to see what ``launch.py`` sees: the Fooocus
    flags (argv) and the environment variables that config.txt reading honours."""

    argv: tuple[str, ...] = ()
    env: dict = field(default_factory=dict)
    set_bytes: int | None = None        # None: estimated_set_bytes
    threads: int | None = None          # torch CPU threads per replica (CPU replicas)
    host_share: int = 1                 # replicas sharing one machine's RAM: each gets 1/host_share


def capture_env() -> dict:
    """``config_path`` (made absolute) and every config key set in the environment."""
    from modules.config import CONFIG_KEYS

    env = {k: os.environ[k] for k in (*CONFIG_KEYS, "HF_HUB_OFFLINE") if k in os.environ}
    if "config_path" in os.environ:
        env["config_path"] = os.path.abspath(os.environ["config_path"])
    return env


def _apply_spec(spec: ServeSpec):
    """Flags and config as launch.py has them, in this (Ray worker) process."""
    os.environ.update(spec.env)
    import args_manager
    from modules import config

    args = args_manager.init(list(spec.argv))
    return args, config.reload_config()


# -- the worker replica ------------------------------------------------------------------

def replica_settings(settings, host_share: int):
    """launch.py's settings, with the host-memory budget split between the replicas that
    share a machine (each would otherwise budget the whole RAM for its file caches and
    host-side backups). The device budget is the replica's own GPU's already."""
    import dataclasses

    if host_share > 1 and settings.host_budget_bytes:
        return dataclasses.replace(settings, host_budget_bytes=settings.host_budget_bytes // host_share)
    return settings


@dataclass
class ResidentSetMarker:
    """What Ray's multiplexing holds per set: no tensors, only when it arrived. Ray drops
    markers in LRU order past the cap; the pipeline's own budget frees the memory."""

    set_id: str
    since: float


class Worker:
    """One replica: the launch.py pipeline, one request at a time."""

    def __init__(self, spec: ServeSpec) -> None:
        import torch

        args, cfg = _apply_spec(spec)
        if spec.threads:
            torch.set_num_threads(spec.threads)
        cfg.ensure_folders()
        from ldm_patched.modules import model_management as mm
        from modules import default_pipeline, model_catalogue

        manager = mm.configure(replica_settings(mm.settings_from_args(args), spec.host_share))
        set_bytes = spec.set_bytes or estimated_set_bytes(cfg)
        self.cap = sets_per_replica(manager.settings.budget_bytes, set_bytes, model_catalogue.MAX_PATCHED_SETS)
        self.pipeline = default_pipeline.Pipeline()   # this replica's state, used under self.lock
        self.load_set = serve.multiplexed(max_num_models_per_replica=self.cap)(self._mark_resident)
        self.lock = threading.Lock()
        self.served = 0
        context = serve.get_replica_context()
        import ray
        self.identity = {"replica_id": context.replica_id.unique_id,
                         "node": ray.util.get_node_ip_address(),
                         "device": str(manager.device),
                         "max_sets": self.cap}
        log.info("[Fooocus-Resident] replica %s on %s: budget %.2f GB, %.2f GB per set, up to %d sets",
                 self.identity["replica_id"], manager.device, manager.settings.budget_bytes / mm.GIB,
                 set_bytes / mm.GIB, self.cap)

    @staticmethod
    async def _mark_resident(set_id: str) -> ResidentSetMarker:
        return ResidentSetMarker(set_id, time.time())

    async def generate(self, request: dict) -> dict:
        set_id = serve.get_multiplexed_model_id()
        if set_id:
            await self.load_set(set_id)
        result = await asyncio.to_thread(self._process, request)
        return {"images": result.images, "report": result.report,
                "replica": {**self.identity, "requests_served": self.served, "resident_set_id": set_id or None}}

    def _process(self, request: dict):
        with self.lock:   # max_ongoing_requests=1 already; the pipeline is one per replica
            result = self.pipeline.process_request(request)
            self.served += 1
            return result


# -- the ingress ---------------------------------------------------------------------------

def encode_images(paths: list[str]) -> list[str]:
    """PNG files as base64 strings (the files stay where the replica saved them)."""
    out = []
    for path in paths:
        with open(path, "rb") as handle:
            out.append(base64.b64encode(handle.read()).decode("ascii"))
    return out


class Ingress:
    """HTTP: POST /generate[?routing=multiplexed|blind] with the /generate JSON ->
    images (base64 PNG), image_paths (on the replica's node), report, replica."""

    def __init__(self, worker, spec: ServeSpec, routing: str) -> None:
        if routing not in ROUTINGS:
            raise ValueError(f"routing must be one of {', '.join(ROUTINGS)}, got {routing!r}")
        _, self.cfg = _apply_spec(spec)
        from modules import default_pipeline  # noqa: F401  (imported while deploying, not on the first request)
        self.worker = worker
        self.routing = routing

    async def generate(self, request: dict, routing: str | None = None) -> tuple[int, dict]:
        """(HTTP status, body). The id is worked out here so Ray can route on it."""
        routing = routing or self.routing
        if routing not in ROUTINGS:
            return 400, {"images": [], "image_paths": [], "replica": None,
                         "report": {"error": f"routing must be one of {', '.join(ROUTINGS)}, got {routing!r}"}}
        try:
            set_id = resident_set_id(resident_set(request, self.cfg))
        except RequestRejected as error:
            return 400, {"images": [], "image_paths": [], "report": {"error": str(error)}, "replica": None}
        handle = self.worker
        if routing == "multiplexed":
            handle = handle.options(multiplexed_model_id=set_id)
        started = time.perf_counter()
        answer = await handle.generate.remote(request)
        paths = answer["images"]
        body = {"images": await asyncio.to_thread(encode_images, paths), "image_paths": paths,
                "report": answer["report"], "replica": answer["replica"],
                "resident_set_id": set_id, "routing": routing,
                "ingress_ms": round((time.perf_counter() - started) * 1000, 3)}
        return 200, body

    async def __call__(self, http_request) -> Any:
        from starlette.responses import JSONResponse

        path = http_request.url.path.rstrip("/")
        if not (path.endswith("/generate") and http_request.method == "POST"):
            return JSONResponse({"error": "POST the request JSON to /generate"}, status_code=404)
        try:
            data = await http_request.json()
        except ValueError as error:
            return JSONResponse({"images": [], "report": {"error": f"the body is not JSON: {error}"}},
                                status_code=400)
        status, body = await self.generate(data, http_request.query_params.get("routing"))
        return JSONResponse(body, status_code=status)


# -- routing ---------------------------------------------------------------------------------

class ResidentSetRouter(PowerOfTwoChoicesRequestRouter):
    """Ray's own router for requests that carry a resident set id (multiplexing: the
    replicas that reported the id, else the one holding the fewest sets); content-blind
    for requests without one, the baseline of an ordinary load balancer: ``round-robin``
    rotates over the replicas in a fixed order, ``random`` picks with a seeded generator
    (reproducible runs). Later ranks list the other replicas, so a busy one does not
    stall the request."""

    def initialize_state(self, blind_policy: str = "round-robin", seed: int = 0, **kwargs) -> None:
        if blind_policy not in BLIND_POLICIES:
            raise ValueError(f"blind_policy must be one of {', '.join(BLIND_POLICIES)}, got {blind_policy!r}")
        self.blind_policy = blind_policy
        # Its own stream: a caller that draws its request order from random.Random(seed)
        # must not get replica choices that mirror it.
        self.rng = random.Random(f"ResidentSetRouter:{seed}")
        self.turn = 0
        # Set ids this router sent to a replica that no replica reports yet. A replica's
        # report of a newly loaded set reaches the router later (replica -> controller ->
        # router); until then Ray's router would see the replica as empty and could send a
        # second new set there too. This record bridges that gap; a report clears it.
        self.unreported: dict[str, Any] = {}

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if pending_request is not None and pending_request.metadata.multiplexed_model_id:
            set_id = pending_request.metadata.multiplexed_model_id
            reported = {model for r in candidate_replicas for model in r.multiplexed_model_ids}
            self.unreported = {k: v for k, v in self.unreported.items() if k not in reported}
            if set_id in reported:
                return await super().choose_replicas(candidate_replicas, pending_request)
            return self._rank_for_unreported_set(set_id, candidate_replicas)
        if not candidate_replicas:
            return []
        ordered = sorted(candidate_replicas, key=lambda r: r.replica_id.unique_id)
        if self.blind_policy == "random":
            first = self.rng.randrange(len(ordered))
        else:
            first = self.turn % len(ordered)
            self.turn += 1
        rotated = ordered[first:] + ordered[:first]
        return [[replica] for replica in rotated]

    def _rank_for_unreported_set(self, set_id: str, candidates: list[RunningReplica]) -> list[list[RunningReplica]]:
        """A set no replica reports: the replica it was last sent to, else the one holding the
        fewest sets (reported plus sent and not yet reported); the others after it."""
        if not candidates:
            return []
        target = self.unreported.get(set_id)
        held = {r.replica_id: len(r.multiplexed_model_ids) for r in candidates}
        for replica_id in self.unreported.values():
            if replica_id in held:
                held[replica_id] += 1
        ordered = sorted(candidates, key=lambda r: (r.replica_id != target, held[r.replica_id],
                                                   r.replica_id.unique_id))
        self.unreported[set_id] = ordered[0].replica_id
        return [[replica] for replica in ordered]


# -- the application ---------------------------------------------------------------------------

def build_app(spec: ServeSpec, *, replicas: int, num_gpus: float, num_cpus: float,
              routing: str = "multiplexed", blind_policy: str = "round-robin", seed: int = 0):
    """The bound application: an ingress in front of `replicas` workers.

    `routing` is the ingress's default (a request may ask for the other with
    ``?routing=``); `blind_policy` is how requests without an id are spread."""
    from ray.serve.config import RequestRouterConfig

    if routing not in ROUTINGS:
        raise ValueError(f"routing must be one of {', '.join(ROUTINGS)}, got {routing!r}")
    if replicas < 1:
        raise ValueError(f"replicas must be >= 1, got {replicas}")
    worker = serve.deployment(Worker).options(
        name="FooocusWorker", num_replicas=replicas, max_ongoing_requests=1,
        ray_actor_options={"num_gpus": num_gpus, "num_cpus": num_cpus},
        request_router_config=RequestRouterConfig(
            request_router_class=ResidentSetRouter,
            request_router_kwargs={"blind_policy": blind_policy, "seed": seed}))
    ingress = serve.deployment(Ingress).options(name="FooocusIngress", num_replicas=1,
                                                max_ongoing_requests=1000,
                                                ray_actor_options={"num_cpus": 0})
    return ingress.bind(worker.bind(spec), spec, routing)
