"""Loading and checking configurations.

The YAML files under ``configs/`` hold the CLI's defaults; the Python signatures of the
builders, plugins and Lightning's ``Trainer`` hold the types. :func:`check_params` checks a
config node against a signature, so a typo or a wrong type is one clear line before anything
runs, and no schema is written twice.
"""

from __future__ import annotations

import bisect
import collections.abc
import copy
import difflib
import functools
import inspect
import numbers
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from importlib.resources import files
from pathlib import Path
from typing import Any, Literal

from omegaconf import DictConfig, ListConfig, OmegaConf

from afmbench.errors import ConfigError

CONFIG_NAME = "config"

# Keys that do not change what a run computes: a resume may change them (the run's identity,
# afmbench.identity, leaves them out too).
NON_IDENTITY_KEYS = (
    "hydra",
    "run_dir",
    "logger",
    "resume",
    "seed",
    "scenario.seed",
    "checkpoint",
    "leaderboard",
    "probe",
    "data.root",
    "data.cache",
    "data.eval_batch_size",
    "data.resident",
    "data.pass_memory_mb",
    "trainer.enable_progress_bar",
    "trainer.accelerator",
    "trainer.strategy",
    "trainer.log_every_n_steps",
    "trainer.enable_model_summary",
)


def config_dir() -> str:
    """Absolute path of the packaged ``configs/`` folder (Hydra's config search path)."""
    return str(files("afmbench.configs"))


@dataclass(frozen=True)
class OptimizerConfig:
    """What trains the model within each experience.

    ``reset_between_experiences`` rebuilds the optimizer (dropping momentum / Adam moments)
    at the start of every experience. ``lr_milestones`` multiplies the learning rate by
    ``lr_gamma`` from each of those epochs of every experience on (counted from 0), as
    ``torch.optim``'s ``MultiStepLR`` stepped once an epoch from the experience's start.
    """

    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    reset_between_experiences: bool = True
    lr_milestones: tuple[int, ...] = ()
    lr_gamma: float = 0.1

    def __post_init__(self) -> None:
        coerce_fields(self, "optimizer")
        require(self.lr > 0, f"optimizer.lr={self.lr} must be positive", "e.g. optimizer.lr=0.01")
        require(self.momentum >= 0, f"optimizer.momentum={self.momentum} must be >= 0", "e.g. 0.9")
        require(
            self.weight_decay >= 0,
            f"optimizer.weight_decay={self.weight_decay} must be >= 0",
            "e.g. 0",
        )
        steps = self.lr_milestones
        require(
            all(m > 0 for m in steps) and list(steps) == sorted(set(steps)),
            f"optimizer.lr_milestones={list(steps)} must be increasing positive epochs",
            "e.g. optimizer.lr_milestones=[35,45]",
        )
        require(
            0 < self.lr_gamma <= 1,
            f"optimizer.lr_gamma={self.lr_gamma} must be in (0, 1]",
            "e.g. optimizer.lr_gamma=0.1",
        )

    def lr_at(self, epoch: int) -> float:
        """The learning rate of an experience's ``epoch`` (counted from 0)."""
        return self.lr * self.lr_gamma ** bisect.bisect_right(self.lr_milestones, epoch)


@dataclass(frozen=True)
class DataConfig:
    """Where data comes from and how it is batched."""

    root: str | None = None
    cache: str | None = None
    batch_size: int = 32
    eval_batch_size: int = 1024
    augment: str | None = None  # crop_flip: training batches only
    resident: bool | None = None  # data on the device once; null: on CUDA devices
    pass_memory_mb: float = 256.0  # working memory of per-sample importance passes
    pass_precision: str = "32-true"  # importance passes: 32-true | bf16-mixed

    def __post_init__(self) -> None:
        coerce_fields(self, "data")  # sizes are checked with the loop's (check_loop_options)


def coerce_fields(config: Any, where: str) -> None:
    """Convert a frozen config dataclass's fields to their type hints in place, or raise the
    command line's one-line error: ``OptimizerConfig(lr="big")`` is a :class:`ConfigError`,
    ``lr=1`` becomes ``1.0`` (so equal settings hash equally)."""
    hints = typing.get_type_hints(type(config))
    for f in fields(config):
        value = coerce(getattr(config, f.name), hints[f.name], f"{where}.{f.name}", f.default)
        object.__setattr__(config, f.name, value)


