"""The leaderboard: one SQLite row per finished run, ranked by ACC with mean ± std over seeds.

A row is written in a single transaction when a run finishes, so a killed or failed run leaves
nothing half-written, and SQLite's locking lets many processes (a sweep, a cluster) add rows
to the same file at once. Runs that differ only in their seed (same config hash) form one
group, with the latest run of each seed (a rerun of a seed replaces it); groups are ranked by
mean ACC within each scenario and protocol. std is the sample standard deviation (n - 1) over
seeds, shown only where there are two or more.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import os
import sqlite3
import statistics
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from afmbench.errors import LeaderboardError

DEFAULT_DB = "runs/leaderboard.sqlite"
COLUMNS = (
    "run_dir", "finished_at", "scenario", "protocol", "strategy", "forgetting_layer", "seed",
    "model", "config_hash", "acc", "bwt", "fwt", "forgetting", "train_time_s",
    "accuracy_matrix", "config", "metrics",
)  # fmt: skip
SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_dir TEXT UNIQUE, finished_at REAL, scenario TEXT, protocol TEXT, strategy TEXT,
    forgetting_layer INTEGER, seed INTEGER, model TEXT, config_hash TEXT,
    acc REAL, bwt REAL, fwt REAL, forgetting REAL, train_time_s REAL,
    accuracy_matrix TEXT, config TEXT, metrics TEXT
);
CREATE INDEX IF NOT EXISTS runs_group ON runs (scenario, protocol, config_hash);
"""


def default_db() -> Path:
    """``$AFMBENCH_LEADERBOARD``, else ``runs/leaderboard.sqlite`` beside the runs."""
    return Path(os.environ.get("AFMBENCH_LEADERBOARD") or DEFAULT_DB).expanduser()


def connect(path: str | Path) -> sqlite3.Connection:
    """Open (creating if needed) the leaderboard; waits for other writers instead of failing."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        con = sqlite3.connect(path, timeout=120, isolation_level=None)
        con.execute("PRAGMA busy_timeout = 120000")
        con.executescript(SCHEMA)
    except (OSError, sqlite3.Error) as exc:
        raise unusable(path, exc) from exc
    return con


def check_db(path: str | Path) -> None:
    """Fail now, before a run, if the leaderboard at ``path`` could not take its row at the end:
    a file that is not SQLite, or whose ``runs`` table is not afmbench's. Creates nothing."""
    path = Path(path)
    if not path.exists():
        return
    try:
        con = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            columns = {row[1] for row in con.execute("PRAGMA table_info(runs)")}
        finally:
            con.close()
    except sqlite3.Error as exc:
        raise unusable(path, exc) from exc
    if columns and not set(COLUMNS) <= columns:
        raise unusable(path, "its table 'runs' is not an afmbench leaderboard")


def unusable(path: Path, why: object) -> LeaderboardError:
    return LeaderboardError(
        f"cannot use the leaderboard {path}: {why}",
        "move that file away, or point leaderboard.db=PATH (--db PATH) at another file",
    )


def record_run(path: str | Path, metrics: dict[str, Any], run_dir: str | Path | None) -> None:
    """Add a finished run (its ``metrics.json`` content) in one transaction.

    Recording the same run folder twice (a resumed run) replaces its row.
    """
    if metrics.get("status") != "finished":
        raise ValueError("only finished runs belong on the leaderboard")
    row = {
        **{key: metrics.get(key) for key in COLUMNS},
        "run_dir": str(Path(run_dir).resolve()) if run_dir else f"python:{time.time_ns()}",
        "finished_at": time.time(),
        "forgetting_layer": int(bool(metrics.get("forgetting_layer"))),
        "accuracy_matrix": json.dumps(np.asarray(metrics["accuracy_matrix"]).tolist()),
        "config": json.dumps(metrics.get("config") or {}, default=str),
        "metrics": json.dumps(metrics, default=_jsonable),
    }
    con = connect(path)
    try:
        con.execute("BEGIN IMMEDIATE")
        con.execute(
            f"INSERT OR REPLACE INTO runs ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})",
            [row[c] for c in COLUMNS],
        )
        con.execute("COMMIT")
    except BaseException as exc:
        if con.in_transaction:
            con.execute("ROLLBACK")
        if isinstance(exc, sqlite3.Error):  # another table of that name, a read-only file, ...
            raise unusable(Path(path), exc) from exc
        raise
    finally:
        con.close()


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return str(value)


def value_of(row: dict[str, Any], key: str) -> Any:
    """A run's ``key``: its column, else the field of its ``metrics.json`` (parsed once)."""
    if key in row:
        return row[key]
    if "_metrics" not in row:
        row["_metrics"] = json.loads(row.get("metrics") or "{}")
    return row["_metrics"].get(key)


