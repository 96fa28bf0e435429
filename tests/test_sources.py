"""Extractors on tiny fixtures built here: a roff man page, an HTML help page, a Mallard page, a fortunes
file, a StarDict dictionary, a SWORD zText module, a debian-reference text and a user folder.

Each fixture is written as a fake fetched package under `tmp_path/pkgs/NAME` (with the completion marker
`fetch.py` writes); nothing touches the network or the real fetch cache.
"""

from __future__ import annotations

import gzip
import json
import shutil
import struct
import sysconfig
import zlib
from pathlib import Path

import pytest

from mome_ray.corpus import fetch, markup
from mome_ray.corpus.sources import EXTRACTORS, Document, SourceConfig, extract_source, package_root
from mome_ray.errors import MomeError
from mome_ray.langs import Lang


def fake_package(cache: Path, name: str, files: dict[str, str | bytes], version: str = "1.0-1") -> Path:
    root = package_root(cache, name)
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content.encode() if isinstance(content, str) else content)
    (root / fetch.MARKER).write_text(version + "\n")
    return root


def by_id(docs: list[Document]) -> dict[str, str]:
    assert len({d.doc_id for d in docs}) == len(docs), "doc ids must be unique within a source"
    return {d.doc_id: d.text for d in docs}


# --- manpages ---------------------------------------------------------------------------------------

LONG_SENTENCE = "Cette phrase est assez longue pour remplir une ligne entière. "
MAN_PAGE = rf""".\" Un commentaire qui ne doit pas apparaître.
.TH BONJOUR 1 "janvier 2024" "bonjour 1.0" "Commandes de l'utilisateur"
.SH NOM
bonjour \- afficher une salutation
.SH DESCRIPTION
.B bonjour
affiche une salutation
sur la sortie standard.
.PP
{LONG_SENTENCE * 40}
.TP
.B \-n
ne pas ajouter de saut de ligne.
"""


@pytest.mark.skipif(shutil.which("groff") is None, reason="groff renders man pages")
def test_manpages_render_unwrap_and_skip_aliases(tmp_path):
    fake_package(tmp_path, "manpages-fr", {
        "usr/share/man/fr/man1/bonjour.1.gz": gzip.compress(MAN_PAGE.encode()),
        "usr/share/man/fr/man1/salut.1.gz": gzip.compress(b'.\\" alias\n.so man1/bonjour.1\n'),
        "usr/share/man/man1/hello.1": ".TH HELLO 1\n.SH NAME\nhello \\- English page\n",  # other locale
    })
    src = SourceConfig("manpages-fr", "fr", "manpages", ["manpages-fr"], locale="fr")
    docs = by_id(extract_source(src, tmp_path))
    assert list(docs) == ["man1/bonjour.1"]  # the .so alias and the English page are not included
    lines = docs["man1/bonjour.1"].split("\n")
    assert lines[:2] == ["NOM", "bonjour - afficher une salutation"]
    assert "bonjour affiche une salutation sur la sortie standard." in lines  # filled into one paragraph
    assert (LONG_SENTENCE * 40).strip() in lines  # wider than groff's line length: unwrapped
    assert lines[-1] == "-n ne pas ajouter de saut de ligne."  # a short .TP tag shares its line
    text = docs["man1/bonjour.1"]
    assert "BONJOUR(1)" not in text and "janvier 2024" not in text  # header and footer dropped
    assert "commentaire" not in text


def test_unwrap_man_joins_only_wrapped_lines():
    wrapped = "       " + "mot " * 373 + "fin"  # 1502 columns: the next word did not fit
    assert len(wrapped) > markup.LINE_LENGTH - 10
    lines = [wrapped, "       suite du paragraphe", "       ligne après un .br", "              corps"]
    assert markup.unwrap_man(lines) == [wrapped + " suite du paragraphe", "       ligne après un .br", "              corps"]


# --- libreoffice_help --------------------------------------------------------------------------------

