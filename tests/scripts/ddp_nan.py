"""Two CPU processes under DDP where the loss turns NaN on rank 1 only, in experience 2.

Usage: python ddp_nan.py RUN_DIR
"""

import sys

import torch

import afmbench
from afmbench.plugin import ContinualPlugin


class NanOnRankOne(ContinualPlugin):
    name = "nan_on_rank_one"

    def penalty(self, module):
        if module.experience == 1 and module.trainer.global_rank == 1:
            return torch.tensor(float("nan"))
        return None


scenario = afmbench.build_scenario("permuted_digits", n_experiences=2, seed=0)
afmbench.seed_everything(0)
model = afmbench.build_model("mlp", scenario.input_shape, scenario.head_sizes, hidden=[16])
afmbench.run(
    scenario, model, [NanOnRankOne()], max_epochs=1, batch_size=16, run_dir=sys.argv[1],
    verbose=False, trainer_kwargs={"accelerator": "cpu", "devices": 2, "strategy": "ddp"},
)  # fmt: skip
