"""Router pieces on in-test text: feature pipelines, classifiers, `unknown`, safe save/load, search space."""

import hashlib
import json
import random

import numpy as np
import pytest

from mome_ray.errors import MomeError
from mome_ray.router import UNKNOWN, RouterConfig, load_router, save_router
from mome_ray.router.classifiers import CLASSIFIERS, build_classifier
from mome_ray.router.features import FEATURES, build_features
from mome_ray.router.model import fit_router, linear_weights
from mome_ray.router.token_ids import PretokenCache
from mome_ray.router.token_ngrams import TokenNgramTfidf, ids_as_text
from mome_ray.tokenizer import TokenizerConfig, train_tokenizer
from tests.conftest import ROOT, SENTENCES

CODE = [
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(i * 2)\n",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "import os\nfor name in os.listdir('.'):\n    if name.endswith('.py'):\n        print(name)\n",
    "try:\n    value = int(text)\nexcept ValueError:\n    value = None\n",
    "with open(path) as f:\n    lines = [line.strip() for line in f]\n",
    "if x is None:\n    raise TypeError('x must not be None')\n",
    "while stack:\n    node = stack.pop()\n    stack.extend(node.children)\n",
    "return {key: len(value) for key, value in items.items()}\n",
    "async def fetch(url):\n    return await client.get(url)\n",
    "lambda x, y: x if x > y else y\n",
    "assert isinstance(result, list), result\n",
]
POOLS = {**SENTENCES, "py": CODE}


def stdlib_text(n: int = 60) -> list[str]:
    """Real text without fetching anything: `n` pieces of the stdlib's argparse.py (code, docstrings, comments)."""
    import argparse
    from pathlib import Path

    source = Path(argparse.__file__).read_text()
    step = len(source) // n
    return [source[i * step : (i + 1) * step] for i in range(n)]


def examples(pool_slice: slice, copies: int, seed: int = 0):
    """Texts of 1-3 items of each language's pool (sentences or code snippets), with their labels."""
    rng = random.Random(seed)
    texts, labels = [], []
    for lang, pool in POOLS.items():
        items = pool[pool_slice]
        for _ in range(copies):
            texts.append(" ".join(rng.sample(items, rng.randint(1, min(3, len(items))))))
            labels.append(lang)
    return texts, labels


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer([t for pool in POOLS.values() for t in pool] * 3, TokenizerConfig(vocab_size=400, min_frequency=1))


@pytest.fixture(scope="module")
def train():
    return examples(slice(0, 9), copies=40)


def test_token_features_keep_one_digit_ids():
    from sklearn.feature_extraction.text import TfidfVectorizer

    docs = [[1, 2, 3, 45, 678], [7, 8, 9, 45, 0]]
    assert "1" not in TfidfVectorizer().fit(ids_as_text(docs)).vocabulary_  # the paper code's pattern drops them
    vec = build_features("token_tfidf").fit(docs)
    one_each = vec.transform([[i] for i in (0, 1, 2, 3, 7, 8, 9, 45, 678)])
    assert vec.n_features_ == 9 and (one_each.getnnz(axis=1) == 1).all()


@pytest.mark.parametrize("params", [{}, {"ngram_max": 2, "sublinear_tf": False},
                                    {"ngram_max": 3, "min_df": 2, "max_features": 60}])
