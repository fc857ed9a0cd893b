"""Textual-inversion embeddings: prompt references, files, a cache per file version.

In a prompt, `embedding:name` (up to the next space or comma) inserts the vectors of
`models/embeddings/name.safetensors` where the reference stands, as upstream
Fooocus/ComfyUI do; `(embedding:name:1.2)` also weights them. SDXL embedding files
carry one matrix per text encoder, `clip_l` [n, 768] and `clip_g` [n, 1280]; a file
with a single matrix (SD1-style `emb_params`, `string_to_param.*`) is used for the
encoder of its width.
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from dataclasses import dataclass

import torch

from ldm_patched.modules.lora import LoraFileId

# `(embedding:name:1.2)` or `(embedding:name)` first, then a bare `embedding:name`.
_REFERENCE = re.compile(r"\(embedding:([^\s,():]+)(?::\s*(-?[0-9]*\.?[0-9]+))?\)|embedding:([^\s,()]+)")
ENCODER_KEYS = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}


class EmbeddingError(ValueError):
    """An embedding that cannot be used; the message names the file (or where it was looked for)."""


@dataclass(frozen=True)
class Segment:
    """A piece of a prompt: plain text, or one embedding reference with its weight."""

    text: str
    embedding: str | None = None
    weight: float = 1.0


def split_prompt(prompt: str) -> list[Segment]:
    """The prompt as text and embedding segments, in order."""
    segments, last = [], 0
    for found in _REFERENCE.finditer(prompt):
        if found.start() > last:
            segments.append(Segment(prompt[last:found.start()]))
        name = found.group(1) or found.group(3)
        weight = float(found.group(2)) if found.group(2) else 1.0
        segments.append(Segment(found.group(0), embedding=name, weight=weight))
        last = found.end()
    if last < len(prompt):
        segments.append(Segment(prompt[last:]))
    return segments


def referenced_names(prompt: str) -> list[str]:
    """Embedding names a prompt uses, first use first, each once."""
    return list(dict.fromkeys(s.embedding for s in split_prompt(prompt) if s.embedding))


@dataclass(eq=False)
class Embedding:
    """One embedding file version: vectors per encoder key ("clip_l", "clip_g"...)."""

    file: LoraFileId
    vectors: dict[str, torch.Tensor]

    def for_encoder(self, encoder: str, width: int) -> torch.Tensor:
        """[n, width] vectors for `encoder` ("text_encoder" / "text_encoder_2")."""
        key = ENCODER_KEYS.get(encoder, encoder)
        tensor = self.vectors.get(key)
        if tensor is None:
            fitting = [t for t in self.vectors.values() if t.shape[-1] == width]
            tensor = fitting[0] if len(self.vectors) == 1 and fitting else None
        if tensor is None:
            raise EmbeddingError(f"embedding file {self.file.name} has no vectors for {key} (width {width}); "
                                 f"it holds {', '.join(f'{k} {tuple(v.shape)}' for k, v in self.vectors.items())}")
        if tensor.shape[-1] != width:
            raise EmbeddingError(f"embedding file {self.file.name}: {key} vectors have width {tensor.shape[-1]}, "
                                 f"this model's {encoder} needs {width} (an embedding for another model?)")
        return tensor.reshape(-1, width)


def read_embedding(path: str) -> Embedding:
    file = LoraFileId.of(path)
    if not path.endswith(".safetensors"):
        raise EmbeddingError(f"embedding file {file.name}: only .safetensors embeddings are read "
                             f"(pickled .pt/.bin files can run code)")
    try:
        from safetensors.torch import load_file
        tensors = load_file(file.path, device="cpu")
    except Exception as error:  # safetensors raises several types for bad headers
        raise EmbeddingError(f"embedding file {file.name} is not a readable safetensors file: {error}") from error
    vectors = {k: v.float() for k, v in tensors.items() if v.ndim in (1, 2) and v.is_floating_point()}
    if not vectors:
        raise EmbeddingError(f"embedding file {file.name} holds no embedding vectors "
                             f"(keys: {', '.join(list(tensors)[:4]) or 'none'})")
    return Embedding(file, vectors)


def resolve_embedding(name: str, folders) -> str:
    """Path of embedding `name` (with or without `.safetensors`) in the first folder holding it."""
    from modules import config as config_module

    candidates = [name] if name.endswith(".safetensors") else [name + ".safetensors", name]
    for candidate in candidates:
        try:
            return config_module.resolve_model_file(candidate, folders)
        except FileNotFoundError:
            continue
    where = ", ".join(str(f) for f in config_module._as_folder_list(folders)) or "(no folders configured)"
    raise EmbeddingError(f"embedding {name!r} not found: looked for {candidates[0]} in {where}")


class EmbeddingCache:
    """Embeddings by file version: a rewritten file is read again, an unchanged one never."""

    def __init__(self, max_files: int = 64) -> None:
        self.max_files = max_files
        self._files: "OrderedDict[LoraFileId, Embedding]" = OrderedDict()

    def get(self, path: str) -> Embedding:
        file = LoraFileId.of(os.path.abspath(path))
        embedding = self._files.get(file)
        if embedding is None:
            embedding = self._files[file] = read_embedding(file.path)
            while len(self._files) > self.max_files:
                self._files.popitem(last=False)
        self._files.move_to_end(file)
        return embedding

    def for_prompt(self, prompt: str, folders) -> dict[str, Embedding]:
        """name -> Embedding for every reference in `prompt` (errors name the file)."""
        return {name: self.get(resolve_embedding(name, folders)) for name in referenced_names(prompt)}

    def __len__(self) -> int:
        return len(self._files)