HELP_PAGE = """<!DOCTYPE html><html lang="fr"><head><title>Sécurité des macros</title>
<script>var x = "<p>pas du texte</p>";</script></head><body>
<header><p>Aide LibreOffice 7.4</p></header>
<div id="DisplayArea" itemprop="softwareHelp">
<h1 id="h1"><a name="m"></a>Sécurité des macros</h1>
<p class="paragraph">La boîte de dialogue apparaît dans l'onglet <span class="switchinline"><span hidden="true" id="MACx" class="MAC"><span class="emph">LibreOffice - Préférences</span></span><span hidden="true" id="defaultx"><span class="emph">Outils - Options</span></span></span> &amp; ailleurs.</p>
<div class="bascode"><pre dir="auto"><code class="language-visual-basic">Sub Main
  MsgBox "bonjour"
End Sub</code></pre></div>
<p class="code">SELECT champ FROM table</p>
<table><tr><td><p class="tablecontentintable">Première cellule</p></td><td>Seconde<br>cellule</td></tr></table>
</div>
<div id="SearchFrame"></div>
<footer><p>This page is: /text/shared/optionen/macrosecurity.xhp</p></footer></body></html>
"""


def test_libreoffice_help_keeps_page_text_only(tmp_path):
    fake_package(tmp_path, "libreoffice-help-fr", {
        "usr/share/libreoffice/help/fr/text/shared/optionen/macrosecurity.html": HELP_PAGE,
        "usr/share/libreoffice/help/de/text/shared/optionen/macrosecurity.html": HELP_PAGE.replace("Sécurité", "Sicherheit"),
    })
    src = SourceConfig("lo-fr", "fr", "libreoffice_help", ["libreoffice-help-fr"], locale="fr")
    docs = by_id(extract_source(src, tmp_path))
    assert docs == {"text/shared/optionen/macrosecurity.html": "\n".join([
        "Sécurité des macros",
        "La boîte de dialogue apparaît dans l'onglet Outils - Options & ailleurs.",
        "Première cellule",
        "Seconde",
        "cellule",
    ])}


# --- gnome_help -------------------------------------------------------------------------------------

MALLARD_PAGE = """<?xml version="1.0" encoding="utf-8"?>
<page xmlns="http://projectmallard.org/1.0/" xmlns:if="http://projectmallard.org/if/1.0/" type="topic" id="net-wireless-connect" xml:lang="de">
  <info>
    <credit type="author"><name>Das GNOME-Dokumentationsprojekt</name></credit>
    <desc>Ins Internet – drahtlos.</desc>
  </info>
  <title>Mit einem Funknetzwerk verbinden</title>
  <p>Wenn Sie einen Rechner mit <em>Funknetzwerk</em> haben, können Sie sich verbinden.</p>
  <steps>
    <item><p>Öffnen Sie das <gui xref="shell-introduction#systemmenu">Systemmenü</gui> in der oberen Leiste.</p></item>
    <item>
      <if:choose>
        <if:when test="platform:gnome-classic"><p>Klassische Variante des Symbols.</p></if:when>
        <p>Das Symbol (<media type="image" src="figures/wifi.svg"/>) zeigt die Signalstärke.</p>
      </if:choose>
    </item>
  </steps>
  <screen>nmcli device wifi list</screen>
  <section id="more"><title>Weitere Hilfe</title><p>Lesen Sie <link xref="net-wireless-troubleshooting">die Fehlerbehebung</link>.</p></section>
</page>
"""


def test_gnome_help_reads_mallard_text_of_one_locale(tmp_path):
    fake_package(tmp_path, "gnome-user-docs", {
        "usr/share/help/de/gnome-help/net-wireless-connect.page": MALLARD_PAGE,
        "usr/share/help/de/gnome-help/legal.xml": "<p>not a page</p>",
        "usr/share/help/C/gnome-help/net-wireless-connect.page": MALLARD_PAGE.replace('xml:lang="de"', ""),
    })
    src = SourceConfig("gnome-help-de", "de", "gnome_help", ["gnome-user-docs"], locale="de")
    docs = by_id(extract_source(src, tmp_path))
    assert docs == {"gnome-help/net-wireless-connect.page": "\n".join([
        "Mit einem Funknetzwerk verbinden",
        "Wenn Sie einen Rechner mit Funknetzwerk haben, können Sie sich verbinden.",
        "Öffnen Sie das Systemmenü in der oberen Leiste.",
        "Das Symbol zeigt die Signalstärke.",
        "Weitere Hilfe",
        "Lesen Sie die Fehlerbehebung.",
    ])}


# --- fortunes ---------------------------------------------------------------------------------------


