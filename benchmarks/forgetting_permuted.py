"""Permuted MNIST, 10 tasks, MLP 784-512-256 with one head per task (the AFM paper's Fig. 5):
EWC, MAS and ANPyC each with and without the forgetting layer, against naive and joint, and the
distribution of each strategy's parameter importance with and without the layer.

  tune   the layer's rho / lambda_f / beta / mode for EWC + layer on the first ``--tasks``
         permutations, 10,000 training images of each held out for validation;
  final  every configuration on all 10 tasks, scored on the test sets.

    python benchmarks/forgetting_permuted.py tune  --tasks 3 --out runs/bench/permuted
    python benchmarks/forgetting_permuted.py final --out runs/bench/permuted

Strategies run at the fixed strengths of ``STRENGTHS``, the same with and without the layer.
Results are JSON under ``--out`` (plus importance.png); tables print as Markdown. Set
AFMBENCH_DATA_DIR to the folder holding MNIST/raw/*.gz.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.pyplot as plt
import numpy as np
import torch
from forgetting_fmnist import command_line, holdout  # the sibling script

from afmbench.api import run
from afmbench.config import OptimizerConfig
from afmbench.errors import DivergenceError
from afmbench.forgetting import ForgettingLayerCallback
from afmbench.models import build_model
from afmbench.scenarios import Scenario, build_scenario
from afmbench.strategies import EWC, MAS, SI, ANPyC

matplotlib.use("Agg")

HIDDEN = (512, 256)
BATCH_SIZE = 64
PLUGINS = {"naive": None, "joint": None, "ewc": EWC, "si": SI, "mas": MAS, "anpyc": ANPyC}
CONFIGS = ("naive", "naive+fl", "joint", "ewc", "ewc+fl", "mas", "mas+fl", "anpyc", "anpyc+fl")
TUNE_GRID = [
    {"mode": m, "rho": 4.0, "lambda_f": lf, "beta": 1e-5}
    for m in ("shortcut", "gate")
    for lf in (0.1, 1.0)
]
#: The strengths the committed results were measured with (the strategy configs' defaults have
#: since been tuned on other settings; the afm_fig5 experiment config uses those instead).
STRENGTHS: dict[str, dict[str, float]] = {
    "ewc": {"lambda_": 100.0},
    "mas": {"lambda_": 1.0},
    "anpyc": {"lambda_": 3.0},
}
LOG_EDGES = np.concatenate([[0.0], np.logspace(-6, 0, 25)])


def first_tasks(scenario: Scenario, n: int) -> Scenario:
    return Scenario.from_tensors(
        scenario.name,
        scenario.protocol,
        [scenario.train(e) for e in range(n)],
        [scenario.test(e) for e in range(n)],
        scenario.head_sizes[:n],
    )


def train(
    config: str,
    scenario: Scenario,
    layer: dict[str, Any],
    args: argparse.Namespace,
    seed: int,
    folder: Path,
) -> dict[str, Any]:
    """One run of ``config`` (``<strategy>[+fl]``) in run folder ``folder``; returns its metrics
    and importance histogram, or where it diverged."""
    strategy, _, with_layer = config.partition("+")
    cls = PLUGINS[strategy]
    plugins = [cls(**STRENGTHS.get(strategy, {}))] if cls else []
    if with_layer:
        plugins.append(ForgettingLayerCallback(**layer))
    torch.manual_seed(seed)
    model = build_model("mlp", scenario.input_shape, scenario.head_sizes, hidden=HIDDEN)
    shutil.rmtree(folder, ignore_errors=True)  # a run killed before its result was saved
    started = time.perf_counter()
    try:
        result = run(
            scenario,
            model,
            plugins,
            joint=strategy == "joint",
            max_epochs=args.epochs,
            batch_size=BATCH_SIZE,
            optimizer=OptimizerConfig(lr=args.lr, momentum=0.9),
            seed=seed,
            run_dir=folder,
            verbose=False,
        )
    except DivergenceError as error:
        saved = json.loads((folder / "metrics.json").read_text())
        return {
            "diverged": error.problem,
            "acc": None,
            "bwt": None,
            "seconds": time.perf_counter() - started,
            "accuracy_matrix": saved["accuracy_matrix"],
            "avg_acc_per_task": saved.get("avg_acc_per_task"),
        }
    metrics = {k: result.metrics[k] for k in ("acc", "bwt", "forgetting", "avg_acc_per_task")}
    metrics["accuracy_matrix"] = result.accuracy_matrix.tolist()
    metrics["seconds"] = time.perf_counter() - started
    if cls:
        metrics["importance"] = importance_summary(plugins[0].importance())
    return metrics


def importance_summary(importance: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Histogram (log-spaced bins) of every importance value divided by the largest."""
    values = torch.cat([v.flatten().float().cpu() for v in importance.values()]).numpy()
    scaled = values / max(values.max(), np.finfo(np.float32).tiny)
    counts, _ = np.histogram(scaled, bins=LOG_EDGES)
    return {
        "counts": counts.tolist(),
        "edges": LOG_EDGES.tolist(),
        "below_1e-3": float((scaled < 1e-3).mean()),
        "above_1e-1": float((scaled > 1e-1).mean()),
        "gini": gini(scaled),
    }


def gini(values: np.ndarray) -> float:
    """Gini coefficient: 0 when every parameter is equally important, near 1 when a few are."""
    v = np.sort(values)
    n = len(v)
    return float((2 * np.arange(1, n + 1) - n - 1) @ v / (n * v.sum())) if v.sum() > 0 else 0.0


