"""UNet batches (issue 19): a request's images, and compatible requests the worker joins,
share UNet calls; every image equals the same seed run alone (within BATCH_TOLERANCE on
the CPU in float32); Stop and Skip of one request leave the others alone."""

import threading

import pytest

from ldm_patched.modules import model_management as mm
from modules import core
from modules.async_worker import Worker
from modules.task_types import TaskControl
from tests.helpers import pipelines
from tests.helpers.expansion import build_tiny_expansion
from tests.helpers.lora_files import kohya_lora
from tests.helpers.pipelines import BATCH_TOLERANCE, SMALL, max_difference

TIMEOUT = 300


def alone(request: dict, seed: int) -> str:
    result = pipelines.process_request({**request, "image_number": 1, "seed": seed})
    assert "error" not in result.report, result.report
    return result.images[0]


def test_image_number_4_is_one_unet_batch_and_each_image_equals_its_seed_alone(pipeline):
    pipeline(mm.Policy.RESIDENT)
    request = {**SMALL, "image_number": 4, "steps": 2, "sampler": "euler_ancestral"}   # noise every step
    calls = core.UNET_CALLS.mark()
    result = pipelines.process_request(dict(request))
    assert "error" not in result.report, result.report
    assert core.UNET_CALLS.since(calls).calls == 2   # steps, not 4 x steps
    assert result.report["unet_calls"] == 2 and result.report["unet_rows_per_call"] == {"8": 2}
    assert result.report["model_management"]["text_encodes"] == 2   # the prompt and the negative, once
    assert result.report["seeds"] == [SMALL["seed"] + i for i in range(4)]
    differences = [max_difference(path, alone(request, SMALL["seed"] + i)) for i, path in enumerate(result.images)]
    assert max(differences) <= BATCH_TOLERANCE, differences


def test_fooocus_v2_gives_each_image_of_the_batch_its_own_prompt(pipeline, monkeypatch, tmp_path):
    from modules import config, expansion

    pipeline(mm.Policy.RESIDENT)
    monkeypatch.setenv("path_fooocus_expansion", str(build_tiny_expansion(tmp_path / "fooocus_expansion")))
    config.reload_config()
    try:
        request = {**SMALL, "image_number": 2, "steps": 2, "styles": ["Fooocus V2"]}
        result = pipelines.process_request(dict(request))
        first, second = result.report["prompt_expansions"]
        assert first != second and result.report["unet_rows_per_call"] == {"4": 2}
        for i, path in enumerate(result.images):
            assert max_difference(path, alone(request, SMALL["seed"] + i)) <= BATCH_TOLERANCE
    finally:
        expansion.drop()


def test_the_ledger_sizes_the_batch_and_max_batch_caps_it(pipeline, monkeypatch):
    pipeline(mm.Policy.CONSERVATIVE)   # each load evicts the rest: beside the UNet only working memory
    request = {**SMALL, "image_number": 4, "steps": 2}
    assert "error" not in pipelines.process_request(dict(SMALL)).report
    manager = mm.get_manager()
    unet = next(iter(pipelines.current().catalogue.state.checkpoints.values())).unet
    # Working memory of the published estimate, recomputed here: 2 CFG rows of 16 KiB per latent pixel.
    per_image = 2 * (64 // 8) * (64 // 8) * 16 * 1024 * unet.model_dtype().itemsize // 2
    manager.effective_budget = unet.model_size() + 2 * per_image + per_image // 2   # room for two images
    result = pipelines.process_request(dict(request))
    assert "error" not in result.report, result.report
    assert result.report["unet_rows_per_call"] == {"4": 4}   # two batches of two images, two steps each
    manager.effective_budget = manager.settings.budget_bytes
    pipelines.use_max_batch(monkeypatch, 3)
    assert pipelines.process_request(dict(request)).report["unet_rows_per_call"] == {"6": 2, "2": 2}
    pipelines.use_max_batch(monkeypatch, 1)   # upstream's one image at a time
    assert pipelines.process_request(dict(request)).report["unet_rows_per_call"] == {"2": 8}


def test_stop_and_skip_of_one_request_in_a_batch_leave_the_others_as_alone(pipeline):
    pipeline(mm.Policy.RESIDENT)
    requests = [{**SMALL, "prompt": "a cat", "seed": 1, "image_number": 2, "steps": 3},
                {**SMALL, "prompt": "a dog", "seed": 2, "steps": 3},
                {**SMALL, "prompt": "a bird", "seed": 3, "steps": 3}]
    controls = [TaskControl() for _ in requests]

    def at_step_one(flag: threading.Event):
        return lambda event: flag.set() if event.stage == "sampling" and event.step == 1 else None

    # The first request skips its first image, the second stops, at step 1.
    progresses = [at_step_one(controls[0].skip), at_step_one(controls[1].stop), None]
    results = pipelines.current().process_batch(requests, controls, progresses)
    skipped, stopped, untouched = results
    assert stopped.report["stopped"] and stopped.images == [] and "error" not in stopped.report
    assert skipped.report["skipped"] == [1] and skipped.report["seeds"] == [2]
    assert untouched.report["batch"]["requests"] == 3 and untouched.report["unet_calls"] == 3
    # Step 1 had 4 + 2 + 2 rows; the Skip and the Stop are taken after step 2; step 3 had 2 + 2.
    assert untouched.report["unet_rows_per_call"] == {"8": 2, "4": 1}
    assert max_difference(skipped.images[0], alone(requests[0], 2)) <= BATCH_TOLERANCE
    assert max_difference(untouched.images[0], alone(requests[2], 3)) <= BATCH_TOLERANCE


@pytest.fixture
def worker():
    w = Worker(pipeline_factory=pipelines.current)
    yield w
    w.shutdown(TIMEOUT)


def test_compatible_queued_requests_join_one_batch_and_another_lora_set_is_not_starved(pipeline, worker,
                                                                                       tiny_components):
    folders = pipeline(mm.Policy.RESIDENT)
    kohya_lora(tiny_components, folders["loras"] / "style.safetensors")
    mates = [{**SMALL, "prompt": prompt, "seed": seed, "steps": 2}
             for prompt, seed in (("a cat", 1), ("a dog", 2), ("a bird", 3))]
    other = {**SMALL, "loras": [["style.safetensors", 0.5]], "seed": 9, "steps": 2}
    held = threading.Event()
    worker.call(lambda: held.wait(TIMEOUT))   # the worker waits while all four are queued
    tasks = [worker.submit(mates[0]), worker.submit(other), worker.submit(mates[1]), worker.submit(mates[2])]
    calls = core.UNET_CALLS.mark()
    held.set()
    results = [task.result(TIMEOUT) for task in tasks]
    assert core.UNET_CALLS.since(calls).calls == 4   # 2 steps for the batch of three, 2 for the other set
    batched = [results[0], results[2], results[3]]
    for position, result in enumerate(batched):
        assert result.report["batch"] == {"requests": 3, "position": position, "images_per_unet_batch": 3,
                                          "shared_times": "split by images"}
        assert result.report["unet_calls"] == 2 and result.report["unet_rows_per_call"] == {"6": 2}
    # The other LoRA set waited for one batch, no longer, and ran alone.
    assert tasks[1].started_at >= max(tasks[i].finished_at for i in (0, 2, 3))
    assert "batch" not in results[1].report and results[1].report["unet_rows_per_call"] == {"2": 2}
    for request, result in zip(mates, batched):
        assert max_difference(result.images[0], alone(request, request["seed"])) <= BATCH_TOLERANCE
    assert max_difference(results[1].images[0], alone(other, 9)) == 0   # a batch of one: as before
