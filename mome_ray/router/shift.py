"""The router under source shift: labelled texts from sources the corpus never trains on.

    cases, versions = shift_set(tokenizer, cfg.router, cfg.langs, run_dir, seed)   # {"shift/<source>/<n>": (texts, labels)}
    metrics["shift_accuracy"] = shift_accuracy(evaluate.scores per group)           # overall, by length, by source

The corpus (configs/base.yaml) trains on man pages, help pages, dictionaries, fortunes, the Bible and the
Python standard library, and holds whole sources out for its own held-out test. This set comes from none
of those, and from text kinds the corpus cleaning drops (lines of < 4 words, code in prose, tables):
- `messages-<ll>` (en, fr, de): program messages of GNU tools, from the gettext catalogues
  (`usr/share/locale/<ll>/LC_MESSAGES/*.mo`) of the Debian packages in `router.shift.packages`. English
  is the catalogues' msgids, French and German their translations (msgstr, when it differs).
- `cli-help-<ll>`: the same catalogues' entries holding command-line option help
  (`  -a, --all    do not ignore entries starting with .`): the text of `--help`.
- `py-tables`: numeric data tables in Python files of third-party packages (`router.shift.python_packages`,
  found in the running interpreter's site-packages; never the stdlib): runs of >= 3 lines that are numbers
  and separators only (each with a comma), with the line before the run (`_viridis_data = [`), at most MAX_TABLE_LINES lines.

Units are read in a fixed order (package, file, catalogue entry), so the set depends only on the package
versions (recorded in `shift_versions`). A unit sharing any run of SHINGLE words with the training split
(or, when shorter, equal to a whole training line) is dropped: the set never holds training text. From
each source, `eval_per_lang` whole units and `eval_per_lang` token windows of each `eval_lengths` length
lying inside one unit (as the in-domain test cases: `examples.doc_windows`), drawn with a seeded generator.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
import struct
import sys
import sysconfig
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from mome_ray.errors import MomeError

GETTEXT_LANGS = ("en", "fr", "de")  # English msgids; French and German catalogues
SHINGLE = 6  # words: a unit sharing a run this long with the training split is dropped
MIN_WORDS = 3  # a message needs this many words of letters to say its language
MAX_TABLE_LINES = 40
PREFIX = "shift/"
OPTION_LINE = re.compile(r"^\s+--?[A-Za-z0-9]", re.M)  # `  -a, --all ...`, `      --help ...`
NUMERIC_LINE = re.compile(r"[-+\d.eEj_\s,\[\](){}]*\d[-+\d.eEj_\s,\[\](){}]*,[-+\d.eEj_\s,\[\](){}]*")
WORD = re.compile(r"\w+")
LETTER_WORD = re.compile(r"[^\W\d_]{2,}")


@dataclass
class ShiftConfig:
    # Debian packages whose gettext catalogues give program messages and --help text (fetched on first use)
    packages: list[str] = field(default_factory=lambda: ["coreutils", "tar", "grep", "sed", "findutils",
                                                         "diffutils", "wget"])
    # third-party Python packages (import names) whose numeric tables are the py source; never the stdlib
    python_packages: list[str] = field(default_factory=lambda: ["numpy", "scipy", "sklearn", "matplotlib", "pandas"])

    def __post_init__(self):
        bad = sorted(set(self.python_packages) & sys.stdlib_module_names)
        if bad:
            raise MomeError(f"router.shift.python_packages must be third-party packages, not the stdlib the corpus "
                            f"trains on: {bad}")


# --- gettext catalogues --------------------------------------------------------------------------------

def read_mo(path: Path) -> list[tuple[str, str]]:
    """(msgid, msgstr) of a GNU .mo file, in file order: no header, context stripped, first plural form."""
    data = path.read_bytes()
    order = {0x950412DE: "<", 0xDE120495: ">"}.get(struct.unpack("<I", data[:4])[0]) if len(data) >= 28 else None
    if order is None:
        raise MomeError(f"'{path}' is not a gettext .mo file (bad magic number)")
    n, orig, trans = struct.unpack_from(order + "3I", data, 8)
    entries = []
    for i in range(n):
        (olen, ooff), (tlen, toff) = (struct.unpack_from(order + "2I", data, at + 8 * i) for at in (orig, trans))
        msgid, msgstr = (data[off : off + size].decode("utf-8", "replace") for off, size in ((ooff, olen), (toff, tlen)))
        if msgid:  # the header's msgid is empty
            entries.append((msgid.split("\x04")[-1].split("\x00")[0], msgstr.split("\x00")[0]))
    return entries


def gettext_units(packages: list[str], cache_dir: Path, langs: list[str]) -> dict[str, list[str]]:
    """{"messages-en": [...], "cli-help-fr": [...], ...} from the packages' French and German catalogues."""
    from mome_ray.corpus.fetch import package_root

    units: dict[str, dict[str, None]] = {}  # ordered sets: a msgid shared by both catalogues counts once
    for package in packages:
        for ll in ("fr", "de"):
            for mo in sorted((package_root(cache_dir, package) / "usr/share/locale" / ll / "LC_MESSAGES").glob("*.mo")):
                for msgid, msgstr in read_mo(mo):
                    kind = "cli-help" if OPTION_LINE.search(msgid) else "messages"
                    for lang, text in (("en", msgid), (ll, msgstr if msgstr != msgid else "")):
                        text = text.strip("\n")
                        if lang in langs and len(LETTER_WORD.findall(text)) >= MIN_WORDS:
                            units.setdefault(f"{kind}-{lang}", {})[text] = None
    return {source: list(texts) for source, texts in sorted(units.items())}


