"""ModelPatcher: exact patch/restore, patch by diff, state shared by clones."""

import pytest
import torch

from ldm_patched.modules import telemetry
from ldm_patched.modules.model_patcher import ModelPatcher, weight_state
from tests.helpers.patching import lora_for, snapshot

CPU = torch.device("cpu")


def toy_module(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Conv2d(16, 4, 3))


def test_unpatch_restores_every_weight_bit_exactly():
    module = toy_module()
    original = snapshot(module)
    patcher = ModelPatcher(module, CPU, CPU)
    patcher.add_patches(lora_for(module, ["0.weight", "2.weight"], "a.safetensors"), 0.7)
    patcher.patch_model()
    assert not torch.equal(module.get_parameter("0.weight"), original["0.weight"])
    patcher.unpatch_model()
    for key, value in snapshot(module).items():
        assert torch.equal(value, original[key]), key


def test_merge_equals_formula_and_keeps_addresses():
    module = toy_module()
    w0 = module.get_parameter("0.weight").detach().clone()
    address = module.get_parameter("0.weight").data_ptr()
    patches = lora_for(module, ["0.weight"], "a.safetensors")
    factors = patches["0.weight"].factors
    patcher = ModelPatcher(module, CPU, CPU)
    patcher.add_patches(patches, strength_patch=0.5)
    patcher.patch_model()
    expected = w0 + 0.5 * (factors.alpha / factors.rank) * (factors.up @ factors.down)
    assert torch.allclose(module.get_parameter("0.weight"), expected, atol=1e-6)
    assert module.get_parameter("0.weight").data_ptr() == address


def test_diff_between_clones_touches_only_changed_keys():
    module = toy_module()
    original = snapshot(module)
    base = ModelPatcher(module, CPU, CPU)
    a = lora_for(module, ["0.weight"], "a.safetensors", seed=1)
    b = lora_for(module, ["2.weight"], "b.safetensors", seed=2)
    with_a = base.clone()
    with_a.add_patches(a)
    with_ab = with_a.clone()
    with_ab.add_patches(b)
    with_b = base.clone()
    with_b.add_patches(b)

    assert with_a.patch_model().patched == 1
    result = with_ab.patch_model()
    assert (result.patched, result.restored) == (1, 0)
    result = with_b.patch_model()
    assert (result.patched, result.restored) == (0, 1)
    assert torch.equal(module.get_parameter("0.weight"), original["0.weight"])
    assert with_b.is_applied() and not with_ab.is_applied()
    # Re-asking for the applied state writes nothing.
    assert with_b.clone().patch_model().patched == 0


def test_changed_strength_rewrites_from_original():
    module = toy_module()
    patches = lora_for(module, ["0.weight"], "a.safetensors")
    strong, weak = ModelPatcher(module, CPU, CPU), ModelPatcher(module, CPU, CPU)
    strong.add_patches(patches, 1.0)
    weak.add_patches(patches, 0.25)
    weak.patch_model()
    expected = module.get_parameter("0.weight").detach().clone()
    strong.patch_model()
    result = weak.patch_model()
    assert (result.patched, result.restored) == (1, 1)
    assert torch.equal(module.get_parameter("0.weight"), expected)


def test_signature_is_content_not_object():
    module = toy_module()
    one, two = ModelPatcher(module, CPU, CPU), ModelPatcher(module, CPU, CPU)
    one.add_patches(lora_for(module, ["0.weight"], "a.safetensors", seed=1))
    two.add_patches(lora_for(module, ["0.weight"], "a.safetensors", seed=1))
    assert one.weight_signature() == two.weight_signature()
    three = ModelPatcher(module, CPU, CPU)
    three.add_patches(lora_for(module, ["0.weight"], "other.safetensors", seed=1))
    assert three.weight_signature() != one.weight_signature()


class ExplodingPatch:
    identity = ("boom",)

    def added(self, base, alpha, cache=False):
        raise RuntimeError("patch failed")

    def cached_bytes(self, device):
        return 0

    def drop_cache(self):
        pass


def test_failure_mid_patch_leaves_a_state_the_next_patch_repairs():
    module = toy_module()
    reference = toy_module()
    good = lora_for(module, ["0.weight", "2.weight"], "a.safetensors")
    clean = ModelPatcher(reference, CPU, CPU)
    clean.add_patches(lora_for(reference, ["0.weight", "2.weight"], "a.safetensors"))
    clean.patch_model()

    bad = ModelPatcher(module, CPU, CPU)
    bad.add_patches(good)
    bad.add_patches({"2.weight": ExplodingPatch()})
    with pytest.raises(RuntimeError):
        bad.patch_model()
    assert not bad.is_applied()

    fixed = ModelPatcher(module, CPU, CPU)
    fixed.add_patches(good)
    fixed.patch_model()
    assert fixed.is_applied()
    for key, value in snapshot(module).items():
        assert torch.equal(value, snapshot(reference)[key]), key
    fixed.unpatch_model()
    assert weight_state(module).backups == {}


def test_counters_count_writes_and_no_bytes_for_same_device_move():
    module = toy_module()
    patcher = ModelPatcher(module, CPU, CPU)
    patcher.add_patches(lora_for(module, ["0.weight", "2.weight"], "a.safetensors"))
    before = telemetry.snapshot()
    patcher.patch_model(device_to=CPU)
    patcher.unpatch_model(device_to=CPU)
    moved = telemetry.snapshot().minus(before)
    assert (moved.weights_patched, moved.weights_restored) == (2, 2)
    assert moved.bytes_to_device == moved.bytes_to_offload == 0


