"""`--compile-unet`: compiled once per shape, kept across requests and LoRA switches.

CPU tests use the `aot_eager` backend (dynamo capture + AOT autograd, no code
generation): cheap, and it exercises exactly the guards that decide recompilation.
Dynamo's own process-wide graph counter is the oracle for "nothing recompiled";
the eager pipeline is the oracle for the pixels."""

import numpy as np
import pytest
import torch

import args_manager
from ldm_patched.modules import model_management as mm
from modules import compiled_unet
from tests.unet_lora_files import unet_lora
from tests.helpers import pipelines
from tests.helpers.pipelines import graphs_compiled, pixels

BASE = "tiny_sdxl_base.safetensors"
REQUEST = {"base_model": BASE, "prompt": "a cat", "negative_prompt": "blurry", "width": 64, "height": 64,
           "steps": 1, "seed": 11, "sampler": "euler", "scheduler": "normal", "guidance_scale": 5.0}
# The first request, then ten switches, with returns to earlier sets (and to none).
LORA_SETS = [[], ["a"], ["b"], ["a", "b"], ["a"], [], ["b"], ["a"], ["a", "b"], [], ["b"]]


def write_loras(folders, tiny_components) -> dict[str, str]:
    unet = tiny_components["unet"]
    unet_lora(unet, folders["loras"] / "a.safetensors", ("to_q", "ff.net.2", "conv1"), seed=1)
    unet_lora(unet, folders["loras"] / "b.safetensors", ("to_k", "proj_out", "conv2"), seed=2)
    return {"a": "a.safetensors", "b": "b.safetensors"}


def run_sets(names: dict[str, str], lora_sets: list[list[str]]) -> list:
    results = []
    for lora_set in lora_sets:
        result = pipelines.process_request({**REQUEST, "loras": [[names[n], 1.0] for n in lora_set]})
        assert "error" not in result.report, result.report
        results.append(result)
    return results


def test_lora_switches_and_returns_recompile_nothing_and_match_eager(pipeline, tiny_components, use_compiler):
    use_compiler(enabled=False)
    distinct = [[], ["a"], ["b"], ["a", "b"]]   # same set, same pixels: one eager image per set
    eager_results = run_sets(write_loras(pipeline(mm.Policy.RESIDENT), tiny_components), distinct)
    assert not any(r.report["compile"]["ran_compiled"] for r in eager_results)
    eager = {tuple(s): pixels(r.images[0]) for s, r in zip(distinct, eager_results)}

    use_compiler(enabled=True, backend="aot_eager")
    names = write_loras(pipeline(mm.Policy.RESIDENT), tiny_components)   # fresh registry: the UNet loads anew
    before = graphs_compiled()
    first = run_sets(names, LORA_SETS[:1])
    after_first = graphs_compiled()
    unet = next(iter(pipelines.current().catalogue.state.checkpoints.values())).unet.model
    addresses = {name: p.data_ptr() for name, p in unet.named_parameters()}
    rest = run_sets(names, LORA_SETS[1:])
    # What lets a CUDA graph captured for the first request be replayed after the switches:
    # every parameter still lives at the address the graph would read.
    assert {name: p.data_ptr() for name, p in unet.named_parameters()} == addresses
    compiled = first + rest

    assert after_first > before
    assert first[0].report["compile"]["compiled"] and first[0].report["compile"]["recompilations"] == 0
    assert graphs_compiled() == after_first   # dynamo compiled nothing across the ten switches
    for result in rest:
        report = result.report["compile"]
        assert report["ran_compiled"] and report["compiled_calls"] == REQUEST["steps"] and report["eager_calls"] == 0
        assert (report["compiled"], report["graphs_compiled"], report["recompilations"]) == (False, 0, 0)
    switches = [r.report["model_management"] for r in compiled[2:]]
    assert all(m["weights_patched"] + m["weights_restored"] > 0 for m in switches)   # they were switches

    for lora_set, ours in zip(LORA_SETS, compiled):
        assert np.abs(pixels(ours.images[0]) - eager[tuple(lora_set)]).max() <= 1, lora_set
    assert len({v.tobytes() for v in eager.values()}) == len(eager)   # each set draws its own picture


def test_conservative_policy_keeps_the_compiled_unet_across_requests(pipeline, tiny_components, use_compiler):
    use_compiler(enabled=True, backend="aot_eager")
    folders = pipeline(mm.Policy.CONSERVATIVE)
    unet_lora(tiny_components["unet"], folders["loras"] / "a.safetensors", ("to_q",), seed=1)
    unet_lora(tiny_components["unet"], folders["loras"] / "b.safetensors", ("to_k",), seed=2)
    first, second = [pipelines.process_request({**REQUEST, "loras": [[name, 1.0]]}).report
                     for name in ("a.safetensors", "b.safetensors")]
    assert first["compile"]["compiled"]
    assert second["model_management"]["models_loaded"] > 0 and second["model_management"]["weights_patched"] > 0
    assert second["compile"]["ran_compiled"] and second["compile"]["graphs_compiled"] == 0


