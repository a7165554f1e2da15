"""From a composed configuration to a finished run: the command line's path into
:func:`afmbench.api.start`.

:func:`plan` checks the whole configuration and builds every object that needs no data
(plugins, optimizer and trainer settings), so a bad value fails in a second, before data is
touched. :func:`execute` then builds the scenario and the model and runs. A strategy's YAML
names the class it builds (``_target_``); no registry lists them.
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning
import torch
from lightning.pytorch import seed_everything
from omegaconf import DictConfig, OmegaConf

from afmbench import probes
from afmbench.api import check_plugin_names, start
from afmbench.checkpoint import load_model_weights
from afmbench.config import DataConfig, OptimizerConfig, check_params, require, to_plain
from afmbench.errors import ConfigError
from afmbench.leaderboard import check_db, default_db
from afmbench.loggers import make_logger, requested_wandb_mode
from afmbench.loop import LoopSettings
from afmbench.models import MODELS, build_model
from afmbench.plugin import ContinualPlugin
from afmbench.resume import find_checkpoint
from afmbench.run_record import RunResult
from afmbench.scenarios import build_scenario, scenario_builder
from afmbench.scenarios.base import Scenario, Split, check_validation
from afmbench.scenarios.cache import check_only
from afmbench.trainers import check_loop_options, check_trainer_options

TOP_LEVEL_KEYS = {
    "scenario", "model", "strategy", "forgetting", "trainer", "logger", "seed", "run_dir",
    "resume", "optimizer", "data", "checkpoint", "extra_strategies", "leaderboard", "figures",
    "hydra",
}  # fmt: skip


@dataclass
class Plan:
    """Everything a run needs except the data and the model's weights."""

    scenario: dict[str, Any]
    model: dict[str, Any]
    plugins: list[ContinualPlugin]
    joint: bool
    cumulative: bool
    optimizer: OptimizerConfig
    data: DataConfig
    trainer: dict[str, Any]
    seed: int
    logger: dict[str, Any]
    keep_checkpoints: bool
    figures: bool
    resume: bool | str
    leaderboard: Path | None
    config: dict[str, Any]


def plan(cfg: DictConfig) -> Plan:
    """Check ``cfg`` and build the data-free parts of the run; raises :class:`ConfigError`."""
    unknown = set(cfg.keys()) - TOP_LEVEL_KEYS
    require(not unknown, f"unknown top-level option(s) {', '.join(sorted(unknown))}",
            f"valid keys: {', '.join(sorted(TOP_LEVEL_KEYS - {'hydra'}))}")  # fmt: skip
    seed = cfg.seed
    require(isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0,
            f"seed must be a non-negative whole number, got {seed!r}", "e.g. seed=0")  # fmt: skip
    require(isinstance(cfg.resume, (bool, str)),
            f"resume must be true, false or a path, got {cfg.resume!r}", "e.g. resume=true")  # fmt: skip
    figures = cfg.get("figures", False)
    require(isinstance(figures, bool),
            f"figures must be true or false, got {figures!r}", "e.g. figures=true")  # fmt: skip

    scenario_name = str(cfg.scenario.name)
    scenario = check_params(
        cfg.scenario, scenario_builder(scenario_name), "scenario", skip=("name", "validation")
    )
    with check_only():
        scenario_builder(scenario_name)(**scenario)
    validation = check_validation(cfg.scenario.get("validation", 0.0))
    model_name = str(cfg.model.name)
    if model_name not in MODELS:
        raise ConfigError(f"unknown model '{model_name}'", f"use one of {', '.join(MODELS)}")
    model = check_params(cfg.model, MODELS[model_name], "model",
                         skip=("name", "input_shape", "head_sizes"))  # fmt: skip

    strategy_name = str(cfg.strategy.name)
    plugins = []
    main = build_plugin(cfg.strategy, "strategy")
    if main is not None:
        plugins.append(main)
    for name, node in (cfg.get("extra_strategies") or {}).items():
        extra = build_plugin(node, f"extra_strategies.{name}")
        if extra is not None:
            plugins.append(extra)
    forgetting = build_forgetting(cfg.forgetting)
    if forgetting is not None:
        plugins.append(forgetting)
    check_plugin_names(plugins)

    optimizer = OptimizerConfig(
        **check_params(cfg.optimizer, OptimizerConfig, "optimizer", skip=())
    )
    data = DataConfig(**check_params(cfg.data, DataConfig, "data", skip=()))
    trainer = check_params(cfg.trainer, lightning.Trainer, "trainer", skip=())
    check_loop_options(trainer.get("max_epochs", 1), data.batch_size, data.eval_batch_size, trainer)
    logger = to_plain(cfg.logger)
    if logger.get("name") == "wandb":
        requested_wandb_mode(logger.get("mode"))  # an unknown mode fails here, not mid-run
    leaderboard = (
        (Path(cfg.leaderboard.db) if cfg.leaderboard.db else default_db())
        if cfg.leaderboard.record
        else None
    )
    if leaderboard is not None:
        check_db(leaderboard)  # a sweep learns it before its first job, not after each one
    return Plan(
        scenario={"name": scenario_name, **scenario, "validation": validation},
        model={"name": model_name, **model},
        plugins=plugins,
        joint=strategy_name == "joint",
        cumulative=strategy_name == "cumulative",
        optimizer=optimizer,
        data=data,
        trainer=trainer,
        seed=seed,
        logger=logger,
        keep_checkpoints=bool(cfg.checkpoint.keep_all),
        figures=figures,
        resume=cfg.resume,
        leaderboard=leaderboard,
        config=to_plain(cfg),
    )


