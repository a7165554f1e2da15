"""Sums of per-sample gradient statistics, ``Σ_i Σ_k φ(∂T_ik/∂θ)`` with ``φ`` = square or abs.

EWC's Fisher is ``Σ_i g_i²`` and MAS's importance ``Σ_i |g_i|`` over per-sample gradients
``g_i``; the square of a batch-mean gradient is a different (and wrong) quantity. Two engines
compute the same sums:

- **Linear layers** (fast path): the per-sample weight gradient of ``y = W a + b`` is
  ``δ_ik a_iᵀ`` with ``δ_ik = ∂T_ik/∂y_i``, and both choices of ``φ`` are multiplicative, so
  ``Σ_i Σ_k φ(δ_ik a_iᵀ) = (Σ_k φ(δ_k))ᵀ φ(a)``: one matmul per layer, no per-sample gradient
  is ever formed. ``a`` is captured by a forward hook and ``δ_k`` by differentiating the batch
  sum of column k with respect to the layer's output (one backward pass per column).
- **Modules whose per-sample gradient has a closed form**, given the input ``a_i`` and the
  gradient of the output ``δ_i`` captured the same way: a module with a
  ``per_sample_grads(input, grad_output)`` method (the forgetting layer's switches), and
  :func:`rule_of` for convolutions (``δ_i`` times the unfolded input, one batched matmul; over
  large maps one batched matmul per kernel offset on shifted windows, reduced at once) and
  normalization layers in eval mode (``Σ_positions δ_i · â_i`` for the scale, with ``â`` the
  normalized input, and ``Σ_positions δ_i`` for the shift). Their per-sample gradients are
  formed one layer at a time.
- **Everything else** (convolutions, normalization layers, any other parameter):
  ``torch.func`` — ``vmap`` over samples of ``jacrev`` of ``functional_call``, which holds
  ``K × parameters`` per sample. Batch norm must be in eval mode there (running statistics:
  samples stay independent), as every importance pass runs.

Samples go through in chunks sized to a memory bound (:func:`bounded_chunk`), so a pass over
a ResNet needs a few hundred MB whatever the batch size.

``precision="bf16-mixed"`` runs the forward pass under bfloat16 autocast and forms the
closed-form layers' per-sample gradients in bfloat16 (their squares or absolute values are
summed over a chunk with float32 accumulation, and across chunks in float32): on a CPU with
bfloat16 matrix units, or a GPU, the pass takes a fraction of the time. On a ResNet-18 with
BatchNorm the sums differ from float32's by about 0.3 % in norm (3 % in the worst layer),
below the sampling noise of an importance estimate; with GroupNorm, whose backward pass
amplifies rounding, by about 1.4 % (8 %). The general path stays in float32.

``method="auto"`` takes the fast paths for every layer that saw exactly one call with one row
per sample, and the general path for the remaining parameters.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
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
Precision = Literal["32-true", "bf16-mixed"]
PRECISIONS: tuple[Precision, ...] = ("32-true", "bf16-mixed")

_REDUCTIONS: dict[str, Callable[[Tensor], Tensor]] = {"square": torch.square, "abs": torch.abs}
# the same, in place: for per-sample gradients formed only to be reduced (half the memory traffic)
_IN_PLACE: dict[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]] = {
    torch.square: Tensor.square_,
    torch.abs: Tensor.abs_,
}


def per_sample_grad_sums(
    model: nn.Module,
    terms: Terms,
    inputs: tuple[Tensor, ...],
    reduction: Reduction = "square",
    method: Method = "auto",
    chunk_size: int | None = None,
    memory_mb: float = 256.0,
    precision: Precision = "32-true",
) -> dict[str, Tensor]:
    """``Σ_i Σ_k φ(∂ terms(model, *inputs)[i, k] / ∂θ)`` for every trainable parameter θ.

    ``inputs`` are per-sample tensors (same first dimension). ``method="linear"`` raises if a
    trainable parameter is outside the layers the fast path serves (Linear, Conv2d, norms); ``"vmap"`` uses the
    general path for all parameters (for checking the fast one). The sums add up over samples,
    so the samples go through in chunks of ``chunk_size``, by default as many as keep the
    working memory under ``memory_mb`` (:func:`bounded_chunk`). ``precision``: see the module
    docstring.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}: use one of {', '.join(PRECISIONS)}")
    phi = _REDUCTIONS[reduction]
    params = named_parameters(model)
    n = inputs[0].shape[0]
    chunk = chunk_size or bounded_chunk(model, terms, inputs, memory_mb, method)
    sums: dict[str, Tensor] = {}
    with torch.enable_grad():
        for start in range(0, n, chunk):
            part = tuple(t[start : start + chunk] for t in inputs)
            sums_of_chunk = _chunk_sums(model, terms, part, phi, method, params, precision)
            for name, value in sums_of_chunk.items():
                sums[name] = sums[name] + value if name in sums else value
    return {name: sums[name] for name in params}


