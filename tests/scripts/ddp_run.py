"""Run small continual sequences through the Python API, possibly under DDP, and save what each
rank ends with (parameters, plugin importances, the accuracy matrix) for comparison.

Usage: python ddp_run.py OUT_DIR DEVICES BATCH_SIZE CONFIG [CONFIG ...]
CONFIG is a strategy name, optionally with "+fl" for the forgetting layer (e.g. "ewc+fl").
Lightning's DDP launcher re-runs this script once per extra rank; every rank runs the same
configurations in the same order, so one process group serves them all.
"""

import sys
from pathlib import Path

import torch

import afmbench
from afmbench.forgetting import ForgettingLayerCallback
from afmbench.strategies import AGEM, ER, EWC, MAS, SI, ANPyC

PLUGINS = {"ewc": EWC, "si": SI, "mas": MAS, "anpyc": ANPyC, "er": ER, "agem": AGEM}

out, devices, batch_size, configs = (
    Path(sys.argv[1]),
    int(sys.argv[2]),
    int(sys.argv[3]),
    sys.argv[4:],
)
trainer = {"accelerator": "cpu", "devices": devices, **({"strategy": "ddp"} if devices > 1 else {})}
for config in configs:
    strategy, _, extra = config.partition("+")
    scenario = afmbench.build_scenario("permuted_digits", n_experiences=3, seed=0)
    afmbench.seed_everything(0)
    model = afmbench.build_model("mlp", scenario.input_shape, scenario.head_sizes, hidden=[32, 32])
    plugins = [PLUGINS[strategy]()] if strategy in PLUGINS else []
    if extra == "fl":
        plugins.append(ForgettingLayerCallback())
    result = afmbench.run(
        scenario, model, plugins, max_epochs=2, batch_size=batch_size, seed=0,
        optimizer=afmbench.OptimizerConfig(lr=0.02, momentum=0.9), trainer_kwargs=trainer, verbose=False,
    )  # fmt: skip
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    (out / config).mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "params": {k: v.detach().cpu() for k, v in result.module.model.state_dict().items()},
            "importance": {
                p.name: {k: v.detach().cpu() for k, v in p.importance().items()} for p in plugins
            },
            "matrix": result.accuracy_matrix,
            "acc": result.metrics["acc"],
            "gates": {
                p.name: p.state_dict()["gate_states"] for p in plugins if p.name == "forgetting"
            },
        },
        out / config / f"rank{rank}.pt",
    )
