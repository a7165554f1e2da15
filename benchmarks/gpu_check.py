"""One prepared check of afmbench on a GPU machine that has no network and, of afmbench's needs,
only torch, Lightning, torchmetrics, scikit-learn and matplotlib.

Everything else travels in one bundle folder (git-ignored, at most 64 MiB) made here first:
the wheels afmbench imports that such a machine lacks (OmegaConf and its parser runtime) and
the raw MNIST archives. There, the MNIST scenarios are built with ``Scenario.from_tensors``
(no Avalanche), and the check

  (a) runs every strategy with and without the forgetting layer end to end on real Permuted
      MNIST (domain-incremental) and Split MNIST (task-incremental), in 32-true and bf16-mixed;
  (b) compares the importance tensors (EWC's Fisher, SI's and MAS's Omega, ANPyC's scores, the
      layer's neuron importance and gates) computed there with the CPU's, on one fixed model
      and data;
  (c) times afmbench against a plain PyTorch loop on Permuted MNIST (``speed.py``'s
      contenders; Avalanche too where it is installed);
  (d) times ResNet-18 with crop-and-flip augmentation on a generated CIFAR-100 experience
      against a plain loop doing the same arithmetic (images per second);
  (e) writes ``gpu_check.json`` and ``gpu_check.md`` (the GPU section of RESULTS.md) to ``--out``.

Each part records its own failures and the rest still runs, so one call yields a whole report.

    python benchmarks/gpu_check.py prepare .gpu_bundle          # here: about 12 MB
    # on the GPU machine, with .gpu_bundle carried along:
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu_bundle/wheels/*.whl
    PYTHONPATH=/tmp/site:. python3 benchmarks/gpu_check.py run --bundle .gpu_bundle --out "$OUT"
    python benchmarks/gpu_check.py run --bundle .gpu_bundle --out /tmp/check --device cpu --smoke
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from importance_passes import EpochClock, cifar_like, sync  # noqa: E402

import afmbench  # noqa: E402
from afmbench.augment import CropFlip  # noqa: E402
from afmbench.config import OptimizerConfig, config_dir  # noqa: E402
from afmbench.scenarios.common import permutations  # noqa: E402
from afmbench.scenarios.sources import MNIST_FILES, read_mnist_like  # noqa: E402

#: What the GPU machine lacks of afmbench's imports (Hydra, Avalanche and W&B stay unused).
WHEELS = ("omegaconf", "antlr4-python3-runtime")
BUNDLE_LIMIT = 64 * 2**20
STRATEGIES = (
    "naive",
    "joint",
    "ewc",
    "online_ewc",
    "si",
    "mas",
    "anpyc",
    "er",
    "agem",
    "derpp",
    "lwf",
)
PRECISIONS = ("32-true", "bf16-mixed")
RELATIVE_TOLERANCE = 1e-3  # of a tensor's norm, for float32 on two devices


# -- the bundle ------------------------------------------------------------------------
def prepare(bundle: Path, data: Path, wheels: bool = True) -> dict[str, int]:
    """Fill ``bundle`` with the wheels (built or fetched by pip here) and the MNIST archives;
    return each file's size. Refuses a bundle over 64 MiB."""
    (bundle / "MNIST" / "raw").mkdir(parents=True, exist_ok=True)
    for name in MNIST_FILES:
        source = data / "MNIST" / "raw"
        target = bundle / "MNIST" / "raw" / f"{name}.gz"
        if (source / f"{name}.gz").is_file():
            shutil.copyfile(source / f"{name}.gz", target)
        elif (source / name).is_file():
            target.write_bytes(gzip.compress((source / name).read_bytes()))
        else:
            raise SystemExit(f"gpu_check: {source / name}.gz not found; pass --data <folder>")
    if wheels:
        pins = [f"{name}=={metadata.version(name)}" for name in WHEELS]
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w",
             str(bundle / "wheels"), *pins],
            check=True,
        )  # fmt: skip
    sizes = {str(p.relative_to(bundle)): p.stat().st_size for p in bundle.rglob("*") if p.is_file()}
    if sum(sizes.values()) > BUNDLE_LIMIT:
        raise SystemExit(
            f"gpu_check: the bundle holds {sum(sizes.values()) / 2**20:.1f} MiB, over 64"
        )
    return sizes


