"""ResNet-18: its shape, where the forgetting layer goes, per-sample importance through
convolutions and normalization layers, memory-bounded chunks, and checkpoints."""

from functools import partial

import pytest
import torch
from torch import nn

import afmbench
from afmbench.checkpoint import load_model_weights
from afmbench.errors import ConfigError
from afmbench.forgetting.layer import attach, sites
from afmbench.models import BasicBlock, build_model
from afmbench.persample import bounded_chunk, per_sample_grad_sums, rule_of
from afmbench.scenarios.base import Scenario
from afmbench.strategies import EWC, MAS
from afmbench.strategies.ewc import log_likelihoods
from tests.test_persample import hand_loop


def tiny(norm: str = "batch", heads=(3, 3)) -> nn.Module:
    torch.manual_seed(0)
    return build_model("resnet18", (3, 8, 8), heads, width=4, norm=norm)


def test_the_standard_layout_and_widths():
    model = build_model("resnet18", (3, 32, 32), (100,), width=64)
    blocks = [m for m in model.body if isinstance(m, BasicBlock)]
    assert [b.out_channels for b in blocks] == [64, 64, 128, 128, 256, 256, 512, 512]
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    assert model.body[0].kernel_size == (3, 3) and model.body[0].stride == (1, 1)
    # 11.2 M parameters for CIFAR-100's head: the standard CIFAR ResNet-18
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(11.22e6, rel=0.01)
    slim = build_model("resnet18", (3, 32, 32), (100,))  # width 20
    assert sum(p.numel() for p in slim.parameters()) == pytest.approx(1.1e6, rel=0.03)


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_output_shapes_per_protocol(norm):
    x = torch.randn(5, 3, 32, 32)
    task = build_model("resnet18", (3, 32, 32), (2, 2, 2, 2, 2), width=8, norm=norm)
    assert task(x, 3).shape == (5, 2)
    assert task(x, torch.tensor([0, 4, 2, 2, 1])).shape == (5, 2)
    assert len(task.head.heads) == 5
    shared = build_model("resnet18", (3, 32, 32), (10,), width=8, norm=norm)
    assert shared(x).shape == (5, 10) and len(shared.head.heads) == 1


def test_the_forgetting_layer_goes_after_every_blocks_output_activation_per_channel():
    model = tiny()
    found = sites(model)
    # the stem's activation and the eight blocks'
    assert [s.units for s in found] == [4, 4, 4, 8, 8, 16, 16, 32, 32]
    assert all(isinstance(model.body[int(s.name) - 1], BasicBlock) for s in found[1:])
    layers = attach(model)
    assert [layer.units for layer in layers] == [s.units for s in found]
    model.train()
    model(torch.randn(2, 3, 8, 8), 0)
    gate = layers[3].last_gate
    assert gate.shape == (2, 8, 4, 4)  # per channel, broadcast over positions
    assert model.body.get_submodule(found[3].producer).out_channels == 8


@pytest.mark.parametrize("norm", ["batch", "group"])
def test_per_sample_fisher_of_a_tiny_resnet_equals_a_hand_loop(norm):
    model = tiny(norm).double()  # in double precision the two routes agree to rounding
    model.train()
    model(torch.randn(16, 3, 8, 8, dtype=torch.float64), 0)  # running statistics moved
    model.eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(7, 3, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (7,), generator=g)
    terms = partial(log_likelihoods, fisher="empirical", task=1)
    expected = hand_loop(model, lambda m, x, y: terms(m, x, y), x, y, torch.square)
    for method in ("auto", "vmap"):
        got = per_sample_grad_sums(model, terms, (x, y), "square", method=method, chunk_size=3)
        assert got.keys() == expected.keys()
        for name in got:
            torch.testing.assert_close(got[name], expected[name], rtol=1e-9, atol=1e-12, msg=name)
    # every parameter of the network has a closed form: nothing is left to vmap
    convs_and_norms = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d,
                                                                    nn.GroupNorm))]  # fmt: skip
    assert all(rule_of(m) is not None for m in convs_and_norms)


def test_batch_norm_in_training_mode_is_not_given_the_closed_form():
    """With batch statistics, one sample's output depends on the others: no per-sample rule."""
    norm = nn.BatchNorm2d(4).train()
    assert rule_of(norm) is None
    assert rule_of(norm.eval()) is not None


def test_chunks_follow_the_memory_bound_and_leave_the_sums_unchanged():
    model = tiny().eval()
    x, y = torch.randn(40, 3, 8, 8), torch.randint(0, 3, (40,))
    terms = partial(log_likelihoods, fisher="empirical", task=0)
    sizes = [bounded_chunk(model, terms, (x, y), mb) for mb in (0.05, 0.5, 5.0)]
    assert sizes[0] < sizes[1] < sizes[2] and sizes[0] >= 1
    assert bounded_chunk(model, terms, (x, y), 1e-6) == 1
    one = per_sample_grad_sums(model, terms, (x, y), chunk_size=1)
    bounded = per_sample_grad_sums(model, terms, (x, y), memory_mb=0.5)
    for name in one:
        torch.testing.assert_close(bounded[name], one[name], rtol=1e-5, atol=1e-8, msg=name)


def _images(n_tasks=2, n=24):
    g = torch.Generator().manual_seed(0)
    splits = [
        (torch.randn(n, 3, 8, 8, generator=g) + 3.0 * (torch.arange(n) % 2)[:, None, None, None],
         torch.arange(n) % 2, torch.full((n,), t))
        for t in range(n_tasks)
    ]  # fmt: skip
    return Scenario.from_tensors("images", "task", splits, splits, (2,) * n_tasks)


