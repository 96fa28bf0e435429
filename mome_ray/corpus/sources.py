"""Sources of real text: one extractor per source kind, turning fetched Debian packages (or a folder,
or the Python standard library) into plain-text `Document`s.

A source is configured by a `SourceConfig` (name, language, kind, packages, ...); `extract_source`
checks that its packages were fetched (`mome corpus fetch`) and dispatches on `kind` to a function
in `EXTRACTORS`, which gets the source, the fetch cache and the source's resolved `Lang` (whether it is a
programming language comes from `corpus.code_langs`). Markup-specific cleaning lives in `markup.py`.

    docs = extract_source(SourceConfig("fortunes-de", "de", "fortunes", ["fortunes-de"]), cache_dir)
    docs = extract_source(SourceConfig("user-js", "js", "folder", path="data/js"), cache_dir, Lang("js", True))
"""

from __future__ import annotations

import gzip
import json
import os
import re
import struct
import sysconfig
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from mome_ray.corpus import markup
from mome_ray.corpus.fetch import MARKER, package_root
from mome_ray.errors import MomeError
from mome_ray.langs import Lang

__all__ = ["SourceConfig", "Document", "EXTRACTORS", "extract_source", "package_root"]


@dataclass
class SourceConfig:
    name: str  # unique source name, e.g. "manpages-fr"
    lang: str  # language code of the text: "en", "fr", "de", "py", ...
    kind: str  # extractor name: a key of EXTRACTORS
    packages: list[str] = field(default_factory=list)  # Debian packages the source needs
    locale: str = ""  # locale folder inside the package, for kinds that have several (gnome_help "fr", ...)
    path: str = ""  # folder kind only: the folder to read
    holdout: bool = False
    licence: str = ""  # the text's licence, recorded in the corpus manifest  # the whole source goes to the test split


@dataclass(frozen=True)
class Document:
    source: str  # SourceConfig.name
    doc_id: str  # stable id inside the source ("man1/ls.1", "Gen.1", a relative path)
    text: str  # plain NFC text, one paragraph / sentence-like unit per line


def extract_source(src: SourceConfig, cache_dir: Path, lang: Lang | None = None) -> list[Document]:
    """Extract every document of `src` from the packages fetched into `cache_dir`.

    `lang`: the source's language as `langs.resolve_langs` made it from the config (None: a natural
    language). Text whose format does not say whether it is code (.jsonl/.parquet rows of the folder kind)
    keeps its whitespace only when `lang.is_code`.
    """
    lang = lang or Lang(src.lang, is_code=False)
    if src.kind not in EXTRACTORS:
        raise MomeError(f"source '{src.name}' has unknown kind '{src.kind}'; known kinds: {', '.join(sorted(EXTRACTORS))}")
    for package in src.packages:
        if not (package_root(cache_dir, package) / MARKER).exists():
            raise MomeError(
                f"source '{src.name}' needs Debian package '{package}', which is not in {cache_dir}; "
                "run 'mome corpus fetch --config CONFIG'"
            )
    docs = [d for d in EXTRACTORS[src.kind](src, Path(cache_dir), lang) if d.text]
    if not docs:
        raise MomeError(f"source '{src.name}' (kind '{src.kind}') yielded no documents; looked in {_where(src, cache_dir)}")
    return docs


def _where(src: SourceConfig, cache_dir: Path) -> str:
    if src.kind == "folder":
        return src.path
    if src.kind == "python_stdlib":
        return sysconfig.get_paths()["stdlib"]
    return ", ".join(str(package_root(cache_dir, p)) for p in src.packages) + (f" (locale '{src.locale}')" if src.locale else "")


def _files(root: Path, pattern: str) -> list[Path]:
    """Regular files (not symlinks: Debian uses them for aliases and duplicates) matching `pattern`, sorted."""
    return sorted(p for p in root.glob(pattern) if p.is_file() and not p.is_symlink())


def _read(path: Path) -> str:
    return path.read_bytes().decode("utf-8", "replace")


# --- stardict: the Littré (fr) ---------------------------------------------------------------------

LITTRE_DROP = {"HISTORIQUE", "ÉTYMOLOGIE"}  # Old French and Latin quotations, not modern French


