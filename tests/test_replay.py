"""The replay buffer and the replay and distillation strategies: ER, A-GEM, DER++, LwF."""

import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import afmbench
from afmbench.config import OptimizerConfig
from afmbench.errors import ConfigError
from afmbench.replay import ReplayBuffer
from afmbench.strategies import AGEM, ER, DERpp, LwF
from afmbench.strategies.agem import project


def _stream(n, dim=3):
    return (
        torch.arange(n).float().view(n, 1).expand(n, dim).contiguous(),
        torch.arange(n),
        torch.zeros(n, dtype=torch.long),
    )


def test_reservoir_sampling_keeps_every_seen_sample_with_equal_probability():
    x, y, t = _stream(100)
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(100)
    trials = 600
    for _ in range(trials):
        buffer = ReplayBuffer(10)
        for start in range(0, 100, 30):  # batches of 30, the last one short
            buffer.add_reservoir(
                x[start : start + 30], y[start : start + 30], t[start : start + 30], g
            )
        assert len(buffer) == 10 and buffer.seen == 100
        counts[buffer.y] += 1
    rate = counts / trials  # each sample: 10 / 100, with an sd of 0.012 over 600 trials
    assert (rate - 0.1).abs().max() < 0.045, rate
    assert abs(rate[:50].mean() - rate[50:].mean()) < 0.01  # early and late samples alike


def test_balanced_selection_gives_every_class_the_same_share():
    g = torch.Generator().manual_seed(0)
    buffer = ReplayBuffer(10, "balanced")
    y = torch.arange(60) % 3
    buffer.select_balanced(torch.randn(60, 4), y, torch.zeros(60, dtype=torch.long), g)
    assert sorted(torch.bincount(buffer.y).tolist()) == [3, 3, 4]
    y = 3 + torch.arange(40) % 2
    buffer.select_balanced(torch.randn(40, 4), y, torch.zeros(40, dtype=torch.long), g)
    assert torch.bincount(buffer.y).tolist() == [2, 2, 2, 2, 2]


def test_eight_bit_images_are_stored_as_codes_and_read_back_exactly():
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (200, 3, 8, 8), generator=g).float() / 255
    x = (pixels - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)) / 0.25
    buffer = ReplayBuffer(200)
    for start in range(0, 200, 40):  # the table grows batch by batch; stored codes are redone
        buffer.add_reservoir(x[start : start + 40], torch.zeros(40, dtype=torch.long),
                             torch.zeros(40, dtype=torch.long), g)  # fmt: skip
    assert buffer.x.dtype == torch.uint8
    assert torch.equal(buffer.samples()[0], x)
    assert buffer.nbytes < x.numel() * 4 / 2
    noisy = torch.randn(300, 3, 8, 8)  # more than 256 values a channel: floats from now on
    buffer.capacity = 500
    buffer.add_reservoir(
        noisy, torch.zeros(300, dtype=torch.long), torch.zeros(300, dtype=torch.long), g
    )
    assert buffer.x.dtype == torch.float32
    assert torch.equal(buffer.samples()[0], torch.cat([x, noisy]))


@pytest.mark.parametrize("first_batch", ["floats", "codes"])
def test_images_with_more_than_256_values_are_stored_as_floats_from_any_batch_on(first_batch):
    """Inputs that no 256-entry table holds are kept as they come, whether the first batch or a
    later one brings more values than a code can index."""
    g = torch.Generator().manual_seed(0)
    eight_bit = torch.randint(0, 256, (6, 3, 8, 8), generator=g).float() / 255
    floats = torch.randn(6, 3, 8, 8, generator=g)  # 384 values a channel
    batches = [floats, eight_bit] if first_batch == "floats" else [eight_bit, floats]
    buffer = ReplayBuffer(12, "reservoir")
    for i, x in enumerate(batches):
        buffer.add_reservoir(x, torch.arange(6) + 6 * i, torch.zeros(6, dtype=torch.long), g)
    x, y, _ = buffer.samples()
    assert x.dtype == torch.float32 and buffer.table is None
    assert torch.equal(x[y.argsort()], torch.cat(batches))


