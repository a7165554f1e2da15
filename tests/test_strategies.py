"""EWC, SI, MAS and ANPyC: importance against hand computations, penalties, state, config.

Plugins are driven through their Lightning hooks on a real ContinualModule without a trainer
(a single process: ``all_reduce_sum`` is the identity), so every expected value below comes
from an independent loop of ``torch.autograd.grad`` calls.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from afmbench.errors import ConfigError
from afmbench.models import ContinualModel, mlp
from afmbench.module import ContinualModule
from afmbench.strategies import EWC, MAS, SI, ANPyC
from afmbench.strategies.base import Term

TASK = 1  # head 1 has 3 classes, head 0 has 4: the pass must ignore MultiHead's -inf padding
N_SAMPLES = 13
SINGLE = SimpleNamespace(world_size=1)  # what ANPyC's retraining asks of the trainer


def make_module(seed: int = 0, n_experiences: int = 3) -> ContinualModule:
    torch.manual_seed(seed)
    model = mlp((1, 4, 4), (4, 3), hidden=(6, 5))
    module = ContinualModule(model, n_tasks=2, n_rows=n_experiences + 1)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N_SAMPLES, 1, 4, 4, generator=g)
    y = torch.randint(0, 3, (N_SAMPLES,), generator=g)
    module.train_split = (x, y, torch.full((N_SAMPLES,), TASK))
    module.task_id, module.experience = TASK, 0
    return module


def params(model: nn.Module) -> dict[str, Tensor]:
    return dict(model.named_parameters())


def per_sample_grads(model: ContinualModel, x: Tensor, fn) -> list[dict[str, Tensor]]:
    """One dict of gradients per sample of the scalar ``fn(logits of that sample)``."""
    out = []
    for i in range(len(x)):
        logits = model(x[i : i + 1], TASK)[0, :3]
        grads = torch.autograd.grad(fn(logits), list(params(model).values()), allow_unused=True)
        out.append(
            {
                n: torch.zeros_like(p) if g is None else g
                for (n, p), g in zip(params(model).items(), grads)
            }
        )
    return out


def mean_of(dicts: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    return {n: sum(d[n] for d in dicts) / len(dicts) for n in dicts[0]}


def assert_close(a: dict[str, Tensor], b: dict[str, Tensor], rtol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=rtol, atol=1e-8, msg=n)


def hand_fisher(module: ContinualModule, kind: str) -> dict[str, Tensor]:
    """Mean over samples of Σ_c w_c (∇ log p_c)²: w = one-hot label, or p itself (exact)."""
    model, (x, y, _) = module.model.eval(), module.train_split
    per_sample = []
    for i in range(len(x)):
        xi = x[i : i + 1]
        if kind == "empirical":
            weights = {int(y[i]): 1.0}
        else:
            p = F.softmax(model(xi, TASK)[0, :3], 0).detach()
            weights = {c: p[c] for c in range(3)}
        total = {n: torch.zeros_like(v) for n, v in params(model).items()}
        for c, w in weights.items():
            (g,) = per_sample_grads(model, xi, lambda z, c=c: F.log_softmax(z, 0)[c])
            for n in total:
                total[n] += w * g[n].square()
        per_sample.append(total)
    return mean_of(per_sample)


# -- EWC ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["empirical", "exact"])
def test_ewc_fisher_equals_the_mean_of_per_sample_squared_gradients(kind: str) -> None:
    module = make_module()
    assert_close(EWC(fisher=kind).estimate(module), hand_fisher(module, kind))


def test_ewc_sampled_fisher_is_an_unbiased_estimate_of_the_exact_one() -> None:
    module = make_module()
    x, y, t = module.train_split
    module.train_split = (x[:2].repeat(2000, 1, 1, 1), y[:2].repeat(2000), t[:2].repeat(2000))
    torch.manual_seed(5)
    sampled = EWC(fisher="sampled").estimate(module)
    exact = EWC(fisher="exact").estimate(module)
    sampled, exact = (torch.cat([v.flatten() for v in d.values()]) for d in (sampled, exact))
    assert (sampled - exact).norm() < 0.05 * exact.norm()


def test_ewc_uses_fisher_samples_and_puts_the_model_back_in_training_mode() -> None:
    module = make_module()
    module.model.train()
    subset = EWC(fisher_samples=5).estimate(module)
    assert module.model.training
    module.train_split = tuple(torch.cat(c) for c in zip(*module.batches(max_samples=5)))
    assert len(module.train_split[0]) == 5
    assert_close(subset, EWC().estimate(module))


def consolidate_twice(plugin, module: ContinualModule) -> list[dict[str, Tensor]]:
    """Two experiences: consolidate, move the parameters and the data, consolidate again."""
    anchors = []
    for step in range(2):
        module.experience = step
        plugin.on_train_start(None, module)
        anchors.append({n: p.detach().clone() for n, p in params(module.model).items()})
        plugin.on_train_end(None, module)
        with torch.no_grad():
            for p in module.model.parameters():
                p.add_(0.1 * torch.randn_like(p))
        x, y, t = module.train_split
        module.train_split = (x.flip(0) * 1.5, y.roll(1), t)
    return anchors


def test_ewc_separate_keeps_one_term_per_task_and_online_folds_them_with_gamma() -> None:
    separate, online = EWC(lambda_=3.0), EWC(lambda_=3.0, mode="online", gamma=0.5)
    anchors = consolidate_twice(separate, make_module())
    consolidate_twice(online, make_module())
    (f1, a1), (f2, a2) = [(t.importance, t.anchor) for t in separate.terms]
    assert_close(a1, anchors[0])
    assert_close(a2, anchors[1])
    assert len(online.terms) == 1
    assert_close(online.terms[0].importance, {n: 0.5 * f1[n] + f2[n] for n in f1})
    assert_close(online.terms[0].anchor, anchors[1])
    assert_close(separate.importance(), {n: f1[n] + f2[n] for n in f1})


# -- the penalty -------------------------------------------------------------------------
def test_penalty_value_and_gradient_match_the_closed_form() -> None:
    module = make_module()
    plugin = EWC(lambda_=3.0)
    consolidate_twice(plugin, module)
    theta = params(module.model)
    expected_value = sum(
        1.5 * (t.importance[n] * (theta[n] - t.anchor[n]).square()).sum()
        for t in plugin.terms
        for n in theta
    )
    value = plugin.penalty(module)
    torch.testing.assert_close(value, expected_value)
    grads = torch.autograd.grad(value, list(theta.values()))
    for (n, p), g in zip(theta.items(), grads):
        closed = sum(3.0 * t.importance[n] * (p - t.anchor[n]) for t in plugin.terms)
        torch.testing.assert_close(g, closed.detach(), msg=n)
    # the closed form the module adds before the optimizer step is the same gradient, added
    added = {n: torch.ones_like(p) for n, p in theta.items()}
    plugin.add_penalty_grad(module, added)
    assert_close(added, {n: 1 + g for n, g in zip(theta, grads)})


def test_many_terms_give_one_merged_gradient_equal_to_the_sum_over_terms() -> None:
    """Separate-mode EWC's gradient goes through one merged term (Σ Ω, Ω-weighted mean
    anchor): the same as the per-term sum, rebuilt when a term is added or state is loaded,
    and bypassed when a negative Ω leaves no centre."""
    module = make_module()
    theta = params(module.model)
    generator = torch.Generator().manual_seed(3)

    def term(negative: bool = False) -> Term:
        omega = {n: torch.rand(p.shape, generator=generator) for n, p in theta.items()}
        for w in omega.values():  # exact zeros where no task cares: the centre is undefined
            w[torch.rand(w.shape, generator=generator) < 0.3] = 0.0
            if negative:
                w[0] = -w[0].abs() - 0.1
        anchor = {
            n: p.detach() + torch.randn(p.shape, generator=generator) for n, p in theta.items()
        }
        return Term(omega, anchor)

    def per_term() -> dict[str, Tensor]:
        return {
            n: sum(2 * 1.5 * t.importance[n] * (p.detach() - t.anchor[n]) for t in plugin.terms)
            for n, p in theta.items()
        }

    def added() -> dict[str, Tensor]:
        grads: dict[str, Tensor] = {}
        plugin.add_penalty_grad(module, grads)
        return grads

    plugin = EWC(lambda_=3.0)
    plugin.terms = [term(), term(), term()]
    assert len(plugin.merged_terms(module.device)) == 1
    assert_close(added(), per_term())
    plugin.terms.append(term())  # a new experience: the merged term is rebuilt
    assert_close(added(), per_term())
    restored = EWC(lambda_=3.0)
    restored.load_state_dict(plugin.state_dict())
    plugin = restored
    assert_close(added(), per_term())
    plugin.terms = [term(), term(negative=True)]
    assert plugin.merged_terms(module.device) == plugin.terms
    assert_close(added(), per_term())


def test_module_penalty_grads_equal_autograd_of_the_summed_penalties() -> None:
    """Closed-form gradients (EWC, MAS) and an autograd-only plugin add up to autograd's."""
    from afmbench.plugin import ContinualPlugin

    class Pull(ContinualPlugin):  # no closed form: the module falls back on autograd
        name = "pull"

        def penalty(self, module):
            return sum(p.pow(4).sum() for p in module.model.parameters())

    module = make_module()
    ewc, mas = EWC(lambda_=2.0), MAS(lambda_=0.5)
    consolidate_twice(ewc, module)
    consolidate_twice(mas, module)
    with torch.no_grad():
        for p in module.model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    plugins = [ewc, mas, Pull()]
    module.plugins = lambda: plugins
    theta = params(module.model)
    expected = torch.autograd.grad(sum(p.penalty(module) for p in plugins), list(theta.values()))
    # closed form (EWC, MAS), added by the module's hook to zero gradients, + autograd of the
    # rest (what SI's task gradient takes out)
    module.model.zero_grad(set_to_none=True)
    module.on_before_optimizer_step(None)
    closed = {n: p.grad for n, p in theta.items()}
    graph = module._grads_of(plugins[2].penalty(module))
    assert set(closed) == set(theta) and set(graph) == set(theta)
    assert_close({n: closed[n] + graph[n] for n in theta}, dict(zip(theta, expected)))


