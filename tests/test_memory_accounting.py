"""The budget counts everything resident mode adds, frees in tiers, and survives failures.

Tests about devices run on a stand-in accelerator (the `meta` device, tests/helpers/patching.py):
load and offload devices differ, so bytes moved are real counts, and after every load
the registry's ledger must equal the bytes of the tensors actually on that device.
"""

from __future__ import annotations

import pytest
import torch

from ldm_patched.modules import model_management as mm
from ldm_patched.modules import telemetry
from ldm_patched.modules.model_patcher import ModelPatcher, weight_state
from tests.helpers.patching import CPU, META, CheckedManager, lora_for, meta_settings, snapshot


@pytest.fixture
def meta_manager():
    """Factory: a resident (by default) manager whose device is the meta stand-in."""
    baseline = mm.device_tensor_bytes(META)   # meta tensors other tests left alive

    def make(budget: int, policy: mm.Policy = mm.Policy.RESIDENT, host_budget: int = 1 << 40,
             vae_in_cpu: bool = False) -> CheckedManager:
        return CheckedManager(meta_settings(budget, policy, host_budget_bytes=host_budget,
                                            vae_in_cpu=vae_in_cpu), baseline)

    return make


def model(features: int, name: str, dtype=torch.float32, seed: int = 0, load=META) -> ModelPatcher:
    torch.manual_seed(seed)
    module = torch.nn.Linear(features, features, bias=False).to(dtype)
    return ModelPatcher(module, load, CPU, name=name)


def with_lora(base: ModelPatcher, tag: str, seed: int = 1) -> ModelPatcher:
    patched = base.clone()
    patched.add_patches(lora_for(base.model, ["weight"], tag, seed=seed))
    return patched


def request(manager: mm.ModelManager, *loads) -> telemetry.MoveCounters:
    """One request: each load is a list of patchers (a stage)."""
    manager.begin_request()
    for patchers in loads:
        manager.load_models(patchers)
    return manager.end_request().counters


def test_stand_in_accelerator_counts_bytes_both_ways(meta_manager):
    unet = model(64, "unet")
    manager = meta_manager(budget=10 * unet.model_size(), policy=mm.Policy.CONSERVATIVE)
    counters = request(manager, [unet])
    assert counters.bytes_to_device == unet.model_size() and counters.models_loaded == 1
    assert unet.model.weight.device == META
    clip = model(32, "clip")
    counters = request(manager, [clip])      # conservative: loading one evicts the other
    assert counters.bytes_to_offload == unet.model_size() and unet.model.weight.device == CPU


def test_float32_backups_are_planned_with_the_model_counted(meta_manager):
    """Finding 1: a fp16 UNet with a LoRA on every weight under 2.5x its size: float32
    backups (2x) do not fit next to it, fp16 backups (1x) do; it stays loaded."""
    unet = model(64, "unet", dtype=torch.float16)
    size = unet.model_size()
    manager = meta_manager(budget=int(2.5 * size))
    lora = with_lora(unet, "a.safetensors")
    plan = manager.plan_load([lora])
    assert (plan.placement.backup_device, plan.placement.backup_dtype) == (META, None)
    first = request(manager, [lora])
    assert first.models_loaded == 1 and first.models_unloaded == 0
    assert manager.used_bytes(META) <= int(2.5 * size)
    assert weight_state(unet.model).backups["weight"].dtype == torch.float16
    again = request(manager, [with_lora(unet, "a.safetensors")])
    assert (again.models_loaded, again.models_unloaded, again.weights_patched) == (0, 0, 0)
    assert again.bytes_to_device == again.bytes_to_offload == 0


def test_float32_backups_and_factor_caches_when_the_budget_allows(meta_manager):
    unet = model(64, "unet", dtype=torch.float16)
    manager = meta_manager(budget=100 * unet.model_size())
    lora = with_lora(unet, "a.safetensors")
    request(manager, [lora])
    assert weight_state(unet.model).backups["weight"].dtype == torch.float32
    assert weight_state(unet.model).backups["weight"].device == META
    factors = sum(p.cached_bytes(META) for p in weight_state(unet.model).cached_patches.values())
    assert factors == lora.patches["weight"][0].patch.factor_bytes() > 0
    assert manager.used_bytes(META) == unet.model_size() * 3 + factors


def test_plan_charges_new_backups_factors_and_working_memory(meta_manager):
    """Finding 2: a resident model whose LoRA set changes grows by its new backups and
    factors; the plan counts that growth and the stage's working memory."""
    unet = model(64, "unet")
    size = unet.model_size()
    work = size // 2
    manager = meta_manager(budget=2 * size + work)   # model + fp32 backups + work: no room for factors
    request(manager, [unet])
    lora = with_lora(unet, "a.safetensors")
    plan = manager.plan_load([lora], memory_required=work)
    factor_bytes = lora.patches["weight"][0].patch.factor_bytes()
    assert plan.charges[META] == size + work          # weights are resident: backups + working memory
    assert plan.placement == mm.Placement(META, None, False)
    manager.begin_request()
    manager.load_models([lora], memory_required=work)
    assert manager.used_bytes(META) + work <= manager.effective_budget
    manager.end_request()
    roomy = meta_manager(budget=2 * size + work + factor_bytes)
    assert roomy.plan_load([with_lora(model(64, "other"), "a.safetensors")], work).charges[META] == (
        size + size + factor_bytes + work)