def test_fortunes_one_line_per_record_skipping_indexes_and_offensive(tmp_path):
    root = fake_package(tmp_path, "fortunes-de", {
        "usr/share/games/fortunes/de/zitate": (
            "Man braucht nicht geistreich zu sein, um zu beweisen,\ndaß man begabt ist.\n"
            "\t\t-- Marcel Achard\n%\nIn wichtigen Fragen hat man\nmeist zu wählen.\n%\n"
        ),
        "usr/share/games/fortunes/de/zitate.dat": b"\x00\x00\x00\x02\x00\x00\x00\x02%\x00",
        "usr/share/games/fortunes/de/off/derb": "Nicht für den Korpus.\n%\n",
        "usr/share/games/fortunes/de/asciiart": "  /\\_/\\\n ( o.o )\n%\n",
    })
    (root / "usr/share/games/fortunes/de/zitate.u8").symlink_to("zitate")
    docs = by_id(extract_source(SourceConfig("fortunes-de", "de", "fortunes", ["fortunes-de"]), tmp_path))
    assert docs == {"de/zitate": (
        "Man braucht nicht geistreich zu sein, um zu beweisen, daß man begabt ist. -- Marcel Achard\n"
        "In wichtigen Fragen hat man meist zu wählen."
    )}


# --- stardict ---------------------------------------------------------------------------------------

ENTRY_MAISON = """<i><small>(mê-zon) s. f.</small></i>
    Bâtiment servant de logis.
<span foreground="#0000CD">Ma maison est brûlée</span>, <span foreground="#B22222">BOSSUET</span>.

<b><big>REMARQUE</big></b>
    On dit &quot;à la maison&quot; pour chez soi.

<b><big>HISTORIQUE</big></b>
    XIIe s. Li reis ad sa maisun.

<b><big>ÉTYMOLOGIE</big></b>
    Provenç. maison ; du lat. mansionem.
"""
ENTRY_ACIER = "<i><small>(a-sié) s. m.</small></i>\n    Fer combiné avec du carbone.\n"


def test_stardict_entries_without_historique_and_etymologie(tmp_path):
    dict_bytes = (ENTRY_ACIER + ENTRY_MAISON).encode()
    a, m = len(ENTRY_ACIER.encode()), len(ENTRY_MAISON.encode())
    idx = b"".join(word.encode() + b"\0" + struct.pack(">II", start, size)
                   for word, start, size in [("ACIER", 0, a), ("MAISON", a, m), ("MAISONS", a, m)])
    fake_package(tmp_path, "stardict-xmlittre", {
        "usr/share/stardict/dic/XMLittre.idx": idx,
        "usr/share/stardict/dic/XMLittre.dict.dz": gzip.compress(dict_bytes),
        "usr/share/stardict/dic/XMLittre.ifo": "StarDict's dict ifo file\nwordcount=3\nsametypesequence=g\n",
    })
    docs = by_id(extract_source(SourceConfig("littre", "fr", "stardict", ["stardict-xmlittre"]), tmp_path))
    assert list(docs) == ["ACIER", "MAISON"]  # "MAISONS" shares MAISON's article
    assert docs["ACIER"] == "(a-sié) s. m.\nFer combiné avec du carbone."
    assert docs["MAISON"] == "\n".join([
        "(mê-zon) s. f.",
        "Bâtiment servant de logis.",
        "Ma maison est brûlée, BOSSUET.",
        'On dit "à la maison" pour chez soi.',
    ])


# --- sword ------------------------------------------------------------------------------------------

OT_ENTRIES = [  # (block, text) per index entry, in versification order
    (0, ""),
    (0, '<milestone type="x-importer" subType="x-osis2mod" n="$Rev: 3769 $"/>'),
    (0, '<div osisID="Gen" sID="b1" type="book"/> <title type="main">Genesis</title> <chapter n="1" osisID="Gen.1" sID="Gen.1"/>'),
    (0, '<div sID="p1" type="x-p"/><w lemma="strong:H0430">In</w> the beginning, God<note placement="foot">'
        '<reference type="annotateRef">1:1 </reference>The Hebrew word is “Elohim”.</note><w>created</w> the heavens.'),
    (0, "The earth was formless.<div eID=\"p1\" type=\"x-p\"/>"),
    (1, '<chapter eID="Gen.1"/><chapter n="2" osisID="Gen.2" sID="Gen.2"/><l sID="l1"/>The heavens were finished,<l eID="l1"/>'
        '<l sID="l2"/>and all their vast array.<note type="crossReference">Ps 33:6</note><l eID="l2"/>'),
]