def tune(args: argparse.Namespace) -> None:
    data = holdout(
        first_tasks(
            build_scenario("permuted_mnist", n_experiences=10, protocol="task"), args.tasks
        ),
        10_000,
    )
    path = args.out / "tune.json"
    done = json.loads(path.read_text()) if path.is_file() else {}
    for layer in TUNE_GRID:
        key = json.dumps(layer, sort_keys=True)
        if key not in done:
            run_dir = args.out / "runs" / f"tune {key}"
            done[key] = {"layer": layer, **train("ewc+fl", data, layer, args, 0, run_dir)}
            done[key].pop("importance", None)
            print(f"ewc+fl {key}: validation ACC {done[key]['acc']:.4f}", flush=True)
            path.write_text(json.dumps(done, indent=1))
    reference = args.out / "tune_ewc.json"
    if not reference.is_file():
        reference.write_text(
            json.dumps(train("ewc", data, {}, args, 0, args.out / "runs" / "tune ewc"), indent=1)
        )
    print("| layer setting (EWC + layer) | validation ACC |\n|---|---|")
    for r in sorted(done.values(), key=lambda r: -r["acc"]):
        print(f"| {json.dumps(r['layer'])} | {r['acc']:.4f} |")
    print(f"| EWC without the layer | {json.loads(reference.read_text())['acc']:.4f} |")


def final(args: argparse.Namespace) -> None:
    done = json.loads((args.out / "tune.json").read_text())
    layer = (
        json.loads(args.layer)
        if args.layer
        else max(done.values(), key=lambda r: r["acc"])["layer"]
    )
    label = f" {args.layer}" if args.layer else ""  # runs with another layer setting are kept apart
    scenario = build_scenario("permuted_mnist", n_experiences=10, protocol="task")
    path = args.out / "final.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    for config in args.configs:
        for seed in args.seeds:
            key = f"{config}{label} seed{seed}"
            if key not in results:
                results[key] = {
                    "config": config + label,
                    "seed": seed,
                    "layer": layer,
                    **train(config, scenario, layer, args, seed, args.out / "runs" / key),
                }
                print(
                    f"{key}: {outcome(results[key])} ({results[key]['seconds']:.0f} s)", flush=True
                )
                path.write_text(json.dumps(results, indent=1))
    print(final_tables(results))
    plot_importance(results, args.out / "importance.png")


def outcome(result: dict[str, Any]) -> str:
    if result["acc"] is None:
        return f"diverged in task {len(result['accuracy_matrix']) + 1}"
    return f"ACC {result['acc']:.4f}"


def final_tables(results: dict[str, dict]) -> str:
    lines = [
        "| configuration | ACC | BWT | average accuracy after tasks 1..10 |",
        "|---|---|---|---|",
    ]
    configs = list(dict.fromkeys(r["config"] for r in results.values()))
    for config in configs:
        rows = [r for r in results.values() if r["config"] == config]
        diverged = [r for r in rows if r["acc"] is None]
        if diverged:
            matrix = diverged[0]["accuracy_matrix"]
            curve = " ".join(f"{np.mean(row[: i + 1]):.3f}" for i, row in enumerate(matrix))
            lines.append(f"| {config} | {outcome(diverged[0])} | – | {curve} |")
            continue
        acc = np.mean([r["acc"] for r in rows])
        bwt = "–" if rows[0]["bwt"] is None else f"{np.mean([r['bwt'] for r in rows]):+.4f}"
        curve = " ".join(f"{a:.3f}" for a in np.mean([r["avg_acc_per_task"] for r in rows], axis=0))
        lines.append(f"| {config} (n={len(rows)}) | {acc:.4f} | {bwt} | {curve} |")
    lines += [
        "",
        "| configuration | share < 1e-3 x max | share > 0.1 x max | Gini |",
        "|---|---|---|---|",
    ]
    for config in configs:
        rows = [
            r["importance"] for r in results.values() if r["config"] == config and "importance" in r
        ]
        if rows:
            low, high, gini_ = (
                np.mean([r[k] for r in rows]) for k in ("below_1e-3", "above_1e-1", "gini")
            )
            lines.append(f"| {config} | {low:.3f} | {high:.4f} | {gini_:.3f} |")
    return "\n".join(lines)


def plot_importance(results: dict[str, dict], path: Path) -> None:
    strategies = [
        s
        for s in ("ewc", "mas", "anpyc")
        if any(r["config"].startswith(s) and "importance" in r for r in results.values())
    ]
    if not strategies:
        return
    figure, axes = plt.subplots(
        1, len(strategies), figsize=(4 * len(strategies), 3.2), squeeze=False
    )
    for ax, strategy in zip(axes[0], strategies):
        for r in results.values():
            if r["config"].split("+")[0].split(" ")[0] == strategy and "importance" in r:
                counts = np.array(r["importance"]["counts"])
                ax.stairs(counts / counts.sum(), np.maximum(LOG_EDGES, 1e-7), label=r["config"])
        ax.set_xscale("log")
        ax.set_title(strategy)
        ax.set_xlabel("importance / max")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("share of parameters")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tasks", type=int, default=3, help="permutations used for tuning")
    parser.add_argument("--epochs", type=int, default=1, help="epochs per task")
    parser.add_argument("--lr", type=float, default=0.01, help="SGD learning rate (momentum 0.9)")
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--layer", help="final: a JSON layer setting instead of the tuned one")


if __name__ == "__main__":
    command_line(__doc__, {"tune": tune, "final": final}, "runs/bench/permuted", arguments)
