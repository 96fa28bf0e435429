"""Cleaning: keep the lines that are prose of the target language, drop duplicates, count tokens.

Extractors (`sources.py`) already removed markup. Here a natural-language line survives only if it has at
least `min_words` words and its stop-word vote goes to the target language: that removes untranslated
English in the fr/de packages, code, tables and headers (DATA.md: raw purity of those packages is 81-87%).
Code documents are kept verbatim. Exact duplicate lines (code: whole files) are dropped language-wide,
first occurrence wins, so translator boilerplate and repeated lines never straddle train and test.
"""

from __future__ import annotations

import hashlib
import re

from mome_ray.langs import Lang

_WORD = re.compile(r"\w+", re.UNICODE)
_TOKEN = re.compile(r"\w+|[^\w\s]", re.UNICODE)


def count_tokens(text: str) -> int:
    """Tokenizer-independent token count (words and punctuation marks), used to balance languages.

    The corpus is built before the BPE tokenizer exists; the tokenizer stage reports BPE counts too.
    """
    return len(_TOKEN.findall(text))


def vote(line: str, lists: dict[str, frozenset[str]]) -> str | None:
    """The language whose stop words occur most in `line`; None on a tie or no stop word at all."""
    words = [w.lower() for w in _WORD.findall(line)]
    scores = {code: sum(w in stop for w in words) for code, stop in lists.items()}
    best = max(scores.values(), default=0)
    winners = [code for code, s in scores.items() if s == best]
    return winners[0] if best > 0 and len(winners) == 1 else None


def clean_text(text: str, lang: Lang, lists: dict[str, frozenset[str]], min_words: int) -> str:
    """Keep the lines of `text` that pass the length and language vote (code: text unchanged)."""
    if lang.is_code:
        return text.strip("\n")
    kept = [
        line.strip()
        for line in text.splitlines()
        if len(_WORD.findall(line)) >= min_words and vote(line, lists) == lang.code
    ]
    return "\n".join(kept)


class Deduplicator:
    """Drops lines (or, for code, whole documents) already seen in this language."""

    def __init__(self, is_code: bool):
        self.is_code = is_code
        self.seen: set[bytes] = set()

    def _new(self, s: str) -> bool:
        h = hashlib.blake2b(s.encode(), digest_size=12).digest()
        if h in self.seen:
            return False
        self.seen.add(h)
        return True

    def __call__(self, text: str) -> str:
        if self.is_code:
            return text if self._new(text) else ""
        return "\n".join(line for line in text.splitlines() if self._new(line))
