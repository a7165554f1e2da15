"""Split CIFAR-10, Split CIFAR-100 and CIFAR-10 followed by CIFAR-100 (the SI paper's "CIFAR-110").

torchvision's CIFAR classes check archive checksums and would try to download anything else,
so the archives are read here (:func:`load_cifar`) and handed to Avalanche's ``nc_benchmark``,
the generator its ``SplitCIFAR*`` benchmarks wrap, with the same normalization as their
evaluation transform. Materialized tensors are never augmented.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor

from afmbench.errors import ConfigError
from afmbench.scenarios.base import Scenario
from afmbench.scenarios.cache import cached_scenario
from afmbench.scenarios.common import (
    ClassOrder,
    LabelledTensors,
    check_divides,
    check_protocol,
    fixed_order,
    scenario_params,
    split_flags,
)
from afmbench.scenarios.sources import cache_root, data_root, load_cifar

NORMALIZATION = {
    "CIFAR10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "CIFAR100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
N_CLASSES = {"CIFAR10": 10, "CIFAR100": 100}


def split_cifar10(
    n_experiences: int = 5,
    protocol: str = "task",
    seed: int = 0,
    class_order: ClassOrder = "natural",
    root: str | None = None,
    cache: str | None = None,
) -> Scenario:
    """CIFAR-10's classes in ``n_experiences`` groups (5 x 2 by default)."""
    return _split(
        "CIFAR10", "split_cifar10", n_experiences, protocol, seed, class_order, root, cache
    )


def split_cifar100(
    n_experiences: int = 10,
    protocol: str = "task",
    seed: int = 0,
    class_order: ClassOrder = "natural",
    root: str | None = None,
    cache: str | None = None,
) -> Scenario:
    """CIFAR-100's classes in ``n_experiences`` groups (10 x 10 by default; 20 x 5 also common)."""
    return _split(
        "CIFAR100", "split_cifar100", n_experiences, protocol, seed, class_order, root, cache
    )


def split_cifar110(
    n_experiences: int = 11,
    protocol: str = "task",
    seed: int = 0,
    cifar100_classes: int = 100,
    root: str | None = None,
    cache: str | None = None,
) -> Scenario:
    """All of CIFAR-10 as experience 0, then the first ``cifar100_classes`` CIFAR-100 classes in
    ``n_experiences - 1`` groups of consecutive classes.

    The SI paper's setting is ``n_experiences=6 cifar100_classes=50`` (five tasks of ten).
    """
    check_protocol(protocol, ("task", "domain", "class"), "split_cifar110")
    if not 1 <= cifar100_classes <= 100:
        raise ConfigError(
            f"scenario.cifar100_classes={cifar100_classes} is outside 1..100", "e.g. 50 or 100"
        )
    if n_experiences < 2:
        raise ConfigError(
            f"scenario.n_experiences={n_experiences} leaves no CIFAR-100 experience",
            "use at least 2 (CIFAR-10, then CIFAR-100 splits)",
        )
    check_divides(n_experiences, cifar100_classes, "the CIFAR-100 part", before=1)
    if protocol == "domain" and cifar100_classes // (n_experiences - 1) != 10:
        raise ConfigError(
            "the domain protocol needs 10 classes in every experience of split_cifar110",
            "set scenario.n_experiences so that cifar100_classes / (n_experiences - 1) = 10",
        )
    params = scenario_params(
        n_experiences=n_experiences, protocol=protocol, cifar100_classes=cifar100_classes
    )
    build = partial(_cifar110_benchmark, n_experiences, protocol, cifar100_classes, data_root(root))
    return cached_scenario(
        "split_cifar110", protocol, params, build, cache_root(cache), data_root(root)
    )


def normalized(images: Tensor, name: str) -> Tensor:
    """torchvision's ToTensor then Normalize, done on the whole uint8 (N, H, W, C) tensor at once."""
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in NORMALIZATION[name])
    x = images.permute(0, 3, 1, 2).contiguous().to(torch.float32).div(255)
    return x.sub_(mean).div_(std)


def _split(dataset, name, n_experiences, protocol, seed, class_order, root, cache) -> Scenario:
    check_protocol(protocol, ("task", "domain", "class"), name)
    check_divides(n_experiences, N_CLASSES[dataset], dataset)
    order = fixed_order(class_order, N_CLASSES[dataset])
    params = scenario_params(
        n_experiences=n_experiences, protocol=protocol, seed=seed, class_order=class_order
    )
    build = partial(
        _split_benchmark, dataset, n_experiences, protocol, seed, order, data_root(root)
    )
    return cached_scenario(
        name, protocol, params, build, cache_root(cache), data_root(root), seeded=order is None
    )


def _split_benchmark(dataset, n_experiences, protocol, seed, order, root):
    from avalanche.benchmarks import nc_benchmark

    (x_tr, y_tr), (x_te, y_te) = load_cifar(dataset, root)
    return nc_benchmark(
        LabelledTensors(normalized(x_tr, dataset), y_tr),
        LabelledTensors(normalized(x_te, dataset), y_te),
        n_experiences,
        seed=seed,
        fixed_class_order=order,
        **split_flags(protocol),
    )


def _cifar110_benchmark(n_experiences, protocol, cifar100_classes, root):
    from avalanche.benchmarks import nc_benchmark

    splits = []
    for (x10, y10), (x100, y100) in zip(load_cifar("CIFAR10", root), load_cifar("CIFAR100", root)):
        keep = y100 < cifar100_classes
        # Avalanche's SplitCIFAR110 normalizes both parts with the CIFAR-100 statistics.
        x = torch.cat([normalized(x10, "CIFAR100"), normalized(x100[keep], "CIFAR100")])
        splits.append(LabelledTensors(x, torch.cat([y10, y100[keep] + 10])))
    return nc_benchmark(
        splits[0],
        splits[1],
        n_experiences,
        shuffle=False,
        fixed_class_order=list(range(10 + cifar100_classes)),
        per_exp_classes={0: 10},
        **split_flags(protocol),
    )
