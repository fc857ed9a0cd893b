"""PyraCanny and CPDS: Control-LoRA ControlNets as one more model kind under model management.

Files (upstream Fooocus's names, in ``path_controlnet``, from lllyasviel/misc):
``control-lora-canny-rank128.safetensors`` (Stability's Control-LoRA Canny) and
``fooocus_xl_cpds_128.safetensors`` (same format).

The Control-LoRA format: a safetensors file marked by a ``lora_controlnet`` entry, whose other
tensors are the ControlNet's parameters under the original (ldm) names of its module:

* the parts a ControlNet shares with the base UNet (``time_embed``, ``label_emb``,
  ``input_blocks.N``, ``middle_block``): a weight of two or more dims as a low-rank change
  ``<layer>.up`` [out, r] ([out, r, 1, 1] for a conv) and ``<layer>.down`` [r, in] ([r, in,
  kh, kw]) added to the UNet's own weight; biases and norms as full values;
* the ControlNet's own parts as full weights: ``input_hint_block.N`` (the hint encoder, convs
  at 0, 2, ..., 14), ``zero_convs.N.0`` (a 1x1 conv after each input block) and
  ``middle_block_out.0``.

The module is diffusers' ``ControlNetModel`` with the base UNet's config (``from_unet``),
its tensors set from the file and the UNet's exact original weights, once per (file version,
checkpoint UNet): a `ModelPatcher` named ``<file>:controlnet``, loaded with the UNet by
``load_models_gpu`` (budgeted, resident, evicted like any model, shown in ``/model_status``).
The request's LoRA patches of the UNet go onto the ControlNet's shared layers as well (upstream
copies the merged UNet weights into its ControlNet at every sampling): a patcher clone per LoRA
set, reached by diff like the UNet's.

Applied like upstream: before every UNet call of the base stage, each control whose stop has
not passed (sampling progress ``1 - t/999`` at most ``stop``; ``stop`` 0 never acts) runs on
the same batch (every row its own latents and prompt, the hint repeated per row) and its
residuals, times ``weight`` and the softness ramp (upstream's "Softness of ControlNet": the
k-th of n outputs times ``1 - softness * (1 - k/(n-1))``, so the finest skip connection is
damped most and the middle block not at all), are summed over the controls and added to the
UNet's skip connections and middle block. With no control acting the UNet call is unchanged.

Request order for the pipeline::

    models = ControlNetModels()                                  # one per model catalogue
    patcher = models.get(path, checkpoint_unet, request_unet)    # loads/reuses per version and LoRA set
    controls = ControlSet([PreparedControl(patcher, hint_tensor(hint), weight, stop)], softness)
    with applied(request_unet.model, controls):                  # around core.sample
        ... core.sample loads `with_controls(...)`; core._predict adds `residuals(...)` ...
"""

from __future__ import annotations

import os
import re
import weakref
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Mapping

import numpy as np
import torch

from ldm_patched.modules import model_management
from ldm_patched.modules import sdxl_layout as layout
from ldm_patched.modules.file_version import FileReadError, FileVersion, read_safetensors
from ldm_patched.modules.model_patcher import ModelPatcher, original_weight

CANNY_FILE = "control-lora-canny-rank128.safetensors"
CPDS_FILE = "fooocus_xl_cpds_128.safetensors"
CANNY_URL = f"https://huggingface.co/lllyasviel/misc/resolve/main/{CANNY_FILE}"
CPDS_URL = f"https://huggingface.co/lllyasviel/misc/resolve/main/{CPDS_FILE}"
MARKER = "lora_controlnet"
DEFAULT_SOFTNESS = 0.25            # upstream's "Softness of ControlNet"
MAX_CONTROLNETS = 4                # built modules kept (file version x checkpoint)
MAX_PATCHED = 8                    # LoRA-set clones kept
HINT_PREFIX, ZERO_PREFIX, MID_OUT = "input_hint_block", "zero_convs", "middle_block_out.0"
_OWN_PARTS = ("controlnet_cond_embedding.", "controlnet_down_blocks.", "controlnet_mid_block.")


