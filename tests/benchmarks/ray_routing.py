"""Fleet benchmark: N Ray Serve replicas, K LoRA sets requested in a random interleaving,
routed by resident set (Ray's multiplexing) against content-blind routing, in one run.

CPU proxy (tiny models written to a temp folder, 2 replicas):

    HF_HUB_OFFLINE=1 .venv/bin/python -m tests.benchmarks.ray_routing --replicas 2 --sets 3 --requests 30

Sized for a multi-GPU node (your config.txt and model folders; LoRA files by name, one
set per --lora, ``name:weight[+name:weight...]``; one replica per GPU):

    .venv/bin/python -m tests.benchmarks.ray_routing --gpu --replicas 8 --requests 400 \\
        --lora a.safetensors:0.8 --lora b.safetensors:1 --lora a.safetensors:0.5+c.safetensors:1 ... \\
        --size 1024 --steps 8 --performance Speed -- --keep-models-resident

Each routing mode gets a fresh fleet and the same request sequence. Per mode it prints
requests that switched (patched a weight or loaded a model), the fleet's total
model-management time (sum of every report's timings_ms.model_management), bytes moved
to devices, and the wall time; --json writes the rows.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
import warnings
from pathlib import Path

MODES = (("multiplexed", "multiplexed", "round-robin"), ("round-robin", "blind", "round-robin"),
         ("random", "blind", "random"))


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--sets", type=int, default=3, help="CPU proxy: how many LoRA sets (ignored with --lora)")
    p.add_argument("--requests", type=int, default=30)
    p.add_argument("--seed", type=int, default=0, help="the interleaving's and the random router's seed")
    p.add_argument("--gpu", action="store_true", help="one GPU per replica, your model folders")
    p.add_argument("--lora", action="append", default=[], help="one LoRA set: name:weight[+name:weight...]")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--performance", default="Speed")
    p.add_argument("--modes", default="multiplexed,round-robin,random")
    p.add_argument("--json", default=None, help="write the result rows here")
    p.add_argument("fooocus_flags", nargs="*", help="after --: flags for the replicas, as for launch.py")
    return p.parse_args(argv)


def parse_set(text: str) -> list[list]:
    out = []
    for item in text.split("+"):
        name, _, weight = item.rpartition(":")
        if not name:
            raise SystemExit(f"--lora {text!r}: expected name:weight")
        out.append([name, float(weight)])
    return out


def tiny_folder(root: Path, sets: int) -> tuple[dict, list[list[list]]]:
    """The tiny base checkpoint and one kohya LoRA file per set (rank i+1), in model folders."""
    from ldm_patched.modules.checkpoint import original_state_dict, save_checkpoint
    from ldm_patched.modules.demo_model import build_tiny_sdxl
    from tests import ray_fleet
    from tests.helpers.lora_files import kohya_lora

    components = build_tiny_sdxl(seed=0)
    checkpoint = save_checkpoint(root / "tiny_sdxl_base.safetensors", original_state_dict(**components))
    folders = ray_fleet.model_folders(root / "models", str(checkpoint))
    lora_sets = []
    for index in range(sets):
        name = f"set_{index}.safetensors"
        kohya_lora(components, folders["loras"] / name, rank=index + 1)
        lora_sets.append([[name, 1.0]])
    return folders, lora_sets


def summarise(mode: str, answers: list[dict], wall_s: float) -> dict:
    reports = [a["report"] for a in answers]
    errors = [r["error"] for r in reports if "error" in r]
    if errors:
        raise SystemExit(f"{mode}: {len(errors)} request(s) failed, first: {errors[0]}")
    mm = [r["model_management"] for r in reports]
    switched = [m["weights_patched"] > 0 or m["models_loaded"] > 0 for m in mm]
    return {"mode": mode, "requests": len(answers),
            "replicas_used": len({a["replica"]["replica_id"] for a in answers}),
            "switches": sum(switched), "switches_after_first_per_replica": sum(switched) - len(
                {a["replica"]["replica_id"] for a in answers}),
            "weights_patched": sum(m["weights_patched"] for m in mm),
            "model_management_ms": round(sum(r["timings_ms"]["model_management"] for r in reports), 1),
            "bytes_to_device": sum(m["bytes_to_device"] for m in mm),
            "total_ms_sum": round(sum(r["timings_ms"]["total"] for r in reports), 1),
            "wall_s": round(wall_s, 2)}


def main(argv: list[str]) -> int:
    options = parse(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from modules import ray_serving
        from tests import ray_fleet
    rng = random.Random(options.seed)
    if options.gpu:
        if not options.lora:
            raise SystemExit("--gpu needs the LoRA sets: --lora name:weight[+name:weight] (at least two)")
        lora_sets = [parse_set(text) for text in options.lora]
        spec = ray_serving.ServeSpec(argv=tuple(options.fooocus_flags), env=ray_serving.capture_env())
        num_gpus, folders = 1.0, None
    else:
        folders, lora_sets = tiny_folder(Path(tempfile.mkdtemp(prefix="ray_bench_")), options.sets)
        spec = ray_fleet.cpu_spec(folders)
        num_gpus = 0.0
    order = [rng.randrange(len(lora_sets)) for _ in range(options.requests)]
    requests = [{"prompt": "a lighthouse at dusk", "performance": options.performance, "steps": options.steps,
                 "width": options.size, "height": options.size, "seed": i, "loras": lora_sets[k]}
                for i, k in enumerate(order)]
    port = ray_fleet.free_port()
    cpus = options.replicas + 1 if not options.gpu else None
    if options.gpu:
        import ray
        from ray import serve
        ray.init(include_dashboard=False, log_to_driver=False)
        serve.start(http_options={"host": "127.0.0.1", "port": port})
    else:
        ray_fleet.start_ray(num_cpus=cpus, port=port)
    rows = []
    try:
        for label, routing, policy in MODES:
            if label not in options.modes.split(","):
                continue
            app = ray_serving.build_app(spec, replicas=options.replicas, num_gpus=num_gpus,
                                        num_cpus=1, routing=routing, blind_policy=policy, seed=options.seed)
            from ray import serve
            serve.run(app, name=ray_fleet.APP, route_prefix="/")
            started = time.perf_counter()
            answers = ray_fleet.post_all(port, requests, timeout_s=600)
            rows.append(summarise(label, answers, time.perf_counter() - started))
            ray_fleet.undeploy()
            print(json.dumps(rows[-1]), flush=True)
    finally:
        ray_fleet.stop_ray()
    print(f"\n{options.replicas} replicas, {len(lora_sets)} LoRA sets, {options.requests} requests "
          f"(interleaving seed {options.seed}), {options.size}x{options.size}, {options.steps} step(s)")
    print(f"{'routing':<12} {'switches':>8} {'per req':>8} {'weights patched':>16} {'mm ms (fleet)':>14} "
          f"{'MiB to device':>14} {'wall s':>8}")
    for row in rows:
        print(f"{row['mode']:<12} {row['switches']:>8} {row['switches'] / row['requests']:>8.2f} "
              f"{row['weights_patched']:>16} {row['model_management_ms']:>14.1f} "
              f"{row['bytes_to_device'] / 2 ** 20:>14.1f} {row['wall_s']:>8.2f}")
    if options.json:
        Path(options.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
