"""How long EWC's, MAS's and ANPyC's importance passes take through ResNet-18, next to one
training epoch of the same experience.

One experience of generated CIFAR-100 data (10 classes x 500 images, 8-bit values normalized
as the real loader does), the reduced ResNet-18 (``--width``, default 20), trained one epoch at
the ``split_cifar100_resnet18`` experiment's protocol (SGD 0.03, batch 32, crop and flip);
then each strategy's pass over the experience's 5000 training images under the memory bound
``--memory-mb``, in float32 or (``--pass-precision bf16-mixed``) under bfloat16 autocast; the
training epoch is float32 either way. Each row times one pass (the strategy's ``estimate``)
against that run's own epoch, so a drift in machine speed touches both alike.

    python benchmarks/importance_passes.py                 # about 5 minutes on a 2-core CPU
    python benchmarks/importance_passes.py --pass-precision bf16-mixed
    python benchmarks/importance_passes.py --width 64 --memory-mb 512
"""

from __future__ import annotations

import argparse
import functools
import platform
import time
from pathlib import Path

import torch
from generated import write_block

import afmbench
from afmbench.config import OptimizerConfig
from afmbench.persample import PRECISIONS, bounded_chunk
from afmbench.plugin import ContinualPlugin
from afmbench.strategies import EWC, MAS, ANPyC
from afmbench.strategies.ewc import log_likelihoods

HERE = Path(__file__).resolve().parent
IMAGES, CLASSES = 5000, 10


def cifar_like(n: int, classes: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random 8-bit RGB images, normalized per channel, with balanced labels."""
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (n, 3, 32, 32), generator=g).float().div(255)
    mean, std = torch.tensor([0.507, 0.487, 0.441]), torch.tensor([0.267, 0.256, 0.276])
    x = (pixels - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    y = torch.arange(n) % classes
    return x, y, torch.zeros(n, dtype=torch.long)


class EpochClock(ContinualPlugin):
    """Records the wall time of each training epoch (on a GPU, of the work queued in it)."""

    name = "epoch_clock"

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        sync(pl_module.device)
        self.started = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        sync(pl_module.device)
        self.seconds.append(time.perf_counter() - self.started)


def sync(device: torch.device) -> None:
    """Wait for ``device``'s queued work (a no-op on the CPU), so a clock reads finished work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(plugin: ContinualPlugin, seconds: list[float]) -> ContinualPlugin:
    """``plugin`` whose ``estimate`` (its importance pass) adds its wall time to ``seconds``."""
    estimate = plugin.estimate

    @functools.wraps(estimate)
    def clocked(module):
        started = time.perf_counter()
        out = estimate(module)
        seconds.append(time.perf_counter() - started)
        return out

    plugin.estimate = clocked
    return plugin


def measure(
    name: str, make, scenario, width: int, memory_mb: float, precision: str
) -> tuple[float, float]:
    """One epoch and one pass of strategy ``name``: (epoch seconds, pass seconds)."""
    afmbench.seed_everything(0, verbose=False)
    model = afmbench.build_model("resnet18", scenario.input_shape, scenario.head_sizes, width=width)
    clock, passes = EpochClock(), []
    afmbench.run(
        scenario, model, [timed(make(), passes), clock], max_epochs=1,
        batch_size=32, optimizer=OptimizerConfig("sgd", 0.03, momentum=0.0), augment="crop_flip",
        pass_memory_mb=memory_mb, pass_precision=precision, verbose=False,
    )  # fmt: skip
    print(f"{name}: epoch {clock.seconds[0]:.1f} s, pass {passes[0]:.1f} s", flush=True)
    return clock.seconds[0], passes[0]


STRATEGIES = {
    "ewc": lambda: EWC(lambda_=1.0),
    "mas": lambda: MAS(lambda_=1.0),
    "anpyc": lambda: ANPyC(lambda_=1.0),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--width", type=int, default=20, help="ResNet-18 base width")
    parser.add_argument("--memory-mb", type=float, default=256.0, help="data.pass_memory_mb")
    parser.add_argument("--pass-precision", default="32-true", choices=PRECISIONS)
    parser.add_argument("--strategies", nargs="*", default=list(STRATEGIES), choices=STRATEGIES)
    parser.add_argument("--output", default=str(HERE / "RESULTS.md"), help="the report")
    options = parser.parse_args()
    scenario = afmbench.Scenario.from_tensors(
        "cifar100_like", "task", [cifar_like(IMAGES, CLASSES)], [cifar_like(1000, CLASSES, 1)],
        head_sizes=(CLASSES,),
    )  # fmt: skip
    x, y, _ = scenario.train(0)
    model = afmbench.build_model("resnet18", scenario.input_shape, (CLASSES,), width=options.width)
    terms = functools.partial(log_likelihoods, fisher="empirical", task=0)
    chunk = bounded_chunk(model.eval(), terms, (x[:256], y[:256]), options.memory_mb)
    rows = []
    for name in options.strategies:
        epoch, spent = measure(
            name, STRATEGIES[name], scenario, options.width, options.memory_mb,
            options.pass_precision,
        )  # fmt: skip
        rows.append(f"| {name} | {epoch:.1f} | {spent:.1f} | {spent / epoch:.2f} |")
    command = (
        "python benchmarks/importance_passes.py"
        + (f" --width {options.width}" if options.width != 20 else "")
        + (f" --memory-mb {options.memory_mb:g}" if options.memory_mb != 256 else "")
        + (f" --pass-precision {bf16}" if (bf16 := options.pass_precision) != "32-true" else "")
    )
    text = "\n".join(
        [
            f"Command: `{command}` ({platform.machine()}, {torch.get_num_threads()} threads, "
            f"torch {torch.__version__}). ResNet-18 width {options.width}, {IMAGES} training "
            f"images of 32x32, memory bound {options.memory_mb:g} MB: EWC's per-sample passes go "
            f"through in chunks of {chunk} samples, in {options.pass_precision}.",
            "",
            "| strategy | one training epoch (s) | importance pass (s) | pass / epoch |",
            "|---|---|---|---|",
            *rows,
            "",
        ]
    )
    suffix = "" if options.pass_precision == "32-true" else f"-{options.pass_precision}"
    write_block(Path(options.output), f"importance-passes-w{options.width}{suffix}", text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
