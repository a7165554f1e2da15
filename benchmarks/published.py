"""Published tables reproduced at their protocols, over seeds: collect a suite's runs, compare.

A suite is a ready experiment (``afmbench/configs/experiment/<suite>.yaml``) whose sweep runs
every arm (a method at the paper's settings, ``afmbench/configs/arm/<suite>/``) over seeds,
each into ``runs/suites/<suite>/<arm>_seed<n>``, with ``resume=auto``: running the sweep again
keeps the finished runs and continues the interrupted ones.

    afmbench run -m experiment=hsu2018_split_mnist_task     # hours of CPU: rerun to continue
    python benchmarks/published.py collect                  # run folders -> results/<suite>.jsonl
    python benchmarks/published.py table                    # results/*.jsonl -> PUBLISHED.md

``collect`` merges what the run folders hold into the committed results files (one JSON line
per run: its metrics and the command that reruns it), so results survive the run folders.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

import yaml
from generated import write_block

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
#: earlier protocols of a suite, kept for comparison: results/<folder>/<suite>.jsonl -> its label
EARLIER = {
    "normalized": "Earlier runs, on Avalanche's normalized MNIST (add `scenario.normalize=true`):",
    "unpadded": "Earlier runs, on 28×28 images (add `scenario.pad=0`):",
}
ARMS = HERE.parent / "afmbench" / "configs" / "arm"
PAGE = HERE / "PUBLISHED.md"


@dataclass(frozen=True)
class Published:
    """One published figure: ACC in percent, its spread, of what kind, over how many runs."""

    method: str
    mean: float
    spread: float | None
    kind: str  # "sd" (sample), "pop-sd" (numpy's std, n in the denominator) or "sem"
    n: int | None

    @property
    def sd(self) -> float | None:
        """The spread as a sample standard deviation."""
        if self.spread is None or not self.n:
            return self.spread
        factor = {"sem": math.sqrt(self.n), "pop-sd": math.sqrt(self.n / (self.n - 1))}
        return self.spread * factor.get(self.kind, 1.0)


def _hsu(method: str, mean: float, sd: float) -> Published:
    return Published(method, mean, sd, "pop-sd", 10)


def _vandeven(
    suite: str, rows: tuple[tuple[str, str, float, float | None], ...]
) -> dict[str, Published]:
    """van de Ven & Tolias's figures: mean ± SEM of 20 seeds (SEM None where it is not known)."""
    return {
        f"{suite}/{arm}": Published(label, mean, sem, "sem", 20) for arm, label, mean, sem in rows
    }


# suite -> (where the figures stand, {arm: published figure}); arms not listed are ours alone.
PUBLISHED: dict[str, tuple[str, dict[str, Published]]] = {
    "hsu2018_split_mnist_task": (
        "Hsu et al. 2018 (arXiv 1810.12488), Table 2, incremental task column; the authors' "
        "repository GT-RIPL/Continual-Learning-Benchmark keeps it as fig/results_split_mnist.png. "
        "Mean ± numpy std (population) of 10 unseeded runs (iBatchLearn.py).",
        {
            "hsu2018_split_mnist_task/adam": _hsu("Adam (naive)", 93.46, 2.01),
            "hsu2018_split_mnist_task/sgd": _hsu("SGD (naive)", 97.98, 0.09),
            "hsu2018_split_mnist_task/ewc": _hsu("EWC", 97.70, 0.81),
            "hsu2018_split_mnist_task/online_ewc": _hsu("online EWC", 98.04, 1.10),
            "hsu2018_split_mnist_task/si": _hsu("SI", 98.56, 0.49),
            "hsu2018_split_mnist_task/mas": _hsu("MAS", 99.22, 0.21),
            "hsu2018_split_mnist_task/offline": _hsu("offline (joint)", 99.52, 0.16),
        },
    ),
    "buzzega2020_seq_mnist": (
        "Buzzega et al. 2020 (arXiv 2004.07211), Seq-MNIST, class-IL column, buffer 500; the "
        "authors' repository aimagelab/mammoth keeps the table in README.md at its first commit "
        "(7ab9db9), means without their spread (the paper averages 10 runs).",
        {
            f"buzzega2020_seq_mnist/{arm}": Published(label, mean, None, "sd", 10)
            for arm, label, mean in (
                ("sgd", "SGD (naive)", 19.60),
                ("joint", "JOINT", 95.57),
                ("lwf", "LwF", 19.62),
                ("er", "ER", 86.12),
                ("agem", "A-GEM", 46.66),
                ("derpp", "DER++", 91.00),
            )
        },
    ),
    "vandeven2019_split_mnist": (
        "van de Ven & Tolias 2019 (arXiv 1904.07734v1), Table 4, Split MNIST: mean ± SEM of 20 "
        "seeds. The paper's text could not be reached here; two independent readings of it "
        "agree with every figure: one quotes the EWC row with its SEM, the other gives every "
        "row to one decimal. The other rows' SEMs are not known, so only ours bounds them.",
        _vandeven(
            "vandeven2019_split_mnist",
            (
                ("task_none", "task-IL none", 87.19, None),
                ("task_ewc", "task-IL EWC", 98.64, 0.22),
                ("task_online_ewc", "task-IL online EWC", 99.12, None),
                ("task_si", "task-IL SI", 99.09, None),
                ("domain_none", "domain-IL none", 59.21, None),
                ("domain_ewc", "domain-IL EWC", 63.95, 1.90),
                ("domain_online_ewc", "domain-IL online EWC", 64.32, None),
                ("domain_si", "domain-IL SI", 65.36, None),
            ),
        ),
    ),
    "vandeven2019_permuted_mnist": (
        'van de Ven & Tolias, arXiv 1809.10635 as submitted to ICLR 2019 ("Generative replay '
        'with feedback connections..."), Table 4, incremental domain learning column: mean ± '
        "SEM of 20 seeds. The four regularization figures are those given to us as arXiv "
        "1904.07734's.",
        _vandeven(
            "vandeven2019_permuted_mnist",
            (
                ("none", "none", 78.51, 0.24),
                ("cumulative", "offline (cumulative)", 97.59, 0.01),
                ("ewc", "EWC", 94.31, 0.11),
                ("online_ewc", "online EWC", 94.42, 0.13),
                ("si", "SI", 95.33, 0.11),
            ),
        ),
    ),
}


