"""The accuracy matrix and the continual-learning metrics derived from it.

``R[i, j]`` is the test accuracy on task ``j`` after training experience ``i``. The counts
behind it live in a torchmetrics :class:`AccuracyMatrix`, so they are summed across DDP
processes before any ratio is taken and are saved in checkpoints with the module.
Definitions (T tasks, ``b_j`` the accuracy of the untrained model on task ``j``):

- ACC = mean_j R[T-1, j]; average accuracy after task i = mean_{j<=i} R[i, j]
- BWT = mean_{j<T-1} (R[T-1, j] - R[j, j])
- forgetting f_j = max_{l<T-1} R[l, j] - R[T-1, j], for j < T-1
- FWT = mean_{j>0} (R[j-1, j] - b_j)
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric


class AccuracyMatrix(Metric):
    """Correct and total counts per (row, test task); row 0 is the untrained model.

    ``update(preds, target, row, task)`` adds one batch; ``compute()`` returns the accuracy
    matrix with rows ``0..n_rows-1`` (NaN where nothing was evaluated). It is a record of the
    whole run, so nothing resets it between evaluations.

    Under DDP each process counts its share of the test sets and ``compute`` sums them.
    Checkpoints hold the sum (:meth:`global_counts`); every process of a resumed run loads it,
    so restored counts are kept apart from the live ones and added once, after the sync.
    """

    full_state_update = False

    def __init__(self, n_rows: int, n_tasks: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        shape = (n_rows, n_tasks)
        self.add_state("correct", torch.zeros(shape, dtype=torch.long), "sum", persistent=True)
        self.add_state("total", torch.zeros(shape, dtype=torch.long), "sum", persistent=True)
        self.register_buffer("restored_correct", torch.zeros(shape, dtype=torch.long), False)
        self.register_buffer("restored_total", torch.zeros(shape, dtype=torch.long), False)

    def update(self, preds: Tensor, target: Tensor, row: int, task: int) -> None:  # type: ignore[override]
        self.correct[row, task] += (preds == target).sum()
        self.total[row, task] += target.numel()

    def global_counts(self) -> tuple[Tensor, Tensor]:
        """``(correct, total)`` over all processes, restored counts included (under DDP a
        collective call: every rank must make it)."""
        with self.sync_context():  # a no-op in one process
            return self.correct + self.restored_correct, self.total + self.restored_total

    def _load_from_state_dict(self, state_dict, prefix, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        for live, restored in ((self.correct, self.restored_correct),
                               (self.total, self.restored_total)):  # fmt: skip
            restored.copy_(live)
            live.zero_()
        # Restored counts are real updates: computing from them is expected, not an error.
        self._update_count = int(self.restored_total.sum() > 0)

    def compute(self) -> Tensor:
        correct = self.correct + self.restored_correct
        total = (self.total + self.restored_total).to(torch.float64)
        return torch.where(total > 0, correct / total.clamp(min=1), torch.nan)


def summarize(matrix: np.ndarray, baseline: np.ndarray | None = None) -> dict[str, Any]:
    """ACC, BWT, FWT, forgetting and average accuracy per task count from an accuracy matrix.

    ``matrix`` has one row per trained experience (T x T for a sequence; 1 x T for ``joint``,
    whose BWT, FWT and forgetting are undefined and reported as ``None``).
    """
    R = np.asarray(matrix, dtype=float)
    n_rows, n_tasks = R.shape
    result: dict[str, Any] = {
        "acc": float(np.mean(R[-1])),
        "avg_acc_per_task": [
            float(np.mean(R[min(i, n_rows - 1), : i + 1])) for i in range(n_tasks)
        ],
        "bwt": None,
        "fwt": None,
        "forgetting": None,
        "forgetting_per_task": None,
    }
    if n_rows == n_tasks and n_tasks > 1:
        last = R[-1]
        result["bwt"] = float(np.mean([last[j] - R[j, j] for j in range(n_tasks - 1)]))
        per_task = [float(np.max(R[: n_tasks - 1, j]) - last[j]) for j in range(n_tasks - 1)]
        result["forgetting_per_task"] = per_task
        result["forgetting"] = float(np.mean(per_task))
        if baseline is not None:
            b = np.asarray(baseline, dtype=float)
            result["fwt"] = float(np.mean([R[j - 1, j] - b[j] for j in range(1, n_tasks)]))
    return result


def row_labels(n_rows: int, joint: bool) -> list[str]:
    """Names of the accuracy matrix's rows: the experience just trained, or ``joint``."""
    return ["joint"] if joint else [f"experience_{i}" for i in range(n_rows)]


def format_report(matrix: np.ndarray, metrics: dict[str, Any]) -> str:
    """The accuracy matrix and the headline metrics as a plain-text table."""
    head = "after \\ task " + " ".join(f"{j:>6d}" for j in range(matrix.shape[1]))
    lines = ["Accuracy matrix R[i, j] (test accuracy on task j after training experience i)", head]
    labels = row_labels(len(matrix), metrics.get("strategy") == "joint")
    for label, row in zip(labels, matrix):
        lines.append(
            f"{label.replace('experience_', 'exp '):>12s} " + " ".join(f"{v:6.3f}" for v in row)
        )
    lines.append("")
    rows = [
        ("ACC", metrics.get("acc")),
        ("BWT", metrics.get("bwt")),
        ("FWT", metrics.get("fwt")),
        ("forgetting", metrics.get("forgetting")),
        ("train time (s)", metrics.get("train_time_s")),
    ]
    width = max(len(k) for k, _ in rows)
    lines.append(f"{'metric':<{width}}  value")
    for key, value in rows:
        shown = (
            "n/a"
            if value is None
            else f"{value:.4f}"
            if key != "train time (s)"
            else f"{value:.1f}"
        )
        lines.append(f"{key:<{width}}  {shown}")
    curve = metrics.get("avg_acc_per_task") or []
    lines.append(f"{'avg acc per task':<{width}}  " + " ".join(f"{v:.3f}" for v in curve))
    return "\n".join(lines)
