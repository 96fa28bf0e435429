"""Token ids of texts for the router, with the byte-level BPE run once per distinct pre-token.

    encoder = PretokenCache(tokenizer)       # the project's byte-level BPE tokenizer (mome tokenizer)
    ids = encoder.encode(texts)              # == [e.ids for e in tokenizer encode_batch_fast(texts)]

Why: the HF fast tokenizer costs about 1 us per token (it builds a token string and an offset for each),
as much CPU as a whole off-the-shelf language identifier, and was most of the router's predict time. But
the byte-level BPE tokenizes each pre-token (the GPT-2 pattern's pieces: a word with its leading space, a
number, a punctuation run, whitespace) on its own, and routed text repeats a small set of them (16k
distinct among 435k in the benchmark's 9,038 texts). So: split with the same pattern (the `regex` module,
as the ByteLevel pre-tokenizer does with Oniguruma), look each piece up in a dict, and send only pieces
never seen before through the tokenizer itself, in one batch. The ids are the tokenizer's (the tests
compare them on code points across Unicode; a one-off check of all 1.1M code points in several contexts
found no difference). A text holding an added token (`<|endoftext|>`) goes through the tokenizer whole,
which splits those out first.
"""

from __future__ import annotations

from itertools import chain

import regex

from mome_ray.errors import MomeError

# The GPT-2 pre-tokenizer pattern (tokenizers' ByteLevel pre-tokenizer with use_regex=True).
GPT2_PATTERN = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
MAX_CACHED = 500_000  # distinct pieces kept (a few tens of MB); past this the cache starts over


def check_byte_level_bpe(backend) -> None:
    """Raise unless `backend` (a tokenizers.Tokenizer) tokenizes pieces of GPT2_PATTERN independently."""
    from tokenizers import models, pre_tokenizers

    pre, model = backend.pre_tokenizer, backend.model
    if (backend.normalizer is not None or not isinstance(pre, pre_tokenizers.ByteLevel) or pre.add_prefix_space
            or not pre.use_regex or not isinstance(model, models.BPE) or model.dropout):
        raise MomeError("router token features need the project's byte-level BPE tokenizer (no normalizer, "
                        "ByteLevel pre-tokenizer without prefix space, BPE without dropout), as 'mome tokenizer' "
                        "makes; use char_tfidf or hashing features with other tokenizers")


class PretokenCache:
    """Token ids of texts, memoised per pre-token; the same ids as the tokenizer gives."""

    def __init__(self, tokenizer):
        self.backend = tokenizer.backend_tokenizer
        check_byte_level_bpe(self.backend)
        self.added = [t.content for t in self.backend.get_added_tokens_decoder().values()]
        self.cache: dict[str, tuple[int, ...]] = {}

    def _tokenize(self, texts: list[str]) -> list[list[int]]:
        """The tokenizer itself (Rust, in parallel, no offsets)."""
        return [e.ids for e in self.backend.encode_batch_fast(texts, add_special_tokens=False)]

    def _cache_with(self, pieces: set[str]) -> dict[str, tuple[int, ...]]:
        """The cache, holding every one of `pieces` (a fresh dict once it would grow past MAX_CACHED)."""
        new = list(pieces.difference(self.cache))
        if len(self.cache) + len(new) > MAX_CACHED:
            self.cache, new = {}, list(pieces)  # a new dict: a call still reading the old one is unaffected
        cache = self.cache
        cache.update(zip(new, map(tuple, self._tokenize(new))))
        return cache

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text (no special tokens added)."""
        plain = [i for i, t in enumerate(texts) if not any(a in t for a in self.added)]
        split = [GPT2_PATTERN.findall(texts[i]) for i in plain]
        cache = self._cache_with(set(chain.from_iterable(split)))
        ids: list[list[int]] = [[] for _ in texts]
        for i, pieces in zip(plain, split):
            ids[i] = list(chain.from_iterable(map(cache.__getitem__, pieces)))
        if len(plain) < len(texts):
            rest = sorted(set(range(len(texts))) - set(plain))
            for i, row in zip(rest, self._tokenize([texts[i] for i in rest])):
                ids[i] = row
        return ids
