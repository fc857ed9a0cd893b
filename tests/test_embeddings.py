"""Textual-inversion embeddings in prompts, against token embeddings set by hand."""

import copy
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from ldm_patched.modules import model_management as mm
from ldm_patched.modules.checkpoint import load_tokenizers
from ldm_patched.modules.model_patcher import ModelPatcher
from modules import config, core
from modules.embeddings import EmbeddingCache, EmbeddingError, split_prompt
from tests.helpers import pipelines

CPU = torch.device("cpu")
WORDS = ("zebra", "giraffe")   # ordinary single tokens that stand in for the embedding's two vectors
SMALL = {"base_model": "tiny_sdxl_base.safetensors", "negative_prompt": "", "width": 64, "height": 64,
         "steps": 2, "seed": 3, "sampler": "euler", "scheduler": "normal", "guidance_scale": 5.0}


def vectors(components, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    widths = {"clip_l": components["text_encoder"].get_input_embeddings().weight.shape[1],
              "clip_g": components["text_encoder_2"].get_input_embeddings().weight.shape[1]}
    return {key: torch.randn(len(WORDS), width, generator=gen) * 0.05 for key, width in widths.items()}


def clip_patcher(components) -> ModelPatcher:
    return ModelPatcher(core.SDXLTextEncoders(components["text_encoder"], components["text_encoder_2"]), CPU, CPU,
                        "clip")


def by_hand(components, file_vectors: dict[str, torch.Tensor], tokenizer) -> tuple[dict, list[int]]:
    """A copy of the encoders whose token rows for WORDS hold the file's vectors."""
    ids = [tokenizer(w, add_special_tokens=False).input_ids for w in WORDS]
    assert all(len(i) == 1 for i in ids)
    ids = [i[0] for i in ids]
    parts = copy.deepcopy(components)
    with torch.no_grad():
        for encoder, key in (("text_encoder", "clip_l"), ("text_encoder_2", "clip_g")):
            table = parts[encoder].get_input_embeddings().weight
            for row, vector in zip(ids, file_vectors[key]):
                table[row] = vector
    return parts, ids


@pytest.fixture
def embeddings_folder(tmp_path, monkeypatch):
    folder = tmp_path / "embeddings"
    folder.mkdir()
    monkeypatch.setenv("path_embeddings", str(folder))
    return folder


def test_prompt_references_split_as_upstream_writes_them():
    segments = split_prompt("a (embedding:style:1.2) cat, embedding:sub/neg, (embedding:plain) end")
    refs = [(s.embedding, s.weight) for s in segments if s.embedding]
    assert refs == [("style", 1.2), ("sub/neg", 1.0), ("plain", 1.0)]
    assert "".join(s.text for s in segments) == "a (embedding:style:1.2) cat, embedding:sub/neg, (embedding:plain) end"


def test_embedding_conditions_like_token_embeddings_set_by_hand(pipeline, tiny_components, embeddings_folder):
    pipeline(mm.Policy.CONSERVATIVE)
    tokenizers = load_tokenizers()
    file_vectors = vectors(tiny_components)
    save_file(file_vectors, str(embeddings_folder / "style.safetensors"))
    embeddings = EmbeddingCache().for_prompt("x embedding:style", [embeddings_folder])
    ours = core.encode_prompt(clip_patcher(tiny_components), tokenizers, "a photo of embedding:style, castle",
                              embeddings)
    parts, _ = by_hand(tiny_components, file_vectors, tokenizers[0])
    theirs = core.encode_prompt(clip_patcher(parts), tokenizers, f"a photo of {' '.join(WORDS)}, castle")
    plain = core.encode_prompt(clip_patcher(tiny_components), tokenizers, f"a photo of {' '.join(WORDS)}, castle")
    assert torch.allclose(ours.embeds, theirs.embeds, atol=1e-5) and torch.allclose(ours.pooled, theirs.pooled,
                                                                                     atol=1e-5)
    assert not torch.allclose(ours.embeds, plain.embeds, atol=1e-3)


def test_weighted_embedding_follows_fooocus_token_weights(pipeline, tiny_components, embeddings_folder):
    """(embedding:name:w): weighted positions move from the empty prompt's states by w,
    then the window is rescaled to its original mean (Fooocus' A1111-style weights)."""
    pipeline(mm.Policy.CONSERVATIVE)
    tokenizers = load_tokenizers()
    file_vectors = vectors(tiny_components, seed=1)
    save_file(file_vectors, str(embeddings_folder / "style.safetensors"))
    embeddings = EmbeddingCache().for_prompt("(embedding:style:1.3)", [embeddings_folder])
    ours = core.encode_prompt(clip_patcher(tiny_components), tokenizers, "a (embedding:style:1.3) dog", embeddings)
    parts, _ = by_hand(tiny_components, file_vectors, tokenizers[0])
    expected = []
    for encoder, tokenizer in (("text_encoder", tokenizers[0]), ("text_encoder_2", tokenizers[1])):
        def states(text):
            ids = tokenizer(text, padding="max_length", max_length=77, return_tensors="pt").input_ids
            with torch.no_grad():
                return parts[encoder](ids, output_hidden_states=True).hidden_states[-2][0]
        z, empty = states(f"a {' '.join(WORDS)} dog"), states("")
        mean = z.mean()
        for position in (2, 3):   # after the start token and "a"
            z[position] = (z[position] - empty[position]) * 1.3 + empty[position]
        expected.append(z * (mean / z.mean()))
    assert torch.allclose(ours.embeds[0], torch.cat(expected, dim=-1), atol=1e-5)


def test_unknown_embedding_is_an_error_naming_the_file_looked_for(pipeline, embeddings_folder):
    pipeline(mm.Policy.CONSERVATIVE)
    config.reload_config()
    report = pipelines.process_request({**SMALL, "prompt": "a cat, embedding:nosuch"}).report
    # The folder is named by its config key: reports carry no absolute server paths.
    assert "nosuch.safetensors" in report["error"] and "path_embeddings" in report["error"]
    assert str(embeddings_folder) not in report["error"]
    with pytest.raises(EmbeddingError, match="no vectors for clip_g"):
        save_file({"clip_l": torch.zeros(1, 32)}, str(embeddings_folder / "half.safetensors"))
        EmbeddingCache().for_prompt("embedding:half", [embeddings_folder])["half"].for_encoder("text_encoder_2", 64)


def test_embedding_file_versions_key_the_conditioning_cache(pipeline, tiny_components, embeddings_folder):
    pipeline(mm.Policy.RESIDENT)
    config.reload_config()
    path = embeddings_folder / "style.safetensors"
    save_file(vectors(tiny_components, seed=2), str(path))
    request = {**SMALL, "prompt": "a cat, embedding:style"}
    first = pipelines.process_request(dict(request))
    again = pipelines.process_request(dict(request))
    assert "error" not in first.report, first.report
    assert again.report["model_management"]["text_encodes"] == 0
    save_file(vectors(tiny_components, seed=5), str(path))
    os.utime(path, ns=(10 ** 18, 10 ** 18))   # a new version even on coarse-mtime file systems
    changed = pipelines.process_request(dict(request))
    assert changed.report["model_management"]["text_encodes"] == 1
    pixels = lambda r: np.asarray(Image.open(r.images[0]))  # noqa: E731
    assert np.array_equal(pixels(first), pixels(again)) and not np.array_equal(pixels(first), pixels(changed))