def extract_stardict(src: SourceConfig, cache_dir: Path, lang: Lang) -> list[Document]:
    docs = []
    for pkg in src.packages:
        for idx_path in _files(package_root(cache_dir, pkg), "usr/share/stardict/dic/*.idx"):
            data = gzip.open(idx_path.with_suffix(".dict.dz")).read()  # dictzip is gzip-compatible
            for word, start, size in _stardict_index(idx_path.read_bytes()):
                lines = markup.pango_lines(data[start : start + size].decode("utf-8", "replace"), LITTRE_DROP)
                docs.append(Document(src.name, word, markup.prose_text(lines)))
    return docs


def _stardict_index(idx: bytes) -> list[tuple[str, int, int]]:
    """(headword, offset, size) per article; several headwords (spelling variants) can share one
    article, which is then kept once under its first headword."""
    seen, out, i = set(), [], 0
    while i < len(idx):
        end = idx.index(b"\0", i)
        start, size = struct.unpack_from(">II", idx, end + 1)  # big-endian u32 offset, u32 size
        if start not in seen:
            seen.add(start)
            out.append((idx[i:end].decode("utf-8", "replace"), start, size))
        i = end + 9
    return out


# --- manpages --------------------------------------------------------------------------------------


def extract_manpages(src: SourceConfig, cache_dir: Path, lang: Lang) -> list[Document]:
    """One document per man page of the locale ("" = English under usr/share/man/man*/)."""
    pages: dict[str, Path] = {}
    for pkg in src.packages:
        man_dir = package_root(cache_dir, pkg) / "usr/share/man" / src.locale
        for path in _files(man_dir, "man*/*"):
            pages.setdefault(str(path.relative_to(man_dir)).removesuffix(".gz"), path)
    with ThreadPoolExecutor(os.cpu_count() or 2) as pool:  # groff runs as a subprocess, so threads run it in parallel
        texts = pool.map(_man_page_text, pages.values())
        return [Document(src.name, doc_id, text) for doc_id, text in zip(pages, texts) if text]


def _man_page_text(path: Path) -> str:
    roff = markup.read_maybe_gz(path)
    return "" if markup.is_so_alias(roff) else markup.prose_text(markup.render_man(roff))


# --- libreoffice_help ------------------------------------------------------------------------------

LIBREOFFICE_DROP = [
    ("pre", r"<pre\b[^>]*>"),  # Basic / Python code samples
    ("p", r'<p\b[^>]*class="code"[^>]*>'),  # SQL and Basic one-liners
    # Platform / module variants: only the unclassed default variant is shown by the help viewer.
    ("span", r'<span\b[^>]*hidden="true"[^>]*class="[A-Z]+"[^>]*>'),
    ("span", r'<span\b[^>]*class="[A-Z]+"[^>]*hidden="true"[^>]*>'),
]


def extract_libreoffice_help(src: SourceConfig, cache_dir: Path, lang: Lang) -> list[Document]:
    docs = []
    for pkg in src.packages:
        root = package_root(cache_dir, pkg) / "usr/share/libreoffice/help" / src.locale
        for path in _files(root, "text/**/*.html"):
            # The page text sits in #DisplayArea; the rest is navigation and a debug footer.
            m = re.search(r'<div id="DisplayArea".*?<div id="SearchFrame">', _read(path), re.S)
            if m:
                lines = markup.html_lines(m.group(0), LIBREOFFICE_DROP)
                docs.append(Document(src.name, str(path.relative_to(root)), markup.prose_text(lines)))
    return docs


# --- debian_reference ------------------------------------------------------------------------------

_NUMBER = r"(?:[0-9]+|[A-Z])(?:\.[0-9]+)*\."  # "1.", "3.2.", "A.1."
# "Chapitre 1. …", "1.1.1. …", "A.1. …"; the spaces in headings are often NBSPs
_HEADING = re.compile(rf"^(?:(\w+)\s)?({_NUMBER})\s\S")


def extract_debian_reference(src: SourceConfig, cache_dir: Path, lang: Lang) -> list[Document]:
    docs = []
    for pkg in src.packages:
        for path in _files(package_root(cache_dir, pkg), "usr/share/debian-reference/*.txt.gz"):
            for doc_id, lines in _reference_sections(gzip.decompress(path.read_bytes()).decode("utf-8")):
                docs.append(Document(src.name, doc_id, markup.prose_text(lines)))
    return docs


