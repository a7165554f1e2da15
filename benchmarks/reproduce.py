"""Reproduction runs for EWC, SI, MAS and ANPyC; results go to ``benchmarks/REPRODUCTION.md``.

Every configuration is one ``afmbench run`` command (``--list`` prints them); a finished run
folder is reused unless ``--force``. Suites:

- ``pilot`` / ``wide_pilot`` / ``online_pilot10`` / ``afm_pilot``: the strength search for
  ``permuted`` / ``wide`` / ``online`` / ``afm``, under *other* permutations
  (``scenario.seed=1``) than the reported runs; ``wide_pilot10``: stronger EWC on 10 tasks;
- ``permuted`` / ``wide``: Permuted MNIST, 10 tasks, domain-incremental, MLP 2x256 / 2x1000,
  Adam, 1 epoch per task (``wide_2epochs``: EWC with 2);
- ``online``: online EWC (γ=1) on the same 10 tasks, MLP 2x1000, SGD lr 0.1 without momentum,
  2 epochs per task;
- ``split``: Split MNIST, 5 tasks, task-incremental, MLP 2x256;
- ``afm``: the AFM paper's setting, Permuted MNIST, 10 tasks, MLP 784-512-256 with one head
  per task.

Usage: ``python benchmarks/reproduce.py permuted split --runs runs/repro`` (data from
``$AFMBENCH_DATA_DIR``); ``--table`` only rewrites the tables; ``--list`` prints the commands;
``--only ewc si`` restricts the suites to those labels.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from generated import write_block

HERE = Path(__file__).resolve().parent
TABLE = HERE / "REPRODUCTION.md"


@dataclass(frozen=True)
class Setting:
    """What a suite's runs share: scenario, network, optimizer and epochs."""

    scenario: str
    protocol: str
    tasks: int
    hidden: str
    optimizer: str
    lr: float
    batch: int
    epochs: int
    extra: tuple[str, ...] = ()

    def overrides(self) -> list[str]:
        return [
            f"scenario={self.scenario}", f"scenario.n_experiences={self.tasks}",
            f"scenario.protocol={self.protocol}", "model=mlp", f"model.hidden={self.hidden}",
            f"optimizer.name={self.optimizer}", f"optimizer.lr={self.lr}",
            f"data.batch_size={self.batch}", f"trainer.max_epochs={self.epochs}", *self.extra,
        ]  # fmt: skip


PERMUTED = Setting("permuted_mnist", "domain", 10, "[256,256]", "adam", 1e-3, 128, 1)
SPLIT = Setting("split_mnist", "task", 5, "[256,256]", "adam", 1e-3, 64, 2)
AFM = Setting("permuted_mnist", "task", 10, "[512,256]", "adam", 1e-3, 128, 1)
PILOT = Setting(
    "permuted_mnist", "domain", 3, "[256,256]", "adam", 1e-3, 128, 1, ("scenario.seed=1",)
)
WIDE = Setting("permuted_mnist", "domain", 10, "[1000,1000]", "adam", 1e-3, 128, 1)
WIDE_2EPOCHS = Setting("permuted_mnist", "domain", 10, "[1000,1000]", "adam", 1e-3, 128, 2)
WIDE_PILOT = Setting(
    "permuted_mnist", "domain", 5, "[1000,1000]", "adam", 1e-3, 128, 1, ("scenario.seed=1",)
)
WIDE_PILOT10 = Setting(
    "permuted_mnist", "domain", 10, "[1000,1000]", "adam", 1e-3, 128, 1, ("scenario.seed=1",)
)
# Online EWC, with the optimizer and budget of the best separate-mode attempt on `wide`
ONLINE = Setting(
    "permuted_mnist", "domain", 10, "[1000,1000]", "sgd", 0.1, 128, 2, ("optimizer.momentum=0",)
)
ONLINE_PILOT10 = Setting(
    "permuted_mnist", "domain", 10, "[1000,1000]", "sgd", 0.1, 128, 2,
    ("optimizer.momentum=0", "scenario.seed=1"),
)  # fmt: skip
AFM_PILOT = Setting(
    "permuted_mnist", "task", 3, "[512,256]", "adam", 1e-3, 128, 1, ("scenario.seed=1",)
)


def grid(strategy: str, key: str, values: tuple[float, ...]) -> list[tuple[str, list[str]]]:
    return [(f"{strategy}_{v:g}", [f"strategy={strategy}", f"strategy.{key}={v}"]) for v in values]


