"""The AFM paper's analyses of a trained model, from Python or as ``afmbench probe RUN_DIR``.

Each probe measures test accuracy (or activity) while units or weights are removed or
disturbed, layer by layer; :func:`run_probes` writes ``<probe>.json`` and ``<probe>.png`` for
each into an output folder (``RUN_DIR/probes/`` for a run):

- ``sparsity``: per-layer population sparsity (eq. 1) of the firing rates ``r_i`` = fraction
  of test samples (and positions, for feature maps) on which unit ``i`` is positive;
- ``importance``: the distribution of neuron importance ``Omega`` per layer;
- ``ablation``: accuracy as a growing fraction of a layer's units (or of every layer's, "all")
  is removed in ascending or descending order of importance, or at random;
- ``pruning``: accuracy as a growing fraction of every body weight tensor is zeroed, lowest
  eq. 2 importance first, against random pruning (the heads are never pruned);
- ``perturbation``: accuracy as a growing fraction of a layer's units get Gaussian noise on
  their incoming weights and bias (std = ``noise`` x the std of that layer's weights).

Importance is the mean switch state over training data for a gated model and, for a model
without the forgetting layer, the mean activation scaled to [0, 1] per layer (see
:mod:`afmbench.forgetting.importance`), so every probe runs on every model. Random orders are
repeated ``repeats`` times (mean and std reported) with a fixed seed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from afmbench.errors import ConfigError
from afmbench.forgetting.importance import (
    Normalization,
    evaluating,
    neuron_importance,
    parameter_importance,
    sparsity_index,
    unit_means,
)
from afmbench.forgetting.layer import sites
from afmbench.loader import TensorLoader
from afmbench.models import ContinualModel
from afmbench.run_folder import write_json
from afmbench.scenarios.base import Split

PROBES = ("sparsity", "importance", "ablation", "pruning", "perturbation")
FRACTIONS = tuple(i / 10 for i in range(11))
PRUNING_FRACTIONS = (*FRACTIONS[:-1], 0.95, 0.99)


@dataclass
class Subject:
    """A trained model with the data its probes use."""

    model: ContinualModel
    test: Split
    train: Split


# -- measurements ----------------------------------------------------------------------
@torch.no_grad()
def accuracy(model: ContinualModel, split: Split, batch_size: int = 1024) -> float:
    """Fraction of ``split`` the model classifies correctly (eval mode, task labels given)."""
    correct = 0
    with evaluating(model):
        for x, y, t in TensorLoader(split, batch_size, shuffle=False, pad=False):
            correct += int((model(x, t).argmax(1) == y).sum())
    return correct / len(split[0])


def sparsity(
    model: ContinualModel, split: Split, normalization: Normalization = "divide"
) -> dict[str, Any]:
    """Firing rates and eq. 1 sparsity of every hidden layer on ``split``."""
    rates = unit_means(model, TensorLoader(split, 1024, shuffle=False, pad=False), "active")
    return {
        "normalization": normalization,
        "layers": {
            k: {"sparsity": sparsity_index(r, normalization), "rates": r.tolist()}
            for k, r in rates.items()
        },
    }


def importance_distribution(
    omega: dict[str, Tensor], source: str, bins: int = 20
) -> dict[str, Any]:
    """Histogram of ``Omega`` per layer on ``[0, 1]``, with the values themselves."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    layers = {}
    for key, values in omega.items():
        counts, _ = np.histogram(values.clamp(0, 1).cpu().numpy(), bins=edges)
        layers[key] = {"values": values.tolist(), "counts": counts.tolist()}
    return {"source": source, "edges": edges.tolist(), "layers": layers}


