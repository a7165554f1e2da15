"""``afmbench leaderboard``: print or write the ranked table of finished runs, or ``--add``
runs from their folders."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from afmbench.errors import LeaderboardError
from afmbench.leaderboard import (
    DEFAULT_DB,
    default_db,
    load_groups,
    push_to_wandb,
    record_run,
    render,
    select_best,
)
from afmbench.loggers import wandb_mode
from afmbench.run_folder import read_metrics


def leaderboard_command(args: list[str]) -> int:
    """``afmbench leaderboard``: print (or write) the ranked table, or ``--add`` finished runs."""
    parser = argparse.ArgumentParser(prog="afmbench leaderboard", description="Rank finished runs.")
    parser.add_argument(
        "--db",
        default=None,
        help=f"leaderboard file (default: $AFMBENCH_LEADERBOARD or {DEFAULT_DB})",
    )
    parser.add_argument("--scenario", default=None, help="only this scenario")
    parser.add_argument("--format", choices=("table", "markdown", "csv", "html"), default="table")
    parser.add_argument(
        "--rank-by",
        choices=("acc", "val_acc"),
        default="acc",
        help="rank by test or validation ACC",
    )
    parser.add_argument(
        "--select",
        choices=("val_acc",),
        default=None,
        help="for each strategy (layer on and off) keep only the configuration with the best mean "
        "validation ACC over its seeds, and report its test metrics",
    )
    parser.add_argument(
        "--output", "-o", default=None, help="write to this file instead of printing"
    )
    parser.add_argument("--wandb", action="store_true", help="also push the table to W&B")
    parser.add_argument(
        "--wandb-mode",
        default=None,
        choices=("offline", "online", "disabled"),
        help="offline (default, or $WANDB_MODE), online or disabled",
    )
    parser.add_argument(
        "--add",
        nargs="+",
        metavar="RUN_DIR",
        help="add finished runs from their run folders (e.g. recorded with leaderboard.record=false)",
    )
    options = parser.parse_args(args)
    db = Path(options.db) if options.db else default_db()
    if options.wandb:  # an unusable mode fails before the table is printed
        options.wandb_mode = wandb_mode(options.wandb_mode)
    if options.add:
        for folder in options.add:
            record_run(db, finished_metrics(Path(folder)), folder)
        print(f"added {len(options.add)} run(s) to {db}")
        return 0
    if not db.is_file():
        raise LeaderboardError(
            f"no leaderboard at {db}", "finish a run first (`afmbench run`) or pass --db PATH"
        )
    groups = load_groups(db, options.scenario, options.rank_by)
    if options.select:
        groups = select_best(groups, options.select)
        if not groups:
            raise LeaderboardError(
                f"no run on {db} has a validation ACC to select by",
                "hold out validation data: afmbench run scenario.validation=0.1 ...",
            )
    if options.scenario and not groups:
        present = sorted({g.scenario for g in load_groups(db)})
        raise LeaderboardError(
            f"no runs of scenario '{options.scenario}' on {db}",
            f"use one of {', '.join(present)}" if present else "finish a run first",
        )
    text = render(groups, options.format)
    if options.output:
        try:
            Path(options.output).parent.mkdir(parents=True, exist_ok=True)
            Path(options.output).write_text(text)
        except OSError as exc:
            raise LeaderboardError(
                f"cannot write {options.output} ({exc.strerror or exc})",
                "pass -o a file in a folder you can write to",
            ) from exc
        print(f"wrote {options.output} ({sum(len(g.runs) for g in groups)} runs)")
    else:
        sys.stdout.write(text)
    if options.wandb:
        push_to_wandb(groups, "afmbench", options.wandb_mode)
    return 0


def finished_metrics(folder: Path) -> dict[str, Any]:
    """The ``metrics.json`` of the finished run in ``folder``."""
    metrics = read_metrics(folder)
    if metrics.get("status") != "finished":
        raise LeaderboardError(
            f"cannot add {folder}: its status is {metrics.get('status')!r}, not 'finished'",
            f"finish it first: afmbench run resume={folder}",
        )
    return metrics
