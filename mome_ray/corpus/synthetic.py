"""Synthetic pseudo-languages for scale tests and benchmarks: many languages, each pure configuration.

    overrides = write_languages(Path("data/synth"), n=50)
    cfg = load_settings("configs/tiny.yaml", ["run_dir=runs/synth", *overrides])

Language i (code `x00`, `x01`, ...) is made of its own syllables (consonant-vowel-consonant; no two languages
share one): words of one to three syllables, and six one-syllable function words that are its stop words.
`write_languages` writes DIR/<code>/docs.txt (documents separated by blank lines, every line unique and
holding at least two of its stop words, so the corpus' stop-word vote keeps it) and returns the config
overrides that make them languages: `langs`, `corpus.user_dir` and one `corpus.stopwords.<code>` each.
No word of any pseudo-language is a stop word of a built-in language (`langs.STOPWORDS`).
"""

from __future__ import annotations

import random
from pathlib import Path

from mome_ray.errors import MomeError
from mome_ray.langs import STOPWORDS

CONSONANTS = "bcdfghjklmnprstvwxz"
VOWELS = "aeiouy"
SYLLABLES_PER_LANG = 12
STOPWORDS_PER_LANG = 6


def _builtin_stopwords() -> set[str]:
    return {w for words in STOPWORDS.values() for w in words.split()}


def syllable_inventories(n: int, seed: int = 0) -> list[list[str]]:
    """`n` disjoint lists of CVC syllables, none of them a built-in stop word."""
    builtin = _builtin_stopwords()
    pool = [c + v + e for c in CONSONANTS for v in VOWELS for e in CONSONANTS if c + v + e not in builtin]
    if n * SYLLABLES_PER_LANG > len(pool):
        raise MomeError(f"at most {len(pool) // SYLLABLES_PER_LANG} synthetic languages, asked for {n}")
    random.Random(seed).shuffle(pool)
    return [pool[i * SYLLABLES_PER_LANG:(i + 1) * SYLLABLES_PER_LANG] for i in range(n)]


def lang_codes(n: int) -> list[str]:
    return [f"x{i:02d}" for i in range(n)]


def _words(syllables: list[str], rng: random.Random, k: int) -> list[str]:
    builtin = _builtin_stopwords()
    out = []
    while len(out) < k:
        word = "".join(rng.choices(syllables, k=rng.randint(2, 3)))  # content words: 6 or 9 letters
        if word not in builtin:
            out.append(word)
    return out


def write_languages(root: Path, n: int, docs_per_lang: int = 40, lines_per_doc: int = 6, seed: int = 0) -> list[str]:
    """Write `n` pseudo-languages under `root` (a `corpus.user_dir`); returns the config overrides for them."""
    rng = random.Random(seed)
    overrides = [f"langs=[{','.join(lang_codes(n))}]", f"corpus.user_dir={root}"]
    for code, syllables in zip(lang_codes(n), syllable_inventories(n, seed)):
        stop, content = syllables[:STOPWORDS_PER_LANG], syllables[STOPWORDS_PER_LANG:]
        vocab = _words(content, rng, 200)
        docs = []
        for d in range(docs_per_lang):
            lines = []
            for i in range(lines_per_doc):
                words = rng.sample(vocab, rng.randint(5, 9)) + rng.sample(stop, 2)
                rng.shuffle(words)
                lines.append(" ".join(words).capitalize() + f" {d}.{i}.")  # the numbers keep every line unique
            docs.append("\n".join(lines))
        (root / code).mkdir(parents=True, exist_ok=True)
        (root / code / "docs.txt").write_text("\n\n".join(docs) + "\n")
        overrides.append(f"corpus.stopwords.{code}=[{','.join(stop)}]")
    return overrides