def build_plugin(node: DictConfig, where: str) -> ContinualPlugin | None:
    """The plugin that ``node``'s ``_target_`` names, built from the node's other keys (None
    for a strategy without one: naive, joint and cumulative)."""
    target = node.get("_target_")
    if target is None:
        check_params(node, lambda: None, where, skip=("name", "_target_"))
        return None
    cls = plugin_class(str(target), where)
    return cls(**check_params(node, cls, where, skip=("name", "_target_")))


def plugin_class(target: str, where: str) -> type[ContinualPlugin]:
    """The class a ``_target_`` names (``package.module.Class``), importable from the current
    folder too, as a user's own strategy module usually is."""
    module_name, _, class_name = target.rpartition(".")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError) as exc:
        raise ConfigError(
            f"{where}._target_={target} cannot be imported ({type(exc).__name__}: {exc})",
            "name a class as package.module.Class, in a module importable from the current "
            "folder or PYTHONPATH",
        ) from None
    if not (isinstance(cls, type) and issubclass(cls, ContinualPlugin)):
        raise ConfigError(
            f"{where}._target_={target} is not a ContinualPlugin subclass",
            "subclass afmbench.ContinualPlugin (see afmbench/plugin.py)",
        )
    return cls


def build_forgetting(node: DictConfig) -> ContinualPlugin | None:
    """The forgetting-layer callback when ``forgetting.enabled`` is true."""
    if not node.get("enabled", False):
        return None
    from afmbench.forgetting import ForgettingLayerCallback

    return ForgettingLayerCallback(
        **check_params(node, ForgettingLayerCallback, "forgetting", skip=("enabled",))
    )


def execute(cfg: DictConfig, run_dir: str | Path, group: str | None = None) -> RunResult:
    """Run the configuration end to end, writing the run folder ``run_dir``.

    ``group`` names the W&B group when the config leaves it open (a sweep's runs share one).
    """
    p = plan(cfg)
    check_trainer_options(p.trainer)  # on the machine the job runs on
    seed_everything(p.seed, verbose=False)
    scenario = build_scenario(**p.scenario, root=p.data.root, cache=p.data.cache)
    seed_everything(p.seed, verbose=False)
    model = build_model(p.model.pop("name"), scenario.input_shape, scenario.head_sizes, **p.model)
    settings = LoopSettings(
        p.joint, p.cumulative, p.data.batch_size, p.data.eval_batch_size, p.seed, p.trainer,
        verbose=True,
        augment=p.data.augment, resident=p.data.resident, pass_memory_mb=p.data.pass_memory_mb,
        pass_precision=p.data.pass_precision,
    )  # fmt: skip
    return start(
        scenario, model, p.plugins, settings, p.optimizer, run_dir,
        lambda folder: make_logger(p.logger, folder, group),
        resume=p.resume, leaderboard=p.leaderboard, keep_checkpoints=p.keep_checkpoints,
        figures=p.figures, config=p.config,
    )  # fmt: skip


def load_run(
    run_dir: str | Path, max_samples: int | None = 10_000, seed: int = 0
) -> probes.Subject:
    """The model of a finished (or interrupted) run at its latest checkpoint, with test data of
    the experiences trained so far and their training data (for importance), each subsampled
    to ``max_samples``."""
    folder = Path(run_dir)
    config = folder / "config.yaml"
    if not config.is_file():
        raise ConfigError(
            f"{folder} has no config.yaml", "pass the folder of a run made by `afmbench run`"
        )
    checkpoint = find_checkpoint(
        True, folder, "probe a run that finished at least one experience (its weights are there)"
    )
    p = plan(OmegaConf.load(config))
    scenario = build_scenario(**p.scenario, root=p.data.root, cache=p.data.cache)
    model = build_model(p.model.pop("name"), scenario.input_shape, scenario.head_sizes, **p.model)
    for plugin in p.plugins:  # the run's structure: the forgetting layer's gates, if it had them
        plugin.prepare(model)
    step = load_model_weights(model, checkpoint)["step"]
    seen = scenario.n_experiences if p.joint else step + 1
    return probes.Subject(
        model,
        test=probes.subset(_concat(scenario, "test", seen), max_samples, seed),
        train=probes.subset(_concat(scenario, "train", seen), max_samples, seed),
    )


def _concat(scenario: Scenario, which: str, n: int) -> Split:
    parts = [getattr(scenario, which)(e) for e in range(n)]
    return tuple(torch.cat(column) for column in zip(*parts))