# (label, strategy overrides) per suite; strengths chosen by the pilot suite (see the table).
SUITES: dict[str, tuple[Setting, list[tuple[str, list[str]]]]] = {
    "pilot": (PILOT, [
        ("naive", ["strategy=naive"]),
        *grid("ewc", "lambda_", (30.0, 100.0, 300.0, 1000.0, 10000.0)),
        *grid("si", "c", (0.1, 1.0, 3.0, 10.0)),
    ]),
    "permuted": (PERMUTED, [
        ("naive", ["strategy=naive"]),
        ("ewc", ["strategy=ewc", "strategy.lambda_=30.0"]),
        ("si", ["strategy=si", "strategy.c=3.0"]),
    ]),
    "wide_pilot": (WIDE_PILOT, [
        ("naive", ["strategy=naive"]),
        *grid("ewc", "lambda_", (30.0, 300.0, 3000.0)),
        *grid("si", "c", (0.3, 3.0, 10.0, 30.0)),
    ]),
    "wide_pilot10": (WIDE_PILOT10, grid("ewc", "lambda_", (1000.0, 3000.0))),
    "wide": (WIDE, [
        ("naive", ["strategy=naive"]),
        ("ewc", ["strategy=ewc", "strategy.lambda_=300.0"]),
        ("si", ["strategy=si", "strategy.c=10.0"]),
    ]),
    "wide_2epochs": (WIDE_2EPOCHS, [("ewc", ["strategy=ewc", "strategy.lambda_=300.0"])]),
    "online_pilot10": (ONLINE_PILOT10, [
        (f"ewc_{v:g}", ["strategy=ewc", "strategy.mode=online", "strategy.gamma=1.0",
                        f"strategy.lambda_={v}"]) for v in (30.0, 100.0, 300.0)
    ]),
    "online": (ONLINE, [
        ("ewc", ["strategy=ewc", "strategy.mode=online", "strategy.gamma=1.0",
                 "strategy.lambda_=100.0"]),
    ]),
    "split": (SPLIT, [
        ("naive", ["strategy=naive"]),
        *grid("ewc", "lambda_", (100.0, 10000.0)),
        *grid("si", "c", (1.0,)),
        *grid("mas", "lambda_", (0.1, 1.0)),
    ]),
    "afm_pilot": (AFM_PILOT, [
        ("naive", ["strategy=naive"]),
        *grid("ewc", "lambda_", (100.0, 1000.0)),
        *grid("mas", "lambda_", (0.003, 0.01, 0.03, 0.1, 1.0)),
        *grid("anpyc", "lambda_", (0.3, 1.0, 3.0)),
    ]),
    "afm": (AFM, [
        ("naive", ["strategy=naive"]),
        ("joint", ["strategy=joint"]),
        ("ewc", ["strategy=ewc", "strategy.lambda_=100.0"]),
        ("mas", ["strategy=mas", "strategy.lambda_=0.003"]),
        ("anpyc", ["strategy=anpyc", "strategy.lambda_=1.0"]),
    ]),
}  # fmt: skip


def command(suite: str, label: str, runs: Path) -> list[str]:
    setting, strategies = SUITES[suite]
    strategy = dict(strategies)[label]
    return [
        "afmbench", "run", *setting.overrides(), *strategy, "seed=0", "logger=none",
        "trainer.enable_progress_bar=false", f"run_dir={runs / suite / label}",
    ]  # fmt: skip


def execute(suite: str, label: str, runs: Path, force: bool) -> None:
    folder = runs / suite / label
    if not force and _finished(folder):
        print(f"[{suite}/{label}] done already: {folder}", flush=True)
        return
    shutil.rmtree(folder, ignore_errors=True)  # afmbench refuses a folder that holds a run
    argv = command(suite, label, runs)
    print(f"[{suite}/{label}] {shlex.join(argv)}", flush=True)
    subprocess.run([str(Path(sys.executable).with_name("afmbench")), *argv[1:]], check=False)


def _finished(folder: Path) -> bool:
    path = folder / "metrics.json"
    return path.exists() and json.loads(path.read_text()).get("status") == "finished"


