"""How fast afmbench trains, next to a plain PyTorch loop and to Avalanche's own strategies.

One run, one machine, Permuted MNIST (domain-incremental, one shared head), 3 tasks x 1 epoch,
the same MLP, batch size and SGD for every contender:

  (a) afmbench end to end: ``afmbench.run`` with its run folder, importance passes,
      evaluation on every test set after every experience and checkpoints;
  (b) a plain PyTorch loop over the same preloaded tensors doing the same training (same
      seeds, same batch order), the same importance computations and, for ER and A-GEM, the
      same replay draws from the same buffer: the floor;
  (c) Avalanche's strategy (Naive, EWC, SynapticIntelligence, MAS) on Avalanche's own
      PermutedMNIST with its per-sample data pipeline, each strength set for equal ACC (see
      ``run_avalanche``; its SI with copied weight snapshots, see ``copying_si_weights``).

It prints wall times, ratios and final ACC side by side, writes benchmarks/RESULTS.md with the
machine and the command, and with ``--quick`` (10 000 training samples per experience) ends
with one JSON line holding ``ratio_vs_plain`` and ``ratio_vs_avalanche`` (worst strategy) for
scripts. Also measured: each method's overhead over naive, the share of each importance pass
(vs one epoch of training), and memory after each experience.

    python benchmarks/speed.py --repeat 5      # full: 60 000 samples per experience, 5 rounds
    python benchmarks/speed.py --quick         # about a minute; prints the JSON line
    python benchmarks/speed.py --device cuda   # on a GPU (the default when there is one)

The plain loop uses the same arithmetic as afmbench wherever afmbench found a cheaper form
(closed-form penalty gradients, the fused ANPyC score), so the ratio (a)/(b) measures the
framework and nothing else. ``--repeat N`` runs N rounds over every strategy and contender,
each round from the next training seed (the permutations stay those of ``--seed``). It
reports each cell's median run, each ratio as the median of the ratios within a round, and
the mean ACC over the N seeds: this CPU's speed drifts for minutes at a time, and single
trainings differ by about a point in ACC. All three contenders train on ``--device``; a GPU
run's table is written to its own block of the report.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import psutil
import torch
import torch.nn.functional as F
from generated import write_block
from lightning.pytorch import seed_everything

import afmbench
from afmbench.forgetting import ForgettingLayerCallback
from afmbench.forgetting.callback import SPARSITY_SAMPLES
from afmbench.forgetting.importance import neuron_importance, unit_means
from afmbench.forgetting.layer import attach, inhibition_loss, lateral_inhibition_loss
from afmbench.loader import TensorLoader
from afmbench.loop import experience_seed
from afmbench.persample import per_sample_grad_sums
from afmbench.plugin import ContinualPlugin
from afmbench.replay import ReplayBuffer
from afmbench.strategies import AGEM, ER, EWC, MAS, SI, ANPyC
from afmbench.strategies.agem import project
from afmbench.strategies.anpyc import entropy_score
from afmbench.strategies.ewc import log_likelihoods
from afmbench.strategies.mas import squared_norm

HERE = Path(__file__).resolve().parent
HIDDEN = (512, 256)
BATCH = 128
LR, MOMENTUM = 0.01, 0.9
EVAL_BATCH = 1024
PASS_BATCH = 256  # importance passes, as in afmbench
TASKS = 3

#: Strategy settings shared by all three contenders (Avalanche's names in brackets).
#: EWC's penalty is (λ/2) Σ F Δθ²; SI's c Σ Ω Δθ²; MAS's and ANPyC's λ Σ Ω Δθ².
SETTINGS: dict[str, dict[str, Any]] = {
    "naive": {},
    "ewc": {"lambda_": 100.0},
    "si": {"c": 100.0, "xi": 0.1},  # c = 1 left SI within 0.3 points of naive
    "mas": {"lambda_": 1.0},
    "anpyc": {"lambda_": 1.0},
    "ewc+fl": {"lambda_": 100.0},
    "er": {"buffer_size": 500, "replay_batch_size": 32, "selection": "reservoir"},
    "agem": {"buffer_size": 500, "replay_batch_size": 256, "selection": "balanced"},
}
#: The forgetting layer's settings (the callback's defaults, spelled out for the plain loop).
LAYER: dict[str, Any] = {"rho": 4.0, "lambda_f": 0.1, "beta": 1e-5, "mode": "shortcut"}


@dataclass
class Timing:
    seconds: float
    acc: float
    importance_s: list[float] = field(default_factory=list)
    epoch_s: list[float] = field(default_factory=list)
    memory_mb: list[float] = field(default_factory=list)
    state_mb: list[float] = field(default_factory=list)


# -- (a) afmbench ----------------------------------------------------------------------
class _Clock(ContinualPlugin):
    """Times each experience's training epochs and the importance passes after them (the other
    plugins' ``on_train_end``), and records memory once each experience is consolidated."""

    name = "clock"

    def __init__(self, timing: Timing, plugins: list[ContinualPlugin]) -> None:
        self.timing, self.plugins = timing, plugins

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.started = clock(pl_module.device)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.ended = clock(pl_module.device)
        self.timing.epoch_s.append(self.ended - self.started)

    def on_fit_end(self, trainer, pl_module) -> None:
        self.timing.importance_s.append(clock(pl_module.device) - self.ended)
        self.timing.memory_mb.append(_memory_mb(pl_module.device))
        self.timing.state_mb.append(sum(_tensor_mb(p.state_dict()) for p in self.plugins))


