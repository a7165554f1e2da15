"""The per-sample gradient engine against a plain loop of one autograd call per sample."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from afmbench.forgetting.layer import attach
from afmbench.models import lenet, mlp
from afmbench.persample import per_sample_grad_sums


class Gate(nn.Module):
    """A per-unit learnable gate, shaped like the forgetting layer's: not a Linear."""

    def __init__(self, units: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(units))

    def forward(self, h: Tensor) -> Tensor:
        return h + h * torch.sigmoid(h * self.weight)


def nll(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Per-sample negative log-likelihood of head 1's three real classes, as a column."""
    return -F.log_softmax(model(x, 1)[:, :3], dim=1).gather(1, y[:, None])


def all_classes(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Several columns per sample: each is differentiated on its own."""
    return F.log_softmax(model(x, 1)[:, :3], dim=1)


def hand_loop(model: nn.Module, terms, x: Tensor, y: Tensor, phi) -> dict[str, Tensor]:
    params = dict(model.named_parameters())
    sums = {n: torch.zeros_like(p) for n, p in params.items()}
    for i in range(len(x)):
        row = terms(model, x[i : i + 1], y[i : i + 1])[0]
        for value in row:
            grads = torch.autograd.grad(
                value, list(params.values()), retain_graph=True, allow_unused=True
            )
            for n, g in zip(params, grads):
                if g is not None:
                    sums[n] += phi(g)
    return sums


def assert_same(a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=1e-5, atol=1e-7, msg=n)


@pytest.fixture
def data() -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(11, 1, 6, 6, generator=g), torch.randint(0, 3, (11,), generator=g)


def small_mlp() -> nn.Module:
    torch.manual_seed(0)
    return mlp((1, 6, 6), (2, 4), hidden=(7, 5)).eval()  # head 1 has 4 outputs; 3 are used


@pytest.mark.parametrize("reduction", ["square", "abs"])
@pytest.mark.parametrize("terms", [nll, all_classes])
def test_linear_fast_path_and_vmap_path_equal_the_hand_loop(data, reduction, terms) -> None:
    model, phi = small_mlp(), {"square": torch.square, "abs": torch.abs}[reduction]
    expected = hand_loop(model, terms, *data, phi)
    assert_same(per_sample_grad_sums(model, terms, data, reduction, method="linear"), expected)
    assert_same(
        per_sample_grad_sums(model, terms, data, reduction, method="vmap", chunk_size=4), expected
    )
    # the unused head (0) gets zeros from both paths, not a missing entry
    assert expected["head.heads.0.weight"].abs().sum() == 0


def test_a_conv_model_takes_the_closed_forms_and_matches_the_hand_loop(data) -> None:
    torch.manual_seed(1)
    model = lenet((1, 6, 6), (2, 3), channels=(2, 3), hidden=(5,)).eval()
    expected = hand_loop(model, nll, *data, torch.square)
    assert_same(per_sample_grad_sums(model, nll, data, method="vmap"), expected)
    assert_same(per_sample_grad_sums(model, nll, data, method="auto", chunk_size=3), expected)
    # convolutions have a closed form too: the fast path alone serves every parameter
    assert_same(per_sample_grad_sums(model, nll, data, method="linear"), expected)


class SameConvs(nn.Module):
    """Same-padded stride-1 convolutions over 16x16 maps (the shifted-window path) and a
    strided one (the unfolded path), then a dense head; ``forward(x, task)`` as the models."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 5, padding=2, bias=False),
            nn.ReLU(), nn.Conv2d(3, 2, 3, stride=2, padding=1), nn.Flatten(), nn.Linear(128, 4),
        )  # fmt: skip

    def forward(self, x: Tensor, task: int) -> Tensor:
        return self.body(x)


@pytest.mark.parametrize("reduction", ["square", "abs"])
@pytest.mark.parametrize("terms", [nll, all_classes])
def test_convolutions_over_large_maps_match_the_hand_loop(reduction, terms) -> None:
    torch.manual_seed(2)
    model, phi = SameConvs().eval(), {"square": torch.square, "abs": torch.abs}[reduction]
    g = torch.Generator().manual_seed(3)
    data = torch.randn(5, 2, 16, 16, generator=g), torch.randint(0, 3, (5,), generator=g)
    expected = hand_loop(model, terms, *data, phi)
    assert_same(per_sample_grad_sums(model, terms, data, reduction, method="linear"), expected)


def test_gate_weights_inside_an_mlp_take_the_general_path(data) -> None:
    model = small_mlp()
    model.body.insert(3, Gate(7))  # after the first hidden activation, as the forgetting layer
    expected = hand_loop(model, nll, *data, torch.square)
    sums = per_sample_grad_sums(model, nll, data)
    assert_same(sums, expected)
    assert expected["body.3.weight"].abs().sum() > 0
    with pytest.raises(ValueError, match="body.3.weight"):  # no closed form for the gate
        per_sample_grad_sums(model, nll, data, method="linear")
    # constants: a penalty built from them must not reach back into this pass's graph
    assert not any(s.requires_grad for s in sums.values())


@pytest.mark.parametrize("mode", ["shortcut", "gate"])
@pytest.mark.parametrize("reduction", ["square", "abs"])
def test_forgetting_layer_switches_get_their_own_fast_path(data, mode, reduction) -> None:
    """The layer's ``per_sample_grads`` against the hand loop, on dense units and on conv
    feature maps (summed over positions); no parameter is left to the vmap path."""
    phi = {"square": torch.square, "abs": torch.abs}[reduction]
    torch.manual_seed(3)
    conv = lenet((1, 6, 6), (2, 3), channels=(2, 3), hidden=(5,))
    for model in (small_mlp(), conv):
        for layer in attach(model, rho=2.0, mode=mode):
            nn.init.normal_(layer.weight)  # away from zero, where every switch reads 0.5
        model.eval()
        expected = hand_loop(model, all_classes, *data, phi)
        sums = per_sample_grad_sums(model, all_classes, data, reduction)
        assert_same(sums, expected)
        assert not any(s.requires_grad for s in sums.values())  # no graph kept alive
    switches = [n for n in expected if n.endswith(".1.weight")]
    assert switches and all(expected[n].abs().sum() > 0 for n in switches)
    model = small_mlp()
    attach(model)
    per_sample_grad_sums(model, nll, data, method="linear")  # raises if anything needs vmap


def test_a_linear_called_twice_is_not_given_the_fast_path(data) -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.flat = nn.Flatten()
            self.shared = nn.Linear(36, 36)
            self.out = nn.Linear(36, 3)

        def forward(self, x: Tensor, task: int) -> Tensor:
            return self.out(torch.tanh(self.shared(torch.tanh(self.shared(self.flat(x))))))

    torch.manual_seed(2)
    model = Twice()
    expected = hand_loop(model, nll, *data, torch.square)
    assert_same(per_sample_grad_sums(model, nll, data), expected)