def _reference_sections(text: str) -> list[tuple[str, list[str]]]:
    """Split the hard-wrapped book into sections at its numbered headings; unwrap paragraphs.

    A heading is a one-line block at the margin. Tables of contents (blocks of mostly numbered
    entries) and ASCII tables are dropped. Sections of the preface, numbered like chapters,
    are named "preface.N"; the title page and preface text before them are "front".
    """
    sections: list[tuple[str, list[str]]] = [("front", [])]
    in_chapters = False
    for block in markup.text_blocks(text):
        heading = _HEADING.match(block[0]) if len(block) == 1 and not block[0][0].isspace() else None
        if heading:
            in_chapters = in_chapters or heading.group(1) is not None
            number = heading.group(2).rstrip(".")
            sections.append((number if in_chapters else f"preface.{number}", [block[0]]))
        elif not _is_toc(block):
            rows = [line.strip() for line in block if not line.strip().startswith(("|", "+-", "---"))]
            if all(row.startswith(("$ ", "# ")) for row in rows):
                sections[-1][1].extend(rows)  # shell examples: one command per line
            else:
                sections[-1][1].append(re.sub(r"^\*\s", "", " ".join(rows)))  # bullets lose their "*"
    return sections


def _is_toc(block: list[str]) -> bool:
    numbered = sum(bool(re.match(_NUMBER + r"\s", line.strip())) for line in block)
    return len(block) > 1 and 2 * numbered >= len(block)  # wrapped entries are the other lines


# --- gnome_help ------------------------------------------------------------------------------------


def extract_gnome_help(src: SourceConfig, cache_dir: Path, lang: Lang) -> list[Document]:
    docs = []
    for pkg in src.packages:
        root = package_root(cache_dir, pkg) / "usr/share/help" / src.locale
        for path in _files(root, "*/*.page"):
            lines = markup.mallard_lines(_read(path))
            docs.append(Document(src.name, str(path.relative_to(root)), markup.prose_text(lines)))
    return docs


# --- fortunes --------------------------------------------------------------------------------------

# ASCII-art collections: pictures, not prose. `off/` holds the offensive fortunes.
FORTUNE_SKIP = {"art", "ascii-art", "asciiart"}


def extract_fortunes(src: SourceConfig, cache_dir: Path, lang: Lang) -> list[Document]:
    docs = []
    for pkg in src.packages:
        root = package_root(cache_dir, pkg) / "usr/share/games/fortunes"
        for path in _files(root, "**/*"):
            rel = path.relative_to(root)
            # .dat files are strfile indexes; .u8 files are UTF-8 copies of the plain file.
            if path.suffix in (".dat", ".u8") or "off" in rel.parts or path.name in FORTUNE_SKIP:
                continue
            records = re.split(r"^%\s*$", _read(path), flags=re.M)
            docs.append(Document(src.name, str(rel), markup.prose_text([" ".join(r.split()) for r in records])))
    return docs


# --- sword: a zText Bible module -------------------------------------------------------------------


def extract_sword(src: SourceConfig, cache_dir: Path, lang: Lang) -> list[Document]:
    """One document per chapter ("Gen.1"); a book's title and introduction are "Gen.0"."""
    docs = []
    for pkg in src.packages:
        for module in sorted(package_root(cache_dir, pkg).glob("usr/share/sword/modules/texts/ztext/*")):
            for testament in ("ot", "nt"):
                if (module / f"{testament}.bzv").exists():
                    osis = " ".join(_ztext_verses(module, testament))
                    docs += [Document(src.name, cid, markup.prose_text(markup.osis_lines(t))) for cid, t in _chapters(osis)]
    return docs


def _ztext_verses(module: Path, testament: str) -> list[str]:
    """The OSIS text of every index entry, in versification order."""
    bzs = (module / f"{testament}.bzs").read_bytes()  # per block: u32 offset, u32 size, u32 unpacked size
    bzz = (module / f"{testament}.bzz").read_bytes()  # zlib blocks
    bzv = (module / f"{testament}.bzv").read_bytes()  # per entry: u32 block, u32 offset, u16 size
    blocks: dict[int, bytes] = {}
    verses = []
    for block, start, size in struct.iter_unpack("<IIH", bzv):
        if size == 0:
            continue
        if block not in blocks:
            offset, length, _ = struct.unpack_from("<III", bzs, 12 * block)
            blocks[block] = zlib.decompress(bzz[offset : offset + length])
        verses.append(blocks[block][start : start + size].decode("utf-8", "replace"))
    return verses


_OSIS_MARK = re.compile(r'<(chapter|div)\b[^>]*\bsID="[^"]*"[^>]*>')


