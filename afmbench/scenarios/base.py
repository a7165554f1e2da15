"""The scenario every strategy trains on: a fixed sequence of experiences held as tensors.

A :class:`Scenario` knows its protocol (task-, domain- or class-incremental), the output heads
a model needs, and where each experience's ``(x, y, t)`` tensors come from. Tensors are loaded
on demand from a :class:`TensorStore` so that only the experience being trained and the test
sets sit in memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from afmbench.errors import ConfigError

PROTOCOLS = ("task", "domain", "class")

Split = tuple[Tensor, Tensor, Tensor]
"""Inputs ``x``, targets ``y`` (indices into the head's outputs) and task labels ``t``."""


class TensorStore(Protocol):
    """Where a scenario's tensors live (memory or the on-disk cache)."""

    def load(self, split: str, index: int) -> Split: ...


@dataclass
class MemoryStore:
    """Tensors kept in memory, keyed by ``(split, experience)``; for scenarios built in Python."""

    tensors: dict[tuple[str, int], Split] = field(default_factory=dict)

    def load(self, split: str, index: int) -> Split:
        return self.tensors[(split, index)]


@dataclass
class HeldOut:
    """A store whose training splits give up a ``fraction`` of each class to a validation split.

    The held-out samples are chosen per class (stratified) by a generator seeded from ``seed``
    and the experience, so every run of a seed holds out the same ones and trains on none of
    them; test splits pass through unchanged."""

    inner: TensorStore
    fraction: float
    seed: int
    _chosen: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict, repr=False)

    def load(self, split: str, index: int) -> Split:
        if split == "test":
            return self.inner.load("test", index)
        x, y, t = self.inner.load("train", index)
        if index not in self._chosen:
            self._chosen[index] = stratified_holdout(y, self.fraction, self.seed, index)
        keep, held = self._chosen[index]
        rows = keep if split == "train" else held
        return x[rows], y[rows], t[rows]