def ablation_curves(
    subject: Subject,
    omega: dict[str, Tensor],
    fractions: Sequence[float] = FRACTIONS,
    repeats: int = 10,
    seed: int = 0,
) -> dict[str, Any]:
    """Accuracy after removing (zeroing the output of) a fraction of units, per layer and in
    every layer at once ("all"), by ascending / descending importance and at random."""
    generator = torch.Generator().manual_seed(seed)
    keys = list(omega)
    groups = {key: [key] for key in keys} | ({"all": keys} if len(keys) > 1 else {})
    ranked = {
        "ascending": lambda k: torch.argsort(omega[k].cpu(), stable=True),
        "descending": lambda k: torch.argsort(omega[k].cpu(), descending=True, stable=True),
    }
    results = {
        group: _removal_curves(
            subject,
            members,
            lambda k: len(omega[k]),
            ranked,
            lambda masks: unit_masks(subject.model, masks),
            fractions,
            repeats,
            generator,
        )
        for group, members in groups.items()
    }
    return {"fractions": list(fractions), "repeats": repeats, "groups": results}


def pruning_curves(
    subject: Subject,
    omega: dict[str, Tensor],
    fractions: Sequence[float] = PRUNING_FRACTIONS,
    repeats: int = 10,
    seed: int = 0,
) -> dict[str, Any]:
    """Accuracy after zeroing a fraction of every body weight tensor: lowest eq. 2 importance
    first (ties in random order) against uniformly random weights."""
    generator = torch.Generator().manual_seed(seed)
    theta = parameter_importance(subject.model, omega)
    weights = {
        n: p for n, p in subject.model.named_parameters() if n.startswith("body.") and p.dim() >= 2
    }

    def by_importance(name: str) -> Tensor:
        shuffle = torch.randperm(weights[name].numel(), generator=generator)
        return shuffle[torch.argsort(theta[name].flatten().cpu()[shuffle], stable=True)]

    def pruned(masks: dict[str, Tensor]):
        return replaced(
            subject.model,
            {n: weights[n] * m.to(weights[n]).view_as(weights[n]) for n, m in masks.items()},
        )

    curves = _removal_curves(
        subject,
        list(weights),
        lambda n: weights[n].numel(),
        {"importance": by_importance},
        pruned,
        fractions,
        repeats,
        generator,
    )
    return {"fractions": list(fractions), "repeats": repeats, **curves}


def perturbation_curves(
    subject: Subject,
    fractions: Sequence[float] = FRACTIONS,
    repeats: int = 10,
    noise: float = 1.0,
    seed: int = 0,
) -> dict[str, Any]:
    """Accuracy when a random fraction of one layer's units get noisy incoming weights."""
    generator = torch.Generator().manual_seed(seed)
    model = subject.model
    results = {}
    for site in sites(model):
        producer = model.body.get_submodule(site.producer)
        scale = noise * float(producer.weight.detach().std())
        params = {f"body.{site.producer}.{n}": p for n, p in producer.named_parameters()}
        runs = []
        for _ in range(repeats):
            row = []
            for f in fractions:
                chosen = ~_removal_mask(torch.randperm(site.units, generator=generator), f).bool()
                noisy = {}
                for name, p in params.items():
                    delta = torch.randn(p.shape, generator=generator).to(p) * scale
                    noisy[name] = p + delta * chosen.to(p).view(-1, *([1] * (p.dim() - 1)))
                with replaced(model, noisy):
                    row.append(accuracy(model, subject.test))
            runs.append(row)
        results[site.key] = _spread("accuracy", np.array(runs))
    return {"fractions": list(fractions), "repeats": repeats, "noise": noise, "layers": results}


