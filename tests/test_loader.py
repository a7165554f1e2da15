"""TensorLoader: every sample once per epoch, reproducible shuffles, sharding under DDP."""

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
