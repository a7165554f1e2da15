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

from afmbench.models import ACTIVATIONS, BasicBlock, BatchRecorder, ContinualModel

Mode = Literal["shortcut", "gate"]
MODES: tuple[str, ...] = ("shortcut", "gate")
EPS = 1e-8


class ForgettingLayer(BatchRecorder):
    """Per-unit neural switches: ``h + h * sigma`` (``shortcut``, eq. 5) or ``h * sigma``
    (``gate``, eq. 3).

    In training mode the layer keeps the last batch's input ``h`` and gates (with their graph)
    in :attr:`last_input` / :attr:`last_gate`, so the loss terms can be formed after the forward
    pass; :meth:`forget_batch` drops them once the step is done.
    """

    record_names = ("last_input", "last_gate")

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
    the Linear/Conv2d child that computes the layer's pre-activation (for a ResNet block, the
    block's last convolution, ``"<block>.conv2"``).
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
        elif isinstance(child, BasicBlock):  # its last convolution, the shortcut added after
            producer, units = f"{name}.conv2", child.out_channels
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
    return _Inhibition.apply(*gates)


def lateral_inhibition_loss(inputs: list[Tensor], gates: list[Tensor]) -> Tensor:
    """IRS, eq. 8: ``sum_{i != j} h_i h_j (1 - sigma_i) sigma_j`` per sample, summed over layers.

    Units compete with the other units of their layer at the same position (channels of a
    feature map compete location by location); the value is averaged over samples and positions.
    """
    return sum(_LateralInhibition.apply(h, g) for h, g in zip(inputs, gates))


class _Inhibition(torch.autograd.Function):
    """ERS with its backward pass written out (autograd took a dozen small operations a layer).

    Per layer, with ``r`` rows (samples x positions), ``m = sum sigma`` and ``q = sum sigma^2``:
    the closed share is ``C = sum_l (units_l - m_l / r_l)`` and the mixed one ``M = sum_l (m_l -
    q_l) / r_l`` (a per-unit mean over rows, summed over units, is a sum over everything / r).
    With ``D = C + eps``, ``d(M / D) / d sigma = ((D + M) - 2 D sigma) / (r D^2)``: affine in
    sigma, so the backward pass is one fused operation per layer.
    """

    @staticmethod
    def forward(ctx, *gates: Tensor) -> Tensor:
        wide = [_wide(g) for g in gates]
        rows = [g.numel() / g.shape[1] for g in gates]
        sums = [g.sum() for g in wide]
        closed = sum(g.shape[1] - m / r for g, m, r in zip(gates, sums, rows))
        mixed = sum((m - _dot(g, g)) / r for g, m, r in zip(wide, sums, rows))
        ctx.save_for_backward(*wide)
        ctx.rows, ctx.dtypes = rows, [g.dtype for g in gates]
        ctx.denominator, ctx.mixed = closed + EPS, mixed
        return mixed / ctx.denominator

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        scale = grad / ctx.denominator.square()
        offset = (ctx.denominator + ctx.mixed) * scale  # then / r and - 2 D sigma / r per layer
        slope = 2 * ctx.denominator * scale
        return tuple(
            torch.addcmul(offset / r, g, slope / r, value=-1).to(dtype) if wanted else None
            for g, r, dtype, wanted in zip(
                ctx.saved_tensors, ctx.rows, ctx.dtypes, ctx.needs_input_grad
            )
        )


class _LateralInhibition(torch.autograd.Function):
    """One layer's IRS with its backward pass written out.

    With ``b = h sigma``, ``a = h - b`` and the unit sums ``S_h``, ``S_b`` of each row (sample and
    position), the double sum is ``(S_h - S_b) S_b - sum_i a_i b_i``, linear in the width. Its
    gradient in ``b`` is ``(S_h - 2 S_b) - h + 2 b``, and in ``h`` with ``b`` held ``S_b - b``;
    the chain rule through ``b = h sigma`` gives both inputs' gradients in a few passes.
    """

    @staticmethod
    def forward(ctx, h: Tensor, g: Tensor) -> Tensor:
        ctx.dtypes = (h.dtype, g.dtype)
        h, g = _wide(h), _wide(g)
        b = h * g
        a = h - b
        s_h, s_b = h.sum(1, keepdim=True), b.sum(1, keepdim=True)
        ctx.save_for_backward(h, g, b, a, s_h, s_b)
        ctx.rows = h.numel() / h.shape[1]
        return (_dot(s_h - s_b, s_b) - _dot(b, a)) / ctx.rows

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        h, g, b, a, s_h, s_b = ctx.saved_tensors
        scale = grad / ctx.rows
        # the gradient in b, scaled: (S_h - 2 S_b) - h + 2 b = (b - a) + (S_h - 2 S_b)
        d_b = torch.sub(b, a).add_(s_h - 2 * s_b).mul_(scale)
        d_h = torch.addcmul((s_b - b).mul_(scale), g, d_b) if ctx.needs_input_grad[0] else None
        d_g = h * d_b if ctx.needs_input_grad[1] else None
        return tuple(None if d is None else d.to(dtype) for d, dtype in zip((d_h, d_g), ctx.dtypes))


def _wide(x: Tensor) -> Tensor:
    """``x`` in at least single precision: sums over a layer lose too much in 16 bits."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _dot(x: Tensor, y: Tensor) -> Tensor:
    """``sum(x * y)`` in one pass, without the product's temporary."""
    return torch.dot(x.reshape(-1), y.reshape(-1))
