"""The experience loop through the Python API: files, determinism, bounds, real forgetting."""

import json

import numpy as np
import pytest
import torch

import afmbench
from afmbench.config import OptimizerConfig


def _digits_run(seed=0, run_dir=None, joint=False, **kwargs):
    scenario = afmbench.build_scenario("split_digits", seed=seed)
    afmbench.seed_everything(seed)
    model = afmbench.build_model("mlp", scenario.input_shape, scenario.head_sizes, hidden=[32, 32])
    kwargs.setdefault("optimizer", OptimizerConfig(lr=0.05, momentum=0.9))
    return afmbench.run(
        scenario, model, joint=joint, max_epochs=3, batch_size=32, seed=seed, run_dir=run_dir,
        verbose=False, **kwargs,
    )  # fmt: skip


def test_python_api_writes_the_run_folder(tmp_path):
    result = _digits_run(run_dir=tmp_path / "run")
    assert result.accuracy_matrix.shape == (5, 5)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    for key in ("accuracy_matrix", "acc", "bwt", "fwt", "forgetting", "avg_acc_per_task", "scenario",
                "protocol", "strategy", "forgetting_layer", "seed", "train_time_s", "config_hash", "versions"):  # fmt: skip
        assert key in metrics, key
    assert metrics["status"] == "finished" and metrics["strategy"] == "naive"
    assert metrics["forgetting_layer"] is False and metrics["protocol"] == "task"
    assert np.allclose(metrics["accuracy_matrix"], result.accuracy_matrix)
    assert metrics["acc"] == pytest.approx(result.accuracy_matrix[-1].mean())
    csv = (tmp_path / "run" / "accuracy_matrix.csv").read_text().splitlines()
    assert csv[0] == "after,task_0,task_1,task_2,task_3,task_4" and len(csv) == 6
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["experience_4.ckpt"]


def test_progress_shows_training_bars_and_passes_and_no_evaluation_bar(capsys):
    """What a terminal shows: each experience's bar, the importance pass's bar, then the
    accuracies on a line of their own (an evaluation bar, even one hidden after it has drawn,
    would run into that line)."""
    from afmbench.strategies import EWC

    scenario = afmbench.build_scenario("split_digits", seed=0)
    model = afmbench.build_model("mlp", scenario.input_shape, scenario.head_sizes, hidden=[8])
    afmbench.run(scenario, model, [EWC()], max_epochs=1, batch_size=64, verbose=True)
    shown = capsys.readouterr().out
    assert "Validation" not in shown
    for k in range(1, 6):
        bar, fisher = (
            shown.index(f"\rexperience {k}/5 epoch 1/1: 100%"),
            shown.index(f"\rexperience {k}/5: ewc Fisher:   0%"),
        )
        assert bar < fisher < shown.index(f"after experience {k}/5")
    after = [line for line in shown.splitlines() if "after experience" in line]
    assert len(after) == 5 and all(line.startswith("after experience") for line in after)


def test_diagonal_is_learned_and_untrained_baseline_is_near_chance():
    result = _digits_run()
    assert np.diag(result.accuracy_matrix).min() > 0.9
    assert np.abs(result.baseline_accuracy - 0.5).max() < 0.3  # two-way heads before training


def test_same_seed_gives_the_same_matrix_and_another_seed_does_not():
    a, b, c = _digits_run(seed=0), _digits_run(seed=0), _digits_run(seed=1)
    assert np.array_equal(a.accuracy_matrix, b.accuracy_matrix)
    assert not np.array_equal(a.accuracy_matrix, c.accuracy_matrix)


def test_joint_is_an_upper_bound_on_naive():
    naive, joint = _digits_run(), _digits_run(joint=True)
    assert joint.accuracy_matrix.shape == (1, 5)
    assert joint.metrics["acc"] >= naive.metrics["acc"]
    assert joint.metrics["strategy"] == "joint" and joint.metrics["bwt"] is None


