"""The embedded offline default: scikit-learn's bundled 8x8 digits, split or permuted.

1797 images ship inside scikit-learn, so these scenarios need no data folder and no network
and train in seconds: a new user sees the whole pipeline work at once. They go through the same
Avalanche generator and cache as the real benchmarks.
"""

from __future__ import annotations

from functools import partial

from afmbench.scenarios.base import Scenario
from afmbench.scenarios.cache import cached_scenario
from afmbench.scenarios.common import (
    ClassOrder,
    LabelledTensors,
    check_divides,
    check_positive_experiences,
    check_protocol,
    fixed_order,
    permuted_benchmark,
    scenario_params,
    split_flags,
)
from afmbench.scenarios.sources import cache_root, load_digits_split


def split_digits(
    n_experiences: int = 5,
    protocol: str = "task",
    seed: int = 0,
    class_order: ClassOrder = "natural",
    cache: str | None = None,
) -> Scenario:
    """The ten digits in ``n_experiences`` groups of consecutive classes (0/1, 2/3, ...)."""
    check_protocol(protocol, ("task", "domain", "class"), "split_digits")
    check_divides(n_experiences, 10, "digits")
    order = fixed_order(class_order, 10)
    params = scenario_params(
        n_experiences=n_experiences, protocol=protocol, seed=seed, class_order=class_order
    )
    build = partial(_split_benchmark, n_experiences, protocol, seed, order)
    return cached_scenario(
        "split_digits", protocol, params, build, cache_root(cache), seeded=order is None
    )


def permuted_digits(
    n_experiences: int = 5,
    protocol: str = "domain",
    seed: int = 0,
    cache: str | None = None,
) -> Scenario:
    """The digits under one fixed pixel permutation per experience (10 classes each)."""
    check_protocol(protocol, ("domain", "task"), "permuted_digits")
    check_positive_experiences(n_experiences)
    params = scenario_params(n_experiences=n_experiences, protocol=protocol, seed=seed)
    build = partial(_permuted_benchmark, n_experiences, protocol, seed)
    return cached_scenario("permuted_digits", protocol, params, build, cache_root(cache))


def _tensors():
    (x_tr, y_tr), (x_te, y_te) = load_digits_split()
    scale = lambda x: x.float().div(16).unsqueeze(1)  # noqa: E731  (N, 1, 8, 8) in [0, 1]
    return (scale(x_tr), y_tr), (scale(x_te), y_te)


def _split_benchmark(n_experiences, protocol, seed, order):
    from avalanche.benchmarks import nc_benchmark

    (x_tr, y_tr), (x_te, y_te) = _tensors()
    return nc_benchmark(
        LabelledTensors(x_tr, y_tr),
        LabelledTensors(x_te, y_te),
        n_experiences,
        seed=seed,
        fixed_class_order=order,
        **split_flags(protocol),
    )


def _permuted_benchmark(n_experiences, protocol, seed):
    return permuted_benchmark(*_tensors(), n_experiences, protocol, seed)
