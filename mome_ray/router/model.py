"""The router: a fitted feature pipeline + classifier that maps each text to a language code or `unknown`.

    router = fit_router(cfg, texts, labels, tokenizer)
    router.predict(["def f(x):", "Bonjour tout le monde"])      # -> ["py", "fr"]
    classes, probs = router.predict_proba(texts)                # probs: (len(texts), len(classes))

Each text is routed on its own (never a batch flattened into one string, the paper code's bug), in chunks
of `batch_size`. A text gets `unknown` when it is not text at all (empty or whitespace-only, not a `str`,
mostly control or undecodable characters), or when the classifier's top probability is below
`unknown_below`; the MoE sends `unknown` to its common expert. With `collapse_spaces`, runs of spaces after
a word (the column layout of `--help` text and tables) are one space before the features see the text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mome_ray.errors import MomeError
from mome_ray.router.classifiers import build_classifier, classifier_params
from mome_ray.router.features import build_features, feature_params, uses_tokens
from mome_ray.router.shift import ShiftConfig

UNKNOWN = "unknown"
MAX_BAD_CHARS = 0.2  # a string with a larger share of control / undecodable characters is not text
BAD_CHARS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufffd]")  # C0/C1 controls but tab/newline/CR; U+FFFD
SPACE_RUN = re.compile(r"(?<=\S)[ \t]{2,}")  # spaces aligning columns after a word (not indentation)


SWEEP_METRICS = [f"val_{m}" for m in ("accuracy", "f1_weighted", "f1_macro", "precision_weighted", "recall_weighted")]


@dataclass
class RouterSweepConfig:
    space: str = "tune_spaces/router.yaml"  # search space (see mome_ray/sweeps.py for the format)
    num_samples: int = 1  # samples of the random domains per grid point
    cpus_per_trial: float = 1.0
    max_concurrent: int = 0  # 0 = as many as the cluster's CPUs allow
    metric: str = "val_accuracy"  # what picks the best trial (mixed-length validation windows)
    mlflow_uri: str = ""  # also log trials to MLflow when set

    def __post_init__(self):
        if self.metric not in SWEEP_METRICS:
            raise MomeError(f"router.sweep.metric '{self.metric}' is not a trial metric; choose one of {SWEEP_METRICS}")
        if self.num_samples < 1 or self.cpus_per_trial <= 0:
            raise MomeError("router.sweep.num_samples must be >= 1 and router.sweep.cpus_per_trial > 0")


@dataclass
class RouterConfig:
    features: str = "token_tfidf"  # token_tfidf | char_tfidf | hashing (router/features.py)
    feature_params: dict[str, Any] = field(default_factory=dict)  # overrides of that kind's defaults
    classifier: str = "logreg"  # router/classifiers.py: logreg, sgd, linear_svc, ridge, complement_nb, ...
    classifier_params: dict[str, Any] = field(default_factory=dict)  # e.g. {C: 10.0}
    unknown_below: float = 0.4  # top probability under this -> "unknown" (4 languages: chance is 0.25)
    sequence_length: int = 128  # tokens of one MoE sequence (the teacher's n_positions); the longest window
    min_window: int = 4  # shortest training window, in tokens
    examples_per_lang: int = 4000  # training windows per language: half full sequences, half shorter
    eval_lengths: list[int] = field(default_factory=lambda: [8, 16, 32, 64, 128])  # test window lengths
    eval_per_lang: int = 400  # test windows per language and length (and mixed cases per kind)
    batch_size: int = 1024  # texts per predict chunk
    collapse_spaces: bool = False  # runs of spaces after a word become one (column layout is no sign of code)
    sweep: RouterSweepConfig = field(default_factory=RouterSweepConfig)
    shift: ShiftConfig = field(default_factory=ShiftConfig)  # the held-out-source evaluation (router/shift.py)

    def __post_init__(self):
        feature_params(self.features, self.feature_params)
        classifier_params(self.classifier, self.classifier_params)
        if not 0 <= self.unknown_below < 1:
            raise MomeError(f"router.unknown_below must be in [0, 1), got {self.unknown_below}")
        if not 1 <= self.min_window <= self.sequence_length:
            raise MomeError("router.min_window must be >= 1 and <= router.sequence_length")
        if self.examples_per_lang < 2 or self.eval_per_lang < 1 or self.batch_size < 1:
            raise MomeError("router.examples_per_lang must be >= 2, eval_per_lang and batch_size >= 1")


def is_text(x: Any) -> bool:
    """A non-empty string that is mostly printable characters (not binary data decoded as text)."""
    if not isinstance(x, str) or not x.strip():
        return False
    return len(BAD_CHARS.findall(x)) <= MAX_BAD_CHARS * len(x)


class Router:
    """Fitted sklearn pipeline (features -> classifier) plus what it needs around it."""

    def __init__(self, pipeline, features: str, tokenizer=None, unknown_below: float = 0.4, batch_size: int = 1024,
                 collapse_spaces: bool = False):
        if uses_tokens(features) and tokenizer is None:
            raise MomeError(f"router features '{features}' read token ids; give the router a tokenizer")
        self.pipeline, self.features, self.tokenizer = pipeline, features, tokenizer
        weights_for_sparse(pipeline)  # a fitted one (load_router); fit_router lays it out after fitting
        self.unknown_below, self.batch_size, self.collapse_spaces = unknown_below, batch_size, collapse_spaces
        self.encoder = None  # texts -> token ids, when the features read them
        if uses_tokens(features):
            from mome_ray.router.token_ids import PretokenCache

            self.encoder = PretokenCache(tokenizer)

    @property
    def classes(self) -> list[str]:
        return [str(c) for c in self.pipeline.classes_]

    def _inputs(self, texts: list[str]) -> list:
        """What the feature pipeline reads: token ids of each text, or the texts themselves (spaces collapsed
        first when `collapse_spaces`)."""
        if self.collapse_spaces:
            texts = [SPACE_RUN.sub(" ", t) for t in texts]
        return self.encoder.encode(texts) if self.encoder is not None else texts

    def predict_proba(self, texts: list) -> tuple[list[str], np.ndarray]:
        """(class labels, probabilities (N, len(labels))); a row of zeros for input that is not text."""
        probs = np.zeros((len(texts), len(self.classes)), dtype=np.float64)
        ok = [i for i, t in enumerate(texts) if is_text(t)]
        for start in range(0, len(ok), self.batch_size):
            rows = ok[start : start + self.batch_size]
            probs[rows] = self.pipeline.predict_proba(self._inputs([texts[i] for i in rows]))
        return self.classes, probs

    def predict(self, texts: list) -> list[str]:
        """One language code per text, or `unknown` (not text, or top probability below the threshold)."""
        return self.decide(self.predict_proba(texts)[1])

    def decide(self, probs: np.ndarray) -> list[str]:
        """The label of each row of `predict_proba`'s probabilities (`top_labels`)."""
        return top_labels(self.classes, probs, self.unknown_below)


