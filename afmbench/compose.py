"""Composing the command line's configuration with Hydra, and explaining what Hydra refuses.

:func:`load_config` is what ``afmbench run`` composes, callable from Python; its failures and
those of override parsing become one :class:`ConfigError` line each (:func:`explain_hydra_error`)
instead of Hydra's multi-line reports.
"""

from __future__ import annotations

import difflib
import inspect
import itertools
from collections.abc import Iterator, Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from afmbench.config import CONFIG_NAME, config_dir
from afmbench.errors import ConfigError, first_line
from afmbench.trainers import OWN_TRAINER_OPTIONS


def load_config(
    overrides: Sequence[str] = (), config_dirs: Sequence[str | Path] = ()
) -> DictConfig:
    """Compose the CLI's configuration in Python, exactly as ``afmbench run`` would.

    ``config_dirs`` are the user's own config folders (``--config-dir``), searched after
    afmbench's for group options such as ``strategy/my_strategy.yaml``. An unknown group
    choice or key is the command line's one-line :class:`ConfigError`.
    """
    from hydra import compose, initialize_config_dir

    overrides = list(overrides)
    extra = [*overrides, searchpath_override(config_dirs)] if config_dirs else overrides
    try:
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            return compose(config_name=CONFIG_NAME, overrides=extra)
    except Exception as exc:  # Hydra's composition errors, explained once Hydra is closed
        raise explain_hydra_error(exc, overrides, config_dirs) from exc


def searchpath_override(config_dirs: Sequence[str | Path]) -> str:
    """The Hydra override that adds ``config_dirs`` to the config search path."""
    return "hydra.searchpath=[" + ",".join(f"file://{Path(d).resolve()}" for d in config_dirs) + "]"


def expand_sweeps(overrides: list[str], multirun: bool) -> Iterator[list[str]]:
    """Every combination of a sweep's values as a list of plain overrides."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except Exception as exc:
        raise explain_hydra_error(exc, overrides) from exc
    choices = []
    for override in parsed:
        if multirun and override.is_sweep_override():
            key = override.get_key_element()
            choices.append([f"{key}={value}" for value in override.sweep_string_iterator()])
        else:
            choices.append([override.input_line])
    for combination in itertools.product(*choices):
        yield list(combination)


def explain_hydra_error(
    exc: Exception, overrides: list[str], config_dirs: Sequence[str | Path] = ()
) -> ConfigError:
    """One line for what Hydra reports over several."""
    from hydra.errors import MissingConfigException

    missing = getattr(exc, "missing_cfg_file", None) or ""
    if isinstance(exc, MissingConfigException) and missing.startswith(
        ("hydra/launcher/", "hydra/sweeper/")
    ):
        kind, name = missing.split("/")[1:3]
        package = f"hydra-{name.split('_')[0]}-{kind}"
        return ConfigError(
            f"the Hydra {kind} '{name}' is not installed",
            f"pip install {package} (the {kind}s available now: {', '.join(exc.options or [])})",
        )
    if isinstance(exc, MissingConfigException) and "/" in missing:
        group, _, name = missing.partition("/")
        options = ", ".join(exc.options or [])
        own = (
            ""
            if config_dirs
            else f"; a {group} of your own: --config-dir DIR with DIR/{group}/<name>.yaml"
        )
        return ConfigError(f"unknown {group} '{name}'", f"use one of {options}{own}")
    message = first_line(exc)
    if message.startswith("Could not append to config. An item is already at '"):
        key = message.split("'")[1]
        return ConfigError(f"{key} already exists", f"set it without the +: {key}=...")
    if message.startswith("Could not override '"):
        key = message.split("'")[1]
        return ConfigError(f"unknown option {key}", _suggest_key(key, overrides, config_dirs))
    return ConfigError(f"cannot parse overrides {' '.join(overrides)}: {message}",
                       "write overrides as key=value, e.g. trainer.max_epochs=1")  # fmt: skip


def _suggest_key(key: str, overrides: list[str], config_dirs: Sequence[str | Path]) -> str:
    """The closest existing key, in the config the user's group choices compose."""
    parent, _, leaf = key.rpartition(".")
    if parent == "trainer" and leaf in OWN_TRAINER_OPTIONS:
        return f"{key} is afmbench's to set: {OWN_TRAINER_OPTIONS[leaf]}"
    if parent == "trainer" and _is_trainer_option(leaf):
        return f"{leaf} is a Lightning Trainer option outside afmbench's defaults: add it with +{key}=..."
    groups = [
        o
        for o in overrides
        if "=" in o
        and not o.startswith("+")
        and ("." not in o.split("=")[0] or o.startswith("hydra.searchpath="))
    ]
    try:
        cfg = load_config(groups, config_dirs)
    except Exception:  # another problem in the group choices: fall back to the defaults
        cfg = load_config()
    node = OmegaConf.select(cfg, parent) if parent else cfg
    keys = list(node.keys()) if hasattr(node, "keys") else []
    if leaf not in keys and (holders := _options_having(parent, leaf)):
        choices = ", ".join(f"{parent}={h}" for h in holders)
        if len(holders) == 1:
            return f"add {choices} ({key} is one of its options)"
        return f"add one of {choices} ({key} is one of their options)"
    close = difflib.get_close_matches(leaf, [str(k) for k in keys], n=1)
    if close:
        return f"did you mean {parent + '.' if parent else ''}{close[0]}?"
    return (
        f"to add a new key use +{key}=..."
        if not keys
        else f"valid keys: {', '.join(map(str, keys))}"
    )


def _is_trainer_option(name: str) -> bool:
    import lightning

    return name in inspect.signature(lightning.Trainer).parameters


def _options_having(group: str, key: str) -> list[str]:
    """The options of config group ``group`` (``configs/<group>/*.yaml``) that set ``key``: a
    strategy's or the forgetting layer's key given without choosing them."""
    folder = Path(config_dir()) / group
    if not group or "." in group or not folder.is_dir():
        return []
    return sorted(p.stem for p in folder.glob("*.yaml") if key in OmegaConf.load(p))