# -- MAS ---------------------------------------------------------------------------------
def test_mas_importance_is_the_mean_absolute_per_sample_gradient_of_the_squared_norm() -> None:
    module = make_module()
    x = module.train_split[0]
    expected = mean_of([{n: g.abs() for n, g in d.items()}
                        for d in per_sample_grads(module.model.eval(), x, lambda z: z.square().sum())])  # fmt: skip
    assert_close(MAS().estimate(module), expected)


def test_mas_sums_importance_over_tasks() -> None:
    module = make_module()
    plugin, single = MAS(), MAS()
    omegas = []
    for _ in range(2):
        omegas.append(single.estimate(module))
        plugin.on_train_end(None, module)
        with torch.no_grad():
            module.model.body[1].weight.mul_(1.3)
    assert_close(plugin.importance(), {n: omegas[0][n] + omegas[1][n] for n in omegas[0]})


# -- ANPyC -------------------------------------------------------------------------------
def hand_anpyc(module: ContinualModule, batch_size: int) -> dict[str, Tensor]:
    model, x = module.model.eval(), module.train_split[0]
    theta = params(model)
    scores = []
    for start in range(0, len(x), batch_size):
        p = F.softmax(model(x[start : start + batch_size], TASK)[:, :3], 1)
        entropy = -(p * p.log()).sum()
        grads = torch.autograd.grad(entropy, list(theta.values()), allow_unused=True)
        scores.append({
            n: torch.zeros_like(w) if g is None else torch.clamp(g * w + 0.5 * w**2 * g**2, min=0).detach()
            for (n, w), g in zip(theta.items(), grads)
        })  # fmt: skip
    return mean_of(scores)


