"""The forgetting layer's maths (eqs. 3-8), model surgery, eq. 2 importance and bad options."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from afmbench.errors import ConfigError
from afmbench.forgetting import (
    ForgettingLayer,
    ForgettingLayerCallback,
    attach,
    inhibition_loss,
    lateral_inhibition_loss,
    parameter_importance,
    sites,
)
from afmbench.models import build_model


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: on a small shared CPU, small tensor ops with several threads spend
    far more time waiting for each other than computing (40x slower under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def lateral_by_definition(h: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Eq. 8 literally: the O(N^2) double sum over i != j, per sample (and position), averaged."""
    h, g = h.movedim(1, -1).reshape(-1, h.shape[1]), g.movedim(1, -1).reshape(-1, g.shape[1])
    pair = (h * (1 - g))[:, :, None] * (h * g)[:, None, :]
    off_diagonal = ~torch.eye(h.shape[1], dtype=torch.bool)
    return pair[:, off_diagonal].sum(1).mean()


@pytest.mark.parametrize("shape", [(7, 13), (3, 5, 4, 6)])
def test_lateral_inhibition_linear_time_equals_double_sum(shape):
    torch.manual_seed(0)
    h, g = torch.rand(shape).double() * 3, torch.rand(shape).double()
    h2, g2 = torch.rand(5, 4).double(), torch.rand(5, 4).double()
    fast = lateral_inhibition_loss([h, h2], [g, g2])
    slow = lateral_by_definition(h, g) + lateral_by_definition(h2, g2)
    assert torch.allclose(fast, slow, rtol=1e-12)


