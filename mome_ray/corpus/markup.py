"""Markup → plain text: the shared cleaners behind the source extractors.

Every function here turns one markup format into a list of lines (one paragraph or sentence-like
unit per line); `prose_text` and `code_text` make the final `Document.text`. Formats: roff man
pages (rendered by groff), HTML help pages, Mallard XML, Pango markup (StarDict), OSIS (SWORD)
and hard-wrapped plain text.
"""

from __future__ import annotations

import gzip
import html
import re
import subprocess
import unicodedata
import xml.etree.ElementTree as ET
from pathlib import Path

# --- final text ------------------------------------------------------------------------------------


def prose_text(lines: list[str]) -> str:
    """NFC, whitespace inside each line collapsed, empty lines dropped, one line per unit."""
    out = (" ".join(unicodedata.normalize("NFC", line).split()) for line in lines)
    return "\n".join(line for line in out if line)


def code_text(text: str) -> str:
    """Code is kept verbatim (indentation matters); only line endings and Unicode form are normalised."""
    return unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))


def strip_tags(text: str) -> str:
    return html.unescape(re.sub(r"<[^>]*>", "", text))


# --- roff man pages --------------------------------------------------------------------------------

LINE_LENGTH = 1500  # ens; wide enough that groff wraps only very long paragraphs
_TITLE_LINE = re.compile(r"(.*\S)? {40,}\S")  # header/footer: a gap no indentation reaches
GROFF = ["groff", "-t", "-k", "-Kutf8", "-man", "-Tutf8", "-P-cbou", f"-rLL={LINE_LENGTH}n", "-rHY=0"]


def read_maybe_gz(path: Path) -> bytes:
    data = path.read_bytes()
    return gzip.decompress(data) if path.suffix == ".gz" else data


def is_so_alias(roff: bytes) -> bool:
    """A page whose first request is `.so other.1` is an alias of another page (its text would repeat)."""
    for line in roff.splitlines():
        if line.startswith((b'.\\"', b"'\\\"")) or not line.strip():
            continue
        return line.startswith(b".so ")
    return False


def render_man(roff: bytes) -> list[str]:
    """Render a man page with groff; return its paragraphs, header and footer lines dropped."""
    out = subprocess.run(GROFF, input=roff, capture_output=True).stdout.decode("utf-8", "replace")
    lines = [line.rstrip() for line in out.splitlines() if line.strip()]
    # The title lines ("LS(1)   User Commands   LS(1)" and the footer) are spread over the whole
    # line length; mdoc pages rendered continuously have none.
    if lines and _TITLE_LINE.match(lines[0]):
        lines = lines[1:]
    if lines and _TITLE_LINE.match(lines[-1]):
        lines = lines[:-1]
    return unwrap_man(lines)


def unwrap_man(lines: list[str]) -> list[str]:
    """Join the lines groff wrapped at LINE_LENGTH back into one paragraph per line.

    A line is a wrap continuation when it has the previous line's indentation and its first word
    would not have fitted on the previous line; explicit breaks (.br, .nf code, .TP tags) stay apart.
    """
    out: list[str] = []
    prev = ""  # the previous rendered line, before joining
    for line in lines:
        first_word = line.split(maxsplit=1)[0]
        if out and _indent(prev) == _indent(line) and len(prev) + 1 + len(first_word) > LINE_LENGTH - 2:  # 2: slack
            out[-1] = out[-1] + " " + line.strip()
        else:
            out.append(line)
        prev = line
    return out


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


# --- HTML help pages -------------------------------------------------------------------------------

_HTML_BLOCK = re.compile(r"</?(?:p|h[1-6]|li|td|th|tr|div|br|dt|dd|table|ul|ol)\b[^>]*>", re.I)


def html_lines(page: str, drop: list[tuple[str, str]]) -> list[str]:
    """Text lines of an HTML fragment: each block element on its own line.

    `drop` lists (tag, start-tag regex) pairs of elements removed with their content (code samples,
    platform variants), matched by balanced tag counting since spans and divs nest.
    """
    page = re.sub(r"<(script|style)\b.*?</\1>", "", page, flags=re.S | re.I)
    for tag, start in drop:
        page = drop_elements(page, tag, start)
    return strip_tags(_HTML_BLOCK.sub("\n", page)).split("\n")