# -- scenarios from the raw archives ---------------------------------------------------
def mnist(bundle: Path, limit: int | None) -> tuple[afmbench.Scenario, afmbench.Scenario]:
    """Permuted MNIST (3 permutations, domain) and Split MNIST (5 x 2 classes, task), from the
    bundle's archives, each training split cut to its first ``limit`` samples if given."""
    (x_tr, y_tr), (x_te, y_te) = read_mnist_like("MNIST", bundle)
    x_tr, x_te = (x.float().div(255).unsqueeze(1) for x in (x_tr, x_te))
    cut = slice(None) if limit is None else slice(limit)
    test_cut = slice(None) if limit is None else slice(max(limit // 4, 64))

    def permuted(x, perm):
        return x.flatten(1)[:, perm].view(x.shape)

    def zeros(y):
        return torch.zeros_like(y)

    perms = permutations(3, 784, seed=0)
    train = [(permuted(x_tr[cut], p), y_tr[cut], zeros(y_tr[cut])) for p in perms]
    test = [(permuted(x_te[test_cut], p), y_te[test_cut], zeros(y_te[test_cut])) for p in perms]
    permuted_mnist = afmbench.Scenario.from_tensors(
        "permuted_mnist", "domain", train, test, head_sizes=(10,)
    )

    def pair(x, y, task):
        keep = (y == 2 * task) | (y == 2 * task + 1)
        return x[keep], y[keep] - 2 * task, torch.full((int(keep.sum()),), task)

    train = [pair(x_tr, y_tr, t) for t in range(5)]
    train = [tuple(v[cut] for v in split) for split in train]
    test = [tuple(v[test_cut] for v in pair(x_te, y_te, t)) for t in range(5)]
    split_mnist = afmbench.Scenario.from_tensors(
        "split_mnist", "task", train, test, head_sizes=(2,) * 5
    )
    return permuted_mnist, split_mnist


def plugins(strategy: str, layer: bool) -> tuple[list, bool]:
    """The strategy's plugins as its YAML (``configs/strategy``) builds them, the layer's
    callback at its defaults if ``layer``; and whether it trains jointly."""
    from omegaconf import OmegaConf

    from afmbench.forgetting import ForgettingLayerCallback
    from afmbench.runner import build_plugin

    base = "ewc" if strategy == "online_ewc" else strategy
    node = OmegaConf.load(Path(config_dir()) / "strategy" / f"{base}.yaml")
    if strategy == "online_ewc":
        node.mode, node.name = "online", "online_ewc"
    built = [p for p in [build_plugin(node, "strategy")] if p is not None]
    return built + ([ForgettingLayerCallback()] if layer else []), strategy == "joint"


def trainer_options(device: torch.device, precision: str = "32-true") -> dict[str, Any]:
    return {
        "accelerator": "gpu" if device.type == "cuda" else "cpu",
        "devices": 1,
        "precision": precision,
    }


# -- (a) every strategy end to end ----------------------------------------------------
def end_to_end(scenarios, device: torch.device, smoke: bool) -> list[dict[str, Any]]:
    rows = []
    strategies = ("ewc",) if smoke else STRATEGIES
    for scenario in scenarios:
        for precision in PRECISIONS:
            for strategy in strategies:
                for layer in (False, True):
                    row = {"scenario": scenario.name, "precision": precision,
                           "strategy": strategy, "layer": layer}  # fmt: skip
                    rows.append(row)
                    try:
                        afmbench.seed_everything(0, verbose=False)
                        model = afmbench.build_model(
                            "mlp", scenario.input_shape, scenario.head_sizes, hidden=[256, 256]
                        )
                        built, joint = plugins(strategy, layer)
                        started = time.perf_counter()
                        result = afmbench.run(
                            scenario, model, built, joint=joint, batch_size=128, verbose=False,
                            optimizer=OptimizerConfig("sgd", 0.01, momentum=0.9),
                            trainer_kwargs=trainer_options(device, precision),
                        )  # fmt: skip
                        acc = float(result.metrics["acc"])
                        row.update(acc=acc, seconds=time.perf_counter() - started)
                        row["ok"] = bool(np.isfinite(acc))
                    except Exception as exc:  # one failing run must not end the check
                        row.update(ok=False, error=_one_line(exc))
                    print(f"(a) {row}", flush=True)
    return rows


# -- (b) importance tensors: this device against the CPU --------------------------------
def importances(scenario: afmbench.Scenario, device: torch.device) -> dict[str, torch.Tensor]:
    """Every importance tensor of one short run with all strategies and the layer at once."""
    from afmbench.forgetting import ForgettingLayerCallback
    from afmbench.strategies import EWC, MAS, SI, ANPyC

    afmbench.seed_everything(0, verbose=False)
    model = afmbench.build_model("mlp", scenario.input_shape, scenario.head_sizes, hidden=[64, 32])
    built = [EWC(lambda_=1.0), SI(c=0.1), MAS(lambda_=0.1), ANPyC(lambda_=0.1),
             ForgettingLayerCallback()]  # fmt: skip
    afmbench.run(
        scenario, model, built, batch_size=64, verbose=False, trainer_kwargs=trainer_options(device)
    )
    out = {}
    for plugin in built[:4]:
        out.update({f"{plugin.name} {k}": v.cpu() for k, v in plugin.importance().items()})
    layer = built[4]
    out.update({f"layer omega {k}": v.cpu() for k, v in layer.neuron_importance().items()})
    out.update({f"layer gates {k}": v.cpu() for k, v in layer.gate_states().items()})
    return out


def compare(scenario: afmbench.Scenario, device: torch.device) -> dict[str, Any]:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    ours, cpu = importances(scenario, device), importances(scenario, torch.device("cpu"))
    errors = {
        k: float((ours[k] - cpu[k]).norm() / cpu[k].norm().clamp(min=1e-12)) for k in sorted(cpu)
    }
    families = {}
    for key, error in errors.items():
        family = " ".join(key.split(" ")[:-1])
        families[family] = max(families.get(family, 0.0), error)
    return {
        "tensors": len(errors),
        "max_relative_error": families,
        "ok": set(ours) == set(cpu) and max(errors.values()) <= RELATIVE_TOLERANCE,
    }


# -- (c) afmbench against a plain loop on Permuted MNIST -------------------------------
def speed_vs_plain(
    scenario: afmbench.Scenario, device: torch.device, names: tuple[str, ...] | None = None
) -> list[dict[str, Any]]:
    import speed

    for name in ("naive", "ewc+fl"):  # warm-up, untimed
        speed.run_afmbench(name, speed.Limited(scenario, 512), 0, device)
        speed.run_plain(name, speed.Limited(scenario, 512), 0, device)
    rows = []
    for name in names or speed.SETTINGS:
        a = speed.run_afmbench(name, scenario, 0, device)
        b = speed.run_plain(name, scenario, 0, device)
        rows.append({"strategy": name, "afmbench_s": a.seconds, "plain_s": b.seconds,
                     "ratio": a.seconds / b.seconds, "acc": a.acc, "plain_acc": b.acc})  # fmt: skip
        print(f"(c) {rows[-1]}", flush=True)
    return rows


# -- (d) ResNet-18 with augmentation against a plain loop -------------------------------
def resnet_speed(device: torch.device, images: int, batch_sizes: tuple[int, ...], epochs: int):
    train, test = cifar_like(images, 10), cifar_like(256, 10, 1)
    scenario = afmbench.Scenario.from_tensors(
        "cifar100_like", "task", [train], [test], head_sizes=(10,)
    )
    rows = []
    for batch in batch_sizes:
        afmbench.seed_everything(0, verbose=False)
        model = afmbench.build_model("resnet18", (3, 32, 32), (10,))
        clock = EpochClock()
        afmbench.run(
            scenario, model, [clock], max_epochs=epochs, batch_size=batch, augment="crop_flip",
            optimizer=OptimizerConfig("sgd", 0.03, momentum=0.0), verbose=False,
            trainer_kwargs=trainer_options(device),
        )  # fmt: skip
        ours = images / clock.seconds[-1]
        plain = images / plain_resnet_epoch(train, device, batch, epochs)
        rows.append({"batch_size": batch, "afmbench_images_s": ours, "plain_images_s": plain,
                     "ratio": plain / ours})  # fmt: skip
        print(f"(d) {rows[-1]}", flush=True)
    return rows


def plain_resnet_epoch(train, device: torch.device, batch: int, epochs: int) -> float:
    """Seconds of the last of ``epochs`` epochs of the same training with nothing but PyTorch:
    data on the device once, one permutation and one augmentation draw per batch."""
    afmbench.seed_everything(0, verbose=False)
    model = afmbench.build_model("resnet18", (3, 32, 32), (10,)).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.03)
    x, y, _ = (t.to(device) for t in train)
    augment = CropFlip()
    seconds = 0.0
    for epoch in range(epochs):
        augment.start_epoch(0, 0, epoch, device)
        sync(device)
        started = time.perf_counter()
        order = torch.randperm(len(x), device=device)
        for start in range(0, len(x), batch):
            index = order[start : start + batch]
            loss = F.cross_entropy(model(augment(x[index]), 0), y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        sync(device)
        seconds = time.perf_counter() - started
    return seconds


# -- the report -------------------------------------------------------------------------
def check(bundle: Path, device: torch.device, smoke: bool) -> dict[str, Any]:
    """Run (a) to (d); a part that fails records its error and the next one runs."""
    summary: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.machine(),
        "torch": torch.__version__,
        "smoke": smoke,
        "avalanche": importlib.util.find_spec("avalanche") is not None,
    }
    limit = 256 if smoke else 5000
    parts: dict[str, Callable[[], Any]] = {
        "end_to_end": lambda: end_to_end(mnist(bundle, limit), device, smoke),
        "importance_match": lambda: compare(mnist(bundle, 512)[1], device),
        "speed_vs_plain": lambda: speed_vs_plain(
            mnist(bundle, 512 if smoke else None)[0], device, ("ewc+fl",) if smoke else None
        ),
        "resnet18_augment": lambda: resnet_speed(
            device, 256 if smoke else 5000, (32,) if smoke else (32, 128), 2
        ),
    }
    for name, part in parts.items():
        started = time.perf_counter()
        try:
            summary[name] = part()
        except Exception as exc:
            traceback.print_exc()
            summary[name] = {"error": _one_line(exc)}
        summary[f"{name}_s"] = round(time.perf_counter() - started, 1)
    return summary


def markdown(summary: dict[str, Any]) -> str:
    """The summary as the GPU section of benchmarks/RESULTS.md."""
    lines = [
        f"Command: `python benchmarks/gpu_check.py run --bundle .gpu_bundle --out $OUT` on "
        f"{summary['device']} (torch {summary['torch']}{', smoke' if summary['smoke'] else ''}).",
        "",
    ]
    runs = summary["end_to_end"]
    if isinstance(runs, list):
        failed = [r for r in runs if not r.get("ok")]
        lines += [f"(a) end to end: {len(runs) - len(failed)} of {len(runs)} runs finished with "
                  "a finite ACC" + (":" if failed else ".")]  # fmt: skip
        lines += [f"- failed: {r['scenario']} {r['precision']} {r['strategy']} layer={r['layer']}: "
                  f"{r.get('error', 'ACC not finite')}" for r in failed]  # fmt: skip
        lines += ["", "| scenario | precision | strategy | layer off ACC | layer on ACC |",
                  "|---|---|---|---|---|"]  # fmt: skip
        cells: dict[tuple, dict[bool, str]] = {}
        for r in runs:
            key = (r["scenario"], r["precision"], r["strategy"])
            cells.setdefault(key, {})[r["layer"]] = f"{r['acc']:.3f}" if "acc" in r else "failed"
        lines += [f"| {s} | {p} | {n} | {c.get(False, '-')} | {c.get(True, '-')} |"
                  for (s, p, n), c in cells.items()]  # fmt: skip
    else:
        lines.append(f"(a) end to end failed: {runs['error']}")
    match = summary["importance_match"]
    lines += ["", "(b) importance on this device against the CPU (largest relative error per "
              f"family, tolerance {RELATIVE_TOLERANCE:g}):"]  # fmt: skip
    if "error" in match:
        lines.append(f"failed: {match['error']}")
    else:
        lines += [f"- {k}: {v:.1e}" for k, v in match["max_relative_error"].items()]
        lines.append(f"- {'all within tolerance' if match['ok'] else 'NOT within tolerance'}")
    speed_rows = summary["speed_vs_plain"]
    lines += [
        "",
        "(c) Permuted MNIST, 3 tasks x 1 epoch: afmbench against a plain PyTorch loop"
        + ("" if summary["avalanche"] else " (Avalanche not installed here)"),
        "",
    ]
    lines += _table(
        speed_rows, "| strategy | afmbench (s) | plain loop (s) | ratio | ACC afmbench / plain |",
        lambda r: f"| {r['strategy']} | {r['afmbench_s']:.1f} | {r['plain_s']:.1f} | "
        f"{r['ratio']:.2f} | {r['acc']:.3f} / {r['plain_acc']:.3f} |",
    )  # fmt: skip
    resnet = summary["resnet18_augment"]
    lines += ["", "(d) ResNet-18 (width 20) with crop and flip, one generated CIFAR experience, "
              "second epoch:", ""]  # fmt: skip
    lines += _table(
        resnet, "| batch | afmbench (images/s) | plain loop (images/s) | plain / afmbench |",
        lambda r: f"| {r['batch_size']} | {r['afmbench_images_s']:.0f} | "
        f"{r['plain_images_s']:.0f} | {r['ratio']:.2f} |",
    )  # fmt: skip
    seconds = sum(v for k, v in summary.items() if k.endswith("_s") and isinstance(v, float))
    lines += ["", f"The whole check took {seconds:.0f} s.", ""]
    return "\n".join(lines)


def _table(rows: list | dict, header: str, row: Callable[[dict], str]) -> list[str]:
    """A part's rows as a Markdown table under ``header``, or its error line if it failed."""
    if not isinstance(rows, list):
        return [f"failed: {rows['error']}"]
    return [header, "|---" * header.count("|", 1) + "|", *map(row, rows)]


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("prepare", help="fill the bundle folder here")
    make.add_argument("bundle", type=Path)
    make.add_argument("--data", type=Path, default=None, help="the folder holding MNIST/raw/")
    make.add_argument("--no-wheels", action="store_true", help="only the archives")
    run = commands.add_parser("run", help="the check, on the GPU machine")
    run.add_argument("--bundle", type=Path, required=True)
    run.add_argument("--out", type=Path, required=True, help="where the JSON and Markdown go")
    run.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    run.add_argument("--smoke", action="store_true", help="a few hundred samples: a rehearsal")
    options = parser.parse_args(argv)
    if options.command == "prepare":
        from afmbench.scenarios.sources import data_root

        sizes = prepare(options.bundle, options.data or data_root(), not options.no_wheels)
        print(
            f"gpu_check: {len(sizes)} files, {sum(sizes.values()) / 2**20:.1f} MiB in {options.bundle}"
        )
        return 0
    if options.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no GPU here; use --device cpu --smoke to rehearse")
    with tempfile.TemporaryDirectory() as cache:  # scenario caches stay out of the bundle
        os.environ.setdefault("AFMBENCH_CACHE_DIR", cache)
        summary = check(options.bundle, torch.device(options.device), options.smoke)
    options.out.mkdir(parents=True, exist_ok=True)
    (options.out / "gpu_check.json").write_text(json.dumps(summary, indent=1, default=str))
    (options.out / "gpu_check.md").write_text(markdown(summary))
    print(markdown(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
