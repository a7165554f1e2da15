"""Any Avalanche benchmark as a :class:`Scenario`: :func:`from_avalanche`.

The user's benchmark (``nc_benchmark`` / ``ni_benchmark`` on their own data, a classic one
such as ``SplitTinyImageNet``, ``benchmark_from_datasets``) goes through the same tensor cache
as the built-in scenarios: its streams are iterated once, checked, relabelled for the protocol
and stored; later calls read the tensors back. Avalanche itself is never imported here: any
object with a ``train_stream`` and a ``test_stream`` of experiences whose ``dataset`` yields
``(x, y, task label)`` will do.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from afmbench.errors import ConfigError, first_line
from afmbench.scenarios.base import PROTOCOLS, Scenario
from afmbench.scenarios.cache import cached_scenario, collect, save_split, staged
from afmbench.scenarios.common import scenario_params
from afmbench.scenarios.sources import cache_root

RESERVED = ("protocol", "benchmark", "validation")
"""Keys of ``Scenario.params`` that :func:`from_avalanche` sets (or ``with_validation`` does)."""


def from_avalanche(
    benchmark: Any,
    protocol: str,
    name: str,
    cache: str | Path | None = None,
    params: dict[str, Any] | None = None,
) -> Scenario:
    """Materialize ``benchmark`` once into the tensor cache and return it as a scenario.

    The cache folder is keyed by ``name``, ``params``, ``protocol`` and a fingerprint of the
    benchmark: its type, the number of experiences per stream and, per experience, its size,
    classes, task labels, the hash of its targets and of its first and last inputs. Other
    inputs are not read for the key: after changing some pixels alone, change ``name`` or
    ``params``. Training data is
    read through the datasets' eval transforms (``dataset.eval()``): cached tensors are never
    augmented.

    Targets become what each protocol trains on (:func:`relabel`); ``Scenario.classes`` keeps
    the original class ids (``benchmark.original_classes_in_exp`` where the benchmark has it).
    """
    if protocol not in PROTOCOLS:
        raise ConfigError(f"unknown protocol '{protocol}'", f"use one of {', '.join(PROTOCOLS)}")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise ValueError(
            f"name {name!r} must be letters, digits, '_', '-' or '.' (it names the cache folder)"
        )
    params = _check_params(params)
    streams = _streams(benchmark)
    survey = {split: [_describe(e) for e in stream] for split, stream in streams.items()}
    originals = _original_classes(benchmark, len(streams["train"]))
    _check_labels(protocol, [d["tasks"] for d in survey["train"]], originals,
                  [d["classes"] for d in survey["train"]])  # fmt: skip
    params = {**params, "protocol": protocol, "benchmark": _fingerprint(benchmark, survey)}

    def write(_benchmark: Any, folder: Path, title: str) -> None:
        _materialize(streams, originals, protocol, folder, title)

    return cached_scenario(
        name, protocol, params, lambda: benchmark, cache_root(cache), write=write
    )


def relabel(
    protocol: str, train: list[tuple[Tensor, Tensor]], test: list[tuple[Tensor, Tensor]]
) -> tuple[list[tuple[Tensor, Tensor]], list[tuple[Tensor, Tensor]]]:
    """Each experience's ``(y, t)`` as the protocol's heads read them.

    ``task``: each task's targets become indices into its head, in sorted order of the task's
    classes (0..k-1: unchanged when the benchmark numbers classes from zero in each
    experience); every sample keeps its task label. ``domain``: targets are kept when all of
    them are already below the shared head's size (the most classes in one experience: zero-based
    experiences, or experiences that share their classes as ``ni_benchmark``'s do); otherwise
    each experience's targets become indices into its own sorted classes. ``class``: targets
    are kept when the classes are 0..n-1, otherwise they become indices into all classes in
    sorted order. Under ``domain`` and ``class`` task labels become 0 (the model is given none).
    """
    own = [sorted(set(y.tolist())) for y, _ in train]
    if protocol == "task":
        by_task = {int(t[0]): classes for (_, t), classes in zip(train, own)}

        def relabel_one(where: str, e: int, y: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
            index = torch.empty_like(y)
            for task in t.unique().tolist():
                if task not in by_task:
                    raise ValueError(f"{where} holds task label {task}, which no training "
                                     "experience has: a task's head is trained on its own data")  # fmt: skip
                rows = t == task
                index[rows] = _index_of(where, y[rows], by_task[task], f"task {task}'s training")
            return index, t

    else:
        every = sorted({c for classes in own for c in classes})
        if protocol == "domain":
            width = max(len(classes) for classes in own)
            keep = all(0 <= classes[0] and classes[-1] < width for classes in own)
        else:
            keep = every == list(range(len(every)))

        def relabel_one(where: str, e: int, y: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
            if keep:
                return y, torch.zeros_like(t)
            if protocol == "domain":
                return _index_of(where, y, own[e], f"training experience {e}'s"), torch.zeros_like(
                    t
                )
            return _index_of(where, y, every, "the training"), torch.zeros_like(t)

    return (
        [relabel_one(f"train experience {e}", e, y, t) for e, (y, t) in enumerate(train)],
        [relabel_one(f"test experience {e}", e, y, t) for e, (y, t) in enumerate(test)],
    )


def _index_of(where: str, y: Tensor, classes: list[int], whose: str) -> Tensor:
    """The position of each of ``y`` in the sorted ``classes``, or a one-line error."""
    table = torch.tensor(classes, dtype=y.dtype)
    index = torch.searchsorted(table, y).clamp(max=len(table) - 1)
    missing = table[index] != y
    if missing.any():
        raise ValueError(
            f"{where} holds classes {sorted(set(y[missing].tolist()))} that {whose} data lacks: "
            "a head only has outputs for classes it is trained on"
        )
    return index


def _materialize(
    streams: dict[str, list[Any]],
    originals: list[list[int]] | None,
    protocol: str,
    folder: Path,
    name: str,
) -> None:
    """Iterate every experience once, check and store it raw, then store the protocol's
    targets (:func:`relabel`) where they differ from the benchmark's own."""
    from tqdm.auto import tqdm

    labels: dict[str, list[tuple[Tensor, Tensor]]] = {"train": [], "test": []}
    shape: tuple[int, ...] | None = None
    total = sum(map(len, streams.values()))
    bar = tqdm(total=total, desc=f"materializing {name} (once)", unit="split", leave=False)
    with staged(folder) as tmp, bar:
        for split, stream in streams.items():
            for e, experience in enumerate(stream):
                where = f"{split} experience {e}"
                x, y, t = _collect(where, experience.dataset)
                shape = tuple(x.shape[1:]) if shape is None else shape
                _check_inputs(where, x, shape)
                save_split(tmp / f"{split}_{e}.pt", (x, y, t))
                labels[split].append((y, t))
                if split == "train":  # a shared task label is refused before the next one
                    tasks = [sorted(set(t.tolist())) for _, t in labels["train"]]
                    tasks += [None] * (len(stream) - len(tasks))
                    _check_labels(protocol, tasks, None, None)
                bar.update()
        own = [sorted(set(y.tolist())) for y, _ in labels["train"]]
        _check_labels(protocol, [[int(t[0])] for _, t in labels["train"]], originals, own)
        train, test = relabel(protocol, labels["train"], labels["test"])
        for split, new in (("train", train), ("test", test)):
            for e, ((y, t), (y_new, t_new)) in enumerate(zip(labels[split], new)):
                if not (torch.equal(y, y_new) and torch.equal(t, t_new)):
                    path = tmp / f"{split}_{e}.pt"
                    blob = torch.load(path, weights_only=True)
                    torch.save({**blob, "y": y_new, "t": t_new}, path)
        classes = originals if originals is not None and _same_sizes(originals, own) else own
        meta = {
            "classes": [sorted(c) for c in classes],
            "task_ids": [int(t[0]) for _, t in train],
            "input_shape": list(shape or ()),
        }
        (tmp / "meta.json").write_text(json.dumps(meta))


