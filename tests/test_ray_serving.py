"""Ray Serve deployment (serve_ray.py, modules/ray_serving.py): the resident set id, the
per-replica cap, and a local 2-replica fleet routed by set vs content-blind.

ray is optional (requirements-ray.txt): without it this whole file is skipped.
"""

import base64
import io
import os
import warnings

import pytest

with warnings.catch_warnings():   # ray.serve's pydantic models warn (v1-style Field arguments) on import
    warnings.simplefilter("ignore", DeprecationWarning)
    ray = pytest.importorskip("ray", reason="ray is optional: pip install -r requirements-ray.txt to run these")
    from modules import ray_serving
    from tests import ray_fleet

from PIL import Image  # noqa: E402

from modules import config  # noqa: E402
from tests.helpers.lora_files import kohya_lora  # noqa: E402

SMALL = {"prompt": "a lighthouse", "negative_prompt": "", "performance": "Speed", "steps": 1,
         "width": 64, "height": 64, "guidance_scale": 3.0}
SET_A = [["set_a.safetensors", 1.0]]
SET_B = [["set_b.safetensors", 0.6]]


@pytest.fixture
def folders(tmp_path, tiny_checkpoint, tiny_components, monkeypatch):
    """The tiny model folder with two LoRA files, as this process's config."""
    found = ray_fleet.model_folders(tmp_path, tiny_checkpoint)
    kohya_lora(tiny_components, found["loras"] / "set_a.safetensors", rank=4)
    kohya_lora(tiny_components, found["loras"] / "set_b.safetensors", rank=2)
    monkeypatch.setenv("config_path", str(found["config"]))
    yield found
    monkeypatch.undo()
    config.reload_config()


def set_id(request: dict) -> str:
    return ray_serving.resident_set_id(ray_serving.resident_set(request, config.reload_config()))


# -- the id -------------------------------------------------------------------------------

def test_set_id_names_what_must_be_resident(folders):
    base = set_id({**SMALL, "loras": SET_A})
    # The default checkpoint named or not, seed, prompt text and size do not matter...
    assert set_id({**SMALL, "loras": SET_A, "base_model": "tiny_sdxl_base.safetensors"}) == base
    assert set_id({**SMALL, "loras": SET_A, "seed": 7, "prompt": "another", "width": 128}) == base
    # ... a LoRA given as a prompt tag is the same set as one in the list...
    assert set_id({**SMALL, "prompt": "a lighthouse <lora:set_a.safetensors:1.0>", "loras": []}) == base
    # ... while another weight, another file, no LoRA or a mode with its own LoRA are other sets.
    assert set_id({**SMALL, "loras": [["set_a.safetensors", 0.5]]}) != base
    assert set_id({**SMALL, "loras": SET_B}) != base
    assert set_id({**SMALL, "loras": []}) != base
    (folders["loras"] / "sdxl_lcm_lora.safetensors").write_bytes(b"placeholder")
    assert set_id({**SMALL, "loras": SET_A, "performance": "Extreme Speed"}) != base
    assert len(base) == ray_serving.ID_LENGTH and int(base, 16) >= 0


def test_rewritten_lora_file_is_another_set(folders, tiny_components):
    before = set_id({**SMALL, "loras": SET_A})
    path = folders["loras"] / "set_a.safetensors"
    kohya_lora(tiny_components, path, rank=3)
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert set_id({**SMALL, "loras": SET_A}) != before


def test_bad_requests_are_rejected_naming_the_field_or_file(folders):
    with pytest.raises(ray_serving.RequestRejected, match="prompt"):
        set_id({"width": 64})
    with pytest.raises(ray_serving.RequestRejected, match="missing.safetensors"):
        set_id({**SMALL, "loras": [["missing.safetensors", 1.0]]})
    with pytest.raises(ray_serving.RequestRejected, match="width"):
        set_id({**SMALL, "width": 65})


def test_sets_per_replica_follows_the_budget():
    gib = 1024 ** 3
    assert ray_serving.sets_per_replica(130 * gib, 7 * gib, kept_sets=4) == 4      # capped by what is kept
    assert ray_serving.sets_per_replica(20 * gib, 7 * gib, kept_sets=4) == 2       # floor(20 / 7)
    assert ray_serving.sets_per_replica(3 * gib, 7 * gib, kept_sets=4) == 1        # at least the one it serves
    with pytest.raises(ValueError, match="bytes per set"):
        ray_serving.sets_per_replica(gib, 0, kept_sets=4)


def test_serve_ray_flags_split_from_fooocus_flags():
    import serve_ray

    ours, rest = serve_ray.split_argv(["--replicas", "2", "--keep-models-resident", "--num-cpus", "1",
                                       "--routing", "random", "--port", "9000"])
    assert (ours.replicas, ours.num_cpus, ours.routing) == (2, 1.0, "random")
    assert rest == ["--keep-models-resident", "--port", "9000"]
    with pytest.raises(SystemExit):
        serve_ray.split_argv(["--replicas", "0"])