# --- numeric tables in third-party Python ---------------------------------------------------------------

def python_package_dir(name: str) -> Path:
    """The folder of an installed, non-stdlib package (found without importing it)."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise MomeError(f"router.shift.python_packages: '{name}' is not an installed package; install it or drop it")
    root = Path(list(spec.submodule_search_locations)[0])
    if root.is_relative_to(sysconfig.get_paths()["stdlib"]) and "site-packages" not in root.parts:
        raise MomeError(f"router.shift.python_packages: '{name}' is in the stdlib ({root}), which the corpus trains on")
    return root


def numeric_tables(source: str) -> list[str]:
    """Runs of >= 3 lines of numbers and separators (each line with a comma) in Python source, each with the
    line before it, cut to MAX_TABLE_LINES lines."""
    lines = source.splitlines()
    tables, start = [], None
    for i, line in enumerate(lines + [""]):
        if line.strip() and NUMERIC_LINE.fullmatch(line.strip()):
            start = i if start is None else start
            continue
        if start is not None and i - start >= 3:
            tables.append("\n".join(lines[max(0, start - 1) : min(i, start - 1 + MAX_TABLE_LINES)]))
        start = None
    return tables


def table_units(python_packages: list[str]) -> dict[str, list[str]]:
    """{"py-tables": [...]}: the numeric tables of every .py file of the packages, in path order."""
    tables = []
    for name in python_packages:
        for path in sorted(python_package_dir(name).rglob("*.py")):
            tables += numeric_tables(path.read_text(encoding="utf-8", errors="replace"))
    return {"py-tables": tables}


# --- the set ---------------------------------------------------------------------------------------------

def shift_units(cfg: ShiftConfig, cache_dir: Path, langs: list[str]) -> dict[str, list[str]]:
    """Every unit of every shift source of `langs`, in a fixed order (fetches the Debian packages if needed)."""
    units = {}
    if cfg.packages and set(langs) & set(GETTEXT_LANGS):
        from mome_ray.corpus.fetch import fetch_packages

        fetch_packages(cfg.packages, Path(cache_dir), progress=False)
        units.update(gettext_units(cfg.packages, Path(cache_dir), langs))
    if cfg.python_packages and "py" in langs:
        units.update(table_units(cfg.python_packages))
    return {source: texts for source, texts in units.items() if texts}


def source_lang(source: str) -> str:
    """The label of a shift source's texts: `messages-fr` -> fr, `py-tables` -> py."""
    return "py" if source.startswith("py-") else source.rsplit("-", 1)[1]


def _hash(words: Iterable[str]) -> int:
    return int.from_bytes(hashlib.blake2b(" ".join(words).encode(), digest_size=8).digest(), "little")


def _shingles(words: list[str]) -> Iterable[int]:
    return map(_hash, zip(*(words[i:] for i in range(SHINGLE))))


def drop_training_text(units: dict[str, list[str]], train_texts: Iterable[str]) -> dict[str, list[str]]:
    """`units` without any that shares a run of SHINGLE words (lowercased, `\\w+`, across lines) with
    `train_texts`, or, shorter than that, equals a whole line of them."""
    seen: set[int] = set()
    for text in train_texts:
        text = text.lower()
        seen.update(_shingles(WORD.findall(text)))
        seen.update(_hash(words) for words in map(WORD.findall, text.splitlines()) if len(words) < SHINGLE)
    kept = {}
    for source, texts in units.items():
        def clean(text: str) -> bool:
            words = WORD.findall(text.lower())
            return seen.isdisjoint(_shingles(words) if len(words) >= SHINGLE else [_hash(words)])

        kept[source] = [t for t in texts if clean(t)]
    return kept


