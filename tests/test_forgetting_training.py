"""The forgetting layer in training: polarizing gates, meaningful importance, checkpoints, and
composition with strategies (offline digits, fixed seeds)."""

from __future__ import annotations

import pytest
import torch

from afmbench.api import run
from afmbench.checkpoint import load_model_weights
from afmbench.config import OptimizerConfig
from afmbench.forgetting import ForgettingLayerCallback, sites
from afmbench.forgetting.importance import per_sample
from afmbench.loader import TensorLoader
from afmbench.models import build_model
from afmbench.probes import Subject, ablation_curves
from afmbench.scenarios import build_scenario
from tests.test_forgetting_layer import one_thread  # noqa: F401 (autouse fixture)

OPTIMIZER = OptimizerConfig(lr=0.05, momentum=0.9)


def polarized_share(gates: dict[str, torch.Tensor]) -> float:
    values = torch.cat([g.flatten() for g in gates.values()])
    return float(((values < 0.1) | (values > 0.9)).float().mean())


@pytest.fixture(scope="module")
def trained():
    """Plain 10-way digits, MLP 64-64 with switches in gate mode (where eq. 3 makes a closed
    switch silence its unit, so the task loss keeps the useful ones open)."""
    scenario = build_scenario("split_digits", n_experiences=1, protocol="class")
    torch.manual_seed(0)
    model = build_model("mlp", scenario.input_shape, scenario.head_sizes, hidden=(64, 64))
    callback = ForgettingLayerCallback(rho=8.0, lambda_f=1.0, beta=1e-4, mode="gate")
    callback.attach(model)
    x, _, t = scenario.train(0)
    before = next(per_sample(model, [(x[:256], None, t[:256])], "gate"))
    result = run(
        scenario, model, [callback], max_epochs=5, batch_size=32, optimizer=OPTIMIZER, verbose=False
    )
    return scenario, model, callback, before, result


def test_gates_polarize_with_training(trained):
    _, _, callback, before, result = trained
    assert polarized_share(before) == 0.0  # every switch starts half open
    assert polarized_share(callback.gate_states()) > 0.15
    assert result.accuracy_matrix[0, 0] > 0.85


def test_importance_is_kept_per_layer_and_parameter(trained):
    _, model, callback, _, _ = trained
    omega = callback.neuron_importance()
    assert list(omega) == [s.key for s in sites(model)]
    assert all(((v > 0) & (v < 1)).all() for v in omega.values())
    theta = callback.importance()
    assert {n: t.shape for n, t in theta.items()} == {
        n: p.shape for n, p in model.named_parameters()
    }
    assert callback.experience == 0


def test_removing_important_units_hurts_more(trained):
    scenario, model, callback, _, _ = trained
    subject = Subject(model, scenario.test(0), scenario.train(0))
    curves = ablation_curves(
        subject, callback.neuron_importance(), fractions=(0.0, 0.3, 0.5), repeats=3
    )
    for group in curves["groups"].values():
        assert group["descending"][2] < group["random_mean"][2] < group["ascending"][2] + 0.02
        assert group["ascending"][2] > group["descending"][2] + 0.3


@pytest.mark.parametrize("strategy", ["naive", "ewc", "si", "mas", "anpyc"])
def test_composes_with_strategies_and_checkpoints_reload(tmp_path, strategy):
    from afmbench.strategies import EWC, MAS, SI, ANPyC

    scenario = build_scenario("split_digits", n_experiences=2, protocol="task")
    torch.manual_seed(0)
    model = build_model("mlp", scenario.input_shape, scenario.head_sizes, hidden=(32,))
    plugin = {"naive": None, "ewc": EWC, "si": SI, "mas": MAS, "anpyc": ANPyC}[strategy]
    forgetting = ForgettingLayerCallback(rho=2.0)
    plugins = ([plugin()] if plugin else []) + [forgetting]
    result = run(
        scenario, model, plugins, max_epochs=1, optimizer=OPTIMIZER, run_dir=tmp_path, verbose=False
    )
    assert result.metrics["status"] == "finished" and result.metrics["forgetting_layer"]
    assert result.metrics["strategy"] == strategy
    gate = f"body.{sites(model)[0].name}.1.weight"
    if plugin is not None:  # the strategy consolidates the switch weights like any parameter
        assert gate in plugins[0].importance()
        # state is plain data: a graph kept alive here would grow memory with every task
        assert not any(v.requires_grad for v in plugins[0].importance().values())

    fresh = build_model("mlp", scenario.input_shape, scenario.head_sizes, hidden=(32,))
    ForgettingLayerCallback(rho=2.0).attach(fresh)
    load_model_weights(fresh, tmp_path / "checkpoints" / "experience_1.ckpt")
    x, _, t = scenario.test(1)
    model.eval(), fresh.eval()
    assert torch.equal(fresh(x, t), model(x, t))
    state = torch.load(tmp_path / "checkpoints" / "experience_1.ckpt", weights_only=False)[
        "callbacks"
    ]
    saved = next(v for k, v in state.items() if k.startswith("ForgettingLayerCallback"))
    assert saved["experience"] == 1
    assert all(
        torch.equal(saved["neuron_importance"][k], v.cpu())
        for k, v in forgetting.neuron_importance().items()
    )


def test_neuron_importance_reduces_over_processes(trained):
    """A reduction that doubles every sum (two identical ranks) leaves the means unchanged."""
    scenario, model, callback, _, _ = trained
    from afmbench.forgetting import neuron_importance

    batches = list(TensorLoader(scenario.train(0), 512))
    single, _ = neuron_importance(model, batches)
    doubled, _ = neuron_importance(model, batches, lambda t: 2 * t)
    assert all(torch.allclose(single[k], doubled[k]) for k in single)
    assert all(
        torch.allclose(single[k], v, atol=1e-6) for k, v in callback.neuron_importance().items()
    )