def test_importance_passes_leave_batch_norm_statistics_alone_and_checkpoints_reload(tmp_path):
    scenario = _images()
    model = build_model("resnet18", scenario.input_shape, scenario.head_sizes, width=4)
    seen = {}

    class Watch(afmbench.ContinualPlugin):
        name = "watch"

        def on_train_end(self, trainer, pl_module):  # before EWC's pass (callback order)
            seen[pl_module.experience] = pl_module.model.body[1].running_mean.clone()

    result = afmbench.run(
        scenario, model, [Watch(), EWC(lambda_=1.0), MAS(lambda_=0.1)], max_epochs=3,
        batch_size=8, run_dir=tmp_path / "run", verbose=False,
    )  # fmt: skip
    assert torch.equal(model.body[1].running_mean, seen[1])  # the passes ran in eval mode
    fresh = build_model("resnet18", scenario.input_shape, scenario.head_sizes, width=4)
    load_model_weights(fresh, tmp_path / "run/checkpoints/experience_1.ckpt")
    x = scenario.test(0)[0]
    model.eval(), fresh.eval()
    assert torch.equal(fresh(x, 0), model(x, 0))
    assert result.accuracy_matrix.shape == (2, 2)
    assert result.accuracy_matrix[0, 0] > 0.9


@pytest.mark.parametrize("shape", [(1, 6, 6), (64,)])
def test_inputs_the_resnet_cannot_take_get_one_line(shape):
    with pytest.raises(ConfigError, match=r"resnet18 takes images .* at least 8x8") as info:
        build_model("resnet18", shape, (10,))
    assert "\n" not in str(info.value)


def test_bad_norm_is_a_config_error():
    with pytest.raises(ConfigError, match="model.norm"):
        build_model("resnet18", (3, 32, 32), (10,), norm="layer")


@pytest.mark.parametrize("size", [4, 9])
@pytest.mark.parametrize("kernel, stride, padding, bias", [(3, 1, 1, False), (3, 2, 1, True),
                                                           (1, 2, 0, False)])  # fmt: skip
def test_conv_per_sample_gradients_equal_autograd_one_sample_at_a_time(size, kernel, stride,
                                                                       padding, bias):  # fmt: skip
    from afmbench.persample import _conv_grads

    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, kernel, stride, padding, bias=bias)
    a = torch.randn(4, 3, size, size)
    delta = torch.randn(4, *conv(a).shape[1:])
    ours = _conv_grads(conv, a, delta)
    for i in range(4):
        out = conv(a[i : i + 1])
        expected = torch.autograd.grad((out * delta[i : i + 1]).sum(), list(conv.parameters()))
        torch.testing.assert_close(ours["weight"][i], expected[0], rtol=1e-4, atol=1e-5)
        if bias:
            torch.testing.assert_close(ours["bias"][i], expected[1], rtol=1e-4, atol=1e-5)


def relative_difference(a: dict, b: dict) -> torch.Tensor:
    """‖a − b‖ / ‖b‖ over all the tables' entries together."""
    difference = sum((a[n] - b[n]).square().sum() for n in b)
    return (difference / sum(v.square().sum() for v in b.values())).sqrt()


def test_bf16_importance_passes_stay_within_a_few_thousandths_of_float32():
    torch.manual_seed(0)
    model = build_model("resnet18", (3, 16, 16), (3, 3), width=8).eval()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(24, 3, 16, 16, generator=g)  # 16x16 maps: the shifted-window path too
    y = torch.randint(0, 3, (24,), generator=g)
    terms = partial(log_likelihoods, fisher="exact", task=1)
    exact = per_sample_grad_sums(model, terms, (x, y), "square", chunk_size=8)
    half = per_sample_grad_sums(model, terms, (x, y), "square", chunk_size=8,
                                precision="bf16-mixed")  # fmt: skip
    assert half.keys() == exact.keys()
    assert all(v.dtype == torch.float32 for v in half.values())
    assert 0 < relative_difference(half, exact) < 1e-2  # bfloat16 was used, and it stays close
    for name, value in exact.items():  # head 0 is unused: zeros both ways
        assert relative_difference({name: half[name]}, {name: value}).nan_to_num() < 0.1, name
    with pytest.raises(ValueError, match="precision='fp16': use one of 32-true, bf16-mixed"):
        per_sample_grad_sums(model, terms, (x, y), precision="fp16")


def test_bf16_passes_reach_the_strategies_and_the_config_hash(tmp_path):
    scenario = Scenario.from_tensors(
        "tiny_images", "task",
        [(torch.randn(24, 3, 8, 8), torch.arange(24) % 3, torch.zeros(24, dtype=torch.long))],
        [(torch.randn(9, 3, 8, 8), torch.arange(9) % 3, torch.zeros(9, dtype=torch.long))],
        head_sizes=(3,),
    )  # fmt: skip
    fishers, hashes = {}, {}
    for precision in ("32-true", "bf16-mixed"):
        ewc = EWC(lambda_=1.0)
        result = afmbench.run(scenario, tiny(heads=(3,)), [ewc], max_epochs=1, batch_size=8,
                              pass_precision=precision, verbose=False)  # fmt: skip
        fishers[precision], hashes[precision] = ewc.importance(), result.metrics["config_hash"]
    assert 0 < relative_difference(fishers["bf16-mixed"], fishers["32-true"]) < 0.05
    assert hashes["32-true"] != hashes["bf16-mixed"]
    with pytest.raises(ConfigError, match="unknown data.pass_precision 'bf16'"):
        afmbench.run(scenario, tiny(heads=(3,)), [EWC()], pass_precision="bf16", verbose=False)
