"""Scenario builders: Avalanche benchmarks materialized into tensors, plus the embedded default.

``build_scenario("split_mnist", n_experiences=5, protocol="task")`` returns a
:class:`Scenario`; :data:`SCENARIOS` maps every name the CLI accepts to its builder.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from afmbench.config import check_params
from afmbench.errors import ConfigError
from afmbench.scenarios.base import PROTOCOLS, MemoryStore, Scenario, Split
from afmbench.scenarios.cifar import split_cifar10, split_cifar100, split_cifar110
from afmbench.scenarios.digits import permuted_digits, split_digits
from afmbench.scenarios.mnist import permuted_mnist, split_fashion_mnist, split_mnist

SCENARIOS: dict[str, Callable[..., Scenario]] = {
    "split_digits": split_digits,
    "permuted_digits": permuted_digits,
    "permuted_mnist": permuted_mnist,
    "split_mnist": split_mnist,
    "split_fashion_mnist": split_fashion_mnist,
    "split_cifar10": split_cifar10,
    "split_cifar100": split_cifar100,
    "split_cifar110": split_cifar110,
}


def scenario_builder(name: str) -> Callable[..., Scenario]:
    """The builder registered under ``name``; a clear error lists the valid names."""
    if name not in SCENARIOS:
        raise ConfigError(f"unknown scenario '{name}'", f"use one of {', '.join(SCENARIOS)}")
    return SCENARIOS[name]


def build_scenario(
    name: str,
    root: str | None = None,
    cache: str | None = None,
    validation: float = 0.0,
    **params: Any,
) -> Scenario:
    """Build scenario ``name``; ``root``/``cache`` go only to builders that read files;
    ``validation`` holds out that fraction of each experience's training data
    (:meth:`Scenario.with_validation`)."""
    builder = scenario_builder(name)
    accepted = inspect.signature(builder).parameters
    locations = {k: v for k, v in (("root", root), ("cache", cache)) if k in accepted}
    scenario = builder(**check_params(params, builder, "scenario", skip=()), **locations)
    return scenario.with_validation(validation)


__all__ = [
    "PROTOCOLS",
    "SCENARIOS",
    "MemoryStore",
    "Scenario",
    "Split",
    "build_scenario",
    "scenario_builder",
    *SCENARIOS,
]
