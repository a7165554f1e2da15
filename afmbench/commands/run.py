"""``afmbench run [-m] [key=value ...]``: check the overrides, then run (or sweep) with Hydra.

Before Hydra starts, every override (every combination, in a sweep) is composed and checked,
so a typo, an unknown name or a wrong type is one line instead of a traceback. Hydra writes
its record into the run folder before a job starts, so a single run's folder is claimed here
(locked, and refused if it holds another run); the run keeps that claim.
"""

from __future__ import annotations

import contextlib
import difflib
import itertools
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

from afmbench.compose import expand_sweeps, load_config, searchpath_override
from afmbench.errors import (
    AfmbenchError,
    ConfigError,
    FolderInUseError,
    Interrupted,
    SweepFailed,
    format_warning,
)
from afmbench.resume import (
    AUTO,
    check_resume,
    find_checkpoint,
    resumed_folder,
    run_folder_of,
    with_saved_overrides,
)
from afmbench.run_folder import LOCK, holds_run, owned, prepare_run_dir
from afmbench.runner import plan

log = logging.getLogger("afmbench")

# Hydra flags that only print information; nothing is validated or run for them.
INFO_FLAGS = ("--help", "-h", "--hydra-help", "--info", "-i", "--cfg", "-c", "--resolve",
              "--shell-completion", "-sc")  # fmt: skip
# Hydra flags followed by a value (``--cfg job``), which is not an override.
VALUE_FLAGS = ("--cfg", "-c", "--info", "-i", "--package", "-p", "--config-path", "-cp",
               "--config-name", "-cn", "--experimental-rerun")  # fmt: skip
CONFIG_DIR_FLAGS = ("--config-dir", "-cd")
MAX_CHECKED_COMBINATIONS = 64
# The file where a sweep's jobs list the run folders that failed: jobs may run in other
# processes (a parallel launcher), so the sweep's outcome cannot come from a variable.
FAILURES_ENV = "AFMBENCH_SWEEP_FAILURES"
COMMAND_NAMES = ("run", "leaderboard", "plot", "probe")


class _JobStopped(BaseException):
    """Carries a job's error out through Hydra, which would print an Exception's traceback."""

    def __init__(self, error: AfmbenchError) -> None:
        super().__init__(str(error))
        self.error = error


def run_command(args: list[str]) -> int:
    """``afmbench run``: check the overrides, then hand over to Hydra."""
    args = with_config_dirs(args)
    multirun = any(a in ("-m", "--multirun") for a in args)
    if not multirun:
        args = with_saved_overrides(args, _options(args))
    if any(a.split("=")[0] in INFO_FLAGS for a in args):
        return launch_hydra(route_run_dir(args, multirun), multirun)
    check_words(args)
    overrides = [a for a in args if not a.startswith("-") and "=" in a]
    options = _options(overrides)
    if not multirun:
        check_resume(options, overrides)  # before any folder is made for it
    check_overrides(overrides, multirun)
    folder = single_run_folder(options) if not multirun else None
    new_run = options.get("resume", "false").lower() == "false"
    # Hydra writes its record into the folder before the run starts: claim it first
    with owned(folder, new_run) if folder is not None else nullcontext():
        return launch_hydra(route_run_dir(args, multirun), multirun)


def with_config_dirs(args: list[str]) -> list[str]:
    """``--config-dir DIR`` (folders of the user's own configs, e.g. ``DIR/strategy/x.yaml``)
    as the override that adds them to Hydra's search path: checked, run and resumed alike."""
    dirs, rest = [], []
    words = iter(args)
    for word in words:
        if word in CONFIG_DIR_FLAGS:
            dirs.append(next(words, ""))
        elif word.startswith(tuple(f"{f}=" for f in CONFIG_DIR_FLAGS)):
            dirs.append(word.split("=", 1)[1])
        else:
            rest.append(word)
    for folder in dirs:
        if not folder or not Path(folder).is_dir():
            raise ConfigError(f"--config-dir {folder!r} is not a folder",
                              "pass a folder holding config groups, e.g. --config-dir my_configs")  # fmt: skip
    if not dirs:
        return rest
    # beside the other overrides: Hydra takes them as one run of positional words
    at = next((i for i, w in enumerate(rest) if "=" in w and not w.startswith("-")), 0)
    return [*rest[:at], searchpath_override(dirs), *rest[at:]]


def check_words(args: list[str]) -> None:
    """A word that is neither a command, a flag, a flag's value nor ``key=value`` (a misspelt
    command, a forgotten ``=``) is one line here instead of Hydra's parse error."""
    for previous, word in zip([None, *args], args):
        if "=" in word or word.startswith(("-", "~")) or previous in VALUE_FLAGS:
            continue
        close = difflib.get_close_matches(word, list(COMMAND_NAMES), n=1)
        raise ConfigError(
            f"'{word}' is neither a command nor a key=value override",
            f"did you mean afmbench {close[0]}?"
            if close
            else f"commands are {', '.join(COMMAND_NAMES)}; overrides are key=value, e.g. seed=1",
        )


def _options(args: list[str]) -> dict[str, str]:
    """The ``key=value`` overrides among ``args``, by key."""
    return dict(a.split("=", 1) for a in args if "=" in a and not a.startswith("-"))


