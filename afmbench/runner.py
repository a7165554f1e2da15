"""From a composed configuration to a finished run: the CLI's path into :func:`experiment.run`.

:func:`plan` checks the whole configuration and builds every object that needs no data
(plugins, optimizer and trainer settings), so a bad value fails in a second, before data is
touched. :func:`execute` then builds the scenario and the model and runs.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning
from lightning.pytorch import seed_everything
from omegaconf import DictConfig

from afmbench.checkpoint import check_same_config, find_checkpoint, load_checkpoint, run_folder_of
from afmbench.config import (
    DataConfig,
    OptimizerConfig,
    check_params,
    config_hash,
    identity_differences,
    require,
    save_config,
    to_plain,
)
from afmbench.errors import ConfigError
from afmbench.experiment import (
    RunResult,
    check_loop_options,
    check_trainer_options,
    run,
    strategy_label,
)
from afmbench.leaderboard import check_db, default_db
from afmbench.loggers import make_logger, requested_wandb_mode
from afmbench.models import MODELS, build_model
from afmbench.plugin import ContinualPlugin
from afmbench.results import check_new_run_dir, prepare_run_dir
from afmbench.scenarios import build_scenario, scenario_builder
from afmbench.scenarios.cache import check_only
from afmbench.strategies import strategy_class

TOP_LEVEL_KEYS = {
    "scenario", "model", "strategy", "forgetting", "trainer", "logger", "seed", "run_dir",
    "resume", "optimizer", "data", "checkpoint", "extra_strategies", "leaderboard", "hydra",
}  # fmt: skip


@dataclass
class Plan:
    """Everything a run needs except the data and the model's weights."""

    scenario: dict[str, Any]
    model: dict[str, Any]
    plugins: list[ContinualPlugin]
    joint: bool
    optimizer: OptimizerConfig
    data: DataConfig
    trainer: dict[str, Any]
    seed: int
    logger: dict[str, Any]
    keep_checkpoints: bool
    resume: bool | str
    leaderboard: Path | None
    record: dict[str, Any] = field(default_factory=dict)


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

    scenario_name = str(cfg.scenario.name)
    scenario = check_params(
        cfg.scenario, scenario_builder(scenario_name), "scenario", skip=("name",)
    )
    with check_only():
        scenario_builder(scenario_name)(**scenario)
    model_name = str(cfg.model.name)
    if model_name not in MODELS:
        raise ConfigError(f"unknown model '{model_name}'", f"use one of {', '.join(MODELS)}")
    model = check_params(cfg.model, MODELS[model_name], "model",
                         skip=("name", "input_shape", "head_sizes"))  # fmt: skip

    strategy_name = str(cfg.strategy.name)
    plugins = []
    main = build_plugin(strategy_name, cfg.strategy, "strategy")
    if main is not None:
        plugins.append(main)
    for name, node in (cfg.get("extra_strategies") or {}).items():
        extra = build_plugin(str(node.get("name", name)), node, f"extra_strategies.{name}")
        if extra is not None:
            plugins.append(extra)
    forgetting = build_forgetting(cfg.forgetting)
    if forgetting is not None:
        plugins.append(forgetting)

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
    record = {
        "scenario": scenario_name,
        "protocol": scenario.get("protocol", _default(scenario_builder(scenario_name), "protocol")),
        "strategy": strategy_label(plugins, strategy_name == "joint"),  # as a Python run's
        "forgetting_layer": forgetting is not None,
        "seed": seed,
        "model": model_name,
        "config_hash": config_hash(cfg),
        "config": to_plain(cfg),
    }
    return Plan(
        scenario={"name": scenario_name, **scenario},
        model={"name": model_name, **model},
        plugins=plugins,
        joint=strategy_name == "joint",
        optimizer=optimizer,
        data=data,
        trainer=trainer,
        seed=seed,
        logger=logger,
        keep_checkpoints=bool(cfg.checkpoint.keep_all),
        resume=cfg.resume,
        leaderboard=leaderboard,
        record=record,
    )


def build_plugin(name: str, node: DictConfig, where: str) -> ContinualPlugin | None:
    """The strategy plugin ``name`` configured from ``node`` (None for naive and joint)."""
    cls = strategy_class(name)
    if cls is None:
        check_params(node, lambda: None, where, skip=("name",))
        return None
    return cls(**check_params(node, cls, where, skip=("name",)))


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
    check_trainer_options(p.trainer)
    if not p.resume:
        check_new_run_dir(run_dir)
    folder = prepare_run_dir(run_dir)
    if p.resume:  # check before anything in the interrupted run's folder is overwritten
        checkpoint = find_checkpoint(p.resume, folder)
        state = load_checkpoint(checkpoint, mmap=True)["afmbench"]  # the run loads it in full
        changes = changes_since(run_folder_of(checkpoint), cfg)
        check_same_config(state, checkpoint, p.record["config_hash"], changes)
    save_config(cfg, folder / "config.yaml")
    seed_everything(p.seed, verbose=False)
    scenario = build_scenario(**p.scenario, root=p.data.root, cache=p.data.cache)
    seed_everything(p.seed, verbose=False)
    model = build_model(p.model.pop("name"), scenario.input_shape, scenario.head_sizes, **p.model)
    return run(
        scenario,
        model,
        p.plugins,
        joint=p.joint,
        max_epochs=p.trainer.pop("max_epochs", 1),
        batch_size=p.data.batch_size,
        eval_batch_size=p.data.eval_batch_size,
        optimizer=p.optimizer,
        seed=p.seed,
        run_dir=folder,
        trainer_kwargs=p.trainer,
        logger=make_logger(p.logger, folder, group),
        record=p.record,
        keep_checkpoints=p.keep_checkpoints,
        resume=p.resume,
        leaderboard=p.leaderboard,
    )


def changes_since(folder: Path, cfg: DictConfig) -> list[tuple[str, Any, Any]]:
    """What ``cfg`` changes in the identity of the run recorded in ``folder/config.yaml``
    (nothing known if the file is gone)."""
    saved = folder / "config.yaml"
    if not saved.is_file():
        return []
    from omegaconf import OmegaConf

    return identity_differences(OmegaConf.load(saved), cfg)


def _default(fn, key: str) -> Any:
    return inspect.signature(fn).parameters[key].default
