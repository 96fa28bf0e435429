"""How well a router routes: classification metrics per case group, the hard cases, a confusion matrix.

    metrics = evaluate_router(router, cases, out_dir)      # also writes out_dir/confusion.png

`unknown` answers count as wrong in every accuracy. Besides the labelled groups, two fixed sets test the
defined behaviour on input that is no language of the router: not text at all (must all be `unknown`)
and sentences in languages it was not trained on (ideally `unknown`; the share is reported). Groups named
`shift/<source>/<length>` (router/shift.py) are pooled into `shift_accuracy`.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from mome_ray.router.model import UNKNOWN, Router
from mome_ray.router.shift import shift_accuracy

NOT_TEXT = ["", " ", "\n\t  \n", None, b"Bonjour", 42, "\x00\x01\x02\x03\x04\x05\x06\x07",
            bytes(range(256)).decode("latin-1"), "\ufffd" * 12]
OTHER_LANGS = [  # languages the default router is not trained on
    "El río atraviesa la ciudad vieja y el mercado está en la orilla izquierda",
    "Los niños jugaban en el parque cuando empezó a llover por la tarde",
    "Il fiume attraversa la città vecchia e il mercato è sulla riva sinistra",
    "I bambini giocavano nel parco quando cominciò a piovere",
    "De rivier stroomt door de oude stad en de markt ligt op de linkeroever",
    "De kinderen speelden in het park toen het begon te regenen",
    "O rio atravessa a cidade velha e o mercado fica na margem esquerda",
    "As crianças brincavam no parque quando começou a chover",
]


def scores(y_true: list[str], y_pred: list[str], labels: list[str]) -> dict:
    """Accuracy, weighted and macro precision/recall/F1, and F1 per language."""
    from sklearn.metrics import accuracy_score, f1_score, precision_recall_fscore_support

    out = {"n": len(y_true), "accuracy": float(accuracy_score(y_true, y_pred))}
    for avg in ("weighted", "macro"):
        p, r, f, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels, average=avg, zero_division=0)
        out.update({f"precision_{avg}": float(p), f"recall_{avg}": float(r), f"f1_{avg}": float(f)})
    per = f1_score(y_true, y_pred, labels=labels, average=None, zero_division=0)
    out["f1_per_lang"] = {lang: float(v) for lang, v in zip(labels, per)}
    out["unknown_rate"] = float(np.mean([p == UNKNOWN for p in y_pred])) if y_pred else 0.0
    return out


def f1_interval(y_true: list[str], y_pred: list[str], labels: list[str], n: int = 1000, seed: int = 0,
                level: float = 0.95) -> list[float]:
    """A bootstrap interval (resampling the texts) of the weighted F1."""
    from sklearn.metrics import f1_score

    y, p = np.asarray(y_true), np.asarray(y_pred)
    idx = np.random.default_rng(seed).integers(0, len(y), size=(n, len(y)))
    reps = [f1_score(y[i], p[i], labels=labels, average="weighted", zero_division=0) for i in idx]
    return [float(v) for v in np.percentile(reps, [100 * (1 - level) / 2, 100 * (1 + level) / 2])]


def throughput(router: Router, texts: list[str], repeats: int = 3) -> float:
    """Sequences per second of `router.predict` (best of `repeats`, tokenization included)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        router.predict(texts)
        best = min(best, time.perf_counter() - t0)
    return len(texts) / best