# -- running them ----------------------------------------------------------------------
def run_probes(
    subject: Subject,
    out_dir: str | Path,
    probes: Sequence[str] = PROBES,
    *,
    repeats: int = 10,
    normalization: Normalization = "divide",
    noise: float = 1.0,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """Run ``probes`` on ``subject``; write ``<probe>.json`` and ``<probe>.png`` to ``out_dir``."""
    from afmbench.probes.plots import PLOTS  # matplotlib, only when drawing

    unknown = [p for p in probes if p not in PROBES]
    if unknown:
        raise ConfigError(
            f"unknown probe(s) {', '.join(unknown)}", f"choose from {', '.join(PROBES)}"
        )
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    omega, source = neuron_importance(
        subject.model, TensorLoader(subject.train, 1024, shuffle=False, pad=False)
    )
    measure = {
        "sparsity": lambda: sparsity(subject.model, subject.test, normalization),
        "importance": lambda: importance_distribution(omega, source),
        "ablation": lambda: ablation_curves(subject, omega, repeats=repeats, seed=seed),
        "pruning": lambda: pruning_curves(subject, omega, repeats=repeats, seed=seed),
        "perturbation": lambda: perturbation_curves(
            subject, repeats=repeats, noise=noise, seed=seed
        ),
    }
    base = {"test_accuracy": accuracy(subject.model, subject.test), "importance_source": source}
    results = {}
    for name in probes:
        results[name] = {**base, **measure[name]()}
        write_json(folder / f"{name}.json", results[name])
        PLOTS[name](results[name], folder / f"{name}.png")
    return results


def subset(split: Split, max_samples: int | None, seed: int = 0) -> Split:
    """A fixed random subset of at most ``max_samples`` samples (all of them for None)."""
    if max_samples is None or len(split[0]) <= max_samples:
        return split
    keep = torch.randperm(len(split[0]), generator=torch.Generator().manual_seed(seed))[
        :max_samples
    ]
    return tuple(t[keep] for t in split)


def _removal_curves(
    subject: Subject,
    names: list[str],
    size: Callable[[str], int],
    ranked: dict[str, Callable[[str], Tensor]],
    removing: Callable[[dict[str, Tensor]], Any],
    fractions: Sequence[float],
    repeats: int,
    generator: torch.Generator,
) -> dict[str, list[float]]:
    """Accuracy while the first ``fraction`` of each name's order is removed (``removing``
    turns per-name 0/1 masks into a context), for each ranked order and for random orders."""

    def curve(order_of: Callable[[str], Tensor]) -> list[float]:
        orders = {name: order_of(name) for name in names}
        values = []
        for f in fractions:
            with removing({name: _removal_mask(order, f) for name, order in orders.items()}):
                values.append(accuracy(subject.model, subject.test))
        return values

    randoms = np.array(
        [curve(lambda n: torch.randperm(size(n), generator=generator)) for _ in range(repeats)]
    )
    return {
        **{label: curve(order_of) for label, order_of in ranked.items()},
        **_spread("random", randoms),
    }


def _removal_mask(order: Tensor, fraction: float) -> Tensor:
    """1 everywhere but the first ``round(fraction * n)`` positions of ``order`` (removed)."""
    mask = torch.ones(order.numel())
    mask[order[: round(fraction * order.numel())]] = 0
    return mask


@contextmanager
def unit_masks(model: ContinualModel, masks: dict[str, Tensor]) -> Iterator[None]:
    """Multiply each layer's output (key ``body.<k>``) by a per-unit mask for the block."""

    def hook_for(mask: Tensor) -> Callable:
        def hook(module: torch.nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> Tensor:
            return output * mask.to(output).view(1, -1, *([1] * (output.dim() - 2)))

        return hook

    handles = [
        model.get_submodule(key).register_forward_hook(hook_for(m)) for key, m in masks.items()
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def replaced(model: ContinualModel, values: dict[str, Tensor]) -> Iterator[None]:
    """Give the named parameters other values for the block, then restore them."""
    params = dict(model.named_parameters())
    saved = {name: params[name].detach().clone() for name in values}
    try:
        with torch.no_grad():
            for name, value in values.items():
                params[name].copy_(value)
        yield
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                params[name].copy_(value)


def _spread(prefix: str, runs: np.ndarray) -> dict[str, list[float]]:
    return {f"{prefix}_mean": runs.mean(0).tolist(), f"{prefix}_std": runs.std(0).tolist()}


__all__ = [
    "PROBES",
    "Subject",
    "ablation_curves",
    "accuracy",
    "importance_distribution",
    "perturbation_curves",
    "pruning_curves",
    "run_probes",
    "sparsity",
    "sparsity_index",
    "subset",
    "unit_masks",
]
