"""Two CPU processes with gloo: identical state on every rank, accuracy close to one process."""

import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO

SCRIPT = REPO / "tests" / "scripts" / "ddp_run.py"


def _run(out, devices, batch_size, strategy, *extra):
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(out), str(devices), str(batch_size), strategy, *extra],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(devices)]


def _assert_identical(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
@pytest.mark.parametrize("strategy, extra", [("naive", ())])
def test_two_processes_agree_and_match_one_process(tmp_path, strategy, extra):
    ranks = _run(tmp_path / "ddp", 2, 16, strategy, *extra)
    _assert_identical(ranks[0]["params"], ranks[1]["params"])
    for name in ranks[0]["importance"]:
        _assert_identical(ranks[0]["importance"][name], ranks[1]["importance"][name])
    assert (ranks[0]["matrix"] == ranks[1]["matrix"]).all()
    single = _run(tmp_path / "single", 1, 32, strategy, *extra)[0]  # same global batch size
    assert abs(single["acc"] - ranks[0]["acc"]) < 0.05, (single["acc"], ranks[0]["acc"])
