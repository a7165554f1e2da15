"""The run folder: what a finished (or failed) run leaves behind, written so nothing is half-done.

Every file is written to a temporary name and renamed into place, so a run killed at any
moment leaves either the previous version of a file or the new one.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from afmbench.errors import ConfigError

VERSIONED_PACKAGES = ("afmbench", "torch", "lightning", "torchmetrics", "avalanche-lib", "numpy")


def prepare_run_dir(
    path: str | os.PathLike, option: str = "run_dir", example: str = "run_dir=runs/my-run"
) -> Path:
    """Create the run folder (or another output folder, named ``option`` in the error) and
    prove it is writable before any work starts."""
    run_dir = Path(path).expanduser()
    probe = run_dir / ".write-test"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(
            f"{option} {run_dir} is not writable ({exc.strerror or exc})",
            f"pass a folder you can write to, e.g. {example}",
        ) from exc
    return run_dir


def holds_run(folder: Path) -> bool:
    """Whether ``folder`` holds (part of) a run: its metrics or a checkpoint."""
    return (folder / "metrics.json").is_file() or any(
        (folder / "checkpoints").glob("experience_*.ckpt")
    )


def check_new_run_dir(folder: str | os.PathLike) -> None:
    """Refuse to start a run in a folder that holds another: its figures and checkpoints would
    mix with the new run's, and its record would be overwritten."""
    folder = Path(folder).expanduser()
    if holds_run(folder):
        raise ConfigError(
            f"run_dir {folder} already holds a run",
            f"continue it with resume={folder}, or choose another run_dir (or delete that folder)",
        )


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` in one rename."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, data: dict[str, Any]) -> None:
    write_atomic(path, json.dumps(data, indent=2, default=_jsonable) + "\n")


def row_labels(n_rows: int, joint: bool) -> list[str]:
    """Names of the accuracy matrix's rows: the experience just trained, or ``joint``."""
    return ["joint"] if joint else [f"experience_{i}" for i in range(n_rows)]


def write_matrix_csv(path: Path, matrix: np.ndarray, joint: bool = False) -> None:
    """Rows are "after experience i" (or the one joint model), columns "task j"."""
    lines = ["after," + ",".join(f"task_{j}" for j in range(matrix.shape[1]))]
    for label, row in zip(row_labels(len(matrix), joint), matrix):
        lines.append(label + "," + ",".join("" if np.isnan(v) else f"{v:.6f}" for v in row))
    write_atomic(path, "\n".join(lines) + "\n")


def versions() -> dict[str, str]:
    """Versions of Python, the platform and the packages that decide a result."""
    found = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in VERSIONED_PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


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


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")