def test_agem_projects_a_conflicting_gradient_and_leaves_an_agreeing_one():
    g, g_ref = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])
    projected = project(g, g_ref)
    torch.testing.assert_close(projected, torch.tensor([0.5, 0.5]))
    assert abs(float(torch.dot(projected, g_ref))) < 1e-7
    agreeing = torch.tensor([0.0, 2.0])
    assert project(agreeing, g_ref) is agreeing


def _permuted_run(plugins, seed=0, **kwargs):
    scenario = afmbench.build_scenario("permuted_digits", n_experiences=3, seed=0)
    afmbench.seed_everything(seed)
    model = afmbench.build_model("mlp", scenario.input_shape, scenario.head_sizes, hidden=[64])
    return afmbench.run(scenario, model, plugins, max_epochs=4, batch_size=32, seed=seed,
                        optimizer=OptimizerConfig(lr=0.05), verbose=False, **kwargs)  # fmt: skip


def _mnist_run(name, protocol, plugins, root, tasks):
    scenario = afmbench.build_scenario(name, n_experiences=tasks, protocol=protocol, seed=0,
                                       root=str(root))  # fmt: skip
    afmbench.seed_everything(0)
    model = afmbench.build_model("mlp", scenario.input_shape, scenario.head_sizes, hidden=[64])
    return afmbench.run(scenario, model, plugins, max_epochs=1, batch_size=64, verbose=False,
                        optimizer=OptimizerConfig(lr=0.05),
                        trainer_kwargs={"limit_train_batches": 150})  # fmt: skip


@pytest.mark.slow
def test_replay_beats_naive_on_three_permuted_mnist_tasks_and_lwf_on_split_mnist(mnist_root):
    """150 batches of 64 a task on the real archives. LwF distils the old model on the new
    task's inputs, which a pixel permutation makes meaningless to it (it stays within a point
    of naive there, as in van de Ven & Tolias's tables); on Split MNIST it helps."""
    permuted = ("permuted_mnist", "domain")
    naive = _mnist_run(*permuted, [], mnist_root, 3).metrics["acc"]
    for make in (lambda: ER(buffer_size=200), lambda: AGEM(buffer_size=200),
                 lambda: DERpp(buffer_size=200)):  # fmt: skip
        plugin = make()
        acc = _mnist_run(*permuted, [plugin], mnist_root, 3).metrics["acc"]
        assert acc > naive + 0.03, (plugin.name, acc, naive)
    split = ("split_mnist", "domain")
    naive = _mnist_run(*split, [], mnist_root, 5).metrics["acc"]
    acc = _mnist_run(*split, [LwF(alpha=1.0)], mnist_root, 5).metrics["acc"]
    assert acc > naive + 0.03, ("lwf", acc, naive)


def test_a_replay_run_repeats_exactly_and_its_buffer_reloads(tmp_path):
    first = _permuted_run([ER(buffer_size=100)])
    again = _permuted_run([ER(buffer_size=100)])
    assert (first.accuracy_matrix == again.accuracy_matrix).all()
    plugin = ER(buffer_size=100)
    _permuted_run([plugin])
    state = plugin.state_dict()
    restored = ER(buffer_size=100)
    restored.load_state_dict(state)
    assert torch.equal(restored.buffer.samples()[0], plugin.buffer.samples()[0])
    assert restored.buffer.seen == plugin.buffer.seen


@pytest.mark.parametrize("make, match", [
    (lambda: ER(buffer_size=0), "strategy.buffer_size=0 must be >= 1 for replay"),
    (lambda: AGEM(selection="fifo"), "strategy.selection must be one of reservoir, balanced, got 'fifo'"),
    (lambda: ER(replay_batch_size=0), "strategy.replay_batch_size=0 must be >= 1"),
    (lambda: DERpp(alpha=-1.0), "strategy.alpha=-1.0 must be >= 0"),
    (lambda: LwF(temperature=-2.0), "strategy.temperature=-2.0 must be > 0"),
])  # fmt: skip
def test_bad_replay_settings_are_one_line(make, match):
    with pytest.raises(ConfigError, match=match) as info:
        make()
    assert "\n" not in str(info.value)


def _tiny(heads=(3, 2)):
    torch.manual_seed(0)
    return afmbench.build_model("mlp", (4,), heads, hidden=[5])


