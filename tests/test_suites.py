"""The published-protocol suites: every arm of every suite's sweep composes into the run it
names, at the protocol the suite states."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from afmbench.compose import load_config
from afmbench.config import config_dir
from afmbench.runner import plan

SUITES = sorted(
    path.stem
    for path in Path(config_dir(), "experiment").glob("*.yaml")
    if (Path(config_dir(), "arm") / path.stem).is_dir()
)


def _arms(suite: str) -> list[str]:
    sweep = OmegaConf.load(Path(config_dir(), "experiment", f"{suite}.yaml")).hydra.sweeper
    return str(sweep.params.arm).split(",")


@pytest.mark.parametrize("suite", SUITES)
def test_the_sweep_lists_every_arm_of_its_suite_once(suite):
    files = sorted(f"{suite}/{p.stem}" for p in Path(config_dir(), "arm", suite).glob("*.yaml"))
    assert sorted(_arms(suite)) == files


@pytest.mark.parametrize("suite", SUITES)
def test_every_arm_is_its_method_with_one_adam_for_the_whole_run(suite):
    for arm in _arms(suite):
        cfg = load_config([f"experiment={suite}", f"arm={arm}"])
        p = plan(cfg)
        method = (
            arm.split("/", 1)[1].split("_", 1)[-1] if "vandeven" in suite else arm.split("/")[1]
        )
        expected = {"none": "naive", "adam": "naive", "sgd": "naive", "offline": "joint",
                    "online_ewc": "ewc"}.get(method, method)  # fmt: skip
        assert str(cfg.strategy.name) == expected, arm
        assert p.optimizer.reset_between_experiences is False, arm  # as the authors' code
        assert p.optimizer.name == ("sgd" if method == "sgd" else "adam"), arm
        assert cfg.resume == "auto" and p.data.batch_size == 128, arm
        if method == "online_ewc":
            assert cfg.strategy.mode == "online", arm


def test_hsu2018_strengths_are_the_authors_converted():
    def strategy(arm):
        return load_config(["experiment=hsu2018_split_mnist_task", f"arm={arm}"]).strategy

    # no 1/2 in their EWC penalty: twice their reg_coef 100 (separate) and 400 (online)
    assert strategy("hsu2018_split_mnist_task/ewc").lambda_ == 200.0
    assert strategy("hsu2018_split_mnist_task/online_ewc").lambda_ == 800.0
    assert strategy("hsu2018_split_mnist_task/si").c == 300.0
    cfg = load_config(["experiment=hsu2018_split_mnist_task"])
    assert cfg.trainer.max_epochs == 4 and list(cfg.model.hidden) == [400, 400]


def test_vandeven2019_counts_iterations_per_task():
    cfg = load_config(["experiment=vandeven2019_split_mnist"])
    assert cfg.trainer.max_epochs == -1 and cfg.trainer.max_steps == 2000
    permuted = load_config(["experiment=vandeven2019_permuted_mnist"])
    assert permuted.trainer.max_steps == 5000 and permuted.optimizer.lr == 0.0001
    protocols = {
        str(load_config(["experiment=vandeven2019_split_mnist", f"arm={arm}"]).scenario.protocol)
        for arm in _arms("vandeven2019_split_mnist")
    }
    assert protocols == {"task", "domain", "class"}