def _collect(where: str, dataset: Any) -> tuple[Tensor, Tensor, Tensor]:
    """All of an experience's samples, read without augmentation, or a one-line error."""
    if callable(getattr(dataset, "eval", None)):
        dataset = dataset.eval()
    try:
        return collect(dataset)
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"{where}: its samples do not stack into (inputs, label, task label) tensors "
            f"({first_line(exc)}); give the datasets a transform that yields tensors (e.g. "
            "torchvision's ToTensor()) and make them Avalanche classification datasets"
        ) from exc


def _check_inputs(where: str, x: Tensor, shape: tuple[int, ...]) -> None:
    """The rules :func:`~afmbench.scenarios.base._check_split` applies, with fixes that apply
    to an Avalanche benchmark (its labels are made integers by :func:`collect`)."""
    if x.dtype != torch.float32:
        fix = "x.float()" if x.is_floating_point() else "ToTensor() or x.float() / 255 for images"
        raise TypeError(
            f"{where}: inputs are {x.dtype}, the models take float32: give the benchmark's "
            f"datasets a transform that yields float32 ({fix})"
        )
    if tuple(x.shape[1:]) != shape:
        raise ValueError(
            f"{where}: inputs of shape {tuple(x.shape[1:])}, not {shape} as in train experience "
            "0: every experience must yield inputs of one shape (resize in the transform)"
        )


