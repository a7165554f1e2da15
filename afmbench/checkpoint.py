"""The checkpoint written after each experience, and reading it back safely.

A checkpoint is a Lightning checkpoint (module weights including the accuracy-matrix counts,
every plugin's ``state_dict`` under ``callbacks``) plus an ``afmbench`` entry with the loop's
own state: the last finished step, the untrained baseline, timings, the optimizer state and
the config hash. It holds only what a weights-only load accepts (tensors, numbers, strings,
lists and dicts), and is read with ``weights_only=True``: loading a run folder someone shared
runs none of its code. Anything unreadable is a :class:`CheckpointError`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from afmbench.errors import CheckpointError, first_line

CHECKPOINT = re.compile(r"experience_(\d+)\.ckpt$")


def checkpoint_path(folder: Path, step: int) -> Path:
    return folder / "checkpoints" / f"experience_{step}.ckpt"


def load_checkpoint(path: Path, mmap: bool = False) -> dict[str, Any]:
    """Read a checkpoint, turning truncation and corruption into one clear error.

    ``mmap=True`` maps tensors instead of reading them: cheap when only the loop state is needed.
    """
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # a refused type, a truncated zip, an unreadable file...
        if "Weights only load failed" in str(exc):
            raise CheckpointError(
                f"checkpoint {path} holds objects other than tensors, numbers, strings, lists "
                f"and dicts ({_refused_type(exc)}), and loading it could run code",
                "load only checkpoints written by afmbench; a plugin's state_dict must hold "
                "tensors and plain values",
            ) from None
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupt ({type(exc).__name__}: {str(exc)[:80]})",
            "delete it and resume from an earlier one (checkpoint.keep_all=true keeps them), "
            "or start afresh without resume",
        ) from exc
    if not isinstance(ckpt, dict) or "afmbench" not in ckpt or "state_dict" not in ckpt:
        raise CheckpointError(
            f"{path} is not an afmbench checkpoint", "point resume= at a run folder"
        )
    return ckpt


def load_model_weights(model: torch.nn.Module, path: Path) -> dict[str, Any]:
    """Put a checkpoint's model weights into ``model`` (already given the run's structure, e.g.
    its forgetting layers); returns the checkpoint's loop state (``step`` and so on)."""
    ckpt = load_checkpoint(path)
    weights = {
        k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")
    }
    try:
        model.load_state_dict(weights)
    except RuntimeError as exc:
        raise CheckpointError(
            f"checkpoint {path} does not fit this model ({first_line(exc)[:120]})",
            "load it with the configuration of the run that wrote it",
        ) from exc
    return ckpt["afmbench"]


def _refused_type(exc: Exception) -> str:
    """The type a weights-only load refused, as torch's long message names it."""
    found = re.search(r"(?:GLOBAL|global) ([\w.]+)", str(exc))
    return found.group(1) if found else first_line(exc)[:80]
