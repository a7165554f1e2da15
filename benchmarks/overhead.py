"""Where an afmbench run's time goes beyond training and evaluation, and what its speed
tricks save.

Runs the quick speed benchmark's setting (Permuted MNIST, 3 tasks x 1 epoch, 10 000 training
samples a task, MLP 784-512-256-10, batch 128) through ``afmbench.run`` with a run folder, and
splits its wall time into training epochs, importance passes, evaluation, and the fixed cost
around them (Trainer construction, checkpoints and run-folder files, reports, setup), and
what drawing the run's figures afterwards (``afmbench plot``, or ``figures=true``) costs. Then
prices each of the module's speed tricks: how often a training step takes its path, times
what the fast path saves a call, against a step of the embedded default's scale.

    python benchmarks/overhead.py             # writes the overhead block of RESULTS.md
    python benchmarks/overhead.py --repeat 5  # medians over 5 rounds
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import torch
from generated import write_block
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.profilers import PassThroughProfiler
from speed import BATCH, HIDDEN, LAYER, LR, MOMENTUM, SETTINGS, TASKS, Limited

import afmbench
from afmbench.forgetting import ForgettingLayerCallback
from afmbench.loop import ExperienceLoop
from afmbench.models import named_parameters
from afmbench.module import ContinualModule
from afmbench.reporting import RunReporter, draw_figures
from afmbench.run_record import RunRecord
from afmbench.strategies import EWC, SI
from afmbench.trainers import Unprofiled

HERE = Path(__file__).resolve().parent
SAMPLES = 10_000

# The parts of a run, by the function that does each (wall time summed over its calls).
PARTS: dict[str, tuple[Any, str]] = {
    "Trainer construction": (Trainer, "__init__"),
    "checkpoints and run-folder files": (RunRecord, "save"),
    "W&B / logger reports after each experience": (RunReporter, "after_experience"),
    "summary at the end": (RunReporter, "finish"),
    "evaluation": (ExperienceLoop, "_validate"),
    "fit (training epochs and importance passes)": (Trainer, "fit"),
}


@contextmanager
def timed(spent: dict[str, float]) -> Iterator[None]:
    """Sum the wall time of every part of :data:`PARTS` into ``spent`` (outermost calls)."""
    depth: dict[str, int] = defaultdict(int)

    def wrap(label: str, original: Callable) -> Callable:
        def timed_call(*args, **kwargs):
            depth[label] += 1
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                depth[label] -= 1
                if depth[label] == 0:
                    spent[label] += time.perf_counter() - started

        return timed_call

    with ExitStack() as stack:
        for label, (owner, name) in PARTS.items():
            stack.enter_context(mock.patch.object(owner, name, wrap(label, getattr(owner, name))))
        yield


def one_run(scenario, plugins, seed: int) -> dict[str, float]:
    """Seconds per part of one run, plus ``total`` and ``fixed`` (all but training epochs,
    importance passes and evaluation: the arithmetic a plain loop does too)."""
    afmbench.seed_everything(seed, verbose=False)
    model = afmbench.build_model("mlp", scenario.input_shape, scenario.head_sizes, hidden=HIDDEN)
    epochs: list[float] = []
    spent: dict[str, float] = defaultdict(float)
    made = plugins()
    with tempfile.TemporaryDirectory() as folder, timed(spent), _epoch_clock(epochs):
        for plugin in made:  # each plugin's importance pass (and anchors) after an experience
            plugin.on_train_end = _summed(plugin.on_train_end, spent, "importance passes")
        started = time.perf_counter()
        result = afmbench.run(
            scenario, model, made, max_epochs=1, batch_size=BATCH, seed=seed,
            optimizer=afmbench.OptimizerConfig(lr=LR, momentum=MOMENTUM), run_dir=folder,
            verbose=False, trainer_kwargs={"accelerator": "cpu", "devices": 1},
        )  # fmt: skip
        spent["total"] = time.perf_counter() - started
    spent["training epochs"] = sum(epochs)
    fit = spent.pop("fit (training epochs and importance passes)")
    spent["Lightning's fit around the epochs"] = (
        fit - spent["training epochs"] - spent["importance passes"]
    )
    spent["setup and the rest"] = spent["total"] - sum(v for k, v in spent.items() if k != "total")
    arithmetic = spent["training epochs"] + spent["importance passes"] + spent["evaluation"]
    spent["fixed"] = spent["total"] - arithmetic
    with tempfile.TemporaryDirectory() as folder:
        started = time.perf_counter()
        draw_figures(Path(folder), result.metrics)
        spent["figures"] = time.perf_counter() - started
    return dict(spent)


def _summed(method: Callable, spent: dict[str, float], label: str) -> Callable:
    def timed_method(*args, **kwargs):
        started = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            spent[label] += time.perf_counter() - started

    return timed_method


class InMemory:
    """A scenario whose (``--quick``-sized) splits are read once, before any timing: a run's
    own data loading is the plain loop's too, and not what this measures."""

    def __init__(self, scenario) -> None:
        self._scenario = scenario
        n = scenario.n_experiences
        self._train = [scenario.train(i) for i in range(n)]
        self._test = [scenario.test(i) for i in range(n)]

    def __getattr__(self, name):
        return getattr(self._scenario, name)

    def train(self, index: int):
        return self._train[index]

    def test(self, index: int):
        return self._test[index]


