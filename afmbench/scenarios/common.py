"""Shared pieces of the scenario builders: protocol flags, class orders, parameter checks."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from afmbench.errors import ConfigError
from afmbench.scenarios.base import PROTOCOLS

ClassOrder = str | list[int]
"""``"natural"`` (0, 1, 2, ...), ``"shuffled"`` (drawn from the seed) or an explicit list."""


def check_protocol(protocol: str, allowed: Sequence[str], scenario: str) -> None:
    """Reject a protocol the scenario cannot express (e.g. class-incremental Permuted MNIST)."""
    if protocol not in PROTOCOLS:
        raise ConfigError(
            f"unknown protocol '{protocol}'",
            f"set scenario.protocol to one of {', '.join(allowed)}",
        )
    if protocol not in allowed:
        raise ConfigError(
            f"protocol '{protocol}' is not available for {scenario}",
            f"set scenario.protocol to one of {', '.join(allowed)}",
        )


def split_flags(protocol: str) -> dict[str, bool]:
    """Avalanche ``nc_benchmark`` flags that give the targets each protocol trains on.

    task: a task label per experience, class ids from zero within each experience (one head per
    task); domain: no task label, ids from zero within each experience (one shared head);
    class: no task label, ids in order of first appearance (one head over all classes).
    """
    return {
        "task_labels": protocol == "task",
        "class_ids_from_zero_in_each_exp": protocol in ("task", "domain"),
        "class_ids_from_zero_from_first_exp": protocol == "class",
    }


def check_positive_experiences(n_experiences: int) -> None:
    """Permuted scenarios take any positive number of experiences."""
    if not isinstance(n_experiences, int) or n_experiences < 1:
        raise ConfigError(
            f"scenario.n_experiences={n_experiences} must be a whole number of at least 1",
            "e.g. scenario.n_experiences=5",
        )


def check_divides(n_experiences: int, n_classes: int, dataset: str, before: int = 0) -> None:
    """Split scenarios need the same number of classes in every experience; ``before``
    experiences come ahead of the split ones (split_cifar110's CIFAR-10), so the user's
    ``n_experiences`` and the fitting values are named with them included."""
    split = n_experiences - before if isinstance(n_experiences, int) else n_experiences
    if not isinstance(split, int) or split < 1 or n_classes % split:
        divisors = [d + before for d in range(1, n_classes + 1) if n_classes % d == 0]
        raise ConfigError(
            f"scenario.n_experiences={n_experiences} does not split the {n_classes} classes "
            f"of {dataset} evenly",
            f"use one of {', '.join(map(str, divisors))}",
        )


def fixed_order(class_order: ClassOrder, n_classes: int) -> list[int] | None:
    """Translate ``class_order`` into Avalanche's ``fixed_class_order`` (None: shuffle by seed)."""
    if class_order == "natural":
        return list(range(n_classes))
    if class_order == "shuffled":
        return None
    order = [int(c) for c in class_order] if not isinstance(class_order, str) else None
    if order is None or sorted(order) != list(range(n_classes)):
        raise ConfigError(
            f"scenario.class_order={class_order!r} is not a valid class order",
            f"use natural, shuffled, or a permutation of 0..{n_classes - 1}",
        )
    return order


def permutations(n_experiences: int, n_pixels: int, seed: int) -> list[Tensor]:
    """One pixel permutation per experience, drawn as Avalanche's PermutedMNIST draws them."""
    rng = np.random.RandomState(seed)
    return [torch.from_numpy(rng.permutation(n_pixels)).long() for _ in range(n_experiences)]


def permuted_benchmark(
    train: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    n_experiences: int,
    protocol: str,
    seed: int,
):
    """Avalanche's ``nc_benchmark`` over ready image tensors ``(x, y)``, one fixed pixel
    permutation per experience (drawn by :func:`permutations`), as PermutedMNIST builds it."""
    from avalanche.benchmarks import nc_benchmark

    def permuted(x: Tensor, perm: Tensor) -> Tensor:
        return x.reshape(len(x), -1)[:, perm].reshape(x.shape)

    (x_tr, y_tr), (x_te, y_te) = train, test
    perms = permutations(n_experiences, x_tr[0].numel(), seed)
    return nc_benchmark(
        [LabelledTensors(permuted(x_tr, p), y_tr) for p in perms],
        [LabelledTensors(permuted(x_te, p), y_te) for p in perms],
        n_experiences,
        task_labels=protocol == "task",
        shuffle=False,
        one_dataset_per_exp=True,
        class_ids_from_zero_in_each_exp=True,
    )


class LabelledTensors(Dataset):
    """Ready tensors with a ``targets`` attribute, the shape Avalanche's generators expect."""

    def __init__(self, x: Tensor, targets: Tensor) -> None:
        self.x = x
        self.targets = targets.tolist()

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.x[index], self.targets[index]


def scenario_params(**params: Any) -> dict[str, Any]:
    """Parameters that identify a scenario's tensors (the cache key), JSON-friendly."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in params.items()}
