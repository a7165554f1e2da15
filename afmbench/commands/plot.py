"""``afmbench plot RUN_DIR ...``: draw a run folder's figures from its ``metrics.json``.

Runs draw no figures unless ``figures=true`` (matplotlib costs a short run more than all its
other bookkeeping); this draws them for any run, finished or not, here or copied from elsewhere.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from afmbench.reporting import draw_figures
from afmbench.run_folder import prepare_run_dir, read_metrics


def plot_command(args: list[str]) -> int:
    """``afmbench plot RUN_DIR [RUN_DIR ...]``: write each run's ``plots/*.png``."""
    parser = argparse.ArgumentParser(prog="afmbench plot", description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="a run folder")
    for folder in parser.parse_args(args).run_dirs:
        metrics = read_metrics(folder)
        if not metrics.get("experiences_done"):
            print(f"{folder}: no experience finished yet, nothing to draw")
            continue
        prepare_run_dir(Path(folder) / "plots", "the plots folder of", "a copy you can write to")
        written = draw_figures(Path(folder), metrics)
        print(f"{folder}: {', '.join(path.name for path in written)}")
    return 0
