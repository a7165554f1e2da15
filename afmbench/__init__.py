"""afmbench: continual-learning strategies and the active-forgetting layer, benchmarked.

The Python API in a few lines::

    import afmbench
    from afmbench.strategies import EWC

    scenario = afmbench.build_scenario("split_digits")
    afmbench.seed_everything(0)
    model = afmbench.build_model("mlp", scenario.input_shape, scenario.head_sizes)
    result = afmbench.run(scenario, model, [EWC(lambda_=100.0)], max_epochs=3)
    print(result.report())
"""

from __future__ import annotations

import warnings

# Avalanche imports qpsolvers, which warns on import about solvers afmbench never uses.
warnings.filterwarnings("ignore", message=".*no QP solver found.*")

# Public names, imported on first use: `import afmbench` stays cheap, so the CLI answers
# `--help`, `leaderboard` and configuration errors without loading torch and Lightning.
_EXPORTS = {
    "seed_everything": "lightning.pytorch",
    "DataConfig": "afmbench.config",
    "OptimizerConfig": "afmbench.config",
    "load_config": "afmbench.compose",
    "AfmbenchError": "afmbench.errors",
    "CheckpointError": "afmbench.errors",
    "ConfigError": "afmbench.errors",
    "DataNotFoundError": "afmbench.errors",
    "DivergenceError": "afmbench.errors",
    "RunResult": "afmbench.run_record",
    "run": "afmbench.api",
    "AccuracyMatrix": "afmbench.metrics",
    "summarize": "afmbench.metrics",
    "MODELS": "afmbench.models",
    "ContinualModel": "afmbench.models",
    "build_model": "afmbench.models",
    "ContinualModule": "afmbench.module",
    "ContinualPlugin": "afmbench.plugin",
    "SCENARIOS": "afmbench.scenarios",
    "Scenario": "afmbench.scenarios",
    "build_scenario": "afmbench.scenarios",
}


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'afmbench' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__version__ = "0.1.0"

__all__ = [  # noqa: F822  (resolved lazily by __getattr__)
    "AccuracyMatrix",
    "AfmbenchError",
    "CheckpointError",
    "ConfigError",
    "ContinualModel",
    "ContinualModule",
    "ContinualPlugin",
    "DataConfig",
    "DataNotFoundError",
    "DivergenceError",
    "MODELS",
    "OptimizerConfig",
    "RunResult",
    "SCENARIOS",
    "Scenario",
    "build_model",
    "build_scenario",
    "load_config",
    "run",
    "seed_everything",
    "summarize",
]
