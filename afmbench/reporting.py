"""What a run reports as it goes: W&B media after every experience, PNGs in the run folder.

After each experience the accuracy matrix so far goes to W&B as a ``wandb.Table`` and a
heatmap, with the average accuracy over the tasks seen, and every plugin's importance as one
``wandb.Histogram`` per layer (values divided by the layer's maximum, so layers and methods
compare on [0, 1]); a forgetting layer adds its gate states and per-layer sparsity. At the end
the summary gets ACC, BWT, FWT, forgetting and the training time. ``metrics.json`` keeps the
histograms' counts; :func:`draw_figures` turns a run's metrics into the PNGs of
``<run_dir>/plots/`` (at the end of the run with ``figures=true``, or later with ``afmbench
plot``), so nothing needs W&B to be seen. Drawing them costs a short run more than all its
other bookkeeping together (matplotlib lays out every tick label), so it is not on by default.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.loggers import Logger, WandbLogger

from afmbench.metrics import row_labels
from afmbench.plugin import ContinualPlugin

SUMMARY_KEYS = ("acc", "bwt", "fwt", "forgetting", "train_time_s")
HISTOGRAM_BINS = 20
# W&B metric families logged once per experience, charted against the tasks learned
EXPERIENCE_METRICS = ("eval/*", "importance/*", "gates/*", "sparsity/*")


def histogram_counts(values: np.ndarray, bins: int = HISTOGRAM_BINS) -> list[int]:
    """Counts of ``values`` (already scaled to [0, 1]) in ``bins`` equal bins."""
    counts, _ = np.histogram(np.clip(values, 0, 1), bins=bins, range=(0, 1))
    return counts.tolist()


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
            name: histogram_counts(scaled(value)) for name, value in plugin.importance().items()
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
                layer: histogram_counts(values.detach().float().flatten().cpu().numpy())
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

    def __init__(
        self, folder: Path | None, logger: Logger | None, joint: bool, figures: bool = False
    ) -> None:
        self.folder = folder
        self.figures = figures
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
        held_out: np.ndarray | None = None,
    ) -> None:
        """Log experience ``step``'s results: its row of the test (and validation) accuracy
        matrix, the average accuracy so far, and the plugins' histograms."""
        self.importance.append(importance_histograms(plugins))
        self.gates.append(gate_histograms(plugins))
        self.sparsity = layer_sparsity(plugins)
        scalars = {
            "eval/tasks_learned": step + 1,
            "eval/avg_acc": curve[step] if step < len(curve) else curve[-1],
            **{f"eval/acc_task_{j}": float(a) for j, a in enumerate(matrix[-1])},
        }
        if held_out is not None:
            seen = held_out[-1][: len(held_out)] if not self.joint else held_out[-1]
            scalars["eval/val_avg_acc"] = float(np.mean(seen))
            scalars.update({f"eval/val_acc_task_{j}": float(a) for j, a in enumerate(held_out[-1])})
        if self.logger is None:
            if self.scalars_logger is not None:
                # the loggers of afmbench.loggers add their own offset of earlier experiences
                offset = getattr(self.scalars_logger, "step_offset", 0)
                self.scalars_logger.log_metrics(scalars, step=global_step - offset)
                self.scalars_logger.save()
            return
        import wandb

        from afmbench import plots  # matplotlib, only for W&B's heatmap

        if len(self.importance) == 1:  # this process's first report (a resumed run's too)
            define_task_axis(self.logger.experiment)
        edges = np.linspace(0, 1, HISTOGRAM_BINS + 1)
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
        if self.figures and self.folder is not None and len(matrix):
            draw_figures(self.folder, {**metrics, **extra})
        return extra


def define_task_axis(run: Any) -> None:
    """Draw W&B's experience-level charts against the number of tasks learned, not W&B's
    internal step (the per-step training curves keep Lightning's ``trainer/global_step``)."""
    run.define_metric("eval/tasks_learned")
    for family in EXPERIENCE_METRICS:
        run.define_metric(family, step_metric="eval/tasks_learned")


def draw_figures(folder: Path, metrics: dict[str, Any]) -> list[Path]:
    """Write a run's PNGs to ``folder/plots/`` from its metrics (what ``metrics.json`` holds):
    the accuracy heatmap, the average-accuracy curve, each plugin's importance histograms and
    the forgetting layer's gate states. Returns the files written."""
    from afmbench import plots  # matplotlib: imported only to draw

    where = folder / "plots"
    matrix = np.asarray(metrics["accuracy_matrix"], dtype=float)
    strategy = metrics.get("strategy", "run")
    figures = {
        "accuracy_matrix.png": plots.accuracy_heatmap(
            matrix, f"{metrics.get('scenario')} / {strategy}", joint=strategy == "joint"
        ),
        "avg_accuracy.png": plots.accuracy_curves({strategy: metrics["avg_acc_per_task"]}),
    }
    for plugin, per_layer in metrics.get("importance_histograms", {}).items():
        figures[f"importance_{plugin}.png"] = plots.histograms(
            {plugin: per_layer}, f"{plugin} importance per layer"
        )
    if metrics.get("gate_histograms"):
        figures["gates.png"] = plots.histograms(
            {"gates": metrics["gate_histograms"]}, "gate states per layer", "gate"
        )
    for name, figure in figures.items():
        plots.save(figure, where / name)
    return [where / name for name in figures]
