"""Scenario.from_avalanche: a user's own Avalanche benchmark, through the tensor cache."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

import afmbench
import afmbench.scenarios.avalanche as avalanche_module
from afmbench.config import OptimizerConfig
from afmbench.errors import ConfigError
from afmbench.scenarios.common import LabelledTensors
from afmbench.strategies import EWC

nc_benchmark = pytest.importorskip("avalanche.benchmarks").nc_benchmark


def _data(n_train=120, n_test=60, classes=6, seed=0):
    g = torch.Generator().manual_seed(seed)

    def split(n):
        y = torch.arange(n) % classes
        x = 0.2 * torch.rand(n, 1, 4, 4, generator=g)
        x.view(n, 16)[torch.arange(n), y] += 1.0  # class c lights pixel c
        return LabelledTensors(x, y)

    return split(n_train), split(n_test)


def _benchmark(data_seed=0, **flags):
    train, test = _data(seed=data_seed)
    return nc_benchmark(train, test, 3, seed=1, **flags)


def _avalanche_yields(stream):
    """Every (x, y, t) of a stream, as Avalanche itself iterates it."""
    out = []
    for experience in stream:
        samples = [experience.dataset[i] for i in range(len(experience.dataset))]
        out.append(tuple(torch.stack([torch.as_tensor(s[k]) for s in samples]) for k in range(3)))
    return out


def test_a_class_incremental_benchmark_yields_what_avalanche_yields(tmp_path):
    benchmark = _benchmark(task_labels=False)
    scenario = afmbench.Scenario.from_avalanche(benchmark, "class", "mine", cache=tmp_path)
    assert scenario.n_experiences == 3 and scenario.head_sizes == (6,)
    assert [list(c) for c in scenario.classes] == [
        sorted(c) for c in benchmark.original_classes_in_exp
    ]
    for e, (x, y, _) in enumerate(_avalanche_yields(benchmark.train_stream)):
        ours = scenario.train(e)
        assert torch.equal(ours[0], x) and torch.equal(ours[1], y)  # targets 0..5: kept
        assert not ours[2].any()
    for e, (x, y, _) in enumerate(_avalanche_yields(benchmark.test_stream)):
        assert torch.equal(scenario.test(e)[0], x) and torch.equal(scenario.test(e)[1], y)


def test_a_task_incremental_benchmark_gets_one_head_per_task(tmp_path):
    benchmark = _benchmark(task_labels=True, class_ids_from_zero_in_each_exp=True)
    scenario = afmbench.Scenario.from_avalanche(benchmark, "task", "mine", cache=tmp_path)
    assert scenario.head_sizes == (2, 2, 2) and scenario.task_ids == (0, 1, 2)
    for e, (x, y, t) in enumerate(_avalanche_yields(benchmark.train_stream)):
        assert all(torch.equal(a, b) for a, b in zip(scenario.train(e), (x, y, t)))
    # the same benchmark with its original class ids: each task's targets become 0..1 per head
    plain = _benchmark(task_labels=True)
    relabelled = afmbench.Scenario.from_avalanche(plain, "task", "mine", cache=tmp_path)
    for e, (_, y, _) in enumerate(_avalanche_yields(plain.train_stream)):
        order = sorted(set(y.tolist()))
        expected = torch.tensor([order.index(c) for c in y.tolist()])
        assert torch.equal(relabelled.train(e)[1], expected)


def test_a_second_call_reads_the_cache(tmp_path, monkeypatch):
    benchmark = _benchmark(task_labels=False)
    first = afmbench.Scenario.from_avalanche(benchmark, "domain", "mine", cache=tmp_path)

    def refuse(*args, **kwargs):
        raise AssertionError("materialized twice")

    monkeypatch.setattr(avalanche_module, "_materialize", refuse)
    again = afmbench.Scenario.from_avalanche(benchmark, "domain", "mine", cache=tmp_path)
    assert again == first
    assert all(torch.equal(a, b) for a, b in zip(first.train(1), again.train(1)))
    with pytest.raises(AssertionError, match="materialized twice"):  # other data: another key
        afmbench.Scenario.from_avalanche(_benchmark(2, task_labels=False), "domain",
                                         "mine", cache=tmp_path)  # fmt: skip


def test_a_benchmark_scenario_trains_as_the_same_tensors_do(tmp_path):
    benchmark = _benchmark(task_labels=True, class_ids_from_zero_in_each_exp=True)
    cached = afmbench.Scenario.from_avalanche(benchmark, "task", "mine", cache=tmp_path)
    by_hand = afmbench.Scenario.from_tensors(
        "mine", "task", _avalanche_yields(benchmark.train_stream),
        _avalanche_yields(benchmark.test_stream), head_sizes=(2, 2, 2),
    )  # fmt: skip

    def run(scenario):
        afmbench.seed_everything(0)
        model = afmbench.build_model("mlp", scenario.input_shape, scenario.head_sizes, hidden=[16])
        return afmbench.run(
            scenario, model, [EWC(lambda_=10.0)], max_epochs=5, batch_size=8,
            optimizer=OptimizerConfig("adam", 0.01), verbose=False,
        ).accuracy_matrix  # fmt: skip

    matrix = run(cached)
    assert np.array_equal(matrix, run(by_hand))
    assert matrix.shape == (3, 3) and np.all(np.diag(matrix) > 0.9)  # each task is learned


def _fake(train, test):
    return SimpleNamespace(train_stream=train, test_stream=test)


@pytest.mark.parametrize(
    "benchmark, protocol, error, match",
    [
        (_benchmark(task_labels=False), "task", ValueError, "share task label 0.*task_labels=True"),
        (_benchmark(task_labels=False), "tasks", ConfigError, "unknown protocol 'tasks'"),
        (object(), "class", TypeError, "must be an Avalanche benchmark"),
        (_fake([], []), "class", ValueError, "train stream is empty"),
    ],
)
def test_bad_benchmarks_get_one_line(tmp_path, benchmark, protocol, error, match):
    with pytest.raises(error, match=match) as info:
        afmbench.Scenario.from_avalanche(benchmark, protocol, "mine", cache=tmp_path)
    assert "\n" not in str(info.value)


def test_streams_of_different_lengths_are_refused(tmp_path):
    benchmark = _benchmark(task_labels=False)
    uneven = _fake(list(benchmark.train_stream), list(benchmark.test_stream)[:2])
    with pytest.raises(ValueError, match="3 training but 2 test experiences"):
        afmbench.Scenario.from_avalanche(uneven, "class", "mine", cache=tmp_path)
