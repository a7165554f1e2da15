"""The forgetting layer across strategy families: each strategy with the layer off and on, from
the ``layer_families`` and ``afm_fig5`` suites' results; tables go to ``benchmarks/FORGETTING.md``.

    afmbench run -m experiment=layer_families                                  # layer off
    afmbench run -m experiment=layer_families forgetting=on forgetting.lambda_f=0.1,1.0
    afmbench run -m experiment=afm_fig5
    python benchmarks/published.py collect                 # run folders -> results/<suite>.jsonl
    python benchmarks/layer_families.py                    # results -> FORGETTING.md

Where a suite holds a validation split (``layer_families``), the layer's ``lambda_f`` reported
for a strategy is the one with the best mean validation ACC over its seeds: chosen on
validation, reported on test.
"""

from __future__ import annotations

import argparse
import re
import statistics
from pathlib import Path

from generated import write_block
from published import RESULTS, read

HERE = Path(__file__).resolve().parent
PAGE = HERE / "FORGETTING.md"
FAMILIES = {
    "none": "baseline", "naive": "baseline", "joint": "baseline", "ewc": "regularization",
    "si": "regularization", "mas": "regularization", "anpyc": "regularization",
    "er": "replay", "agem": "replay", "derpp": "replay", "lwf": "distillation",
}  # fmt: skip
SETTINGS = {
    "layer_families": "Split MNIST (normalized), domain-incremental, van de Ven & Tolias's training "
    "protocol (MLP 2x400, Adam lr 1e-3 for the whole run, batch 128, 2000 iterations a task), a "
    "tenth of the training data held out for validation",
    "afm_fig5": "the AFM paper's Fig. 5 setting (Permuted MNIST, 10 tasks, task-incremental, "
    "MLP 784-512-256, SGD lr 0.01 momentum 0.9, batch 64, 1 epoch a task), lambda_f 1 "
    "chosen on held-out training data (benchmark 2)",
}


def groups(suite: str) -> dict[tuple[str, str, str], list[dict]]:
    """Runs by (strategy, layer off/on, lambda_f) from ``results/<suite>.jsonl``; the run
    folder's name ``<strategy>_<off|on>[_lf<lambda_f>]`` tells them apart."""
    found: dict[tuple[str, str, str], list[dict]] = {}
    for row in read(RESULTS / f"{suite}.jsonl"):
        name = row["arm"].split("/", 1)[1]
        match = re.fullmatch(r"(.+?)_(off|on)(?:_lf([0-9.e-]+))?", name)
        if match:
            strategy, layer, lambda_f = match.groups()
            key = (strategy, layer, lambda_f if layer == "on" and lambda_f else "-")
            found.setdefault(key, []).append(row)
    return found


def _mean(rows: list[dict], key: str) -> float:
    return statistics.fmean(100 * r[key] for r in rows)


def _acc(rows: list[dict]) -> str:
    accs = [100 * r["acc"] for r in rows]
    sd = f" ± {statistics.stdev(accs):.2f}" if len(accs) > 1 else ""
    return f"{statistics.fmean(accs):.2f}{sd} ({len(accs)})"


def _change(on: list[dict], off: list[dict]) -> str:
    """On minus off, ± its standard error (unpaired: sqrt(s_on²/n_on + s_off²/n_off))."""
    if not on or not off:
        return "-"
    change = _mean(on, "acc") - _mean(off, "acc")
    if min(len(on), len(off)) < 2:
        return f"{change:+.2f}"
    se = sum(statistics.variance([100 * r["acc"] for r in rows]) / len(rows) for rows in (on, off))
    return f"{change:+.2f} ± {se**0.5:.2f}"


def table(suite: str) -> str:
    """One row per strategy: the layer off, the layer on at its validated lambda_f, the change."""
    runs = groups(suite)
    strategies = sorted({s for s, _, _ in runs}, key=lambda s: (list(FAMILIES).index(s), s))
    lines = [
        f"Setting: {SETTINGS[suite]}. Command: `afmbench run -m experiment={suite}`"
        + (
            " (and with `forgetting=on forgetting.lambda_f=0.1,1.0`)"
            if suite == "layer_families"
            else ""
        )  # fmt: skip
        + ", then `python benchmarks/published.py collect` and `python benchmarks/layer_families.py`.",
        "",
        "| strategy | family | ACC, layer off | ACC, layer on | lambda_f (val ACC) | change ± s.e. | "
        "BWT off / on |",
        "|---|---|---|---|---|---|---|",
    ]
    for strategy in strategies:
        off = runs.get((strategy, "off", "-"), [])
        candidates = {lf: rows for (s, layer, lf), rows in runs.items()
                      if s == strategy and layer == "on"}  # fmt: skip
        validated = all(r.get("val_acc") is not None for rows in candidates.values() for r in rows)
        chosen = (
            max(candidates, key=lambda lf: _mean(candidates[lf], "val_acc"))
            if candidates and validated
            else next(iter(candidates), None)
        )
        on = candidates.get(chosen, [])
        picked = f"{chosen} ({_mean(on, 'val_acc'):.2f})" if on and validated else (chosen or "-")
        change = _change(on, off)
        bwt = " / ".join(
            f"{_mean(rows, 'bwt'):.1f}" if rows and rows[0]["bwt"] is not None else "-"
            for rows in (off, on)
        )
        lines.append(
            f"| {strategy} | {FAMILIES.get(strategy, '-')} | {_acc(off) if off else '-'} | "
            f"{_acc(on) if on else '-'} | {picked} | {change} | {bwt} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suites", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    options = parser.parse_args()
    for suite in options.suites:
        write_block(PAGE, f"families-{suite}", table(suite))
        print(table(suite))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
