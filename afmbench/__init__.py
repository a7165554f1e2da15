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

from lightning.pytorch import seed_everything  # noqa: E402

from afmbench.config import DataConfig, OptimizerConfig, load_config  # noqa: E402
from afmbench.errors import (  # noqa: E402
    AfmbenchError,
    CheckpointError,
    ConfigError,
    DataNotFoundError,
    DivergenceError,
)
from afmbench.experiment import RunResult, run  # noqa: E402
from afmbench.metrics import AccuracyMatrix, summarize  # noqa: E402
from afmbench.models import MODELS, ContinualModel, build_model  # noqa: E402
from afmbench.module import ContinualModule  # noqa: E402
from afmbench.plugin import ContinualPlugin  # noqa: E402
from afmbench.scenarios import SCENARIOS, Scenario, build_scenario  # noqa: E402

__version__ = "0.1.0"

__all__ = [
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
