"""Materialize an Avalanche benchmark once into tensors on disk, then serve it from there.

Avalanche yields one sample at a time through its transform pipeline, which is slower than
training a small model. Each experience is therefore iterated once, stored losslessly (pixel
values become small integer codes into a table of the distinct floats), and later runs load
the tensors without importing Avalanche at all. The cache folder name is a hash of the
scenario's name, its parameters, the cache format and the Avalanche version.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import pickle
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from afmbench.errors import DataNotFoundError, first_line
from afmbench.scenarios.base import Scenario, Split

CACHE_FORMAT = 1

_checking_only: ContextVar[bool] = ContextVar("afmbench_scenario_check_only", default=False)


class _Checked(Exception):
    """Raised instead of building once a builder's parameter checks have passed."""


@contextmanager
def check_only() -> Iterator[None]:
    """Run scenario builders up to their parameter checks only: nothing is read or built.

    Lets the CLI reject e.g. ``n_experiences=3`` for a ten-class scenario before a run starts.
    """
    token = _checking_only.set(True)
    try:
        yield
    except _Checked:
        pass
    finally:
        _checking_only.reset(token)


def encode(x: Tensor) -> dict[str, Tensor]:
    """Store ``x`` as integer codes into its sorted distinct values when that is smaller."""
    values, codes = torch.unique(x, return_inverse=True)
    if len(values) <= 256:
        return {"values": values, "codes": codes.to(torch.uint8)}
    if len(values) <= 32768:
        return {"values": values, "codes": codes.to(torch.int16)}
    return {"raw": x}


def decode(packed: dict[str, Tensor]) -> Tensor:
    """Invert :func:`encode` exactly."""
    if "raw" in packed:
        return packed["raw"]
    codes = packed["codes"]
    # index_select takes 32-bit indices: half the time of indexing with int64 codes
    return packed["values"].index_select(0, codes.flatten().int()).view(codes.shape)


@dataclass
class DiskStore:
    """Experiences saved by :func:`materialize` in ``path`` (``train_<e>.pt``, ``test_<e>.pt``)."""

    path: Path

    def load(self, split: str, index: int) -> Split:
        path = self.path / f"{split}_{index}.pt"
        try:
            blob = torch.load(path, weights_only=True)
            return decode(blob["x"]), blob["y"], blob["t"]
        except (
            RuntimeError,
            OSError,
            EOFError,
            ValueError,
            KeyError,
            pickle.UnpicklingError,
        ) as exc:
            raise damaged(path, exc) from exc


def damaged(path: Path, exc: Exception) -> DataNotFoundError:
    """A cache file that cannot be read: derived data, so the fix is to let it be rebuilt."""
    folder = path.parent
    return DataNotFoundError(
        f"the scenario cache file {path} is damaged ({first_line(exc).split('. ')[0]})",
        f"delete {folder}; the next run rebuilds it from the data",
    )


def cache_key(name: str, params: dict[str, Any], source: Path | None = None) -> str:
    """A short hash naming the cache folder of one scenario built from the data in ``source``."""
    ident = {
        "name": name,
        "params": params,
        "source": str(source.resolve()) if source is not None else None,
        "format": CACHE_FORMAT,
        "avalanche": version("avalanche-lib"),
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def cached_scenario(
    name: str,
    protocol: str,
    params: dict[str, Any],
    build_benchmark: Callable[[], Any],
    cache: Path,
    source: Path | None = None,
    write: Callable[[Any, Path, str], None] | None = None,
    seeded: bool = True,
) -> Scenario:
    """Return the scenario from the cache, materializing ``build_benchmark()`` first if needed.

    ``source`` (the data root) is part of the key: another folder may hold other files.
    ``seeded=False`` says the seed does not change the tensors (a fixed class order), so it is
    left out of the key and runs of every seed share one folder.
    Concurrent processes (DDP ranks, sweep jobs) wait on a file lock so one of them writes.
    ``write(benchmark, folder, name)`` fills the folder (default: :func:`materialize`).
    """
    if _checking_only.get():
        raise _Checked
    key = params if seeded else {k: v for k, v in params.items() if k != "seed"}
    folder = cache / "scenarios" / f"{name}-{cache_key(name, key, source)}"
    if not (folder / "meta.json").is_file():
        folder.parent.mkdir(parents=True, exist_ok=True)
        with _file_lock(folder.with_suffix(".lock")):
            if not (folder / "meta.json").is_file():
                (write or materialize)(build_benchmark(), folder, name)
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError) as exc:
        raise damaged(folder / "meta.json", exc) from exc
    return scenario_from_meta(name, protocol, params, meta, DiskStore(folder))


def scenario_from_meta(
    name: str, protocol: str, params: dict[str, Any], meta: dict[str, Any], store: Any
) -> Scenario:
    """Assemble a :class:`Scenario` from the per-experience classes and task labels."""
    classes = tuple(tuple(c) for c in meta["classes"])
    sizes = [len(c) for c in classes]
    if protocol == "task":
        size_of_task = dict(zip(meta["task_ids"], sizes))
        head_sizes = tuple(size_of_task[t] for t in range(max(size_of_task) + 1))
    elif protocol == "domain":
        head_sizes = (max(sizes),)
    else:
        head_sizes = (len({c for cs in classes for c in cs}),)
    return Scenario(
        name=name,
        protocol=protocol,
        input_shape=tuple(meta["input_shape"]),
        head_sizes=head_sizes,
        classes=classes,
        task_ids=tuple(meta["task_ids"]),
        store=store,
        params=params,
    )


def materialize(benchmark: Any, folder: Path, name: str) -> None:
    """Iterate every experience of an Avalanche benchmark once and save its tensors."""
    from tqdm.auto import tqdm

    streams = {"train": benchmark.train_stream, "test": benchmark.test_stream}
    n = len(benchmark.train_stream)
    meta: dict[str, Any] = {"classes": [], "task_ids": []}
    bar = tqdm(total=2 * n, desc=f"materializing {name} (once)", unit="split", leave=False)
    with staged(folder) as tmp, bar:
        for split, stream in streams.items():
            for e, experience in enumerate(stream):
                x, y, t = collect(experience.dataset)
                save_split(tmp / f"{split}_{e}.pt", (x, y, t))
                if split == "train":
                    meta["classes"].append(sorted(benchmark.original_classes_in_exp[e]))
                    meta["task_ids"].append(int(experience.task_label))
                    meta["input_shape"] = list(x.shape[1:])
                bar.update()
        (tmp / "meta.json").write_text(json.dumps(meta))


@contextmanager
def staged(folder: Path) -> Iterator[Path]:
    """A fresh folder beside ``folder`` that replaces it when the block ends, or is removed if
    the block raises: readers never see half a cache."""
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)


def save_split(path: Path, split: Split) -> None:
    """Write one experience's ``(x, y, t)`` as :class:`DiskStore` reads it."""
    x, y, t = split
    torch.save({"x": encode(x), "y": y, "t": t}, path)


def collect(dataset: Any, batch_size: int = 2048) -> Split:
    """Stack every ``(x, y, t)`` an Avalanche dataset yields, in its own order."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    xs, ys, ts = [], [], []
    for x, y, t in loader:
        xs.append(x)
        ys.append(torch.as_tensor(y, dtype=torch.long))
        ts.append(torch.as_tensor(t, dtype=torch.long))
    if not xs:
        raise DataNotFoundError("an experience of the scenario is empty", "check the data files")
    return torch.cat(xs), torch.cat(ys), torch.cat(ts)


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