def collect(runs: Path) -> list[str]:
    """Merge every run folder under ``runs/<suite>/`` into ``results/<suite>.jsonl``."""
    RESULTS.mkdir(exist_ok=True)
    written = []
    for suite_dir in sorted(p for p in runs.iterdir() if p.is_dir()):
        path = RESULTS / f"{suite_dir.name}.jsonl"
        rows = {(r["arm"], r["seed"]): r for r in read(path)}
        for metrics_file in sorted(suite_dir.rglob("metrics.json")):
            metrics = json.loads(metrics_file.read_text())
            if metrics.get("status") != "finished":
                continue
            arm = f"{suite_dir.name}/{metrics_file.parent.name.rsplit('_seed', 1)[0]}"
            rows[(arm, metrics["seed"])] = {
                "arm": arm,
                "seed": metrics["seed"],
                "acc": metrics["acc"],
                "bwt": metrics["bwt"],
                "val_acc": metrics.get("val_acc"),
                "final_accuracy_per_task": metrics["accuracy_matrix"][-1],
                "minutes": (metrics["train_time_s"] + metrics["eval_time_s"]) / 60,
                "config_hash": metrics["config_hash"],
                "command": rerun(metrics_file.parent, suite_dir.name, arm, metrics["seed"]),
            }
        lines = [json.dumps(rows[k], sort_keys=True) for k in sorted(rows)]
        if not lines:  # a suite under way with nothing finished yet: no empty results file
            continue
        path.write_text("".join(f"{line}\n" for line in lines))
        written.append(f"{path.name}: {len(lines)} runs")
    return written


def rerun(folder: Path, suite: str, arm: str, seed: int) -> str:
    """The command that reruns one job of a sweep: its overrides as Hydra recorded them."""
    recorded = folder / ".hydra" / "overrides.yaml"
    if not recorded.is_file():
        return f"afmbench run experiment={suite} arm={arm} seed={seed}"
    overrides = [line[2:] for line in recorded.read_text().splitlines() if line.startswith("- ")]
    first = sorted(overrides, key=lambda o: not o.startswith("experiment="))  # experiment first
    return "afmbench run " + " ".join(first)


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def table(suite: str, results: Path = RESULTS) -> str:
    """The comparison table of ``suite``: one row per arm, from ``results/<suite>.jsonl``."""
    source, figures = PUBLISHED.get(suite, ("", {}))
    by_arm: dict[str, list[dict]] = {}
    for row in read(results / f"{suite}.jsonl"):
        by_arm.setdefault(row["arm"], []).append(row)
    lines = [
        f"Command: `afmbench run -m experiment={suite}`, then `python benchmarks/published.py "
        f"collect table`. Published: {source}",
        "",
        "| method | published | afmbench (n seeds) | difference | within the spread? | "
        "minutes per run |",
        "|---|---|---|---|---|---|",
    ]
    order = list(figures)
    for arm in sorted(set(figures) | set(by_arm),
                      key=lambda a: (order.index(a) if a in order else len(order), a)):  # fmt: skip
        runs = by_arm.get(arm, [])
        paper = figures.get(arm)
        accs = [100 * r["acc"] for r in runs]
        mean = statistics.fmean(accs) if accs else None
        sd = statistics.stdev(accs) if len(accs) > 1 else None
        ours = (
            "not run yet"
            if mean is None
            else f"{mean:.2f}" + (f" ± {sd:.2f}" if sd is not None else "") + f" ({len(accs)})"
        )
        if paper is None:
            published, diff, within = "-", "-", "-"
        else:
            published = f"{paper.mean:.2f}" + (
                f" ± {paper.spread:.2f} ({paper.kind}, n={paper.n})" if paper.spread else ""
            )
            diff = "-" if mean is None else f"{mean - paper.mean:+.2f}"
            bound = 2 * max(paper.sd or 0.0, sd or 0.0)
            if mean is None or not bound:  # no spread on either side to judge by
                within = "-" if mean is None else "no spread to judge by"
            else:
                within = "yes" if abs(mean - paper.mean) <= bound else "no"
        minutes = f"{statistics.fmean(r['minutes'] for r in runs):.1f}" if runs else "-"
        label = paper.method if paper else _label(arm.split("/", 1)[1])
        lines.append(f"| {label} | {published} | {ours} | {diff} | {within} | {minutes} |")
    return "\n".join(lines) + "\n"


