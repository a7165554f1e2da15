"""Permuted MNIST, Split MNIST and Split Fashion-MNIST, from Avalanche's classic benchmarks.

Pixels are normalized with the data set's mean and standard deviation, as Avalanche's benchmarks
do by default; ``normalize=False`` keeps them in [0, 1] (zero background), as the code of van de
Ven & Tolias and of Buzzega et al. feeds them to its networks.
"""

from __future__ import annotations

from functools import partial

import torch.nn.functional as F
from torch import Tensor

from afmbench.errors import ConfigError
from afmbench.scenarios.base import Scenario
from afmbench.scenarios.cache import cached_scenario
from afmbench.scenarios.common import (
    ClassOrder,
    check_divides,
    check_positive_experiences,
    check_protocol,
    fixed_order,
    permuted_benchmark,
    scenario_params,
    split_flags,
)
from afmbench.scenarios.sources import (
    cache_root,
    data_root,
    prepare_mnist_like,
    read_mnist_like,
)

# Avalanche's MNIST normalization (its default transforms), for padded scenarios built here
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def permuted_mnist(
    n_experiences: int = 10,
    protocol: str = "domain",
    seed: int = 0,
    normalize: bool = True,
    pad: int = 0,
    root: str | None = None,
    cache: str | None = None,
) -> Scenario:
    """MNIST under a different fixed pixel permutation per experience (10 classes each).

    ``domain``: one shared 10-way head, no task label (the usual setting);
    ``task``: one head per permutation, task label given (the AFM paper's setting).
    ``pad``: zero pixels added on every side *before* permuting (2 gives van de Ven & Tolias's
    32x32 images). The permutation then scatters each task's digits over a different subset of
    the input positions, which changes how much the tasks interfere; Avalanche's PermutedMNIST
    cannot pad first, so a padded scenario is built from the archives' tensors with the same
    permutation draws.
    """
    check_protocol(protocol, ("domain", "task"), "permuted_mnist")
    check_positive_experiences(n_experiences)
    if not isinstance(pad, int) or isinstance(pad, bool) or pad < 0:
        raise ConfigError(
            f"scenario.pad={pad!r} must be a whole number of pixels, 0 or more",
            "e.g. scenario.pad=2 (28x28 -> 32x32)",
        )
    params = scenario_params(n_experiences=n_experiences, protocol=protocol, seed=seed)
    params.update(_unless_normalized(normalize))
    params.update({"pad": pad} if pad else {})  # unpadded runs keep their hash and cache
    data, cache_dir = data_root(root), cache_root(cache)
    build = (
        partial(_permuted_padded, n_experiences, protocol, seed, normalize, pad, data)
        if pad
        else partial(_permuted, n_experiences, protocol, seed, normalize, data, cache_dir)
    )
    return cached_scenario("permuted_mnist", protocol, params, build, cache_dir, data)


def split_mnist(
    n_experiences: int = 5,
    protocol: str = "task",
    seed: int = 0,
    class_order: ClassOrder = "natural",
    normalize: bool = True,
    root: str | None = None,
    cache: str | None = None,
) -> Scenario:
    """MNIST's ten digits in ``n_experiences`` groups of consecutive classes (0/1, 2/3, ...)."""
    return _split(
        "MNIST", "split_mnist", n_experiences, protocol, seed, class_order, normalize, root, cache
    )


def split_fashion_mnist(
    n_experiences: int = 5,
    protocol: str = "task",
    seed: int = 0,
    class_order: ClassOrder = "natural",
    normalize: bool = True,
    root: str | None = None,
    cache: str | None = None,
) -> Scenario:
    """Fashion-MNIST's ten classes in ``n_experiences`` groups."""
    return _split(
        "FashionMNIST",
        "split_fashion_mnist",
        n_experiences,
        protocol,
        seed,
        class_order,
        normalize,
        root,
        cache,
    )


def _unless_normalized(normalize: bool) -> dict[str, bool]:
    """``normalize`` as a scenario parameter only where it is off, so the default leaves the
    parameters (hence every earlier run's config hash and cache folder) as they were."""
    return {} if normalize else {"normalize": False}


def _split(
    dataset, name, n_experiences, protocol, seed, class_order, normalize, root, cache
) -> Scenario:
    check_protocol(protocol, ("task", "domain", "class"), name)
    check_divides(n_experiences, 10, dataset)
    order = fixed_order(class_order, 10)
    params = scenario_params(
        n_experiences=n_experiences, protocol=protocol, seed=seed, class_order=class_order
    )
    params.update(_unless_normalized(normalize))
    build = partial(
        _split_benchmark,
        dataset,
        n_experiences,
        protocol,
        seed,
        order,
        normalize,
        data_root(root),
        cache_root(cache),
    )
    return cached_scenario(
        name, protocol, params, build, cache_root(cache), data_root(root), seeded=order is None
    )


def _transforms(normalize: bool) -> dict[str, None]:
    """Avalanche's default transforms (its Normalize), or none: pixels as loaded, in [0, 1]."""
    return {} if normalize else {"train_transform": None, "eval_transform": None}


def _permuted(n_experiences, protocol, seed, normalize, root, cache):
    from avalanche.benchmarks.classic import PermutedMNIST

    return PermutedMNIST(
        n_experiences,
        return_task_id=protocol == "task",
        seed=seed,
        dataset_root=prepare_mnist_like("MNIST", root, cache),
        **_transforms(normalize),
    )


def _permuted_padded(n_experiences, protocol, seed, normalize, pad, root):
    from torchvision.transforms.functional import normalize as normalize_image

    train, test = read_mnist_like("MNIST", root)

    def prepared(split: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        x = F.pad(split[0].unsqueeze(1).float().div(255), (pad,) * 4)  # as ToTensor, then zeros
        return (normalize_image(x, [MNIST_MEAN], [MNIST_STD]) if normalize else x), split[1]

    return permuted_benchmark(prepared(train), prepared(test), n_experiences, protocol, seed)


def _split_benchmark(dataset, n_experiences, protocol, seed, order, normalize, root, cache):
    from avalanche.benchmarks.classic import SplitFMNIST, SplitMNIST

    make = SplitMNIST if dataset == "MNIST" else SplitFMNIST
    flags = split_flags(protocol)
    return make(
        n_experiences,
        return_task_id=flags["task_labels"],
        seed=seed,
        fixed_class_order=order,
        class_ids_from_zero_in_each_exp=flags["class_ids_from_zero_in_each_exp"],
        class_ids_from_zero_from_first_exp=flags["class_ids_from_zero_from_first_exp"],
        dataset_root=prepare_mnist_like(dataset, root, cache),
        **_transforms(normalize),
    )
