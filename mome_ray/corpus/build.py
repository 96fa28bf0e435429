"""Build the corpus: extract + clean every source in parallel, split by document, balance, write.

    mome corpus build --config configs/small.yaml

Splits are by document (a man page, a help page, a dictionary entry, a Python file) or by whole source
(`holdout: true` sources go to test only), deterministic for a seed: the man pages and help pages are
parallel translations whose lines repeat, so a random line split would leak. Each split is then balanced
greedily so that every language holds within `tolerance` (5%, the paper's rule) of the smallest one's
tokens, after capping each language at `max_tokens[split]`.
Output: HF `datasets` on disk (columns text, lang, source, doc_id) and `manifest.json`.
"""

from __future__ import annotations

import hashlib
import platform
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from mome_ray.corpus.clean import Deduplicator, clean_text, count_tokens
from mome_ray.corpus.fetch import package_versions
from mome_ray.corpus.sources import Document, SourceConfig, extract_source
from mome_ray.errors import MomeError
from mome_ray.langs import Lang, resolve_langs, vote_lists

SPLITS = ("train", "val", "test")


@dataclass
class CorpusConfig:
    sources: list[SourceConfig] = field(default_factory=list)  # where each language's text comes from
    user_dir: str = ""  # your own data instead: DIR/<lang>/ folders of .txt/.py/.jsonl/.parquet
    cache_dir: str = ".cache/mome/debian"  # where `mome corpus fetch` unpacks Debian packages
    code_langs: list[str] = field(default_factory=lambda: ["py"])  # programming languages: no stop-word vote
    stopwords: dict[str, list[str]] = field(default_factory=dict)  # stop words of languages not built in
    min_words: int = 4  # shorter prose lines are dropped
    val_frac: float = 0.05  # share of documents (of non-holdout sources) in val
    test_frac: float = 0.05  # and in test
    max_tokens: dict[str, int] = field(default_factory=lambda: {"train": 500_000, "val": 25_000, "test": 25_000})
    tolerance: float = 0.05  # every language within this fraction of the smallest, per split
    workers: int = 2  # extraction processes

    def __post_init__(self):
        if not 0 <= self.val_frac < 1 or not 0 <= self.test_frac < 1 or self.val_frac + self.test_frac >= 1:
            raise MomeError("corpus.val_frac and corpus.test_frac must be in [0, 1) and sum to less than 1")
        if set(self.max_tokens) != set(SPLITS):
            raise MomeError(f"corpus.max_tokens needs exactly the keys {list(SPLITS)}, got {sorted(self.max_tokens)}")


def corpus_sources(cfg: CorpusConfig, langs: list[Lang]) -> list[SourceConfig]:
    """The sources feeding `langs`: the user's folders when `user_dir` is set, else the configured ones."""
    codes = [lang.code for lang in langs]
    if cfg.user_dir:
        root = Path(cfg.user_dir)
        if not root.is_dir():
            raise MomeError(f"corpus.user_dir '{root}' is not a folder; it must hold one folder per language code")
        missing = [c for c in codes if not (root / c).is_dir()]
        if missing:
            raise MomeError(f"corpus.user_dir '{root}' has no folder for language(s) {missing}; expected {root}/<lang>/")
        return [SourceConfig(name=f"user-{c}", lang=c, kind="folder", path=str(root / c), licence="user-provided")
                for c in codes]
    sources = [s for s in cfg.sources if s.lang in codes]
    names = [s.name for s in cfg.sources]
    if len(set(names)) != len(names):
        raise MomeError(f"corpus.sources has duplicate names: {sorted(n for n in set(names) if names.count(n) > 1)}")
    bare = [c for c in codes if not any(s.lang == c for s in sources)]
    if bare:
        raise MomeError(f"no corpus source for language(s) {bare}; add entries to corpus.sources or set corpus.user_dir")
    return sources


def _extract_and_clean(src: SourceConfig, cache_dir: str, lang: Lang, lists, min_words: int):
    """Worker-process job: a source's documents, cleaned (dedup happens later, in order)."""
    t0 = time.perf_counter()
    docs = extract_source(src, Path(cache_dir), lang)
    raw_bytes = sum(len(d.text.encode()) for d in docs)
    cleaned = [Document(d.source, d.doc_id, clean_text(d.text, lang, lists, min_words)) for d in docs]
    return cleaned, {"docs_raw": len(docs), "bytes_raw": raw_bytes, "seconds": round(time.perf_counter() - t0, 1)}


def assign_split(src: SourceConfig, doc_id: str, seed: int, val_frac: float, test_frac: float) -> str:
    """Deterministic split of one document: a stable hash, independent of order and of other documents."""
    if src.holdout:
        return "test"
    h = hashlib.blake2b(f"{seed}/{src.name}/{doc_id}".encode(), digest_size=8).digest()
    u = int.from_bytes(h, "big") / 2**64
    return "val" if u < val_frac else "test" if u < val_frac + test_frac else "train"