class StandInUNet(torch.nn.Module):
    """A module with the UNet call signature, small enough to compile in a blink."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)
        self.context = torch.nn.Linear(8, 4)

    def forward(self, sample, timestep, encoder_hidden_states, added_cond_kwargs, return_dict=False):
        h = self.proj(sample.movedim(1, -1)).movedim(-1, 1) * timestep
        bias = self.context(encoder_hidden_states).mean(1) + added_cond_kwargs["text_embeds"].sum(-1, keepdim=True)
        return (h + (bias + added_cond_kwargs["time_ids"].mean(-1, keepdim=True))[:, :, None, None],)


def stand_in_inputs(device: str, batch: int = 2) -> tuple:
    gen = torch.Generator().manual_seed(0)
    tensors = (torch.randn(batch, 4, 3, 3, generator=gen), torch.tensor(500.0),
               torch.randn(batch, 5, 8, generator=gen), torch.randn(batch, 6, generator=gen),
               torch.randn(batch, 6, generator=gen))
    return tuple(t.to(device) for t in tensors)


def test_a_device_move_recompiles_once_and_counts_it(use_compiler):
    """Conservative mode moves modules between devices (meta stands in for the accelerator):
    the compiled UNet must keep working, and the compile that follows is counted."""
    holder = use_compiler(enabled=True, backend="aot_eager")
    module = StandInUNet()
    saved = {k: v.clone() for k, v in module.state_dict().items()}

    def call(device: str) -> tuple[torch.Tensor, dict]:
        mark = holder.mark()
        with torch.inference_mode():   # as in sampling; modules move outside it, as in model management
            out = holder(module, *stand_in_inputs(device))
        return out, holder.report_since(mark)

    call("cpu")
    module.to("meta")
    out, moved = call("meta")
    assert out.device.type == "meta"
    module.to_empty(device="cpu").load_state_dict(saved)   # back (meta holds no values)
    out, back = call("cpu")
    with torch.inference_mode():
        expected = compiled_unet._unet_forward(module, *stand_in_inputs("cpu"))
    assert (moved["graphs_compiled"], moved["recompilations"], moved["first_compiles"]) == (1, 1, 0)
    assert back["ran_compiled"] and back["graphs_compiled"] == 0   # the CPU entry is still valid
    torch.testing.assert_close(out, expected)


def test_a_new_shape_is_a_first_compile_not_a_recompilation(use_compiler):
    holder = use_compiler(enabled=True, backend="aot_eager")
    module = StandInUNet()
    with torch.inference_mode():
        holder(module, *stand_in_inputs("cpu", batch=2))
        mark = holder.mark()
        holder(module, *stand_in_inputs("cpu", batch=1))
        holder(module, *stand_in_inputs("cpu", batch=1))
    report = holder.report_since(mark)
    assert (report["compiled_calls"], report["first_compiles"], report["recompilations"]) == (2, 1, 0)


def test_weights_written_in_place_are_seen_without_recompiling(use_compiler):
    holder = use_compiler(enabled=True, backend="aot_eager")
    module = StandInUNet()
    inputs = stand_in_inputs("cpu")
    with torch.inference_mode():
        before = holder(module, *inputs)
        mark = holder.mark()
        module.proj.weight.data.copy_(module.proj.weight * 2)   # what the patcher does on a switch
        after = holder(module, *inputs)
        expected = compiled_unet._unet_forward(module, *inputs)
    assert holder.report_since(mark)["graphs_compiled"] == 0
    assert not torch.equal(before, after)
    torch.testing.assert_close(after, expected)


def test_flags_default_off_and_settings_follow_them():
    assert compiled_unet.settings_from_args(args_manager.parse_args([])).enabled is False
    settings = compiled_unet.settings_from_args(args_manager.parse_args(
        ["--compile-unet", "--compile-backend", "aot_eager", "--compile-mode", "max-autotune-no-cudagraphs"]))
    assert settings == compiled_unet.CompileSettings(True, "aot_eager", "max-autotune-no-cudagraphs")
    assert settings.resolved_mode(torch.device("cpu")) is None   # modes are inductor's
    inductor = compiled_unet.CompileSettings(True)
    assert inductor.resolved_mode(torch.device("cuda")) == "reduce-overhead"
    assert inductor.resolved_mode(torch.device("cpu")) == "default"


def test_an_unknown_backend_fails_with_its_name():
    with pytest.raises(ValueError, match="no_such_backend"):
        compiled_unet.CompiledUNets(compiled_unet.CompileSettings(True, "no_such_backend"))


def test_eager_when_disabled(use_compiler):
    holder = use_compiler(enabled=False)
    with torch.inference_mode():
        holder(StandInUNet(), *stand_in_inputs("cpu"))
    report = holder.report_since(compiled_unet.CompiledUNets().mark())
    assert (report["enabled"], report["ran_compiled"], report["eager_calls"]) == (False, False, 1)