def test_anpyc_importance_is_the_mean_over_batches_of_the_clamped_entropy_score() -> None:
    module = make_module()
    omega = ANPyC(batch_size=4).estimate(module)  # 13 samples: batches of 4, 4, 4, 1
    assert_close(omega, hand_anpyc(module, 4))
    assert omega["head.heads.0.weight"].abs().sum() == 0  # another task's head


@pytest.mark.parametrize("accumulate", ["max", "sum"])
def test_anpyc_accumulates_across_tasks_by_max_or_sum(accumulate: str) -> None:
    module = make_module()
    plugin = ANPyC(batch_size=4, accumulate=accumulate)
    omegas = []
    for _ in range(2):
        omegas.append(hand_anpyc(module, 4))
        plugin.on_train_end(SINGLE, module)
        with torch.no_grad():
            module.model.body[3].weight.mul_(-1.5)
    combine = torch.maximum if accumulate == "max" else torch.add
    assert_close(plugin.importance(), {n: combine(omegas[0][n], omegas[1][n]) for n in omegas[0]})


def test_anpyc_prune_levels_follow_the_schedule() -> None:
    plugin = ANPyC(prune=True)
    assert plugin.prune_levels(0) == [10.0, 20.0, 30.0, 40.0, 50.0]
    assert plugin.prune_levels(1) == [10.0, 20.0, 30.0, pytest.approx(40.0)]
    assert plugin.prune_levels(2) == [10.0, 20.0, 30.0, pytest.approx(32.0)]
    assert ANPyC(prune=True, prune_percent=8.0).prune_levels(0) == [8.0]


