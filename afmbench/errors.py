"""Errors a user can fix, each carrying one line that names the problem and the fix.

The CLI (``afmbench/cli.py``, the one place that does so) prints ``afmbench: error: <message>``
for these and exits with ``exit_code``; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import warnings


def first_line(exc: BaseException) -> str:
    """An exception's message reduced to its first line (its type's name if it has none), for
    the one-line errors that quote a library's."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class AfmbenchError(Exception):
    """A problem with the user's input or environment (not a bug in afmbench)."""

    exit_code = 2

    def __init__(self, problem: str, fix: str | None = None) -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(problem if fix is None else f"{problem}; fix: {fix}")


class ConfigError(AfmbenchError):
    """An unknown name, a wrong type or an out-of-range value in the configuration."""


class FolderInUseError(ConfigError):
    """Another live process holds the run folder (a run or resume into it is under way)."""


class DataNotFoundError(AfmbenchError):
    """A data set's files are missing and nothing may be downloaded."""


class CheckpointError(AfmbenchError):
    """A checkpoint cannot be read (truncated, corrupt, or from another run)."""


class LeaderboardError(AfmbenchError):
    """The leaderboard file cannot be read or written (not an SQLite file, another schema, no
    write access)."""


class Interrupted(AfmbenchError):
    """The user pressed Ctrl-C; finished experiences are kept and the run can be resumed."""

    exit_code = 130  # the shell's code for a process stopped by SIGINT


class DivergenceError(AfmbenchError):
    """The loss became NaN or infinite; the run stops and is recorded as failed."""

    exit_code = 3


class SweepFailed(AfmbenchError):
    """Some jobs of a sweep failed; the others ran to the end."""

    exit_code = 1


class AfmbenchWarning(UserWarning):
    """Something the user should know that does not stop the run (a task that learned
    nothing, W&B falling back to offline). The CLI prints it as ``afmbench: warning: ...``."""


_python_format_warning = warnings.formatwarning


def format_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    line: str | None = None,
) -> str:
    """afmbench's own warnings as one line in the style of its errors; others as Python's
    (install with ``warnings.formatwarning = format_warning``)."""
    if issubclass(category, AfmbenchWarning):
        return f"afmbench: warning: {message}\n"
    return _python_format_warning(message, category, filename, lineno, line)
