"""TF-IDF over token-id n-grams straight from id sequences: the router's `token_tfidf` features.

    vec = TokenNgramTfidf(ngram_max=2).fit(ids)        # ids: one sequence of token ids per text
    X = vec.transform(PretokenCache(tokenizer).encode(texts))   # the matrix TfidfVectorizer gives on the id strings

A module of its own so that importing the router's config does not import scikit-learn.
"""

from __future__ import annotations

from itertools import chain
from typing import Sequence

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin

from mome_ray.errors import MomeError
from mome_ray.router.features import TOKEN_PATTERN


def ids_as_text(docs: Sequence[Sequence[int]]) -> list[str]:
    """Each id sequence as one space-separated string: how CountVectorizer sees token ids."""
    return [" ".join(map(str, ids)) for ids in docs]


class TokenNgramTfidf(TransformerMixin, BaseEstimator):
    """TF-IDF over token-id n-grams (1 to `ngram_max`), computed from the id sequences with numpy.

    `fit` takes its vocabulary from scikit-learn's CountVectorizer on the ids written as text (same n-grams,
    `min_df`, `max_features`, same column order) and keeps it as arrays only: each n-gram as one integer
    key (its ids + 1 as the digits of a number in base `base_`, so n-grams of different lengths never
    share a key) with its column. `transform` computes every n-gram key of every sequence at once, looks
    them up in a hash index, counts per row and weights with the fitted TfidfTransformer: the matrix
    TfidfVectorizer gives on the id strings, without building those strings or running sklearn's
    per-token Python analyzer (the router's bottleneck). Plain arrays also store safely with skops.
    """

    def __init__(self, ngram_max: int = 1, min_df: int = 1, max_features: int = 0, sublinear_tf: bool = True):
        self.ngram_max, self.min_df = ngram_max, min_df
        self.max_features, self.sublinear_tf = max_features, sublinear_tf

    def fit(self, X: Sequence[Sequence[int]], y=None):
        """Learn the n-gram vocabulary and the idf weights from id sequences."""
        from sklearn.feature_extraction.text import CountVectorizer, TfidfTransformer

        counter = CountVectorizer(token_pattern=TOKEN_PATTERN, lowercase=False, ngram_range=(1, self.ngram_max),
                                  min_df=self.min_df, max_features=self.max_features or None, dtype=np.float32)
        counter.fit(ids_as_text(X))
        # Digits 1 .. largest id + 1; an id above that is in no n-gram of the vocabulary.
        self.base_ = max(int(i) for term in counter.vocabulary_ for i in term.split()) + 2
        if self.base_ ** self.ngram_max >= 2**63:
            raise MomeError(f"router feature_params ngram_max={self.ngram_max} is too large for int64 n-gram keys "
                            f"with {self.base_ - 1:,} token ids; use ngram_max <= 3")
        keys = np.array([self._key(term) for term in counter.vocabulary_], dtype=np.int64)
        columns = np.fromiter(counter.vocabulary_.values(), dtype=np.int64, count=len(keys))
        self.keys_, self.columns_, self.n_features_ = keys, columns, len(keys)
        self._index = None
        self.tfidf_ = TfidfTransformer(sublinear_tf=self.sublinear_tf).fit(self.counts(X))
        return self

    def _key(self, term: str) -> int:
        key = 0
        for token in term.split():
            key = key * self.base_ + int(token) + 1
        return key

    def counts(self, X: Sequence[Sequence[int]]):
        """(len(X), n_features) float32 CSR matrix of n-gram counts, column indices sorted in each row."""
        import scipy.sparse as sp

        lengths = np.fromiter(map(len, X), dtype=np.int64, count=len(X))
        ids = np.fromiter(chain.from_iterable(X), dtype=np.int64, count=int(lengths.sum()))
        rows, keys = self._ngram_keys(ids, np.repeat(np.arange(len(X)), lengths))
        at = self._key_index().get_indexer(keys)
        known = at >= 0
        cells, n = np.unique(rows[known] * self.n_features_ + self.columns_[at[known]], return_counts=True)
        indptr = np.searchsorted(cells, np.arange(len(X) + 1) * self.n_features_)
        return sp.csr_matrix((n.astype(np.float32), cells % self.n_features_, indptr),
                             shape=(len(X), self.n_features_))

    def _key_index(self):
        """A hash index of `keys_` (pandas): lookups 5-10x faster than a binary search. Built on first use."""
        if getattr(self, "_index", None) is None:
            import pandas as pd

            self._index = pd.Index(self.keys_)
        return self._index

    def __getstate__(self):
        """What skops (or pickle) stores: the fitted arrays, not the index rebuilt from them."""
        state = super().__getstate__()
        state.pop("_index", None)
        return state

    def _ngram_keys(self, ids: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row, key) of every n-gram inside one sequence; n-grams with an id unseen in fit are left out."""
        digits = ids + 1
        seen = digits < self.base_
        all_rows, all_keys = [], []
        for n in range(1, self.ngram_max + 1):
            m = len(ids) - n + 1
            if m <= 0:
                break
            key, ok = digits[:m].copy(), seen[:m] & (rows[:m] == rows[n - 1 :])
            for j in range(1, n):
                key = key * self.base_ + digits[j : j + m]
                ok &= seen[j : j + m]
            all_rows.append(rows[:m][ok])
            all_keys.append(key[ok])
        if not all_keys:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        return np.concatenate(all_rows), np.concatenate(all_keys)

    def transform(self, X: Sequence[Sequence[int]]):
        """TF-IDF matrix (len(X), n_features), float32, rows L2-normalised."""
        return self.tfidf_.transform(self.counts(X), copy=False)
