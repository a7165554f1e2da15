"""The ``afmbench`` command.

``afmbench run [-m] [key=value ...]`` runs (or, with ``-m``, sweeps) through Hydra;
``afmbench`` alone runs the embedded offline default. Before Hydra starts, every override
(every combination, in a sweep) is composed and checked, so a typo, an unknown name or a
wrong type is one line and exit code 2 instead of a traceback. Errors raised while running
(missing data, a diverged loss) are reported the same way.
"""

from __future__ import annotations

import contextlib
import difflib
import itertools
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

from afmbench.errors import AfmbenchError, AfmbenchWarning, ConfigError, Interrupted, first_line

USAGE = """usage: afmbench [command] [options]

commands:
  run [-m] [key=value ...]   train a strategy on a scenario (the default command);
                             -m sweeps comma-separated values, e.g. strategy=naive,ewc seed=0,1
  leaderboard [--scenario S] [--format table|markdown|csv|html] [--db PATH]
                             rank finished runs (--add RUN_DIR ... records runs by hand)
  probe RUN_DIR              analyse a finished run (sparsity, importance, ablations)
  --version                  afmbench's version and its libraries'

`afmbench run --help` lists the configuration groups and their options."""

# Hydra flags that only print information; nothing is validated or run for them.
INFO_FLAGS = (
    "--help",
    "-h",
    "--hydra-help",
    "--info",
    "-i",
    "--cfg",
    "-c",
    "--resolve",
    "--shell-completion",
    "-sc",
)
# Hydra flags followed by a value (``--cfg job``), which is not an override.
VALUE_FLAGS = (
    "--cfg",
    "-c",
    "--info",
    "-i",
    "--package",
    "-p",
    "--config-path",
    "-cp",
    "--config-name",
    "-cn",
    "--config-dir",
    "-cd",
    "--experimental-rerun",
)
MAX_CHECKED_COMBINATIONS = 64
# The file where a sweep's jobs list the run folders that failed: jobs may run in other
# processes (a parallel launcher), so the sweep's exit code cannot come from a variable.
FAILURES_ENV = "AFMBENCH_SWEEP_FAILURES"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``afmbench`` console script; returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    warnings.formatwarning = _format_warning
    if args and args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    if args and args[0] in ("-V", "--version") or args[:2] == ["run", "--version"]:
        print(version_line())
        return 0
    if args and args[0] in COMMANDS:
        command, args = args[0], args[1:]
    else:
        command = "run"
    return COMMANDS[command](args)


_python_format_warning = warnings.formatwarning


def _format_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    line: str | None = None,
) -> str:
    """afmbench's own warnings as one line in the style of its errors; others as Python's."""
    if issubclass(category, AfmbenchWarning):
        return f"afmbench: warning: {message}\n"
    return _python_format_warning(message, category, filename, lineno, line)


def version_line() -> str:
    """afmbench's version and those of the libraries that decide its numbers."""
    from afmbench.results import versions

    found = versions()
    others = ", ".join(f"{k} {v}" for k, v in found.items() if k not in ("afmbench", "platform"))
    return f"afmbench {found.get('afmbench', '?')} ({others})"


def report(error: AfmbenchError) -> None:
    """Print a user error as the one line the standards ask for."""
    print(f"afmbench: error: {error}", file=sys.stderr, flush=True)


def run_command(args: list[str]) -> int:
    """``afmbench run``: check the overrides, then hand over to Hydra."""
    multirun = any(a in ("-m", "--multirun") for a in args)
    if not multirun:
        args = with_saved_overrides(args)
    overrides = [a for a in args if not a.startswith("-") and "=" in a]
    if not any(a.split("=")[0] in INFO_FLAGS for a in args):
        try:
            check_words(args)
            if not multirun:
                check_resumable(overrides)
            check_overrides(overrides, multirun)
            if not multirun:
                check_resume(overrides)
        except AfmbenchError as error:
            report(error)
            return error.exit_code
    return launch_hydra(route_run_dir(args, multirun))