# -- a local fleet --------------------------------------------------------------------------

def alternating(count: int) -> list[dict]:
    return [{**SMALL, "seed": i, "loras": SET_A if i % 2 == 0 else SET_B} for i in range(count)]


def check_ok(answer: dict) -> dict:
    assert answer["status"] == 200 and "error" not in answer["report"], answer.get("report")
    image = Image.open(io.BytesIO(base64.b64decode(answer["images"][0])))
    assert image.size == (64, 64)
    return answer["report"]["model_management"]


def test_a_new_set_is_not_sent_where_another_new_set_went_before_the_replica_reports_it():
    """A replica reports a set it loaded to the router only later (through Ray's controller).
    Two new sets in a row still go to different replicas, and the first again to its own."""
    import asyncio
    from dataclasses import dataclass
    from types import SimpleNamespace

    @dataclass(frozen=True)
    class ReplicaId:   # Ray's ReplicaID: hashable, with a unique_id
        unique_id: str

    router = ray_serving.ResidentSetRouter.__new__(ray_serving.ResidentSetRouter)
    router.initialize_state()
    replicas = [SimpleNamespace(replica_id=ReplicaId(name), multiplexed_model_ids=set()) for name in ("r1", "r2")]

    def route(set_id):
        request = SimpleNamespace(metadata=SimpleNamespace(multiplexed_model_id=set_id))
        return asyncio.run(router.choose_replicas(replicas, request))[0][0]

    first, second = route("set-a"), route("set-b")
    assert first is not second                   # nothing reported yet: r1 looks as empty as r2
    assert route("set-a") is first and route("set-b") is second
    first.multiplexed_model_ids |= {"set-a", "set-c"}   # r1's reports arrive: the record gives way to them
    assert route("set-d") is second              # r1 holds two sets, r2 the one sent there
    assert router.unreported == {"set-b": second.replica_id, "set-d": second.replica_id}


def test_fleet_routes_each_lora_set_to_the_replica_holding_it(folders):
    """20 requests alternating two LoRA sets over 2 CPU replicas. Routed blind (seeded
    random, an ordinary load balancer) from a fresh fleet, most requests patch; then, on
    the same fleet, routed by resident set, every request after the first two patches
    nothing and moves nothing (whatever the blind run left where)."""
    port = ray_fleet.free_port()
    requests = alternating(20)
    ray_fleet.start_ray(num_cpus=3, port=port)
    try:
        ray_fleet.deploy(ray_fleet.cpu_spec(folders), replicas=2, blind_policy="random", seed=0)
        blind = ray_fleet.post_all(port, requests, routing="blind")
        routed = ray_fleet.post_all(port, requests)
        bad = ray_fleet.post_all(port, [{"width": 64}, {**SMALL, "loras": [["missing.safetensors", 1]]}])
        ray_fleet.undeploy()
    finally:
        ray_fleet.stop_ray()

    blind_counters = [check_ok(answer) for answer in blind]
    patched = sum(mm["weights_patched"] > 0 for mm in blind_counters)
    assert patched > len(blind) // 2, f"only {patched} of {len(blind)} requests patched"
    assert len({answer["replica"]["replica_id"] for answer in blind}) == 2

    counters = [check_ok(answer) for answer in routed]
    replica_of = [answer["replica"]["replica_id"] for answer in routed]
    assert replica_of[0] != replica_of[1]                       # a new set goes to the emptier replica
    for index, mm in enumerate(counters[2:], start=2):
        assert replica_of[index] == replica_of[index % 2], f"request {index} left its set's replica"
        assert (mm["weights_patched"], mm["bytes_to_device"], mm["models_loaded"], mm["lora_files_read"]) \
            == (0, 0, 0, 0), f"request {index}: {mm}"
    assert {answer["resident_set_id"] for answer in routed} == {set_id(requests[0]), set_id(requests[1])}
    assert {answer["replica"]["resident_set_id"] for answer in routed} == {set_id(requests[0]), set_id(requests[1])}

    assert bad[0]["status"] == 400 and "prompt" in bad[0]["report"]["error"]
    assert bad[1]["status"] == 400 and "missing.safetensors" in bad[1]["report"]["error"]


def test_replicas_on_one_machine_split_its_host_budget():
    from ldm_patched.modules import model_management as mm
    import serve_ray

    settings = mm.MemorySettings(budget_bytes=80, host_budget_bytes=1000)
    assert ray_serving.replica_settings(settings, 4).host_budget_bytes == 250
    assert ray_serving.replica_settings(settings, 4).budget_bytes == 80
    node = lambda gpus: {"Alive": True, "Resources": {"GPU": gpus}}  # noqa: E731
    assert serve_ray.replicas_per_machine(8, 1.0, [node(8)]) == 8
    assert serve_ray.replicas_per_machine(16, 1.0, [node(8), node(8)]) == 8
    assert serve_ray.replicas_per_machine(3, 0.0, [node(0), node(0)]) == 3