def run_afmbench(name: str, scenario, seed: int, device: torch.device) -> Timing:
    seed_everything(seed, verbose=False)
    model = afmbench.build_model("mlp", scenario.input_shape, scenario.head_sizes, hidden=HIDDEN)
    plugins = _plugins(name)
    timing = Timing(0.0, 0.0)
    with tempfile.TemporaryDirectory() as folder:
        started = start_clock(device)
        result = afmbench.run(
            scenario, model, [*plugins, _Clock(timing, plugins)], max_epochs=1, batch_size=BATCH,
            seed=seed, optimizer=afmbench.OptimizerConfig(lr=LR, momentum=MOMENTUM),
            run_dir=folder, verbose=False,
            trainer_kwargs={"accelerator": "gpu" if device.type == "cuda" else "cpu", "devices": 1},
        )  # fmt: skip
        timing.seconds = clock(device) - started
    timing.acc = result.metrics["acc"]
    return timing


def _plugins(name: str) -> list[ContinualPlugin]:
    settings = SETTINGS[name]
    if name == "naive":
        return []
    if name == "ewc+fl":
        return [EWC(**settings), ForgettingLayerCallback(**LAYER)]
    kinds = {"ewc": EWC, "si": SI, "mas": MAS, "anpyc": ANPyC, "er": ER, "agem": AGEM}
    return [kinds[name](**settings)]


# -- (b) the plain loop ----------------------------------------------------------------
def run_plain(name: str, scenario, seed: int, device: torch.device) -> Timing:
    """The same training as (a) with nothing but PyTorch: tensors, model, optimizer, math.
    Each experience's data is moved to ``device`` once, before its epoch (afmbench moves
    each batch)."""
    seed_everything(seed, verbose=False)
    model = afmbench.build_model("mlp", scenario.input_shape, scenario.head_sizes, hidden=HIDDEN)
    gates = attach(model, LAYER["rho"], LAYER["mode"]) if name == "ewc+fl" else []
    model.to(device)
    params = dict(model.named_parameters())
    terms: list[tuple[dict, dict]] = []  # (Ω, θ*) pairs of the quadratic penalty
    # the first setting is each method's strength; EWC's penalty carries a 1/2
    strength = (0.0 if name in REPLAY else next(iter(SETTINGS[name].values()), 0.0)) * (
        0.5 if "ewc" in name else 1.0
    )
    replay = PlainReplay(name, seed) if name in REPLAY else None
    tests = [on(scenario.test(j), device) for j in range(scenario.n_experiences)]
    timing = Timing(0.0, 0.0)
    started = start_clock(device)
    seed_everything(experience_seed(seed, -1), verbose=False)
    _accuracies(model, tests)  # the untrained baseline, as afmbench measures it
    for step in range(scenario.n_experiences):
        seed_everything(experience_seed(seed, step), verbose=False)
        optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
        split = on(scenario.train(step), device)
        path = {n: torch.zeros_like(p) for n, p in params.items()}
        start = {n: p.detach().clone() for n, p in params.items()}
        model.train()
        epoch_started = clock(device)
        train_step = PlainStep(model, optimizer, gates, strength, replay=replay)
        si = PathIntegral.of(params, path) if name == "si" else None
        if replay:
            replay.start(step)
        for x, y, t in TensorLoader(split, BATCH, shuffle=True, seed=experience_seed(seed, step)):
            train_step(x, y, terms, si)
            if replay:
                replay.after_batch(x, y, t)
        timing.epoch_s.append(clock(device) - epoch_started)
        pass_started = clock(device)
        terms = _consolidate(name, model, split, terms, path, start)
        if replay:
            replay.after_experience(split)
        if gates:  # Ω per unit over the experience, then the sparsity probe on 2048 samples
            neuron_importance(model, TensorLoader(split, PASS_BATCH))
            unit_means(
                model,
                TensorLoader(tuple(t[:SPARSITY_SAMPLES] for t in split), PASS_BATCH),
                "active",
            )
        timing.importance_s.append(clock(device) - pass_started)
        _accuracies(model, tests)
        timing.memory_mb.append(_memory_mb(device))
        timing.state_mb.append(sum(_tensor_mb(t) for t in terms))
    timing.seconds = clock(device) - started
    timing.acc = float(np.mean(_accuracies(model, tests)))  # evaluated above: not timed
    return timing