def check_words(args: list[str]) -> None:
    """A word that is neither a command, a flag, a flag's value nor ``key=value`` (a misspelt
    command, a forgotten ``=``) is one line here instead of Hydra's parse error."""
    for previous, word in zip([None, *args], args):
        if "=" in word or word.startswith(("-", "~")) or previous in VALUE_FLAGS:
            continue
        close = difflib.get_close_matches(word, list(COMMANDS), n=1)
        raise ConfigError(
            f"'{word}' is neither a command nor a key=value override",
            f"did you mean afmbench {close[0]}?"
            if close
            else f"commands are {', '.join(COMMANDS)}; overrides are key=value, e.g. seed=1",
        )


def _options(args: list[str]) -> dict[str, str]:
    """The ``key=value`` overrides among ``args``, by key."""
    return dict(a.split("=", 1) for a in args if "=" in a and not a.startswith("-"))


def resumed_folder(args: list[str]) -> Path | None:
    """The run folder that ``resume=PATH`` (or ``resume=true run_dir=PATH``) continues."""
    options = _options(args)
    resume = options.get("resume", "false")
    if resume.lower() == "false" or (resume.lower() == "true" and "run_dir" not in options):
        return None
    folder = Path(options["run_dir"] if resume.lower() == "true" else resume).expanduser()
    if folder.suffix == ".ckpt":
        from afmbench.checkpoint import run_folder_of

        folder = run_folder_of(folder)
    return folder


def check_resumable(overrides: list[str]) -> None:
    """Refuse a resume with nothing to resume before any folder is created for it."""
    from afmbench.checkpoint import find_checkpoint

    options = _options(overrides)
    resume = options.get("resume", "false")
    if resume.lower() != "false":
        run_dir = Path(options["run_dir"]).expanduser() if "run_dir" in options else None
        find_checkpoint(True if resume.lower() == "true" else resume, run_dir)


def check_resume(overrides: list[str]) -> None:
    """Refuse a resume under another configuration here, before Hydra rewrites the run's
    ``.hydra/`` record of its overrides, which a later ``resume=PATH`` would reuse."""
    from afmbench.checkpoint import different_configuration

    folder = resumed_folder(overrides)
    if folder is None:
        return
    from afmbench.config import load_config
    from afmbench.runner import changes_since

    if differences := changes_since(folder, load_config(overrides)):
        raise different_configuration(folder, differences)


def with_saved_overrides(args: list[str]) -> list[str]:
    """``resume=PATH`` (or ``resume=true run_dir=PATH``) continues run PATH with the overrides it
    was started with (Hydra keeps them in ``PATH/.hydra/overrides.yaml``); overrides given now
    come after them and win."""
    folder = resumed_folder(args)
    if folder is None:
        return args
    options = _options(args)
    saved = folder / ".hydra" / "overrides.yaml"
    if not saved.is_file():
        return args
    from omegaconf import OmegaConf

    keep = [
        o
        for o in OmegaConf.load(saved)
        if o.split("=", 1)[0].lstrip("+~") not in ("resume", "run_dir")
        and not o.startswith("hydra.")
        and o.split("=", 1)[0] not in options
    ]
    if keep:
        print(f"afmbench: resuming {folder} with its overrides: {' '.join(keep)}", flush=True)
    return [*keep, *args]


