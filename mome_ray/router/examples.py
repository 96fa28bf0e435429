"""Labelled texts for the router: training windows from the token streams, and the test cases.

    texts, labels = training_examples(tokenizer, RUN_DIR / "tokenizer", "train", cfg.langs, cfg.router, seed)
    cases = test_cases(tokenizer, RUN_DIR, cfg.langs, cfg.router, holdout_sources, seed)

Training examples (our choice; the paper trains on whole sequences only): per language the same number
of windows cut at random offsets from the split's token stream, half of them full MoE sequences
(`sequence_length` tokens) and half with a length drawn log-uniformly from [min_window, sequence_length],
so that short inputs route well too. Windows are decoded back to text: the router takes text.

Test cases, each a group of (texts, labels): the MoE's sequences (non-overlapping blocks of the test
stream), windows of every `eval_lengths` length lying inside one document, whole documents, the held-out
sources' documents and 32-token windows, and mixed cases (English prose with a Python snippet in it,
labelled en; Python with an English docstring, labelled py).
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np

from mome_ray.errors import MomeError
from mome_ray.router.model import RouterConfig, is_text
from mome_ray.tokenizer import token_path

Cases = dict[str, tuple[list[str], list[str]]]


def decode(tokenizer, windows: list[np.ndarray]) -> list[str]:
    return tokenizer.batch_decode([w.tolist() for w in windows], skip_special_tokens=True)


def window_lengths(n: int, cfg: RouterConfig, rng: np.random.Generator) -> np.ndarray:
    """Half full sequences, half log-uniform in [min_window, sequence_length]."""
    short = np.exp(rng.uniform(np.log(cfg.min_window), np.log(cfg.sequence_length), n - n // 2))
    return np.concatenate([np.full(n // 2, cfg.sequence_length), np.round(short)]).astype(int)


def training_examples(tokenizer, tokenizer_dir: Path, split: str, langs: list[str], cfg: RouterConfig,
                      seed: int) -> tuple[list[str], list[str]]:
    """`examples_per_lang` windows of every language from `split` (fewer only where some decode to no text)."""
    texts, labels = [], []
    for li, lang in enumerate(langs):
        path = token_path(tokenizer_dir, split, lang)
        if not path.is_file():
            raise MomeError(f"no '{split}' tokens for '{lang}' in '{tokenizer_dir}'; run 'mome tokenizer' with "
                            f"these langs first")
        stream = np.load(path, mmap_mode="r")
        if len(stream) < cfg.sequence_length:
            raise MomeError(f"'{split}' split of '{lang}' has {len(stream)} tokens, fewer than one router sequence "
                            f"({cfg.sequence_length}); lower router.sequence_length or use a larger corpus")
        rng = np.random.default_rng([seed, li, zlib.crc32(split.encode())])
        lengths = window_lengths(cfg.examples_per_lang, cfg, rng)
        starts = rng.integers(0, len(stream) - lengths + 1)
        decoded = decode(tokenizer, [stream[s : s + n] for s, n in zip(starts, lengths)])
        kept = [t for t in decoded if is_text(t)]
        texts += kept
        labels += [lang] * len(kept)
    return texts, labels


def doc_windows(docs: list[np.ndarray], length: int, k: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Up to `k` distinct windows of `length` tokens, each inside one document, uniform over positions."""
    counts = np.array([max(0, len(d) - length + 1) for d in docs])
    total = int(counts.sum())
    if total == 0:
        return []
    picks = np.sort(rng.choice(total, size=min(k, total), replace=False))
    ends = np.cumsum(counts)
    which = np.searchsorted(ends, picks, side="right")
    offsets = picks - (ends - counts)[which]
    return [docs[d][o : o + length] for d, o in zip(which, offsets)]


def _group(cases: Cases, name: str, texts: list[str], label: str) -> None:
    old_texts, old_labels = cases.get(name, ([], []))
    cases[name] = (old_texts + texts, old_labels + [label] * len(texts))


def test_cases(tokenizer, run_dir: Path, langs: list[str], cfg: RouterConfig, holdout: set[str],
               seed: int) -> Cases:
    """Every group of the hard-case evaluation, from the test split of the corpus and tokenizer stages."""
    from datasets import load_from_disk

    from mome_ray.data import load_blocks

    test = load_from_disk(str(Path(run_dir) / "corpus" / "data"))["test"]
    rows = list(zip(test["lang"], test["source"], test["text"]))
    ids = tokenizer([text for _, _, text in rows], add_special_tokens=False)["input_ids"]
    docs = [(lang, source, text, np.asarray(x)) for (lang, source, text), x in zip(rows, ids)]
    cases: Cases = {}
    pieces: dict[str, dict[int, list[str]]] = {}  # lang -> length -> windows, for the mixed cases
    for li, lang in enumerate(langs):
        rng = np.random.default_rng([seed, li, 7])
        blocks = load_blocks(Path(run_dir) / "tokenizer", "test", lang, cfg.sequence_length)[: cfg.eval_per_lang]
        _group(cases, "sequences", decode(tokenizer, list(blocks)), lang)
        mine = [d for d in docs if d[0] == lang]
        for n in cfg.eval_lengths:
            _group(cases, str(n), decode(tokenizer, doc_windows([d[3] for d in mine], n, cfg.eval_per_lang, rng)), lang)
        _group(cases, "whole", [d[2] for d in mine], lang)
        for source in sorted({d[1] for d in mine} & holdout):
            held = [d for d in mine if d[1] == source]
            _group(cases, f"heldout/{source}/whole", [d[2] for d in held], lang)
            _group(cases, f"heldout/{source}/32", decode(tokenizer, doc_windows([d[3] for d in held], 32,
                                                                                cfg.eval_per_lang, rng)), lang)
        pieces[lang] = {n: decode(tokenizer, doc_windows([d[3] for d in mine], n, cfg.eval_per_lang, rng))
                        for n in (16, 32, 48)}
    if "en" in pieces and "py" in pieces:
        en, py = pieces["en"], pieces["py"]
        k = min(len(en[48]) // 2, len(py[16]))
        _group(cases, "mixed/en_prose_with_py", [f"{en[48][2 * i]}\n\n    {py[16][i]}\n\n{en[48][2 * i + 1]}"
                                                 for i in range(k)], "en")
        k = min(len(py[32]) // 2, len(en[32]))
        _group(cases, "mixed/py_with_en_docstring", [f'{py[32][2 * i]}\n    """{en[32][i]}"""\n{py[32][2 * i + 1]}'
                                                     for i in range(k)], "py")
    return {name: group for name, group in cases.items() if group[0]}