class ControlNetError(ValueError):
    """A control file or request that cannot be used; the message names the file."""


# -- the file's names -> diffusers' ---------------------------------------------------------

def own_module_map(embedding_blocks: int, down_blocks: int) -> dict[str, str]:
    """diffusers module -> original module for the ControlNet-only parts: the hint encoder's
    convs (conv_in, blocks, conv_out: every other entry of input_hint_block, SiLUs between),
    one zero conv per input block, and the middle block's output conv."""
    out = {"controlnet_cond_embedding.conv_in": f"{HINT_PREFIX}.0",
           "controlnet_cond_embedding.conv_out": f"{HINT_PREFIX}.{2 * (embedding_blocks + 1)}",
           "controlnet_mid_block": MID_OUT}
    out.update({f"controlnet_cond_embedding.blocks.{j}": f"{HINT_PREFIX}.{2 * (j + 1)}"
                for j in range(embedding_blocks)})
    out.update({f"controlnet_down_blocks.{i}": f"{ZERO_PREFIX}.{i}.0" for i in range(down_blocks)})
    return out


def controlnet_key_map(unet_config: Mapping, model: torch.nn.Module) -> dict[str, str]:
    """diffusers ControlNetModel parameter -> the original name a Control-LoRA file uses."""
    keys = [k for k, _ in model.named_parameters()]
    shared = [k for k in keys if not k.startswith(_OWN_PARTS)]
    out = layout.unet_key_map(unet_config, shared)
    own = own_module_map(len(model.controlnet_cond_embedding.blocks), len(model.controlnet_down_blocks))
    for key in keys:
        if key.startswith(_OWN_PARTS):
            module, _, kind = key.rpartition(".")
            out[key] = f"{own[module]}.{kind}"
    return out


def _hint_channels(tensors: Mapping[str, torch.Tensor], name: str) -> tuple[int, tuple[int, ...]]:
    """(hint image channels, the hint encoder's block widths) from input_hint_block's convs."""
    numbers = sorted(int(m.group(1)) for k in tensors
                     if (m := re.fullmatch(rf"{HINT_PREFIX}\.(\d+)\.weight", k)))
    if not numbers or numbers != list(range(0, 2 * len(numbers), 2)) or len(numbers) < 2 or len(numbers) % 2:
        raise ControlNetError(f"{name}: its hint encoder ({HINT_PREFIX}.N) is not the ControlNet layout "
                              f"(convs at 0, 2, 4, ...: found {numbers})")
    widths = [int(tensors[f"{HINT_PREFIX}.{n}.weight"].shape[0]) for n in numbers]
    return int(tensors[f"{HINT_PREFIX}.0.weight"].shape[1]), tuple(widths[0:-1:2])


def read_control_lora(path: str) -> tuple[FileVersion, dict[str, torch.Tensor]]:
    """The file's tensors (private memory), or ControlNetError naming what it is not."""
    name = os.path.basename(path)
    try:
        version, tensors, _ = read_safetensors(path)
    except (FileReadError, OSError) as error:
        raise ControlNetError(f"{name}: cannot be read ({error})") from error
    if MARKER not in tensors:
        kind = ("a full ControlNet" if any(k.startswith(("controlnet_cond_embedding.", "zero_convs.",
                                                          "control_model.")) for k in tensors)
                else "a LoRA or another model")
        raise ControlNetError(f"{name}: not a Control-LoRA (no '{MARKER}' entry; it looks like {kind})")
    return version, tensors


def _low_rank(up: torch.Tensor, down: torch.Tensor, shape: torch.Size, where: str) -> torch.Tensor:
    """up @ down in float32 on up's device, shaped like the weight it changes."""
    product_rows, product_cols = up.shape[0], int(np.prod(down.shape[1:]))
    if up.flatten(1).shape[1] != down.shape[0] or product_rows * product_cols != int(np.prod(shape)):
        raise ControlNetError(f"{where}: up {tuple(up.shape)} and down {tuple(down.shape)} do not make a "
                              f"{tuple(shape)} weight")
    return (up.flatten(1).float() @ down.flatten(1).float().to(up.device)).reshape(shape)