def check_overrides(overrides: list[str], multirun: bool) -> None:
    """Compose and plan every combination of the overrides; raise :class:`ConfigError` on the
    first problem. Large sweeps check their first combinations only."""
    from afmbench.config import load_config
    from afmbench.results import check_new_run_dir, holds_run, prepare_run_dir
    from afmbench.runner import plan

    run_dirs = set()
    for combination in itertools.islice(
        expand_sweeps(overrides, multirun), MAX_CHECKED_COMBINATIONS
    ):
        cfg = load_config(combination)  # Hydra's composition errors come as one line
        plan(cfg)
        run_dirs.add(cfg.run_dir or "runs")
        if cfg.run_dir and not multirun and cfg.resume is False:
            check_new_run_dir(cfg.run_dir)  # before Hydra writes its record into it
        if cfg.run_dir and multirun and Path(cfg.run_dir).is_dir():
            for job in sorted(Path(cfg.run_dir).iterdir()):
                if holds_run(job):
                    raise ConfigError(
                        f"the sweep folder {cfg.run_dir} already holds runs ({job.name})",
                        "choose another run_dir for this sweep (or delete that folder)",
                    )
    for run_dir in sorted(run_dirs):
        # Hydra creates the output folder before a job starts: prove it can, or say why not.
        prepare_run_dir(run_dir)


def expand_sweeps(overrides: list[str], multirun: bool):
    """Every combination of a sweep's values as a list of plain overrides."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as exc:
        raise explain_hydra_error(exc, overrides) from exc
    choices = []
    for override in parsed:
        if multirun and override.is_sweep_override():
            key = override.get_key_element()
            choices.append([f"{key}={value}" for value in override.sweep_string_iterator()])
        else:
            choices.append([override.input_line])
    for combination in itertools.product(*choices):
        yield list(combination)


def explain_hydra_error(exc: Exception, overrides: list[str]) -> ConfigError:
    """One line for what Hydra reports over several."""
    from hydra.errors import MissingConfigException

    missing = getattr(exc, "missing_cfg_file", None) or ""
    if isinstance(exc, MissingConfigException) and missing.startswith(
        ("hydra/launcher/", "hydra/sweeper/")
    ):
        kind, name = missing.split("/")[1:3]
        package = f"hydra-{name.split('_')[0]}-{kind}"
        return ConfigError(
            f"the Hydra {kind} '{name}' is not installed",
            f"pip install {package} (the {kind}s available now: {', '.join(exc.options or [])})",
        )
    if isinstance(exc, MissingConfigException) and "/" in missing:
        group, _, name = missing.partition("/")
        options = ", ".join(exc.options or [])
        return ConfigError(f"unknown {group} '{name}'", f"use one of {options}")
    message = first_line(exc)
    if message.startswith("Could not append to config. An item is already at '"):
        key = message.split("'")[1]
        return ConfigError(f"{key} already exists", f"set it without the +: {key}=...")
    if message.startswith("Could not override '"):
        key = message.split("'")[1]
        return ConfigError(f"unknown option {key}", _suggest_key(key, overrides))
    return ConfigError(f"cannot parse overrides {' '.join(overrides)}: {message}",
                       "write overrides as key=value, e.g. trainer.max_epochs=1")  # fmt: skip


def _suggest_key(key: str, overrides: list[str]) -> str:
    """The closest existing key, in the config the user's group choices compose."""
    from omegaconf import OmegaConf

    from afmbench.config import load_config
    from afmbench.experiment import OWN_TRAINER_OPTIONS

    parent, _, leaf = key.rpartition(".")
    if parent == "trainer" and leaf in OWN_TRAINER_OPTIONS:
        return f"{key} is afmbench's to set: {OWN_TRAINER_OPTIONS[leaf]}"
    if parent == "trainer" and _is_trainer_option(leaf):
        return f"{leaf} is a Lightning Trainer option outside afmbench's defaults: add it with +{key}=..."
    groups = [
        o for o in overrides if "=" in o and "." not in o.split("=")[0] and not o.startswith("+")
    ]
    try:
        cfg = load_config(groups)
    except Exception:  # another problem in the group choices: fall back to the defaults
        cfg = load_config()
    node = OmegaConf.select(cfg, parent) if parent else cfg
    keys = list(node.keys()) if hasattr(node, "keys") else []
    if leaf not in keys and (holders := _options_having(parent, leaf)):
        choices = ", ".join(f"{parent}={h}" for h in holders)
        if len(holders) == 1:
            return f"add {choices} ({key} is one of its options)"
        return f"add one of {choices} ({key} is one of their options)"
    close = difflib.get_close_matches(leaf, [str(k) for k in keys], n=1)
    if close:
        return f"did you mean {parent + '.' if parent else ''}{close[0]}?"
    return (
        f"to add a new key use +{key}=..."
        if not keys
        else f"valid keys: {', '.join(map(str, keys))}"
    )