def test_anpyc_pruning_zeroes_the_free_pool_and_never_touches_kept_weights(tmp_path: Path) -> None:
    module = make_module(n_experiences=3)
    plugin = ANPyC(batch_size=4, prune=True, retrain_steps=3)
    body = [n for n in params(module.model) if n.startswith("body.")]
    head_before = module.model.head.heads[TASK].weight.detach().clone()

    plugin.on_train_end(SINGLE, module)  # experience 0: 50 % of every body tensor
    first_kept = {n: m.clone() for n, m in plugin.kept.items()}
    for n in body:
        p, pruned = params(module.model)[n], plugin.pruned[n]
        assert int(pruned.sum()) == round(0.5 * p.numel())
        assert (p[pruned] == 0).all()
        assert torch.equal(plugin.kept[n], ~pruned)
    assert not torch.equal(
        module.model.head.heads[TASK].weight, head_before
    )  # retrained, not pruned
    assert set(plugin.pruned) == set(body)

    with torch.no_grad():  # the next experience trains, pruned weights come back to life
        for p in module.model.body.parameters():
            p.add_(torch.randn_like(p))
    module.experience = 1
    plugin.on_train_end(SINGLE, module)  # 40 % of the remaining free pool
    for n in body:
        pruned, free = plugin.pruned[n], ~first_kept[n]
        assert not (pruned & first_kept[n]).any()
        assert int(pruned.sum()) == round(0.4 * int(free.sum()))
        assert (params(module.model)[n][pruned] == 0).all()
        assert torch.equal(plugin.kept[n], first_kept[n] | (free & ~pruned))

    restored = ANPyC(batch_size=4, prune=True, retrain_steps=3)
    restored.load_state_dict(round_trip(plugin.state_dict(), tmp_path))
    for n in body:
        assert torch.equal(restored.kept[n], plugin.kept[n])
        assert torch.equal(restored.pruned[n], plugin.pruned[n])

    weights = {n: p.detach().clone() for n, p in params(module.model).items()}
    module.experience = 2  # the last experience: consolidated, not pruned
    plugin.on_train_end(SINGLE, module)
    assert_close({n: p.detach() for n, p in params(module.model).items()}, weights)
    assert all(torch.equal(plugin.kept[n], restored.kept[n]) for n in body)


# -- SI ----------------------------------------------------------------------------------
class Quadratic(nn.Module):
    """``L(θ) = ½ Σ_k h_k (θ_k − a_k)²``: diagonal Hessian, known per-parameter loss drops."""

    def __init__(self) -> None:
        super().__init__()
        self.theta = nn.Parameter(torch.tensor([2.0, -1.0, 0.5, 3.0, -2.0]))
        self.h = torch.tensor([1.0, 2.0, 1.5, 0.5, 1.2])
        self.a = torch.tensor([0.0, 1.0, -1.0, 1.0, 0.0])

    def per_parameter_loss(self) -> Tensor:
        return 0.5 * self.h * (self.theta - self.a).square()


def stand_in(model: torch.nn.Module, **attributes) -> SimpleNamespace:
    """What SI's hooks read of a ContinualModule, for a model trained by hand."""
    return SimpleNamespace(
        **{"model": model, "graph_penalty_grads": {}, "device": torch.device("cpu"), **attributes},
        trainable_parameters=lambda: dict(model.named_parameters()),
    )


def test_si_path_integral_equals_each_parameters_drop_in_a_quadratic_loss() -> None:
    model = Quadratic()
    module = stand_in(model)
    plugin = SI(c=1.0, xi=1e-6)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.004)
    start = model.per_parameter_loss().detach()
    plugin.on_train_start(None, module)
    for _ in range(3000):
        model.per_parameter_loss().sum().backward()
        plugin.on_before_optimizer_step(None, module, optimizer)
        optimizer.step()
        plugin.on_train_batch_end(None, module)
        optimizer.zero_grad()
    drop = start - model.per_parameter_loss().detach()
    torch.testing.assert_close(plugin.path["theta"], drop, rtol=1e-2, atol=1e-4)
    plugin.on_train_end(None, module)
    # converged: ω ≈ ½ h d² and Δ = d, so Ω ≈ h / 2 — the surrogate c Ω (θ−θ*)² is the loss itself
    torch.testing.assert_close(plugin.importance()["theta"], model.h / 2, rtol=2e-2, atol=0)
    assert plugin.path["theta"].abs().sum() == 0


