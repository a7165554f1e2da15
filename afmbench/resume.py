"""Resuming a run: which checkpoint, whether the configuration still matches, and putting
its state back.

A run killed at any point continues after its last complete experience and ends with the
same accuracy matrix as an uninterrupted run. A resume under another configuration is
refused in one line naming what changed and the overrides that restore it; ``resume=PATH``
alone reuses the overrides the run was started with (Hydra's ``.hydra/overrides.yaml``).
``resume=auto`` decides per run folder, so a long sweep can be spread over several sittings.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from afmbench.checkpoint import CHECKPOINT
from afmbench.config import explain_differences, identity_differences
from afmbench.errors import CheckpointError
from afmbench.module import ContinualModule
from afmbench.plugin import ContinualPlugin

AUTO = "auto"  # resume=auto: skip a finished run, continue an interrupted one, else start


def auto_resume(folder: Path) -> bool | str:
    """What ``resume=auto`` does with ``folder``: ``"finished"`` if it holds a finished run (it
    is kept, not rerun), ``True`` if it holds a checkpoint (the run continues), else ``False``
    (a fresh start), so a sweep run again picks up where it stopped."""
    metrics = folder / "metrics.json"
    if metrics.is_file() and json.loads(metrics.read_text()).get("status") == "finished":
        return "finished"
    return any(CHECKPOINT.search(p.name) for p in (folder / "checkpoints").glob("*.ckpt"))


def finished_run(folder: Path, config_hash: str) -> dict[str, Any]:
    """The metrics of the finished run in ``folder``, if it is this configuration's."""
    metrics = json.loads((folder / "metrics.json").read_text())
    if metrics.get("config_hash") != config_hash:
        raise CheckpointError(
            f"{folder} holds a finished run of another configuration "
            f"(hash {metrics.get('config_hash')}, this run {config_hash})",
            "give this configuration its own run_dir (or delete that folder)",
        )
    return metrics


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
            saved = ckpt["callbacks"].get(plugin.state_key)
            if saved is None and plugin.state_dict():  # Lightning saves no empty state
                raise KeyError(plugin.state_key)
            if saved is not None:
                plugin.load_state_dict(saved)
    except (KeyError, RuntimeError) as exc:
        raise CheckpointError(
            f"checkpoint {path} does not fit this run ({type(exc).__name__}: {str(exc)[:120]})",
            "resume with the same strategy, model and plugins as the interrupted run",
        ) from exc
    module.restored_optimizer_state = state.get("optimizer")  # loaded by configure_optimizers
    return state


def resumed_folder(options: dict[str, str]) -> Path | None:
    """The run folder that ``resume=PATH`` (or ``resume=true run_dir=PATH``) continues, from
    the command line's ``key=value`` overrides."""
    resume = options.get("resume", "false")
    if resume.lower() in ("false", AUTO) or (resume.lower() == "true" and "run_dir" not in options):
        return None
    folder = Path(options["run_dir"] if resume.lower() == "true" else resume).expanduser()
    return run_folder_of(folder) if folder.suffix == ".ckpt" else folder


def with_saved_overrides(args: list[str], options: dict[str, str]) -> list[str]:
    """``resume=PATH`` (or ``resume=true run_dir=PATH``) continues run PATH with the overrides it
    was started with (Hydra keeps them in ``PATH/.hydra/overrides.yaml``); overrides given now
    come after them and win."""
    folder = resumed_folder(options)
    saved = folder / ".hydra" / "overrides.yaml" if folder is not None else None
    if saved is None or not saved.is_file():
        return args
    hydra = saved.with_name("hydra.yaml")  # Hydra keeps its own overrides apart
    searchpath = [
        o
        for o in (OmegaConf.load(hydra).hydra.overrides.hydra if hydra.is_file() else [])
        if o.startswith("hydra.searchpath=") and "hydra.searchpath" not in options
    ]
    keep = searchpath + [
        o
        for o in OmegaConf.load(saved)
        if o.split("=", 1)[0].lstrip("+~") not in ("resume", "run_dir")
        and not o.startswith("hydra.")
        and o.split("=", 1)[0] not in options
    ]
    if keep:
        print(f"afmbench: resuming {folder} with its overrides: {' '.join(keep)}", flush=True)
    return [*keep, *args]


def check_resume(options: dict[str, str], overrides: list[str]) -> None:
    """Refuse a resume with nothing to resume, or under another configuration than the run's
    (``overrides`` composed), before any folder is created or Hydra rewrites the run's
    ``.hydra/`` record. A run that does not resume composes nothing here."""
    resume = options.get("resume", "false")
    if resume.lower() in ("false", AUTO):
        return
    from afmbench.compose import load_config

    cfg = load_config(overrides)
    run_dir = Path(options["run_dir"]).expanduser() if "run_dir" in options else None
    find_checkpoint(True if resume.lower() == "true" else resume, run_dir)
    folder = resumed_folder(options)
    if folder is not None and (differences := changes_since(folder, cfg)):
        raise different_configuration(folder, differences)


def changes_since(
    folder: Path, cfg: DictConfig | dict[str, Any] | None
) -> list[tuple[str, Any, Any]]:
    """What ``cfg`` changes in the identity of the run recorded in ``folder/config.yaml``
    (nothing known if either is missing: a Python run keeps no config.yaml)."""
    saved = folder / "config.yaml"
    if cfg is None or not saved.is_file():
        return []
    return identity_differences(OmegaConf.load(saved), cfg)
