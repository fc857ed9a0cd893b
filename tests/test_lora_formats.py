"""Every LoRA-family format of issue 10, with real key names, merged on the tiny model.

Oracle: the published formula, computed here independently of lora_adapters (loops,
per-kernel-position products, block-built Kronecker products), and diffusers'
`load_lora_weights` + `fuse_lora` for the formats diffusers reads.
"""

import copy

import pytest
import torch

from ldm_patched.modules.lora import (LoraError, match_lora, read_lora_file, text_encoder_lora_names,
                                      unet_lora_names)
from ldm_patched.modules.model_patcher import ModelPatcher
from modules.core import SDXLTextEncoders
from tests.helpers.lora_files import (ENCODERS, TE_SCHEMES, UNET_LAYERS, UNET_SCHEMES, find_text_layers,
                                      find_unet_layers, lora_factors, lora_tensors, processor_name, rand, write)
from tests.helpers.lora_files import diffusers_fused

CPU = torch.device("cpu")
ALL_TE_LAYERS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                 "mlp.fc1", "mlp.fc2")
ATTENTION = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_out.0")


def merge(components, path: str, strength: float):
    """Our loader on a copy of `components`: (state dicts by component, match)."""
    parts = copy.deepcopy(components)
    unet = ModelPatcher(parts["unet"], CPU, CPU, "unet")
    clip = ModelPatcher(SDXLTextEncoders(parts["text_encoder"], parts["text_encoder_2"]), CPU, CPU, "clip")
    match = match_lora(read_lora_file(path), {"unet": (unet_lora_names(unet.model), unet.model),
                                              "clip": (text_encoder_lora_names(clip.model), clip.model)})
    unet.add_patches(match.patches["unet"], strength)
    clip.add_patches(match.patches["clip"], strength)
    unet.patch_model()
    clip.patch_model()
    return {name: parts[name].state_dict() for name in ("unet", *ENCODERS)}, match


def check(components, merged: dict, expected: dict[tuple[str, str], torch.Tensor], atol: float = 1e-5) -> None:
    """Expected keys carry the formula's value, every other weight is untouched."""
    assert expected
    for name in ("unet", *ENCODERS):
        for key, value in components[name].state_dict().items():
            want = expected.get((name, key))
            if want is None:
                assert torch.equal(merged[name][key], value), f"{name}.{key} changed"
            else:
                assert not torch.equal(want, value), f"{name}.{key}: the change is zero, the test proves nothing"
                assert torch.allclose(merged[name][key], want, atol=atol, rtol=0), f"{name}.{key}"


