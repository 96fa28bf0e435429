"""Corpus: language vote, dedup, document splits, balancing, the whole build on in-test text, bad inputs."""

import json

import pytest

from mome_ray.corpus.build import CorpusConfig, SPLITS, assign_split, balance, build_corpus
from mome_ray.corpus.clean import Deduplicator, clean_text, count_tokens, vote
from mome_ray.corpus.sources import SourceConfig
from mome_ray.errors import MomeError
from mome_ray.langs import resolve_langs, vote_lists

LANGS = resolve_langs(["en", "fr", "de", "py"], ["py"], {})
BY = {lang.code: lang for lang in LANGS}
LISTS = vote_lists(LANGS)


def test_vote_picks_the_language_of_the_line():
    assert vote("The cat is on the table and it is not happy", LISTS) == "en"
    assert vote("Le chat est sur la table et il ne dort pas", LISTS) == "fr"
    assert vote("Die Katze ist auf dem Tisch und sie schläft nicht", LISTS) == "de"
    assert vote("x = f(z) + 3", LISTS) is None  # no stop word at all


def test_clean_drops_foreign_short_and_code_lines():
    text = ("Le chat est sur la table et il ne dort pas.\n"
            "This line was left untranslated in the French package.\n"
            "Trop court.\n"
            "for i in range(10): print(i)\n"
            "Nous avons vu que la maison était vide depuis des années.")
    kept = clean_text(text, BY["fr"], LISTS, min_words=4).splitlines()
    assert kept == ["Le chat est sur la table et il ne dort pas.",
                    "Nous avons vu que la maison était vide depuis des années."]


def test_code_is_kept_verbatim():
    code = "def f(x):\n    return x  # the value is not changed\n"
    assert clean_text(code, BY["py"], LISTS, 4) == code.strip("\n")


def test_dedup_lines_and_code_files():
    d = Deduplicator(is_code=False)
    assert d("a b\nc d") == "a b\nc d"
    assert d("c d\ne f") == "e f"
    c = Deduplicator(is_code=True)
    assert c("x = 1\n") == "x = 1\n" and c("x = 1\n") == ""


def test_split_is_deterministic_by_document_and_respects_holdout():
    src = SourceConfig(name="s", lang="en", kind="folder")
    splits = [assign_split(src, f"doc{i}", 0, 0.1, 0.1) for i in range(2000)]
    assert splits == [assign_split(src, f"doc{i}", 0, 0.1, 0.1) for i in range(2000)]
    share = {s: splits.count(s) / len(splits) for s in SPLITS}
    assert 0.07 < share["val"] < 0.13 and 0.07 < share["test"] < 0.13
    assert splits != [assign_split(src, f"doc{i}", 1, 0.1, 0.1) for i in range(2000)]  # the seed matters
    held = SourceConfig(name="h", lang="en", kind="folder", holdout=True)
    assert {assign_split(held, f"doc{i}", 0, 0.1, 0.1) for i in range(50)} == {"test"}


def _docs(lang, sizes):
    return [{"source": lang, "doc_id": str(i), "tokens": n, "text": "\n".join(["w"] * n)} for i, n in enumerate(sizes)]


def test_balance_within_tolerance_even_with_coarse_documents():
    pools = {"en": _docs("en", [100] * 50), "fr": _docs("fr", [37] * 40), "py": _docs("py", [5000, 7000])}
    out = balance(pools, cap=10**9, tolerance=0.05, seed=0)
    totals = {c: sum(d["tokens"] for d in v) for c, v in out.items()}
    assert min(totals.values()) == 1480  # fr is the smallest: all of it
    assert max(totals.values()) <= 1480 * 1.05
    assert totals["py"] >= 1480  # cut from a big file, not left short


def test_balance_caps_every_language():
    pools = {"en": _docs("en", [10] * 500), "fr": _docs("fr", [10] * 300)}
    totals = [sum(d["tokens"] for d in v) for v in balance(pools, cap=1000, tolerance=0.05, seed=0).values()]
    assert all(1000 <= t <= 1050 for t in totals)


