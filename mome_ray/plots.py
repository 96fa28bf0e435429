"""PNG plots for the report and the forgetting study (matplotlib, Agg backend: no display needed).

    lines({"en": (steps, ppl_en), "fr": (steps, ppl_fr)}, "out/curves.png", "teacher", "step", "val ppl")
    panels([("sequential", {...}), ("balanced", {...})], "out/lines.png", "stage", "val ppl", logy=True)
    heatmaps([("sequential", matrix, row_labels)], col_labels, "out/heatmap.png", "val ppl")
"""

from __future__ import annotations

from pathlib import Path

Series = dict[str, tuple[list, list]]  # label -> (x, y)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _draw(ax, series: Series, title: str, xlabel: str, ylabel: str, logy: bool) -> None:
    for label, (x, y) in series.items():
        ax.plot(x, y, marker="o" if len(x) <= 12 else None, markersize=3, label=label)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def panels(plots: list[tuple[str, Series]], path: Path, xlabel: str, ylabel: str, logy: bool = False) -> Path:
    """One line plot per (title, series), side by side, in one PNG."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(plots), figsize=(4.5 * len(plots), 3.6), squeeze=False)
    for ax, (title, series) in zip(axes[0], plots):
        _draw(ax, series, title, xlabel, ylabel, logy)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def lines(series: Series, path: Path, title: str, xlabel: str, ylabel: str, logy: bool = False) -> Path:
    return panels([(title, series)], path, xlabel, ylabel, logy)


def heatmaps(maps: list[tuple[str, list[list[float]], list[str]]], col_labels: list[str], path: Path,
             value: str) -> Path:
    """One annotated heatmap per (title, matrix, row labels), side by side, log-coloured."""
    import numpy as np
    from matplotlib.colors import LogNorm

    plt = _pyplot()
    values = np.array([v for _, m, _ in maps for row in m for v in row], dtype=float)
    norm = LogNorm(vmin=max(np.nanmin(values), 1e-3), vmax=max(np.nanmax(values), 1e-3 * 1.01))
    fig, axes = plt.subplots(1, len(maps), figsize=(3.2 + 1.1 * len(col_labels) * len(maps), 3.8), squeeze=False)
    for ax, (title, matrix, rows) in zip(axes[0], maps):
        m = np.array(matrix, dtype=float)
        image = ax.imshow(m, cmap="viridis_r", norm=norm, aspect="auto")
        ax.set_xticks(range(len(col_labels)), col_labels)
        ax.set_yticks(range(len(rows)), rows)
        for (i, j), v in np.ndenumerate(m):
            ax.text(j, i, f"{v:.0f}" if v >= 100 else f"{v:.1f}", ha="center", va="center", fontsize=7, color="w")
        ax.set_title(title)
    fig.subplots_adjust(wspace=0.45)
    fig.colorbar(image, ax=axes[0].tolist(), label=value)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return Path(path)


def bars(values: dict[str, dict[str, float]], path: Path, title: str, ylabel: str, logy: bool = False) -> Path:
    """Grouped bars: {group: {label: value}} (e.g. {model: {lang: ppl}})."""
    import numpy as np

    plt = _pyplot()
    groups = list(values)
    labels = list(dict.fromkeys(k for v in values.values() for k in v))
    width = 0.8 / max(1, len(groups))
    fig, ax = plt.subplots(figsize=(3.5 + 1.2 * len(labels) + 0.2 * len(groups), 3.6))
    for g, group in enumerate(groups):
        x = np.arange(len(labels)) + g * width
        ax.bar(x, [values[group].get(l, np.nan) for l in labels], width, label=group)
    ax.set_xticks(np.arange(len(labels)) + width * (len(groups) - 1) / 2, labels)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))  # outside: bars stay visible
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