#: The tables of REPRODUCTION.md: one marked block each, holding these suites' finished runs.
TABLES: dict[str, tuple[str, ...]] = {
    "results-permuted": ("pilot", "permuted"),
    "results-wide": ("wide_pilot", "wide_pilot10", "wide", "wide_2epochs"),
    "results-online": ("online_pilot10", "online"),
    "results-split": ("split",),
    "results-afm": ("afm_pilot", "afm"),
}
assert sorted(s for suites in TABLES.values() for s in suites) == sorted(SUITES)
#: pilot suite -> the suite that runs the strengths it chose
PILOTS = {"pilot": "permuted", "wide_pilot": "wide", "online_pilot10": "online", "afm_pilot": "afm"}
#: (suite, label) -> the ACC the benchmark asks for
TARGETS: dict[tuple[str, str], float] = {
    **{(suite, label): 0.90 for suite in ("permuted", "wide") for label in ("ewc", "si")},
    ("wide_2epochs", "ewc"): 0.90, ("online", "ewc"): 0.90,
    **{("split", label): 0.97 for label in ("ewc_100", "ewc_10000", "si_1", "mas_0.1", "mas_1")},
}  # fmt: skip
SYMBOLS = {"lambda_": "λ", "gamma": "γ"}


def _setting(overrides: list[str], strategy: dict) -> str:
    """The strategy options the suite sets (``λ=30``, ``online, γ=1, λ=100``), as the run used them."""
    words = []
    for override in overrides:
        key = override.split("=", 1)[0]
        if not key.startswith("strategy."):
            continue
        name = key.removeprefix("strategy.")
        value = strategy.get(name)
        if name == "mode":
            words.append(str(value))
        else:
            shown = f"{value:g}" if isinstance(value, (int, float)) else str(value)
            words.append(f"{SYMBOLS.get(name, name)}={shown}")
    return ", ".join(words) or "-"


def _note(suite: str, label: str, acc: float) -> str:
    """Which reported suite a pilot row chose the strength of, or the target a reported row meets."""
    if (suite, label) in TARGETS:
        target = TARGETS[suite, label]
        return f"target ≥ {target:.2f}: " + ("met" if acc >= target else "**missed**")
    strategies = dict(SUITES[suite][1])
    reported = PILOTS.get(suite)
    if reported and any(o.startswith("strategy.") for o in strategies[label]):
        if strategies[label] in dict(SUITES[reported][1]).values():
            return f"chosen for `{reported}`"
    return ""


def table(runs: Path, suites: tuple[str, ...] = tuple(SUITES)) -> str:
    """The Markdown table of the finished runs of ``suites`` under ``runs`` ("" if none)."""
    rows = []
    for suite in suites:
        for label, overrides in SUITES[suite][1]:
            folder = runs / suite / label
            if not _finished(folder):
                continue
            m = json.loads((folder / "metrics.json").read_text())
            bwt = "-" if m.get("bwt") is None else f"{m['bwt']:.3f}"
            rows.append(
                f"| {suite} | {m['strategy']} | {_setting(overrides, m['config']['strategy'])} | "
                f"{m['acc']:.4f} | {bwt} | {m['train_time_s'] / 60:.1f} | {_note(suite, label, m['acc'])} |"
            )
    if not rows:
        return ""
    header = (
        "| suite | strategy | setting | ACC | BWT | train min | note |\n"
        "|---|---|---|---|---|---|---|\n"
    )
    return header + "\n".join(rows) + "\n"


def write_table(runs: Path, say: bool = False) -> None:
    """Rewrite each table that has finished runs under ``runs``; leave the others as they are."""
    for block, suites in TABLES.items():
        text = table(runs, suites)
        if text:
            write_block(TABLE, block, text)
        elif say:
            print(f"no finished runs of {', '.join(suites)} under {runs}: {block} left as it is")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("suites", nargs="*", help=f"suites to run: {', '.join(SUITES)}")
    parser.add_argument("--only", nargs="*", default=None, help="labels to run within the suites")
    parser.add_argument(
        "--runs", type=Path, default=Path("runs/repro"), help="where run folders go"
    )
    parser.add_argument("--force", action="store_true", help="re-run finished runs")
    parser.add_argument("--table", action="store_true", help="only rewrite the results tables")
    parser.add_argument(
        "--list", action="store_true", help="print the commands (of every suite if none is named)"
    )
    args = parser.parse_args(argv)
    unknown = [suite for suite in args.suites if suite not in SUITES]
    if unknown:
        parser.error(f"unknown suite(s) {', '.join(unknown)}; choose from {', '.join(SUITES)}")
    for suite in args.suites or (list(SUITES) if args.list else []):
        for label, _ in SUITES[suite][1]:
            if args.only is not None and label not in args.only:
                continue
            if args.list:
                print(shlex.join(command(suite, label, args.runs)))
            elif not args.table:
                execute(suite, label, args.runs, args.force)
                write_table(args.runs)
    if not args.list:
        write_table(args.runs, say=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
