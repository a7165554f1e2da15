"""Sums of per-sample gradient statistics, ``Σ_i Σ_k φ(∂T_ik/∂θ)`` with ``φ`` = square or abs.

EWC's Fisher is ``Σ_i g_i²`` and MAS's importance ``Σ_i |g_i|`` over per-sample gradients
``g_i``; the square of a batch-mean gradient is a different (and wrong) quantity. Two engines
compute the same sums:

- **Linear layers** (fast path): the per-sample weight gradient of ``y = W a + b`` is
  ``δ_ik a_iᵀ`` with ``δ_ik = ∂T_ik/∂y_i``, and both choices of ``φ`` are multiplicative, so
  ``Σ_i Σ_k φ(δ_ik a_iᵀ) = (Σ_k φ(δ_k))ᵀ φ(a)``: one matmul per layer, no per-sample gradient
  is ever formed. ``a`` is captured by a forward hook and ``δ_k`` by differentiating the batch
  sum of column k with respect to the layer's output (one backward pass per column).
- **Modules that know their own per-sample gradient** (the forgetting layer's switches): a
  module with a ``per_sample_grads(input, grad_output)`` method returns, for each of its
  parameters, the per-sample gradients given the gradient of its output, captured the same way.
- **Everything else** (convolutions, any other parameter): ``torch.func`` — ``vmap`` over
  samples of ``jacrev`` of ``functional_call`` — in chunks, so memory stays at
  ``chunk_size × K × parameters``.

``method="auto"`` takes the fast paths for every layer that saw exactly one call with one row
per sample, and the general path for the remaining parameters.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call, jacrev, vmap

from afmbench.models import named_parameters

Terms = Callable[..., Tensor]
"""``terms(model, *inputs) -> (B, K)``: row ``i`` must depend on sample ``i`` only (no batch
statistics: run the model in eval mode). Each column is differentiated separately, so a
weighted sum over ``k`` (e.g. an expectation over classes) is written as columns scaled by
the square root of the weight when ``φ`` is the square."""

Reduction = Literal["square", "abs"]
Method = Literal["auto", "linear", "vmap"]

_REDUCTIONS: dict[str, Callable[[Tensor], Tensor]] = {"square": torch.square, "abs": torch.abs}


def per_sample_grad_sums(
    model: nn.Module,
    terms: Terms,
    inputs: tuple[Tensor, ...],
    reduction: Reduction = "square",
    method: Method = "auto",
    chunk_size: int = 32,
) -> dict[str, Tensor]:
    """``Σ_i Σ_k φ(∂ terms(model, *inputs)[i, k] / ∂θ)`` for every trainable parameter θ.

    ``inputs`` are per-sample tensors (same first dimension). ``method="linear"`` raises if a
    trainable parameter is outside a Linear layer the fast path can serve; ``"vmap"`` uses the
    general path for all parameters (for checking the fast one).
    """
    phi = _REDUCTIONS[reduction]
    params = named_parameters(model)
    sums: dict[str, Tensor] = {}
    with torch.enable_grad():
        if method != "vmap":
            sums = _linear_sums(model, terms, inputs, phi, set(params))
        rest = {n: p for n, p in params.items() if n not in sums}
        if rest and method == "linear":
            raise ValueError(f"no Linear fast path for {', '.join(rest)}; use method='auto'")
        if rest:
            sums.update(_vmap_sums(model, terms, inputs, phi, rest, chunk_size))
    return {n: sums[n] for n in params}


def _linear_sums(
    model: nn.Module,
    terms: Terms,
    inputs: tuple[Tensor, ...],
    phi: Callable[[Tensor], Tensor],
    trainable: set[str],
) -> dict[str, Tensor]:
    """Fast-path sums for every Linear layer and every module with ``per_sample_grads`` that
    qualifies (see the module docstring)."""
    layers = {**_private_linears(model, trainable), **_self_differentiating(model, trainable)}
    calls: dict[str, list[tuple[Tensor, Tensor]]] = {name: [] for name in layers}
    handles = [
        module.register_forward_hook(
            lambda m, args, out, name=name: calls[name].append((args[0], out))
        )
        for name, module in layers.items()
    ]
    try:
        table = terms(model, *inputs)
    finally:
        for handle in handles:
            handle.remove()
    n = inputs[0].shape[0]
    sites = {
        name: seen[0]
        for name, seen in calls.items()
        if len(seen) == 1
        and seen[0][0].shape[0] == n
        and (seen[0][0].dim() == 2 or not isinstance(layers[name], nn.Linear))
    }
    unused = [name for name, seen in calls.items() if not seen]  # per-sample gradients are 0
    sums = {
        f"{name}.{k}": torch.zeros_like(p)
        for name in [*sites, *unused]
        for k, p in layers[name].named_parameters(recurse=False)
    }
    # φ(δ_ik a_iᵀ) = φ(δ_ik) φ(a_i)ᵀ: sum φ(δ) over the columns first, then one matmul per layer
    linear = [name for name in sites if isinstance(layers[name], nn.Linear)]
    deltas = {name: torch.zeros_like(sites[name][1]) for name in linear}
    for k in range(table.shape[1] if sites else 0):
        grads = torch.autograd.grad(
            table[:, k].sum(),
            [out for _, out in sites.values()],
            retain_graph=k + 1 < table.shape[1],
            allow_unused=True,
        )
        for name, delta in zip(sites, grads):
            if delta is None:  # the layer does not reach this column
                continue
            if name in deltas:
                deltas[name] += phi(delta)
                continue
            with torch.no_grad():  # constants: no graph may reach the sums
                per_sample = layers[name].per_sample_grads(sites[name][0], delta)
            for key, grad in per_sample.items():
                sums[f"{name}.{key}"] += phi(grad).sum(0)
    for name in linear:
        a = sites[name][0]
        sums[f"{name}.weight"] += deltas[name].T @ phi(a.detach())
        if f"{name}.bias" in sums:
            sums[f"{name}.bias"] += deltas[name].sum(0)
    return {n: s for n, s in sums.items() if n in trainable}


def _self_differentiating(model: nn.Module, trainable: set[str]) -> dict[str, nn.Module]:
    """Leaf modules with a ``per_sample_grads`` method and a trainable parameter."""
    return {
        name: m
        for name, m in model.named_modules()
        if callable(getattr(m, "per_sample_grads", None))
        and any(f"{name}.{k}" in trainable for k, _ in m.named_parameters(recurse=False))
        and next(m.children(), None) is None
    }


def _private_linears(model: nn.Module, trainable: set[str]) -> dict[str, nn.Linear]:
    """Plain ``nn.Linear`` layers with a trainable parameter that no other module shares."""
    owners: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        owners[id(p)] = owners.get(id(p), 0) + 1
    return {
        name: m
        for name, m in model.named_modules()
        if type(m) is nn.Linear
        and any(f"{name}.{k}" in trainable for k, _ in m.named_parameters(recurse=False))
        and all(owners[id(p)] == 1 for p in m.parameters(recurse=False))
    }


class _Bound(nn.Module):
    """``terms`` bound to ``model`` as a module, so ``functional_call`` can swap its parameters."""

    def __init__(self, model: nn.Module, terms: Terms) -> None:
        super().__init__()
        self.model = model
        self.terms = terms

    def forward(self, *inputs: Tensor) -> Tensor:
        return self.terms(self.model, *inputs)


def _vmap_sums(
    model: nn.Module,
    terms: Terms,
    inputs: tuple[Tensor, ...],
    phi: Callable[[Tensor], Tensor],
    params: dict[str, Tensor],
    chunk_size: int,
) -> dict[str, Tensor]:
    """General-path sums: per-sample Jacobians of each row of ``terms``, one chunk at a time."""
    bound = _Bound(model, terms)
    theta = {f"model.{n}": p.detach() for n, p in params.items()}
    # every other parameter enters as a constant: the sums must not carry an autograd graph
    fixed = {f"model.{n}": p.detach() for n, p in model.named_parameters() if n not in params}

    def row(weights: dict[str, Tensor], *sample: Tensor) -> Tensor:
        batch = tuple(s.unsqueeze(0) for s in sample)
        return functional_call(bound, {**fixed, **weights}, batch)[0]

    def sample_stats(*sample: Tensor) -> dict[str, Tensor]:
        jacobians = jacrev(row)(theta, *sample)
        return {n: phi(j).sum(0) for n, j in jacobians.items()}

    per_sample = vmap(sample_stats)
    sums = {n: torch.zeros_like(p) for n, p in theta.items()}
    for start in range(0, inputs[0].shape[0], chunk_size):
        chunk = tuple(t[start : start + chunk_size] for t in inputs)
        for n, value in per_sample(*chunk).items():
            sums[n] += value.sum(0)
    return {n.removeprefix("model."): s for n, s in sums.items()}
