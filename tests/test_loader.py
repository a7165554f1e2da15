"""TensorLoader: every sample once per epoch, reproducible shuffles, sharding under DDP."""

import numpy as np
import pytest
import torch

import afmbench.loader as loader_module
from afmbench.loader import TensorLoader


def _rows(loader):
    return torch.cat([x for x, _ in loader]).tolist()


def test_each_epoch_visits_every_sample_once_in_a_new_order():
    x = torch.arange(103)
    loader = TensorLoader((x, x * 2), batch_size=10, shuffle=True, seed=3)
    first, second = _rows(loader), _rows(loader)
    assert sorted(first) == sorted(second) == list(range(103))
    assert first != second
    assert len(loader) == 11
    for xb, yb in loader:
        assert torch.equal(yb, xb * 2)  # tensors stay aligned


def test_same_seed_same_order():
    x = torch.arange(50)
    assert _rows(TensorLoader((x, x), 7, shuffle=True, seed=1)) == _rows(
        TensorLoader((x, x), 7, shuffle=True, seed=1)
    )


def test_unshuffled_loader_keeps_order():
    x = torch.arange(20)
    assert _rows(TensorLoader((x, x), 6)) == list(range(20))


@pytest.mark.parametrize("pad, expected_total", [(True, 12), (False, 11)])
def test_ranks_share_the_data(monkeypatch, pad, expected_total):
    x = torch.arange(11)
    seen = []
    for rank in range(2):
        monkeypatch.setattr(loader_module, "_rank_and_world", lambda r=rank: (r, 2))
        loader = TensorLoader((x, x), batch_size=4, shuffle=True, seed=0, pad=pad)
        rows = _rows(loader)
        assert len(loader) == -(-len(rows) // 4)
        seen += rows
    assert len(seen) == expected_total
    assert set(seen) == set(range(11))


@pytest.mark.parametrize("n, world", [(1, 3), (2, 5), (7, 4)])
def test_padding_gives_every_rank_its_batches_even_with_fewer_samples_than_ranks(
    monkeypatch, n, world
):
    """Under DDP every rank must run as many batches as ``len`` promises (a rank with none
    would leave the others waiting in their all-reduce). With fewer samples than ranks the
    padding used to be too short and a rank got nothing."""
    x = torch.arange(n)
    per_rank = []
    for rank in range(world):
        monkeypatch.setattr(loader_module, "_rank_and_world", lambda r=rank: (r, world))
        loader = TensorLoader((x, x), batch_size=2, shuffle=True, seed=0, pad=True)
        rows = _rows(loader)
        assert len(loader) == -(-len(rows) // 2) >= 1
        per_rank.append(rows)
    assert {len(rows) for rows in per_rank} == {-(-n // world)}
    assert set().union(*per_rank) == set(range(n))


def _eight_bit_images(n=200):
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (n, 3, 4, 4), generator=g, dtype=torch.uint8)
    mean, std = torch.tensor([0.5, 0.48, 0.44]), torch.tensor([0.27, 0.26, 0.28])
    x = (pixels.float() / 255 - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    assert len(x.unique()) > 256  # normalized per channel: 256 values per channel at most
    return x, torch.randint(0, 3, (n,), generator=g), torch.zeros(n, dtype=torch.long)


def test_a_resident_loader_keeps_eight_bit_inputs_as_codes_and_yields_the_same_batches():
    tensors = _eight_bit_images()
    host = TensorLoader(tensors, 8, shuffle=True, seed=3)
    resident = TensorLoader(tensors, 8, shuffle=True, seed=3).resident("cpu")
    codes, table = resident._codes
    assert codes.dtype == torch.uint8 and codes.shape == tensors[0].shape
    assert table.shape[0] == 3 and table.shape[1] <= 256  # one row of values per channel
    assert resident.tensors[0].numel() == 0  # no float copy kept
    assert len(resident) == len(host)
    for _ in range(2):  # two epochs: the order is reshuffled the same way
        for a, b in zip(host, resident, strict=True):
            assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_inputs_with_more_than_256_values_in_a_channel_stay_as_they_are():
    x = torch.randn(300, 2)  # 300 distinct values in each column
    loader = TensorLoader((x, torch.zeros(300), torch.zeros(300)), 16).resident("cpu")
    assert loader._codes is None
    assert torch.equal(torch.cat([b[0] for b in loader]), x)


def test_a_run_with_resident_data_equals_one_without():
    import afmbench

    def run(resident):
        scenario = afmbench.build_scenario("split_digits", n_experiences=5)
        afmbench.seed_everything(0)
        model = afmbench.build_model("mlp", scenario.input_shape, scenario.head_sizes, hidden=[16])
        return afmbench.run(scenario, model, max_epochs=2, verbose=False, resident=resident)

    host, resident = run(False), run(True)
    assert np.array_equal(host.accuracy_matrix, resident.accuracy_matrix)
    for (name, a), (_, b) in zip(
        host.module.model.state_dict().items(), resident.module.model.state_dict().items()
    ):
        assert torch.equal(a, b), name