def drop_elements(text: str, tag: str, start: str) -> str:
    """Remove every element whose start tag matches regex `start`, with its (possibly nested) content."""
    opener = re.compile(rf"<{tag}\b[^>]*>|</{tag}\s*>", re.I)
    out, pos = [], 0
    for m in re.finditer(start, text):
        if m.start() < pos:
            continue  # nested inside an element already removed
        out.append(text[pos : m.start()])
        depth, pos = 1, m.end()
        while depth and (t := opener.search(text, pos)):
            depth += -1 if t.group(0).startswith("</") else 1
            pos = t.end()
        if depth:
            pos = len(text)
    out.append(text[pos:])
    return "".join(out)


# --- Mallard (GNOME help) --------------------------------------------------------------------------

_MALLARD_LINE = {"title", "subtitle", "p", "desc"}  # elements whose whole text is one line
# info: metadata and credits; when: platform variants (the default branch sits beside them);
# screen/code: command lines (a <code> reached outside a <p> is a block of code); media: images.
_MALLARD_SKIP = {"info", "when", "screen", "code", "media", "include", "comment"}


def mallard_lines(xml_text: str) -> list[str]:
    lines: list[str] = []
    _mallard_walk(ET.fromstring(xml_text), lines)
    return lines


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _mallard_walk(el: ET.Element, lines: list[str]) -> None:
    tag = _local(el.tag)
    if tag in _MALLARD_SKIP:
        return
    if tag in _MALLARD_LINE:
        lines.append(re.sub(r"\(\s*\)", "", _inline_text(el)))  # "()" around an inline icon
        return
    for child in el:
        _mallard_walk(child, lines)


def _inline_text(el: ET.Element) -> str:
    parts = [el.text or ""]
    for child in el:
        if _local(child.tag) not in ("media", "comment"):
            parts.append(_inline_text(child))
        parts.append(child.tail or "")
    return "".join(parts)


# --- Pango markup (StarDict Littré) ----------------------------------------------------------------

_PANGO_SECTION = re.compile(r"<b><big>(.*?)</big></b>")


def pango_lines(entry: str, drop_sections: set[str]) -> list[str]:
    """Lines of a StarDict Pango entry; sections whose `<b><big>` header is in `drop_sections` go."""
    pieces = _PANGO_SECTION.split(entry)  # [body, header, body, header, body, ...]
    kept = [pieces[0]] + [body for header, body in zip(pieces[1::2], pieces[2::2]) if header.strip() not in drop_sections]
    return strip_tags("\n".join(kept)).split("\n")


# --- OSIS (SWORD Bible modules) --------------------------------------------------------------------

# A footnote often sits between two words with no space around it ("God<note>…</note><w>created"):
# the empty optional group records whether a word follows, and then a space replaces the note.
_OSIS_NOTE = re.compile(r"<note\b.*?</note>((?=<w\b|\w))?", re.S)
# Paragraph, poetry-line, title and list-item tags start a new line; everything else is inline.
_OSIS_BREAK = re.compile(r"<(?:div|l|lb|lg|chapter|title|/title|item|/item|speaker|/speaker)\b[^>]*>")


def osis_lines(osis: str) -> list[str]:
    text = _OSIS_NOTE.sub(lambda m: "" if m.group(1) is None else " ", osis)
    text = _OSIS_BREAK.sub("\n", text)
    return strip_tags(text).split("\n")


# --- hard-wrapped plain text (debian-reference) ----------------------------------------------------


def text_blocks(text: str) -> list[list[str]]:
    """Blank-line separated blocks of lines (a line of spaces or NBSPs counts as blank)."""
    blocks: list[list[str]] = [[]]
    for line in text.split("\n"):
        if line.strip():
            blocks[-1].append(line.rstrip())
        elif blocks[-1]:
            blocks.append([])
    return [b for b in blocks if b]
