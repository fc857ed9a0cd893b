"""Ray Serve launcher: N resident workers behind one HTTP endpoint, each request routed to
the replica where its checkpoint and LoRA set are already resident.

    python serve_ray.py --keep-models-resident [--replicas N] [--num-gpus G] [--num-cpus C]
                        [--routing multiplexed|round-robin|random] [--ray-address ADDR]
                        [--set-gb GB] [Fooocus flags as for launch.py]

Same flags, config.txt and model folders as launch.py (--listen/--port bind the HTTP
endpoint). Needs the optional dependency: pip install -r requirements-ray.txt.
The code lives in modules/ray_serving.py.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import args_manager  # noqa: E402  (sys.path first)

log = logging.getLogger("fooocus_resident.serve_ray")


def ray_parser() -> argparse.ArgumentParser:
    """Flags of this launcher only; everything else goes to args_manager as in launch.py."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--replicas", type=int, default=None,
                   help="worker replicas (default: one per GPU Ray sees, or 1 on the CPU)")
    p.add_argument("--num-gpus", type=float, default=None,
                   help="GPUs per replica (default 1 when Ray sees a GPU, else 0)")
    p.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per replica (default 1)")
    p.add_argument("--routing", choices=("multiplexed", "round-robin", "random"), default="multiplexed",
                   help="multiplexed: by resident set (default); round-robin/random: content-blind baselines "
                        "(a request can ask for the other with /generate?routing=multiplexed|blind)")
    p.add_argument("--ray-address", default=None,
                   help="address of a running Ray cluster ('auto' for the local one); default: start Ray here")
    p.add_argument("--set-gb", type=float, default=None,
                   help="GB one resident set costs, for the per-replica set cap "
                        "(default: the largest checkpoint file)")
    return p


def split_argv(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    ours, rest = ray_parser().parse_known_args(argv)
    for name in ("replicas",):
        value = getattr(ours, name)
        if value is not None and value < 1:
            raise SystemExit(f"--{name} must be >= 1, got {value}")
    if ours.set_gb is not None and ours.set_gb <= 0:
        raise SystemExit(f"--set-gb must be > 0, got {ours.set_gb}")
    return ours, rest


def replicas_per_machine(replicas: int, num_gpus: float, nodes: list[dict]) -> int:
    """How many replicas end up on the busiest machine (they split its RAM): all of them on
    the CPU or a single node, else the most GPUs one node has divided by GPUs per replica."""
    alive = [n for n in nodes if n.get("Alive", True)]
    if not num_gpus or len(alive) <= 1:
        return replicas
    most = max(n.get("Resources", {}).get("GPU", 0) for n in alive)
    return max(1, min(replicas, int(most // num_gpus)))


def main(argv: list[str]) -> int:
    ours, fooocus_argv = split_argv(argv)
    args = args_manager.init(fooocus_argv)
    import launch

    launch.setup_logging()
    from modules import config

    cfg = config.reload_config()
    cfg.ensure_folders()
    launch.ensure_checkpoint(cfg, allow_download=not args.disable_preset_download,
                             always_download=args.always_download_new_model)

    import ray
    from ray import serve

    from modules import ray_serving

    ray.init(address=ours.ray_address)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    num_gpus = ours.num_gpus if ours.num_gpus is not None else (1.0 if gpus and not args.always_cpu else 0.0)
    replicas = ours.replicas or (max(1, int(gpus // num_gpus)) if num_gpus else 1)
    spec = ray_serving.ServeSpec(argv=tuple(fooocus_argv), env=ray_serving.capture_env(),
                                 set_bytes=int(ours.set_gb * 1024 ** 3) if ours.set_gb else None,
                                 threads=None if num_gpus else max(1, int(ours.num_cpus)),
                                 host_share=replicas_per_machine(replicas, num_gpus, ray.nodes()))
    app = ray_serving.build_app(spec, replicas=replicas, num_gpus=num_gpus, num_cpus=ours.num_cpus,
                                routing="multiplexed" if ours.routing == "multiplexed" else "blind",
                                blind_policy="round-robin" if ours.routing == "multiplexed" else ours.routing)
    host = args.listen
    serve.start(http_options={"host": host, "port": args.port})
    log.info("starting %d replica(s) (%g GPU, %g CPU each), routing %s, at http://%s:%d/generate",
             replicas, num_gpus, ours.num_cpus, ours.routing,
             "127.0.0.1" if host == args_manager.LISTEN_ALL_HOST else host, args.port)
    serve.run(app, name="fooocus", route_prefix="/", blocking=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