def require(condition: bool, problem: str, fix: str) -> None:
    """Raise a :class:`ConfigError` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(problem, fix)


def to_plain(node: Any) -> Any:
    """A resolved OmegaConf node as plain Python containers."""
    if isinstance(node, (DictConfig, ListConfig)):
        return OmegaConf.to_container(node, resolve=True)
    return node


def check_params(
    node: Mapping[str, Any] | DictConfig,
    target: Callable[..., Any],
    where: str,
    skip: Sequence[str] = ("name",),
) -> dict[str, Any]:
    """Check ``node`` against ``target``'s signature; return the keyword arguments to call it with.

    Unknown keys and values of the wrong type raise :class:`ConfigError` naming the key, what
    it expects and an example; the example is the parameter's own default where there is one.
    """
    signature = inspect.signature(target)
    try:  # a class's parameters are those of its __init__ (dataclasses included)
        hints = typing.get_type_hints(target.__init__ if inspect.isclass(target) else target)
    except Exception:  # unresolvable annotations: check names only
        hints = {}
    accepted = [
        name
        for name, p in signature.parameters.items()
        if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and name not in ("self",)
    ]
    kwargs: dict[str, Any] = {}
    for key, value in to_plain(node).items():
        if key in skip:
            continue
        if key not in accepted:
            close = difflib.get_close_matches(key, accepted, n=1)
            hint = (
                f"did you mean {where}.{close[0]}?"
                if close
                else f"valid keys: {', '.join(accepted)}"
            )
            raise ConfigError(f"unknown option {where}.{key}", hint)
        default = signature.parameters[key].default
        kwargs[key] = coerce(value, hints.get(key, Any), f"{where}.{key}", default)
    return kwargs


def typed_arguments(
    fn: Callable[..., Any], where: str, remember: str | None = None
) -> Callable[..., Any]:
    """``fn`` with its named arguments coerced to their type hints first, so that a call from
    Python gets the command line's one-line errors (``where.key must be a number, ...``).

    With ``remember``, a method records its coerced arguments (defaults filled in) on its
    object under that attribute name, once: the outermost constructor of a class chain wins.
    """
    signature = inspect.signature(fn)
    named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    hints: dict[str, Any] | None = None

    @functools.wraps(fn)
    def checked(*args: Any, **kwargs: Any) -> Any:
        nonlocal hints
        if hints is None:  # resolved on first use: names a module defines later are known then
            try:
                hints = typing.get_type_hints(fn)
            except Exception:  # unresolvable annotations: leave the values as given
                hints = {}
        bound = signature.bind(*args, **kwargs)
        for name, value in bound.arguments.items():
            parameter = signature.parameters[name]
            if name in hints and parameter.kind in named:
                bound.arguments[name] = coerce(
                    value, hints[name], f"{where}.{name}", parameter.default
                )
        if remember is not None and args and remember not in vars(args[0]):
            full = copy.copy(bound)
            full.apply_defaults()
            given = dict(full.arguments)
            given.pop(next(iter(signature.parameters)))  # self
            vars(args[0])[remember] = given
        return fn(*bound.args, **bound.kwargs)

    return checked


def coerce(value: Any, annotation: Any, key: str, default: Any = inspect.Parameter.empty) -> Any:
    """Return ``value`` converted to ``annotation`` or raise a one-line :class:`ConfigError`."""
    try:
        return _coerce(value, annotation)
    except (TypeError, ValueError):
        pass
    example = (
        "" if default in (inspect.Parameter.empty, None) else f"e.g. {key}={as_override(default)}"
    )
    raise ConfigError(
        f"{key} must be {describe(annotation)}, got {value!r} ({type(value).__name__})",
        example or f"pass {describe(annotation)}",
    )


def _coerce(value: Any, annotation: Any) -> Any:
    if annotation in (Any, inspect.Parameter.empty):
        return value
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        for option in sorted(args, key=lambda a: a is str):  # try str last: it accepts anything
            try:
                return _coerce(value, option)
            except (TypeError, ValueError):
                continue
        raise TypeError
    if origin is Literal:
        if value in args and any(type(value) is type(a) for a in args if a == value):
            return value
        raise ValueError
    if annotation is type(None):
        if value is None:
            return None
        raise TypeError
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise TypeError
    if annotation is int:  # numpy's integers included
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            return int(value)
        raise TypeError
    if annotation is float:
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            return float(value)
        raise TypeError
    if annotation is str:
        if isinstance(value, str):
            return value
        raise TypeError
    if origin in (list, tuple, collections.abc.Sequence) or annotation in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise TypeError
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ValueError
            return tuple(_coerce(v, a) for v, a in zip(value, args))
        inner = args[0] if args else Any
        converted = [_coerce(v, inner) for v in value]
        return tuple(converted) if origin is tuple else converted
    if origin is dict or annotation is dict:
        if isinstance(value, dict):
            return value
        raise TypeError
    return value  # classes such as a Lightning Strategy object: accept as given


def describe(annotation: Any) -> str:
    """Human wording of a type annotation ("a whole number", "one of 'sgd', 'adam'", ...)."""
    names = {int: "a whole number", float: "a number", bool: "true or false", str: "a string"}
    if annotation in names:
        return names[annotation]
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return "one of " + ", ".join(map(as_override, args))
    if origin in (typing.Union, types.UnionType):
        parts = [describe(a) for a in args if a is not type(None)]
        text = " or ".join(dict.fromkeys(parts))
        return text + (" or null" if type(None) in args else "")
    if origin in (list, tuple, collections.abc.Sequence):
        plural = {int: "whole numbers", float: "numbers", bool: "booleans", str: "strings"}
        return f"a list of {plural.get(args[0], describe(args[0]))}" if args else "a list"
    return getattr(annotation, "__name__", str(annotation))


def as_override(value: Any) -> str:
    """``value`` as a command-line override writes it (``true``, ``null``, ``[256,256]``)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(as_override(v) for v in value) + "]"
    return str(value)