def test_cumulative_is_naive_on_the_data_seen_so_far():
    """Two routes: cumulative training, and naive training on experiences whose training sets
    are the unions by hand, give one accuracy matrix; fine-tuning alone forgets."""
    from afmbench.scenarios.base import Scenario

    scenario = afmbench.build_scenario("split_digits", protocol="class")
    unions = Scenario.from_tensors(
        "by_hand", "class",
        [scenario.joint_train(e + 1) for e in range(5)],
        [scenario.test(e) for e in range(5)],
        scenario.head_sizes,
    )  # fmt: skip
    sizes = [len(scenario.train(e)[1]) for e in range(5)]
    assert [len(unions.train(e)[1]) for e in range(5)] == list(np.cumsum(sizes))

    def run(scenario, **kwargs):
        afmbench.seed_everything(0)
        model = afmbench.build_model("mlp", scenario.input_shape, scenario.head_sizes, hidden=[32])
        return afmbench.run(scenario, model, max_epochs=2, verbose=False, **kwargs)

    cumulative, by_hand, naive = run(scenario, cumulative=True), run(unions), run(scenario)
    assert np.array_equal(cumulative.accuracy_matrix, by_hand.accuracy_matrix)
    assert cumulative.metrics["strategy"] == "cumulative"
    assert cumulative.metrics["config_hash"] != naive.metrics["config_hash"]
    assert cumulative.metrics["bwt"] is not None
    assert cumulative.metrics["acc"] > naive.metrics["acc"] + 0.3  # class-IL naive forgets


def test_cumulative_task_incremental_trains_every_head_it_has_seen():
    result = _digits_run(cumulative=True)
    assert result.accuracy_matrix.shape == (5, 5)
    assert result.accuracy_matrix[-1].min() > 0.9


def test_joint_and_cumulative_together_is_one_clear_error():
    with pytest.raises(afmbench.ConfigError, match="joint and cumulative training exclude"):
        _digits_run(joint=True, cumulative=True)


def test_checkpoints_carry_model_and_accuracy_matrix(tmp_path):
    result = _digits_run(run_dir=tmp_path / "run", keep_checkpoints=True)
    assert len(list((tmp_path / "run" / "checkpoints").glob("experience_*.ckpt"))) == 5
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "experience_4.ckpt", weights_only=False)
    restored = afmbench.AccuracyMatrix(6, 5)
    restored.load_state_dict(
        {
            k[len("accuracy.") :]: v
            for k, v in ckpt["state_dict"].items()
            if k.startswith("accuracy.")
        }
    )
    assert np.allclose(restored.compute()[1:].numpy(), result.accuracy_matrix)
    assert any(k.startswith("model.body.") for k in ckpt["state_dict"])


def test_optimizer_state_carries_over_when_not_reset():
    carried = _digits_run(
        optimizer=OptimizerConfig(lr=0.05, momentum=0.9, reset_between_experiences=False)
    )
    reset = _digits_run()
    assert not np.array_equal(carried.accuracy_matrix, reset.accuracy_matrix)


class LearningRates(afmbench.ContinualPlugin):
    """The learning rate of each epoch (every step of it), per experience."""

    name = "learning_rates"

    def __init__(self) -> None:
        self.seen: list[list[float]] = []

    def on_train_start(self, trainer, pl_module) -> None:
        self.seen.append([])

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        if batch_idx == 0:
            self.seen[-1].append(lr)
        assert lr == self.seen[-1][-1]


@pytest.mark.parametrize("reset", [True, False])
def test_lr_milestones_follow_torchs_multistep_schedule_in_every_experience(reset):
    afmbench.seed_everything(0)
    scenario = afmbench.build_scenario("split_digits", n_experiences=2)
    model = afmbench.build_model("mlp", scenario.input_shape, scenario.head_sizes, hidden=[8])
    rates = LearningRates()
    config = OptimizerConfig(
        lr=0.1, lr_milestones=[1, 3], lr_gamma=0.5, reset_between_experiences=reset
    )
    afmbench.run(scenario, model, [rates], max_epochs=4, batch_size=128, optimizer=config,
                 verbose=False)  # fmt: skip
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, [1, 3], gamma=0.5)
    expected = []
    for _ in range(4):
        expected.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert rates.seen == [pytest.approx(expected)] * 2  # the schedule restarts each experience