def _is_trainer_option(name: str) -> bool:
    import inspect

    import lightning

    return name in inspect.signature(lightning.Trainer).parameters


def _options_having(group: str, key: str) -> list[str]:
    """The options of config group ``group`` (``configs/<group>/*.yaml``) that set ``key``: a
    strategy's or the forgetting layer's key given without choosing them."""
    from omegaconf import OmegaConf

    from afmbench.config import config_dir

    folder = Path(config_dir()) / group
    if not group or "." in group or not folder.is_dir():
        return []
    return sorted(p.stem for p in folder.glob("*.yaml") if key in OmegaConf.load(p))


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
        from afmbench.checkpoint import find_checkpoint, run_folder_of

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


def launch_hydra(args: list[str]) -> int:
    """Run Hydra's main with ``args`` as its command line; non-zero if any job failed."""
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
    finally:
        os.environ.pop(FAILURES_ENV, None)
        failures.unlink(missing_ok=True)
    if failed:
        report(AfmbenchError(
            f"{len(failed)} job(s) of the sweep failed: {', '.join(failed)}",
            "each run folder's metrics.json holds its error; afmbench run resume=PATH continues one",
        ))  # fmt: skip
        return 1
    return 0


def _failures_file() -> Path:
    """A fresh file name that a sweep's jobs can reach: beside the sweep (the working folder,
    shared on a cluster) where it is writable, else the temporary folder."""
    name = f".afmbench-sweep-failures-{os.getpid()}-{time.time_ns()}"
    here = Path.cwd()
    return (here if os.access(here, os.W_OK) else Path(tempfile.gettempdir())) / name


def hydra_task(cfg) -> None:
    """One job: run the configuration; report user errors as one line."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from afmbench.runner import execute

    warnings.formatwarning = _format_warning  # a parallel launcher's job is its own process
    hydra_cfg = HydraConfig.get()
    run_dir = cfg.run_dir or hydra_cfg.runtime.output_dir
    sweep = Path(hydra_cfg.sweep.dir).name if hydra_cfg.mode == RunMode.MULTIRUN else None
    try:
        execute(cfg, run_dir, group=sweep)
    except AfmbenchError as error:
        report(error)
        if hydra_cfg.mode != RunMode.MULTIRUN and not cfg.resume:
            _remove_unstarted(Path(run_dir))
        if hydra_cfg.mode != RunMode.MULTIRUN or isinstance(error, Interrupted):
            sys.exit(error.exit_code)  # Ctrl-C stops a sweep too
        if os.environ.get(FAILURES_ENV):
            with open(os.environ[FAILURES_ENV], "a") as failures:
                failures.write(f"{run_dir}\n")


def _remove_unstarted(folder: Path) -> None:
    """A single run that stopped before its first experience was recorded (missing data, a
    trainer option this machine lacks) leaves no folder of Hydra's files behind: only the files
    Hydra and afmbench wrote go, and the folder only if nothing else is in it."""
    from afmbench.results import holds_run

    if holds_run(folder):
        return
    shutil.rmtree(folder / ".hydra", ignore_errors=True)
    for name in ("config.yaml", "afmbench.log"):
        (folder / name).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        folder.rmdir()


def leaderboard_command(args: list[str]) -> int:
    from afmbench.leaderboard import leaderboard_command as command

    return command(args)


def probe_command(args: list[str]) -> int:
    from afmbench.forgetting.probes import probe_command as command

    return command(args)


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "run": run_command,
    "leaderboard": leaderboard_command,
    "probe": probe_command,
}


if __name__ == "__main__":
    sys.exit(main())