@dataclass
class PathIntegral:
    """SI's running ω and its per-step buffers (the task gradient, the parameters before)."""

    path: dict[str, torch.Tensor]
    grad: dict[str, torch.Tensor]
    before: dict[str, torch.Tensor]

    @classmethod
    def of(cls, params: dict[str, torch.Tensor], path: dict[str, torch.Tensor]) -> PathIntegral:
        return cls(path, *({n: torch.empty_like(p) for n, p in params.items()} for _ in "gb"))


@dataclass
class PlainStep:
    """One training step of the plain loop, for one experience's optimizer: the task loss
    (plus the forgetting layer's ERS and IRS when ``gates`` are attached), the quadratic
    penalty's gradient in closed form, and SI's path integral when ``si`` is given."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    gates: list
    strength: float
    layer: dict[str, Any] = field(default_factory=lambda: LAYER)
    replay: PlainReplay | None = None

    def __post_init__(self) -> None:
        self.params = dict(self.model.named_parameters())

    def __call__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        terms: list[tuple[dict, dict]],
        si: PathIntegral | None,
    ) -> None:
        params, layer = self.params, self.layer
        loss = F.cross_entropy(self.model(x, 0), y)
        if self.replay and self.replay.name == "er":
            loss = loss + self.replay.loss(self.model)
        if self.gates:
            h = [g.last_input for g in self.gates]
            s = [g.last_gate for g in self.gates]
            if layer["lambda_f"]:
                loss = loss + layer["lambda_f"] * inhibition_loss(s)
            if layer["beta"]:
                loss = loss + layer["beta"] * lateral_inhibition_loss(h, s)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            if si:  # g_task: the gradient before the penalty's is added
                for n, p in params.items():
                    si.grad[n].copy_(p.grad)
                    si.before[n].copy_(p)
            for omega, anchor in terms:  # the quadratic penalty's gradient, in closed form
                for n in omega:
                    params[n].grad.addcmul_(
                        omega[n], params[n] - anchor[n], value=2 * self.strength
                    )
        if self.replay and self.replay.name == "agem":
            self.replay.project(self.model)
        self.optimizer.step()
        if si:  # ω += −g_task Δθ
            with torch.no_grad():
                for n, p in params.items():
                    si.path[n].addcmul_(si.grad[n], si.before[n].sub_(p))
        for gate in self.gates:
            gate.forget_batch()


REPLAY = ("er", "agem")


@dataclass
class PlainReplay:
    """ER's and A-GEM's memory in the plain loop: afmbench's buffer (a data structure, as the
    loader is), drawn from a generator seeded per experience as the plugins seed theirs, so
    both routes replay the same samples. ER adds a replay batch's cross-entropy to the loss;
    A-GEM projects the gradient against a memory batch's before the step."""

    name: str
    seed: int

    def __post_init__(self) -> None:
        settings = SETTINGS[self.name]
        self.batch = settings["replay_batch_size"]
        self.buffer = ReplayBuffer(settings["buffer_size"], settings["selection"])
        self.generator = torch.Generator()

    def start(self, step: int) -> None:
        self.generator.manual_seed(self.seed * 1_000_003 + step * 7919 + 1)

    def sample(self) -> tuple[torch.Tensor, ...] | None:
        return self.buffer.sample(self.batch, self.generator) if len(self.buffer) else None

    def loss(self, model: torch.nn.Module) -> torch.Tensor | float:
        drawn = self.sample()
        return F.cross_entropy(model(drawn[0], 0), drawn[1]) if drawn else 0.0

    def project(self, model: torch.nn.Module) -> None:
        drawn = self.sample()
        if drawn is None:
            return
        params = list(model.parameters())
        reference = torch.autograd.grad(F.cross_entropy(model(drawn[0], 0), drawn[1]), params)
        g = torch.cat([p.grad.flatten() for p in params])
        projected = project(g, torch.cat([r.flatten() for r in reference]))
        if projected is not g:
            with torch.no_grad():
                for p, part in zip(params, projected.split([p.numel() for p in params])):
                    p.grad.copy_(part.view_as(p))

    def after_batch(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> None:
        if self.buffer.selection == "reservoir":
            self.buffer.add_reservoir(x, y, t, self.generator)

    def after_experience(self, split: tuple[torch.Tensor, ...]) -> None:
        if self.buffer.selection == "balanced":
            self.buffer.select_balanced(*split, self.generator)


def _consolidate(name, model, split, terms, path, start):
    params = dict(model.named_parameters())
    snapshot = {n: p.detach().clone() for n, p in params.items()}
    if name == "si":
        omega = {
            n: path[n] / ((params[n].detach() - start[n]).square() + SETTINGS["si"]["xi"])
            for n in params
        }
        old = terms[0][0] if terms else {}
        return [({n: omega[n] + old.get(n, 0) for n in omega}, snapshot)]
    if name in ("ewc", "ewc+fl"):
        fisher = _mean_over(split, lambda x, y: per_sample_grad_sums(
            model, lambda m, x, y: log_likelihoods(m, x, y, fisher="empirical", task=0), (x, y), "square"))  # fmt: skip
        return [*terms, (fisher, snapshot)]
    if name == "mas":
        omega = _mean_over(split, lambda x, y: per_sample_grad_sums(
            model, lambda m, x: squared_norm(m, x, task=0), (x,), "abs"))  # fmt: skip
        old = terms[0][0] if terms else {}
        return [({n: omega[n] + old.get(n, 0) for n in omega}, snapshot)]
    if name == "anpyc":
        omega = _mean_over(split, lambda x, y: _entropy_scores(model, x), batch=100, per_batch=True)
        old = terms[0][0] if terms else {}
        return [
            (
                {n: torch.maximum(omega[n], old[n]) if n in old else omega[n] for n in omega},
                snapshot,
            )
        ]
    return terms


def _entropy_scores(model, x):
    params = dict(model.named_parameters())
    logp = F.log_softmax(model(x, 0), dim=1)
    grads = torch.autograd.grad(-(logp.exp() * logp).sum(), list(params.values()))
    return {n: entropy_score(g, p.detach()) for (n, p), g in zip(params.items(), grads)}


def _mean_over(split, stats: Callable, batch: int = PASS_BATCH, per_batch: bool = False):
    """Mean of per-batch sums over the split (per sample, or per batch for ANPyC)."""
    totals, count = {}, 0
    for x, y, _ in TensorLoader(split, batch):
        for n, value in stats(x, y).items():
            totals[n] = totals[n] + value if n in totals else value
        count += 1 if per_batch else len(x)
    return {n: v / count for n, v in totals.items()}


@torch.no_grad()
def _accuracies(model, tests) -> list[float]:
    model.eval()
    accs = []
    for split in tests:
        correct = sum(
            int((model(x, 0).argmax(1) == y).sum()) for x, y, _ in TensorLoader(split, EVAL_BATCH)
        )
        accs.append(correct / len(split[0]))
    model.train()
    return accs


# -- (c) Avalanche ---------------------------------------------------------------------
AVALANCHE = {"naive": "Naive", "ewc": "EWC", "si": "SynapticIntelligence", "mas": "MAS"}


def run_avalanche(
    name: str,
    data_root: Path,
    limit: int | None,
    seed: int,
    device: torch.device,
    permutations: int,
) -> Timing | None:
    """Avalanche's own strategy; ``permutations`` seeds the pixel permutations (the same ones
    afmbench and the plain loop train on), ``seed`` the model and the batch order."""
    if name not in AVALANCHE:
        return None
    import copy

    from avalanche.benchmarks.classic import PermutedMNIST
    from avalanche.evaluation.metrics import accuracy_metrics
    from avalanche.training import supervised
    from avalanche.training.plugins import EvaluationPlugin

    from afmbench.scenarios.sources import cache_root, prepare_mnist_like

    benchmark = PermutedMNIST(
        TASKS, seed=permutations, dataset_root=prepare_mnist_like("MNIST", data_root, cache_root())
    )
    seed_everything(seed, verbose=False)
    model = afmbench.build_model("mlp", (1, 28, 28), (10,), hidden=HIDDEN)
    extra = {
        "naive": {},
        # Avalanche's penalty has no 1/2 and its Fisher squares batch-mean gradients (about F / batch
        # near a minimum). x30 gives equal ACC on training seeds 0-2; x50 diverged on seed 1.
        "ewc": {"ewc_lambda": SETTINGS["ewc"]["lambda_"] * 30},
        # Its penalty carries a 1/2, and it caps Ω at 0.001 (not undone: 2c gives equal ACC).
        "si": {"si_lambda": SETTINGS["si"]["c"] * 2, "eps": SETTINGS["si"]["xi"]},
        # Avalanche's MAS averages Ω over experiences (α = 0.5) where afmbench sums, which
        # halves it by the third task; its mini-batch |g| is also ~1.2x smaller here. x2 gives
        # equal ACC on training seeds 0-2 (x1: 1.8 points more, x10: 6 points less).
        "mas": {"lambda_reg": SETTINGS["mas"]["lambda_"] * 2},
    }[name]
    strategy = resetting(getattr(supervised, AVALANCHE[name]))(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM),
        criterion=torch.nn.CrossEntropyLoss(), train_mb_size=BATCH, train_epochs=1, eval_mb_size=EVAL_BATCH,
        evaluator=EvaluationPlugin(accuracy_metrics(stream=True), loggers=[]), device=device,
        **extra,
    )  # fmt: skip
    timing = Timing(0.0, 0.0)
    started = start_clock(device)
    with copying_si_weights():
        for experience in benchmark.train_stream:
            if limit is not None:
                experience = copy.copy(experience)
                experience.dataset = experience.dataset.subset(
                    subset(len(experience.dataset), limit).tolist()
                )
            strategy.train(experience)
            results = strategy.eval(benchmark.test_stream)
            timing.memory_mb.append(_memory_mb(device))
    timing.seconds = clock(device) - started
    timing.acc = float(next(v for k, v in results.items() if k.startswith("Top1_Acc_Stream")))
    return timing


