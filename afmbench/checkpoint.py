"""Finding, reading and restoring the checkpoint written after each experience.

A checkpoint is a Lightning checkpoint (module weights including the accuracy-matrix counts,
every plugin's ``state_dict`` under ``callbacks``) plus an ``afmbench`` entry with the loop's
own state: the last finished step, the untrained baseline, timings, the optimizer state and
the config hash. Anything unreadable is a :class:`CheckpointError`; a resume never silently
starts afresh.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from afmbench.config import explain_differences
from afmbench.errors import CheckpointError, first_line
from afmbench.module import ContinualModule
from afmbench.plugin import ContinualPlugin

CHECKPOINT = re.compile(r"experience_(\d+)\.ckpt$")


def checkpoint_path(folder: Path, step: int) -> Path:
    return folder / "checkpoints" / f"experience_{step}.ckpt"


def find_checkpoint(
    resume: bool | str | Path,
    run_dir: Path | None,
    fix: str = "give a run folder that finished at least one experience (or a .ckpt file), "
    "or run without resume= to start afresh",
) -> Path:
    """The checkpoint ``resume`` points at: ``True`` means the latest one in ``run_dir``;
    a path may be a checkpoint file or a run folder. ``fix`` says what to do if there is none."""
    where = run_dir if resume is True else Path(str(resume)).expanduser()
    if where is None:
        raise CheckpointError("resume=true needs a run folder", "pass run_dir=PATH or resume=PATH")
    if where.is_file():
        return where
    found = [
        (int(m.group(1)), p)
        for folder in (where / "checkpoints", where)
        if folder.is_dir()
        for p in folder.iterdir()
        if (m := CHECKPOINT.search(p.name))
    ]
    if not found:
        raise CheckpointError(
            f"no checkpoints/experience_*.ckpt in {where}",
            fix,
        )
    return max(found)[1]


def run_folder_of(checkpoint: Path) -> Path:
    """The run folder a checkpoint belongs to (``<run>/checkpoints/experience_k.ckpt``)."""
    return (
        checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent
    )


def load_checkpoint(path: Path, mmap: bool = False) -> dict[str, Any]:
    """Read a checkpoint, turning truncation and corruption into one clear error.

    ``mmap=True`` maps tensors instead of reading them: cheap when only the loop state is needed.
    """
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except Exception as exc:  # truncated zip, bad pickle, unreadable file...
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


def check_same_config(
    state: dict[str, Any],
    path: Path,
    config_hash: str,
    differences: Sequence[tuple[str, Any, Any]] = (),
) -> None:
    """Refuse to continue a run under a different configuration than the one that wrote it;
    ``differences`` (key, value then, value now), where known, name what changed."""
    if state.get("config_hash") == config_hash:
        return
    if not differences:
        raise CheckpointError(
            f"checkpoint {path} was written by a different configuration "
            f"(hash {state.get('config_hash')}, this run {config_hash})",
            "resume with the same overrides as the interrupted run",
        )
    raise different_configuration(path, differences)


def different_configuration(
    path: Path, differences: Sequence[tuple[str, Any, Any]]
) -> CheckpointError:
    """The one line for a resume whose configuration differs from the run's in ``differences``."""
    changed, restore = explain_differences(differences)
    fix = "drop the overrides that change this (resume=PATH alone reuses the run's own)"
    return CheckpointError(
        f"{path} was written by a different configuration: {changed}",
        f"{fix}, or give the run's values: {restore}" if restore else fix,
    )


def restore(
    ckpt: dict[str, Any],
    path: Path,
    module: ContinualModule,
    plugins: Sequence[ContinualPlugin],
    config_hash: str,
) -> dict[str, Any]:
    """Load weights, plugin states and optimizer state into a fresh run; return the loop state."""
    state = ckpt["afmbench"]
    check_same_config(state, path, config_hash)
    try:
        module.load_state_dict(ckpt["state_dict"])
        for plugin in plugins:
            plugin.load_state_dict(ckpt["callbacks"][plugin.state_key])
    except (KeyError, RuntimeError) as exc:
        raise CheckpointError(
            f"checkpoint {path} does not fit this run ({type(exc).__name__}: {str(exc)[:120]})",
            "resume with the same strategy, model and plugins as the interrupted run",
        ) from exc
    module.restored_optimizer_state = state.get("optimizer")  # loaded by configure_optimizers
    return state
