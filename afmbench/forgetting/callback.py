"""The forgetting layer as a plugin: model surgery, its loss terms, and neuron importance."""

from __future__ import annotations

from contextlib import closing
from typing import TYPE_CHECKING, Any

from lightning.pytorch import LightningModule, Trainer
from torch import Tensor

from afmbench.config import require
from afmbench.forgetting.importance import (
    neuron_importance,
    parameter_importance,
    per_sample,
    sparsity_index,
    unit_means,
)
from afmbench.forgetting.layer import (
    ForgettingLayer,
    Mode,
    attach,
    inhibition_loss,
    lateral_inhibition_loss,
)
from afmbench.models import ContinualModel
from afmbench.plugin import ContinualPlugin

if TYPE_CHECKING:
    from afmbench.module import ContinualModule

#: Samples whose per-sample gates are kept after each experience (for gate-state histograms).
GATE_SAMPLES = 256
#: Samples over which each layer's firing rates (hence its sparsity, eq. 1) are estimated.
SPARSITY_SAMPLES = 2048


class ForgettingLayerCallback(ContinualPlugin):
    """P&PF (AFM paper): switches after every hidden activation, trained with eq. 9's extra terms.

    Hooks:

    - ``prepare`` (called by the experience loop first) and ``setup``: insert a
      :class:`ForgettingLayer` after each hidden activation of the model's body, before the
      optimizer is built or a checkpoint is restored (idempotent: later calls find them);
    - ``penalty``: ``lambda_f * ERS + beta * IRS`` on the batch just forwarded (``ers`` /
      ``irs`` switch either term off, for the paper's ablations);
    - ``on_train_end``: neuron importance (mean gate over the experience's training data,
      reduced over all processes) and a sample of per-sample gates;
    - ``state_dict``: the neuron importance and gate sample, so checkpoints carry them.

    The switch weights are ordinary parameters, so strategies consolidate them like any other.
    """

    name = "forgetting"
    config_group = "forgetting"
    is_forgetting_layer = True

    def __init__(
        self,
        rho: float = 4.0,
        lambda_f: float = 0.1,
        beta: float = 1e-5,
        mode: Mode = "shortcut",
        ers: bool = True,
        irs: bool = True,
    ) -> None:
        super().__init__()
        self.rho, self.lambda_f, self.beta = rho, lambda_f, beta
        self.mode, self.ers, self.irs = mode, ers, irs
        require(
            self.rho > 0, f"forgetting.rho={self.rho} must be positive", "e.g. forgetting.rho=1"
        )
        for key in ("lambda_f", "beta"):
            value = getattr(self, key)
            require(
                value >= 0,
                f"forgetting.{key}={value} must be >= 0",
                f"e.g. forgetting.{key}=0 to turn it off",
            )
        self.model: ContinualModel | None = None
        self.layers: list[ForgettingLayer] = []
        self.experience = -1
        self._omega: dict[str, Tensor] = {}
        self._gates: dict[str, Tensor] = {}
        self._sparsity: dict[str, float | None] = {}

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(rho={self.rho}, lambda_f={self.lambda_f}, beta={self.beta}, "
            f"mode={self.mode!r}, ers={self.ers}, irs={self.irs})"
        )

    def attach(self, model: ContinualModel) -> list[ForgettingLayer]:
        """Gate ``model`` (idempotent) and remember it; also the way to rebuild a trained run's
        architecture before loading its weights."""
        self.model = model
        self.layers = attach(model, self.rho, self.mode)
        return self.layers

    # -- hooks -------------------------------------------------------------------------
    def prepare(self, model: ContinualModel) -> None:
        """The plugin protocol's structure hook: the experience loop calls it first."""
        self.attach(model)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Also gate here, so a bare Lightning ``Trainer`` works without the loop."""
        self.attach(pl_module.model)

    def penalty(self, module: ContinualModule) -> Tensor | None:
        gated = [layer for layer in self.layers if layer.last_gate is not None]
        if not gated or not (self.ers or self.irs):
            return None
        gates = [layer.last_gate for layer in gated]
        terms = []
        if self.ers:
            terms.append(self.lambda_f * inhibition_loss(gates))
        if self.irs:
            terms.append(
                self.beta * lateral_inhibition_loss([layer.last_input for layer in gated], gates)
            )
        return sum(terms)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args: Any) -> None:
        self._forget_batch()

    def on_train_end(self, trainer: Trainer, pl_module: ContinualModule) -> None:
        self._forget_batch()
        self._omega, _ = neuron_importance(
            pl_module.model, pl_module.batches(label="layer importance"), pl_module.all_reduce_sum
        )
        self._gates = self._gate_sample(pl_module)
        rates = unit_means(
            pl_module.model, pl_module.batches(SPARSITY_SAMPLES), "active", pl_module.all_reduce_sum
        )
        self._sparsity = {key: sparsity_index(r) for key, r in rates.items()}
        self.experience = pl_module.experience

    # -- what logging and analyses read ------------------------------------------------
    def neuron_importance(self) -> dict[str, Tensor]:
        """Omega per layer key (``body.<k>``) after the latest experience."""
        return dict(self._omega)

    def importance(self) -> dict[str, Tensor]:
        """Eq. 2 importance per parameter name of the model (empty before the first experience)."""
        if not self._omega or self.model is None:
            return {}
        return parameter_importance(self.model, self._omega)

    def gate_states(self) -> dict[str, Tensor]:
        """Per-sample gates ``(samples, units)`` of the first training samples of the latest
        experience (feature maps averaged over positions), per layer key."""
        return dict(self._gates)

    def layer_sparsity(self) -> dict[str, float | None]:
        """Eq. 1 sparsity per layer key (divided by 1 - 1/N) on the latest experience's
        training data; None where undefined (all units silent)."""
        return dict(self._sparsity)

    def state_dict(self) -> dict[str, Any]:
        return {
            "experience": self.experience,
            "sparsity": dict(self._sparsity),
            "neuron_importance": {k: v.cpu() for k, v in self._omega.items()},
            "gate_states": {k: v.cpu() for k, v in self._gates.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.experience = state_dict["experience"]
        self._sparsity = dict(state_dict.get("sparsity", {}))
        self._omega = dict(state_dict["neuron_importance"])
        self._gates = dict(state_dict["gate_states"])

    # -- internals ---------------------------------------------------------------------
    def _forget_batch(self) -> None:
        for layer in self.layers:
            layer.forget_batch()

    def _gate_sample(self, pl_module: ContinualModule) -> dict[str, Tensor]:
        # the same samples on every rank, whatever the number of processes
        batches = pl_module.batches(GATE_SAMPLES, batch_size=GATE_SAMPLES, every_rank=True)
        with closing(per_sample(pl_module.model, batches, "gate")) as gates:
            first = next(gates, {})
        return {key: value.cpu() for key, value in first.items()}