def _chapters(osis: str) -> list[tuple[str, str]]:
    """Split OSIS text at chapter starts and book starts; text before the first is "front"."""
    out, cid, pos = [], "front", 0
    for m in _OSIS_MARK.finditer(osis):
        osis_id = re.search(r'osisID="([^"]+)"', m.group(0))
        if m.group(1) == "div" and not (osis_id and 'type="book"' in m.group(0)):
            continue  # paragraph and milestone divs
        out.append((cid, osis[pos : m.start()]))
        cid = osis_id.group(1) if m.group(1) == "chapter" else osis_id.group(1) + ".0"
        pos = m.start()
    out.append((cid, osis[pos:]))
    return out


# --- python_stdlib ---------------------------------------------------------------------------------

STDLIB_SKIP = {"test", "tests", "idle_test", "encodings", "pydoc_data", "site-packages", "lib-dynload"}


def extract_python_stdlib(src: SourceConfig, cache_dir: Path, lang: Lang) -> list[Document]:
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = []
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = [d for d in subfolders if d not in STDLIB_SKIP]  # prune: site-packages is big
        paths += [Path(folder) / n for n in names if n.endswith(".py")]
    return [Document(src.name, str(p.relative_to(root)), markup.code_text(_read(p))) for p in sorted(paths)]


# --- folder: the user's own data -------------------------------------------------------------------

FOLDER_SUFFIXES = (".txt", ".py", ".jsonl", ".parquet")


def extract_folder(src: SourceConfig, cache_dir: Path, lang: Lang) -> list[Document]:
    root = Path(src.path)
    if not root.is_dir():
        raise MomeError(f"corpus dir '{src.path}' of source '{src.name}' does not exist; set 'path' to a folder of text")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in FOLDER_SUFFIXES)
    if not files:
        raise MomeError(f"corpus dir '{src.path}' has no .txt/.py/.jsonl/.parquet files; add some or fix 'path'")
    docs = []
    for path in files:
        rel = str(path.relative_to(root))
        if path.suffix == ".py":
            docs.append(Document(src.name, rel, markup.code_text(_read(path))))
        elif path.suffix == ".txt":
            blocks = re.split(r"\n\s*\n", markup.code_text(_read(path)))
            docs += [Document(src.name, f"{rel}#{i}", markup.prose_text(b.split("\n"))) for i, b in enumerate(blocks)]
        else:
            rows = _jsonl_texts(path) if path.suffix == ".jsonl" else _parquet_texts(path)
            docs += [Document(src.name, f"{rel}#{i}", _user_text(text, lang)) for i, text in rows]
    return docs


def _user_text(text: str, lang: Lang) -> str:
    """A .jsonl/.parquet row: verbatim in a code language (corpus.code_langs), else one prose line per line."""
    return markup.code_text(text) if lang.is_code else markup.prose_text(markup.code_text(text).split("\n"))


def _jsonl_texts(path: Path) -> list[tuple[int, str]]:
    """(line number, text) per non-blank line of a JSON-lines file with a "text" field."""
    out = []
    for number, line in enumerate(_read(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise MomeError(f"{path}:{number}: not valid JSON ({e.msg}); each line must be an object with a \"text\" field") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise MomeError(f"{path}:{number}: no string field \"text\"; each line must be an object with a \"text\" field")
        out.append((number, record["text"]))
    return out


def _parquet_texts(path: Path) -> list[tuple[int, str]]:
    try:
        import pyarrow.parquet as pq  # only the folder kind needs it
    except ImportError:
        raise MomeError(f"reading {path} needs pyarrow; install it (pip install pyarrow)") from None
    table = pq.read_table(path)
    if "text" not in table.column_names:
        raise MomeError(f"{path} has no column 'text' (columns: {', '.join(table.column_names)}); rename the text column to 'text'")
    return [(i, t) for i, t in enumerate(table.column("text").to_pylist()) if t]


EXTRACTORS: dict[str, Callable[[SourceConfig, Path, Lang], list[Document]]] = {
    "stardict": extract_stardict,
    "manpages": extract_manpages,
    "libreoffice_help": extract_libreoffice_help,
    "debian_reference": extract_debian_reference,
    "gnome_help": extract_gnome_help,
    "fortunes": extract_fortunes,
    "sword": extract_sword,
    "python_stdlib": extract_python_stdlib,
    "folder": extract_folder,
}