def test_si_skips_batches_without_an_optimizer_step() -> None:
    model = Quadratic()
    module = stand_in(model)
    plugin = SI()
    plugin.on_train_start(None, module)
    with torch.no_grad():
        model.theta.add_(1.0)  # a change no step of ours made (e.g. accumulation in progress)
    plugin.on_train_batch_end(None, module)
    assert plugin.path["theta"].abs().sum() == 0


def test_si_task_gradient_removes_the_penalty_gradient() -> None:
    """At SI's hook ``p.grad`` lacks the closed-form penalties (the module adds them next) and
    holds the others: ``task`` takes the latter out, ``total`` takes the gradient as stepped on,
    both included."""
    model = Quadratic()
    module = stand_in(model, graph_penalty_grads={"theta": torch.ones(5)})
    for gradient, expected in (("task", model.h - 1.0), ("total", model.h + 2.0)):
        plugin = SI(gradient=gradient)
        assert plugin.needs_penalty_grads == (gradient == "task")
        plugin.on_train_start(None, module)
        model.theta.grad = model.h.clone()
        plugin.on_before_optimizer_step(None, module, None)
        with torch.no_grad():
            model.theta.grad.add_(2.0)  # the module's closed-form penalty gradient
            model.theta.sub_(0.1)
        plugin.on_train_batch_end(None, module)
        with torch.no_grad():
            model.theta.add_(0.1)
        torch.testing.assert_close(plugin.path["theta"], 0.1 * expected)


# -- state -------------------------------------------------------------------------------
def round_trip(state: dict, tmp_path: Path) -> dict:
    path = tmp_path / "plugin.pt"
    torch.save(state, path)
    return torch.load(path, weights_only=True)


@pytest.mark.parametrize("make", [
    lambda: EWC(lambda_=2.0), lambda: EWC(mode="online", gamma=0.7), lambda: SI(c=0.5),
    lambda: MAS(lambda_=0.3), lambda: ANPyC(lambda_=0.2, batch_size=4),
])  # fmt: skip
def test_state_survives_a_checkpoint_round_trip(make, tmp_path: Path) -> None:
    module = make_module()
    plugin = make()
    consolidate_twice(plugin, module) if not isinstance(plugin, ANPyC) else plugin.on_train_end(
        SINGLE, module
    )
    restored = make()
    restored.load_state_dict(round_trip(plugin.state_dict(), tmp_path))
    assert all(
        t.device.type == "cpu"
        for term in plugin.state_dict()["terms"]
        for t in term["anchor"].values()
    )
    torch.testing.assert_close(restored.penalty(module), plugin.penalty(module))
    assert_close(restored.importance(), plugin.importance())
    assert repr(restored) == repr(plugin)


def test_no_penalty_before_the_first_consolidation() -> None:
    module = make_module()
    assert all(cls().penalty(module) is None for cls in (EWC, SI, MAS, ANPyC))


# -- configuration -----------------------------------------------------------------------
@pytest.mark.parametrize("bad", [
    lambda: EWC(lambda_=-1.0), lambda: EWC(gamma=1.5), lambda: EWC(fisher_samples=0),
    lambda: SI(c=-0.1), lambda: SI(xi=0.0), lambda: MAS(lambda_=-2.0), lambda: MAS(samples=0),
    lambda: ANPyC(lambda_=-1.0), lambda: ANPyC(batch_size=0), lambda: ANPyC(prune_percent=100.0),
    lambda: ANPyC(prune_decay=0.0), lambda: ANPyC(retrain_steps=-1),
])  # fmt: skip
def test_bad_values_raise_one_config_error(bad) -> None:
    with pytest.raises(ConfigError) as error:
        bad()
    assert error.value.fix


def test_strategies_build_from_the_cli_config() -> None:
    from afmbench.compose import load_config
    from afmbench.runner import plan

    cfg = load_config(["strategy=ewc", "strategy.lambda_=7.5", "strategy.fisher=exact"])
    (plugin,) = plan(cfg).plugins
    assert isinstance(plugin, EWC) and plugin.lambda_ == 7.5 and plugin.fisher == "exact"
    with pytest.raises(ConfigError, match="strategy.lambda_"):
        plan(load_config(["strategy=mas", "strategy.lambda_=-1"]))