@contextmanager
def copying_si_weights() -> Iterator[None]:
    """Avalanche's SI with its parameter snapshots copied, as they are on a GPU.

    Avalanche 0.6's SI plugin snapshots the weights as ``param.detach().cpu().flatten()``. On
    a GPU that is a copy; on the CPU it is a view of the live weights, so the "before" and
    "after" of every step, and the anchor, are the current weights. Its path integral stays
    zero, its penalty too, and it trains exactly as naive. Within this context the snapshots
    are copies on any device (the plugin is otherwise unchanged).
    """
    from avalanche.training.plugins import SynapticIntelligencePlugin as plugin

    def extract_weights(model, target, excluded_parameters) -> None:
        for name, param in plugin.allowed_parameters(model, excluded_parameters):
            target[name].data = param.detach().flatten().to("cpu", copy=True)

    with mock.patch.object(plugin, "extract_weights", staticmethod(extract_weights)):
        yield


def resetting(strategy: type) -> type:
    """``strategy`` with its optimizer's state dropped before each experience, as afmbench
    and the plain loop do by default. Avalanche keeps SGD's momentum across experiences unless
    told otherwise; with 10 000 samples a task that alone took 7 points off naive's ACC."""

    class Resetting(strategy):
        def make_optimizer(self, **kwargs):
            return super().make_optimizer(**{**kwargs, "reset_optimizer_state": True})

    Resetting.__name__ = strategy.__name__
    return Resetting