def test_factor_caches_outlive_a_switch_and_can_be_dropped_except_the_wanted():
    module = toy_module()
    a = lora_for(module, ["0.weight"], "a.safetensors")
    b = lora_for(module, ["2.weight"], "b.safetensors")
    dropped = []
    for patch in (*a.values(), *b.values()):
        patch.drop_cache = (lambda p=patch: dropped.append(p.file.path))
    with_a, with_b = ModelPatcher(module, CPU, CPU), ModelPatcher(module, CPU, CPU)
    with_a.add_patches(a)
    with_b.add_patches(b)
    with_a.patch_model(cache_factors=True, keep_backups=True)
    with_b.patch_model(cache_factors=True, keep_backups=True)
    assert dropped == []                         # switching keeps A's factors for A's return
    with_b.drop_factor_caches(keep=[with_b])       # what the policy does when the budget is short
    assert dropped == ["a.safetensors"]
    with_b.drop_factor_caches()                  # eviction
    assert dropped == ["a.safetensors", "b.safetensors"]


def test_kept_backups_make_a_switch_back_exact_and_eviction_frees_them():
    module = toy_module()
    original = snapshot(module)
    with_a = ModelPatcher(module, CPU, CPU)
    with_a.add_patches(lora_for(module, ["0.weight", "2.weight"], "a.safetensors"))
    plain = ModelPatcher(module, CPU, CPU)
    with_a.patch_model(keep_backups=True)
    patched = snapshot(module)
    plain.patch_model(keep_backups=True)
    assert len(weight_state(module).backups) == 2          # originals kept for the next switch
    assert all(torch.equal(v, original[k]) for k, v in snapshot(module).items())
    with_a.patch_model(keep_backups=True)
    assert all(torch.equal(v, patched[k]) for k, v in snapshot(module).items())
    with_a.unpatch_model()
    assert weight_state(module).backups == {}
    assert all(torch.equal(v, original[k]) for k, v in snapshot(module).items())


def test_float32_backups_of_half_weights_merge_and_restore_identically():
    merged = {}
    for dtype in (None, torch.float32):
        module = toy_module().to(torch.bfloat16)
        original = snapshot(module)
        patcher = ModelPatcher(module, CPU, CPU)
        patcher.add_patches(lora_for(toy_module(), ["0.weight", "2.weight"], "a.safetensors"), 0.8)
        patcher.patch_model(backup_dtype=dtype)
        assert weight_state(module).backups["0.weight"].dtype == (dtype or torch.bfloat16)
        merged[dtype] = snapshot(module)
        patcher.unpatch_model()
        assert all(torch.equal(v, original[k]) for k, v in snapshot(module).items())
    assert all(torch.equal(merged[None][k], merged[torch.float32][k]) for k in merged[None])


def test_kept_variants_return_to_a_set_bit_identically_without_a_merge():
    module = toy_module()
    a_patches = lora_for(module, ["0.weight", "2.weight"], "a.safetensors")
    b_patches = lora_for(module, ["0.weight"], "b.safetensors", seed=5)
    with_a, with_b = ModelPatcher(module, CPU, CPU), ModelPatcher(module, CPU, CPU)
    with_a.add_patches(a_patches, 0.7)
    with_b.add_patches(b_patches)
    with_a.patch_model(keep_backups=True, keep_variants=True)
    merged_a = snapshot(module)
    with_b.patch_model(keep_backups=True, keep_variants=True)
    for key in a_patches:
        a_patches[key].added = None   # a merge of A's patches now would fail
    result = with_a.patch_model(keep_backups=True, keep_variants=True)
    assert (result.patched, result.from_variants, result.restored) == (2, 2, 1)   # B had only 0.weight
    for key, value in snapshot(module).items():
        assert torch.equal(value, merged_a[key]), key


class _OpCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts the aten operators a block runs (each one is at least one kernel launch)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        self.ops[name] = self.ops.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def _half_model(layers: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(layers)]).half()


def test_a_new_set_is_written_with_one_multi_tensor_copy_and_the_same_values():
    """Issue 12 item 2: a merge writes every key of a batch with one copy launch, not a copy
    per key; the weights equal a per-key merge (original as float32 + addmm, cast) bit for bit."""
    model = _half_model(12)
    keys = [f"{i}.weight" for i in range(12)]
    patches = lora_for(model, keys, "style")
    originals = snapshot(model)
    patcher = ModelPatcher(model, torch.device("cpu"), torch.device("cpu"))
    patcher.add_patches(patches, 0.7)
    counter = _OpCounter()
    with counter:
        result = patcher.patch_model()
    assert result.patched == 12
    assert counter.ops.get("_foreach_copy_") == 1 and counter.ops.get("copy_", 0) == 0, counter.ops
    for key in keys:
        factors = patches[key].factors
        expected = torch.addmm(originals[key].float(), factors.up.float(), factors.down.float(),
                               alpha=0.7 * factors.scale).to(torch.float16)
        assert torch.equal(model.get_parameter(key), expected), key
    patcher.unpatch_model()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in originals.items())


def test_a_batch_of_writes_is_bounded_in_bytes(monkeypatch):
    from ldm_patched.modules import model_patcher

    model = _half_model(6)
    keys = [f"{i}.weight" for i in range(6)]
    monkeypatch.setattr(model_patcher, "WRITE_BATCH_BYTES", 2 * 16 * 16 * 4)   # two float32 results
    patcher = ModelPatcher(model, torch.device("cpu"), torch.device("cpu"))
    patcher.add_patches(lora_for(model, keys, "style"), 1.0)
    counter = _OpCounter()
    with counter:
        patcher.patch_model()
    assert counter.ops.get("_foreach_copy_") == 3, counter.ops
