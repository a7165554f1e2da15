"""The run folder: who owns it, whether it holds a run, and its files, written so nothing is
half-done.

A run holds an exclusive lock on its folder for its whole life (:func:`owned`), so two runs
or resumes never write into one folder; the lock goes with the process that held it, so a
killed run never blocks the next. Every file is written to a temporary name and renamed into
place, so a run killed at any moment leaves either the previous version of a file or the new
one.
"""

from __future__ import annotations

import fcntl
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np

from afmbench.errors import ConfigError, FolderInUseError
from afmbench.metrics import row_labels

LOCK = ".afmbench.lock"


def prepare_run_dir(
    path: str | os.PathLike, option: str = "run_dir", example: str = "run_dir=runs/my-run"
) -> Path:
    """Create the run folder (or another output folder, named ``option`` in the error) and
    prove it is writable before any work starts."""
    run_dir = Path(path).expanduser()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        # A probe file of this process's own: two runs probing one folder at once must not
        # delete each other's.
        with tempfile.NamedTemporaryFile(dir=run_dir, prefix=".write-test"):
            pass
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


# Locks this process holds: path -> [open file, depth]. flock belongs to an open file, so a
# second open of the same lock file in this process would block on the first.
_held: dict[Path, list] = {}


@contextmanager
def owned(folder: str | os.PathLike, new_run: bool = False) -> Iterator[Path]:
    """Hold ``folder``'s lock for the block: a run (or resume) into a folder that another
    process holds is refused with :class:`FolderInUseError` naming that process, before
    anything is written. A ``new_run`` is also refused if the folder holds another run,
    checked once, when the lock is taken. Re-entrant within a process (the command line
    takes the lock before Hydra writes into the folder, the run keeps it); in a distributed
    run only the first process locks (the others share its folder)."""
    path = prepare_run_dir(folder).resolve()
    taken = path not in _held and _first_process()
    if taken:
        _held[path] = [_lock(path), 0]
    entry = _held.get(path)
    if entry is not None:
        entry[1] += 1
    try:
        if taken and new_run:
            check_new_run_dir(path)
        yield path
    finally:
        if entry is not None:
            entry[1] -= 1
            if entry[1] == 0:
                del _held[path]
                entry[0].close()  # closing the file releases the lock


def _lock(path: Path) -> IO[str]:
    """The folder's lock file, locked by this process, with the process named in it."""
    handle = open(path / LOCK, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise FolderInUseError(
            f"run_dir {path} is in use by {holder}",
            "wait for that run to end, or choose another run_dir",
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"process {os.getpid()} ({' '.join(sys.argv)[:120]})\n")
    handle.flush()
    return handle


def _first_process() -> bool:
    """Whether this is the first process of a (possibly distributed) run: Lightning's rank
    from the environment, on the first node."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    first_node = all(os.environ.get(v, "0") == "0" for v in ("NODE_RANK", "GROUP_RANK"))
    return getattr(rank_zero_only, "rank", 0) == 0 and first_node


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` in one rename."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, data: dict[str, Any]) -> None:
    write_atomic(path, json.dumps(data, indent=2, default=_jsonable) + "\n")


def write_matrix_csv(path: Path, matrix: np.ndarray, joint: bool = False) -> None:
    """Rows are "after experience i" (or the one joint model), columns "task j"."""
    lines = ["after," + ",".join(f"task_{j}" for j in range(matrix.shape[1]))]
    for label, row in zip(row_labels(len(matrix), joint), matrix):
        lines.append(label + "," + ",".join("" if np.isnan(v) else f"{v:.6f}" for v in row))
    write_atomic(path, "\n".join(lines) + "\n")


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def read_metrics(folder: str | os.PathLike) -> dict[str, Any]:
    """The ``metrics.json`` of the run in ``folder``, or a one-line error saying it has none."""
    path = Path(folder).expanduser() / "metrics.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(
            f"{folder} has no readable metrics.json ({exc})",
            "pass the folder of a run made by `afmbench run`",
        ) from exc
