"""Fashion-MNIST with the AFM paper's MLP 784-256-256-128-10 (its Figs. 2-4): test accuracy
and per-layer sparsity with and without the forgetting layer, against L1 (on activations) and
L2 regularization, and the unit-ablation curves.

Two stages, so no choice ever sees the test set:

  tune   train every grid point on 50,000 training images, score on the 10,000 held out;
  final  retrain each variant's best grid point on all 60,000 and report test accuracy,
         sparsity (eq. 1, divided by 1 - 1/N) and the probes (ablation, importance).

    python benchmarks/forgetting_fmnist.py tune  --epochs 10 --out runs/bench/fmnist
    python benchmarks/forgetting_fmnist.py final --epochs 10 --seeds 0 1 --out runs/bench/fmnist

Both print Markdown tables; results are JSON under ``--out``. Set AFMBENCH_DATA_DIR to the
folder holding FashionMNIST/raw/*.gz.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from afmbench.api import run
from afmbench.config import OptimizerConfig
from afmbench.forgetting import ForgettingLayerCallback, sites
from afmbench.models import build_model
from afmbench.plugin import ContinualPlugin
from afmbench.probes import Subject, run_probes, sparsity
from afmbench.scenarios import Scenario, build_scenario

HIDDEN = (256, 256, 128)
BATCH_SIZE = 64


class ActivationL1(ContinualPlugin):
    """``strength * mean over the batch of sum_units |h|`` over every hidden activation: the L1
    sparsity baseline of the paper's Fig. 3a / 4a."""

    name = "l1"

    def __init__(self, strength: float) -> None:
        self.strength = strength
        self.outputs: list[Tensor] = []
        self.handles: list[Any] = []

    def setup(self, trainer, pl_module, stage: str) -> None:
        if not self.handles:
            body = pl_module.model.body
            self.handles = [
                body.get_submodule(s.name).register_forward_hook(self._keep)
                for s in sites(pl_module.model)
            ]

    def _keep(self, module, inputs, output: Tensor) -> None:
        if module.training:
            self.outputs.append(output)

    def penalty(self, module) -> Tensor | None:
        outputs, self.outputs = self.outputs, []
        if not outputs:
            return None
        return self.strength * sum(h.abs().flatten(1).sum(1).mean() for h in outputs)


@dataclass(frozen=True)
class Variant:
    """One training recipe. ``grid`` lists the settings tried on the validation split; with
    ``based_on``, each grid entry extends the best setting found for that other variant (a
    coordinate search: the IRS weight beta is tuned on top of the best ERS-only switches)."""

    name: str
    grid: list[dict[str, float]]
    plugins: Callable[..., list[ContinualPlugin]] = lambda **_: []
    weight_decay: Callable[..., float] = lambda **_: 0.0
    based_on: str | None = None


def forgetting(mode: str, irs: bool) -> Callable[..., list[ContinualPlugin]]:
    return lambda **p: [ForgettingLayerCallback(mode=mode, irs=irs, **p)]


FL_GRID = [{"rho": r, "lambda_f": lf} for r in (1.0, 4.0, 16.0) for lf in (0.01, 0.1, 1.0, 10.0)]
BETA_GRID = [{"beta": b} for b in (1e-5, 1e-4, 1e-3)]
VARIANTS = {
    v.name: v
    for v in (
        Variant("sgd", [{}]),
        Variant(
            "l1",
            [{"strength": s} for s in (1e-5, 1e-4, 1e-3)],
            lambda strength: [ActivationL1(strength)],
        ),
        Variant("l2", [{"wd": w} for w in (1e-5, 1e-4, 1e-3)], weight_decay=lambda wd: wd),
        # the paper's ablations: switches without their losses ("forgetting layer*" of Fig. 3c),
        # inhibition (ERS, eq. 3 gate), inhibition + shortcut (eq. 5), full (ERS + IRS)
        Variant(
            "switches",
            [{"rho": r} for r in (1.0, 4.0)],
            lambda rho: [ForgettingLayerCallback(rho, ers=False, irs=False)],
        ),
        Variant("inhibition", FL_GRID, forgetting("gate", irs=False)),
        Variant("inhibition_shortcut", FL_GRID, forgetting("shortcut", irs=False)),
        Variant(
            "full", BETA_GRID, forgetting("shortcut", irs=True), based_on="inhibition_shortcut"
        ),
        Variant("full_gate", BETA_GRID, forgetting("gate", irs=True), based_on="inhibition"),
    )
}