@contextmanager
def _epoch_clock(epochs: list[float]) -> Iterator[None]:
    """Time every training epoch (Lightning's epoch loop ``run``, start to end)."""
    from lightning.pytorch.loops import _TrainingEpochLoop

    original = _TrainingEpochLoop.run

    def run(self, *args, **kwargs):
        started = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            epochs.append(time.perf_counter() - started)

    with mock.patch.object(_TrainingEpochLoop, "run", run):
        yield


def trick_costs(repeat: int) -> dict[str, tuple[float, float, float]]:
    """For each speed trick: (calls per training step, µs saved per call, µs per step of the
    embedded default's scale: digits, MLP 64-64, batch 32, SI's per-step hooks). End-to-end
    epochs are too noisy on a shared CPU to show a few percent, so each trick's slow and fast
    paths are timed on their own and multiplied by how often a step takes them."""
    scenario = afmbench.build_scenario("permuted_digits", n_experiences=2)
    afmbench.seed_everything(0, verbose=False)
    model = afmbench.build_model("mlp", scenario.input_shape, scenario.head_sizes, hidden=[64, 64])
    calls = dict.fromkeys(("setattr", "profile", "parameters"), 0)
    steps: list[int] = []
    vetted, fast_setattr = LightningModule.__setattr__, ContinualModule.__setattr__
    fast_profile, fast_params = Unprofiled.profile, ContinualModule.trainable_parameters

    def counted(key: str, method: Callable) -> Callable:
        def call(*args, **kwargs):
            calls[key] += 1
            return method(*args, **kwargs)

        return call

    class Steps(afmbench.ContinualPlugin):
        name = "steps"

        def on_train_end(self, trainer, module) -> None:
            steps.append(trainer.global_step)

    with ExitStack() as stack:
        for owner, name, key, method in (
            (ContinualModule, "__setattr__", "setattr", fast_setattr),
            (Unprofiled, "profile", "profile", fast_profile),
            (ContinualModule, "trainable_parameters", "parameters", fast_params),
        ):
            stack.enter_context(mock.patch.object(owner, name, counted(key, method)))
        epochs: list[float] = []
        stack.enter_context(_epoch_clock(epochs))
        afmbench.run(scenario, model, [SI(), Steps()], max_epochs=5, batch_size=32,
                     verbose=False, trainer_kwargs={"accelerator": "cpu", "devices": 1})  # fmt: skip
    step_us = 1e6 * sum(epochs) / sum(steps)
    module = ContinualModule(model, 2, 3)
    quiet = Unprofiled()
    default = PassThroughProfiler()  # Lightning's default: a generator-based context a call
    pairs = {
        "setattr": (lambda: vetted(module, "_current_fx_name", "x"),
                    lambda: fast_setattr(module, "_current_fx_name", "x")),
        "profile": (lambda: _enter_exit(default.profile("a")),
                    lambda: _enter_exit(fast_profile(quiet, "a"))),
        "parameters": (lambda: named_parameters(model), lambda: {}),
    }  # fmt: skip
    costs = {}
    for key, (slow, fast) in pairs.items():
        saved = statistics.median(_us(slow) - _us(fast) for _ in range(repeat))
        costs[key] = (calls[key] / sum(steps), saved, step_us)
    return costs