# -- reporting -------------------------------------------------------------------------
def _tensor_mb(state: Any) -> float:
    """Megabytes of all tensors in a nested structure (a plugin's state)."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size() / 2**20
    if isinstance(state, dict):
        return sum(_tensor_mb(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(_tensor_mb(v) for v in state)
    return 0.0


def _memory_mb(device: torch.device) -> float:
    """The process's RSS, or on a GPU the peak memory allocated since the run began."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return psutil.Process().memory_info().rss / 2**20


def clock(device: torch.device) -> float:
    """``time.perf_counter()`` once the device's queued work is done."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def start_clock(device: torch.device) -> float:
    """:func:`clock` at the start of a contender's run, whose peak GPU memory starts here."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    return clock(device)


def on(split: tuple[torch.Tensor, ...], device: torch.device) -> tuple[torch.Tensor, ...]:
    return tuple(t.to(device) for t in split)


class Limited:
    """A scenario whose training splits keep a fixed random ``limit`` of their samples
    (``--quick``); the stored splits are ordered by class, so a prefix would not do."""

    def __init__(self, scenario, limit: int | None) -> None:
        self._scenario, self._limit = scenario, limit

    def __getattr__(self, name):
        return getattr(self._scenario, name)

    def train(self, index):
        split = self._scenario.train(index)
        return (
            split if self._limit is None else tuple(t[subset(len(t), self._limit)] for t in split)
        )


