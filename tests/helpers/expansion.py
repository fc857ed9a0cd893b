"""A tiny random Fooocus V2 prompt-expansion model (GPT-2) in upstream's folder layout, for tests (no network)."""

from __future__ import annotations

import torch


# -- a tiny random Fooocus V2 expansion model ------------------------------------------

EXPANSION_WORDS = ("cat", "sharp", "light", "vivid", "detailed", "soft", "glow", "calm", "epic", "rich",
                   "moody", "bright", "clean", "bold", "warm", "cold")


def _byte_symbols() -> list[str]:
    """GPT-2's byte-level alphabet: one printable character per byte, printable bytes in
    their own order first (so "!" is id 0 and "," id 11, as in GPT-2's vocabulary)."""
    kept = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    extra = [b for b in range(256) if b not in kept]
    return [chr(b) for b in kept] + [chr(256 + n) for n in range(len(extra))]


def build_tiny_expansion(folder, words=EXPANSION_WORDS, seed: int = 0, positive=None):
    """Write a tiny random GPT-2 prompt-expansion model in upstream's folder layout:
    tokenizer files, config.json + weights, and positive.txt (the allowed words).
    Every word gets a whole-word token (" word") built by byte-pair merges."""
    import json
    from pathlib import Path

    from transformers import GPT2Config, GPT2LMHeadModel, GPT2Tokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {symbol: i for i, symbol in enumerate(_byte_symbols())}
    merges: list[str] = []
    for word in words:
        piece = "\u0120"   # GPT-2's symbol for a leading space
        for ch in word:
            merges.append(f"{piece} {ch}")
            piece += ch
            vocab.setdefault(piece, len(vocab))
    merges = list(dict.fromkeys(merges))
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    tokenizer = GPT2Tokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"))
    tokenizer.save_pretrained(folder)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(vocab), n_positions=160, n_embd=32, n_layer=2, n_head=2,
                                       bos_token_id=vocab["<|endoftext|>"], eos_token_id=vocab["<|endoftext|>"]))
    model.save_pretrained(folder)
    (folder / "positive.txt").write_text("\n".join(positive if positive is not None else words) + "\n",
                                         encoding="utf-8")
    return folder
