"""Configuration: type checks against signatures, the config hash, and YAML/Python agreement."""

import inspect
from pathlib import Path
from typing import Literal

import pytest
from omegaconf import OmegaConf

from afmbench.compose import load_config
from afmbench.config import OptimizerConfig, check_params, config_dir
from afmbench.errors import ConfigError
from afmbench.identity import strategy_label
from afmbench.models import MODELS
from afmbench.runner import plan, plugin_class
from afmbench.scenarios import SCENARIOS, build_scenario


def target(
    a: int = 1,
    b: float = 0.5,
    mode: Literal["x", "y"] = "x",
    sizes: tuple[int, ...] = (1,),
    flag: bool = False,
    maybe: int | None = None,
):  # noqa: E501
    return None


def test_values_are_checked_and_converted():
    kwargs = check_params(
        {"a": 3, "b": 2, "mode": "y", "sizes": [4, 5], "flag": True, "maybe": None}, target, "t"
    )
    assert kwargs == {"a": 3, "b": 2.0, "mode": "y", "sizes": (4, 5), "flag": True, "maybe": None}
    assert isinstance(kwargs["b"], float)


@pytest.mark.parametrize(
    "node, message",
    [
        ({"a": "abc"}, "t.a must be a whole number, got 'abc'"),
        ({"a": 1.5}, "t.a must be a whole number"),
        ({"b": "fast"}, "t.b must be a number"),
        ({"flag": 1}, "t.flag must be true or false"),
        ({"mode": "z"}, "t.mode must be one of x, y"),
        ({"sizes": ["a"]}, "t.sizes must be a list of whole numbers"),
        ({"maybe": "x"}, "t.maybe must be a whole number or null"),
    ],
)
def test_wrong_types_name_the_key_and_the_expected_type(node, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        check_params(node, target, "t")


def test_unknown_keys_suggest_the_closest_one():
    with pytest.raises(ConfigError, match="did you mean t.mode"):
        check_params({"mdoe": "x"}, target, "t")


def test_lightning_trainer_arguments_are_typed_from_its_signature():
    import lightning

    with pytest.raises(ConfigError, match="trainer.max_epochs must be a whole number or null"):
        check_params({"max_epochs": "many"}, lightning.Trainer, "trainer")
    assert check_params({"devices": 2, "strategy": "ddp"}, lightning.Trainer, "trainer") == {
        "devices": 2,
        "strategy": "ddp",
    }


def test_optimizer_values_are_range_checked():
    with pytest.raises(ConfigError, match="optimizer.lr=-0.1 must be positive"):
        OptimizerConfig(lr=-0.1)


def test_default_configuration_plans_cleanly():
    p = plan(load_config())
    assert p.scenario["name"] == "split_digits" and p.plugins == [] and not p.joint


def test_the_record_names_stacked_strategies_as_the_python_api_does():
    names = {
        ("strategy=ewc", "+strategy@extra_strategies.si=si", "forgetting=on"): "ewc+si",
        ("strategy=ewc", "forgetting=on"): "ewc",
        ("strategy=naive",): "naive",
        ("strategy=joint",): "joint",
        ("strategy=cumulative",): "cumulative",
    }
    for overrides, expected in names.items():
        p = plan(load_config(list(overrides)))
        assert strategy_label(p.plugins, p.joint, p.cumulative) == expected, overrides


def _yaml_defaults(group: str):
    for path in sorted(Path(config_dir(), group).glob("*.yaml")):
        node = OmegaConf.load(path)
        yield (
            path.stem,
            {k: v for k, v in OmegaConf.to_container(node).items() if not str(v).startswith("${")},
        )


def _signature_defaults(fn):
    return {
        k: p.default
        for k, p in inspect.signature(fn).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


def _assert_agree(values, fn, where, also=None):
    defaults = {**(_signature_defaults(also) if also else {}), **_signature_defaults(fn)}
    for key, value in values.items():
        if key in ("name", "_target_"):
            continue
        expected = defaults[key]
        expected = list(expected) if isinstance(expected, tuple) else expected
        assert value == expected, (
            f"{where}: YAML says {key}={value!r}, Python default is {expected!r}"
        )


@pytest.mark.parametrize("group, registry", [("scenario", SCENARIOS), ("model", MODELS)])
def test_yaml_defaults_equal_python_defaults(group, registry):
    for stem, values in _yaml_defaults(group):
        assert values["name"] == stem, f"configs/{group}/{stem}.yaml must be named after its name"
        if group == "model" and stem == "mlp":
            values = {
                k: v for k, v in values.items() if k != "hidden"
            }  # the CLI default is a small net
        # a scenario's validation split is build_scenario's, for every builder alike
        also = build_scenario if group == "scenario" else None
        _assert_agree(values, registry[values["name"]], f"configs/{group}/{stem}.yaml", also)


def test_strategy_yaml_defaults_equal_plugin_defaults():
    for stem, values in _yaml_defaults("strategy"):
        assert values["name"] == stem
        if values.get("_target_") is not None:
            cls = plugin_class(values["_target_"], "strategy")
            _assert_agree(values, cls, f"configs/strategy/{stem}.yaml")


def test_the_python_api_defaults_are_the_cli_defaults():
    """`afmbench.run(scenario, model, plugins)` trains as `afmbench run` does (it used to take
    SGD without momentum and batches of 64, and learned nothing on the default scenario)."""
    import afmbench
    from afmbench.config import DataConfig

    cfg = load_config()
    assert (
        OptimizerConfig(**check_params(cfg.optimizer, OptimizerConfig, "optimizer", skip=()))
        == OptimizerConfig()
    )
    assert DataConfig(**check_params(cfg.data, DataConfig, "data", skip=())) == DataConfig()
    run_defaults = inspect.signature(afmbench.run).parameters
    assert run_defaults["batch_size"].default == DataConfig().batch_size
    assert run_defaults["eval_batch_size"].default == DataConfig().eval_batch_size


def test_load_config_mistakes_are_the_cli_s_one_line_errors():
    for overrides, expected in [
        (
            ["strategy=ewcc"],
            "unknown strategy 'ewcc'; fix: use one of agem, anpyc, cumulative, derpp, er, ewc, joint, lwf",
        ),
        (["optimizer.lrr=1"], "unknown option optimizer.lrr; fix: did you mean optimizer.lr?"),
    ]:
        with pytest.raises(ConfigError) as caught:
            load_config(overrides)
        assert expected in str(caught.value)
