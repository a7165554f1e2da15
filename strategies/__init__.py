"""Regularization strategies, one plugin per file (see :mod:`afmbench.plugin` for the protocol).

:data:`STRATEGIES` maps the names the CLI accepts (``strategy=<name>``) to plugin classes;
``naive`` (plain fine-tuning, the lower bound) and ``joint`` (all data at once, the upper
bound) need no plugin. Every plugin is also usable from Python, e.g. ``EWC(lambda_=100.0)``,
and any number of them compose in one run (their penalties add up). Two instances of one
strategy in a run need distinct ``name`` attributes: penalties and checkpointed state are keyed
by it.
"""

from __future__ import annotations

from afmbench.errors import ConfigError
from afmbench.plugin import ContinualPlugin
from afmbench.strategies.anpyc import ANPyC
from afmbench.strategies.ewc import EWC
from afmbench.strategies.mas import MAS
from afmbench.strategies.si import SI

STRATEGIES: dict[str, type[ContinualPlugin] | None] = {
    "naive": None,
    "joint": None,
    "ewc": EWC,
    "si": SI,
    "mas": MAS,
    "anpyc": ANPyC,
}


def strategy_class(name: str) -> type[ContinualPlugin] | None:
    """The plugin class of strategy ``name`` (None for naive and joint)."""
    if name not in STRATEGIES:
        raise ConfigError(f"unknown strategy '{name}'", f"use one of {', '.join(STRATEGIES)}")
    return STRATEGIES[name]


__all__ = ["EWC", "MAS", "SI", "STRATEGIES", "ANPyC", "strategy_class"]
