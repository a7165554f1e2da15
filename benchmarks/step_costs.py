"""What each method's arithmetic adds to one training step, with no framework around it.

The floor under the "time over naive" targets of benchmarks/speed.py: one step of the speed
benchmark's plain loop (:class:`speed.PlainStep`: its MLP, batch size and SGD, on a fixed
batch), alone and with SI's path integral, a closed-form quadratic penalty (EWC, MAS, ANPyC,
and SI from the second task), and the forgetting layer's gates, ERS and IRS. afmbench runs the
same tensor operations. Rounds interleave the variants, since this machine's speed drifts;
each cost over the naive step is the median of the ratios within a round.

    python benchmarks/step_costs.py              # writes the step-costs block of RESULTS.md
"""

from __future__ import annotations

import argparse
import os
import platform
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from generated import write_block
from speed import BATCH, HIDDEN, LAYER, LR, MOMENTUM, PathIntegral, PlainStep

import afmbench
from afmbench.forgetting.layer import attach

HERE = Path(__file__).resolve().parent
LOSSES = (LAYER["lambda_f"], LAYER["beta"])  # the layer's ERS and IRS weights
#: name: (SI path integral, quadratic penalty, gates, ERS weight, IRS weight)
VARIANTS: dict[str, tuple[bool, bool, bool, float, float]] = {
    "naive": (False, False, False, 0.0, 0.0),
    "SI path integral (first task)": (True, False, False, 0.0, 0.0),
    "quadratic penalty (EWC, MAS, ANPyC)": (False, True, False, 0.0, 0.0),
    "SI from the second task (path integral + penalty)": (True, True, False, 0.0, 0.0),
    "forgetting layer: gates only": (False, False, True, 0.0, 0.0),
    "forgetting layer: gates + ERS": (False, False, True, LOSSES[0], 0.0),
    "forgetting layer: gates + ERS + IRS": (False, False, True, *LOSSES),
    "EWC + forgetting layer (second task on)": (False, True, True, *LOSSES),
}


def make_step(si: bool, penalty: bool, gates: bool, lambda_f: float, beta: float) -> Callable:
    """A closure running one plain-loop step of the variant on a fixed random batch."""
    torch.manual_seed(0)
    model = afmbench.build_model("mlp", (1, 28, 28), [10], hidden=HIDDEN)
    layers = attach(model, LAYER["rho"], LAYER["mode"]) if gates else []
    params = dict(model.named_parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    # one consolidated term, as after the first task (importance values only scale the work)
    terms = (
        [({n: torch.rand_like(p) for n, p in params.items()},
          {n: p.detach().clone() for n, p in params.items()})]
        if penalty else []
    )  # fmt: skip
    path = PathIntegral.of(params, {n: torch.zeros_like(p) for n, p in params.items()})
    x, y = torch.rand(BATCH, 1, 28, 28), torch.randint(0, 10, (BATCH,))
    step = PlainStep(model, optimizer, layers, 1e-3, {**LAYER, "lambda_f": lambda_f, "beta": beta})
    return lambda: step(x, y, terms, path if si else None)


def milliseconds(step: Callable, steps: int) -> float:
    for _ in range(20):  # warm caches and the allocator
        step()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - started) / steps * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7, help="rounds over all variants")
    parser.add_argument("--steps", type=int, default=300, help="timed steps per variant a round")
    parser.add_argument("--output", default=str(HERE / "RESULTS.md"), help="the report")
    options = parser.parse_args()
    steps = {name: make_step(*flags) for name, flags in VARIANTS.items()}
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for round_ in range(options.rounds):
        for name, step in steps.items():
            times[name].append(milliseconds(step, options.steps))
        print(f"round {round_ + 1}/{options.rounds}: naive {times['naive'][-1]:.2f} ms", flush=True)
    text = _report(times, options)
    write_block(Path(options.output), "step-costs", text)
    print(text)
    return 0


def _report(times: dict[str, list[float]], options) -> str:
    def over(name: str, base: str) -> float:
        return float(np.median(np.array(times[name]) / np.array(times[base])) - 1)

    command = "python benchmarks/step_costs.py"
    command += f" --rounds {options.rounds}" if options.rounds != 7 else ""
    command += f" --steps {options.steps}" if options.steps != 300 else ""
    description = (
        f"One step of the speed benchmark's plain loop (MLP 784-{'-'.join(map(str, HIDDEN))}-10, "
        f"batch {BATCH}, SGD with momentum) on a fixed batch; {options.steps} steps per variant, "
        f"{options.rounds} interleaved rounds; ms are medians, costs the median of the ratios "
        "within a round."
    )
    lines = [
        "## What a step's arithmetic costs, without a framework",
        "",
        textwrap.fill(description, 100, break_long_words=False, break_on_hyphens=False),
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU. "
        f"Date: {time.strftime('%Y-%m-%d')}. Command: `{command}`",
        "",
        "| step | ms | over naive |",
        "|---|---|---|",
    ]
    for name, runs in times.items():
        cost = "-" if name == "naive" else f"{over(name, 'naive'):+.0%}"
        lines.append(f"| {name} | {np.median(runs):.2f} | {cost} |")
    layer = over("EWC + forgetting layer (second task on)", "quadratic penalty (EWC, MAS, ANPyC)")
    lines += ["", f"The forgetting layer over the same EWC step without it: {layer:+.0%}."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
