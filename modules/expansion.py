"""Fooocus V2 prompt expansion: a small GPT-2 that appends style words to a prompt.

The model lives where upstream keeps it, ``models/prompt_expansion/fooocus_expansion``
(config key ``path_fooocus_expansion``): ``config.json``, the GPT-2 tokenizer files,
``positive.txt`` (the words it may add, one per line) and the weights
(``pytorch_model.bin`` as upstream downloads it, or ``model.safetensors``).

Behaviour follows upstream's description of its algorithm:
- the prompt is tidied (runs of spaces folded, ``,. `` and line ends stripped) and
  a comma appended;
- text is sampled (top-k 100) until the prompt fills a whole number of 75-token
  windows, so the expansion never spills into a mostly empty window;
- only words of ``positive.txt`` and the comma may be generated, and no token of
  the text so far may repeat;
- sampling is seeded with ``seed mod 2**32`` through ``transformers.set_seed``
  (Python, NumPy and torch generators), so a seed gives the same expansion here as
  there on the same model.

The network is a model under model management like the others: its patcher is
loaded with ``load_models_gpu`` (resident and counted with
``--keep-models-resident``, offloaded by the next load in the conservative
policy), and it is listed in ``/model_status`` as ``fooocus_expansion``.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from ldm_patched.modules import model_management
from ldm_patched.modules.model_patcher import ModelPatcher

log = logging.getLogger("fooocus_resident.expansion")

MODEL_URL = "https://huggingface.co/lllyasviel/misc/resolve/main/fooocus_expansion.bin"
WEIGHT_FILES = ("pytorch_model.bin", "model.safetensors")
TOKENIZER_FILES = (("tokenizer.json",), ("vocab.json", "merges.txt"))
SEED_LIMIT = 2 ** 32          # NumPy's seed range, which set_seed also feeds
BLOCKED = -8192.0             # logit bias of a token that may not be generated
WINDOW = 75                   # CLIP tokens per prompt window


class ExpansionUnavailable(ValueError):
    """The expansion model cannot be used; the message says which files go where."""


def tidy(text: str) -> str:
    """Fold runs of spaces and strip commas, dots, spaces and line ends at both ends."""
    text = str(text)
    while "  " in text:
        text = text.replace("  ", " ")
    return text.strip(",. \r\n")


def missing_files(folder: Path) -> list[str]:
    """What the folder lacks to load the model (empty when complete)."""
    missing = [name for name in ("config.json", "positive.txt") if not (folder / name).is_file()]
    if not any(all((folder / n).is_file() for n in group) for group in TOKENIZER_FILES):
        missing.append("tokenizer.json (or vocab.json + merges.txt)")
    if not any((folder / n).is_file() for n in WEIGHT_FILES):
        missing.append("pytorch_model.bin (or model.safetensors)")
    return missing


def ensure_files(folder: Path, allow_download: bool) -> None:
    """Raise ExpansionUnavailable naming the folder and the missing files, unless only the
    weights are missing and downloads are allowed (then they are fetched as upstream does)."""
    missing = missing_files(folder)
    if missing == ["pytorch_model.bin (or model.safetensors)"] and allow_download:
        from modules import model_downloader
        if model_downloader.download_file(MODEL_URL, folder / "pytorch_model.bin"):
            return
    if missing:
        raise ExpansionUnavailable(
            f"style 'Fooocus V2' needs the prompt-expansion model in {folder}: missing {', '.join(missing)}. "
            f"Put upstream Fooocus's models/prompt_expansion/fooocus_expansion folder there (its weights are "
            f"{MODEL_URL}, saved as pytorch_model.bin), or choose other styles")


@dataclass(frozen=True)
class FolderVersion:
    folder: str
    files: tuple

    @staticmethod
    def of(folder: Path) -> "FolderVersion":
        files = []
        for name in sorted(os.listdir(folder)):
            st = (folder / name).stat()
            files.append((name, st.st_size, st.st_mtime_ns))
        return FolderVersion(str(folder), tuple(files))


class FooocusExpansion:
    """The tokenizer, the allowed-word bias and the GPT-2 patcher of one model folder."""

    def __init__(self, folder: Path) -> None:
        from transformers import AutoTokenizer, GPT2LMHeadModel

        manager = model_management.get_manager()
        self.tokenizer = AutoTokenizer.from_pretrained(str(folder))
        model = GPT2LMHeadModel.from_pretrained(str(folder), dtype=manager.dtype_for("text_encoder"))
        model.eval()
        self.patcher = ModelPatcher(model, manager.device, manager.offload_device(), name="fooocus_expansion")
        self.comma = self.tokenizer.convert_tokens_to_ids(",")
        self.bias = self._allowed_bias(folder / "positive.txt", model.config.vocab_size)

    def _allowed_bias(self, words_file: Path, vocab_size: int) -> torch.Tensor:
        """[1, vocab] logit bias: 0 for whole-word tokens (" word") of the allowed words."""
        words = {"\u0120" + w.strip().lower() for w in words_file.read_text(encoding="utf-8").splitlines() if w.strip()}
        bias = torch.full((1, vocab_size), BLOCKED, dtype=torch.float32)
        allowed = [i for token, i in self.tokenizer.get_vocab().items() if token in words and i < vocab_size]
        bias[0, allowed] = 0.0
        log.info("[Fooocus-Resident] Fooocus V2 expansion: %d allowed words", len(allowed))
        return bias

    def _restrict(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Logits processor: allowed words only, nothing already in the text, commas always."""
        bias = self.bias.to(scores.device, scores.dtype).clone()
        bias[0, input_ids[0].long()] = BLOCKED
        bias[0, self.comma] = 0.0
        return scores + bias

    @torch.inference_mode()
    def __call__(self, prompt: str, seed: int) -> str:
        """The expanded prompt (it starts with the tidied prompt)."""
        from transformers import LogitsProcessorList, set_seed

        if prompt == "":
            return ""
        model_management.load_models_gpu([self.patcher])
        device = self.patcher.load_device
        text = tidy(prompt) + ","
        encoded = self.tokenizer(text, return_tensors="pt")
        length = int(encoded["input_ids"].shape[1])
        new_tokens = WINDOW * math.ceil(length / WINDOW) - length
        if new_tokens == 0:
            return text[:-1]
        set_seed(int(seed) % SEED_LIMIT)
        output = self.patcher.model.generate(
            input_ids=encoded["input_ids"].to(device), attention_mask=encoded["attention_mask"].to(device),
            top_k=100, max_new_tokens=new_tokens, do_sample=True, pad_token_id=self.tokenizer.eos_token_id,
            logits_processor=LogitsProcessorList([self._restrict]))
        return tidy(self.tokenizer.batch_decode(output, skip_special_tokens=True)[0])


