"""Bake LoRAs into a single-file SDXL checkpoint, ahead of time.

    python -m modules.fuse_lora BASE --lora FILE[:WEIGHT] [--lora ...] -o OUT.safetensors

The merge is the one requests use (model_patcher, float32, cast back), so the
fused file gives the same images as base + LoRAs at run time. What was fused is
recorded in the file's metadata; a performance mode whose LoRA is already fused
does not add it again.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from ldm_patched.modules.checkpoint import CheckpointError, load_checkpoint, original_state_dict, save_checkpoint
from ldm_patched.modules.file_version import SafetensorsReader
from ldm_patched.modules.lora import (LoraError, LoraFileCache, match_lora, text_encoder_lora_names,
                                      unet_lora_names)
from ldm_patched.modules.model_patcher import ModelPatcher
from modules import config as config_module
from modules.core import SDXLTextEncoders
from modules.model_catalogue import FUSED_LORAS_METADATA_KEY

CPU = torch.device("cpu")


def parse_lora_argument(text: str) -> tuple[str, float]:
    """`FILE` or `FILE:WEIGHT` (a Windows drive colon is not a weight)."""
    path, sep, weight = text.rpartition(":")
    if sep and path and not weight.startswith(("\\", "/")):
        try:
            return path, float(weight)
        except ValueError:
            pass
    return text, 1.0


def _find(name: str, folders) -> str:
    if os.path.exists(name):
        return name
    return config_module.resolve_model_file(name, folders)


def _file_dtype(path: str) -> torch.dtype:
    """The dtype the base file stores its UNet in; the fused file keeps it."""
    if not path.endswith(".safetensors"):
        return torch.float16
    with SafetensorsReader(path) as reader:   # the header only: never a map of the file
        for key in reader.keys():
            if key.startswith("model.diffusion_model."):
                return reader.dtype(key)
    return torch.float16


def fuse(base: str, loras: list[tuple[str, float]], output: str) -> dict:
    """Write `output`: `base` with `loras` merged. Returns a summary of what was fused."""
    checkpoint = load_checkpoint(base)
    if checkpoint.kind != "base":
        raise CheckpointError(base, "LoRAs are fused into SDXL base checkpoints, this is a refiner")
    unet = ModelPatcher(checkpoint.unet, CPU, CPU, "unet")
    clip = ModelPatcher(SDXLTextEncoders(checkpoint.text_encoder, checkpoint.text_encoder_2), CPU, CPU, "clip")
    targets = {"unet": (unet_lora_names(unet.model), unet.model),
               "clip": (text_encoder_lora_names(clip.model), clip.model)}
    files = LoraFileCache()
    fused = [[name, weight] for name, weight in json.loads(checkpoint.metadata.get(FUSED_LORAS_METADATA_KEY, "[]"))]
    summary = []
    for path, weight in loras:
        match = match_lora(files.get(path), targets)
        keys = unet.add_patches(match.patches["unet"], weight) + clip.add_patches(match.patches["clip"], weight)
        fused.append([os.path.basename(path), weight])
        summary.append({"file": os.path.basename(path), "weight": weight, "keys": len(keys),
                        "unmatched": len(match.unmatched)})
    unet.patch_model()
    clip.patch_model()
    dtype = _file_dtype(base)
    state = original_state_dict(unet=checkpoint.unet, vae=checkpoint.vae, text_encoder=checkpoint.text_encoder,
                                text_encoder_2=checkpoint.text_encoder_2)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    metadata = {**checkpoint.metadata, FUSED_LORAS_METADATA_KEY: json.dumps(fused)}
    save_checkpoint(output, state, metadata)
    return {"base": base, "output": output, "fused": summary}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m modules.fuse_lora", description=__doc__.split("\n\n")[0])
    parser.add_argument("base", help="SDXL base checkpoint (path, or a name in the checkpoints folders)")
    parser.add_argument("--lora", action="append", required=True, metavar="FILE[:WEIGHT]",
                        help="LoRA to fuse (path, or a name in the LoRA folders); repeatable; weight default 1.0")
    parser.add_argument("-o", "--output", required=True, help="the .safetensors file to write")
    args = parser.parse_args(argv)
    cfg = config_module.get_config()
    try:
        base = _find(args.base, cfg.path_checkpoints)
        loras = [(_find(name, cfg.path_loras), weight) for name, weight in map(parse_lora_argument, args.lora)]
        summary = fuse(base, loras, args.output)
    except (FileNotFoundError, CheckpointError, LoraError) as error:
        print(f"fuse_lora: {error}", file=sys.stderr)
        return 1
    for item in summary["fused"]:
        print(f"fused {item['file']} at {item['weight']}: {item['keys']} weights"
              + (f", {item['unmatched']} keys matched nothing" if item["unmatched"] else ""))
    print(f"wrote {summary['output']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
