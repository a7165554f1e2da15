"""CIFAR loading on small archives generated here in the real python-pickle format."""

import io
import pickle
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from afmbench.errors import ConfigError, DataNotFoundError
from afmbench.scenarios import build_scenario
from afmbench.scenarios.cifar import NORMALIZATION
from afmbench.scenarios.sources import load_cifar


def _batch(rng, n_per_class, n_classes, label_key):
    labels = np.repeat(np.arange(n_classes), n_per_class)
    rng.shuffle(labels)
    data = rng.integers(0, 256, size=(len(labels), 3072), dtype=np.uint8)
    return {"data": data, label_key: labels.tolist(), "batch_label": "generated"}


def _add(tar, name, obj):
    payload = pickle.dumps(obj)
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    """cifar-10-python.tar.gz and cifar-100-python.tar.gz with a handful of images per class."""
    root = tmp_path_factory.mktemp("cifar")
    rng = np.random.default_rng(0)
    with tarfile.open(root / "cifar-10-python.tar.gz", "w:gz") as tar:
        for i in range(1, 6):
            _add(tar, f"cifar-10-batches-py/data_batch_{i}", _batch(rng, 2, 10, "labels"))
        _add(tar, "cifar-10-batches-py/test_batch", _batch(rng, 3, 10, "labels"))
        _add(tar, "cifar-10-batches-py/batches.meta", {"label_names": [f"c{i}" for i in range(10)]})
    with tarfile.open(root / "cifar-100-python.tar.gz", "w:gz") as tar:
        for split, n in (("train", 4), ("test", 2)):
            batch = _batch(rng, n, 100, "fine_labels")
            batch["coarse_labels"] = [c // 5 for c in batch["fine_labels"]]
            _add(tar, f"cifar-100-python/{split}", batch)
        _add(tar, "cifar-100-python/meta", {"fine_label_names": [f"f{i}" for i in range(100)]})
    return root


def test_archive_reader_matches_torchvision_on_the_extracted_files(
    cifar_root, tmp_path, monkeypatch
):
    """Two routes to the same images: our tar reader, and torchvision's CIFAR10 class."""
    import torchvision.datasets.cifar as tv_cifar

    with tarfile.open(cifar_root / "cifar-10-python.tar.gz") as tar:
        tar.extractall(tmp_path, filter="data")
    # the generated files are not the published ones, so skip torchvision's checksum test
    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *args: True)
    CIFAR10 = tv_cifar.CIFAR10
    theirs = CIFAR10(str(tmp_path), train=True, download=False)
    (x, y), _ = load_cifar("CIFAR10", cifar_root)
    assert torch.equal(x, torch.from_numpy(theirs.data))
    assert y.tolist() == theirs.targets


def test_split_cifar10_inputs_equal_torchvision_transforms(cifar_root):
    scenario = build_scenario("split_cifar10", n_experiences=5, root=str(cifar_root))
    assert scenario.head_sizes == (2,) * 5 and scenario.input_shape == (3, 32, 32)
    (raw, labels), _ = load_cifar("CIFAR10", cifar_root)
    tf = transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize(*NORMALIZATION["CIFAR10"])]
    )
    x, y, t = scenario.train(1)  # classes 2 and 3
    assert set(y.tolist()) == {0, 1} and set(t.tolist()) == {1}
    chosen = raw[(labels == 2) | (labels == 3)]
    expected = {tuple(tf(Image.fromarray(img.numpy())).flatten()[:64].tolist()) for img in chosen}
    got = {tuple(row.flatten()[:64].tolist()) for row in x}
    assert got == expected


def test_split_cifar100_in_twenty_experiences(cifar_root):
    scenario = build_scenario(
        "split_cifar100", n_experiences=20, protocol="class", root=str(cifar_root)
    )
    assert scenario.head_sizes == (100,)
    assert scenario.classes[3] == (15, 16, 17, 18, 19)
    _, y, _ = scenario.test(3)
    assert sorted(set(y.tolist())) == [15, 16, 17, 18, 19] and len(y) == 5 * 2


def test_split_cifar110_starts_with_all_of_cifar10(cifar_root):
    scenario = build_scenario(
        "split_cifar110", n_experiences=6, cifar100_classes=50, root=str(cifar_root)
    )
    assert scenario.classes[0] == tuple(range(10))
    assert scenario.classes[1] == tuple(range(10, 20))  # CIFAR-100 classes 0..9, offset by 10
    assert scenario.head_sizes == (10,) * 6
    assert len(scenario.train(0)[0]) == 10 * 2 * 5 and len(scenario.train(5)[0]) == 10 * 4


def test_split_cifar110_names_the_experiences_the_user_asked_for():
    """n_experiences counts CIFAR-10's experience too: the message must name the user's value
    and values that work (it named n_experiences - 1 and its divisors)."""
    with pytest.raises(ConfigError) as caught:
        build_scenario("split_cifar110", n_experiences=4, cifar100_classes=50)
    message = str(caught.value)
    assert message.startswith("scenario.n_experiences=4 does not split the 50 classes")
    assert message.endswith("use one of 2, 3, 6, 11, 26, 51")


def test_missing_cifar_archive_names_the_file(tmp_path):
    with pytest.raises(DataNotFoundError, match="cifar-10-python.tar.gz"):
        build_scenario("split_cifar10", root=str(tmp_path))


def test_corrupt_cifar_archive_is_reported(tmp_path):
    (tmp_path / "cifar-100-python.tar.gz").write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(DataNotFoundError, match="unreadable or incomplete"):
        build_scenario("split_cifar100", root=str(tmp_path), cache=str(tmp_path / "cache"))


def test_the_split_cifar100_resnet18_experiment_runs_end_to_end(cifar_root, tmp_path):
    """The ready experiment, cut to a narrow network and two epochs: ResNet-18, crop and flip,
    the learning-rate milestones and the class-incremental head, through the command line."""
    import json

    from tests.conftest import run_cli

    out = run_cli(
        "run", "experiment=split_cifar100_resnet18", f"data.root={cifar_root}",
        f"run_dir={tmp_path / 'run'}", "model.width=4", "trainer.max_epochs=2",
        "optimizer.lr_milestones=[1]", "scenario.n_experiences=2", "logger=none",
        "trainer.enable_progress_bar=false", f"data.cache={tmp_path / 'cache'}",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert np.array(metrics["accuracy_matrix"]).shape == (2, 2)
    assert metrics["protocol"] == "class"
    config = (tmp_path / "run" / "config.yaml").read_text()
    assert "augment: crop_flip" in config and "width: 4" in config
