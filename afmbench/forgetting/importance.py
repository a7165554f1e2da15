"""Per-unit statistics over data, neuron importance, and parameter importance from it (AFM eq. 2).

Neuron importance ``Omega_i`` of a gated layer is the mean switch state of unit ``i`` over the
data (eval mode; over samples and positions for feature maps). A plain layer has no switches;
there the mean activation, divided by the layer's largest, stands in, so that every analysis
also runs on a model trained without the forgetting layer.

Parameter importance (eq. 2) of a weight from unit ``j`` of layer ``l-1`` to unit ``i`` of
layer ``l`` is ``1 - (1 - Omega_i^l)(1 - Omega_j^{l-1})``. Layers without switches, the input
and the output heads, count as ``Omega = 0``: a connection from the input is then exactly as
important as the unit it feeds, one into a head exactly as important as the unit it reads, and
a bias (a connection from a constant) as important as its unit. After a conv stage is flattened,
each input feature takes the importance of the channel it comes from.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from torch import Tensor, nn

from afmbench.forgetting.layer import Site, sites
from afmbench.models import ContinualModel

Statistic = Literal["gate", "activation", "active"]
Normalization = Literal["divide", "multiply"]
Batch = tuple[Tensor, Tensor, Tensor]


def unit_means(
    model: ContinualModel,
    batches: Iterable[Batch],
    statistic: Statistic,
    reduce: Callable[[Tensor], Tensor] = lambda t: t,
) -> dict[str, Tensor]:
    """Mean of a per-unit ``statistic`` over ``batches``, per layer key, in eval mode.

    ``gate``: switch state (gated layers only); ``activation``: the layer's output;
    ``active``: 1 where the output is positive (the firing rate ``r_i`` of the sparsity
    measure). Means run over samples and positions. ``reduce`` sums a tensor across processes
    (``ContinualModule.all_reduce_sum``) so every rank gets the same answer. Sums run in at
    least single precision: in a 16-bit model's dtype a running sum over a data set rounds
    whole batches away (bf16 keeps 8 bits).
    """
    totals: dict[str, Tensor] = {}
    counts: dict[str, Tensor] = {}
    for values in per_sample(model, batches, statistic):
        for key, value in values.items():
            wide = torch.promote_types(value.dtype, torch.float32)
            totals[key] = totals.get(key, 0) + value.sum(0, dtype=wide)
            counts[key] = counts.get(key, 0) + torch.tensor(
                float(value.shape[0]), dtype=wide, device=value.device
            )
    return {key: reduce(totals[key]) / reduce(counts[key]) for key in totals}


@torch.no_grad()
def per_sample(
    model: ContinualModel, batches: Iterable[Batch], statistic: Statistic
) -> Iterator[dict[str, Tensor]]:
    """For each batch, the ``statistic`` per sample and unit ``(batch, units)`` per layer key
    (averaged over positions for feature maps), in eval mode."""
    targets = [s for s in sites(model) if statistic != "gate" or s.layer is not None]
    seen: dict[str, Tensor] = {}

    def record(site: Site) -> Callable:
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            if statistic == "gate":
                value = module.gates(inputs[0])
            else:
                value = output if statistic == "activation" else (output > 0).to(output.dtype)
            seen[site.key] = value.flatten(2).mean(-1) if value.dim() > 2 else value

        return hook

    with evaluating(model):
        handles = [
            (
                s.layer if statistic == "gate" else model.body.get_submodule(s.name)
            ).register_forward_hook(record(s))
            for s in targets
        ]
        try:
            for x, _, t in batches:
                model(x, t)
                yield dict(seen)
        finally:
            for handle in handles:
                handle.remove()


def sparsity_index(rates: Tensor, normalization: Normalization = "divide") -> float | None:
    """Eq. 1 for one layer's firing rates; None where undefined (one unit, or all silent).

    ``1 - mean(r)^2 / mean(r^2)`` lies in ``[0, 1 - 1/N]``; ``divide`` rescales it to
    ``[0, 1]`` (0: every unit fires equally often, 1: a single unit does all the firing), as
    the default; ``multiply`` applies the factor ``(1 - 1/N)`` as the AFM paper prints it.
    """
    rates = rates.double()
    n = rates.numel()
    second = (rates**2).mean()
    if n < 2 or second == 0:
        return None
    raw = float(1 - rates.mean() ** 2 / second)
    factor = 1 - 1 / n
    return raw / factor if normalization == "divide" else raw * factor


def neuron_importance(
    model: ContinualModel,
    batches: Iterable[Batch],
    reduce: Callable[[Tensor], Tensor] = lambda t: t,
) -> tuple[dict[str, Tensor], str]:
    """``Omega`` per layer and where it comes from (``"gate"`` or ``"activation"``)."""
    if any(s.layer is not None for s in sites(model)):
        return unit_means(model, batches, "gate", reduce), "gate"
    means = unit_means(model, batches, "activation", reduce)
    return {
        k: v / v.max().clamp_min(torch.finfo(v.dtype).tiny) for k, v in means.items()
    }, "activation"


def parameter_importance(model: ContinualModel, omega: dict[str, Tensor]) -> dict[str, Tensor]:
    """Eq. 2 for every parameter of ``model`` (names as in ``model.named_parameters()``)."""
    found = sites(model)
    by_name = {s.name: omega.get(s.key) for s in found}
    result: dict[str, Tensor] = {}
    upstream: Tensor | None = None  # Omega of the last gated layer passed, None for the input
    children = list(model.body.named_children())
    for index, (name, child) in enumerate(children):
        if name in by_name:
            upstream = by_name[name]
            for pname, p in child.named_parameters():
                result[f"body.{name}.{pname}"] = connection_importance(p, upstream, None)
            continue
        downstream = next((by_name[n] for n, _ in children[index + 1 :] if n in by_name), None)
        for pname, p in child.named_parameters():
            result[f"body.{name}.{pname}"] = connection_importance(p, downstream, upstream)
    for name, p in model.head.named_parameters():
        result[f"head.{name}"] = connection_importance(p, None, upstream)
    return result


def connection_importance(weight: Tensor, out: Tensor | None, into: Tensor | None) -> Tensor:
    """``1 - (1 - Omega_out)(1 - Omega_in)`` shaped like ``weight`` (None: Omega = 0).

    Dimension 0 of ``weight`` indexes output units, dimension 1 (if any) input features; a
    one-dimensional parameter (a bias, a norm's scale) connects a constant to its unit.
    """
    keep = 1 - _along(out, weight, 0)
    if weight.dim() >= 2:
        keep = keep * (1 - _along(into, weight, 1))
    return (1 - keep).expand_as(weight).detach().clone()


def _along(omega: Tensor | None, weight: Tensor, dim: int) -> Tensor:
    """``omega`` broadcast along dimension ``dim`` of ``weight`` (repeated per flattened
    position when a feature map was flattened)."""
    if omega is None:
        return weight.new_zeros(())
    size = weight.shape[dim]
    omega = omega.to(weight.device, weight.dtype)
    if size != omega.numel():
        omega = omega.repeat_interleave(size // omega.numel())
    shape = [1] * weight.dim()
    shape[dim] = size
    return omega.view(shape)


@contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode for the block, then the previous mode back."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