_lock = threading.Lock()
_loaded: dict[FolderVersion, FooocusExpansion] = {}


def get_expansion(folder: Path, allow_download: bool) -> FooocusExpansion:
    """The expansion of `folder`, built once per version of its files; a replaced
    version is dropped from the registry."""
    folder = Path(folder)
    ensure_files(folder, allow_download)
    version = FolderVersion.of(folder)
    with _lock:
        expansion = _loaded.get(version)
        if expansion is None:
            for old in _loaded.values():
                model_management.get_manager().forget(old.patcher.model)
            _loaded.clear()
            expansion = _loaded[version] = FooocusExpansion(folder)
        return expansion


def status() -> dict:
    """For /model_status: whether the expansion is built, and where its module is."""
    with _lock:
        for version, loaded in _loaded.items():
            manager = model_management.get_manager()
            return {"loaded": True, "folder": os.path.basename(os.path.normpath(version.folder)),
                    "registered": manager.find(loaded.patcher) is not None,
                    "device": str(next(loaded.patcher.model.parameters()).device)}
    return {"loaded": False}


def drop() -> None:
    """Forget the loaded expansion (tests, or a new model manager)."""
    with _lock:
        for old in _loaded.values():
            model_management.get_manager().forget(old.patcher.model)
        _loaded.clear()