def weights_for_sparse(pipeline) -> None:
    """Lay a fitted linear classifier's weights out for sparse rows: it computes `X @ W.T`, and with W
    (classes, features) in C order, scipy copies all of W.T into a contiguous array for every product (6 of
    the 8 ms that routing one text took with 2^20 features). W in Fortran order makes W.T contiguous as it
    is; the numbers are the same."""
    for model, name, w in linear_weights(pipeline):
        setattr(model, name, np.asfortranarray(w))


def linear_weights(pipeline):
    """(model, attribute, W) of each weight matrix a fitted pipeline's classifier multiplies rows by."""
    if not hasattr(pipeline, "steps"):
        return
    clf = pipeline.steps[-1][1]
    for model in [clf] + [c.estimator for c in getattr(clf, "calibrated_classifiers_", [])]:
        for name in ("coef_", "feature_log_prob_"):
            w = getattr(model, name, None)
            if isinstance(w, np.ndarray) and w.ndim == 2:
                yield model, name, w


def top_labels(classes: list[str], probs, unknown_below: float = 0.0) -> list[str]:
    """Each row's most probable class, or `unknown` when its probability is 0 (not text) or below
    `unknown_below` (the router's confidence threshold). The MoE routes by this rule too (`moe.decide`)."""
    probs = np.asarray(probs)
    best = probs.argmax(axis=1)
    top = probs[np.arange(len(probs)), best]
    return [classes[b] if p > 0 and p >= unknown_below else UNKNOWN for b, p in zip(best, top)]


def fit_router(cfg: RouterConfig, texts: list[str], labels: list[str], tokenizer=None, seed: int = 0) -> Router:
    """Fit the configured features + classifier on (text, language) examples."""
    from sklearn.pipeline import Pipeline

    pipeline = Pipeline([("features", build_features(cfg.features, cfg.feature_params)),
                         ("classifier", build_classifier(cfg.classifier, cfg.classifier_params, seed))])
    router = Router(pipeline, cfg.features, tokenizer if uses_tokens(cfg.features) else None,
                    cfg.unknown_below, cfg.batch_size, cfg.collapse_spaces)
    pipeline.fit(router._inputs(texts), labels)
    weights_for_sparse(pipeline)
    return router