def shift_cases(tokenizer, units: dict[str, list[str]], eval_lengths: list[int], per_source: int,
                seed: int) -> dict[str, tuple[list[str], list[str]]]:
    """`shift/<source>/whole` (up to `per_source` units) and `shift/<source>/<n>` (up to `per_source` windows
    of n tokens inside one unit) for every source, labelled with the source's language."""
    from mome_ray.router.examples import decode, doc_windows

    cases = {}
    for source, texts in units.items():
        rng = np.random.default_rng([seed, zlib.crc32(source.encode())])
        ids = [np.asarray(x) for x in tokenizer(texts, add_special_tokens=False)["input_ids"]]
        groups = {"whole": [texts[i] for i in np.sort(rng.choice(len(texts), min(per_source, len(texts)), replace=False))]}
        for n in eval_lengths:
            groups[str(n)] = decode(tokenizer, doc_windows(ids, n, per_source, rng))
        for name, group in groups.items():
            if group:
                cases[f"{PREFIX}{source}/{name}"] = (group, [source_lang(source)] * len(group))
    return cases


def shift_set(tokenizer, cfg, langs: list[str], run_dir: Path, seed: int) -> tuple[dict, dict[str, str]]:
    """The shift cases of a run (`cfg`: its RouterConfig) and the package versions they come from. The Debian
    cache is the corpus stage's (`corpus.cache_dir` in its meta.json); its training text is that stage's train split."""
    from datasets import load_from_disk

    from mome_ray.artifacts import read_meta

    corpus = read_meta(run_dir, "corpus")["config"]["corpus"]
    shared = sorted(set(cfg.shift.packages) & {p for s in corpus["sources"] for p in s["packages"]})
    if shared:
        raise MomeError(f"router.shift.packages {shared} are corpus sources' packages: a shift set must come from "
                        f"sources the corpus does not use; drop them from router.shift.packages")
    units = shift_units(cfg.shift, Path(corpus["cache_dir"]), langs)
    units = drop_training_text(units, load_from_disk(str(Path(run_dir) / "corpus" / "data"))["train"]["text"])
    cases = shift_cases(tokenizer, units, cfg.eval_lengths, cfg.eval_per_lang, seed)
    return cases, shift_versions(cfg.shift, Path(corpus["cache_dir"]))


def shift_versions(cfg: ShiftConfig, cache_dir: Path) -> dict[str, str]:
    """The versions the set was built from: Debian packages and Python packages."""
    from importlib.metadata import PackageNotFoundError, packages_distributions, version

    from mome_ray.corpus.fetch import package_versions

    debian = package_versions(Path(cache_dir))
    dists = packages_distributions()
    out = {p: debian.get(p, "?") for p in cfg.packages}
    for name in cfg.python_packages:
        try:
            out[name] = version(dists.get(name, [name])[0])
        except PackageNotFoundError:
            out[name] = "?"
    return out


def shift_accuracy(groups: dict[str, dict]) -> dict:
    """Accuracy over the `shift/...` groups of `evaluate.scores` results: overall, by length, by source, n."""
    shift = {name.removeprefix(PREFIX): g for name, g in groups.items() if name.startswith(PREFIX)}
    if not shift:
        return {}

    def pooled(names: list[str]) -> float:
        n = sum(shift[k]["n"] for k in names)
        return sum(shift[k]["accuracy"] * shift[k]["n"] for k in names) / n

    by_length = {}
    for name in shift:
        by_length.setdefault(name.rsplit("/", 1)[1], []).append(name)
    by_source = {}
    for name in shift:
        by_source.setdefault(name.rsplit("/", 1)[0], []).append(name)
    lengths = sorted(by_length, key=lambda k: (not k.isdigit(), int(k) if k.isdigit() else 0))
    return {"overall": pooled(list(shift)), "n": sum(g["n"] for g in shift.values()),
            "by_length": {k: pooled(by_length[k]) for k in lengths},
            "by_source": {k: pooled(v) for k, v in sorted(by_source.items())},
            "n_by_source": {k: sum(shift[x]["n"] for x in v) for k, v in sorted(by_source.items())}}