def build_controlnet(unet: torch.nn.Module, tensors: Mapping[str, torch.Tensor], name: str,
                     dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.nn.Module:
    """A ControlNetModel for `unet` (diffusers UNet2DConditionModel) holding the Control-LoRA's
    weights in `dtype` on `device`: the UNet's exact originals (whatever LoRA is merged into it
    now) plus the file's low-rank changes, and the file's full tensors. ControlNetError names the
    file and the first key that does not fit."""
    from accelerate import init_empty_weights
    from diffusers import ControlNetModel

    channels, widths = _hint_channels(tensors, name)
    with init_empty_weights():
        model = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=widths,
                                          load_weights_from_unet=False, conditioning_channels=channels)
    try:
        names = controlnet_key_map(unet.config, model)
    except KeyError as error:
        raise ControlNetError(f"{name}: this UNet's layout has no ControlNet mapping ({error})") from None
    unet_params = dict(unet.named_parameters())
    expected = dict(model.named_parameters())
    state, used = {}, {MARKER}
    for key, original in names.items():
        stem = original[:-len(".weight")] if original.endswith(".weight") else None
        base = tensors.get(original)
        if base is not None:
            used.add(original)
        elif key in unet_params and not key.startswith(_OWN_PARTS):
            base = original_weight(unet, key, unet_params[key])
        else:
            raise ControlNetError(f"{name}: no tensor '{original}' for the ControlNet's {key}")
        if tuple(base.shape) != tuple(expected[key].shape):
            raise ControlNetError(f"{name}: '{original}' is {tuple(base.shape)}, this UNet's ControlNet needs "
                                  f"{tuple(expected[key].shape)} (a Control-LoRA made for another model?)")
        value = base
        if stem is not None and f"{stem}.up" in tensors:
            down = tensors.get(f"{stem}.down")
            if down is None:
                raise ControlNetError(f"{name}: '{stem}.up' has no '{stem}.down'")
            used |= {f"{stem}.up", f"{stem}.down"}
            value = base.float() + _low_rank(tensors[f"{stem}.up"].to(base.device), down, base.shape,
                                             f"{name}: '{stem}'")
        state[key] = value.to(device=device, dtype=dtype)
    unknown = sorted(set(tensors) - used)
    if unknown:
        raise ControlNetError(f"{name}: {len(unknown)} tensor(s) match no layer of this UNet's ControlNet "
                              f"(e.g. '{unknown[0]}'): a Control-LoRA made for another model?")
    model.load_state_dict(state, strict=False, assign=True)
    for key, buffer in list(model.named_buffers()):   # none today; whatever diffusers adds later
        if buffer.is_meta:
            raise ControlNetError(f"{name}: the ControlNet has a buffer '{key}' nothing sets")
    return model.to(device).eval().requires_grad_(False)


# -- the loaded files -------------------------------------------------------------------------

@dataclass(eq=False)
class _Built:
    """One file version built for one checkpoint UNet (held weakly: a dropped checkpoint
    takes its ControlNets with it)."""

    version: FileVersion
    unet: "weakref.ref[torch.nn.Module]"
    patcher: ModelPatcher
    nbytes: int            # measured once: ledger queries walk no tensors


