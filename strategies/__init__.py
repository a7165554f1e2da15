"""Regularization strategies, one plugin per file (see :mod:`afmbench.plugin` for the protocol).

:data:`STRATEGIES` maps the names the CLI accepts (``strategy=<name>``) to plugin classes;
``naive`` (plain fine-tuning, the lower bound) and ``joint`` (all data at once, the upper
bound) need no plugin.
"""

from __future__ import annotations

from afmbench.errors import ConfigError
from afmbench.plugin import ContinualPlugin

STRATEGIES: dict[str, type[ContinualPlugin] | None] = {
    "naive": None,
    "joint": None,
}


def strategy_class(name: str) -> type[ContinualPlugin] | None:
    """The plugin class of strategy ``name`` (None for naive and joint)."""
    if name not in STRATEGIES:
        raise ConfigError(f"unknown strategy '{name}'", f"use one of {', '.join(STRATEGIES)}")
    return STRATEGIES[name]


__all__ = ["STRATEGIES", "strategy_class"]