@pytest.mark.parametrize(
    "settings, match",
    [({"lr_milestones": [45, 35]}, "must be increasing positive epochs"),
     ({"lr_milestones": [0]}, "must be increasing positive epochs"),
     ({"lr_gamma": 0.0}, r"lr_gamma=0.0 must be in \(0, 1\]")],
)  # fmt: skip
def test_bad_lr_schedules_are_one_line(settings, match):
    with pytest.raises(afmbench.ConfigError, match=match) as info:
        OptimizerConfig(**settings)
    assert "\n" not in str(info.value)


@pytest.mark.slow
def test_permuted_mnist_naive_forgets(mnist_root, tmp_path):
    """Three permutations, one epoch each, on the real MNIST archives."""
    from tests.conftest import run_cli

    out = run_cli(
        "run", "scenario=permuted_mnist", "scenario.n_experiences=3", "trainer.max_epochs=1",
        "strategy=naive", "seed=0", f"run_dir={tmp_path / 'pm'}", f"data.root={mnist_root}",
        "trainer.enable_progress_bar=false",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    metrics = json.loads((tmp_path / "pm" / "metrics.json").read_text())
    matrix = np.array(metrics["accuracy_matrix"])
    assert matrix.shape == (3, 3)
    assert np.diag(matrix).min() > 0.9, matrix
    assert metrics["bwt"] < 0, matrix
    assert metrics["scenario"] == "permuted_mnist" and metrics["protocol"] == "domain"


def test_per_step_bookkeeping_is_not_paid_per_step(monkeypatch):
    """Lightning sets ``_current_fx_name`` and opens ``profiler.profile`` around every hook
    (~70 times a step), and SI's and the penalty's hooks need the parameters by name every
    step. The slow paths (nn.Module's vetted ``__setattr__`` on the module, Lightning's
    generator-based ``Profiler.profile``, the model's ``named_parameters``) are counted here:
    they are taken as often for 64 steps an experience as for 16."""
    from lightning.pytorch.profilers.profiler import Profiler

    from afmbench.models import ContinualModel
    from afmbench.module import ContinualModule
    from afmbench.scenarios.base import Scenario
    from afmbench.strategies import SI

    calls = dict.fromkeys(("setattr", "profile", "named_parameters"), 0)
    vetted, generator_profile = torch.nn.Module.__setattr__, Profiler.profile
    walk = torch.nn.Module.named_parameters

    def counting_setattr(self, name, value):
        calls["setattr"] += isinstance(self, ContinualModule)
        vetted(self, name, value)

    def counting_profile(self, action_name):
        calls["profile"] += 1
        return generator_profile(self, action_name)

    def counting_named_parameters(self, *args, **kwargs):
        calls["named_parameters"] += 1
        return walk(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "__setattr__", counting_setattr)
    monkeypatch.setattr(Profiler, "profile", counting_profile)
    monkeypatch.setattr(ContinualModel, "named_parameters", counting_named_parameters)

    def slow_paths(steps):
        x, y = torch.randn(steps * 4, 3), torch.randint(0, 2, (steps * 4,))
        split = (x, y, torch.zeros_like(y))
        scenario = Scenario.from_tensors("toy", "domain", [split] * 2, [split] * 2, (2,))
        model = afmbench.build_model("mlp", (3,), (2,), hidden=[4])
        calls.update(dict.fromkeys(calls, 0))
        afmbench.run(scenario, model, [SI()], batch_size=4, verbose=False)  # a penalty from 2nd
        return dict(calls)

    few, many = slow_paths(16), slow_paths(64)
    assert few == many and few["setattr"] > 0 and few["named_parameters"] > 0  # counting works
    # nn.Module's checks still apply where they matter
    module = ContinualModule(afmbench.build_model("mlp", (3,), (2,), hidden=[4]), 1, 2)
    with pytest.raises(TypeError, match="child module"):
        module.model = "not a module"
    module.extra = torch.nn.Linear(2, 2)
    assert "extra" in module._modules and "extra" not in module.__dict__


def test_parameters_by_name_follow_the_model_each_epoch_and_after_a_failure():
    """``trainable_parameters`` is built once an epoch: a parameter frozen mid-epoch (as a
    fine-tuning callback might) drops out from the next epoch on. The cache outlives an epoch
    that raises; afterwards the module must still follow the model, not the stale cache."""
    from lightning.pytorch import Callback, Trainer

    from afmbench.loader import TensorLoader
    from afmbench.module import ContinualModule

    model = afmbench.build_model("mlp", (1, 2, 2), (2,), hidden=[3])
    first, second = list(model.named_parameters())[:2]
    seen = []

    class Probe(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append((trainer.current_epoch, set(pl_module.trainable_parameters())))
            if (trainer.current_epoch, batch_idx) == (0, 0):
                first[1].requires_grad_(False)
            if (trainer.current_epoch, batch_idx) == (1, 1):
                raise RuntimeError("died mid-epoch")

    module = ContinualModule(model, n_tasks=1, n_rows=2)
    module.experience, module.task_id = 0, 0
    data = (torch.randn(8, 1, 2, 2), torch.randint(0, 2, (8,)), torch.zeros(8, dtype=torch.long))
    trainer = Trainer(max_epochs=2, callbacks=[Probe()], logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
    with pytest.raises(RuntimeError, match="died mid-epoch"):
        trainer.fit(module, train_dataloaders=TensorLoader(data, 4))
    assert [epoch for epoch, _ in seen] == [0, 0, 1, 1]
    assert all(first[0] in names for _, names in seen[:2])  # the epoch's cache
    assert all(first[0] not in names for _, names in seen[2:])  # the next epoch's
    second[1].requires_grad_(False)
    assert set(module.trainable_parameters()) == {
        n for n, p in model.named_parameters() if p.requires_grad
    }
    assert second[0] not in module.trainable_parameters()


def _api_call(case):
    """Build what ``case`` names with one mistake in it and call ``afmbench.run`` on it."""
    from afmbench.strategies import EWC

    scenario = afmbench.build_scenario("split_digits", n_experiences=2)
    model = afmbench.build_model("mlp", scenario.input_shape, scenario.head_sizes, hidden=[8])
    args, kwargs = [scenario, model, []], {"verbose": False}
    if case == "scenario name":
        args[0] = "split_digits"
    elif case == "torch module":
        args[1] = torch.nn.Linear(64, 10)
    elif case == "bare plugin":
        args[2] = EWC()
    elif case == "plugin class":
        args[2] = [EWC]
    elif case == "plugin name":
        args[2] = ["ewc"]
    elif case == "no epochs":
        kwargs["max_epochs"] = 0
    elif case == "endless epochs":
        kwargs["max_epochs"] = -1
    elif case == "empty batches":
        kwargs["batch_size"] = 0
    elif case == "trainer logger":
        kwargs["trainer_kwargs"] = {"logger": False}
    return afmbench.run(*args, **kwargs)


@pytest.mark.parametrize(
    "case, expected",
    [
        ("scenario name", "scenario must be a Scenario, got str"),
        ("torch module", "model must be a ContinualModel (head(body(x), task)), got Linear"),
        ("bare plugin", "plugins must be a list; fix: pass [EWC(...)]"),
        ("plugin class", "plugin EWC is a class; fix: pass an instance: EWC()"),
        ("plugin name", "plugin 'ewc' is a str, not a ContinualPlugin"),
        ("no epochs", "trainer.max_epochs=0 must be a whole number >= 1"),
        ("endless epochs", "trainer.max_epochs=-1 must be a whole number >= 1"),
        ("empty batches", "data.batch_size=0 must be a whole number >= 1"),
        ("trainer logger", "trainer.logger is afmbench's to set; fix: choose it with logger="),
    ],
)
def test_python_api_mistakes_are_one_config_error(case, expected):
    with pytest.raises(afmbench.ConfigError) as caught:
        _api_call(case)
    assert expected in str(caught.value) and "\n" not in str(caught.value)


def test_max_epochs_minus_one_is_fine_with_a_step_budget():
    scenario = afmbench.build_scenario("split_digits", n_experiences=2)
    model = afmbench.build_model("mlp", scenario.input_shape, scenario.head_sizes, hidden=[8])
    result = afmbench.run(scenario, model, [], max_epochs=-1, verbose=False,
                          trainer_kwargs={"max_steps": 3})  # fmt: skip
    assert result.module.trainer.global_step == 3  # the last experience's fit: three steps


def test_constructor_arguments_are_checked_and_coerced_like_the_cli():
    from afmbench.forgetting import ForgettingLayerCallback
    from afmbench.plugin import ContinualPlugin
    from afmbench.strategies import EWC, MAS, SI, ANPyC

    mistakes = [
        (lambda: EWC(lambda_="big"), "strategy.lambda_ must be a number, got 'big' (str)"),
        (lambda: EWC(fisher="fast"), "strategy.fisher must be one of empirical, sampled, exact"),
        (lambda: SI(gradient="nope"), "strategy.gradient must be one of task, total"),
        (lambda: MAS(lambda_=None), "strategy.lambda_ must be a number, got None"),
        (lambda: ANPyC(prune="yes"), "strategy.prune must be true or false, got 'yes'"),
        (lambda: ForgettingLayerCallback(rho="2"), "forgetting.rho must be a number, got '2'"),
        (lambda: afmbench.build_model("mlp", (64,), (10,), hidden="64"),
         "model.hidden must be a list of whole numbers, got '64'"),
        (lambda: afmbench.build_scenario("split_digits", n_experiencs=2),
         "unknown option scenario.n_experiencs; fix: did you mean scenario.n_experiences?"),
        (lambda: afmbench.OptimizerConfig(lr="big"), "optimizer.lr must be a number, got 'big'"),
        (lambda: afmbench.OptimizerConfig(name="lbfgs"),
         "optimizer.name must be one of sgd, adam, adamw, got 'lbfgs'"),
    ]  # fmt: skip
    for make, expected in mistakes:
        with pytest.raises(afmbench.ConfigError, match=None) as caught:
            make()
        assert expected in str(caught.value), str(caught.value)

    # values of the right kind are converted, numpy's included; a user's plugin is checked too
    ewc = EWC(lambda_=np.int64(100), fisher_samples=np.int64(5))
    assert type(ewc.lambda_) is float and type(ewc.fisher_samples) is int
    assert afmbench.OptimizerConfig(lr=1, betas=[0.9, 0.99]) == afmbench.OptimizerConfig(
        lr=1.0, betas=(0.9, 0.99)
    )

    class Scaled(ContinualPlugin):
        config_group = "mine"

        def __init__(self, scale: float = 1.0, **extra) -> None:
            super().__init__()
            self.scale, self.extra = scale, extra

    assert Scaled(2, note="kept as given").extra == {"note": "kept as given"}
    with pytest.raises(afmbench.ConfigError, match="mine.scale must be a number"):
        Scaled(scale=[1])


def test_an_experience_that_learned_nothing_is_warned_about(tmp_path):
    from afmbench.errors import AfmbenchWarning
    from tests.conftest import run_cli

    with pytest.warns(AfmbenchWarning) as caught:
        _digits_run(optimizer=OptimizerConfig(lr=1e-7))  # stalls
    messages = [str(w.message) for w in caught if issubclass(w.category, AfmbenchWarning)]
    assert len(messages) == 5 and messages[0].startswith("experience 1/5 learned nothing")
    assert "optimizer.lr=1e-07" in messages[0] and "trainer.max_epochs=3" in messages[0]

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", AfmbenchWarning)
        _digits_run()  # learns: not a word

    out = run_cli("run", "optimizer.lr=1e-7", "scenario.n_experiences=2", "trainer.max_epochs=1",
                  "logger=none", f"run_dir={tmp_path / 'run'}", "trainer.enable_progress_bar=false")  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert "afmbench: warning: experience 1/2 learned nothing: accuracy " in out.stderr
    assert "UserWarning" not in out.stderr
