"""The held-out-source shift set (router/shift.py) on in-test catalogues and the venv's numpy, and the
router's space collapsing. No fetch: the Debian cache is a folder written here."""

import struct
from pathlib import Path

import pytest
import yaml

from mome_ray.corpus.fetch import MARKER, package_root
from mome_ray.errors import MomeError
from mome_ray.router import RouterConfig, load_router, save_router
from mome_ray.router.model import fit_router
from mome_ray.router.shift import (SHINGLE, ShiftConfig, drop_training_text, numeric_tables, read_mo, shift_accuracy,
                                   shift_cases, shift_units, source_lang)
from mome_ray.tokenizer import TokenizerConfig, train_tokenizer
from tests.conftest import ROOT, SENTENCES

CATALOGUE = {  # msgid -> (French, German): a program's messages and --help text, written here
    "": ("Content-Type: text/plain; charset=UTF-8\n", "Content-Type: text/plain; charset=UTF-8\n"),
    "cannot remove the directory %s because it is not empty": (
        "impossible de supprimer le répertoire %s car il n'est pas vide",
        "das Verzeichnis %s kann nicht entfernt werden, weil es nicht leer ist"),
    "missing operand after the name of the file\x00missing operands": (
        "opérande manquant après le nom du fichier\x00opérandes manquants",
        "fehlender Operand nach dem Namen der Datei\x00fehlende Operanden"),
    "  -a, --all             do not ignore entries starting with .\n  -l                    use a long listing format\n": (
        "  -a, --all             ne pas ignorer les entrées commençant par .\n  -l                    utiliser un format long\n",
        "  -a, --all             Einträge nicht ignorieren, die mit . beginnen\n  -l                    ein langes Format verwenden\n"),
    "menu\x04Open the file in a new window": ("Ouvrir le fichier dans une nouvelle fenêtre", ""),  # context; no German
    "done": ("terminé", "fertig"),  # fewer than 3 words: says no language
}


def write_mo(path: Path, entries: dict[str, str]) -> None:
    """A GNU .mo file (little-endian, entries sorted by msgid, as msgfmt writes them)."""
    items = sorted((k.encode(), v.encode()) for k, v in entries.items())
    n, start = len(items), 28 + 16 * len(items)
    blob, tables = b"", ([], [])
    for which in (0, 1):
        for item in items:
            tables[which].append(struct.pack("<2I", len(item[which]), start + len(blob)))
            blob += item[which] + b"\0"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<7I", 0x950412DE, 0, n, 28, 28 + 8 * n, 0, 0) + b"".join(tables[0] + tables[1]) + blob)


@pytest.fixture
def cache(tmp_path) -> Path:
    """A fetch cache holding one 'fetched' package with French and German catalogues."""
    root = package_root(tmp_path, "fakeutils")
    for i, ll in enumerate(("fr", "de")):
        write_mo(root / f"usr/share/locale/{ll}/LC_MESSAGES/fakeutils.mo", {k: v[i] for k, v in CATALOGUE.items()})
    (root / MARKER).write_text("1.0-1\n")
    return tmp_path


CFG = ShiftConfig(packages=["fakeutils"], python_packages=["numpy"])
LANGS = ["en", "fr", "de", "py"]


def test_read_mo_strips_header_context_and_plurals(cache):
    entries = read_mo(package_root(cache, "fakeutils") / "usr/share/locale/fr/LC_MESSAGES/fakeutils.mo")
    msgids = [m for m, _ in entries]
    assert "" not in msgids and "Open the file in a new window" in msgids
    assert ("missing operand after the name of the file", "opérande manquant après le nom du fichier") in entries
    with pytest.raises(MomeError, match="not a gettext .mo file"):
        read_mo(Path(__file__))


