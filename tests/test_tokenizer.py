"""Tokenizer: byte-level round trip on all four languages, no unknown tokens, loads with AutoTokenizer."""

import numpy as np
from transformers import AutoTokenizer

from mome_ray.tokenizer import EOS, TokenizerConfig, encode_stream, token_path, train_tokenizer
from tests.conftest import SENTENCES

SAMPLES = [
    "The river runs through the old town.",
    "L'été où la Forêt-Noire s'appelait « Schwarzwald » — déjà !",
    "Größere Änderungen: Straße, Übermaß, süß.",
    "def fib(n: int) -> int:\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "emoji 🤖 and CJK 漢字 and tabs\tand \r\n line ends",
]


def test_round_trip_all_languages_and_no_unknown(tmp_path):
    texts = [s for pool in SENTENCES.values() for s in pool] * 3 + [SAMPLES[3]] * 3
    tok = train_tokenizer(texts, TokenizerConfig(vocab_size=400, min_frequency=1))
    tok.save_pretrained(str(tmp_path))
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    assert len(loaded) == len(tok) <= 400
    for text in SAMPLES:
        ids = loaded(text, add_special_tokens=False)["input_ids"]
        assert loaded.decode(ids) == text
        assert loaded.unk_token_id is None or loaded.unk_token_id not in ids
    assert loaded.eos_token == EOS and loaded.pad_token_id != loaded.eos_token_id


def test_encode_stream_separates_documents_with_eos():
    tok = train_tokenizer(["hello world", "bonjour le monde"] * 10, TokenizerConfig(vocab_size=300, min_frequency=1))
    stream = encode_stream(tok, ["hello", "monde"])
    assert stream.dtype == np.uint16
    assert (stream == tok.eos_token_id).sum() == 2 and stream[-1] == tok.eos_token_id


def test_tokenizer_stage_writes_streams(tiny_tokenized):
    from pathlib import Path

    from mome_ray.artifacts import read_meta

    run_dir = Path(tiny_tokenized.run_dir)
    meta = read_meta(run_dir, "tokenizer")
    for split in ("train", "val", "test"):
        for lang in tiny_tokenized.langs:
            n = len(np.load(token_path(run_dir / "tokenizer", split, lang)))
            assert n == meta["metrics"]["bpe_tokens"][split][lang] > 0
    assert AutoTokenizer.from_pretrained(str(run_dir / "tokenizer")).vocab_size > 256
    assert not list((run_dir / "corpus").rglob("cache-*.arrow")), "the tokenizer stage wrote into the corpus artifact"