@pytest.mark.parametrize("shape", [(6, 5), (2, 3, 2, 2)])
def test_lateral_inhibition_gradient_equals_autograd_of_the_double_sum(shape):
    """The hand-written backward pass against autograd through eq. 8 written out, and
    against finite differences."""
    torch.manual_seed(1)
    h = (torch.rand(shape).double() * 2).requires_grad_()
    g = torch.rand(shape).double().requires_grad_()
    expected = torch.autograd.grad(lateral_by_definition(h, g), (h, g))
    found = torch.autograd.grad(lateral_inhibition_loss([h], [g]), (h, g))
    for e, f in zip(expected, found):
        torch.testing.assert_close(f, e, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(lambda a, b: lateral_inhibition_loss([a], [b]), (h, g))


def test_inhibition_loss_is_eq_6_by_hand():
    g1 = torch.tensor([[0.2, 0.9, 0.5]])
    g2 = torch.tensor([[0.7, 0.1]])
    numerator = sum((1 - s) * s for s in (0.2, 0.9, 0.5, 0.7, 0.1))
    denominator = sum(1 - s for s in (0.2, 0.9, 0.5, 0.7, 0.1))
    assert inhibition_loss([g1, g2]).item() == pytest.approx(numerator / denominator, rel=1e-6)
    # a batch of identical rows, and positions of a feature map, leave the value unchanged
    assert inhibition_loss([g1.repeat(4, 1), g2.repeat(4, 1)]).item() == pytest.approx(
        numerator / denominator, rel=1e-6
    )
    assert inhibition_loss([g1[..., None, None].expand(2, 3, 2, 2), g2]).item() == pytest.approx(
        numerator / denominator, rel=1e-6
    )


def inhibition_by_definition(gates: list[torch.Tensor]) -> torch.Tensor:
    """Eq. 6 literally: per-unit means over rows (samples, positions), then the ratio."""
    means = [g.movedim(1, -1).reshape(-1, g.shape[1]).mean(0) for g in gates]
    closed = sum((1 - m).sum() for m in means)
    mixed = sum(((1 - g) * g).movedim(1, -1).reshape(-1, g.shape[1]).mean(0).sum() for g in gates)
    return mixed / (closed + 1e-8)


def test_inhibition_gradient_equals_autograd_of_the_definition():
    """The hand-written backward pass of ERS against autograd through eq. 6 written out, on a
    dense and a convolutional layer together, and against finite differences."""
    torch.manual_seed(2)
    gates = [
        torch.rand(6, 5).double().requires_grad_(),
        torch.rand(2, 3, 2, 2).double().requires_grad_(),
    ]
    torch.testing.assert_close(
        inhibition_loss(gates), inhibition_by_definition(gates), rtol=1e-12, atol=0
    )
    expected = torch.autograd.grad(inhibition_by_definition(gates), gates)
    found = torch.autograd.grad(inhibition_loss(gates), gates)
    for e, f in zip(expected, found):
        torch.testing.assert_close(f, e, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(lambda *g: inhibition_loss(list(g)), tuple(gates))
    # only the inputs that ask for a gradient get one
    fixed = gates[1].detach()
    assert torch.autograd.grad(inhibition_loss([gates[0], fixed]), gates[0])[0].shape == (6, 5)


def test_losses_of_16_bit_inputs_are_summed_in_32_bits():
    """bfloat16 activations (16-bit AMP) give the losses of their float32 values, and
    gradients in bfloat16 like the inputs."""
    torch.manual_seed(3)
    h = (torch.rand(64, 300) * 2).bfloat16().requires_grad_()
    g = torch.rand(64, 300).bfloat16().requires_grad_()
    ers, irs = inhibition_loss([g]), lateral_inhibition_loss([h], [g])
    assert ers.dtype == irs.dtype == torch.float32
    h32, g32 = h.detach().float(), g.detach().float()
    assert ers.item() == pytest.approx(inhibition_by_definition([g32]).item(), rel=1e-5)
    assert irs.item() == pytest.approx(lateral_by_definition(h32, g32).item(), rel=1e-5)
    d_h, d_g = torch.autograd.grad(ers + irs, (h, g))
    assert d_h.dtype == d_g.dtype == torch.bfloat16


@pytest.mark.parametrize("shape", [(16, 8), (4, 8, 5, 5)])
def test_gates_lie_in_0_1_and_outputs_within_bounds(shape):
    torch.manual_seed(0)
    layer = ForgettingLayer(8, rho=3.0).double()  # float64: float32 rounds sigmoid(>17) to 1
    h = torch.relu(torch.randn(shape, dtype=torch.float64) * 2)
    assert torch.all(layer(h) == 1.5 * h)  # W_f = 0: every switch exactly half open
    nn.init.normal_(layer.weight, std=1.0)
    g = layer.gates(h)
    assert torch.all((g > 0) & (g < 1))
    out = layer(h)
    assert torch.all((out >= h) & (out <= 2 * h))
    gate_only = ForgettingLayer(8, rho=3.0, mode="gate").double()
    gate_only.weight.data.copy_(layer.weight.data)
    assert torch.all((gate_only(h) >= 0) & (gate_only(h) <= h))


@pytest.mark.parametrize("name, shape", [("mlp", (1, 8, 8)), ("lenet", (1, 28, 28))])
def test_attach_keeps_shapes_names_and_is_idempotent(name, shape):
    torch.manual_seed(0)
    model = build_model(name, shape, (3, 4))
    x = torch.randn(5, *shape)
    before = model(x, 1)
    names = [n for n, _ in model.named_parameters()]
    units = [site.units for site in sites(model)]
    layers = attach(model, rho=2.0)
    assert [layer.units for layer in layers] == units
    assert attach(model) == layers and len(layers) == len(units)
    after = model(x, 1)
    assert after.shape == before.shape
    gate_names = {f"body.{s.name}.1.weight" for s in sites(model)}
    assert [n for n, _ in model.named_parameters() if n not in gate_names] == names


def test_parameter_importance_follows_eq_2():
    model = build_model("lenet", (1, 12, 12), (5,), channels=(2, 3), hidden=(4,))
    attach(model)
    omega = {s.key: torch.rand(s.units) for s in sites(model)}
    theta = parameter_importance(model, omega)
    assert set(theta) == {n for n, _ in model.named_parameters()}
    assert all(theta[n].shape == p.shape for n, p in model.named_parameters())
    conv1, conv2, dense = (omega[s.key] for s in sites(model))
    # first conv: the input counts as Omega = 0, so a weight is as important as its channel
    assert torch.allclose(theta["body.0.weight"][1, 0], conv1[1].expand(5, 5))
    assert torch.allclose(theta["body.3.weight"][2, 1, 0, 0], 1 - (1 - conv2[2]) * (1 - conv1[1]))
    # after flattening 3 channels of 3x3, input feature 13 comes from channel 1
    assert torch.allclose(theta["body.7.weight"][3, 13], 1 - (1 - dense[3]) * (1 - conv2[1]))
    assert torch.allclose(theta["body.7.bias"], dense)
    assert torch.allclose(theta["head.heads.0.weight"][0], dense)  # the head counts as 0
    assert torch.allclose(theta["body.1.1.weight"], conv1)
    assert all(((t >= 0) & (t <= 1)).all() for t in theta.values())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"rho": 0}, "forgetting.rho=0.0 must be positive"),
        ({"lambda_f": -1}, "forgetting.lambda_f=-1.0 must be >= 0"),
        ({"beta": -0.1}, "forgetting.beta=-0.1 must be >= 0"),
        ({"mode": "residual"}, "forgetting.mode must be one of shortcut, gate, got 'residual'"),
        ({"rho": "steep"}, "forgetting.rho must be a number"),
        ({"irs": "yes"}, "forgetting.irs must be true or false"),
    ],
)
def test_bad_options_are_one_config_error(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        ForgettingLayerCallback(**kwargs)


def test_penalty_switches_and_state_roundtrip():
    torch.manual_seed(0)
    model = build_model("mlp", (1, 8, 8), (10,), hidden=(6, 5))
    full, ers_only, none = (
        ForgettingLayerCallback(rho=2.0, lambda_f=0.5, beta=0.1, ers=e, irs=i)
        for e, i in ((True, True), (True, False), (False, False))
    )
    for callback in (full, ers_only, none):
        callback.attach(model)
    nn.init.normal_(full.layers[0].weight)
    model.train()
    model(torch.rand(4, 1, 8, 8), 0)
    gates = [layer.last_gate for layer in full.layers]
    inputs = [layer.last_input for layer in full.layers]
    ers, irs = inhibition_loss(gates), lateral_inhibition_loss(inputs, gates)
    assert full.penalty(None).item() == pytest.approx((0.5 * ers + 0.1 * irs).item())
    assert ers_only.penalty(None).item() == pytest.approx((0.5 * ers).item())
    assert none.penalty(None) is None
    full._forget_batch()
    assert full.penalty(None) is None

    full._omega = {s.key: torch.rand(s.units) for s in sites(model)}
    restored = ForgettingLayerCallback()
    restored.load_state_dict(full.state_dict())
    restored.attach(model)
    assert restored.neuron_importance().keys() == full.neuron_importance().keys()
    assert all(torch.equal(restored.importance()[k], v) for k, v in full.importance().items())


@pytest.mark.parametrize(
    "preset, mode, irs",
    [
        ("on", "shortcut", True),
        ("inhibition_only", "gate", False),
        ("inhibition_shortcut", "shortcut", False),
    ],
)
def test_cli_presets_build_the_callback(preset, mode, irs):
    from afmbench.compose import load_config
    from afmbench.runner import plan

    plugins = plan(load_config([f"forgetting={preset}", "forgetting.rho=2"])).plugins
    (callback,) = [p for p in plugins if isinstance(p, ForgettingLayerCallback)]
    assert (callback.mode, callback.irs, callback.rho) == (mode, irs, 2.0)
    assert not plan(load_config(["forgetting=off"])).plugins


def test_unit_means_of_a_bf16_model_are_summed_without_losing_batches():
    """Under trainer.precision=bf16-true the model, and so each batch's statistics, are
    bf16; the means over a data set must still equal those of the same model in float64 to
    bf16's rounding of single values, not drift as a bf16 running sum drops whole batches."""
    from afmbench.forgetting.importance import unit_means

    torch.manual_seed(0)
    model = build_model("mlp", (8,), (2,), hidden=[16])
    attach(model, rho=4.0)
    with torch.no_grad():
        model.body[2][1].weight.uniform_(-1, 1)  # gates spread over (0, 1)
    x = torch.randn(20_000, 8)
    batches = [(x[i : i + 256], None, torch.zeros(len(x[i : i + 256]), dtype=torch.long))
               for i in range(0, len(x), 256)]  # fmt: skip

    def means(dtype):
        low = [(b.to(dtype), y, t) for b, y, t in batches]
        return unit_means(model.to(dtype), low, "gate")["body.2"].double()

    exact = means(torch.float64)
    assert ((exact > 0.1) & (exact < 0.9)).sum() > 8  # the gates are not saturated
    torch.testing.assert_close(means(torch.bfloat16), exact, atol=0.01, rtol=0)