@dataclass
class Group:
    """Runs of one configuration (all seeds), summarised."""

    scenario: str
    protocol: str
    strategy: str
    forgetting_layer: bool
    config_hash: str
    runs: list[dict[str, Any]] = field(default_factory=list)

    def add(self, row: dict[str, Any]) -> None:
        """Add a run (rows come oldest first); a later run of a seed replaces the earlier one,
        so that n counts seeds and the std is taken over seeds."""
        self.runs = [r for r in self.runs if r["seed"] != row["seed"]] + [row]

    def stat(self, key: str) -> tuple[float | None, float | None]:
        """Mean and sample std of ``key`` (a column, or a field of the runs' metrics such as
        ``val_acc``) over the runs (std None for one run or no values)."""
        values = [v for r in self.runs if (v := value_of(r, key)) is not None]
        if not values:
            return None, None
        return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None

    @property
    def label(self) -> str:
        return self.strategy + (" + forgetting layer" if self.forgetting_layer else "")

    def mean_matrix(self) -> np.ndarray:
        return np.mean([json.loads(r["accuracy_matrix"]) for r in self.runs], axis=0)

    def curve(self) -> tuple[list[float], list[float]]:
        """Mean and std over seeds of the average accuracy after each number of tasks."""
        curves = np.array([json.loads(r["metrics"])["avg_acc_per_task"] for r in self.runs])
        spread = curves.std(axis=0, ddof=1) if len(curves) > 1 else np.zeros(curves.shape[1])
        return curves.mean(axis=0).tolist(), spread.tolist()

    def importance(self) -> dict[str, list[int]]:
        """Importance histograms per layer summed over seeds (the first strategy plugin's)."""
        total: dict[str, np.ndarray] = {}
        for run in self.runs:
            per_plugin = json.loads(run["metrics"]).get("importance_histograms") or {}
            for plugin, per_layer in per_plugin.items():
                if plugin == "forgetting":
                    continue
                for layer, counts in per_layer.items():
                    total[layer] = total.get(layer, 0) + np.asarray(counts)
                break
        return {layer: counts.tolist() for layer, counts in total.items()}


def load_groups(path: str | Path, scenario: str | None = None, rank_by: str = "acc") -> list[Group]:
    """Every configuration on the leaderboard, ranked by mean ``rank_by`` (ACC, or the
    validation ACC ``val_acc``) within scenario and protocol."""
    if not Path(path).is_file():
        return []
    check_db(path)
    con = connect(path)
    con.row_factory = sqlite3.Row
    try:
        query = "SELECT * FROM runs" + (" WHERE scenario = ?" if scenario else "") + " ORDER BY id"
        rows = [dict(r) for r in con.execute(query, (scenario,) if scenario else ())]
    finally:
        con.close()
    groups: dict[tuple, Group] = {}
    for row in rows:
        key = (row["scenario"], row["protocol"], row["config_hash"])
        if key not in groups:
            groups[key] = Group(row["scenario"], row["protocol"], row["strategy"], bool(row["forgetting_layer"]),
                                row["config_hash"])  # fmt: skip
        groups[key].add(row)
    return ranked(groups.values(), rank_by)


def ranked(groups: Iterable[Group], key: str = "acc") -> list[Group]:
    """``groups`` by scenario and protocol, then best mean ``key`` first."""
    return sorted(groups, key=lambda g: (g.scenario, g.protocol, -(g.stat(key)[0] or 0.0)))


def select_best(groups: Sequence[Group], key: str = "val_acc") -> list[Group]:
    """For each scenario, protocol, strategy and forgetting layer on or off, the configuration
    (strength, learning rate, ...) with the best mean ``key`` over its seeds: "tuned on
    validation, reported on test". Configurations without ``key`` take no part."""
    best: dict[tuple, Group] = {}
    for group in groups:
        score = group.stat(key)[0]
        if score is None:
            continue
        where = (group.scenario, group.protocol, group.strategy, group.forgetting_layer)
        if where not in best or score > best[where].stat(key)[0]:
            best[where] = group
    return ranked(best.values())


HEADERS = (
    "scenario",
    "protocol",
    "rank",
    "strategy",
    "forgetting layer",
    "ACC",
    "BWT",
    "forgetting",
    "n",
    "config",
)


STATS = ("acc", "bwt", "forgetting")
VALIDATION = "val_acc"  # a column of its own where some run held out validation data


def stats_of(groups: Sequence[Group]) -> tuple[str, ...]:
    return STATS + ((VALIDATION,) if any(g.stat(VALIDATION)[0] is not None for g in groups) else ())


def headers(groups: Sequence[Group]) -> list[str]:
    """The table's column names (``val ACC`` after forgetting, where there is one)."""
    stats = stats_of(groups)
    return [*HEADERS[:8], *(["val ACC"] if VALIDATION in stats else []), *HEADERS[8:]]


def csv_headers(groups: Sequence[Group]) -> list[str]:
    return ["scenario", "protocol", "rank", "strategy", "forgetting_layer",
            *(f"{key}_{part}" for key in stats_of(groups) for part in ("mean", "std")), "n",
            "config_hash"]  # fmt: skip