def write_ztext(module: Path, testament: str, entries: list[tuple[int, str]]) -> None:
    blocks: dict[int, bytes] = {}
    index = []
    for block, text in entries:
        data = text.encode()
        start = len(blocks.get(block, b""))
        blocks[block] = blocks.get(block, b"") + data
        index.append(struct.pack("<IIH", block, start if data else 0, len(data)))
    bzz, bzs = b"", b""
    for block in sorted(blocks):
        packed = zlib.compress(blocks[block])
        bzs += struct.pack("<III", len(bzz), len(packed), len(blocks[block]))
        bzz += packed
    module.mkdir(parents=True, exist_ok=True)
    (module / f"{testament}.bzs").write_bytes(bzs)
    (module / f"{testament}.bzz").write_bytes(bzz)
    (module / f"{testament}.bzv").write_bytes(b"".join(index))


def test_sword_one_document_per_chapter_without_notes(tmp_path):
    root = fake_package(tmp_path, "sword-text-web", {"usr/share/sword/mods.d/engweb.conf": "[engWEB]\nModDrv=zText\n"})
    write_ztext(root / "usr/share/sword/modules/texts/ztext/engweb", "ot", OT_ENTRIES)
    docs = by_id(extract_source(SourceConfig("bible", "en", "sword", ["sword-text-web"]), tmp_path))
    assert docs == {
        "Gen.0": "Genesis",
        "Gen.1": "In the beginning, God created the heavens. The earth was formless.",
        "Gen.2": "The heavens were finished,\nand all their vast array.",
    }


# --- debian_reference -------------------------------------------------------------------------------

REFERENCE_TXT = """Debian Reference

                             Osamu Aoki

Table of Contents

Preface
    1. Disclaimer
1. GNU/Linux tutorials
    1.1. Console basics

Preface

1.\u00a0Disclaimer

    All warranties are disclaimed. All trademarks are property of
    their respective trademark owners.

Chapter\u00a01.\u00a0GNU/Linux tutorials

    Learning a computer system is like learning a new foreign
    language.

1.1. Console basics

    The shell prompt is where you type
\u00a0\u00a0\u00a0 commands.

      * bash(1): the GNU Bourne-Again SHell
        (de facto standard)

    $ man 1 bash
    $ apt-cache show bash

    Table 1.1. List of shells

    +------------------+
    |package |popcon   |
    +------------------+
"""


def test_debian_reference_sections_unwrapped(tmp_path):
    fake_package(tmp_path, "debian-reference-en", {
        "usr/share/debian-reference/debian-reference.en.txt.gz": gzip.compress(REFERENCE_TXT.encode()),
    })
    src = SourceConfig("debref-en", "en", "debian_reference", ["debian-reference-en"])
    docs = by_id(extract_source(src, tmp_path))
    assert list(docs) == ["front", "preface.1", "1", "1.1"]
    assert docs["front"] == "Debian Reference\nOsamu Aoki\nTable of Contents\nPreface"  # the contents list is gone
    assert docs["preface.1"] == "1. Disclaimer\nAll warranties are disclaimed. All trademarks are property of their respective trademark owners."
    assert docs["1"] == "Chapter 1. GNU/Linux tutorials\nLearning a computer system is like learning a new foreign language."
    assert docs["1.1"] == "\n".join([
        "1.1. Console basics",
        "The shell prompt is where you type commands.",
        "bash(1): the GNU Bourne-Again SHell (de facto standard)",
        "$ man 1 bash",
        "$ apt-cache show bash",
        "Table 1.1. List of shells",
    ])


# --- python_stdlib ----------------------------------------------------------------------------------


def test_python_stdlib_verbatim_without_tests():
    docs = by_id(extract_source(SourceConfig("python-stdlib", "py", "python_stdlib"), Path("/nonexistent")))
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    assert docs["json/decoder.py"] == (stdlib / "json/decoder.py").read_text(encoding="utf-8")  # verbatim
    assert "textwrap.py" in docs
    skipped = {"test", "tests", "idle_test", "encodings", "pydoc_data", "site-packages", "lib-dynload"}
    assert not any(skipped & set(Path(doc_id).parts) for doc_id in docs)


# --- folder -----------------------------------------------------------------------------------------


