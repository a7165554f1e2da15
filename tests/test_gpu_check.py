"""benchmarks/gpu_check.py: its bundle, its MNIST reader and a rehearsal of the whole check
on the CPU, in a Python that cannot import Avalanche, Hydra or W&B (as on the GPU machine)."""

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from afmbench.errors import DataNotFoundError
from afmbench.scenarios.sources import read_mnist_like
from tests.conftest import fake_mnist, idx_bytes

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402

BLOCK = "import sys\nfor name in ('avalanche', 'hydra', 'wandb'):\n    sys.modules[name] = None\n"


def test_the_reader_gives_the_archives_contents(tmp_path):
    arrays = fake_mnist(tmp_path)
    (x_tr, y_tr), (x_te, y_te) = read_mnist_like("MNIST", tmp_path)
    assert x_tr.dtype == torch.uint8 and x_tr.shape == (600, 28, 28) and y_tr.dtype == torch.int64
    assert np.array_equal(x_te.numpy(), arrays["t10k-images-idx3-ubyte"])
    assert np.array_equal(y_tr.numpy(), arrays["train-labels-idx1-ubyte"])


def test_a_truncated_archive_is_one_line_naming_it(tmp_path):
    fake_mnist(tmp_path)
    path = tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros(200))[:-5]))
    with pytest.raises(
        DataNotFoundError, match="t10k-labels-idx1-ubyte.gz is missing, unread"
    ) as e:
        read_mnist_like("MNIST", tmp_path)
    assert "\n" not in str(e.value)


def test_the_bundle_holds_the_archives_and_stays_under_64_mib(tmp_path):
    fake_mnist(tmp_path / "data")
    sizes = gpu_check.prepare(tmp_path / "bundle", tmp_path / "data", wheels=False)
    assert sorted(sizes) == sorted(f"MNIST/raw/{n}.gz" for n in gpu_check.MNIST_FILES)
    assert sum(sizes.values()) < gpu_check.BUNDLE_LIMIT
    with pytest.raises(SystemExit, match="not found; pass --data"):
        gpu_check.prepare(tmp_path / "other", tmp_path / "nowhere", wheels=False)


@pytest.mark.slow
def test_the_smoke_check_runs_every_part_without_avalanche_hydra_or_wandb(tmp_path):
    fake_mnist(tmp_path / "data")
    gpu_check.prepare(tmp_path / "bundle", tmp_path / "data", wheels=False)
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(BLOCK)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path / 'site'}{os.pathsep}{ROOT}"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "run", "--bundle",
         str(tmp_path / "bundle"), "--out", str(tmp_path / "out"), "--device", "cpu", "--smoke"],
        env=env, capture_output=True, text=True, timeout=500,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert not summary["avalanche"]
    runs = summary["end_to_end"]
    assert len(runs) == 8 and all(r["ok"] for r in runs), runs  # 2 scenarios x 2 precisions x layer
    assert {r["precision"] for r in runs} == {"32-true", "bf16-mixed"}
    assert summary["importance_match"]["ok"]  # the CPU against itself: the comparison runs
    assert {"ewc", "si", "mas", "anpyc", "layer omega", "layer gates"} <= set(
        summary["importance_match"]["max_relative_error"]
    )
    assert summary["speed_vs_plain"][0]["ratio"] > 0
    assert summary["resnet18_augment"][0]["afmbench_images_s"] > 0
    report = (tmp_path / "out" / "gpu_check.md").read_text()
    assert "8 of 8 runs finished" in report and "all within tolerance" in report