def balance(docs_by_lang: dict[str, list[dict]], cap: int, tolerance: float, seed: int) -> dict[str, list[dict]]:
    """Greedy balancing: every language gets [target, target*(1+tolerance)] tokens, target = min(cap, smallest).

    Documents are visited in a seeded hash order and added while they fit under the ceiling; a document that
    does not fit contributes its leading lines that do (it stays in its split, so nothing leaks). Coarse
    documents (a Python file can be thousands of tokens) therefore never leave a language short.
    """
    totals = {code: sum(d["tokens"] for d in docs) for code, docs in docs_by_lang.items()}
    target = min(cap, *totals.values())
    ceiling = int(target * (1 + tolerance))
    out = {}
    for code, docs in docs_by_lang.items():
        order = sorted(docs, key=lambda d: hashlib.blake2b(f"{seed}/{d['source']}/{d['doc_id']}".encode()).digest())
        chosen, total = [], 0
        for d in order:
            if total >= target:
                break
            if total + d["tokens"] > ceiling:
                d = _head(d, ceiling - total)
            if d["tokens"]:
                chosen.append(d)
                total += d["tokens"]
        out[code] = chosen
    return out


def _head(doc: dict, budget: int) -> dict:
    """The document cut to its leading lines that hold at most `budget` tokens."""
    lines, used = [], 0
    for line in doc["text"].splitlines():
        n = count_tokens(line)
        if used + n > budget:
            break
        lines.append(line)
        used += n
    return {**doc, "text": "\n".join(lines), "tokens": used}


def build_corpus(cfg: CorpusConfig, codes: list[str], seed: int, out_dir: Path, log=print) -> dict:
    """Extract, clean, split, balance and write the corpus to `out_dir`; returns the manifest."""
    from datasets import Dataset, DatasetDict

    langs = resolve_langs(codes, cfg.code_langs, cfg.stopwords)
    by_code = {lang.code: lang for lang in langs}
    sources = corpus_sources(cfg, langs)
    lists = vote_lists(langs)

    log(f"extracting {len(sources)} sources with {cfg.workers} processes ...")
    with ProcessPoolExecutor(max_workers=cfg.workers) as pool:
        futures = [
            pool.submit(_extract_and_clean, s, cfg.cache_dir, by_code[s.lang], lists, cfg.min_words) for s in sources
        ]
        results = []
        for src, fut in zip(sources, futures):
            results.append(fut.result())
            log(f"  {src.name:<24} {src.lang:<3} {results[-1][1]['docs_raw']:>7} docs  {results[-1][1]['seconds']:>6}s")

    # Dedup language-wide in source order, then split by document.
    dedups = {code: Deduplicator(lang.is_code) for code, lang in by_code.items()}
    pools: dict[str, dict[str, list[dict]]] = {s: defaultdict(list) for s in SPLITS}
    source_stats = []
    for src, (docs, stats) in zip(sources, results):
        kept = 0
        for d in docs:
            text = dedups[src.lang](d.text)
            if not text.strip():
                continue
            kept += 1
            split = assign_split(src, d.doc_id, seed, cfg.val_frac, cfg.test_frac)
            row = {"text": text, "lang": src.lang, "source": src.name, "doc_id": d.doc_id, "tokens": count_tokens(text)}
            pools[split][src.lang].append(row)
        source_stats.append({"name": src.name, "lang": src.lang, "kind": src.kind, "packages": src.packages,
                             "holdout": src.holdout, "licence": src.licence, **stats, "docs_kept": kept})
        if kept == 0:
            raise MomeError(f"source '{src.name}' ({src.lang}) has no text left after cleaning; check its language "
                            f"and corpus.min_words ({cfg.min_words})")

    splits, stats = {}, {}
    for split in SPLITS:
        empty = [c for c in codes if not pools[split].get(c)]
        if empty:
            raise MomeError(f"split '{split}' has no documents for language(s) {empty}: the sources are too small "
                            f"for corpus.val_frac/test_frac; add text or raise the fractions")
        chosen = balance({c: pools[split][c] for c in codes}, cfg.max_tokens[split], cfg.tolerance, seed)
        rows = [r for c in codes for r in chosen[c]]
        splits[split] = Dataset.from_dict({k: [r[k] for r in rows] for k in ("text", "lang", "source", "doc_id")})
        stats[split] = {
            c: {"docs": len(chosen[c]), "tokens": sum(r["tokens"] for r in chosen[c]),
                "bytes": sum(len(r["text"].encode()) for r in chosen[c])}
            for c in codes
        }
        toks = [s["tokens"] for s in stats[split].values()]
        stats[split]["max_over_min"] = round(max(toks) / max(1, min(toks)), 4)

    out_dir.mkdir(parents=True, exist_ok=True)
    DatasetDict(splits).save_to_disk(str(out_dir / "data"))
    versions = package_versions(Path(cfg.cache_dir))
    manifest = {
        "langs": codes,
        "token_unit": "words and punctuation marks (tokenizer-independent)",
        "tolerance": cfg.tolerance,
        "splits": stats,
        "sources": [{**s, "versions": {p: versions.get(p, "?") for p in s["packages"]}} for s in source_stats],
        "python": platform.python_version(),
        "seed": seed,
    }
    return manifest


def print_balance(manifest: dict, log=print) -> None:
    """Per-split, per-language token table."""
    codes = manifest["langs"]
    log(f"{'split':<6}" + "".join(f"{c:>10}" for c in codes) + f"{'max/min':>10}")
    for split in SPLITS:
        s = manifest["splits"][split]
        log(f"{split:<6}" + "".join(f"{s[c]['tokens']:>10,}" for c in codes) + f"{s['max_over_min']:>10.3f}")
