"""What EWC, SI, MAS and ANPyC share: a quadratic pull towards anchors, and importance passes.

Every strategy here penalizes ``strength · Σ_terms Σ_k Ω_k (θ_k − θ*_k)²``; they differ only in
how Ω is estimated and how terms combine across experiences. Nothing is tied to a parameter
list fixed at construction: state is keyed by ``model.named_parameters()`` names and taken
when an experience ends, so modules another plugin adds to the model (the forgetting layer's
gates, inserted before training) are consolidated like any other parameter.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from afmbench.config import require
from afmbench.errors import DivergenceError
from afmbench.models import named_parameters
from afmbench.plugin import ContinualPlugin

if TYPE_CHECKING:
    from afmbench.models import ContinualModel
    from afmbench.module import ContinualModule

Stats = Callable[[Tensor, Tensor, int], dict[str, Tensor]]
"""``stats(x, y, task)``: per-parameter sums over one batch of a single task."""

#: Batch size of importance passes where it does not change the result (it only trades
#: memory for speed).
PASS_BATCH_SIZE = 256


@dataclass
class Term:
    """One quadratic term: importance Ω and anchor θ* per parameter name."""

    importance: dict[str, Tensor]
    anchor: dict[str, Tensor]


class QuadraticPenalty(ContinualPlugin):
    """Base plugin: penalty ``strength · Σ_terms Σ_k Ω_k (θ_k − θ*_k)²``.

    Subclasses set :attr:`strength` and fill :attr:`terms` when an experience ends.
    """

    strength: float = 1.0
    closed_form_grad = True
    #: Names of further per-parameter tables (dicts of tensors) that a subclass keeps and
    #: that checkpoints must carry.
    tables: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.terms: list[Term] = []
        # (the terms it was made from, the device, the merged terms): see merged_terms
        self._merged: tuple[list[Term], torch.device, list[Term]] | None = None

    def __repr__(self) -> str:
        """``EWC(lambda_=100.0, ...)``: the run's identity hashes it, so no object address."""
        names = [n for n in inspect.signature(type(self).__init__).parameters if n != "self"]
        return f"{type(self).__name__}({', '.join(f'{n}={getattr(self, n)!r}' for n in names)})"

    def penalty(self, module: ContinualModule) -> Tensor | None:
        if not self.terms:
            return None
        params = module.trainable_parameters()
        total = 0.0
        for term in self.terms_on(module.device):
            for name, omega in term.importance.items():
                theta = _param(params, name, self.name)
                total = total + (omega * (theta - term.anchor[name]).square()).sum()
        return self.strength * total

    def add_penalty_grad(self, module: ContinualModule, grads: dict[str, Tensor]) -> None:
        """``grads[k] += 2 · strength · Σ_terms Ω_k (θ_k − θ*_k)``, one fused update per
        parameter, whatever the number of terms (see :meth:`merged_terms`)."""
        params = module.trainable_parameters()
        scale = 2 * self.strength
        with torch.no_grad():
            for term in self.merged_terms(module.device):
                for name, omega in term.importance.items():
                    theta = _param(params, name, self.name)
                    if name not in grads:
                        grads[name] = torch.zeros_like(theta)
                    grads[name].addcmul_(omega, theta - term.anchor[name], value=scale)

    def merged_terms(self, device: torch.device) -> list[Term]:
        """:attr:`terms` as one term with the same gradient, so a step costs the same after
        ten experiences as after one (separate-mode EWC keeps a term per experience).

        With every Ω ≥ 0, ``Σ_t Ω_t (θ − θ*_t) = Ω̄ (θ − θ̄)`` for ``Ω̄ = Σ_t Ω_t`` and the
        Ω-weighted mean anchor ``θ̄ = Σ_t Ω_t θ*_t / Ω̄`` (any value where ``Ω̄ = 0``). Written
        around θ̄, the gradient subtracts nearby numbers as the per-term form does, not two
        large sums (``Ω̄ θ − Σ_t Ω_t θ*_t`` would cancel in float32), and a mean with
        non-negative weights is itself well conditioned. The penalty's *value* differs by a
        constant, so :meth:`penalty` keeps the terms. Computed (and the terms moved to
        ``device``) once per change of :attr:`terms`; with a single term, or a negative Ω (no
        centre exists), the terms are used as they are.
        """
        if self._merged is not None:  # checked first: this runs on every optimizer step
            made_from, on, merged = self._merged
            same = len(made_from) == len(self.terms) and all(
                a is b for a, b in zip(made_from, self.terms)
            )
            if same and on == device:
                return merged
        terms = self.terms_on(device)
        if len(terms) < 2 or any(
            (omega < 0).any() for t in terms for omega in t.importance.values()
        ):
            merged = terms
        else:
            total = self.importance()
            merged = [Term(total, _centre(terms, total))]
        self._merged = (list(terms), device, merged)
        return merged

    def importance(self) -> dict[str, Tensor]:
        summed: dict[str, Tensor] = {}
        for term in self.terms:
            for name, omega in term.importance.items():
                summed[name] = summed[name] + omega if name in summed else omega
        return summed

    def fold(
        self,
        module: ContinualModule,
        new: dict[str, Tensor],
        combine: Callable[[Tensor, Tensor], Tensor] | None,
    ) -> None:
        """Keep the experience's importance ``new`` with θ* = the current parameters: as a single
        term Ω = ``combine(Ω_old, new)`` per name, or (``combine`` None) as a term of its own
        next to the earlier ones. A NaN or inf in Ω stops the run here: its penalty gradient
        would otherwise poison every later step while the loss still looks finite."""
        if combine is None:
            omega, kept = new, self.terms
        else:
            old = self.terms_on(module.device)[0].importance if self.terms else {}
            omega = {n: combine(old[n], value) if n in old else value for n, value in new.items()}
            kept = []
        finite = (
            torch.stack([torch.isfinite(v).all() for v in omega.values()]).tolist() if omega else []
        )
        if not all(finite):
            raise DivergenceError(
                f"{self.name} importance became NaN or infinite in experience "
                f"{module.experience + 1}/{module.n_experiences} "
                f"({', '.join(n for n, ok in zip(omega, finite) if not ok)})",
                "lower optimizer.lr or the strategy's strength; results so far are kept",
            )
        self.terms = [*kept, Term(omega, snapshot(module.model))]

    def terms_on(self, device: torch.device) -> list[Term]:
        """:attr:`terms`, moved to ``device`` once (restored state arrives on the CPU)."""
        for term in self.terms:
            for table in (term.importance, term.anchor):
                for name, value in table.items():
                    if value.device != device:
                        table[name] = value.to(device)
        return self.terms

    def state_dict(self) -> dict[str, Any]:
        terms = [{"importance": cpu(t.importance), "anchor": cpu(t.anchor)} for t in self.terms]
        return {"terms": terms, **{name: cpu(getattr(self, name)) for name in self.tables}}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Tensors stay on the CPU until first used (:meth:`terms_on`, the hooks)."""
        self.terms = [Term(dict(t["importance"]), dict(t["anchor"])) for t in state_dict["terms"]]
        for name in self.tables:
            setattr(self, name, dict(state_dict[name]))


def check(valid: bool, key: str, value: Any, rule: str, example: Any) -> None:
    """One :class:`ConfigError` for a bad constructor value, naming the key and an example."""
    require(valid, f"strategy.{key}={value} {rule}", f"e.g. strategy.{key}={example}")


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    """A detached copy of every trainable parameter (an anchor θ*)."""
    return {n: p.detach().clone() for n, p in named_parameters(model).items()}


def _centre(terms: list[Term], total: dict[str, Tensor]) -> dict[str, Tensor]:
    """``Σ_t Ω_t θ*_t / Σ_t Ω_t`` per name, given ``total = Σ_t Ω_t``; 0 where the total is 0."""
    moment: dict[str, Tensor] = {}
    for term in terms:
        for name, omega in term.importance.items():
            weighted = omega * term.anchor[name]
            moment[name] = moment[name] + weighted if name in moment else weighted
    return {n: torch.where(total[n] > 0, moment[n] / total[n], 0.0) for n in total}


def cpu(table: dict[str, Tensor]) -> dict[str, Tensor]:
    return {n: t.detach().cpu() for n, t in table.items()}


def _param(params: dict[str, Tensor], name: str, plugin: str) -> Tensor:
    if name not in params:
        raise RuntimeError(
            f"{plugin}: parameter '{name}' was consolidated but is no longer in the model; "
            "change the model only before the first experience"
        )
    return params[name]


def head_width(model: ContinualModel, task: int) -> int:
    """Number of classes of ``task``'s own head."""
    return model.head.heads[task].out_features