#: tuning suite -> the suite whose arms it sweeps over strengths (on a validation split)
TUNING = {"vandeven2019_split_mnist_tuning": "vandeven2019_split_mnist"}


def strengths(tuning: str) -> str:
    """Strengths two ways: per arm, the authors' value beside the one with the best mean
    validation ACC over seeds, with both test ACCs from the same (validation-split) runs."""
    suite = TUNING[tuning]
    runs: dict[str, dict[float, list[dict]]] = {}
    for row in read(RESULTS / f"{tuning}.jsonl"):
        arm, _, value = row["arm"].split("/", 1)[1].rpartition("_s")
        runs.setdefault(arm, {}).setdefault(float(value), []).append(row)
    lines = [
        f"Command: `afmbench run -m experiment={tuning} arm={suite}/<arm> "
        "strategy.<strength>=<values> seed=0,1` per arm, then `python benchmarks/published.py "
        "collect table`. A tenth of every class held out; ACC (%) mean over seeds.",
        "",
        "| method | authors' value | chosen on validation | validation ACC, chosen / authors' "
        "| test ACC, chosen / authors' | values tried (seeds) |",
        "|---|---|---|---|---|---|",
    ]
    for arm in sorted(runs, key=lambda a: (("task", "domain", "class").index(a.split("_")[0]), a)):
        by_value = runs[arm]
        authors = authors_strength(suite, arm)
        chosen = max(by_value, key=lambda v: statistics.fmean(r["val_acc"] for r in by_value[v]))

        seeds = sorted({len(rows) for rows in by_value.values()})
        lines.append(
            f"| {_label(arm)} | {authors:g} | {chosen:g}"
            + (" (the same)" if chosen == authors else "")
            + f" | {_percent(by_value, chosen, 'val_acc')} / {_percent(by_value, authors, 'val_acc')}"
            f" | {_percent(by_value, chosen, 'acc')} / {_percent(by_value, authors, 'acc')} | "
            f"{', '.join(f'{v:g}' for v in sorted(by_value))} ({'/'.join(map(str, seeds))}) |"
        )
    return "\n".join(lines) + "\n"


def _percent(by_value: dict[float, list[dict]], value: float, key: str) -> str:
    """Mean ``key`` in percent over the runs at ``value``, or "-" where none ran."""
    rows = by_value.get(value)
    return f"{statistics.fmean(100 * r[key] for r in rows):.2f}" if rows else "-"


def authors_strength(suite: str, arm: str) -> float:
    """The strength an arm of ``suite`` sets (``lambda_``, or SI's ``c``)."""
    strategy = yaml.safe_load((ARMS / suite / f"{arm}.yaml").read_text())["strategy"]
    return float(strategy.get("lambda_", strategy.get("c")))


METHODS = {"none": "none", "joint": "joint", "ewc": "EWC", "online_ewc": "online EWC",
           "si": "SI", "mas": "MAS", "er": "ER", "agem": "A-GEM", "lwf": "LwF"}  # fmt: skip


def _label(arm: str) -> str:
    """An arm without a published figure named as the published rows are: ``class-IL EWC``."""
    protocol, _, method = arm.partition("_")
    if protocol in ("task", "domain", "class") and method in METHODS:
        return f"{protocol}-IL {METHODS[method]}"
    return arm


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("steps", nargs="+", choices=("collect", "table"))
    parser.add_argument("--runs", default="runs/suites", help="the suites' run folders")
    options = parser.parse_args()
    if "collect" in options.steps:
        for line in collect(Path(options.runs)):
            print(line)
    if "table" in options.steps:
        suites = sorted(PUBLISHED)  # other suites' results have pages of their own
        for suite in suites:
            write_block(PAGE, suite, table(suite))
            for folder, label in EARLIER.items():
                if (RESULTS / folder / f"{suite}.jsonl").is_file():
                    earlier = table(suite, RESULTS / folder)
                    write_block(PAGE, f"{suite}-{folder}", f"{label}\n\n{earlier}")
        for tuning in TUNING:
            write_block(PAGE, tuning, strengths(tuning))
        print(f"wrote {PAGE} ({', '.join(suites)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