def bounded_chunk(
    model: nn.Module,
    terms: Terms,
    inputs: tuple[Tensor, ...],
    memory_mb: float,
    method: Method = "auto",
) -> int:
    """How many samples one chunk may hold for its working memory to stay near ``memory_mb``.

    Per sample, a chunk keeps every module's output for the backward pass (counted twice: the
    outputs and what autograd saves beside them); for the parameters on the general path, one
    Jacobian row per column of ``terms`` (counted three times: the Jacobian, φ of it and the
    layers' own per-sample gradients); and the largest closed-form layer's per-sample
    gradients. One sample's forward pass measures them.
    """
    params = named_parameters(model)
    outputs: dict[nn.Module, int] = {}

    def record(m: nn.Module, args: tuple, out: Tensor) -> None:
        outputs[m] = outputs.get(m, 0) + (out.numel() if isinstance(out, Tensor) else 0)

    handles = [
        m.register_forward_hook(record) for m in model.modules() if next(m.children(), None) is None
    ]
    try:
        with torch.no_grad():
            columns = terms(model, *(t[:1] for t in inputs)).shape[1]
    finally:
        for handle in handles:
            handle.remove()
    fast: dict[str, nn.Module] = {}
    if method != "vmap":
        fast = {**_private_linears(model, set(params)), **_self_differentiating(model, set(params))}
    served = {f"{n}.{k}" for n, m in fast.items() for k, _ in m.named_parameters(recurse=False)}
    general = sum(p.numel() for name, p in params.items() if name not in served)
    # a closed-form layer's per-sample gradients (and a convolution's unfolded input) exist
    # one layer at a time: the largest of them counts
    layer_peak = max(
        (
            3 * sum(p.numel() for p in m.parameters(recurse=False))
            + (outputs.get(m, 0) // m.out_channels * m.in_channels * math.prod(m.kernel_size)
               if isinstance(m, nn.Conv2d) else 0)
            for m in fast.values()
            if not isinstance(m, nn.Linear)
        ),
        default=0,
    )  # fmt: skip
    size = next(iter(params.values())).element_size() if params else 4
    per_sample = size * (2 * sum(outputs.values()) + 3 * columns * general + layer_peak)
    return max(1, min(inputs[0].shape[0], int(memory_mb * 2**20 // max(per_sample, 1))))


def _chunk_sums(
    model: nn.Module,
    terms: Terms,
    inputs: tuple[Tensor, ...],
    phi: Callable[[Tensor], Tensor],
    method: Method,
    params: dict[str, Tensor],
    precision: Precision,
) -> dict[str, Tensor]:
    """The sums over one chunk: the fast paths where they serve, the general path for the rest."""
    sums: dict[str, Tensor] = {}
    if method != "vmap":
        sums = _linear_sums(model, terms, inputs, phi, set(params), precision)
    rest = {n: p for n, p in params.items() if n not in sums}
    if rest and method == "linear":
        raise ValueError(f"no closed-form per-sample rule for {', '.join(rest)}; use method='auto'")
    if rest:
        sums.update(_vmap_sums(model, terms, inputs, phi, rest))
    return sums


def _linear_sums(
    model: nn.Module,
    terms: Terms,
    inputs: tuple[Tensor, ...],
    phi: Callable[[Tensor], Tensor],
    trainable: set[str],
    precision: Precision,
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
    bf16 = precision == "bf16-mixed"
    try:
        with torch.autocast(inputs[0].device.type, dtype=torch.bfloat16, enabled=bf16):
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
    deltas = {name: sums[f"{name}.weight"].new_zeros(sites[name][1].shape) for name in linear}
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
                reduced = _reduced(layers[name], sites[name][0], delta, _IN_PLACE[phi])
            for key, value in reduced.items():
                sums[f"{name}.{key}"] += value
    for name in linear:
        a = sites[name][0]
        sums[f"{name}.weight"] += deltas[name].T @ phi(a.detach().to(deltas[name].dtype))
        if f"{name}.bias" in sums:
            sums[f"{name}.bias"] += deltas[name].sum(0)
    return {n: s for n, s in sums.items() if n in trainable}


def _self_differentiating(model: nn.Module, trainable: set[str]) -> dict[str, nn.Module]:
    """Leaf modules with a per-sample gradient rule (:func:`rule_of`) and a trainable parameter."""
    return {
        name: m
        for name, m in model.named_modules()
        if rule_of(m) is not None
        and any(f"{name}.{k}" in trainable for k, _ in m.named_parameters(recurse=False))
        and next(m.children(), None) is None
    }


PerSampleRule = Callable[[nn.Module, Tensor, Tensor], dict[str, Tensor]]

#: Feature maps from this many positions on take the shifted-window path of a convolution
#: (measured faster there; the unfolded input is the larger cost on big maps, the per-offset
#: products on small ones).
SHIFTED_FROM = 256


def _reduced(module: nn.Module, a: Tensor, delta: Tensor, phi_: Callable) -> dict[str, Tensor]:
    """``Σ_i φ(g_i)`` of a closed-form module's per-sample gradients ``g_i`` (``φ`` in place),
    formed and summed over the chunk in the narrower of the input's and output gradient's types
    (bfloat16 under autocast: the sum accumulates in float32 and is rounded once per chunk;
    converting every per-sample gradient to float32 first would cost more than the matmul)."""
    if a.dtype != delta.dtype:
        narrow = min(a.dtype, delta.dtype, key=lambda t: t.itemsize)
        a, delta = a.to(narrow), delta.to(narrow)
    if _shiftable(module, a):
        return _shifted_conv_sums(module, a, delta, phi_)
    return {key: phi_(grad).sum(0) for key, grad in rule_of(module)(module, a, delta).items()}


def _shiftable(module: nn.Module, a: Tensor) -> bool:
    """A stride-1, "same"-padded Conv2d with an odd square kernel, over a large feature map."""
    return (
        rule_of(module) is _conv_grads
        and module.stride == (1, 1)
        and module.dilation == (1, 1)
        and module.kernel_size[0] == module.kernel_size[1]
        and module.kernel_size[0] % 2 == 1
        and module.padding == (module.kernel_size[0] // 2,) * 2
        and a.shape[2] * a.shape[3] >= SHIFTED_FROM
    )


def _shifted_conv_sums(
    conv: nn.Module, a: Tensor, delta: Tensor, phi_: Callable
) -> dict[str, Tensor]:
    """``Σ_i φ`` of a same-padded stride-1 convolution's per-sample gradients, one kernel offset
    at a time and without unfolding the input: on the zero-padded input flattened row by row,
    offset ``(u, v)`` reads a contiguous window, and the output gradient laid on the same
    padded grid (zeros past each row) times that window is the per-sample gradient of the
    weights at ``(u, v)``."""
    k, p = conv.kernel_size[0], conv.padding[0]
    h, w = a.shape[2:]
    wide = w + 2 * p
    # positions row by row, channels last: every window is a block of whole rows, which the
    # batched matmul reads in place (a window of channels-first rows it would copy first)
    padded = F.pad(a.permute(0, 2, 3, 1), (0, 0, p, p, p, p)).flatten(1, 2)
    padded = F.pad(padded, (0, 0, 0, 2 * p))  # the last window's tail
    d = F.pad(delta, (0, 2 * p)).flatten(2)  # (n, out, h * wide)
    weight = torch.empty_like(conv.weight)
    for u in range(k):
        for v in range(k):
            start = u * wide + v
            window = padded[:, start : start + h * wide]
            weight[:, :, u, v] = phi_(torch.bmm(d, window)).sum(0)
    sums = {"weight": weight}
    if conv.bias is not None:
        sums["bias"] = phi_(delta.flatten(2).sum(2)).sum(0).to(weight.dtype)
    return sums


def _conv_grads(conv: nn.Module, a: Tensor, delta: Tensor) -> dict[str, Tensor]:
    """Per-sample gradients of a Conv2d: ``δ_i`` (out channels x positions) times the unfolded
    input (positions x in channels · kernel), one batched matmul. (A grouped convolution over
    the samples computes the same; it measured slower inside the importance passes here.)"""
    cols = F.unfold(a, conv.kernel_size, conv.dilation, conv.padding, conv.stride)
    d = delta.flatten(2)
    grads = {"weight": torch.bmm(d, cols.transpose(1, 2)).view(len(a), *conv.weight.shape)}
    if conv.bias is not None:
        grads["bias"] = d.sum(2)
    return grads


def _norm_grads(norm: nn.Module, a: Tensor, delta: Tensor) -> dict[str, Tensor]:
    """Per-sample gradients of a BatchNorm (eval mode) or GroupNorm's scale and shift."""
    if isinstance(norm, nn.GroupNorm):
        normalized = F.group_norm(a, norm.num_groups, eps=norm.eps)
    else:
        normalized = F.batch_norm(a, norm.running_mean, norm.running_var, eps=norm.eps)
    grads = {"weight": (delta * normalized).flatten(2).sum(2), "bias": delta.flatten(2).sum(2)}
    return {k: v for k, v in grads.items() if getattr(norm, k) is not None}


def rule_of(module: nn.Module) -> PerSampleRule | None:
    """How ``module``'s per-sample gradients follow from its input and output gradient, where a
    closed form serves: its own ``per_sample_grads``, a plain Conv2d (zero padding, one group),
    a BatchNorm2d in eval mode with running statistics, or a GroupNorm with an affine part."""
    own = getattr(module, "per_sample_grads", None)
    if callable(own):
        return lambda m, a, delta: own(a, delta)
    if (
        type(module) is nn.Conv2d
        and module.groups == 1
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
    ):
        return _conv_grads
    if type(module) is nn.BatchNorm2d and not module.training and module.track_running_stats:
        return _norm_grads
    if type(module) is nn.GroupNorm and module.affine:
        return _norm_grads
    return None


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
) -> dict[str, Tensor]:
    """General-path sums: per-sample Jacobians of each row of ``terms``, vmapped over samples."""
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

    return {n.removeprefix("model."): v.sum(0) for n, v in vmap(sample_stats)(*inputs).items()}