def test_the_derpp_loss_is_alpha_mse_on_logits_plus_beta_cross_entropy():
    model = _tiny()
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(6, 4, generator=g), torch.tensor([0, 0, 0, 1, 1, 1])
    y = torch.tensor([2, 0, 1, 1, 0, 1])
    z = torch.randn(6, 3, generator=g)
    z[3:, 2] = float("-inf")  # head 1 has two outputs: MultiHead's padding
    plugin = DERpp(buffer_size=10, replay_batch_size=10, alpha=0.3, beta=0.7)
    plugin.buffer.add_reservoir(x, y, t, g, z=z)
    module = SimpleNamespace(model=model, device=torch.device("cpu"), augmenting=False)
    out = model(x, t)
    finite = torch.isfinite(z)
    expected = 0.3 * (out[finite] - z[finite]).square().mean() + 0.7 * F.cross_entropy(out, y)
    torch.testing.assert_close(plugin.penalty(module), expected)


@pytest.mark.parametrize("heads, task_id", [((3, 2), 1), ((3,), 0)])
def test_the_lwf_loss_is_alpha_times_the_soft_cross_entropy_with_the_old_model(heads, task_id):
    model = _tiny(heads)
    plugin = LwF(alpha=0.5, temperature=2.0)
    previous = _tiny(heads)
    with torch.no_grad():
        for p in previous.parameters():
            p.add_(0.3 * torch.randn_like(p))
    plugin.previous = previous.state_dict()
    plugin.old_tasks, plugin.old_classes = [0], [0, 2]
    x = torch.randn(8, 4)
    module = SimpleNamespace(model=model, batch=(x, None, None), task_id=task_id)
    old, new = previous(x, 0), model(x, 0)
    if len(heads) == 1:  # the shared head: only the classes seen before
        old, new = old[:, [0, 2]], new[:, [0, 2]]
    p = F.softmax(old / 2.0, dim=1)
    expected = 0.5 * -(p * F.log_softmax(new / 2.0, dim=1)).sum(1).mean()
    torch.testing.assert_close(plugin.penalty(module), expected)


def test_all_four_compose_with_ewc_and_the_layer_and_resume_to_the_same_matrix(tmp_path):
    from afmbench.forgetting import ForgettingLayerCallback
    from afmbench.strategies import EWC

    def run(folder, **kwargs):
        plugins = [ER(buffer_size=60), AGEM(buffer_size=60, replay_batch_size=32),
                   DERpp(buffer_size=60), LwF(), EWC(lambda_=10.0), ForgettingLayerCallback()]  # fmt: skip
        scenario = afmbench.build_scenario("split_digits", n_experiences=5, protocol="class")
        afmbench.seed_everything(0)
        model = afmbench.build_model("mlp", scenario.input_shape, scenario.head_sizes, hidden=[16])
        return afmbench.run(scenario, model, plugins, max_epochs=2, run_dir=folder,
                            keep_checkpoints=True, verbose=False, **kwargs)  # fmt: skip

    full = run(tmp_path / "full")
    resumed = run(tmp_path / "resumed", resume=tmp_path / "full/checkpoints/experience_0.ckpt")
    assert (full.accuracy_matrix == resumed.accuracy_matrix).all()
    memory = json.loads((tmp_path / "full" / "metrics.json").read_text())["plugins"]
    assert memory["er"]["buffer_samples"] == 60 and 0 < memory["er"]["buffer_bytes"] < 60 * 64 * 4
    assert set(memory) == {"er", "agem", "derpp"}  # LwF, EWC and the layer keep no buffer
    assert full.accuracy_matrix.shape == (5, 5)


def test_a_side_pass_leaves_the_forgetting_layers_record_of_the_training_batch():
    from afmbench.forgetting import ForgettingLayerCallback
    from afmbench.forgetting.layer import layers
    from afmbench.models import side_pass

    model = _tiny((3,))
    ForgettingLayerCallback().attach(model)
    model.train()
    x = torch.randn(5, 4)
    model(x, 0)
    gate = layers(model)[0].last_gate
    with side_pass(model):
        model(torch.randn(7, 4), 0)  # a replay batch
        assert layers(model)[0].last_gate.shape[0] == 7
    assert layers(model)[0].last_gate is gate
