"""What a run reports as it goes: W&B media after every experience, PNGs in the run folder.

After each experience the accuracy matrix so far goes to W&B as a ``wandb.Table`` and a
heatmap, with the average accuracy over the tasks seen, and every plugin's importance as one
``wandb.Histogram`` per layer (values divided by the layer's maximum, so layers and methods
compare on [0, 1]); a forgetting layer adds its gate states and per-layer sparsity. At the end
the summary gets ACC, BWT, FWT, forgetting and the training time, and the same figures are
written to ``<run_dir>/plots/`` so nothing needs W&B to be seen.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.loggers import Logger, WandbLogger

from afmbench import plots
from afmbench.metrics import row_labels
from afmbench.plugin import ContinualPlugin

SUMMARY_KEYS = ("acc", "bwt", "fwt", "forgetting", "train_time_s")


def scaled(values: torch.Tensor) -> np.ndarray:
    """Importance divided by its maximum (all zeros stay zeros)."""
    array = values.detach().float().flatten().cpu().numpy()
    peak = float(np.max(np.abs(array))) if array.size else 0.0
    return np.abs(array) / peak if peak > 0 else np.abs(array)


def importance_histograms(plugins: Sequence[ContinualPlugin]) -> dict[str, dict[str, list[int]]]:
    """``{plugin: {parameter: counts}}`` of every plugin's current importance."""
    found = {}
    for plugin in plugins:
        per_layer = {
            name: plots.histogram_counts(scaled(value))
            for name, value in plugin.importance().items()
        }
        if per_layer:
            found[plugin.name] = per_layer
    return found


def gate_histograms(plugins: Sequence[ContinualPlugin]) -> dict[str, list[int]]:
    """Histograms of the forgetting layer's per-sample gate states per layer, if there is one
    (polarized switches pile up near 0 and 1)."""
    for plugin in plugins:
        if getattr(plugin, "is_forgetting_layer", False):
            return {
                layer: plots.histogram_counts(values.detach().float().flatten().cpu().numpy())
                for layer, values in plugin.gate_states().items()
            }
    return {}


def layer_sparsity(plugins: Sequence[ContinualPlugin]) -> dict[str, float | None]:
    """The forgetting layer's per-layer sparsity (AFM eq. 1), if there is one."""
    for plugin in plugins:
        if getattr(plugin, "is_forgetting_layer", False):
            return plugin.layer_sparsity()
    return {}


class RunReporter:
    """Sends experience-level results to W&B (rank 0) and draws the run folder's figures."""

    def __init__(self, folder: Path | None, logger: Logger | None, joint: bool) -> None:
        self.folder = folder
        self.logger = logger if isinstance(logger, WandbLogger) else None
        self.scalars_logger = logger  # any Lightning logger (CSV too) gets the scalars
        self.joint = joint
        self.importance: list[dict[str, dict[str, list[int]]]] = []
        self.gates: list[dict[str, list[int]]] = []
        self.sparsity: dict[str, float | None] = {}

    def after_experience(
        self,
        step: int,
        matrix: np.ndarray,
        curve: list[float],
        plugins: Sequence[ContinualPlugin],
        global_step: int,
    ) -> None:
        self.importance.append(importance_histograms(plugins))
        self.gates.append(gate_histograms(plugins))
        self.sparsity = layer_sparsity(plugins)
        scalars = {
            "eval/tasks_learned": step + 1,
            "eval/avg_acc": curve[step] if step < len(curve) else curve[-1],
            **{f"eval/acc_task_{j}": float(a) for j, a in enumerate(matrix[-1])},
        }
        if self.logger is None:
            if self.scalars_logger is not None:
                # the loggers of afmbench.loggers add their own offset of earlier experiences
                offset = getattr(self.scalars_logger, "step_offset", 0)
                self.scalars_logger.log_metrics(scalars, step=global_step - offset)
                self.scalars_logger.save()
            return
        import wandb

        edges = np.linspace(0, 1, plots.HISTOGRAM_BINS + 1)
        data: dict[str, Any] = {
            "trainer/global_step": global_step,
            **scalars,
            "eval/accuracy_matrix": wandb.Table(
                columns=["after"] + [f"task_{j}" for j in range(matrix.shape[1])],
                data=[
                    [label, *map(float, row)]
                    for label, row in zip(row_labels(len(matrix), self.joint), matrix)
                ],
            ),
            "eval/accuracy_heatmap": wandb.Image(plots.accuracy_heatmap(matrix, joint=self.joint)),
            "eval/avg_acc_vs_tasks": wandb.plot.line_series(
                xs=list(range(1, len(curve) + 1)),
                ys=[curve],
                keys=["avg acc"],
                title="average accuracy vs number of tasks",
                xname="tasks learned",
            ),  # fmt: skip
        }
        for plugin, per_layer in self.importance[-1].items():
            for layer, counts in per_layer.items():
                data[f"importance/{plugin}/{layer}"] = wandb.Histogram(np_histogram=(counts, edges))
        for layer, counts in self.gates[-1].items():
            data[f"gates/{layer}"] = wandb.Histogram(np_histogram=(counts, edges))
        for layer, value in self.sparsity.items():
            if value is not None:
                data[f"sparsity/{layer}"] = value
        self.logger.experiment.log(data)
        import matplotlib.pyplot as plt

        plt.close("all")

    def finish(self, metrics: dict[str, Any], matrix: np.ndarray) -> dict[str, Any]:
        """Summary to W&B, figures to the run folder; returns what ``metrics.json`` should add."""
        extra = {
            "importance_histograms": self.importance[-1] if self.importance else {},
            "gate_histograms": self.gates[-1] if self.gates else {},
            "layer_sparsity": self.sparsity,
        }
        if self.logger is not None:
            summary = {
                key: metrics.get(key) for key in SUMMARY_KEYS if metrics.get(key) is not None
            }
            self.logger.experiment.summary.update(summary)
        if self.folder is not None and len(matrix):
            self.draw(self.folder / "plots", metrics, matrix, extra)
        return extra

    def draw(
        self, where: Path, metrics: dict[str, Any], matrix: np.ndarray, extra: dict[str, Any]
    ) -> None:
        title = f"{metrics.get('scenario')} / {metrics.get('strategy')}"
        plots.save(
            plots.accuracy_heatmap(matrix, title, joint=self.joint), where / "accuracy_matrix.png"
        )
        plots.save(plots.accuracy_curves({metrics.get("strategy", "run"): metrics["avg_acc_per_task"]}),
                   where / "avg_accuracy.png")  # fmt: skip
        for plugin, per_layer in extra["importance_histograms"].items():
            plots.save(plots.histograms({plugin: per_layer}, f"{plugin} importance per layer"),
                       where / f"importance_{plugin}.png")  # fmt: skip
        if extra["gate_histograms"]:
            plots.save(plots.histograms({"gates": extra["gate_histograms"]}, "gate states per layer", "gate"),
                       where / "gates.png")  # fmt: skip
