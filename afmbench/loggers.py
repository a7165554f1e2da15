"""Experiment loggers: Weights & Biases (offline unless asked otherwise) or a CSV file.

Every experience is its own ``Trainer.fit``, so Lightning's step counter restarts at zero each
time; :class:`_ContinuousSteps` offsets the steps a logger sees so curves run on across
experiences. W&B never blocks a run: without an API key or a reachable server an online
request falls back to offline mode with a warning, and ``wandb sync`` uploads later.
"""

from __future__ import annotations

import csv
import os
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities import rank_zero_only

from afmbench.errors import AfmbenchWarning, ConfigError

WANDB_MODES = ("offline", "online", "disabled")


class _ContinuousSteps:
    """Adds ``step_offset`` (the steps of earlier experiences) to every logged step."""

    step_offset = 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        super().log_metrics(metrics, None if step is None else step + self.step_offset)  # type: ignore[misc]

    def continue_from(self, steps: int) -> None:
        """A resumed run: log on after the ``steps`` training steps its checkpoint covers."""
        self.step_offset = steps


class ContinualWandbLogger(_ContinuousSteps, WandbLogger):
    """Lightning's WandbLogger whose step counts across experiences."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # Lightning always passes `anonymous`, which current W&B only warns about.
        self._wandb_init.pop("anonymous", None)


class ContinualCSVLogger(_ContinuousSteps, CSVLogger):
    """Lightning's CSVLogger whose step counts across experiences, and which a resumed run
    continues (Lightning's deletes an existing ``metrics.csv``)."""

    def continue_from(self, steps: int) -> None:
        """Keep the rows up to step ``steps`` (the checkpoint's experiences and their
        evaluation), drop those of the interrupted experience, and append after them."""
        super().continue_from(steps)
        self._keep_rows_until(steps)

    @rank_zero_only
    def _keep_rows_until(self, steps: int) -> None:
        path = Path(self.log_dir) / ExperimentWriter.NAME_METRICS_FILE
        if path.is_file():
            with path.open(newline="") as file:
                reader = csv.DictReader(file)
                rows = [r for r in reader if r.get("step") and float(r["step"]) <= steps]
                fields = reader.fieldnames or []
            with path.open("w", newline="") as file:
                writer = csv.DictWriter(file, fieldnames=fields)
                writer.writeheader()
                writer.writerows(rows)
        self._fs.makedirs(self.root_dir, exist_ok=True)
        self._experiment = _ContinuedWriter(self.log_dir)


class _ContinuedWriter(ExperimentWriter):
    """Lightning's CSV writer, appending to the ``metrics.csv`` already in its folder."""

    def _check_log_dir_exists(self) -> None:
        if Path(self.metrics_file_path).is_file():
            with open(self.metrics_file_path, newline="") as file:
                self.metrics_keys = sorted(csv.DictReader(file).fieldnames or [])


def make_logger(spec: dict[str, Any], folder: Path, group: str | None = None) -> Logger | None:
    """The logger ``spec`` (the ``logger`` config node) asks for; None for ``logger=none``."""
    name = spec.get("name", "none")
    if name == "none":
        return None
    if name == "csv":
        return ContinualCSVLogger(save_dir=str(folder), name="csv", version="")
    if name != "wandb":
        raise ConfigError(f"unknown logger '{name}'", "use logger=wandb, logger=csv or logger=none")
    import wandb

    mode = wandb_mode(spec.get("mode"))
    return ContinualWandbLogger(
        project=spec.get("project") or "afmbench",
        entity=spec.get("entity"),
        group=spec.get("group") or group,
        tags=list(spec.get("tags") or []),
        name=spec.get("run_name"),
        save_dir=str(folder),
        mode=mode,
        settings=wandb.Settings(silent=True),  # afmbench prints where the run went, once
    )


def requested_wandb_mode(requested: str | None) -> str:
    """``logger.mode``, else ``$WANDB_MODE``, else offline: checked, not yet tried."""
    mode = (requested or os.environ.get("WANDB_MODE") or "offline").lower()
    if mode not in WANDB_MODES:
        source = "logger.mode" if requested else "the environment's WANDB_MODE"
        raise ConfigError(
            f"{source}={mode} is not a W&B mode", f"use one of {', '.join(WANDB_MODES)}"
        )
    return mode


def wandb_mode(requested: str | None) -> str:
    """The requested mode (:func:`requested_wandb_mode`); online only when it can work."""
    mode = requested_wandb_mode(requested)
    if mode != "online":
        return mode
    problem = _online_problem()
    if problem:
        warnings.warn(
            f"W&B: {problem}; logging offline instead (upload later with `wandb sync`)",
            AfmbenchWarning,
            stacklevel=2,
        )
        return "offline"
    return mode


def _online_problem(timeout: float = 3.0) -> str | None:
    """Why online logging would fail or hang (no credentials, no route to the server), or None."""
    if not (os.environ.get("WANDB_API_KEY") or _netrc_has_key()):
        return "no API key (run `wandb login` or set WANDB_API_KEY)"
    base = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").rstrip("/")
    try:
        urllib.request.urlopen(f"{base}/healthz", timeout=timeout).close()
    except urllib.error.HTTPError:
        return None  # the server answered, even if not with 200
    except (OSError, ValueError) as exc:  # DNS, refused, timeout, TLS: no usable route
        reason = getattr(exc, "reason", exc)
        return f"cannot reach {urlparse(base).hostname} ({str(reason)[:80]})"
    return None


def _netrc_has_key() -> bool:
    import netrc

    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        return False