def _enter_exit(context) -> None:
    with context:
        pass


def _us(fn: Callable[[], object], n: int = 20_000) -> float:
    """Microseconds per call of ``fn``."""
    started = time.perf_counter()
    for _ in range(n):
        fn()
    return 1e6 * (time.perf_counter() - started) / n


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="rounds (medians are reported)")
    parser.add_argument("--output", default=str(HERE / "RESULTS.md"), help="the report")
    options = parser.parse_args()
    full = afmbench.build_scenario("permuted_mnist", n_experiences=TASKS, seed=0)
    scenario = InMemory(Limited(full, SAMPLES))
    variants: dict[str, Callable[[], list]] = {
        "naive": lambda: [],
        "ewc+fl": lambda: [EWC(**SETTINGS["ewc"]), ForgettingLayerCallback(**LAYER)],
    }
    one_run(InMemory(Limited(full, 2048)), variants["ewc+fl"], 0)  # warm-up: imports, tracing
    parts: dict[str, dict[str, list[float]]] = {n: defaultdict(list) for n in variants}
    for round_ in range(options.repeat):
        for name, plugins in variants.items():
            for key, value in one_run(scenario, plugins, round_).items():
                parts[name][key].append(value)
        print(f"round {round_ + 1}/{options.repeat} done", flush=True)
    tricks = trick_costs(options.repeat)
    text = _report(parts, tricks, options)
    write_block(Path(options.output), "overhead", text)
    print(text)
    return 0


def _report(parts, tricks, options) -> str:
    med = statistics.median
    rows = [k for k in parts["naive"] if k not in ("total", "fixed", "figures")]
    lines = [
        "## Where a short run's time goes",
        "",
        f"`afmbench.run` with a run folder on the quick setting: Permuted MNIST, {TASKS} tasks x 1 "
        f"epoch, {SAMPLES:,} training samples a task, MLP 784-512-256-10, batch {BATCH}; medians "
        f"of {options.repeat} rounds, seconds per run.",
        "",
        f"Machine: {platform.machine()}, {torch.get_num_threads()} threads; torch "
        f"{torch.__version__}, CPU. Date: {time.strftime('%Y-%m-%d')}. Command: "
        f"`python benchmarks/overhead.py --repeat {options.repeat}`",
        "",
        "| part | " + " | ".join(f"{n} s" for n in parts) + " |",
        "|---|" + "---|" * len(parts),
    ]
    for key in [*rows, "total", "fixed", "figures"]:
        label = {
            "total": "**total**",
            "fixed": "**fixed cost** (all but training, importance passes and evaluation)",
            "figures": "figures, if drawn (`figures=true` or `afmbench plot`; not in the total)",
        }.get(key, key)
        lines.append(
            f"| {label} | " + " | ".join(f"{med(parts[n][key]):.2f}" for n in parts) + " |"
        )
    names = {
        "setattr": "`ContinualModule.__setattr__` bypass",
        "profile": "`Unprofiled` profiler",
        "parameters": "per-epoch parameter cache (`trainable_parameters`)",
    }
    step_us = next(iter(tricks.values()))[2]
    lines += [
        "",
        f"| speed trick (a step of the embedded default's scale: {step_us:.0f} µs) "
        "| calls a step | µs saved a call | share of a step |",
        "|---|---|---|---|",
    ]
    for key, (per_step, saved, step) in tricks.items():
        lines.append(
            f"| {names[key]} | {per_step:.1f} | {saved:.2f} | {100 * per_step * saved / step:.1f}% |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