def test_units_by_kind_and_language(cache):
    units = shift_units(CFG, cache, LANGS)
    assert set(units) == {"messages-en", "messages-fr", "messages-de", "cli-help-en", "cli-help-fr", "cli-help-de",
                          "py-tables"}
    assert units["cli-help-fr"] == [CATALOGUE[k][0].strip("\n") for k in CATALOGUE if "--all" in k]
    assert "Ouvrir le fichier dans une nouvelle fenêtre" in units["messages-fr"]
    assert not any("terminé" == t for t in units["messages-fr"])  # too short to say its language
    assert len(units["messages-de"]) == 2  # the untranslated entry is not German
    assert all(numeric_tables(t) for t in units["py-tables"][:50])  # each unit is a table (with its first line)
    assert [source_lang(s) for s in ("messages-en", "cli-help-de", "py-tables")] == ["en", "de", "py"]
    assert shift_units(CFG, cache, ["de", "py"]).keys() == {"messages-de", "cli-help-de", "py-tables"}


def test_the_set_is_deterministic(cache):
    tok = train_tokenizer([t for pool in SENTENCES.values() for t in pool] * 3, TokenizerConfig(vocab_size=400, min_frequency=1))
    build = lambda: shift_cases(tok, shift_units(CFG, cache, LANGS), [8, 16], per_source=20, seed=3)  # noqa: E731
    first, second = build(), build()
    assert first == second and "shift/py-tables/16" in first and "shift/cli-help-en/whole" in first
    assert first["shift/messages-fr/8"][1] == ["fr"] * len(first["shift/messages-fr/8"][0])
    assert len(first["shift/py-tables/whole"][0]) == 20
    assert shift_cases(tok, shift_units(CFG, cache, LANGS), [8, 16], per_source=20, seed=4) != first


def test_training_text_never_enters_the_set(cache):
    units = shift_units(CFG, cache, LANGS)
    table = units["py-tables"][0]
    train = ["Il a dit : impossible de supprimer le répertoire %s car il n'est pas vide, hélas.",  # a 6-word run
             "Open the file in a new window",  # a whole line, shorter units compare whole
             "\n".join(table.splitlines()[1:6])]  # five lines of a table
    kept = drop_training_text(units, train)
    assert not any("supprimer le répertoire" in t for t in kept["messages-fr"])
    assert "Open the file in a new window" not in kept["messages-en"] and table not in kept["py-tables"]
    assert len(kept["messages-de"]) == len(units["messages-de"])
    assert SHINGLE == 6


def test_shift_sources_are_none_of_the_corpus_sources():
    base = yaml.safe_load((ROOT / "configs/base.yaml").read_text())["corpus"]["sources"]
    shift = ShiftConfig()
    assert not set(shift.packages) & {p for s in base for p in s.get("packages", [])}
    with pytest.raises(MomeError, match="not the stdlib"):
        ShiftConfig(python_packages=["json"])
    with pytest.raises(MomeError, match="not an installed package"):
        shift_units(ShiftConfig(packages=[], python_packages=["no_such_package_here"]), Path("."), ["py"])


def test_shift_accuracy_pools_by_length_and_source():
    groups = {"shift/a-en/8": {"n": 10, "accuracy": 0.5}, "shift/a-en/whole": {"n": 30, "accuracy": 1.0},
              "shift/py-tables/8": {"n": 10, "accuracy": 1.0}, "sequences": {"n": 99, "accuracy": 0.0}}
    acc = shift_accuracy(groups)
    assert acc["overall"] == pytest.approx(45 / 50) and acc["n"] == 50
    assert acc["by_length"] == {"8": 0.75, "whole": 1.0} and acc["by_source"] == {"a-en": 35 / 40, "py-tables": 1.0}
    assert shift_accuracy({"sequences": {"n": 1, "accuracy": 1.0}}) == {}


def test_collapse_spaces_routes_column_layout_as_plain_text_and_is_saved(tmp_path):
    tok = train_tokenizer([t for pool in SENTENCES.values() for t in pool] * 3, TokenizerConfig(vocab_size=400, min_frequency=1))
    texts = [t for pool in SENTENCES.values() for t in pool]
    labels = [lang for lang, pool in SENTENCES.items() for _ in pool]
    router = fit_router(RouterConfig(classifier="multinomial_nb", collapse_spaces=True), texts, labels, tok)
    aligned = [t.replace(" ", "      ", 2) for t in texts]
    assert router.predict_proba(aligned)[1].tolist() == router.predict_proba(texts)[1].tolist()
    save_router(router, tmp_path)
    assert load_router(tmp_path).collapse_spaces is True
