"""The ``afmbench`` command: dispatch to a command, and turn a user error into one line.

This is the one place where an :class:`~afmbench.errors.AfmbenchError` becomes
``afmbench: error: <problem>; fix: <fix>`` on stderr and the process's exit code; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Sequence

from afmbench.errors import AfmbenchError, format_warning

USAGE = """usage: afmbench [command] [options]

commands:
  run [-m] [key=value ...]   train a strategy on a scenario (the default command);
                             -m sweeps comma-separated values, e.g. strategy=naive,ewc seed=0,1
  leaderboard [--scenario S] [--format table|markdown|csv|html] [--db PATH]
                             rank finished runs (--add RUN_DIR ... records runs by hand)
  plot RUN_DIR ...           draw runs' figures (accuracy heatmap, importance histograms)
  probe RUN_DIR              analyse a finished run (sparsity, importance, ablations)
  --version                  afmbench's version and its libraries'

`afmbench run --help` lists the configuration groups and their options."""


def _run(args: list[str]) -> int:
    from afmbench.commands.run import run_command

    return run_command(args)


def _leaderboard(args: list[str]) -> int:
    from afmbench.commands.leaderboard import leaderboard_command

    return leaderboard_command(args)


def _plot(args: list[str]) -> int:
    from afmbench.commands.plot import plot_command

    return plot_command(args)


def _probe(args: list[str]) -> int:
    from afmbench.commands.probe import probe_command

    return probe_command(args)


# Imported on first use: `afmbench --help` and `leaderboard` never load torch and Lightning.
COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "run": _run,
    "leaderboard": _leaderboard,
    "plot": _plot,
    "probe": _probe,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``afmbench`` console script; returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    warnings.formatwarning = format_warning
    if args and args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    if args and args[0] in ("-V", "--version") or args[:2] == ["run", "--version"]:
        from afmbench.versions import version_line

        print(version_line())
        return 0
    command, args = (args[0], args[1:]) if args and args[0] in COMMANDS else ("run", args)
    try:
        return COMMANDS[command](args)
    except AfmbenchError as error:
        report(error)
        return error.exit_code


def report(error: AfmbenchError) -> None:
    """Print a user error as the one line the standards ask for."""
    print(f"afmbench: error: {error}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
