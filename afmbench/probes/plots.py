"""One PNG per probe, drawn from the probe's JSON result (matplotlib, Agg backend)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

Result = dict[str, Any]


def _panels(n: int, title: str):
    figure, axes = plt.subplots(1, n, figsize=(3.6 * n, 3.2), squeeze=False)
    figure.suptitle(title)
    return figure, axes[0]


def _save(figure, path: Path) -> None:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _band(ax, x, result: Result, prefix: str, label: str, color: str) -> None:
    mean, std = np.array(result[f"{prefix}_mean"]), np.array(result[f"{prefix}_std"])
    ax.plot(x, mean, color=color, label=label)
    ax.fill_between(x, mean - std, mean + std, color=color, alpha=0.25)


def plot_sparsity(result: Result, path: Path) -> None:
    layers = result["layers"]
    figure, (ax,) = _panels(1, f"sparsity (eq. 1, {result['normalization']})")
    values = [layers[k]["sparsity"] or 0.0 for k in layers]
    ax.bar(range(len(values)), values)
    ax.set_xticks(range(len(values)), list(layers), rotation=30)
    ax.set_ylim(0, 1)
    ax.set_ylabel("sparsity")
    _save(figure, path)


def plot_importance(result: Result, path: Path) -> None:
    layers = result["layers"]
    edges = np.array(result["edges"])
    figure, axes = _panels(len(layers), f"neuron importance ({result['importance_source']})")
    for ax, (key, layer) in zip(axes, layers.items()):
        ax.bar(edges[:-1], layer["counts"], width=np.diff(edges), align="edge")
        ax.set_title(key)
        ax.set_xlabel("importance")
    axes[0].set_ylabel("units")
    _save(figure, path)


def plot_ablation(result: Result, path: Path) -> None:
    groups = result["groups"]
    x = result["fractions"]
    figure, axes = _panels(len(groups), "unit ablation")
    for ax, (key, curves) in zip(axes, groups.items()):
        ax.plot(x, curves["ascending"], label="least important first")
        ax.plot(x, curves["descending"], label="most important first")
        _band(ax, x, curves, "random", f"random (x{result['repeats']})", "tab:red")
        ax.set_title(key)
        ax.set_xlabel("fraction of units removed")
    axes[0].set_ylabel("test accuracy")
    axes[0].legend(fontsize=7)
    _save(figure, path)


def plot_pruning(result: Result, path: Path) -> None:
    x = result["fractions"]
    figure, (ax,) = _panels(1, "weight pruning")
    ax.plot(x, result["importance"], label="eq. 2 importance")
    _band(ax, x, result, "random", f"random (x{result['repeats']})", "tab:red")
    ax.set_xlabel("fraction of body weights pruned")
    ax.set_ylabel("test accuracy")
    ax.legend(fontsize=7)
    _save(figure, path)


def plot_perturbation(result: Result, path: Path) -> None:
    layers = result["layers"]
    x = result["fractions"]
    figure, axes = _panels(len(layers), f"perturbation (noise {result['noise']} x weight std)")
    for ax, (key, curves) in zip(axes, layers.items()):
        _band(ax, x, curves, "accuracy", f"x{result['repeats']}", "tab:blue")
        ax.set_title(key)
        ax.set_xlabel("fraction of units perturbed")
    axes[0].set_ylabel("test accuracy")
    _save(figure, path)


PLOTS: dict[str, Callable[[Result, Path], None]] = {
    "sparsity": plot_sparsity,
    "importance": plot_importance,
    "ablation": plot_ablation,
    "pruning": plot_pruning,
    "perturbation": plot_perturbation,
}
