"""Feature pipelines of the router: text (or token ids) -> a sparse matrix.

    vec = build_features("token_tfidf", {"ngram_max": 2})
    X = vec.fit_transform(PretokenCache(tokenizer).encode(texts))   # token_tfidf reads token ids (token_ids.py)

Three kinds:
- `token_tfidf`: TF-IDF over token-id n-grams (the paper's, unigrams by default), computed from the id
  sequences in numpy (router/token_ngrams.py). Its n-grams are those of the ids written as space-separated
  decimal strings with the token pattern `\\S+`, so one-digit ids count. (scikit-learn's default pattern
  needs two word characters and silently drops ids 0-9: the bug in the paper's code.)
- `char_tfidf`: TF-IDF over character n-grams of the text (`char`: across spaces, so indentation and
  punctuation runs, strong signs of code, count; `char_wb`: within words).
- `hashing`: character n-grams hashed into a fixed number of columns (no vocabulary to store), then TF-IDF.
"""

from __future__ import annotations

from typing import Any

from mome_ray.errors import MomeError

TOKEN_PATTERN = r"\S+"  # every whitespace-separated id, one digit or many

# Each kind's defaults; a config's feature_params override them (unknown names are an error).
FEATURES: dict[str, dict[str, Any]] = {
    "token_tfidf": {"ngram_max": 1, "min_df": 1, "max_features": 0, "sublinear_tf": True},
    "char_tfidf": {"analyzer": "char", "ngram_min": 1, "ngram_max": 3, "min_df": 2, "max_features": 100_000, "sublinear_tf": True},
    "hashing": {"analyzer": "char", "ngram_min": 1, "ngram_max": 3, "n_features": 2**18, "sublinear_tf": True},
}


def feature_params(kind: str, params: dict[str, Any]) -> dict[str, Any]:
    """The kind's defaults overridden by `params`; an unknown kind or parameter is an error naming it."""
    if kind not in FEATURES:
        raise MomeError(f"unknown router features '{kind}'; choose one of {sorted(FEATURES)}")
    unknown = sorted(set(params) - set(FEATURES[kind]))
    if unknown:
        raise MomeError(f"unknown parameter '{unknown[0]}' for router features '{kind}'; "
                        f"valid: {sorted(FEATURES[kind])}")
    return {**FEATURES[kind], **params}


def uses_tokens(kind: str) -> bool:
    """True when the features read token ids (the router then tokenizes its input first)."""
    return kind == "token_tfidf"


def build_features(kind: str, params: dict[str, Any] | None = None):
    """A fresh scikit-learn transformer (texts, or token-id sequences for `token_tfidf`, in; sparse matrix out)."""
    from sklearn.feature_extraction.text import HashingVectorizer, TfidfTransformer, TfidfVectorizer
    from sklearn.pipeline import make_pipeline

    from mome_ray.router.token_ngrams import TokenNgramTfidf

    p = feature_params(kind, params or {})
    if kind == "token_tfidf":
        return TokenNgramTfidf(ngram_max=int(p["ngram_max"]), min_df=int(p["min_df"]),
                               max_features=int(p["max_features"]), sublinear_tf=bool(p["sublinear_tf"]))
    ngrams = (int(p["ngram_min"]), int(p["ngram_max"]))
    if kind == "char_tfidf":
        return TfidfVectorizer(analyzer=p["analyzer"], ngram_range=ngrams, min_df=int(p["min_df"]),
                               max_features=int(p["max_features"]) or None, sublinear_tf=bool(p["sublinear_tf"]),
                               dtype=_float32())
    # Non-negative hashes (alternate_sign=False) so the naive Bayes classifiers accept the counts.
    hashing = HashingVectorizer(analyzer=p["analyzer"], ngram_range=ngrams, n_features=int(p["n_features"]),
                                alternate_sign=False, norm=None, dtype=_float32())
    return make_pipeline(hashing, TfidfTransformer(sublinear_tf=bool(p["sublinear_tf"])))


def _float32():
    import numpy as np

    return np.float32
