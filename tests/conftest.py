"""Shared fixtures: one scenario cache per test session, and the real MNIST data when present."""

from __future__ import annotations

import gzip
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]

# The suite's models are tiny: one thread per process is as fast, and two-process DDP tests on
# a two-core machine would otherwise oversubscribe OpenMP and slow down tenfold.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session", autouse=True)
def session_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh scenario cache and leaderboard for the session (never the user's own)."""
    cache = tmp_path_factory.mktemp("afmbench-cache")
    os.environ["AFMBENCH_CACHE_DIR"] = str(cache)
    os.environ["AFMBENCH_LEADERBOARD"] = str(cache / "leaderboard.sqlite")
    return cache


def _shared_data() -> Path | None:
    for candidate in (os.environ.get("AFMBENCH_DATA_DIR"), REPO.parent / "shared" / "data"):
        if candidate and (Path(candidate) / "MNIST" / "raw").is_dir():
            return Path(candidate)
    return None


@pytest.fixture(scope="session")
def mnist_root() -> Path:
    """The folder holding MNIST/raw/*.gz (read-only is fine); skips where there is none."""
    root = _shared_data()
    if root is None:
        pytest.skip("real MNIST not found: set AFMBENCH_DATA_DIR to a folder holding MNIST/raw/")
    return root


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: int = 600
) -> subprocess.CompletedProcess:
    """Run ``afmbench`` in a subprocess exactly as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "afmbench", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
        cwd=REPO,
    )


def idx_bytes(array: np.ndarray) -> bytes:
    """``array`` as an idx file of unsigned bytes (MNIST's format)."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def fake_mnist(folder: Path, n_train: int = 600, n_test: int = 200) -> dict[str, np.ndarray]:
    """The four MNIST archives with learnable images: class c brightens row band c."""
    rng = np.random.default_rng(0)
    arrays = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        y = np.arange(n) % 10
        x = rng.integers(0, 60, (n, 28, 28))
        for i, c in enumerate(y):
            x[i, 2 * c + 3 : 2 * c + 6] = 250
        arrays[f"{prefix}-images-idx3-ubyte"], arrays[f"{prefix}-labels-idx1-ubyte"] = x, y
    raw = folder / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name, array in arrays.items():
        (raw / f"{name}.gz").write_bytes(gzip.compress(idx_bytes(array)))
    return arrays