class ControlNetModels:
    """ControlNets by (file version, checkpoint UNet), and their clones per LoRA set.

    A new version of a file replaces the old one; a checkpoint dropped from the pipeline drops
    its ControlNets (`drop_for`). Holds no module globals: a model catalogue owns one."""

    def __init__(self) -> None:
        self._built: "OrderedDict[tuple[FileVersion, int], _Built]" = OrderedDict()
        self._patched: "OrderedDict[tuple, ModelPatcher]" = OrderedDict()
        self.builds = 0   # modules built (tests count cache hits with it)

    def get(self, path: str, checkpoint_unet: ModelPatcher, request_unet: ModelPatcher) -> ModelPatcher:
        """The ControlNet of file `path` for the checkpoint whose UNet is `checkpoint_unet`, with
        the patches `request_unet` (a clone of it: the request's LoRA set) has on shared layers."""
        name = os.path.basename(path)
        try:
            version = FileVersion.of(path)
        except FileReadError as error:
            raise ControlNetError(f"{name}: {error.reason}") from error
        module = checkpoint_unet.model
        key = (version, id(module))
        built = self._built.get(key)
        if built is None or built.unet() is not module:
            stale = [k for k, b in self._built.items()
                     if (k[0].same_path(version) and k[0] != version) or b.unet() is None or k == key]
            for old in stale:   # an older version of the file, or built for a UNet that is gone
                self._drop(old)
            built = self._built[key] = self._build(path, checkpoint_unet)
            while len(self._built) > MAX_CONTROLNETS:
                self._drop(next(iter(self._built)))
        self._built.move_to_end(key)
        return self._with_patches(key, built.patcher, request_unet)

    def _build(self, path: str, checkpoint_unet: ModelPatcher) -> _Built:
        manager = model_management.get_manager()
        version, tensors = read_control_lora(path)
        with torch.inference_mode(False), torch.no_grad():
            module = build_controlnet(checkpoint_unet.model, tensors, version.name, manager.dtype_for("unet"),
                                      manager.offload_device())
        self.builds += 1
        patcher = ModelPatcher(module, manager.device, manager.offload_device(), name=f"{version.name}:controlnet")
        return _Built(version, weakref.ref(checkpoint_unet.model), patcher, patcher.model_size())

    def _with_patches(self, key: tuple, base: ModelPatcher, request_unet: ModelPatcher) -> ModelPatcher:
        """`base` plus the request UNet's patches of the layers both have, one clone per LoRA set."""
        digest = request_unet.weight_signature().digest
        patched_key = (*key, digest)
        patcher = self._patched.get(patched_key)
        if patcher is None:
            patcher = base.clone()
            names = patcher.parameter_names()
            for param, entries in request_unet.patches.items():
                if param in names and not param.startswith(_OWN_PARTS):
                    for entry in entries:
                        patcher.add_patches({param: entry.patch}, entry.strength_patch, entry.strength_model)
            self._patched[patched_key] = patcher
            while len(self._patched) > MAX_PATCHED:
                self._patched.popitem(last=False)
        self._patched.move_to_end(patched_key)
        return patcher

    def _drop(self, key: tuple[FileVersion, int]) -> None:
        built = self._built.pop(key)
        model_management.get_manager().forget(built.patcher.model)
        self._patched = OrderedDict((k, p) for k, p in self._patched.items() if k[:2] != key)

    def drop_for(self, unet: torch.nn.Module) -> None:
        """Forget the ControlNets built for `unet` (its checkpoint is being discarded)."""
        for key in [k for k, b in self._built.items() if b.unet() is unet or b.unet() is None]:
            self._drop(key)

    def drop(self) -> None:
        for key in list(self._built):
            self._drop(key)

    def idle_bytes_on(self, device: torch.device, manager: model_management.ModelManager) -> int:
        """Bytes of the built ControlNets on `device` that no ledger holds (built, or evicted)."""
        total = 0
        for built in list(self._built.values()):
            module = built.patcher.model
            first = next(module.parameters(), None)
            if first is not None and first.device == device and not manager.holds(module):
                total += built.nbytes
        return total

    def __len__(self) -> int:
        return len(self._built)


# -- one request's controls ----------------------------------------------------------------

def hint_tensor(image: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 -> [1, 3, H, W] float32 in [0, 1]: the ControlNet's hint."""
    return torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1)[None] / 255.0


