"""What a run has done so far, and the files that keep it current in the run folder.

After every experience the checkpoint, the accuracy matrix so far and ``metrics.json`` are
rewritten (by the first process only), so an interrupted run loses at most the experience in
progress; a failed or interrupted run is recorded as such without touching what earlier
experiences wrote.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from lightning.pytorch import Trainer

from afmbench.checkpoint import checkpoint_path
from afmbench.errors import AfmbenchError, Interrupted
from afmbench.metrics import format_report, summarize
from afmbench.module import ContinualModule
from afmbench.reporting import RunReporter
from afmbench.run_folder import write_json, write_matrix_csv
from afmbench.versions import versions

log = logging.getLogger("afmbench")


@dataclass
class RunResult:
    """What a run produced. ``accuracy_matrix`` has one row per trained experience."""

    accuracy_matrix: np.ndarray
    baseline_accuracy: np.ndarray
    metrics: dict[str, Any]
    run_dir: Path | None = None
    module: ContinualModule | None = field(default=None, repr=False)

    def report(self) -> str:
        return format_report(self.accuracy_matrix, self.metrics)


@dataclass
class RunRecord:
    """The run's identity fields, its timings and untrained baseline, and its folder."""

    record: dict[str, Any]
    folder: Path | None
    keep_checkpoints: bool
    reporter: RunReporter
    baseline: np.ndarray | None = None
    logged_steps: int = 0  # training steps of the finished experiences (loggers' step axis)
    train_s: list[float] = field(default_factory=list)
    eval_s: list[float] = field(default_factory=list)

    @property
    def done(self) -> int:
        """Experiences finished so far (a resumed run starts after them)."""
        return len(self.train_s)

    @property
    def joint(self) -> bool:
        return self.record["strategy"] == "joint"

    def metrics(self, module: ContinualModule, status: str, error: str | None = None):
        matrix, held_out = module.accuracies(slice(1, self.done + 1))
        summary = summarize(matrix, self.baseline) if self.done else {}
        metrics = {
            **self.record,
            "status": status,
            "error": error,
            "experiences_done": self.done,
            "accuracy_matrix": matrix,
            "baseline_accuracy": self.baseline,
            **summary,
            "train_time_s": float(sum(self.train_s)),
            "eval_time_s": float(sum(self.eval_s)),
            "timings": {"train_s": self.train_s, "eval_s": self.eval_s},
            "versions": versions(),
        }
        extra = {p.name: p.run_metrics() for p in module.plugins()}
        if any(extra.values()):
            metrics["plugins"] = {name: values for name, values in extra.items() if values}
        if held_out is not None:  # tuned on validation, reported on test
            validation = summarize(held_out) if self.done else {}
            metrics.update(val_accuracy_matrix=held_out, val_acc=validation.get("acc"),
                           val_bwt=validation.get("bwt"))  # fmt: skip
        return matrix, metrics

    def loop_state(self, step: int) -> dict[str, Any]:
        """What a checkpoint keeps of the loop (plain values: a weights-only load reads it)."""
        return {
            "step": step,
            "config_hash": self.record["config_hash"],
            "baseline": np.asarray(self.baseline).tolist(),
            "train_s": self.train_s,
            "eval_s": self.eval_s,
            "logged_steps": self.logged_steps,
        }

    def restore(self, loop: dict[str, Any]) -> None:
        """Continue from a checkpoint's :meth:`loop_state`."""
        self.baseline = np.asarray(loop["baseline"])
        self.train_s, self.eval_s = list(loop["train_s"]), list(loop["eval_s"])
        self.logged_steps = int(loop.get("logged_steps", 0))  # 0: a checkpoint older than it

    def save(self, module: ContinualModule, trainer: Trainer, step: int) -> None:
        """After an experience: checkpoint, then the matrix and metrics so far (rank 0 writes)."""
        matrix, metrics = self.metrics(module, "running")
        if self.folder is None:
            return
        module.loop_state = self.loop_state(step)
        path = checkpoint_path(self.folder, step)
        checkpoints = path.parent
        tmp = checkpoints / f".experience_{step}.ckpt.tmp"
        trainer.save_checkpoint(tmp, weights_only=False)
        if trainer.is_global_zero:
            tmp.replace(path)
            if not self.keep_checkpoints:
                for old in checkpoints.glob("experience_*.ckpt"):
                    if old != path:
                        old.unlink()
            write_matrix_csv(self.folder / "accuracy_matrix.csv", matrix, self.joint)
            write_json(self.folder / "metrics.json", metrics)
        trainer.strategy.barrier()

    def report(self, module: ContinualModule, trainer: Trainer, step: int, plugins) -> None:
        """Experience-level results to the loggers (rank 0 only; importances agree on every
        rank)."""
        if trainer.is_global_zero:
            matrix, held_out = module.accuracies(slice(1, step + 2))
            # the tasks learned so far: every task for a joint run's one row
            curve = [
                float(np.mean(row if self.joint else row[: i + 1])) for i, row in enumerate(matrix)
            ]
            self.reporter.after_experience(
                step, matrix, curve, plugins, self.logged_steps, held_out
            )

    def fail(
        self,
        module: ContinualModule,
        error: Exception,
        trainer: Trainer,
        status: str = "failed",
    ) -> None:
        """Record a failed (or interrupted) run without touching what earlier experiences wrote.
        Best effort: the error that stopped the run (a full disk, say) is the one to report."""
        if self.folder is None or not trainer.is_global_zero:
            return
        message = (
            str(error) if isinstance(error, AfmbenchError) else f"{type(error).__name__}: {error}"
        )
        try:
            _, metrics = self.metrics(module, status, message)
            write_json(self.folder / "metrics.json", metrics)
        except Exception as unrecorded:
            log.warning("could not record the run as %s: %s", status, unrecorded)

    def interrupted(self, module: ContinualModule, trainer: Trainer, steps: int) -> Interrupted:
        """Record a run stopped by Ctrl-C (status ``interrupted``) and say how to continue."""
        problem = f"interrupted during experience {self.done + 1}/{steps}"
        if self.done and self.folder is not None:
            resume = f"continue with: afmbench run resume={self.folder}"
            error = Interrupted(f"{problem}; the {self.done} finished are kept", resume)
        else:  # no checkpoint to resume from
            error = Interrupted(problem, "run it again")
        self.fail(module, error, trainer, status="interrupted")
        return error

    def finish(self, module: ContinualModule, trainer: Trainer, verbose: bool) -> RunResult:
        matrix, metrics = self.metrics(module, "finished")
        if trainer.is_global_zero:
            metrics.update(self.reporter.finish(metrics, matrix))
            if self.folder is not None:
                write_matrix_csv(self.folder / "accuracy_matrix.csv", matrix, self.joint)
                write_json(self.folder / "metrics.json", metrics)
        result = RunResult(matrix, self.baseline, metrics, self.folder, module)
        if verbose and trainer.is_global_zero:
            print(result.report(), flush=True)
        return result