def lora_delta(up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """sum_r up[o, r] * down[r, i, ...]: the LoRA change, conv kernels riding along."""
    return torch.einsum("or,ri...->oi...", up.flatten(1), down)


def weight(components, name: str, key: str) -> torch.Tensor:
    return components[name].state_dict()[key].float()


# -- naming schemes ---------------------------------------------------------------------

UNET_CASES = {  # scheme -> (name for (diffusers path, original path), LoRA suffix style, alpha)
    "kohya_original": (UNET_SCHEMES["kohya_original"], "kohya", 2.0),
    "kohya_diffusers": (UNET_SCHEMES["kohya_diffusers"], "kohya", 2.0),
    "lycoris": (UNET_SCHEMES["lycoris"], "kohya", 8.0),
    "peft": (UNET_SCHEMES["peft"], "peft", None),
    "comfy": (UNET_SCHEMES["comfy"], "kohya", 4.0),
    "diffusers_dot_lora": (UNET_SCHEMES["peft"], "diffusers", None),
    "processor_with_unet": (lambda d, o: processor_name(d, "unet."), "processor", None),
    "processor_without_unet": (lambda d, o: processor_name(d, ""), "processor", None),
}


@pytest.mark.parametrize("scheme", list(UNET_CASES))
def test_unet_naming_schemes_merge_the_lora_formula(tiny_components, tmp_path, scheme):
    namer, style, alpha = UNET_CASES[scheme]
    rank, strength = 4, 0.8
    layers = ATTENTION if style == "processor" else UNET_LAYERS
    tensors, expected = {}, {}
    for diffusers, original, shape in find_unet_layers(tiny_components["unet"], layers):
        tensors.update(lora_tensors(namer(diffusers, original), shape, rank, alpha, style, seed_name=diffusers))
        up, down = lora_factors(shape, rank, diffusers)
        scale = 1.0 if alpha is None else alpha / rank
        key = diffusers + ".weight"
        expected[("unet", key)] = weight(tiny_components, "unet", key) + strength * scale * lora_delta(up, down)
    merged, match = merge(tiny_components, write(tensors, tmp_path / f"{scheme}.safetensors"), strength)
    assert match.unmatched == [] and len(match.patches["unet"]) == len(expected)
    check(tiny_components, merged, expected)


TE_CASES = {  # scheme -> (name for (encoder, inner path), LoRA suffix style, alpha)
    "kohya": (TE_SCHEMES["kohya"], "kohya", 2.0),
    "peft": (TE_SCHEMES["peft"], "peft", None),
    "peft_alpha_tensors": (TE_SCHEMES["peft"], "peft", 8.0),
    "peft_without_text_model": (lambda e, inner: f"{e}.{inner}", "peft", None),
    "diffusers_lora_linear_layer": (TE_SCHEMES["peft"], "transformers", None),
    "diffusers_dot_lora": (TE_SCHEMES["peft"], "diffusers", None),
    "comfy": (TE_SCHEMES["comfy"], "kohya", 1.0),
}


@pytest.mark.parametrize("scheme", list(TE_CASES))
def test_text_encoder_schemes_match_every_key_on_clip_l_and_clip_g(tiny_components, tmp_path, scheme):
    """Every projection of both encoders, zero unmatched (transformers 5 puts CLIP-L's
    layers without the `text_model.` level the files name)."""
    namer, style, alpha = TE_CASES[scheme]
    rank, strength = 4, 0.6
    tensors, expected = {}, {}
    counts = {}
    for encoder in ENCODERS:
        layers = find_text_layers(tiny_components[encoder], ALL_TE_LAYERS)
        counts[encoder] = len(layers)
        for inner, key, shape in layers:
            seed = f"{encoder}.{inner}"
            tensors.update(lora_tensors(namer(encoder, inner), shape, rank, alpha, style, seed_name=seed))
            up, down = lora_factors(shape, rank, seed)
            scale = 1.0 if alpha is None else alpha / rank
            expected[(encoder, key)] = weight(tiny_components, encoder, key) + strength * scale * lora_delta(up, down)
    merged, match = merge(tiny_components, write(tensors, tmp_path / f"{scheme}.safetensors"), strength)
    assert match.unmatched == [] and match.warnings == []
    taken = list(match.patches["clip"])
    assert sum(k.startswith("text_encoder.") for k in taken) == counts["text_encoder"] == 2 * len(ALL_TE_LAYERS)
    assert sum(k.startswith("text_encoder_2.") for k in taken) == counts["text_encoder_2"] == 2 * len(ALL_TE_LAYERS)
    check(tiny_components, merged, expected)


def test_a_whole_text_encoder_unmatched_is_a_warning_naming_it(tiny_components, tmp_path):
    """Names without the `text_model.` level in kohya layout are the classic converter bug."""
    tensors = {}
    for inner, _, shape in find_text_layers(tiny_components["text_encoder"]):
        tensors.update(lora_tensors("lora_te1_" + inner.replace(".", "_"), shape, 4, 4.0))
    for inner, _, shape in find_text_layers(tiny_components["text_encoder_2"]):
        tensors.update(lora_tensors(TE_SCHEMES["kohya"]("text_encoder_2", inner), shape, 4, 4.0))
    _, match = merge(tiny_components, write(tensors, tmp_path / "broken.safetensors"), 1.0)
    assert len(match.warnings) == 1
    assert "CLIP-L" in match.warnings[0] and "NOT applied" in match.warnings[0]
    assert "broken.safetensors" in match.warnings[0]
    assert all(k.startswith("text_encoder_2.") for k in match.patches["clip"])


# -- diffusers as the oracle where it reads the format ------------------------------------

def _diffusers_case(components, scheme: str) -> dict[str, torch.Tensor]:
    tensors = {}
    if scheme == "processor":
        for diffusers, _, shape in find_unet_layers(components["unet"], ATTENTION):
            tensors.update(lora_tensors(processor_name(diffusers, "unet."), shape, 4, None, "processor"))
    elif scheme == "dot_lora":
        for diffusers, _, shape in find_unet_layers(components["unet"], ATTENTION):
            tensors.update(lora_tensors("unet." + diffusers, shape, 4, None, "diffusers"))
        for inner, _, shape in find_text_layers(components["text_encoder"]):
            tensors.update(lora_tensors("text_encoder.text_model." + inner, shape, 4, None, "transformers"))
    else:   # kohya over diffusers block names, as the LCM/Lightning/Hyper-SD files are
        for diffusers, _, shape in find_unet_layers(components["unet"]):
            tensors.update(lora_tensors("lora_unet_" + diffusers.replace(".", "_"), shape, 4, 2.0))
    return tensors


@pytest.mark.parametrize("scheme", ["processor", "dot_lora", "kohya_diffusers_names"])
def test_formats_diffusers_reads_merge_like_diffusers_fuse_lora(tiny_components, tmp_path, scheme):
    path = write(_diffusers_case(tiny_components, scheme), tmp_path / f"{scheme}.safetensors")
    merged, match = merge(tiny_components, path, 0.7)
    pipe = diffusers_fused(tiny_components, path, 0.7)
    assert match.unmatched == []
    changed = 0
    for name, module in (("unet", pipe.unet), ("text_encoder", pipe.text_encoder),
                         ("text_encoder_2", pipe.text_encoder_2)):
        for key, value in module.state_dict().items():
            assert torch.allclose(merged[name][key], value, atol=1e-5, rtol=0), f"{name}.{key}"
            changed += not torch.equal(value, tiny_components[name].state_dict()[key])
    assert changed == match.matched_count


# -- adapters ---------------------------------------------------------------------------

def _layers(components, layers):
    return find_unet_layers(components["unet"], layers)


def _kohya(original: str) -> str:
    return "lora_unet_" + original.replace(".", "_")


def test_loha_linear_and_conv(tiny_components, tmp_path):
    rank, alpha, strength = 3, 1.5, 0.9
    tensors, expected = {}, {}
    for diffusers, original, shape in _layers(tiny_components, ("attn1.to_q", "ff.net.2", "conv1")):
        out, width = shape[0], shape[1:].numel()
        f = {n: rand(f"{diffusers}.{n}", *s) for n, s in
             (("w1a", (out, rank)), ("w1b", (rank, width)), ("w2a", (out, rank)), ("w2b", (rank, width)))}
        name = _kohya(original)
        tensors.update({f"{name}.hada_w1_a": f["w1a"], f"{name}.hada_w1_b": f["w1b"],
                        f"{name}.hada_w2_a": f["w2a"], f"{name}.hada_w2_b": f["w2b"],
                        f"{name}.alpha": torch.tensor(alpha)})
        delta = torch.zeros(out, width)
        for o in range(out):    # elementwise product of two low-rank matrices, entry by entry
            delta[o] = (f["w1a"][o] @ f["w1b"]) * (f["w2a"][o] @ f["w2b"])
        key = diffusers + ".weight"
        expected[("unet", key)] = weight(tiny_components, "unet", key) + strength * alpha / rank * delta.reshape(shape)
    merged, match = merge(tiny_components, write(tensors, tmp_path / "loha.safetensors"), strength)
    assert match.unmatched == []
    check(tiny_components, merged, expected)


def _tucker_by_position(core: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """[out, in, kh, kw]: at each kernel position, wa^T @ core[:, :, kh, kw] @ wb."""
    out = torch.zeros(wa.shape[1], wb.shape[1], *core.shape[2:])
    for kh in range(core.shape[2]):
        for kw in range(core.shape[3]):
            out[:, :, kh, kw] = wa.T @ core[:, :, kh, kw] @ wb
    return out


def test_loha_tucker_conv(tiny_components, tmp_path):
    rank, alpha, strength = 2, 1.0, 1.1
    tensors, expected = {}, {}
    for diffusers, original, shape in _layers(tiny_components, ("conv2",)):
        out, inp, kh, kw = shape
        f = {n: rand(f"{diffusers}.{n}", *s) for n, s in
             (("t1", (rank, rank, kh, kw)), ("w1a", (rank, out)), ("w1b", (rank, inp)),
              ("t2", (rank, rank, kh, kw)), ("w2a", (rank, out)), ("w2b", (rank, inp)))}
        name = _kohya(original)
        tensors.update({f"{name}.hada_{n[:2]}_{n[2]}" if n[0] == "w" else f"{name}.hada_{n}": t for n, t in f.items()})
        tensors[f"{name}.alpha"] = torch.tensor(alpha)
        delta = _tucker_by_position(f["t1"], f["w1a"], f["w1b"]) * _tucker_by_position(f["t2"], f["w2a"], f["w2b"])
        key = diffusers + ".weight"
        expected[("unet", key)] = weight(tiny_components, "unet", key) + strength * alpha / rank * delta
    merged, match = merge(tiny_components, write(tensors, tmp_path / "loha_tucker.safetensors"), strength)
    assert match.unmatched == [] and {f.kind for f in read_lora_file(tmp_path / "loha_tucker.safetensors"
                                                                      ).layers.values()} == {"loha"}
    check(tiny_components, merged, expected)


def _kron_by_blocks(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """Block (i, j) of the result is w1[i, j] * w2 (kernel dims of w2 ride along)."""
    a, b = w1.shape[:2]
    c, d = w2.shape[:2]
    out = torch.zeros(a * c, b * d, *w2.shape[2:])
    for i in range(a):
        for j in range(b):
            out[i * c:(i + 1) * c, j * d:(j + 1) * d] = w1[i, j] * w2
    return out


LOKR_VARIANTS = ["full", "w2_low_rank", "both_low_rank", "conv_tucker", "conv_flat"]


@pytest.mark.parametrize("variant", LOKR_VARIANTS)
def test_lokr_every_factorization(tiny_components, tmp_path, variant):
    rank, alpha, strength = 2, 3.0, 0.7
    conv = variant.startswith("conv")
    layers = ("conv1",) if conv else ("attn1.to_q", "attn2.to_k", "ff.net.0.proj")
    tensors, expected = {}, {}
    for diffusers, original, shape in _layers(tiny_components, layers):
        out, inp = shape[0], shape[1]
        a, b = 4, 2 if inp % 2 == 0 else 1     # w1 [a, b], w2 [out/a, in/b, ...]
        c, d = out // a, inp // b
        name = _kohya(original)
        r = lambda n, *s: rand(f"{diffusers}.{n}", *s)  # noqa: E731
        scale = alpha / rank
        if variant == "full":
            w1, w2 = r("w1", a, b), r("w2", c, d)
            tensors.update({f"{name}.lokr_w1": w1, f"{name}.lokr_w2": w2})
            scale = 1.0   # no low-rank factor: alpha does not apply
        elif variant == "w2_low_rank":
            w1, w2a, w2b = r("w1", a, b), r("w2a", c, rank), r("w2b", rank, d)
            tensors.update({f"{name}.lokr_w1": w1, f"{name}.lokr_w2_a": w2a, f"{name}.lokr_w2_b": w2b})
            w2 = w2a @ w2b
        elif variant == "both_low_rank":
            w1a, w1b, w2a, w2b = r("w1a", a, rank), r("w1b", rank, b), r("w2a", c, rank), r("w2b", rank, d)
            tensors.update({f"{name}.lokr_w1_a": w1a, f"{name}.lokr_w1_b": w1b,
                            f"{name}.lokr_w2_a": w2a, f"{name}.lokr_w2_b": w2b})
            w1, w2 = w1a @ w1b, w2a @ w2b
        elif variant == "conv_tucker":
            w1, t2, w2a, w2b = r("w1", a, b), r("t2", rank, rank, *shape[2:]), r("w2a", rank, c), r("w2b", rank, d)
            tensors.update({f"{name}.lokr_w1": w1, f"{name}.lokr_t2": t2, f"{name}.lokr_w2_a": w2a,
                            f"{name}.lokr_w2_b": w2b})
            w2 = _tucker_by_position(t2, w2a, w2b)
        else:   # conv_flat: w2 low-rank over the flattened [in, kh, kw]
            w1, w2a, w2b = r("w1", a, b), r("w2a", c, rank), r("w2b", rank, d * shape[2:].numel())
            tensors.update({f"{name}.lokr_w1": w1, f"{name}.lokr_w2_a": w2a, f"{name}.lokr_w2_b": w2b})
            w2 = (w2a @ w2b).reshape(c, d, *shape[2:])
        tensors[f"{name}.alpha"] = torch.tensor(alpha)
        key = diffusers + ".weight"
        expected[("unet", key)] = weight(tiny_components, "unet", key) + strength * scale * _kron_by_blocks(w1, w2)
    merged, match = merge(tiny_components, write(tensors, tmp_path / f"lokr_{variant}.safetensors"), strength)
    assert match.unmatched == []
    check(tiny_components, merged, expected)


def test_glora(tiny_components, tmp_path):
    rank, alpha, strength = 2, 1.0, 0.8
    tensors, expected = {}, {}
    for diffusers, original, shape in _layers(tiny_components, ("ff.net.0.proj", "attn2.to_k")):
        out, inp = shape
        name = _kohya(original)
        a1, a2 = rand(diffusers + ".a1", inp, rank), rand(diffusers + ".a2", rank, inp)
        b1, b2 = rand(diffusers + ".b1", out, rank), rand(diffusers + ".b2", rank, inp)
        tensors.update({f"{name}.a1.weight": a1, f"{name}.a2.weight": a2, f"{name}.b1.weight": b1,
                        f"{name}.b2.weight": b2, f"{name}.alpha": torch.tensor(alpha)})
        key = diffusers + ".weight"
        w = weight(tiny_components, "unet", key)
        expected[("unet", key)] = w + strength * alpha / rank * (w @ a1 @ a2 + b1 @ b2)
    merged, match = merge(tiny_components, write(tensors, tmp_path / "glora.safetensors"), strength)
    assert match.unmatched == []
    check(tiny_components, merged, expected)


def test_full_diff_with_bias_and_norm_diffs(tiny_components, tmp_path):
    strength = 0.5
    tensors, expected = {}, {}
    unet = tiny_components["unet"]
    for diffusers, original, shape in _layers(tiny_components, ("attn1.to_out.0", "conv2")):
        name = _kohya(original)
        diff, diff_b = rand(diffusers + ".diff", *shape), rand(diffusers + ".diff_b", shape[0])
        tensors.update({f"{name}.diff": diff, f"{name}.diff_b": diff_b})
        expected[("unet", diffusers + ".weight")] = weight(tiny_components, "unet", diffusers + ".weight") + strength * diff
        expected[("unet", diffusers + ".bias")] = weight(tiny_components, "unet", diffusers + ".bias") + strength * diff_b
    norms = [k[: -len(".weight")] for k, p in unet.named_parameters() if k.endswith("norm1.weight")]
    assert norms
    for module in norms:
        shape = unet.get_parameter(module + ".weight").shape
        name = "lora_unet_" + module.replace(".", "_")      # kohya over diffusers names
        w_norm, b_norm = rand(module + ".w", *shape), rand(module + ".b", *shape)
        tensors.update({f"{name}.w_norm": w_norm, f"{name}.b_norm": b_norm})
        expected[("unet", module + ".weight")] = weight(tiny_components, "unet", module + ".weight") + strength * w_norm
        expected[("unet", module + ".bias")] = weight(tiny_components, "unet", module + ".bias") + strength * b_norm
    merged, match = merge(tiny_components, write(tensors, tmp_path / "diff.safetensors"), strength)
    assert match.unmatched == []
    check(tiny_components, merged, expected)


@pytest.mark.parametrize("axis", ["per_input", "per_output"])
def test_dora_scale(tiny_components, tmp_path, axis):
    """DoRA: W' = W + scale*up@down; W'' = W' rescaled to the file's magnitude per column
    (dora_scale [1, in], LyCORIS' default) or per row ([out, 1]); W + s*(W'' - W)."""
    rank, alpha, strength = 4, 4.0, 0.75
    tensors, expected = {}, {}
    for diffusers, original, shape in _layers(tiny_components, ("attn1.to_q", "ff.net.2", "conv1")):
        name = _kohya(original)
        up, down = lora_factors(shape, rank, diffusers)
        tensors.update(lora_tensors(name, shape, rank, alpha, seed_name=diffusers))
        key = diffusers + ".weight"
        w = weight(tiny_components, "unet", key)
        changed = (w + alpha / rank * lora_delta(up, down)).reshape(shape[0], shape[1], -1)
        if axis == "per_input":
            magnitude = 1.0 + rand(name + ".m", 1, shape[1], *([1] * (len(shape) - 2))).abs()
            norms = torch.stack([changed[:, i].norm() for i in range(shape[1])])
            rescaled = changed * (magnitude.reshape(-1) / norms).reshape(1, -1, 1)
        else:
            magnitude = 1.0 + rand(name + ".m", shape[0], *([1] * (len(shape) - 1))).abs()
            norms = torch.stack([changed[o].norm() for o in range(shape[0])])
            rescaled = changed * (magnitude.reshape(-1) / norms).reshape(-1, 1, 1)
        tensors[f"{name}.dora_scale"] = magnitude
        expected[("unet", key)] = w + strength * (rescaled.reshape(shape) - w)
    merged, match = merge(tiny_components, write(tensors, tmp_path / f"dora_{axis}.safetensors"), strength)
    assert match.unmatched == []
    assert {f.kind for f in read_lora_file(tmp_path / f"dora_{axis}.safetensors").layers.values()} == {"dora+lora"}
    check(tiny_components, merged, expected)


def test_a_file_mixing_lora_and_loha_layers(tiny_components, tmp_path):
    rank, strength = 2, 1.0
    (q, q_orig, q_shape), (k, k_orig, k_shape) = _layers(tiny_components, ("attn1.to_q", "attn2.to_k"))[:2]
    tensors = lora_tensors(_kohya(q_orig), q_shape, rank, None, seed_name=q)
    f = {n: rand(f"{k}.{n}", *s) for n, s in (("w1a", (k_shape[0], rank)), ("w1b", (rank, k_shape[1])),
                                               ("w2a", (k_shape[0], rank)), ("w2b", (rank, k_shape[1])))}
    tensors.update({f"{_kohya(k_orig)}.hada_{n[:2]}_{n[2]}": t for n, t in f.items()})
    up, down = lora_factors(q_shape, rank, q)
    expected = {("unet", q + ".weight"): weight(tiny_components, "unet", q + ".weight") + lora_delta(up, down),
                ("unet", k + ".weight"): weight(tiny_components, "unet", k + ".weight")
                + (f["w1a"] @ f["w1b"]) * (f["w2a"] @ f["w2b"])}
    merged, match = merge(tiny_components, write(tensors, tmp_path / "mixed.safetensors"), strength)
    assert match.unmatched == [] and read_lora_file(tmp_path / "mixed.safetensors").kinds() == {"lora": 1, "loha": 1}
    check(tiny_components, merged, expected)


def test_a_loha_of_the_wrong_shape_is_an_error_naming_file_and_layer(tiny_components, tmp_path):
    diffusers, original, shape = _layers(tiny_components, ("attn1.to_q",))[0]
    name = _kohya(original)
    bad = {f"{name}.hada_w1_a": rand("a", shape[0] + 1, 2), f"{name}.hada_w1_b": rand("b", 2, shape[1]),
           f"{name}.hada_w2_a": rand("c", shape[0] + 1, 2), f"{name}.hada_w2_b": rand("d", 2, shape[1])}
    with pytest.raises(LoraError, match="bad_loha.safetensors.*" + name):
        merge(tiny_components, write(bad, tmp_path / "bad_loha.safetensors"), 1.0)


@pytest.mark.cuda
@pytest.mark.parametrize("kind", ["lora", "loha", "lokr", "dora", "diff"])
def test_cached_device_factors_give_the_cpu_result(tiny_components, tmp_path, kind):
    """The resident path (factors cached on the GPU) merges what the CPU path merges."""
    from tests.helpers.lora_files import lycoris_file

    path = lycoris_file(tiny_components, tmp_path / f"{kind}.safetensors", kind)
    match = match_lora(read_lora_file(path), {"unet": (unet_lora_names(tiny_components["unet"]),
                                                       tiny_components["unet"])}, strict=False)
    cuda = torch.device("cuda")
    for key, patch in match.patches["unet"].items():
        base = tiny_components["unet"].get_parameter(key).detach().float()
        on_cpu = patch.added(base, 0.7)
        on_gpu = patch.added(base.to(cuda), 0.7, cache=True)
        assert patch.cached_bytes(cuda) > 0
        assert torch.allclose(on_gpu.cpu(), on_cpu, atol=1e-5), key
        assert torch.allclose(patch.added(base.to(cuda), 0.7, cache=True).cpu(), on_cpu, atol=1e-5), key
        patch.drop_cache()
        assert patch.cached_bytes(cuda) == 0
