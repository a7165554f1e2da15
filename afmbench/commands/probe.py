"""``afmbench probe RUN_DIR``: the forgetting layer's analyses of a finished run (sparsity,
neuron importance, ablation, pruning and perturbation curves), a JSON file and a figure each
in ``RUN_DIR/probes/``."""

from __future__ import annotations

import argparse
from pathlib import Path

from afmbench import probes
from afmbench.errors import ConfigError
from afmbench.run_folder import prepare_run_dir
from afmbench.runner import load_run


def probe_command(args: list[str]) -> int:
    """``afmbench probe RUN_DIR [options]``: run the probes on a finished run."""
    parser = argparse.ArgumentParser(
        prog="afmbench probe", description=probes.__doc__.splitlines()[0]
    )
    parser.add_argument("run_dir", help="folder of a run made by `afmbench run`")
    parser.add_argument(
        "--probes",
        default=",".join(probes.PROBES),
        help=f"comma-separated subset of {','.join(probes.PROBES)}",
    )
    parser.add_argument(
        "--max-samples",
        type=int,
        default=10_000,
        help="test / training samples used (a fixed random subset; 0 = all)",
    )
    parser.add_argument("--repeats", type=int, default=10, help="repetitions of every random order")
    parser.add_argument(
        "--sparsity-normalization",
        choices=("divide", "multiply"),
        default="divide",
        help="eq. 1's factor (1 - 1/N): divide by it (range [0, 1]) or multiply as printed",
    )
    parser.add_argument(
        "--noise",
        type=float,
        default=1.0,
        help="perturbation std, in units of the layer's weight std",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="the sample subset, random orders and noise draws"
    )
    parser.add_argument("--out", default=None, help="output folder (default RUN_DIR/probes)")
    options = parser.parse_args(args)
    if options.repeats < 1 or options.max_samples < 0 or not options.noise > 0:
        raise ConfigError(
            "--repeats must be >= 1, --max-samples >= 0 and --noise > 0",
            "e.g. --repeats 10 --max-samples 10000 --noise 1",
        )
    subject = load_run(options.run_dir, options.max_samples or None, options.seed)
    out = options.out or Path(options.run_dir) / "probes"
    prepare_run_dir(out, "--out", "--out probes")
    results = probes.run_probes(
        subject,
        out,
        [p for p in options.probes.split(",") if p],
        repeats=options.repeats,
        normalization=options.sparsity_normalization,
        noise=options.noise,
        seed=options.seed,
    )
    print(f"probes {', '.join(results)} written to {out}")
    return 0
