"""Byte-level BPE tokenizer trained on all languages together, saved as an HF tokenizer.

    mome tokenizer --config configs/small.yaml

Byte-level: the 256 byte symbols are in the initial alphabet, so every string encodes and no unknown
token exists. The stage also encodes every corpus split into one flat token stream per language
(`tokens/<split>/<lang>.npy`, documents separated by the end-of-text token) for the training stages.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mome_ray.errors import MomeError

EOS = "<|endoftext|>"
PAD = "<|pad|>"


@dataclass
class TokenizerConfig:
    vocab_size: int = 8000  # the paper uses 32,000
    min_frequency: int = 2  # a merge must be seen this often

    def __post_init__(self):
        if self.vocab_size < 300:
            raise MomeError(f"tokenizer.vocab_size must be at least 300 (256 bytes + specials + merges), got {self.vocab_size}")


def train_tokenizer(texts, cfg: TokenizerConfig):
    """Train byte-level BPE on an iterable of strings; returns a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=PAD)


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def encode_stream(tokenizer, texts: list[str]) -> np.ndarray:
    """Encode documents into one flat stream, each followed by EOS. uint16 when the vocab fits."""
    dtype = np.uint16 if len(tokenizer) <= 2**16 else np.uint32
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    out = np.empty(sum(len(x) + 1 for x in ids), dtype=dtype)
    i = 0
    for x in ids:
        out[i : i + len(x)] = x
        out[i + len(x)] = eos
        i += len(x) + 1
    return out


def token_path(tokenizer_dir: Path, split: str, lang: str) -> Path:
    return Path(tokenizer_dir) / "tokens" / split / f"{lang}.npy"


def check_vocab(tokenizer_dir: Path, model_vocab: int, what: str) -> None:
    """A model must share the tokenizer's vocabulary; say so clearly at start-up, not as an index error."""
    n = len(load_tokenizer(tokenizer_dir))
    if n != model_vocab:
        raise MomeError(f"{what} has a vocabulary of {model_vocab} but the tokenizer in '{tokenizer_dir}' has {n}; "
                        f"retrain {what} with this tokenizer (same run_dir)")