def grid(variant: Variant, done: dict[str, dict]) -> list[dict[str, float]]:
    if variant.based_on is None:
        return variant.grid
    return [{**best(done, variant.based_on), **extra} for extra in variant.grid]


def holdout(scenario: Scenario, n_val: int, seed: int = 0) -> Scenario:
    """The same experiences with ``n_val`` training samples of each held out as its test set."""
    trains, vals = [], []
    for e in range(scenario.n_experiences):
        split = scenario.train(e)
        order = torch.randperm(len(split[0]), generator=torch.Generator().manual_seed(seed + e))
        trains.append(tuple(t[order[n_val:]] for t in split))
        vals.append(tuple(t[order[:n_val]] for t in split))
    return Scenario.from_tensors(
        f"{scenario.name}_val",
        scenario.protocol,
        trains,
        vals,
        scenario.head_sizes,
        scenario.classes,
    )


def train(variant: Variant, params: dict[str, float], scenario: Scenario, epochs: int, seed: int):
    """One run; returns the trained model and its accuracy on the scenario's test split."""
    torch.manual_seed(seed)
    model = build_model("mlp", scenario.input_shape, scenario.head_sizes, hidden=HIDDEN)
    optimizer = OptimizerConfig(lr=0.05, momentum=0.9, weight_decay=variant.weight_decay(**params))
    started = time.perf_counter()
    result = run(
        scenario,
        model,
        variant.plugins(**params),
        max_epochs=epochs,
        batch_size=BATCH_SIZE,
        optimizer=optimizer,
        seed=seed,
        verbose=False,
    )
    return model, float(result.accuracy_matrix[-1].mean()), time.perf_counter() - started


def tune(args: argparse.Namespace) -> None:
    data = holdout(build_scenario("split_fashion_mnist", n_experiences=1, protocol="class"), 10_000)
    path = args.out / "tune.json"
    done = json.loads(path.read_text()) if path.is_file() else {}
    for name in args.variants:
        for params in grid(VARIANTS[name], done):
            key = f"{name} {json.dumps(params, sort_keys=True)}"
            if key in done:
                continue
            _, acc, seconds = train(VARIANTS[name], params, data, args.epochs, seed=0)
            done[key] = {
                "variant": name,
                "params": params,
                "val_acc": acc,
                "seconds": seconds,
                "epochs": args.epochs,
            }
            print(f"{key}: validation accuracy {acc:.4f} ({seconds:.0f} s)", flush=True)
            path.write_text(json.dumps(done, indent=1))
    print(tune_table(done))


def best(done: dict[str, dict], name: str) -> dict[str, float]:
    rows = [r for r in done.values() if r["variant"] == name]
    return max(rows, key=lambda r: r["val_acc"])["params"]


def tune_table(done: dict[str, dict]) -> str:
    lines = ["| variant | setting | validation accuracy |", "|---|---|---|"]
    for r in sorted(done.values(), key=lambda r: (r["variant"], -r["val_acc"])):
        lines.append(f"| {r['variant']} | {json.dumps(r['params'])} | {r['val_acc']:.4f} |")
    return "\n".join(lines)


