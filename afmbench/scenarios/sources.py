"""Where raw data sets come from: the data root, the writable cache, and the original archives.

The data root may be read-only and hold only the original archives in torchvision's layout
(``MNIST/raw/*.gz``, ``FashionMNIST/raw/*.gz``, ``cifar-10-python.tar.gz``,
``cifar-100-python.tar.gz``). Anything that must be extracted goes to the cache. Nothing is
ever downloaded: a missing file is a :class:`DataNotFoundError` naming what to put where.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import pickle
import shutil
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from afmbench.errors import DataNotFoundError

MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
IDX_ITEM_BYTES = {0x08: 1, 0x09: 1, 0x0B: 2, 0x0C: 4, 0x0D: 4, 0x0E: 8}  # by type code
CIFAR_ARCHIVES = {
    "CIFAR10": ("cifar-10-python.tar.gz", "cifar-10-batches-py"),
    "CIFAR100": ("cifar-100-python.tar.gz", "cifar-100-python"),
}

ImageSplit = tuple[Tensor, Tensor]
"""uint8 images (N, H, W) or (N, H, W, C) and int64 labels (N,)."""


def data_root(root: str | os.PathLike | None = None) -> Path:
    """The folder holding original archives: ``root``, else ``$AFMBENCH_DATA_DIR``, else ``./data``."""
    return Path(root or os.environ.get("AFMBENCH_DATA_DIR") or "data").expanduser()


def cache_root(cache: str | os.PathLike | None = None) -> Path:
    """The writable cache: ``cache``, else ``$AFMBENCH_CACHE_DIR``, else ``~/.cache/afmbench``."""
    default = Path("~/.cache/afmbench")
    return Path(cache or os.environ.get("AFMBENCH_CACHE_DIR") or default).expanduser()


def extracted_root(root: Path, cache: Path) -> Path:
    """Where the cache keeps the files decompressed from data root ``root``: a folder of its
    own per root, so that two data folders never share (and mix up) their extracted files."""
    key = hashlib.sha256(str(root.expanduser().resolve()).encode()).hexdigest()[:12]
    return cache / "datasets" / key


def prepare_mnist_like(name: str, root: Path, cache: Path) -> Path:
    """Make ``<extracted root>/<name>/raw`` hold the four decompressed idx files; return the
    extracted root (:func:`extracted_root`).

    torchvision's MNIST-style datasets read the decompressed files; the data root may only
    have the ``.gz`` archives and may be read-only, so decompression happens in the cache.
    """
    source = root / name / "raw"
    target_root = extracted_root(root, cache)
    target = target_root / name / "raw"
    missing = [
        f for f in MNIST_FILES if not (source / f).is_file() and not (source / f"{f}.gz").is_file()
    ]
    if missing and not all((target / f).is_file() for f in MNIST_FILES):
        raise DataNotFoundError(
            f"{name} data not found: expected {', '.join(f + '.gz' for f in missing)} in {source}",
            f"copy the original {name} archives (torchvision layout) there, "
            "or point data.root / AFMBENCH_DATA_DIR at the folder holding "
            f"{name}/raw/ (nothing is downloaded)",
        )
    target.mkdir(parents=True, exist_ok=True)
    for f in MNIST_FILES:
        if (target / f).is_file():
            continue
        tmp = target / f"{f}.tmp{os.getpid()}"
        original = source / f if (source / f).is_file() else source / f"{f}.gz"
        try:
            if original.suffix != ".gz":
                shutil.copyfile(original, tmp)
            else:
                with gzip.open(original, "rb") as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst)
            check_idx(tmp)
        except (EOFError, OSError, zlib.error, ValueError) as exc:
            tmp.unlink(missing_ok=True)
            raise DataNotFoundError(
                f"{name} file {original} is unreadable or incomplete ({exc})",
                f"replace it with the original {original.name}",
            ) from exc
        os.replace(tmp, target / f)
    return target_root


def check_idx(path: Path) -> None:
    """Raise ``ValueError`` unless ``path`` is a whole idx file (the MNIST format): its header
    gives the element type and every dimension, hence the exact size."""
    with open(path, "rb") as handle:
        item, dims, offset = idx_layout(handle.read(4 + 4 * 255))
    expected = offset + item * math.prod(dims)
    if path.stat().st_size != expected:
        raise ValueError(f"{path.stat().st_size} bytes where its header says {expected}")


def idx_layout(head: bytes) -> tuple[int, tuple[int, ...], int]:
    """From the first bytes of an idx file: the bytes per element, the dimensions and where the
    data starts. ``ValueError`` (``struct.error`` if cut short) when it is not one."""
    if len(head) < 4 or head[:2] != b"\0\0" or head[2] not in IDX_ITEM_BYTES:
        raise ValueError("not an idx file")
    ndim = head[3]
    return IDX_ITEM_BYTES[head[2]], struct.unpack(f">{ndim}I", head[4 : 4 + 4 * ndim]), 4 + 4 * ndim


def read_mnist_like(name: str, root: Path) -> tuple[ImageSplit, ImageSplit]:
    """The four idx archives of ``root/name/raw`` (``.gz`` or decompressed) as uint8 images
    (N, 28, 28) and labels, read without Avalanche or torchvision (for machines that have
    neither, such as a bare GPU machine)."""
    source = root / name / "raw"
    arrays = []
    for f in MNIST_FILES:
        path = source / f if (source / f).is_file() else source / f"{f}.gz"
        try:
            data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
            _, dims, offset = idx_layout(data)
            if data[2] != 0x08 or len(data) != offset + math.prod(dims):
                raise ValueError("not a whole idx file of bytes")
        except (OSError, EOFError, zlib.error, ValueError, struct.error) as exc:
            raise DataNotFoundError(
                f"{name} file {path} is missing, unreadable or incomplete ({exc})",
                f"put the original {name} archives (torchvision layout) in {source}",
            ) from None
        body = np.frombuffer(data, np.uint8, offset=offset).reshape(dims)
        arrays.append(torch.from_numpy(body.copy()))
    x_tr, y_tr, x_te, y_te = arrays
    return (x_tr, y_tr.long()), (x_te, y_te.long())


def load_cifar(name: str, root: Path) -> tuple[ImageSplit, ImageSplit]:
    """Read CIFAR-10 or CIFAR-100 straight from the original python-format archive.

    Accepts either the ``.tar.gz`` or its extracted folder in ``root``. Returns uint8 images
    (N, 32, 32, 3) and labels (fine labels for CIFAR-100) for the train and test splits.
    """
    archive, folder = CIFAR_ARCHIVES[name]
    if (root / folder).is_dir():
        read = lambda member: (root / folder / member).read_bytes()  # noqa: E731
        return _parse_cifar(name, read)
    if not (root / archive).is_file():
        raise DataNotFoundError(
            f"{name} data not found: expected {archive} (or the extracted {folder}/) in {root}",
            f"copy the original {archive} there, or point data.root / AFMBENCH_DATA_DIR at "
            "the folder holding it (nothing is downloaded)",
        )
    try:
        with tarfile.open(root / archive, "r:gz") as tar:

            def read(member: str) -> bytes:
                handle = tar.extractfile(f"{folder}/{member}")
                if handle is None:
                    raise KeyError(member)
                return handle.read()

            return _parse_cifar(name, read)
    except (tarfile.TarError, KeyError, EOFError, OSError, pickle.UnpicklingError) as exc:
        raise DataNotFoundError(
            f"{name} archive {root / archive} is unreadable or incomplete ({exc})",
            f"replace it with the original {archive}",
        ) from exc


def _parse_cifar(name: str, read) -> tuple[ImageSplit, ImageSplit]:
    if name == "CIFAR10":
        train_members = [f"data_batch_{i}" for i in range(1, 6)]
        test_members, label_key = ["test_batch"], "labels"
    else:
        train_members, test_members, label_key = ["train"], ["test"], "fine_labels"

    def split(members: list[str]) -> ImageSplit:
        images, labels = [], []
        for member in members:
            # The archives are Python 2 pickles; latin1 decodes their keys as torchvision does.
            batch = pickle.loads(read(member), encoding="latin1")
            images.append(np.asarray(batch["data"], dtype=np.uint8))
            labels.append(np.asarray(batch[label_key], dtype=np.int64))
        x = np.concatenate(images).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.concatenate(labels))

    return split(train_members), split(test_members)


def load_digits_split(test_fraction: float = 0.3) -> tuple[ImageSplit, ImageSplit]:
    """scikit-learn's bundled 8x8 digits (1797 images, values 0..16), split once, stratified.

    The split is fixed (``random_state=0``) so every seed is scored on the same test set.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = digits.images.astype(np.uint8)
    y = digits.target.astype(np.int64)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_fraction, random_state=0, stratify=y
    )
    as_t = torch.from_numpy
    return (as_t(x_tr), as_t(y_tr)), (as_t(x_te), as_t(y_te))