def table_rows(groups: Sequence[Group], numbers: bool = False) -> list[list[Any]]:
    """One row per group: mean ± std of ACC, BWT, forgetting (and validation ACC) over its
    seeds (``numbers``: mean and std as two numeric cells each, empty where undefined, for
    CSV)."""
    rows, rank, previous = [], 0, None
    stat_keys = stats_of(groups)
    for group in groups:
        rank = rank + 1 if (group.scenario, group.protocol) == previous else 1
        previous = (group.scenario, group.protocol)
        stats = [group.stat(key) for key in stat_keys]
        cells = [v for stat in stats for v in stat] if numbers else [_mean_std(s) for s in stats]
        rows.append([
            group.scenario, group.protocol, rank if numbers else str(rank), group.strategy,
            int(group.forgetting_layer) if numbers else "on" if group.forgetting_layer else "off",
            *cells, len(group.runs) if numbers else str(len(group.runs)), group.config_hash,
        ])  # fmt: skip
    return rows


def _mean_std(stat: tuple[float | None, float | None]) -> str:
    mean, std = stat
    if mean is None:
        return "n/a"
    return f"{mean:.4f}" if std is None else f"{mean:.4f} ± {std:.4f}"


def render(groups: Sequence[Group], fmt: str) -> str:
    """The leaderboard as ``table``, ``markdown``, ``csv`` or ``html``."""
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(csv_headers(groups))
        writer.writerows(table_rows(groups, numbers=True))
        return buffer.getvalue()
    rows = table_rows(groups)
    names = headers(groups)
    if fmt == "markdown":
        lines = ["| " + " | ".join(names) + " |", "|" + "---|" * len(names)]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"
    if fmt == "html":
        return render_html(groups, rows)
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(names)
    ]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(names), line(["-" * w for w in widths]), *map(line, rows)]) + "\n"


def render_html(groups: Sequence[Group], rows: list[list[str]]) -> str:
    """A self-contained report: the table, then per scenario the curves, heatmaps and histograms."""
    from afmbench import plots

    def image(fig) -> str:
        data = base64.b64encode(plots.png_bytes(fig)).decode()
        return f'<img alt="figure" src="data:image/png;base64,{data}">'

    header = "".join(f"<th>{html.escape(h)}</th>" for h in headers(groups))
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows
    )
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'><title>afmbench leaderboard</title>",
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
        "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}img{max-width:100%}</style>",
        "</head><body><h1>afmbench leaderboard</h1>",
        f"<p>{sum(len(g.runs) for g in groups)} finished runs; ACC, BWT and forgetting as mean ± std "
        "over seeds.</p>",
        f"<table><thead><tr>{header}</tr></thead><tbody>{body}</tbody></table>",
    ]
    for scenario, protocol in dict.fromkeys((g.scenario, g.protocol) for g in groups):
        members = [g for g in groups if (g.scenario, g.protocol) == (scenario, protocol)]
        label = distinct_labels(members)
        parts.append(f"<h2>{html.escape(scenario)} ({html.escape(protocol)}-incremental)</h2>")
        curves = {label[g.config_hash]: g.curve() for g in members}
        parts.append("<h3>Average accuracy vs number of tasks</h3>")
        parts.append(image(plots.accuracy_curves({k: v[0] for k, v in curves.items()},
                                                 {k: v[1] for k, v in curves.items()})))  # fmt: skip
        parts.append("<h3>Accuracy matrices (mean over seeds)</h3><div>")
        parts += [
            image(
                plots.accuracy_heatmap(
                    g.mean_matrix(), label[g.config_hash], joint=g.strategy == "joint"
                )
            )  # fmt: skip
            for g in members
        ]
        parts.append("</div>")
        for strategy in dict.fromkeys(g.strategy for g in members):
            pair = {
                label[g.config_hash]: g.importance()
                for g in members
                if g.strategy == strategy and g.importance()
            }
            if pair:
                parts.append(f"<h3>{html.escape(strategy)}: parameter importance with and without the "
                             "forgetting layer</h3>")  # fmt: skip
                parts.append(image(plots.histograms(pair, f"{strategy} importance per layer")))
    parts.append("</body></html>")
    return "\n".join(parts)


def distinct_labels(groups: Sequence[Group]) -> dict[str, str]:
    """Each group's label by config hash, with the hash added where several configurations of
    one scenario share a label (another lr, strength or model), so no figure merges them."""
    count: dict[str, int] = {}
    for group in groups:
        count[group.label] = count.get(group.label, 0) + 1
    return {
        g.config_hash: g.label if count[g.label] == 1 else f"{g.label} [{g.config_hash}]"
        for g in groups
    }


def push_to_wandb(groups: Sequence[Group], project: str, mode: str) -> None:
    """Log the leaderboard table to W&B as its own run; ``mode`` as ``loggers.wandb_mode``
    resolved it (offline unless online can work)."""
    import wandb

    run = wandb.init(project=project, job_type="leaderboard", mode=mode)
    run.log({"leaderboard": wandb.Table(columns=headers(groups), data=table_rows(groups))})
    run.finish()
