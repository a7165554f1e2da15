"""Task-incremental Split MNIST fine-tuning ("none") at van de Ven & Tolias's protocol, three ways:
their output layer, separate heads, and afmbench.

van de Ven & Tolias's code gives the network one 10-unit output layer and, under the task
protocol, masks it to the current task's two classes; with one Adam for the whole run, the
units of earlier tasks get zero gradients but keep moving on Adam's carried momentum. afmbench
gives each task a head of its own, which receives no gradient (and no update) once its task is
over. This script trains the same MLP 2x400 (Adam lr 1e-3 for the whole run, batch 128, 2000
iterations a task, pixels in [0, 1]) in a plain PyTorch loop with either output layer, and through afmbench, and
writes the ACC of each to ``benchmarks/PUBLISHED.md``.

    python benchmarks/vandeven_heads.py --seeds 0 1 2 3 4     # about 40 minutes on one core
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
from generated import write_block
from torch import nn

import afmbench
from afmbench.config import OptimizerConfig

HERE = Path(__file__).resolve().parent
TASKS, STEPS, BATCH, CLASSES = 5, 2000, 128, 2


def plain(scenario, seed: int, masked: bool) -> float:
    """ACC of a plain loop with one masked 10-unit output layer or one head per task."""
    torch.manual_seed(seed)
    body = nn.Sequential(
        nn.Flatten(), nn.Linear(784, 400), nn.ReLU(), nn.Linear(400, 400), nn.ReLU()
    )
    if masked:
        head = nn.Linear(400, TASKS * CLASSES)
    else:
        head = nn.ModuleList(nn.Linear(400, CLASSES) for _ in range(TASKS))
    optimizer = torch.optim.Adam([*body.parameters(), *head.parameters()], lr=1e-3)

    def logits(x: torch.Tensor, task: int) -> torch.Tensor:
        h = body(x)
        return head(h)[:, CLASSES * task : CLASSES * (task + 1)] if masked else head[task](h)

    order = torch.Generator().manual_seed(seed)
    for task in range(TASKS):
        x, y, _ = scenario.train(task)
        steps = 0
        while steps < STEPS:
            for batch in torch.randperm(len(x), generator=order).split(BATCH):
                loss = F.cross_entropy(logits(x[batch], task), y[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                steps += 1
                if steps == STEPS:
                    break
    with torch.no_grad():
        return statistics.fmean(
            float((logits(x, t).argmax(1) == y).float().mean())
            for t in range(TASKS)
            for x, y, _ in [scenario.test(t)]
        )


def through_afmbench(scenario, seed: int) -> float:
    afmbench.seed_everything(seed, verbose=False)
    model = afmbench.build_model(
        "mlp", scenario.input_shape, scenario.head_sizes, hidden=[400, 400]
    )
    result = afmbench.run(
        scenario, model, max_epochs=-1, batch_size=BATCH, seed=seed, verbose=False,
        optimizer=OptimizerConfig("adam", 1e-3, reset_between_experiences=False),
        trainer_kwargs={"max_steps": STEPS},
    )  # fmt: skip
    return result.metrics["acc"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    options = parser.parse_args()
    scenario = afmbench.build_scenario(
        "split_mnist", n_experiences=TASKS, protocol="task", normalize=False
    )  # pixels in [0, 1], as their code feeds them
    routes = {
        "plain loop, one 10-unit output layer masked to the task (their code)": lambda s: plain(
            scenario, s, masked=True
        ),
        "plain loop, one head per task": lambda s: plain(scenario, s, masked=False),
        "afmbench (one head per task)": lambda s: through_afmbench(scenario, s),
    }
    accs: dict[str, list[float]] = {name: [] for name in routes}
    for seed in options.seeds:
        for name, route in routes.items():
            accs[name].append(100 * route(seed))
            print(f"seed {seed}: {name}: {accs[name][-1]:.2f}", flush=True)
    seeds = " ".join(map(str, options.seeds))
    lines = [
        f"Command: `python benchmarks/vandeven_heads.py --seeds {seeds}`. Task-IL Split MNIST, "
        "none, pixels in [0, 1], MLP 2x400, Adam lr 1e-3 for the whole run, batch 128, 2000 "
        "iterations a task.",
        "",
        "| route | ACC (%) mean ± sd | per seed |",
        "|---|---|---|",
        *(
            f"| {name} | {statistics.fmean(a):.2f} ± {statistics.stdev(a):.2f} | "
            + " ".join(f"{v:.1f}" for v in a)
            + " |"
            for name, a in accs.items()
        ),
        "",
    ]
    write_block(HERE / "PUBLISHED.md", "vandeven-heads", "\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