def test_folder_reads_txt_py_jsonl(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("Premier  document,\r\nligne deux.\n\n\n  Second document.\n")
    (tmp_path / "sub/b.jsonl").write_text(json.dumps({"text": "Un   texte JSON.", "id": 1}) + "\n\n"
                                          + json.dumps({"text": "Encore un."}) + "\n")
    (tmp_path / "sub/c.py").write_text("def f():\r\n    return  1\n")
    (tmp_path / "notes.md").write_text("ignored")
    docs = by_id(extract_source(SourceConfig("user-fr", "fr", "folder", path=str(tmp_path)), Path("/nonexistent")))
    assert docs == {
        "a.txt#0": "Premier document,\nligne deux.",
        "a.txt#1": "Second document.",
        "sub/b.jsonl#1": "Un texte JSON.",
        "sub/b.jsonl#3": "Encore un.",
        "sub/c.py": "def f():\n    return  1\n",  # code keeps its whitespace
    }


def test_folder_rows_keep_their_whitespace_only_in_a_code_language(tmp_path):
    """.jsonl rows do not say whether they are code: the language's `is_code` (corpus.code_langs) does."""
    code = "function f(x) {\n    if (x) {\n        return  1;\n    }\n}\n"
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": code}) + "\n")
    src = SourceConfig("user-js", "js", "folder", path=str(tmp_path))
    assert extract_source(src, Path("/nonexistent"), Lang("js", is_code=True))[0].text == code
    assert extract_source(src, Path("/nonexistent"))[0].text == "function f(x) {\nif (x) {\nreturn 1;\n}\n}"


def test_folder_reads_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["Erste Zeile.", "Zweite  Zeile."], "n": [1, 2]}), tmp_path / "t.parquet")
    docs = by_id(extract_source(SourceConfig("user-de", "de", "folder", path=str(tmp_path)), Path("/nonexistent")))
    assert docs == {"t.parquet#0": "Erste Zeile.", "t.parquet#1": "Zweite Zeile."}


def test_folder_errors_name_what_is_wrong(tmp_path):
    src = SourceConfig("user-en", "en", "folder", path=str(tmp_path / "missing"))
    with pytest.raises(MomeError, match="does not exist"):
        extract_source(src, tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(MomeError, match=r"corpus dir '.*empty' has no \.txt/\.py/\.jsonl/\.parquet files"):
        extract_source(SourceConfig("user-en", "en", "folder", path=str(tmp_path / "empty")), tmp_path)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad/x.jsonl").write_text('{"text": "ok"}\n{"txt": "no"}\n')
    with pytest.raises(MomeError, match=r"x\.jsonl:2: .*\"text\""):
        extract_source(SourceConfig("user-en", "en", "folder", path=str(tmp_path / "bad")), tmp_path)
    (tmp_path / "bad/x.jsonl").write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(MomeError, match=r"x\.jsonl:2: not valid JSON"):
        extract_source(SourceConfig("user-en", "en", "folder", path=str(tmp_path / "bad")), tmp_path)


# --- dispatch errors and the fetch cache ------------------------------------------------------------


def test_extract_source_errors(tmp_path):
    with pytest.raises(MomeError, match="unknown kind 'wiki'.*fortunes"):
        extract_source(SourceConfig("x", "en", "wiki"), tmp_path)
    with pytest.raises(MomeError, match="'fortunes'.*source 'f'|source 'f'.*'fortunes'") as err:
        extract_source(SourceConfig("f", "en", "fortunes", ["fortunes"]), tmp_path)
    assert "mome corpus fetch --config CONFIG" in str(err.value)
    fake_package(tmp_path, "fortunes", {"usr/share/doc/fortunes/README": "no fortunes here"})
    with pytest.raises(MomeError, match="source 'f'.*no documents"):
        extract_source(SourceConfig("f", "en", "fortunes", ["fortunes"]), tmp_path)
    assert set(EXTRACTORS) == {"stardict", "manpages", "libreoffice_help", "debian_reference", "gnome_help",
                               "fortunes", "sword", "python_stdlib", "folder"}


def test_fetch_skips_unpacked_packages_without_apt(tmp_path, monkeypatch):
    fake_package(tmp_path, "fortunes", {"usr/share/games/fortunes/x": "a\n%\n"}, version="1:1.99.1-7.3")
    monkeypatch.setattr(fetch.subprocess, "run", lambda *a, **k: pytest.fail(f"ran {a}"))  # no apt, no network
    assert fetch.package_versions(tmp_path) == {}
    assert fetch.fetch_packages(["fortunes"], tmp_path, progress=False) == {"fortunes": "1:1.99.1-7.3"}
    assert fetch.package_versions(tmp_path) == {"fortunes": "1:1.99.1-7.3"}
