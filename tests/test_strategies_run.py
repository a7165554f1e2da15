"""The strategies inside real runs: Lightning hooks, composition, and accuracy against naive."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from afmbench.api import run
from afmbench.config import OptimizerConfig
from afmbench.models import mlp
from afmbench.plugin import ContinualPlugin
from afmbench.scenarios import Scenario, build_scenario
from afmbench.strategies import EWC, MAS, SI, ANPyC
from tests.test_persample import Gate

SGD = OptimizerConfig(name="sgd", lr=0.05, momentum=0.9)


@pytest.fixture(scope="module")
def permuted() -> Scenario:
    return build_scenario("permuted_digits", n_experiences=3)


def train(scenario: Scenario, plugins: list, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    model = mlp(scenario.input_shape, scenario.head_sizes, hidden=(64, 64))
    options = {"max_epochs": 2, "batch_size": 32, "optimizer": SGD, "verbose": False, **kwargs}
    return run(scenario, model, plugins, seed=seed, **options)


def test_every_strategy_forgets_less_than_naive(permuted: Scenario) -> None:
    naive = train(permuted, []).metrics["acc"]
    for plugin in (EWC(lambda_=100.0), SI(c=5.0), MAS(lambda_=0.03), ANPyC(lambda_=0.05)):
        acc = train(permuted, [plugin]).metrics["acc"]
        assert acc > naive + 0.05, f"{plugin!r}: ACC {acc:.3f} vs naive {naive:.3f}"


class InsertGates(ContinualPlugin):
    """Stands in for the forgetting layer: adds a learnable per-unit gate after every hidden
    activation before training starts; the strategies know nothing of it."""

    def prepare(self, model) -> None:
        if any(isinstance(m, Gate) for m in model.body):
            return
        for index in reversed([i for i, m in enumerate(model.body) if isinstance(m, nn.ReLU)]):
            model.body.insert(index + 1, Gate(model.body[index - 1].out_features))


def test_all_strategies_compose_with_a_layer_another_plugin_inserts(permuted: Scenario) -> None:
    # ANPyC first: it prunes when the experience ends, and the others consolidate after it
    plugins = [ANPyC(lambda_=0.01, prune=True, retrain_steps=2), SI(c=1.0), MAS(lambda_=0.01),
               EWC(lambda_=10.0, fisher="exact", mode="online", gamma=0.9)]  # fmt: skip
    result = train(permuted, [*plugins, InsertGates()], max_epochs=1)
    assert result.accuracy_matrix.shape == (3, 3)
    model = result.module.model
    gates = [f"body.{i}.weight" for i, m in enumerate(model.body) if isinstance(m, Gate)]
    assert gates == ["body.3.weight", "body.6.weight"]
    for plugin in plugins:
        omega = plugin.importance()
        assert set(omega) == {n for n, _ in model.named_parameters()}
        for gate in gates:
            assert torch.isfinite(omega[gate]).all() and omega[gate].abs().sum() > 0, (plugin, gate)
        assert torch.isfinite(plugin.penalty(result.module))
    assert set(plugins[0].pruned) == {n for n, _ in model.body.named_parameters(prefix="body")}


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true", "64-true"])
def test_strategies_and_the_forgetting_layer_train_in_other_precisions(precision: str) -> None:
    """``trainer.precision`` (bf16-mixed is the README's example) on a task-incremental
    scenario: the layer's gates, every strategy's hooks, the per-task heads under autocast, and
    the importance passes' batches in the weights' dtype (``*-true`` converts the weights)."""
    from afmbench.forgetting import ForgettingLayerCallback

    scenario = build_scenario("split_digits", n_experiences=5)
    plugins = [ANPyC(lambda_=0.01, prune=True, retrain_steps=2), SI(c=1.0), MAS(lambda_=0.01),
               EWC(lambda_=10.0), ForgettingLayerCallback()]  # fmt: skip
    result = train(scenario, plugins, max_epochs=1, trainer_kwargs={"precision": precision})
    assert (result.accuracy_matrix.diagonal() > 0.8).all(), result.accuracy_matrix
    for plugin in plugins[:4]:
        assert all(torch.isfinite(omega).all() for omega in plugin.importance().values())


class LossProbe(ContinualPlugin):
    """Records the full-batch task loss (and total loss) when an experience starts and ends,
    and SI's path integral just before SI consolidates (it is listed before SI)."""

    def __init__(self, si: SI) -> None:
        self.si = si
        self.name = f"probe_{si.name}"
        self.records: list[dict[str, float]] = []

    def losses(self, module) -> tuple[float, float]:
        x, y, _ = module.train_split
        with torch.no_grad():
            task = F.cross_entropy(module.model(x, 0), y)
            penalties = [p.penalty(module) for p in module.plugins()]
        return float(task), float(task + sum(p for p in penalties if p is not None))

    def on_train_start(self, trainer, pl_module) -> None:
        self.start = self.losses(pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        end = self.losses(pl_module)
        path = float(sum(w.sum() for w in self.si.path.values()))
        self.records.append(
            {"task": self.start[0] - end[0], "total": self.start[1] - end[1], "path": path}
        )


def two_toy_tasks() -> Scenario:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 64, 1, 3, 3, generator=g)
    y = torch.stack([(x[0].flatten(1).sum(1) > 0).long(), (x[1][:, 0, 0, 0] > 0).long()])
    t = torch.zeros(64, dtype=torch.long)
    splits = [(x[e], y[e], t) for e in range(2)]
    return Scenario.from_tensors("toy", "domain", splits, splits, head_sizes=(2,))


def test_si_path_integral_matches_the_loss_drop_under_gradient_accumulation() -> None:
    scenario = two_toy_tasks()
    task_si, total_si = SI(c=0.5, xi=0.01), SI(c=0.5, xi=0.01, gradient="total")
    total_si.name = "si_total"  # penalties and checkpoint state are keyed by name
    probes = [LossProbe(task_si), LossProbe(total_si)]
    torch.manual_seed(0)
    model = mlp((1, 3, 3), (2,), hidden=(8,))
    # two half batches per optimizer step: every step follows the full-batch gradient
    run(scenario, model, [*probes, task_si, total_si], max_epochs=200, batch_size=32,
        optimizer=OptimizerConfig(lr=0.025, momentum=0.0), trainer_kwargs={"accumulate_grad_batches": 2},
        verbose=False)  # fmt: skip
    (first_task, second_task), (first_total, second_total) = (p.records for p in probes)
    # discrete steps: ω uses the gradient at the start of each step, an O(lr) error
    assert first_task["path"] == pytest.approx(first_task["task"], rel=0.01)
    assert first_total["path"] == pytest.approx(first_task["path"], rel=1e-4)  # no penalty yet
    assert second_task["path"] == pytest.approx(second_task["task"], rel=0.02)
    assert second_total["path"] == pytest.approx(second_total["total"], rel=0.02)
    assert second_task["task"] > second_task["total"] + 0.01  # the penalties did cost something


class BatchPenalty(ContinualPlugin):
    """A penalty without a closed form that depends on the batch, as the forgetting layer's
    do: the squared mean hidden activation of the current batch."""

    name = "batch"

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.x = batch[0]

    def penalty(self, module):
        x = getattr(self, "x", None)  # none before the first batch
        return None if x is None else module.model.body(x).mean(0).square().sum()


class TaskGradientProbe(ContinualPlugin):
    """Listed after SI: at every optimizer step, how far SI's g is from the gradient of the
    task loss over the whole training split (the two accumulated halves of the step)."""

    name = "task_gradient_probe"

    def __init__(self, si: SI) -> None:
        self.si = si
        self.errors: list[float] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        x, y, _ = pl_module.train_split
        params = pl_module.trainable_parameters()
        with torch.enable_grad():
            loss = F.cross_entropy(pl_module.model(x, 0), y)
            grads = torch.autograd.grad(loss, list(params.values()))
        for name, grad in zip(params, grads):
            error = (self.si._grad[name] - grad).abs().max() / grad.abs().max()
            self.errors.append(float(error))


def test_si_takes_a_batch_dependent_penalty_out_of_an_accumulated_step() -> None:
    """Two half batches per step, and a penalty in the graph that differs between them: SI's
    g must be the step's task gradient, so both halves' penalty gradients, each scaled by
    Lightning's 1/2, come out of ``p.grad``. It used to take out the last half's, unscaled."""
    si = SI(c=0.5, xi=0.01)
    probe = TaskGradientProbe(si)
    torch.manual_seed(0)
    model = mlp((1, 3, 3), (2,), hidden=(8,))
    run(two_toy_tasks(), model, [si, probe, BatchPenalty()], max_epochs=3, batch_size=32,
        optimizer=OptimizerConfig(lr=0.2), trainer_kwargs={"accumulate_grad_batches": 2},
        verbose=False)  # fmt: skip
    assert len(probe.errors) == 2 * 3 * 4  # experiences x steps x parameters
    assert max(probe.errors) < 1e-5


class Decay(ContinualPlugin):
    """A penalty without a closed form (weight decay through autograd)."""

    name = "decay"

    def penalty(self, module):
        return 1e-3 * sum(p.square().sum() for p in module.model.parameters())


def autograd_only(plugin: ContinualPlugin) -> ContinualPlugin:
    """The same plugin with its closed-form gradient switched off: the module then keeps its
    penalty in the autograd graph."""
    plugin.closed_form_grad = False
    return plugin


@pytest.mark.parametrize(
    ("protocol", "accumulate", "with_si"),
    [("domain", 1, False), ("task", 2, True)],
    ids=["domain", "task-accumulate2-si"],
)
def test_closed_form_penalty_gradients_train_exactly_like_autograd(
    protocol: str, accumulate: int, with_si: bool
) -> None:
    """Two routes to the same training: penalties added to the gradients after the backward
    pass (the default) and penalties inside the autograd graph. The task protocol's unused
    heads get gradients from the penalties alone; SI needs the gradient of the penalties kept
    in the graph (Decay's) taken out of its ω, a second code path."""
    scenario = build_scenario("split_digits", n_experiences=5, protocol=protocol)

    def plugins() -> list[ContinualPlugin]:
        with_graph = [SI(c=1.0), Decay()] if with_si else []  # SI takes Decay's gradient out
        return [EWC(lambda_=50.0), MAS(lambda_=0.1), *with_graph]

    kwargs = {"max_epochs": 1, "trainer_kwargs": {"accumulate_grad_batches": accumulate}}
    closed = train(scenario, plugins(), **kwargs)
    graph = train(scenario, [autograd_only(p) for p in plugins()], **kwargs)
    for (name, a), (_, b) in zip(
        closed.module.model.named_parameters(), graph.module.model.named_parameters()
    ):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    assert closed.metrics["acc"] == pytest.approx(graph.metrics["acc"], abs=1e-3)


def test_closed_form_gradients_weigh_a_partial_accumulation_window_as_the_loss_does() -> None:
    """Three batches a step over eight-batch epochs: each epoch ends in a two-batch window,
    whose loss Lightning still divides by 3. The closed-form gradients must take the same
    weight as the penalties inside the loss would (they were added at full weight there)."""
    scenario = build_scenario("split_digits", n_experiences=5, protocol="domain")
    assert -(-len(scenario.train(1)[0]) // 32) % 3 == 2

    def plugins() -> list[ContinualPlugin]:
        return [EWC(lambda_=50.0), MAS(lambda_=0.1)]

    kwargs = {
        "max_epochs": 2,
        "trainer_kwargs": {"accumulate_grad_batches": 3, "precision": "64-true"},
    }
    closed = train(scenario, plugins(), **kwargs)
    graph = train(scenario, [autograd_only(p) for p in plugins()], **kwargs)
    for (name, a), (_, b) in zip(
        closed.module.model.named_parameters(), graph.module.model.named_parameters()
    ):
        # Ω and anchors are kept in float32: the two routes agree to that (the unweighted
        # window left them 3 % apart)
        assert (a - b).abs().max() <= 1e-6 * b.abs().max(), name


def test_si_steps_the_fp16_gradient_scaler_skips_add_nothing() -> None:
    """16-bit AMP: a scaler that starts far too high overflows the first steps and skips them
    (θ stays put, the gradients hold inf). SI's ω must stay finite and still equal the loss
    drop; ``inf · 0`` used to turn it to NaN, and with it Ω and every later step."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40)
    si = SI(c=0.5, xi=0.01)
    probe = LossProbe(si)
    torch.manual_seed(0)
    model = mlp((1, 3, 3), (2,), hidden=(8,))
    run(two_toy_tasks(), model, [probe, si], max_epochs=100, batch_size=64,
        optimizer=OptimizerConfig(lr=0.025, momentum=0.0), verbose=False,
        trainer_kwargs={"plugins": [MixedPrecision("16-mixed", "cpu", scaler=scaler)]})  # fmt: skip
    assert scaler.get_scale() < 2.0**30  # more than ten steps were skipped
    assert all(torch.isfinite(omega).all() for omega in si.importance().values())
    first, second = probe.records
    assert first["path"] == pytest.approx(first["task"], rel=0.02)
    assert second["path"] == pytest.approx(second["task"], rel=0.05)