def _identity(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """The configuration without the keys that do not change what a run computes."""
    plain = copy.deepcopy(to_plain(cfg))
    for dotted in NON_IDENTITY_KEYS:
        *parents, leaf = dotted.split(".")
        node = plain
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return plain


def identity_differences(
    before: DictConfig | Mapping[str, Any], now: DictConfig | Mapping[str, Any]
) -> list[tuple[str, Any, Any]]:
    """``(dotted key, value before, value now)`` wherever the two identities differ."""
    old, new = _flat(_identity(before)), _flat(_identity(now))
    keys = sorted(old.keys() | new.keys())
    return [(k, old.get(k), new.get(k)) for k in keys if old.get(k) != new.get(k)]


def explain_differences(
    differences: Sequence[tuple[str, Any, Any]], shown: int = 4
) -> tuple[str, str]:
    """What changed, as words, and the overrides that bring the earlier values back. A group
    whose choice changed (``strategy.name``, ``forgetting.enabled``) is named once, with the
    options that came with it left out."""
    choices = {k.rpartition(".")[0] for k, _, _ in differences if k.endswith((".name", ".enabled"))}
    changed, restore = [], []
    for key, then, now in differences:
        group, _, leaf = key.rpartition(".")
        if group in choices and leaf not in ("name", "enabled"):
            continue  # the options of a group choice come with it
        if leaf == "name":
            changed.append(f"{group} was {then}, now {now}")
            restore.append(f"{group}={then}")
            continue
        changed.append(f"{key} was {as_override(then)}, now {as_override(now)}")
        if leaf == "enabled":
            restore += [f"{group}=off"] if then is False else []
        else:
            restore.append(f"{key}={as_override(then)}")
    more = f" and {len(changed) - shown} more" if len(changed) > shown else ""
    return "; ".join(changed[:shown]) + more, " ".join(restore)


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(node, dict) or not node:
        return {prefix: node}
    flat: dict[str, Any] = {}
    for key, value in node.items():
        flat.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def save_config(cfg: DictConfig, path: Path) -> None:
    """Write the fully resolved configuration as YAML."""
    path.write_text(OmegaConf.to_yaml(cfg, resolve=True))