def subset(size: int, limit: int) -> torch.Tensor:
    """The ``--quick`` sample indices, shared by all three contenders."""
    return torch.randperm(size, generator=torch.Generator().manual_seed(0))[:limit]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="10 000 training samples per task")
    parser.add_argument("--strategies", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--no-avalanche", action="store_true", help="skip Avalanche (c)")
    parser.add_argument(
        "--seed", type=int, default=0, help="permutations; training seeds are seed, seed+1, ..."
    )
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        choices=["cpu", "cuda"],
        help="where all three contenders train (default: cuda when there is a GPU)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="rounds over all strategies and contenders, one training seed each",
    )
    parser.add_argument("--output", default=str(HERE / "RESULTS.md"), help="the report")
    options = parser.parse_args()
    if options.repeat < 1:
        parser.error(f"--repeat {options.repeat}: give 1 or more runs per contender")
    if options.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no GPU here; use --device cpu")
    device = torch.device(options.device)
    data_root = Path(os.environ.get("AFMBENCH_DATA_DIR", "data"))
    limit = 10_000 if options.quick else None
    full = afmbench.build_scenario("permuted_mnist", n_experiences=TASKS, seed=options.seed)
    scenario = Limited(full, limit)

    # Warm-up, untimed: first calls pay for lazy imports, allocator growth and vmap tracing.
    warm = Limited(full, 2048)
    for name in ("naive", "ewc+fl"):
        run_afmbench(name, warm, options.seed, device)
        run_plain(name, warm, options.seed, device)

    # Rounds over every strategy and contender, so a drift in machine load (this project's CPU
    # can slow by half for minutes) hits every cell alike, not only the strategies run last.
    runs: dict[str, list[tuple[Timing, Timing, Timing | None]]] = {}
    for run in range(options.repeat):
        seed = options.seed + run  # one training seed per round, shared by the three
        for name in options.strategies:
            a = run_afmbench(name, scenario, seed, device)
            b = run_plain(name, scenario, seed, device)
            c = (
                None
                if options.no_avalanche
                else run_avalanche(name, data_root, limit, seed, device, options.seed)
            )
            runs.setdefault(name, []).append((a, b, c))
            print(f"round {run + 1}/{options.repeat}: " + _line(name, a, b, c), flush=True)
    rows = [Row.of(name, done) for name, done in runs.items()]
    text = _report(rows, options, limit)
    # each setting (full or quick, CPU or GPU) has a block of its own in the report
    block = (
        "speed" + ("-quick" if options.quick else "") + ("-cuda" if device.type != "cpu" else "")
    )
    write_block(Path(options.output), block, text)
    print(text)
    if options.quick:
        print(json.dumps(_summary(rows), allow_nan=False))
    return 0