def final(args: argparse.Namespace) -> None:
    done = json.loads((args.out / "tune.json").read_text())
    scenario = build_scenario("split_fashion_mnist", n_experiences=1, protocol="class")
    path = args.out / "final.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    for name in args.variants:
        params = best(done, name)
        for seed in args.seeds:
            key = f"{name} seed{seed}"
            if key in results:
                continue
            model, acc, seconds = train(VARIANTS[name], params, scenario, args.epochs, seed)
            subject = Subject(model, scenario.test(0), scenario.train(0))
            layers = sparsity(model, subject.test)["layers"]
            if seed == args.seeds[0] and name in args.probe_variants:
                probes = ("importance", "ablation", "pruning", "perturbation")
                run_probes(subject, args.out / "probes" / name, probes, seed=seed)
            results[key] = {
                "variant": name,
                "seed": seed,
                "params": params,
                "test_acc": acc,
                "seconds": seconds,
                "sparsity": {k: v["sparsity"] for k, v in layers.items()},
            }
            print(
                f"{key}: test accuracy {acc:.4f}, sparsity {results[key]['sparsity']}", flush=True
            )
            path.write_text(json.dumps(results, indent=1))
    print(final_table(results))
    print(probe_table(args.out / "probes"))


def final_table(results: dict[str, dict]) -> str:
    lines = [
        "| variant | setting | test accuracy (mean ± std) | sparsity per hidden layer |",
        "|---|---|---|---|",
    ]
    for name in VARIANTS:
        rows = [r for r in results.values() if r["variant"] == name]
        if not rows:
            continue
        acc = torch.tensor([r["test_acc"] for r in rows], dtype=torch.float64)
        spars = torch.tensor(
            [list(r["sparsity"].values()) for r in rows], dtype=torch.float64
        ).mean(0)
        std = f" ± {acc.std():.4f}" if len(rows) > 1 else ""
        lines.append(
            f"| {name} | {json.dumps(rows[0]['params'])} | {acc.mean():.4f}{std} (n={len(rows)}) | "
            + " / ".join(f"{s:.3f}" for s in spars)
            + " |"
        )
    return "\n".join(lines)


def probe_table(folder: Path) -> str:
    """Accuracy with half of every layer's units removed (by importance order and at random),
    with 90 % of body weights pruned, and with half of the last hidden layer's units perturbed."""
    header = (
        "| variant | importance from | 50 % units removed: least / most important first / random "
        "| 90 % weights pruned: eq. 2 / random | 50 % of last layer perturbed |"
    )
    lines = [header, "|---|---|---|---|---|"]
    for name in VARIANTS:
        if not (folder / name / "ablation.json").is_file():
            continue
        ablation, pruning, perturbation = (
            json.loads((folder / name / f"{p}.json").read_text())
            for p in ("ablation", "pruning", "perturbation")
        )
        half = ablation["fractions"].index(0.5)
        everything = ablation["groups"]["all"]
        ninety = pruning["fractions"].index(0.9)
        last = list(perturbation["layers"].values())[-1]
        lines.append(
            f"| {name} | {ablation['importance_source']} | {everything['ascending'][half]:.3f} / "
            f"{everything['descending'][half]:.3f} / {everything['random_mean'][half]:.3f} | "
            f"{pruning['importance'][ninety]:.3f} / {pruning['random_mean'][ninety]:.3f} | "
            f"{last['accuracy_mean'][perturbation['fractions'].index(0.5)]:.3f} |"
        )
    return "\n".join(lines)


def command_line(
    doc: str, stages: dict[str, Callable], out: str, add: Callable[[argparse.ArgumentParser], None]
):
    """Parse a benchmark's command line (``STAGE [options]``) and run the stage."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("stage", choices=tuple(stages))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--out", type=Path, default=Path(out))
    add(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    stages[args.stage](args)


def arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument(
        "--probe-variants",
        nargs="+",
        default=["sgd", "inhibition", "inhibition_shortcut", "full", "full_gate"],
    )


if __name__ == "__main__":
    command_line(__doc__, {"tune": tune, "final": final}, "runs/bench/fmnist", arguments)