def _check_labels(
    protocol: str,
    tasks: list[list[int] | None],
    originals: list[list[int]] | None,
    classes: list[list[int] | None] | None,
) -> None:
    """Refuse task labels (per training experience) or class ids the protocol cannot train
    on; ``None`` stands for what the benchmark does not say up front."""
    if protocol == "task":
        seen: dict[int, int] = {}
        for e, labels in enumerate(tasks):
            if labels is None:
                continue
            if len(labels) != 1:
                raise ValueError(
                    f"train experience {e} holds task labels {labels}: under protocol=task each "
                    "experience is one task (one head); use protocol='domain' or 'class'"
                )
            if labels[0] in seen:
                raise ValueError(
                    f"train experiences {seen[labels[0]]} and {e} share task label {labels[0]}: "
                    "under protocol=task each experience needs its own task label and head; "
                    "build the benchmark with task_labels=True, or use protocol='domain' or 'class'"
                )
            seen[labels[0]] = e
        if len(seen) == len(tasks) and max(seen) >= len(tasks):
            raise ValueError(
                f"task labels {sorted(seen)} must be 0..{len(tasks) - 1} under protocol=task "
                "(one head each): build the benchmark with task_labels=True"
            )
    if protocol == "class" and originals is not None and classes and None not in classes:
        n_original = len({c for cs in originals for c in cs})
        n_labels = len({c for cs in classes for c in cs})  # type: ignore[union-attr]
        if n_original > n_labels:
            raise ValueError(
                f"the benchmark numbers its {n_original} classes from zero in each experience "
                f"({n_labels} distinct targets), so under protocol=class experiences would share "
                "outputs: build it with class_ids_from_zero_in_each_exp=False, or use "
                "protocol='task' or 'domain'"
            )


def _streams(benchmark: Any) -> dict[str, list[Any]]:
    """The train and test experiences, with one line for a stream afmbench cannot follow."""
    if not all(hasattr(benchmark, s) for s in ("train_stream", "test_stream")):
        raise TypeError(
            f"benchmark must be an Avalanche benchmark (with train_stream and test_stream), "
            f"got {type(benchmark).__name__}"
        )
    streams = {"train": list(benchmark.train_stream), "test": list(benchmark.test_stream)}
    for split, stream in streams.items():
        if not stream:
            raise ValueError(f"the benchmark's {split} stream is empty: it needs an experience")
        for e, experience in enumerate(stream):
            if len(experience.dataset) == 0:
                raise ValueError(f"{split} experience {e} of the benchmark holds no samples")
    n_train, n_test = len(streams["train"]), len(streams["test"])
    if n_train != n_test:
        raise ValueError(
            f"the benchmark has {n_train} training but {n_test} test experiences: every "
            "experience is tested after each one, so give the test stream one experience per "
            "training experience (ni_benchmark's single test set, e.g., repeated or split)"
        )
    return streams


def _describe(experience: Any) -> dict[str, Any]:
    """What an experience says about itself without yielding a sample (for the fingerprint
    and the checks made before iterating)."""
    dataset = experience.dataset
    targets = _ask(lambda: torch.as_tensor(list(dataset.targets), dtype=torch.long))
    return {
        "inputs": _ask(lambda: _input_hash(dataset)),
        "size": len(dataset),
        "classes": _ask(lambda: sorted(int(c) for c in experience.classes_in_this_experience)),
        "tasks": _ask(lambda: sorted({int(t) for t in experience.task_labels})),
        "targets": None if targets is None else hashlib.sha256(targets.numpy()).hexdigest(),
    }


def _input_hash(dataset: Any) -> str:
    """A hash of the first and last inputs, read without augmentation: new pixels, new key."""
    if callable(getattr(dataset, "eval", None)):
        dataset = dataset.eval()
    digest = hashlib.sha256()
    for i in sorted({0, len(dataset) - 1}):
        digest.update(torch.as_tensor(dataset[i][0]).contiguous().numpy().tobytes())
    return digest.hexdigest()


def _ask(question: Any) -> Any:
    """``question()``, or None where the benchmark cannot answer it."""
    try:
        return question()
    except (AttributeError, TypeError, ValueError, KeyError, IndexError, NotImplementedError):
        return None


def _original_classes(benchmark: Any, n: int) -> list[list[int]] | None:
    original = _ask(
        lambda: [sorted(int(c) for c in cs) for cs in benchmark.original_classes_in_exp]
    )
    return original if original is not None and len(original) == n else None


def _same_sizes(originals: list[list[int]], own: list[list[int]]) -> bool:
    return [len(c) for c in originals] == [len(c) for c in own]


def _fingerprint(benchmark: Any, survey: dict[str, list[dict[str, Any]]]) -> str:
    ident = {
        "type": f"{type(benchmark).__module__}.{type(benchmark).__qualname__}",
        "streams": survey,
        "original_classes": _original_classes(benchmark, len(survey["train"])),
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def _check_params(params: Any) -> dict[str, Any]:
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise TypeError(f"params must be a dict, got {type(params).__name__}")
    clash = sorted(set(params) & set(RESERVED))
    if clash:
        raise ValueError(
            f"params may not set {', '.join(clash)}: from_avalanche sets protocol and benchmark,"
            " and scenario.with_validation(fraction) holds out validation data"
        )
    try:
        params = scenario_params(**params)
        json.dumps(params, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"params must be JSON-friendly (they name the cache folder): {first_line(exc)}"
        ) from exc
    return params