def test_build_corpus_on_user_folders(tmp_path, corpus_dir):
    cfg = CorpusConfig(user_dir=str(corpus_dir), val_frac=0.15, test_frac=0.15,
                       max_tokens={"train": 5000, "val": 700, "test": 700})
    manifest = build_corpus(cfg, ["en", "fr", "de", "py"], seed=0, out_dir=tmp_path, log=lambda *a: None)
    from datasets import load_from_disk

    data = load_from_disk(str(tmp_path / "data"))
    assert set(data) == set(SPLITS)
    for split in SPLITS:
        assert manifest["splits"][split]["max_over_min"] <= 1.05
        assert set(data[split]["lang"]) == {"en", "fr", "de", "py"}
    ids = {split: set(zip(data[split]["source"], data[split]["doc_id"])) for split in SPLITS}
    assert not (ids["train"] & ids["val"]) and not (ids["train"] & ids["test"])  # split by document
    assert all(count_tokens(t) > 0 for t in data["train"]["text"])
    assert json.loads(json.dumps(manifest))["langs"] == ["en", "fr", "de", "py"]
    assert {s["licence"] for s in manifest["sources"]} == {"user-provided"}


def test_empty_corpus_folder_is_a_clear_error(tmp_path):
    for lang in ("en", "fr"):
        (tmp_path / lang).mkdir()
    with pytest.raises(MomeError, match="no .txt"):
        build_corpus(CorpusConfig(user_dir=str(tmp_path)), ["en", "fr"], 0, tmp_path / "out", log=lambda *a: None)


def test_missing_language_folder_and_unknown_language(tmp_path, corpus_dir):
    with pytest.raises(MomeError, match=r"no folder for language\(s\) \['es'\]"):
        build_corpus(CorpusConfig(user_dir=str(corpus_dir)), ["en", "es"], 0, tmp_path, log=lambda *a: None)
    with pytest.raises(MomeError, match="unknown language 'xx'.*corpus.stopwords.xx"):
        build_corpus(CorpusConfig(user_dir=str(corpus_dir)), ["en", "xx"], 0, tmp_path, log=lambda *a: None)


def test_a_new_language_is_configuration(tmp_path):
    """Spanish (built in) and a made-up language with its own stop words need no code change."""
    (tmp_path / "xq").mkdir()
    (tmp_path / "xq" / "a.txt").write_text("\n\n".join(f"zo ka mi lu tre {i} vo na" for i in range(40)))
    langs = resolve_langs(["xq"], [], {"xq": ["zo", "ka", "lu"]})
    assert langs[0].stopwords == frozenset({"zo", "ka", "lu"}) and resolve_langs(["es"], [], {})[0].code == "es"
    cfg = CorpusConfig(user_dir=str(tmp_path), stopwords={"xq": ["zo", "ka", "lu"]}, val_frac=0.2, test_frac=0.2)
    manifest = build_corpus(cfg, ["xq"], 0, tmp_path / "out", log=lambda *a: None)
    assert manifest["splits"]["train"]["xq"]["docs"] > 10


def test_code_languages_come_from_the_config(tmp_path):
    """A second programming language (corpus.code_langs) from .jsonl keeps its indentation end to end."""
    (tmp_path / "js").mkdir()
    rows = [f"function f{i}(x) {{\n  if (x > {i}) {{\n    return x;\n  }}\n  return {i};\n}}\n" for i in range(40)]
    (tmp_path / "js" / "a.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    cfg = CorpusConfig(user_dir=str(tmp_path), code_langs=["py", "js"], val_frac=0.2, test_frac=0.2)
    build_corpus(cfg, ["js"], 0, tmp_path / "out", log=lambda *a: None)
    from datasets import load_from_disk

    texts = load_from_disk(str(tmp_path / "out" / "data"))["train"]["text"]
    assert len(texts) > 10 and all(t.strip("\n") + "\n" in rows for t in texts)  # verbatim, indentation kept
    with pytest.raises(MomeError, match="unknown language 'js'.*corpus.code_langs"):
        build_corpus(CorpusConfig(user_dir=str(tmp_path)), ["js"], 0, tmp_path / "out2", log=lambda *a: None)
