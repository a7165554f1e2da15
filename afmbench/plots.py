"""The figures people compare, drawn with matplotlib (Agg: no display needed).

Used for the run folder's PNGs, the images sent to W&B and the leaderboard's HTML report, so
every place shows the same picture.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import LogLocator, MaxNLocator, NullLocator  # noqa: E402


def accuracy_heatmap(
    matrix: np.ndarray, title: str = "accuracy matrix", joint: bool = False
) -> Figure:
    """R[i, j] as a heatmap, one annotated cell per (trained experience, test task)."""
    matrix = np.asarray(matrix, dtype=float)
    n_rows, n_tasks = matrix.shape
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * n_tasks, 1.0 + 0.5 * n_rows), dpi=100)
    image = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
    if n_tasks <= 12:
        for (i, j), value in np.ndenumerate(matrix):
            if not np.isnan(value):
                ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7,
                        color="black" if value > 0.6 else "white")  # fmt: skip
    ax.set_xlabel("test task")
    ax.set_ylabel("after training")
    ax.set_xticks(range(n_tasks))
    ax.set_yticks(range(n_rows), ["joint"] if joint else [str(i) for i in range(n_rows)])
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    return fig


def accuracy_curves(
    curves: Mapping[str, Sequence[float]],
    spread: Mapping[str, Sequence[float]] | None = None,
    title: str = "average accuracy vs number of tasks",
) -> Figure:
    """Average accuracy over the tasks seen so far, one line per label (AFM paper Fig. 5b)."""
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=100)
    for label, values in curves.items():
        x = np.arange(1, len(values) + 1)
        ax.plot(x, values, marker="o", markersize=3, label=label)
        if spread and label in spread:
            low = np.asarray(values) - np.asarray(spread[label])
            ax.fill_between(x, low, np.asarray(values) + np.asarray(spread[label]), alpha=0.15)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("number of tasks learned")
    ax.set_ylabel("average accuracy")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def histograms(
    series: Mapping[str, Mapping[str, Sequence[int]]],
    title: str,
    xlabel: str = "importance / layer max",
) -> Figure:
    """One panel per layer; each panel overlays the labelled histograms of that layer.

    ``series[label][layer]`` holds counts over equal bins of [0, 1] (see :func:`afmbench.reporting.histogram_counts`);
    counts are shown as fractions so layers and runs of different sizes compare.
    """
    layers = sorted({layer for per_layer in series.values() for layer in per_layer})
    cols = min(3, max(1, len(layers)))
    rows = -(-len(layers) // cols) if layers else 1
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.4 * rows), dpi=100, squeeze=False)
    for ax, layer in zip(axes.flat, layers):
        shown = []
        for label, per_layer in series.items():
            if layer in per_layer:
                counts = np.asarray(per_layer[layer], dtype=float)
                shown.append(counts / max(counts.sum(), 1))
                edges = np.linspace(0, 1, len(counts) + 1)
                ax.stairs(shown[-1], edges, label=label, fill=len(series) == 1, alpha=0.8)
        ax.set_title(layer, fontsize=8)
        _decade_log_axis(ax, np.concatenate(shown))
        ax.xaxis.set_major_locator(MaxNLocator(4))
        ax.set_xlabel(xlabel, fontsize=7)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(layers) :]:
        ax.axis("off")
    if len(series) > 1:
        axes.flat[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    # fixed margins in inches: tight_layout measures every tick label and took most of the time
    width, height = fig.get_size_inches()
    fig.subplots_adjust(left=0.65 / width, right=1 - 0.15 / width, bottom=0.5 / height,
                        top=1 - 0.55 / height, wspace=0.35, hspace=0.75)  # fmt: skip
    return fig


def _decade_log_axis(ax: Axes, fractions: np.ndarray) -> None:
    """Log y axis spanning whole decades with one tick per decade and no minor ticks, so that
    every panel shows at least two labels and draws only a handful of tick artists."""
    positive = fractions[fractions > 0]
    low = np.floor(np.log10(positive.min())) if positive.size else -3.0
    high = max(np.ceil(np.log10(positive.max())), low + 1) if positive.size else 0.0
    ax.set_yscale("log")
    ax.set_ylim(10**low, 10**high)
    ax.yaxis.set_major_locator(LogLocator(numticks=5))
    ax.yaxis.set_minor_locator(NullLocator())


def save(fig: Figure, path: Path) -> None:
    """Write ``fig`` as a PNG and free it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def png_bytes(fig: Figure) -> bytes:
    """``fig`` as PNG bytes (for embedding in HTML), and free it."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()