def task_logits(model: ContinualModel, x: Tensor, task: int) -> Tensor:
    """Logits of ``task``'s head only: ``MultiHead`` pads smaller heads with ``-inf``."""
    return model(x, task)[:, : head_width(model, task)]


@contextmanager
def switched(model: nn.Module, training: bool) -> Iterator[None]:
    """``model`` in train or eval mode for a while, then every submodule back as it was."""
    modes = [(m, m.training) for m in model.modules()]
    model.train(training)
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def data_mean(
    module: ContinualModule,
    stats: Stats,
    max_samples: int | None = None,
    batch_size: int = PASS_BATCH_SIZE,
    per: Literal["sample", "batch"] = "sample",
    label: str | None = None,
) -> dict[str, Tensor]:
    """Mean of ``stats`` over the experience's training data, all ranks together.

    ``stats`` returns sums over its batch; they are added over this rank's batches, summed
    across ranks in one all-reduce and divided by the global number of samples (``per=
    "sample"``) or of batches (``"batch"``). Runs in eval mode (no dropout noise; batch norm
    neither uses nor updates batch statistics, so samples stay independent). A batch that
    mixes tasks is split by task, so ``stats`` always sees a single head. A ``label`` shows the
    pass as a bar while the run shows progress.
    """
    params = named_parameters(module.model)
    totals = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    count = 0
    with switched(module.model, training=False), torch.enable_grad():
        for x, y, t in module.batches(max_samples, batch_size, label):
            for xs, ys, task in _single_task(x, y, t, module.task_id):
                for name, value in stats(xs, ys, task).items():
                    totals[name] += value
                count += len(xs) if per == "sample" else 1
    counted = torch.tensor([float(count)], device=module.device)
    flat = torch.cat([*(v.flatten() for v in totals.values()), counted])
    flat = module.all_reduce_sum(flat)
    scale = 1.0 / flat[-1].clamp(min=1.0)
    sizes = [v.numel() for v in totals.values()]
    return {
        n: chunk.view_as(v) * scale for (n, v), chunk in zip(totals.items(), flat[:-1].split(sizes))
    }


def _single_task(x: Tensor, y: Tensor, t: Tensor, task_id: int | None):
    if task_id is not None:
        yield x, y, task_id
        return
    for task in t.unique().tolist():
        rows = t == task
        yield x[rows], y[rows], int(task)
