"""A run's identity: the one rule for its config hash, from the command line and Python alike.

The hash covers what a run computes: the scenario and its parameters (not its seed), the
model's architecture, every plugin's class and constructor arguments, joint training, the
optimizer, the batch size, the augmentation and the trainer options that change the arithmetic. It leaves out
the seed and where or how verbosely the run goes. Runs that share it are one configuration on
the leaderboard (their seeds are grouped), and a resumed run must match it. Nothing in it
comes from ``repr`` of an object, so it is the same in every process.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from afmbench.config import NON_IDENTITY_KEYS, OptimizerConfig, config_dir
from afmbench.models import ContinualModel
from afmbench.plugin import ContinualPlugin
from afmbench.scenarios.base import Scenario

#: Trainer options that only place the run (which device, which launcher) or change its output.
PLACEMENT = tuple(k.split(".", 1)[1] for k in NON_IDENTITY_KEYS if k.startswith("trainer."))


def run_identity(
    scenario: Scenario,
    model: ContinualModel,
    plugins: Sequence[ContinualPlugin],
    joint: bool,
    optimizer: OptimizerConfig,
    batch_size: int,
    trainer_kwargs: dict[str, Any],
    augment: str | None = None,
    pass_precision: str = "32-true",
    cumulative: bool = False,
) -> dict[str, Any]:
    """Everything that changes what the run computes, as plain JSON-ready values (an
    augmentation, importance passes in other than float32, or cumulative training, only when
    there is one, so runs without keep the hash they had)."""
    defaults = trainer_defaults()
    return {
        "scenario": {
            "name": scenario.name,
            **{k: v for k, v in scenario.params.items() if k != "seed"},
        },
        "model": model_identity(model),
        "plugins": [p.identity() for p in plugins],
        "joint": joint,
        **({"cumulative": True} if cumulative else {}),
        "optimizer": optimizer_identity(optimizer),
        "batch_size": batch_size,
        "trainer": {
            k: v
            for k, v in trainer_kwargs.items()
            if k not in PLACEMENT and not (k in defaults and defaults[k] == v)
        },
        **({"augment": augment} if augment else {}),
        **({"pass_precision": pass_precision} if pass_precision != "32-true" else {}),
    }


def optimizer_identity(optimizer: OptimizerConfig) -> dict[str, Any]:
    """The optimizer's settings; a learning-rate schedule only when there is one, so runs
    without keep the hash they had."""
    settings = dataclasses.asdict(optimizer)
    if not optimizer.lr_milestones:
        del settings["lr_milestones"], settings["lr_gamma"]
    return settings


def config_hash(identity: dict[str, Any]) -> str:
    """Twelve hex digits of the identity's canonical JSON."""
    text = json.dumps(identity, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def model_identity(model: ContinualModel) -> dict[str, Any]:
    """The builder and its arguments for a model from :func:`afmbench.build_model`, else the
    module's printed architecture (layer types and sizes, never an address)."""
    spec = getattr(model, "spec", None)
    return dict(spec) if spec else {"architecture": repr(model)}


@functools.cache
def trainer_defaults() -> dict[str, Any]:
    """``configs/trainer/default.yaml``: a trainer option at its default is left out, so a
    Python run that omits it and a CLI run that inherits it share a hash."""
    path = Path(config_dir()) / "trainer" / "default.yaml"
    return OmegaConf.to_container(OmegaConf.load(path))  # type: ignore[return-value]


def strategy_label(
    plugins: Sequence[ContinualPlugin], joint: bool, cumulative: bool = False
) -> str:
    """The strategy a run records: ``joint`` or ``cumulative``, else its strategies' names
    joined by ``+`` (``ewc+si``; the forgetting layer is recorded apart), or ``naive`` when
    there are none."""
    if joint or cumulative:
        return "joint" if joint else "cumulative"
    names = [p.name for p in plugins if not getattr(p, "is_forgetting_layer", False)]
    return "+".join(names) or "naive"