def test_plain_lora_plain_plain_settles_under_a_tight_budget(meta_manager):
    """Finding 3 / done-when: a budget that fits the models but not the models plus one
    LoRA set's backups; the last plain request loads and unloads nothing."""
    clip, unet = model(32, "clip", seed=1), model(64, "unet", seed=2)
    budget = clip.model_size() + unet.model_size() + unet.model_size() // 4
    manager = meta_manager(budget=budget)
    plain = lambda: request(manager, [clip], [unet])  # noqa: E731
    plain()
    lora = request(manager, [clip], [with_lora(unet, "a.safetensors")])
    assert lora.models_unloaded == 0 and lora.weights_patched == 1
    plain()
    last = plain()
    assert (last.models_loaded, last.models_unloaded, last.weights_patched, last.weights_restored) == (0, 0, 0, 0)
    assert last.bytes_to_device == last.bytes_to_offload == 0
    assert manager.peak_used <= budget


def test_kept_backups_and_unused_factors_go_before_any_model(meta_manager):
    """Finding 3: what patching kept (backups of restored keys, factors of sets not in use)
    is freed in tiers before a whole model is evicted."""
    clip, unet = model(32, "clip", seed=1), model(64, "unet", seed=2)
    roomy = 10 * (clip.model_size() + unet.model_size())
    manager = meta_manager(budget=roomy)
    request(manager, [with_lora(unet, "a.safetensors")])
    request(manager, [unet])                              # restored; backup and factors kept
    assert weight_state(unet.model).backups and weight_state(unet.model).cached_patches
    manager.effective_budget = unet.model_size() + clip.model_size()   # now tight: room only for weights
    counters = request(manager, [clip])
    assert counters.models_unloaded == 0 and [e.patcher.name for e in manager.loaded] == ["clip", "unet"]
    assert not weight_state(unet.model).backups and not weight_state(unet.model).cached_patches
    assert manager.stats.tier_frees["unused_factor_caches"] > 0 and manager.stats.tier_frees["unpatched_backups"] > 0


def test_float32_backups_downgraded_before_models_are_evicted(meta_manager):
    unet, clip = model(64, "unet", dtype=torch.float16), model(32, "clip", dtype=torch.float16, seed=3)
    manager = meta_manager(budget=100 * unet.model_size())
    request(manager, [with_lora(unet, "a.safetensors")])
    assert weight_state(unet.model).backups["weight"].dtype == torch.float32
    # Room for both models and fp16 backups of the patched key, not float32 ones.
    manager.effective_budget = 2 * unet.model_size() + clip.model_size() + manager.used_bytes(META) \
        - 3 * unet.model_size() - 1
    manager.effective_budget = manager.used_bytes(META) - 1 + clip.model_size() - unet.model_size() + 1
    counters = request(manager, [clip])
    assert counters.models_unloaded == 0
    backup = weight_state(unet.model).backups["weight"]
    assert backup.dtype == torch.float16 or backup.device == CPU
    assert manager.used_bytes(META) <= manager.effective_budget


def test_host_and_device_ledgers_are_separate(meta_manager):
    """Finding 4: a model loaded on the CPU (--vae-in-cpu) is host memory, not device memory."""
    unet = model(64, "unet")
    vae = model(32, "vae", load=CPU)
    manager = meta_manager(budget=unet.model_size(), vae_in_cpu=True)
    request(manager, [unet], [vae])
    assert manager.used_bytes(META) == unet.model_size()
    assert manager.used_bytes(CPU) == vae.model_size()
    assert [e.patcher.name for e in manager.loaded] == ["vae", "unet"]   # the VAE did not evict the UNet
    free = manager.free_bytes(META)
    manager.forget(vae.model)
    assert manager.free_bytes(META) == free
    assert manager.status()["host"]["used_bytes"] == 0


def test_cuda_without_index_is_the_configured_device():
    assert mm.normalize_device("cuda", torch.device("cuda", 1)) == torch.device("cuda", 1)
    assert mm.normalize_device("cuda:0", torch.device("cuda", 1)) == torch.device("cuda", 0)
    manager = mm.ModelManager(mm.MemorySettings(policy=mm.Policy.RESIDENT, device=torch.device("cuda", 0),
                                                budget_bytes=1 << 30))
    unet = ModelPatcher(torch.nn.Linear(4, 4), torch.device("cuda"), CPU, name="unet")
    manager.loaded.append(mm.LoadedModel(unet, torch.device("cuda", 0), 0, weights={torch.device("cuda", 0): 80}))
    plan = manager.plan_load([unet])
    assert plan.already_loaded and not plan.to_load and not plan.to_evict
    assert manager.used_bytes(torch.device("cuda")) == 80