def summarized(runs: list[Timing | None]) -> Timing | None:
    """The run with the median wall time (the upper median for an even count), holding the
    mean ACC over all runs: each run trains from its own seed, and two trainings of the same
    method from different seeds differ by about a point here."""
    done = sorted((r for r in runs if r is not None), key=lambda r: r.seconds)
    if not done:
        return None
    return replace(done[len(done) // 2], acc=float(np.mean([r.acc for r in done])))


def per_round(top: list[Timing | None], bottom: list[Timing | None]) -> float | None:
    """Median over rounds of ``top`` / ``bottom`` seconds. Runs of one round are minutes
    apart, so a ratio within a round is steadier than a ratio of medians."""
    ratios = [t.seconds / b.seconds for t, b in zip(top, bottom) if t is not None and b is not None]
    return float(np.median(ratios)) if ratios else None


@dataclass
class Row:
    """One strategy: each contender's summarized run (:func:`summarized`), and ratios taken
    round by round (:func:`per_round`)."""

    name: str
    a: Timing
    b: Timing
    c: Timing | None
    afmbench_runs: list[Timing]
    plain_runs: list[Timing]
    vs_plain: float
    vs_avalanche: float | None
    #: the plain loop's own speed-up over Avalanche: what any implementation could reach here
    plain_vs_avalanche: float | None

    @classmethod
    def of(cls, name: str, runs: list[tuple[Timing, Timing, Timing | None]]) -> Row:
        a, b, c = (summarized([r[i] for r in runs]) for i in range(3))
        mine, plain, theirs = ([r[i] for r in runs] for i in range(3))
        return cls(
            name, a, b, c, mine, plain,
            vs_plain=per_round(mine, plain),
            vs_avalanche=per_round(theirs, mine),
            plain_vs_avalanche=per_round(theirs, plain),
        )  # fmt: skip

    def over(self, other: Row) -> tuple[float, float]:
        """How much longer this strategy takes than ``other``, per round: in afmbench, and in
        the plain loop (the same arithmetic without a framework, so the floor of the first)."""
        return (
            per_round(self.afmbench_runs, other.afmbench_runs) - 1,
            per_round(self.plain_runs, other.plain_runs) - 1,
        )

    @property
    def pass_share(self) -> float:
        """The longest importance pass, in epochs of the same experience."""
        return max(i / e for i, e in zip(self.a.importance_s, self.a.epoch_s))


def _summary(rows: list[Row]) -> dict[str, Any]:
    """The worst strategy's ratios, for scripts (``null`` where Avalanche did not run: strict
    JSON has no NaN)."""
    compared = [r for r in rows if r.c]
    return {
        "ratio_vs_plain": round(max(r.vs_plain for r in rows), 3),
        "ratio_vs_avalanche": (
            round(min(r.vs_avalanche for r in compared), 3) if compared else None
        ),
        "acc_gap_vs_avalanche": (
            round(max(abs(r.a.acc - r.c.acc) for r in compared), 4) if compared else None
        ),
        "seconds": {r.name: round(r.a.seconds, 2) for r in rows},
    }


def _line(name: str, a: Timing, b: Timing, c: Timing | None) -> str:
    av = f"{c.seconds:7.1f}s acc {c.acc:.3f}" if c else "      -"
    return (
        f"{name:7s} afmbench {a.seconds:7.1f}s acc {a.acc:.3f} | "
        f"plain {b.seconds:7.1f}s acc {b.acc:.3f} | avalanche {av}"
    )


def _report(rows: list[Row], options, limit: int | None) -> str:
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    if options.device == "cuda":
        where = f"on {torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
        memory = "peak CUDA MB allocated after each task"
    else:
        where = "CPU only"
        memory = "RSS MB after each task"
    command = _command(options)
    samples = f"{limit:,}" if limit else "60,000"
    by_name = {r.name: r for r in rows}
    naive = by_name.get("naive")
    lines = [
        "## Speed"
        + (" on a GPU" if options.device == "cuda" else "")
        + (", quick (a short run: its fixed cost weighs more)" if options.quick else ""),
        "",
        _wrap(
            f"Permuted MNIST, {TASKS} tasks x 1 epoch, {samples} training samples per task, "
            f"MLP 784-{'-'.join(map(str, HIDDEN))}-10, batch {BATCH}, SGD lr {LR} momentum "
            f"{MOMENTUM}; evaluation on every test set after every task. Seconds are wall time "
            "end to end (afmbench: including its run folder, checkpoints and importance passes)"
            + (
                f"; {options.repeat} rounds over all cells from training seeds "
                f"{options.seed}-{options.seed + options.repeat - 1}: seconds are each cell's "
                "median run, ratios the median of the ratios within a round, ACC the mean."
                if options.repeat > 1
                else "."
            )
        ),
        "",
        f"Machine: {machine}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{where}. Date: {time.strftime('%Y-%m-%d')}. Command: `{command}`",
        "",
        "| strategy | afmbench s | plain loop s | Avalanche s | afmbench / plain "
        "| Avalanche / afmbench | time over naive (afmbench / plain) |",
        "|---|---|---|---|---|---|---|",
    ]
    costs = [
        "",
        "| strategy | ACC afmbench | ACC plain | ACC Avalanche | importance pass / epoch "
        f"| plugin state MB after each task | {memory} |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        a, b, c = r.a, r.b, r.c
        over = " / ".join(f"{x:+.0%}" for x in r.over(naive)) if naive and r is not naive else "-"
        times = [
            r.name, f"{a.seconds:.1f}", f"{b.seconds:.1f}", f"{c.seconds:.1f}" if c else "-",
            f"{r.vs_plain:.2f}", f"{r.vs_avalanche:.1f}" if c else "-", over,
        ]  # fmt: skip
        accuracy = [
            r.name, f"{a.acc:.4f}", f"{b.acc:.4f}", f"{c.acc:.4f}" if c else "-",
            f"{r.pass_share:.2f}",
            " / ".join(f"{m:.1f}" for m in a.state_mb),
            " / ".join(f"{m:.0f}" for m in a.memory_mb),
        ]  # fmt: skip
        lines.append("| " + " | ".join(times) + " |")
        costs.append("| " + " | ".join(accuracy) + " |")
    lines += costs
    lines += ["", "Targets:", ""]
    lines += [_wrap(target, indent="  ") for target in _targets(rows, by_name)]
    return "\n".join(lines) + "\n"


def _wrap(text: str, indent: str = "") -> str:
    """``text`` in lines of at most 100 characters (continuation lines indented by ``indent``)."""
    return textwrap.fill(
        text, 100, subsequent_indent=indent, break_long_words=False, break_on_hyphens=False
    )


def _command(options) -> str:
    """The command line that reproduces this report (options left at their default omitted)."""
    words = ["python", "benchmarks/speed.py"]
    words += ["--quick"] if options.quick else []
    if options.strategies != list(SETTINGS):
        words += ["--strategies", *options.strategies]
    words += ["--no-avalanche"] if options.no_avalanche else []
    words += [f"--seed {options.seed}"] if options.seed else []
    words += ["--device cuda"] if options.device == "cuda" else []
    words += [f"--repeat {options.repeat}"] if options.repeat > 1 else []
    return " ".join(words)


def _targets(rows: list[Row], by_name: dict[str, Row]) -> list[str]:
    def mark(ok: bool) -> str:
        return "met" if ok else "**missed**"

    worst = max(rows, key=lambda r: r.vs_plain)
    lines = [
        f"- afmbench at most 1.3x the plain loop: {mark(worst.vs_plain <= 1.3)} "
        f"(worst: {worst.name}, {worst.vs_plain:.3f}x)",
    ]
    compared = [r for r in rows if r.c]
    if compared:
        slowest = min(compared, key=lambda r: r.vs_avalanche)
        gaps = {r.name: abs(r.a.acc - r.c.acc) for r in compared}
        floor = max(r.plain_vs_avalanche for r in compared)
        lines.append(
            f"- at least 5x faster than Avalanche: {mark(slowest.vs_avalanche >= 5)} "
            f"(worst: {slowest.name}, {slowest.vs_avalanche:.1f}x; the plain loop reaches at "
            f"most {floor:.1f}x); ACC within "
            f"1 point: {mark(max(gaps.values()) <= 0.01)} (gap in points: "
            + ", ".join(f"{name} {100 * gap:.1f}" for name, gap in gaps.items()) + ")"
        )  # fmt: skip
    if "naive" in by_name and "si" in by_name:
        si, floor = by_name["si"].over(by_name["naive"])
        lines.append(
            f"- SI at most 10% over naive: {mark(si <= 0.10)} ({si:+.1%}; the plain loop {floor:+.1%})"
        )
    for name in ("ewc", "mas", "anpyc"):
        if name in by_name:
            share = by_name[name].pass_share
            lines.append(
                f"- {name} importance pass at most one epoch: {mark(share <= 1)} ({share:.2f} epoch)"
            )
    if "ewc" in by_name and "ewc+fl" in by_name:
        fl, floor = by_name["ewc+fl"].over(by_name["ewc"])
        lines.append(
            f"- forgetting layer at most 20% over the same run without it: {mark(fl <= 0.2)} "
            f"({fl:+.1%}; the plain loop {floor:+.1%})"
        )
    return lines


if __name__ == "__main__":
    sys.exit(main())
