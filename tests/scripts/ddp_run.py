"""Run a small continual sequence through the Python API, possibly under DDP, and save what
each rank ends with (parameters, plugin importances, the accuracy matrix) for comparison.

Usage: python ddp_run.py OUT_DIR DEVICES BATCH_SIZE STRATEGY [forgetting]
Lightning's DDP launcher re-runs this script once per extra rank.
"""

import sys
from pathlib import Path

import torch

import afmbench
from afmbench.strategies import STRATEGIES

out, devices, batch_size, strategy = (
    Path(sys.argv[1]),
    int(sys.argv[2]),
    int(sys.argv[3]),
    sys.argv[4],
)
with_forgetting = len(sys.argv) > 5 and sys.argv[5] == "forgetting"

scenario = afmbench.build_scenario("permuted_digits", n_experiences=3, seed=0)
afmbench.seed_everything(0)
model = afmbench.build_model("mlp", scenario.input_shape, scenario.head_sizes, hidden=[32, 32])
plugins = []
if STRATEGIES.get(strategy) is not None:
    plugins.append(STRATEGIES[strategy]())
if with_forgetting:
    from afmbench.forgetting import ForgettingLayerCallback

    plugins.append(ForgettingLayerCallback())
trainer = {"accelerator": "cpu", "devices": devices}
if devices > 1:
    trainer["strategy"] = "ddp"
result = afmbench.run(
    scenario, model, plugins, max_epochs=2, batch_size=batch_size, seed=0,
    optimizer=afmbench.OptimizerConfig(lr=0.05, momentum=0.9), trainer_kwargs=trainer, verbose=False,
)  # fmt: skip
rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
out.mkdir(parents=True, exist_ok=True)
torch.save(
    {
        "params": {k: v.detach().cpu() for k, v in result.module.model.state_dict().items()},
        "importance": {
            p.name: {k: v.detach().cpu() for k, v in p.importance().items()} for p in plugins
        },
        "matrix": result.accuracy_matrix,
        "acc": result.metrics["acc"],
    },
    out / f"rank{rank}.pt",
)