class FailingPatch:
    """A `WeightPatch` whose merge runs out of memory (as a device allocation would)."""

    identity = ("failing", 1)

    def added(self, base, alpha, cache=False):
        raise torch.OutOfMemoryError("injected: out of memory in a merge")

    def cached_bytes(self, device):
        return 0

    def cache_devices(self):
        return []

    def factor_bytes(self):
        return 0

    def drop_cache(self):
        pass


def test_a_failed_load_is_rolled_back_whole(meta_manager):
    """Finding 5: an exception between the move and the patch leaves nothing behind."""
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 16))
    original = snapshot(module)
    good = ModelPatcher(module, META, CPU, name="unet")
    bad = good.clone()
    bad.add_patches(lora_for(module, ["0.weight"], "a.safetensors"))
    bad.add_patches({"1.weight": FailingPatch()})
    manager = meta_manager(budget=1 << 30)
    manager.begin_request()
    with pytest.raises(torch.OutOfMemoryError):
        manager.load_models([bad])
    assert manager.loaded == [] and manager.used_bytes(META) == 0
    assert manager.accounting_error(META, manager.baseline) == 0
    assert module[0].weight.device == CPU and weight_state(module).applied == {}
    assert not weight_state(module).backups
    for key, value in snapshot(module).items():
        assert value.shape == original[key].shape   # data came back from meta as uninitialised storage
    manager.end_request()
    assert request(manager, [good]).models_loaded == 1


def test_a_failed_switch_on_a_resident_model_returns_it_to_its_originals():
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 16))
    original = snapshot(module)
    good = ModelPatcher(module, CPU, CPU, name="unet")
    manager = mm.ModelManager(mm.MemorySettings(policy=mm.Policy.RESIDENT, budget_bytes=1 << 30))
    lora = good.clone()
    lora.add_patches(lora_for(module, ["0.weight"], "a.safetensors"))
    request(manager, [lora])
    bad = lora.clone()
    bad.add_patches({"1.weight": FailingPatch()})
    manager.begin_request()
    with pytest.raises(torch.OutOfMemoryError):
        manager.load_models([bad])
    manager.end_request()
    assert good.is_applied() and weight_state(module).applied == {}
    for key, value in snapshot(module).items():
        assert torch.equal(value, original[key]), key
    again = request(manager, [lora])
    assert again.weights_patched == 1 and lora.is_applied()


def test_out_of_memory_recovery_frees_and_lowers_the_budget(meta_manager):
    clip, unet = model(32, "clip", seed=1), model(64, "unet", seed=2)
    manager = meta_manager(budget=10 * (clip.model_size() + unet.model_size()))
    request(manager, [clip], [with_lora(unet, "a.safetensors")])
    budget = manager.effective_budget
    manager.recover_from_oom(keep_loaded=[unet])
    assert [e.patcher.name for e in manager.loaded] == ["unet"]
    assert manager.effective_budget < budget and manager.status()["effective_budget_bytes"] == manager.effective_budget
    assert manager.status()["cache_stats"]["out_of_memory"] == 1
    assert manager.accounting_error(META, manager.baseline) == 0


def test_cuda_calls_name_the_configured_device(monkeypatch):
    """Finding 7: empty_cache and memory queries act on the configured device, not cuda:0."""
    calls = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: calls.append(("info", device)) or (1, 2))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: calls.append(("alloc", device)) or 0)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: calls.append(("empty", torch.cuda.current_device())))

    class FakeDevice:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            calls.append(("device", self.device))

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "device", FakeDevice)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    manager = mm.ModelManager(mm.MemorySettings(policy=mm.Policy.RESIDENT, device=torch.device("cuda", 1),
                                                budget_bytes=1 << 30))
    manager.recover_from_oom()
    cuda1 = torch.device("cuda", 1)
    assert ("device", cuda1) in calls and ("info", cuda1) in calls and ("alloc", cuda1) in calls
    assert calls.index(("device", cuda1)) < next(i for i, c in enumerate(calls) if c[0] == "empty")


def test_a_return_to_a_recent_set_copies_kept_variants(meta_manager):
    """Merged values of the set switched away from are kept (counted, first tier) and
    copied back on return: no merge."""
    unet = model(64, "unet")
    manager = meta_manager(budget=100 * unet.model_size())
    request(manager, [with_lora(unet, "a.safetensors")])
    to_b = request(manager, [with_lora(unet, "b.safetensors", seed=2)])
    assert to_b.weights_from_variants == 0 and len(weight_state(unet.model).variants) == 1
    back = request(manager, [with_lora(unet, "a.safetensors")])
    assert (back.weights_patched, back.weights_from_variants) == (1, 1)
    manager.effective_budget = manager.used_bytes(META) - 1
    request(manager, [with_lora(unet, "a.safetensors")])
    assert len(weight_state(unet.model).variants) == 1   # B's variant is gone, A (applied) kept none