def check_overrides(overrides: list[str], multirun: bool) -> None:
    """Compose and plan every combination of the overrides; raise :class:`ConfigError` on the
    first problem. Large sweeps check their first combinations only."""
    run_dirs = set()
    for combination in itertools.islice(
        expand_sweeps(overrides, multirun), MAX_CHECKED_COMBINATIONS
    ):
        cfg = load_config(combination)  # Hydra's composition errors come as one line
        plan(cfg)
        run_dirs.add(cfg.run_dir or "runs")
        if cfg.run_dir and multirun and Path(cfg.run_dir).is_dir() and cfg.resume != AUTO:
            for job in sorted(Path(cfg.run_dir).iterdir()):
                if holds_run(job):
                    raise ConfigError(
                        f"the sweep folder {cfg.run_dir} already holds runs ({job.name})",
                        "choose another run_dir for this sweep (or delete that folder)",
                    )
    for run_dir in sorted(run_dirs):
        # Hydra creates the output folder before a job starts: prove it can, or say why not.
        prepare_run_dir(run_dir)


def single_run_folder(options: dict[str, str]) -> Path | None:
    """The folder a single run writes, when known before Hydra starts (``run_dir=`` or a
    resumed run's); otherwise Hydra names a fresh one, locked by the run itself."""
    if "run_dir" in options:
        return Path(options["run_dir"]).expanduser()
    return resumed_folder(options)


def route_run_dir(args: list[str], multirun: bool) -> list[str]:
    """Make Hydra's output folder the run folder the user asked for.

    A single run with ``run_dir=X`` writes Hydra's files into X too (as does ``resume=X``,
    which continues run X in place); in a sweep, ``run_dir=X`` becomes the sweep folder and
    every job gets its own sub-folder.
    """
    given = [a for a in args if a.startswith("run_dir=")]
    resumed = [
        a
        for a in args
        if a.startswith("resume=") and a.split("=", 1)[1].lower() not in ("true", "false")
    ]
    if not given and resumed and not multirun:
        try:
            folder = run_folder_of(find_checkpoint(resumed[-1].split("=", 1)[1], None))
        except AfmbenchError:
            return args  # the run itself reports what is wrong with the path
        return [*args, f"run_dir={folder}", f"hydra.run.dir={folder}"]
    if not given:
        return args
    path = given[-1].split("=", 1)[1]
    if multirun:
        return [a for a in args if not a.startswith("run_dir=")] + [f"hydra.sweep.dir={path}"]
    return [*args, f"hydra.run.dir={path}"]


def launch_hydra(args: list[str], multirun: bool) -> int:
    """Run Hydra's main with ``args`` as its command line; raise the error that stopped a
    single run or a sweep, or :class:`SweepFailed` if any job of a sweep failed."""
    import hydra

    from afmbench.config import CONFIG_NAME, config_dir

    failures = _failures_file()
    os.environ[FAILURES_ENV] = str(failures)
    sys.argv = [sys.argv[0], *args]
    try:
        hydra.main(config_path=config_dir(), config_name=CONFIG_NAME, version_base="1.3")(
            hydra_task
        )()
        failed = failures.read_text().splitlines() if failures.exists() else []
    except _JobStopped as stopped:
        raise stopped.error from None
    finally:
        os.environ.pop(FAILURES_ENV, None)
        failures.unlink(missing_ok=True)
    if failed:
        raise SweepFailed(
            f"{len(failed)} job(s) of the sweep failed: {', '.join(failed)}",
            "each run folder's metrics.json holds its error; afmbench run resume=PATH continues one",
        )
    return 0


def _failures_file() -> Path:
    """A fresh file name that a sweep's jobs can reach: beside the sweep (the working folder,
    shared on a cluster) where it is writable, else the temporary folder."""
    name = f".afmbench-sweep-failures-{os.getpid()}-{time.time_ns()}"
    here = Path.cwd()
    return (here if os.access(here, os.W_OK) else Path(tempfile.gettempdir())) / name


def hydra_task(cfg) -> None:
    """One job: run the configuration. A single run's error (and Ctrl-C, in a sweep too)
    stops Hydra; a sweep's failed job is logged and listed, and the sweep goes on."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from afmbench.runner import execute

    warnings.formatwarning = format_warning  # a parallel launcher's job is its own process
    hydra_cfg = HydraConfig.get()
    run_dir = cfg.run_dir or hydra_cfg.runtime.output_dir
    sweep = hydra_cfg.mode == RunMode.MULTIRUN
    try:
        execute(cfg, run_dir, group=Path(hydra_cfg.sweep.dir).name if sweep else None)
    except AfmbenchError as error:
        if not sweep and not cfg.resume and not isinstance(error, FolderInUseError):
            _remove_unstarted(Path(run_dir))
        if not sweep or isinstance(error, Interrupted):  # Ctrl-C stops a sweep too
            raise _JobStopped(error) from None
        log.error("job %s failed: %s", run_dir, error)
        if os.environ.get(FAILURES_ENV):
            with open(os.environ[FAILURES_ENV], "a") as failures:
                failures.write(f"{run_dir}\n")


def _remove_unstarted(folder: Path) -> None:
    """A single run that stopped before its first experience was recorded (missing data, a
    trainer option this machine lacks) leaves no folder of Hydra's files behind: only the files
    Hydra and afmbench wrote go, and the folder only if nothing else is in it."""
    if holds_run(folder):
        return
    shutil.rmtree(folder / ".hydra", ignore_errors=True)
    for name in ("config.yaml", "afmbench.log", LOCK):
        (folder / name).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        folder.rmdir()