@dataclass
class PreparedControl:
    patcher: ModelPatcher
    hint: torch.Tensor               # [1, 3, H, W] in [0, 1], H and W 8x the latents'
    weight: float
    stop: float
    _cached: torch.Tensor | None = field(default=None, repr=False)

    def acts_at(self, progress: float) -> bool:
        """Upstream's range: from the start until `stop` of the way (0: never)."""
        return self.weight != 0.0 and self.stop > 0.0 and progress <= self.stop

    def hint_for(self, sample: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The hint for a batch like `sample`: on its device, in `dtype`, one row per row,
        at 8x its size (resized nearest if the latents differ from what it was made for)."""
        rows, height, width = sample.shape[0], sample.shape[-2] * 8, sample.shape[-1] * 8
        cached = self._cached
        if cached is None or cached.shape[0] != rows or cached.device != sample.device or cached.dtype != dtype:
            hint = self.hint
            if tuple(hint.shape[-2:]) != (height, width):
                hint = torch.nn.functional.interpolate(hint, size=(height, width), mode="nearest-exact")
            self._cached = cached = hint.to(sample.device, dtype).expand(rows, -1, -1, -1).contiguous()
        return cached


@dataclass
class ControlSet:
    controls: list[PreparedControl]
    softness: float = DEFAULT_SOFTNESS

    def patchers(self) -> list[ModelPatcher]:
        return list({id(c.patcher): c.patcher for c in self.controls}.values())


def softness_scales(count: int, softness: float) -> list[float]:
    """Per output (skip connections finest first, the middle block last): upstream's ramp."""
    if count < 2 or softness <= 0.0:
        return [1.0] * count
    return [1.0 - softness * (1.0 - i / (count - 1)) for i in range(count)]


_ATTRIBUTE = "_fooocus_controls"


def _active(unet: torch.nn.Module) -> ControlSet | None:
    return unet.__dict__.get(_ATTRIBUTE)


@contextmanager
def applied(unet: torch.nn.Module, controls: ControlSet) -> Iterator[ControlSet]:
    """The controls act on `unet`'s calls inside this block (see `residuals`)."""
    if _active(unet) is not None:
        raise ControlNetError("controls are already applied to this UNet")
    unet.__dict__[_ATTRIBUTE] = controls
    try:
        yield controls
    finally:
        unet.__dict__.pop(_ATTRIBUTE, None)


def with_controls(unet: ModelPatcher, memory: int) -> tuple[list[ModelPatcher], int]:
    """What a sampling stage on `unet` loads (it, and the ControlNets applied to it) and its
    working memory: each ControlNet adds about half the UNet's (its activations while it runs,
    the residuals it hands over)."""
    controls = _active(unet.model)
    if controls is None or not controls.controls:
        return [unet], memory
    return [unet, *controls.patchers()], memory + memory // 2


@torch.inference_mode()
def residuals(unet: torch.nn.Module, sample: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
              pooled: torch.Tensor, time_ids: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor] | None:
    """(skip-connection residuals, middle-block residual) for this UNet call, summed over the
    controls acting at this timestep; None when none acts (the UNet call stays as it was)."""
    controls = _active(unet)
    if controls is None:
        return None
    progress = 1.0 - float(timestep) / 999.0
    live = [c for c in controls.controls if c.acts_at(progress)]
    if not live:
        return None
    down_sum: list[torch.Tensor] | None = None
    mid_sum: torch.Tensor | None = None
    for control in live:
        net = control.patcher.model
        dtype = control.patcher.model_dtype()
        down, mid = net(sample.to(dtype), timestep, encoder_hidden_states=context.to(dtype),
                        controlnet_cond=control.hint_for(sample, dtype),
                        added_cond_kwargs={"text_embeds": pooled.to(dtype), "time_ids": time_ids.to(dtype)},
                        return_dict=False)
        scales = softness_scales(len(down) + 1, controls.softness)
        down = [d * (control.weight * s) for d, s in zip(down, scales)]
        mid = mid * (control.weight * scales[-1])
        down_sum = down if down_sum is None else [a + b for a, b in zip(down_sum, down)]
        mid_sum = mid if mid_sum is None else mid_sum + mid
    return down_sum, mid_sum