def stratified_holdout(
    y: Tensor, fraction: float, seed: int, experience: int
) -> tuple[Tensor, Tensor]:
    """Indices ``(kept, held out)`` of ``y``: round(``fraction`` x count) of every class held
    out, drawn at random from ``(seed, experience)``; both sorted, so training order is the
    data's own."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + experience)
    held = []
    for label in torch.unique(y).tolist():
        members = torch.nonzero(y == label).flatten()
        order = members[torch.randperm(len(members), generator=generator)]
        held.append(order[: round(fraction * len(members))])
    mask = torch.zeros(len(y), dtype=torch.bool)
    if held:
        mask[torch.cat(held)] = True
    return torch.nonzero(~mask).flatten(), torch.nonzero(mask).flatten()


def check_validation(fraction: object) -> float:
    """``scenario.validation`` as a float in [0, 1), or a one-line error."""
    if (
        isinstance(fraction, bool)
        or not isinstance(fraction, (int, float))
        or not 0 <= fraction < 1
    ):
        raise ConfigError(
            f"scenario.validation must be a fraction in [0, 1), got {fraction!r}",
            "e.g. scenario.validation=0.1 (0 holds out nothing)",
        )
    return float(fraction)


@dataclass(frozen=True)
class Scenario:
    """A sequence of experiences and the protocol they are learned under.

    ``head_sizes`` has one entry per task label when the protocol is task-incremental (one
    output head per task) and a single entry otherwise. ``classes`` lists the original class
    ids of each experience and ``task_ids`` the task label a model is given for it (always 0
    unless task-incremental).
    """

    name: str
    protocol: str
    input_shape: tuple[int, ...]
    head_sizes: tuple[int, ...]
    classes: tuple[tuple[int, ...], ...]
    task_ids: tuple[int, ...]
    store: TensorStore = field(repr=False, compare=False)
    params: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ConfigError(
                f"unknown protocol '{self.protocol}'", f"use one of {', '.join(PROTOCOLS)}"
            )
        if len(self.classes) != len(self.task_ids):
            raise ValueError("classes and task_ids must have one entry per experience")

    @property
    def n_experiences(self) -> int:
        return len(self.classes)

    @property
    def multi_head(self) -> bool:
        return self.protocol == "task"

    def train(self, index: int) -> Split:
        """Training tensors of experience ``index``."""
        return self.store.load("train", index)

    def test(self, index: int) -> Split:
        """Test tensors of experience ``index``."""
        return self.store.load("test", index)

    @property
    def validation_fraction(self) -> float:
        """The share of each experience's training data held out for validation (0: none)."""
        return float(self.params.get("validation", 0.0))

    def validation(self, index: int) -> Split:
        """Held-out validation tensors of experience ``index`` (see :meth:`with_validation`)."""
        if not self.validation_fraction:
            raise ValueError(f"scenario {self.name} holds out no validation data")
        return self.store.load("val", index)

    def with_validation(self, fraction: float, seed: int | None = None) -> Scenario:
        """This scenario with ``fraction`` of every class of every experience's training data
        held out as its validation split, never trained on; ``seed`` (default: the scenario's)
        fixes which samples."""
        fraction = check_validation(fraction)
        if not fraction:
            return self
        if self.validation_fraction:
            raise ValueError(f"scenario {self.name} already holds out validation data")
        seed = int(self.params.get("seed", 0) if seed is None else seed)
        return replace(self, store=HeldOut(self.store, fraction, seed),
                       params={**self.params, "validation": fraction})  # fmt: skip

    def joint_train(self, up_to: int | None = None) -> Split:
        """The training data of the first ``up_to`` experiences (all by default) in one split:
        the ``joint`` upper bound, or one step of ``cumulative`` training."""
        parts = [self.train(e) for e in range(self.n_experiences if up_to is None else up_to)]
        x, y, t = (torch.cat(column) for column in zip(*parts))
        return x, y, t

    @classmethod
    def from_tensors(
        cls,
        name: str,
        protocol: str,
        train: list[Split],
        test: list[Split],
        head_sizes: tuple[int, ...],
        classes: tuple[tuple[int, ...], ...] | None = None,
    ) -> Scenario:
        """Build a scenario from in-memory tensors (the Python API's way to bring your own data).

        Each split is ``(x, y, t)``: float32 inputs, integer class indices into the task's
        head and integer task labels, all of one length. They are checked here, where a wrong
        dtype or label can be named, rather than deep inside the first training step.
        """
        if not train or len(train) != len(test):
            raise ValueError("train and test need one split per experience (and at least one)")
        by_task = protocol == "task"
        if not by_task and len(head_sizes) != 1:
            raise ValueError(
                f"the {protocol} protocol trains one shared head: pass one head size, "
                f"not {tuple(head_sizes)} (one head per task is the task protocol)"
            )
        for kind, splits in (("train", train), ("test", test)):
            for e, split in enumerate(splits):
                shape = tuple(train[0][0].shape[1:])
                _check_split(f"{kind} split {e}", split, shape, head_sizes, by_task)
        for e, (_, _, t) in enumerate(train if by_task else []):
            if len(t) and int(t.min()) != int(t.max()):
                raise ValueError(
                    f"train split {e} holds task labels {t.unique().tolist()}: under the task "
                    "protocol an experience is one task (its head is trained)"
                )
        tensors = {("train", e): s for e, s in enumerate(train)}
        tensors.update({("test", e): s for e, s in enumerate(test)})
        task_ids = tuple(int(s[2][0]) for s in train)
        if classes is None:
            classes = tuple(tuple(sorted(set(s[1].tolist()))) for s in train)
        return cls(
            name=name,
            protocol=protocol,
            input_shape=tuple(train[0][0].shape[1:]),
            head_sizes=tuple(head_sizes),
            classes=tuple(tuple(c) for c in classes),
            task_ids=task_ids,
            store=MemoryStore(tensors),
        )

    @classmethod
    def from_avalanche(
        cls,
        benchmark: Any,
        protocol: str,
        name: str,
        cache: str | Path | None = None,
        params: dict[str, Any] | None = None,
    ) -> Scenario:
        """Any Avalanche benchmark (``nc_benchmark``/``ni_benchmark`` on your data, a classic
        one) as a scenario: iterated once into the tensor cache (``cache``, else
        ``$AFMBENCH_CACHE_DIR``), checked, and its targets made the protocol's head indices.
        ``name`` and ``params`` identify it (with a fingerprint of its streams' sizes, classes,
        task labels, targets and first and last inputs). See
        :func:`afmbench.scenarios.avalanche.from_avalanche` for the relabelling rules."""
        from afmbench.scenarios.avalanche import from_avalanche

        return from_avalanche(benchmark, protocol, name, cache=cache, params=params)


def _check_split(
    where: str, split: Split, input_shape: tuple[int, ...], heads: tuple[int, ...], by_task: bool
) -> None:
    """One clear error for a split the models and losses would reject later, or misread."""
    if len(split) != 3:
        raise ValueError(f"{where} must be (inputs, labels, task labels), got {len(split)} tensors")
    x, y, t = split
    if x.dtype != torch.float32:
        hint = "x.float()" if x.is_floating_point() else "x.float() / 255 for 8-bit images"
        raise TypeError(f"{where}: inputs are {x.dtype}; pass float32 ({hint})")
    for name, labels in (("labels", y), ("task labels", t)):
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise TypeError(f"{where}: {name} are {labels.dtype}; pass integers (e.g. .long())")
    if not len(x) == len(y) == len(t):
        raise ValueError(f"{where}: {len(x)} inputs, {len(y)} labels and {len(t)} task labels")
    if tuple(x.shape[1:]) != input_shape:
        raise ValueError(f"{where}: inputs of shape {tuple(x.shape[1:])}, not {input_shape}")
    # the task protocol picks each sample's head by its task label; otherwise one head serves
    if by_task and len(t) and not 0 <= int(t.min()) <= int(t.max()) < len(heads):
        raise ValueError(f"{where}: task labels must lie in [0, {len(heads)}) (one per head)")
    width = torch.tensor(heads)[t.long()] if by_task else heads[0]
    if len(y) and not ((y >= 0) & (y < width)).all():
        raise ValueError(f"{where}: labels must be class indices below their head's size {heads}")