def test_token_ngram_tfidf_equals_tfidf_vectorizer_on_id_strings(params, tok):
    """Parity with the naive reference: sklearn's TfidfVectorizer over the ids written as text."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    p = {**FEATURES["token_tfidf"], **params}
    reference = TfidfVectorizer(token_pattern=r"\S+", lowercase=False, ngram_range=(1, p["ngram_max"]),
                                min_df=p["min_df"], max_features=p["max_features"] or None,
                                sublinear_tf=p["sublinear_tf"], dtype=np.float32)
    encoder = PretokenCache(tok)
    fit_ids = encoder.encode(examples(slice(0, 9), copies=20)[0])
    texts = examples(slice(6, 12), copies=5, seed=4)[0] + stdlib_text()  # argparse.py: ids never seen in fit
    ids = encoder.encode(texts) + [[], [tok.vocab_size - 1, 3]]
    expected = reference.fit(ids_as_text(fit_ids)).transform(ids_as_text(ids))
    got = TokenNgramTfidf(**params).fit(fit_ids).transform(ids)
    assert got.dtype == expected.dtype == np.float32 and got.shape == expected.shape
    for part in ("indptr", "indices", "data"):  # the same matrix, bit for bit (so the same predictions)
        assert np.array_equal(getattr(got, part), getattr(expected, part)), part


def test_pretoken_cache_gives_the_tokenizers_ids(tok, monkeypatch):
    import mome_ray.router.token_ids as token_ids

    odd = [chr(c) for c in range(0, 0x3000, 7)] + ["\u00e9", "e\u0301", "\U0001F600", "\u2028", "\u00a0", "\u3000"]
    texts = [t for pool in POOLS.values() for t in pool] + stdlib_text() + [
        "", "   ", "a  b\n\n\tc   ", "it's 12,5 km -- \"quoted\" ...", "x<|endoftext|>y <|pad|>", "<|endoftext|>",
    ] + [f"a{c}b {c}1 x{c}{c} '{c}s \n{c}  {c}" for c in odd]
    expected = [e.ids for e in tok.backend_tokenizer.encode_batch_fast(texts, add_special_tokens=False)]
    encoder = PretokenCache(tok)
    assert encoder.encode(texts) == expected
    assert encoder.encode(texts[::-1]) == expected[::-1]  # from the cache
    monkeypatch.setattr(token_ids, "MAX_CACHED", 50)  # the cache starts over: still the same ids
    assert PretokenCache(tok).encode(texts) == expected


def test_pretoken_cache_refuses_other_tokenizers(tok):
    import copy

    from tokenizers import normalizers

    other = copy.deepcopy(tok)
    other.backend_tokenizer.normalizer = normalizers.Lowercase()
    with pytest.raises(MomeError, match="byte-level BPE"):
        PretokenCache(other)


@pytest.mark.parametrize("kind", sorted(FEATURES))
def test_each_feature_pipeline_routes_held_out_text(kind, tok, train):
    params = {"n_features": 2**14} if kind == "hashing" else {}  # the default 2**18 columns: 10 s more
    router = fit_router(RouterConfig(features=kind, feature_params=params, unknown_below=0.0), *train, tok)
    texts, labels = examples(slice(9, 12), copies=10, seed=1)  # sentences / snippets never trained on
    accuracy = np.mean([p == y for p, y in zip(router.predict(texts), labels)])
    assert accuracy >= 0.9, (kind, accuracy)
    assert (router.tokenizer is not None) == (kind == "token_tfidf")


LINEAR = {"logreg", "sgd", "linear_svc", "ridge", "complement_nb", "multinomial_nb"}  # rows times a weight matrix


@pytest.mark.parametrize("name", sorted(CLASSIFIERS))
def test_every_classifier_fits_and_gives_probabilities(name, tok, train):
    params = {"n_neighbors": 3} if name == "knn" else {}
    router = fit_router(RouterConfig(classifier=name, classifier_params=params, unknown_below=0.0), *train, tok)
    texts = ["Der Fluss fließt durch die Stadt", "def f(x):\n    return x\n"]
    classes, probs = router.predict_proba(texts)
    assert sorted(classes) == sorted(POOLS) and probs.shape == (2, 4)
    assert np.allclose(probs.sum(axis=1), 1.0)
    assert router.predict(["def f(x):\n    return x\n"]) == ["py"]
    weights = list(linear_weights(router.pipeline))  # laid out for sparse rows (weights_for_sparse) ...
    assert all(w.T.flags.c_contiguous for _, _, w in weights) and (len(weights) > 0) == (name in LINEAR), name
    for model, attr, w in weights:  # ... which changes no probability
        setattr(model, attr, np.ascontiguousarray(w))
    assert np.allclose(router.predict_proba(texts)[1], probs, rtol=0, atol=1e-12)


def test_unknown_for_empty_whitespace_binary_and_low_confidence(tok, train):
    router = fit_router(RouterConfig(), *train, tok)
    odd = ["", "   ", "\n\t", None, b"Bonjour", "\x00\x01\x02\x03\x04\x05", bytes(range(256)).decode("latin-1")]
    assert router.predict(odd) == [UNKNOWN] * len(odd)
    _, probs = router.predict_proba(odd)
    assert not probs.any()
    text = ["La rivière traverse la vieille ville"]
    assert router.predict(text) == ["fr"]
    router.unknown_below = 0.999999  # above any probability this classifier gives
    assert router.predict(text) == [UNKNOWN]


def test_predict_is_per_sequence_and_batched(tok, train):
    router = fit_router(RouterConfig(batch_size=3), *train, tok)
    texts, labels = examples(slice(0, 9), copies=4, seed=2)
    assert router.predict(texts) == [router.predict([t])[0] for t in texts]
    assert np.mean([p == y for p, y in zip(router.predict(texts), labels)]) >= 0.95


@pytest.mark.parametrize("kind", ["token_tfidf", "char_tfidf"])
def test_save_load_round_trip_gives_identical_predictions(kind, tok, train, tmp_path):
    router = fit_router(RouterConfig(features=kind, classifier="linear_svc"), *train, tok)
    save_router(router, tmp_path)
    loaded = load_router(tmp_path)
    texts = examples(slice(0, 12), copies=5, seed=3)[0] + [""]
    assert loaded.predict(texts) == router.predict(texts)
    assert np.array_equal(loaded.predict_proba(texts)[1], router.predict_proba(texts)[1])
    assert loaded.unknown_below == router.unknown_below


def _saved(tok, train, path):
    save_router(fit_router(RouterConfig(classifier="multinomial_nb"), *train, tok), path)
    return path / "router.skops"


def test_tampered_and_truncated_artifacts_are_refused(tok, train, tmp_path):
    model = _saved(tok, train, tmp_path)
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    with pytest.raises(MomeError, match="truncated or modified"):
        load_router(tmp_path)
    model.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(MomeError, match="truncated or modified"):
        load_router(tmp_path)


def test_untrusted_types_are_refused_even_with_a_matching_checksum(tok, train, tmp_path):
    import os

    import skops.io as sio
    from sklearn.preprocessing import FunctionTransformer

    model = _saved(tok, train, tmp_path)
    evil = sio.dumps(FunctionTransformer(func=os.system))
    model.write_bytes(evil)
    info = json.loads((tmp_path / "router.json").read_text())
    info.update(sha256=hashlib.sha256(evil).hexdigest(), bytes=len(evil))
    (tmp_path / "router.json").write_text(json.dumps(info))
    with pytest.raises(MomeError, match="outside the trusted list"):
        load_router(tmp_path)


def test_missing_router_says_how_to_make_one(tmp_path):
    with pytest.raises(MomeError, match="mome router"):
        load_router(tmp_path)


def test_bad_router_config_names_the_key():
    with pytest.raises(MomeError, match="unknown router classifier 'svm'"):
        RouterConfig(classifier="svm")
    with pytest.raises(MomeError, match="unknown parameter 'gamma'"):
        RouterConfig(classifier="logreg", classifier_params={"gamma": 1})
    with pytest.raises(MomeError, match="unknown router features"):
        RouterConfig(features="words")


@pytest.mark.parametrize("name", ["router.yaml", "router_token_nb.yaml"])
def test_search_space_names_only_known_features_classifiers_and_params(name, ray_head):
    # ray_head first: `to_tune` imports Ray, which reads RAY_AUTH_MODE once, at import; the session head's
    # fixture sets it (a Ray imported before it would try token auth against the test head and hang).
    from mome_ray.sweeps import load_space, to_tune

    space = load_space(ROOT / "tune_spaces" / name)
    to_tune(space)  # every domain is well formed
    if name == "router.yaml":  # the full space covers every feature kind and classifier
        assert set(space["features"]["grid"]) == set(FEATURES) == set(space["feature_params"])
        assert set(space["classifier"]["grid"]) == set(CLASSIFIERS) == set(space["classifier_params"])
    for name, params in space["classifier_params"].items():
        for key, domain in params.items():
            (kind, values), = domain.items()
            for value in values:  # each choice, or each end of a range
                build_classifier(name, {key: value})
    for kind, params in space["feature_params"].items():
        for key, domain in params.items():
            for value in next(iter(domain.values())):
                build_features(kind, {key: value})
