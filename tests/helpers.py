"""Builders shared by tests: LoRA patches over a module's own keys, weight snapshots,
and a stand-in accelerator for tests about devices.

The stand-in is the `meta` device: tensors there have shapes and dtypes but no data,
so load and offload devices differ (bytes moved are not trivially 0) while nothing
is allocated. Leaving it allocates uninitialised storage (see model_patcher._transfer).
"""

from __future__ import annotations

import torch

from ldm_patched.modules import model_management as mm
from ldm_patched.modules.lora import LoraFactors, LoraFileId, LoraPatch

META = torch.device("meta")
CPU = torch.device("cpu")


def lora_for(module: torch.nn.Module, keys: list[str], tag: str, rank: int = 2, seed: int = 1) -> dict:
    """Random rank-`rank` LoRA patches for `keys` of `module` (a file version named `tag`)."""
    gen = torch.Generator().manual_seed(seed)
    patches = {}
    for key in keys:
        shape = module.get_parameter(key).shape
        down = torch.randn(rank, *shape[1:], generator=gen)
        up = torch.randn(shape[0], rank, *([1] * (len(shape) - 2)), generator=gen)
        patches[key] = LoraPatch(LoraFileId(tag, 1, 1), key, LoraFactors(up=up, down=down, alpha=1.0))
    return patches


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


class CheckedManager(mm.ModelManager):
    """A manager whose every load is followed by the accounting check (ledger == bytes of the
    tensors on its device, beyond `baseline`) and that records the highest use it saw."""

    def __init__(self, settings: mm.MemorySettings, baseline: int = 0) -> None:
        super().__init__(settings)
        self.baseline = baseline
        self.peak_used = 0

    def load_models(self, patchers, memory_required=0):
        plan = super().load_models(patchers, memory_required)
        assert self.accounting_error(self.device, self.baseline) == 0, self.status()
        self.peak_used = max(self.peak_used, self.used_bytes(self.device))
        return plan


def meta_settings(budget: int, policy: mm.Policy = mm.Policy.RESIDENT, **overrides) -> mm.MemorySettings:
    """Settings of a manager whose device is the meta stand-in accelerator."""
    return mm.MemorySettings(**{"policy": policy, "vram_state": mm.VRAMState.NORMAL_VRAM, "device": META,
                                "budget_bytes": budget, "total_bytes": budget, "host_budget_bytes": 1 << 40,
                                **overrides})


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