def evaluate_router(router: Router, cases: dict[str, tuple[list[str], list[str]]], out_dir: Path | None = None) -> dict:
    """Metrics for every case group; the confusion matrices of sequences and 32-token windows as PNG."""
    labels = router.classes
    preds = {name: router.predict(texts) for name, (texts, _) in cases.items()}
    groups = {name: scores(y, preds[name], labels) for name, (_, y) in cases.items()}
    by_length = {name: g["accuracy"] for name, g in groups.items() if name.isdigit() or name in ("whole", "sequences")}
    metrics = {
        "test_f1_weighted": groups["sequences"]["f1_weighted"],
        "test_f1_interval": f1_interval(cases["sequences"][1], preds["sequences"], labels),
        "test_accuracy": groups["sequences"]["accuracy"],
        "accuracy_by_length": by_length,
        "heldout_accuracy": {name.removeprefix("heldout/"): g["accuracy"] for name, g in groups.items()
                             if name.startswith("heldout/")},
        "mixed_accuracy": {name.removeprefix("mixed/"): g["accuracy"] for name, g in groups.items()
                           if name.startswith("mixed/")},
        "shift_accuracy": shift_accuracy(groups),
        "unknown_on_not_text": float(np.mean([p == UNKNOWN for p in router.predict(NOT_TEXT)])),
        "unknown_on_other_langs": float(np.mean([p == UNKNOWN for p in router.predict(OTHER_LANGS)])),
        "throughput_seq_per_s": throughput(router, cases["sequences"][0]),
        "groups": groups,
    }
    if out_dir is not None:
        shown = [n for n in ("sequences", "32") if n in cases]
        plot_confusion({n: (cases[n][1], preds[n]) for n in shown}, labels, Path(out_dir) / "confusion.png")
    return metrics


def plot_confusion(groups: dict[str, tuple[list[str], list[str]]], labels: list[str], path: Path) -> None:
    """One confusion matrix per group, side by side (rows: true language, columns: routed to)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import confusion_matrix

    cols = labels + [UNKNOWN]
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.8), squeeze=False)
    for ax, (name, (y, p)) in zip(axes[0], groups.items()):
        cm = confusion_matrix(y, p, labels=cols)[: len(labels)]
        ax.imshow(cm, cmap="Blues")
        for (i, j), v in np.ndenumerate(cm):
            ax.text(j, i, str(v), ha="center", va="center", color="white" if v > cm.max() / 2 else "black")
        ax.set_xticks(range(len(cols)), cols, rotation=45)
        ax.set_yticks(range(len(labels)), labels)
        title = "whole sequences" if name == "sequences" else f"{name}-token windows"
        ax.set(title=f"{title} (n={len(y)})", xlabel="routed to", ylabel="true")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def summary_lines(metrics: dict) -> list[str]:
    """The metrics a user reads after `mome router`, as printable lines."""
    g = metrics["groups"]
    lo, hi = metrics.get("test_f1_interval") or (float("nan"),) * 2
    lines = [f"test sequences: weighted F1 {metrics['test_f1_weighted']:.4%} [{lo:.2%}, {hi:.2%}], accuracy {metrics['test_accuracy']:.4%} "
             f"(n={g['sequences']['n']})",
             "accuracy by window length: " + ", ".join(f"{k} {v:.2%}" for k, v in metrics["accuracy_by_length"].items()
                                                        if k != "sequences")]
    if metrics["heldout_accuracy"]:
        lines.append("held-out sources: " + ", ".join(f"{k} {v:.2%}" for k, v in metrics["heldout_accuracy"].items()))
    if metrics["mixed_accuracy"]:
        lines.append("mixed prose/code: " + ", ".join(f"{k} {v:.2%}" for k, v in metrics["mixed_accuracy"].items()))
    shift = metrics.get("shift_accuracy")
    if shift:
        lines.append(f"source shift (sources never trained on, n={shift['n']:,}): {shift['overall']:.2%}; by length "
                     + ", ".join(f"{k} {v:.2%}" for k, v in shift["by_length"].items()) + "; by source "
                     + ", ".join(f"{k} {v:.2%}" for k, v in shift["by_source"].items()))
    lines.append(f"unknown on non-text input {metrics['unknown_on_not_text']:.0%}, on other languages "
                 f"{metrics['unknown_on_other_langs']:.0%}; throughput {metrics['throughput_seq_per_s']:,.0f} seq/s")
    return lines
