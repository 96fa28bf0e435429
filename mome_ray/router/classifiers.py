"""The router's classifiers, each built by name from a small dict of hyperparameters.

    clf = build_classifier("logreg", {"C": 10.0})

Every classifier ends up with `predict_proba`, because the router's `unknown` threshold is a probability:
those without one (LinearSVC, RidgeClassifier) are calibrated with `CalibratedClassifierCV` (sigmoid,
3 folds). Defaults below; the search space in tune_spaces/router.yaml sweeps the key ones.
"""

from __future__ import annotations

from typing import Any, Callable

from mome_ray.errors import MomeError


def _logreg(C: float, max_iter: int, seed: int):
    from sklearn.linear_model import LogisticRegression

    return LogisticRegression(C=C, max_iter=max_iter, random_state=seed)  # lbfgs, multinomial (the paper's)


def _sgd(alpha: float, max_iter: int, seed: int):
    from sklearn.linear_model import SGDClassifier

    return SGDClassifier(loss="modified_huber", alpha=alpha, max_iter=max_iter, random_state=seed)


def _linear_svc(C: float, seed: int):
    from sklearn.svm import LinearSVC

    return _calibrated(LinearSVC(C=C, random_state=seed))


def _ridge(alpha: float, seed: int):
    from sklearn.linear_model import RidgeClassifier

    return _calibrated(RidgeClassifier(alpha=alpha))


def _complement_nb(alpha: float, seed: int):
    from sklearn.naive_bayes import ComplementNB

    return ComplementNB(alpha=alpha)


def _multinomial_nb(alpha: float, seed: int):
    from sklearn.naive_bayes import MultinomialNB

    return MultinomialNB(alpha=alpha)


def _nearest_centroid(priors: str, seed: int):
    from sklearn.neighbors import NearestCentroid

    # Euclidean only: the manhattan metric has no predict_proba, and shrinking rejects sparse input.
    return NearestCentroid(priors=priors)


def _knn(n_neighbors: int, weights: str, seed: int):
    from sklearn.neighbors import KNeighborsClassifier

    # Cosine distance on TF-IDF rows; brute force is the only algorithm that takes sparse input well.
    return KNeighborsClassifier(n_neighbors=int(n_neighbors), weights=weights, metric="cosine", algorithm="brute")


def _random_forest(n_estimators: int, max_depth: int, seed: int):
    from sklearn.ensemble import RandomForestClassifier

    return RandomForestClassifier(n_estimators=int(n_estimators), max_depth=int(max_depth) or None,
                                  random_state=seed, n_jobs=1)


def _calibrated(clf):
    from sklearn.calibration import CalibratedClassifierCV

    return CalibratedClassifierCV(clf, method="sigmoid", cv=3)


# name -> (builder, default hyperparameters)
CLASSIFIERS: dict[str, tuple[Callable, dict[str, Any]]] = {
    "logreg": (_logreg, {"C": 1.0, "max_iter": 1000}),  # the paper's
    "sgd": (_sgd, {"alpha": 1e-5, "max_iter": 50}),
    "linear_svc": (_linear_svc, {"C": 1.0}),
    "ridge": (_ridge, {"alpha": 1.0}),
    "complement_nb": (_complement_nb, {"alpha": 0.1}),
    "multinomial_nb": (_multinomial_nb, {"alpha": 0.01}),
    "nearest_centroid": (_nearest_centroid, {"priors": "uniform"}),
    "knn": (_knn, {"n_neighbors": 5, "weights": "distance"}),
    "random_forest": (_random_forest, {"n_estimators": 100, "max_depth": 0}),
}


def classifier_params(name: str, params: dict[str, Any]) -> dict[str, Any]:
    """The classifier's defaults overridden by `params`; unknown names are an error naming them."""
    if name not in CLASSIFIERS:
        raise MomeError(f"unknown router classifier '{name}'; choose one of {sorted(CLASSIFIERS)}")
    defaults = CLASSIFIERS[name][1]
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise MomeError(f"unknown parameter '{unknown[0]}' for router classifier '{name}'; valid: {sorted(defaults)}")
    return {**defaults, **params}


def build_classifier(name: str, params: dict[str, Any] | None = None, seed: int = 0):
    """A fresh, unfitted classifier with `predict_proba`."""
    return CLASSIFIERS[name][0](**classifier_params(name, params or {}), seed=seed)
