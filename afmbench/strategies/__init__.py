"""Regularization, replay and distillation strategies, one plugin per file (see :mod:`afmbench.plugin` for the protocol).

Each has a YAML beside the others in ``afmbench/configs/strategy/`` whose ``_target_`` names
its class, so ``strategy=<name>`` on the command line needs no registry; ``naive`` (plain
fine-tuning, the lower bound), ``joint`` (all data at once, the upper bound) and
``cumulative`` (each experience with all data so far) need no plugin. Every plugin is also usable from Python, e.g. ``EWC(lambda_=100.0)``, and any number
of them compose in one run (their penalties add up). Two instances of one strategy in a run
need distinct ``name`` attributes: penalties and checkpointed state are keyed by it.
"""

from __future__ import annotations

from afmbench.strategies.agem import AGEM
from afmbench.strategies.anpyc import ANPyC
from afmbench.strategies.derpp import DERpp
from afmbench.strategies.er import ER
from afmbench.strategies.ewc import EWC
from afmbench.strategies.lwf import LwF
from afmbench.strategies.mas import MAS
from afmbench.strategies.si import SI

__all__ = ["AGEM", "DERpp", "ER", "EWC", "LwF", "MAS", "SI", "ANPyC"]
