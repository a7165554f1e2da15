"""The forgetting layer (AFM eqs. 3-5), where it goes in a model, and its two losses (eqs. 6, 8).

A :class:`ForgettingLayer` sits right after a hidden activation. Each unit ``i`` (a feature of
a Linear layer, a channel of a Conv2d feature map) has one learnable switch weight ``W_f[i]``;
the switch's state for a sample is ``sigma = sigmoid(rho * h * W_f)``, computed per position for
feature maps with the channel's weight broadcast over positions.

``W_f`` starts at zero, so every switch starts exactly half open (``sigma = 0.5`` whatever the
input), as the paper asks, and the layer starts as a uniform rescaling (x1.5 with the shortcut,
x0.5 as a pure gate) that the next layer absorbs. The gradient with respect to ``W_f`` is
``rho * h * sigma * (1 - sigma)``, non-zero at zero, so the switches move from the first step.
Where ``h = 0`` (a silent ReLU unit) the switch reads exactly 0.5 and passes nothing either way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from afmbench.models import ACTIVATIONS, ContinualModel

Mode = Literal["shortcut", "gate"]
MODES: tuple[str, ...] = ("shortcut", "gate")
EPS = 1e-8


class ForgettingLayer(nn.Module):
    """Per-unit neural switches: ``h + h * sigma`` (``shortcut``, eq. 5) or ``h * sigma``
    (``gate``, eq. 3).

    In training mode the layer keeps the last batch's input ``h`` and gates (with their graph)
    in :attr:`last_input` / :attr:`last_gate`, so the loss terms can be formed after the forward
    pass; :meth:`forget_batch` drops them once the step is done.
    """

    def __init__(self, units: int, rho: float = 1.0, mode: Mode = "shortcut") -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.units = units
        self.rho = rho
        self.mode = mode
        self.weight = nn.Parameter(torch.zeros(units))
        self.last_input: Tensor | None = None
        self.last_gate: Tensor | None = None

    def gates(self, h: Tensor) -> Tensor:
        """Switch states for the activations ``h`` (shape ``(batch, units, *positions)``)."""
        weight = (self.rho * self.weight).view(1, -1, *([1] * (h.dim() - 2)))
        return torch.sigmoid(h * weight)

    def forward(self, h: Tensor) -> Tensor:
        gate = self.gates(h)
        if self.training:
            self.last_input, self.last_gate = h, gate
        return h * gate if self.mode == "gate" else torch.addcmul(h, h, gate)

    def per_sample_grads(self, h: Tensor, grad_output: Tensor) -> dict[str, Tensor]:
        """Per-sample gradients of :attr:`weight` given ``∂T/∂output`` for each sample (the
        per-sample gradient engine's fast path): ``Σ_positions δ · ρ h² σ (1 − σ)``, because
        both modes have ``∂output/∂σ = h`` and ``∂σ/∂W_f = ρ h σ (1 − σ)``."""
        gate = self.gates(h)
        grad = grad_output * self.rho * h.square() * gate * (1 - gate)
        return {"weight": grad.flatten(2).sum(-1) if grad.dim() > 2 else grad}

    def forget_batch(self) -> None:
        self.last_input = self.last_gate = None

    def extra_repr(self) -> str:
        return f"units={self.units}, rho={self.rho}, mode={self.mode}"


@dataclass(frozen=True)
class Site:
    """A hidden layer's activation in the model body: where gates go and statistics are read.

    ``name`` is the body child's name (``model.body[name]`` is the activation, or the
    ``Sequential(activation, ForgettingLayer)`` that replaced it); ``producer`` is the name of
    the Linear/Conv2d child that computes the layer's pre-activation.
    """

    name: str
    units: int
    producer: str
    layer: ForgettingLayer | None = None

    @property
    def key(self) -> str:
        """The layer's key in importance dictionaries (its path in the model)."""
        return f"body.{self.name}"


def sites(model: ContinualModel) -> list[Site]:
    """Every hidden layer of ``model``'s body in order, gated or not."""
    found, units, producer = [], 0, ""
    for name, child in model.body.named_children():
        if isinstance(child, (nn.Linear, nn.Conv2d)):
            producer = name
            units = child.out_features if isinstance(child, nn.Linear) else child.out_channels
        elif isinstance(child, tuple(ACTIVATIONS.values())):
            found.append(Site(name, units, producer))
        elif _is_gated(child):
            found.append(Site(name, units, producer, child[1]))
    return found


def _is_gated(child: nn.Module) -> bool:
    return (
        isinstance(child, nn.Sequential)
        and len(child) == 2
        and isinstance(child[1], ForgettingLayer)
    )


def attach(
    model: ContinualModel, rho: float = 1.0, mode: Mode = "shortcut"
) -> list[ForgettingLayer]:
    """Put a forgetting layer after every hidden activation of ``model`` that lacks one.

    The activation child ``body[k]`` becomes ``Sequential(activation, ForgettingLayer)``, so
    every other parameter keeps its name and the switch weights are ``body.k.1.weight``.
    Idempotent: already gated layers are left as they are. Returns all the model's layers.
    """
    device = next(model.parameters()).device
    for site in sites(model):
        if site.layer is None:
            activation = model.body.get_submodule(site.name)
            gated = nn.Sequential(activation, ForgettingLayer(site.units, rho, mode).to(device))
            model.body.register_module(site.name, gated)
    return layers(model)


def layers(model: ContinualModel) -> list[ForgettingLayer]:
    """The forgetting layers of ``model``, in order (empty for a plain model)."""
    return [s.layer for s in sites(model) if s.layer is not None]


def inhibition_loss(gates: list[Tensor]) -> Tensor:
    """ERS, eq. 6: ``sum (1 - sigma) sigma / (sum (1 - sigma) + eps)`` over units and layers.

    Each unit's terms are first averaged over the batch and over positions, so every unit counts
    once whatever the batch size or the feature map's size. The ratio is a (1 - sigma)-weighted
    mean of the gates: lowering it closes switches, and it vanishes where gates are polarized.
    """
    # sum over units of a per-unit mean over rows = the sum over everything / rows
    rows = [g.numel() / g.shape[1] for g in gates]
    closed = sum(g.shape[1] - g.sum() / n for g, n in zip(gates, rows))
    mixed = sum((g - g.square()).sum() / n for g, n in zip(gates, rows))
    return mixed / (closed + EPS)


def lateral_inhibition_loss(inputs: list[Tensor], gates: list[Tensor]) -> Tensor:
    """IRS, eq. 8: ``sum_{i != j} h_i h_j (1 - sigma_i) sigma_j`` per sample, summed over layers.

    With ``a = h (1 - sigma)`` and ``b = h sigma`` the double sum is ``sum(a) sum(b) - sum(a b)``,
    linear in the width. Units compete with the other units of their layer at the same position
    (channels of a feature map compete location by location); the value is averaged over samples
    and positions.
    """
    total = inputs[0].new_zeros(())
    for h, g in zip(inputs, gates):
        h, g = _units_last(h), _units_last(g)
        b = h * g  # then sum(a) = sum(h) - sum(b) and a b = b (h - b): fewer ops per step
        s_b = b.sum(-1)
        total = total + ((h.sum(-1) - s_b) * s_b).mean() - (b * (h - b)).sum() / h.shape[0]
    return total


def _units_last(x: Tensor) -> Tensor:
    """``(batch, units, *positions)`` as ``(batch * positions, units)``."""
    return x.movedim(1, -1).reshape(-1, x.shape[1])
