"""EWC on three experiences (a fifth of each held out for validation) with two CPU processes
under DDP, from the start (keeping every
checkpoint) or resumed from a checkpoint of such a run into another folder.

Usage: python ddp_resume.py RUN_DIR [CHECKPOINT]
"""

import sys
from pathlib import Path

import afmbench
from afmbench.strategies import EWC

folder, checkpoint = Path(sys.argv[1]), (sys.argv[2] if len(sys.argv) > 2 else False)
scenario = afmbench.build_scenario("permuted_digits", n_experiences=3, seed=0, validation=0.2)
afmbench.seed_everything(0)
model = afmbench.build_model("mlp", scenario.input_shape, scenario.head_sizes, hidden=[32])
afmbench.run(
    scenario, model, [EWC()], max_epochs=1, batch_size=16, seed=0, run_dir=folder,
    keep_checkpoints=True, resume=checkpoint, verbose=False,
    trainer_kwargs={"accelerator": "cpu", "devices": 2, "strategy": "ddp"},
)  # fmt: skip
