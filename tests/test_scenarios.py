"""Scenarios: protocols, class orders, the tensor cache, and equality with Avalanche's own output."""

import gzip
import re

import numpy as np
import pytest
import torch

from afmbench.errors import ConfigError, DataNotFoundError
from afmbench.scenarios import build_scenario
from afmbench.scenarios.cache import decode, encode
from afmbench.scenarios.sources import extracted_root, prepare_mnist_like
from tests.conftest import fake_mnist, idx_bytes


def test_split_digits_task_protocol_has_one_two_way_head_per_task():
    scenario = build_scenario("split_digits", n_experiences=5, protocol="task")
    assert scenario.head_sizes == (2, 2, 2, 2, 2)
    assert scenario.classes == ((0, 1), (2, 3), (4, 5), (6, 7), (8, 9))
    assert scenario.task_ids == (0, 1, 2, 3, 4)
    x, y, t = scenario.train(3)
    assert x.shape[1:] == (1, 8, 8) and x.dtype == torch.float32
    assert set(y.tolist()) == {0, 1} and set(t.tolist()) == {3}
    assert 0.0 <= x.min() and x.max() <= 1.0


def test_split_digits_class_protocol_keeps_global_labels_and_one_head():
    scenario = build_scenario("split_digits", n_experiences=5, protocol="class")
    assert scenario.head_sizes == (10,)
    _, y, t = scenario.test(2)
    assert set(y.tolist()) == {4, 5} and set(t.tolist()) == {0}


def test_split_digits_domain_protocol_shares_one_two_way_head():
    scenario = build_scenario("split_digits", n_experiences=5, protocol="domain")
    assert scenario.head_sizes == (2,)
    _, y, t = scenario.train(4)
    assert set(y.tolist()) == {0, 1} and set(t.tolist()) == {0}


def test_shuffled_class_order_follows_the_seed():
    a = build_scenario("split_digits", class_order="shuffled", seed=1)
    b = build_scenario("split_digits", class_order="shuffled", seed=1)
    c = build_scenario("split_digits", class_order="shuffled", seed=2)
    assert a.classes == b.classes
    assert a.classes != c.classes
    assert sorted(sum(a.classes, ())) == list(range(10))


def test_explicit_class_order():
    scenario = build_scenario(
        "split_digits", n_experiences=2, class_order=[9, 8, 7, 6, 5, 4, 3, 2, 1, 0]
    )
    assert scenario.classes == ((5, 6, 7, 8, 9), (0, 1, 2, 3, 4))


def test_permuted_digits_permutes_pixels_differently_per_experience():
    scenario = build_scenario("permuted_digits", n_experiences=3, seed=0)
    (x0, y0, _), (x1, y1, _) = scenario.train(0), scenario.train(1)
    assert torch.equal(y0, y1)
    assert not torch.equal(x0, x1)
    # a permutation moves pixels, so each image keeps its multiset of values
    assert torch.equal(x0.flatten(1).sort(dim=1).values, x1.flatten(1).sort(dim=1).values)


def test_joint_train_concatenates_every_experience():
    scenario = build_scenario("split_digits")
    x, y, t = scenario.joint_train()
    assert len(x) == sum(len(scenario.train(e)[0]) for e in range(5))
    assert set(t.tolist()) == set(range(5))


@pytest.mark.parametrize(
    "params, message",
    [
        ({"n_experiences": 3}, "does not split the 10 classes"),
        ({"protocol": "sideways"}, "unknown protocol"),
        ({"class_order": [0, 1]}, "not a valid class order"),
    ],
)
def test_bad_split_parameters_name_the_problem(params, message):
    with pytest.raises(ConfigError, match=message):
        build_scenario("split_digits", **params)


def _split(n=8, x=None, y=None, t=None):
    g = torch.Generator().manual_seed(0)
    return (
        torch.randn(n, 1, 2, 2, generator=g) if x is None else x,
        torch.randint(0, 2, (n,), generator=g) if y is None else y,
        torch.zeros(n, dtype=torch.long) if t is None else t,
    )


@pytest.mark.parametrize("split, heads, error, message", [
    (_split(x=torch.zeros(8, 1, 2, 2, dtype=torch.uint8)), (2,), TypeError,
     "train split 0: inputs are torch.uint8; pass float32 (x.float() / 255 for 8-bit images)"),
    (_split(x=torch.zeros(8, 1, 2, 2, dtype=torch.float64)), (2,), TypeError, "pass float32 (x.float())"),
    (_split(y=torch.zeros(8)), (2,), TypeError, "labels are torch.float32; pass integers"),
    (_split(t=torch.zeros(8, dtype=torch.bool)), (2,), TypeError, "task labels are torch.bool"),
    (_split(y=torch.zeros(5, dtype=torch.long)), (2,), ValueError, "8 inputs, 5 labels and 8 task labels"),
    (_split(y=torch.full((8,), 2)), (2,), ValueError, "labels must be class indices below"),
    (_split(y=torch.full((8,), -1)), (2,), ValueError, "labels must be class indices below"),
    (_split(t=torch.full((8,), 2)), (2, 2), ValueError, "task labels must lie in [0, 2)"),
    # task 1's head has 3 classes, task 0's only 2
    (_split(y=torch.full((8,), 2), t=torch.tensor([1] * 7 + [0])), (2, 3), ValueError, "below"),
    (_split()[:2], (2,), ValueError, "must be (inputs, labels, task labels), got 2 tensors"),
])  # fmt: skip
def test_scenario_from_tensors_names_what_is_wrong_with_a_split(split, heads, error, message):
    from afmbench.scenarios import Scenario

    with pytest.raises(error, match=re.escape(message)):
        Scenario.from_tensors("toy", "task", [split], [_split()], heads)
    fine = _split(y=torch.full((8,), 2), t=torch.ones(8, dtype=torch.long))  # class 2 of task 1
    assert Scenario.from_tensors("toy", "task", [fine], [fine], (2, 3)).head_sizes == (2, 3)
    one_head = _split(t=torch.full((8,), 5))  # with one head the task labels choose nothing
    assert Scenario.from_tensors("toy", "domain", [one_head], [one_head], (2,)).n_experiences == 1
    with pytest.raises(ValueError, match="at least one"):
        Scenario.from_tensors("toy", "domain", [], [], (2,))


def test_scenario_from_tensors_checks_heads_and_task_labels_against_the_protocol():
    """Each used to be accepted: a shared-head protocol with several heads trained head 0 and
    scored task 1 on an untrained head; a task label without a head failed mid-training; a
    training split mixing tasks was trained on its first sample's head only."""
    from afmbench.scenarios import Scenario

    two_tasks = _split(t=torch.tensor([0, 1] * 4))
    cases = [
        ("domain", [_split()], (2, 2), "the domain protocol trains one shared head"),
        ("task", [_split(t=torch.ones(8, dtype=torch.long))], (2,), "must lie in [0, 1)"),
        ("task", [two_tasks], (2, 2), "train split 0 holds task labels [0, 1]"),
    ]
    for protocol, train, heads, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            Scenario.from_tensors("toy", protocol, train, train, heads)
    joint_test = Scenario.from_tensors("toy", "task", [_split()], [two_tasks], (2, 2))
    assert joint_test.task_ids == (0,)  # a test split may mix tasks: each sample uses its head


def test_permuted_scenarios_reject_the_class_protocol():
    with pytest.raises(ConfigError, match="not available for permuted_digits"):
        build_scenario("permuted_digits", protocol="class")


def test_unknown_scenario_lists_valid_names():
    with pytest.raises(ConfigError, match="split_mnist"):
        build_scenario("nope")


def test_encode_is_lossless_for_pixel_data_and_falls_back_to_raw():
    pixels = (torch.randint(0, 256, (50, 3, 4, 4)).float() / 255 - 0.5) / 0.25
    packed = encode(pixels)
    assert packed["codes"].dtype == torch.uint8
    assert torch.equal(decode(packed), pixels)
    levels = torch.randint(0, 1000, (20, 30)).float() / 999  # more than 256 distinct values
    assert encode(levels)["codes"].dtype == torch.int16
    assert torch.equal(decode(encode(levels)), levels)
    noise = torch.randn(100, 400)
    assert "raw" in encode(noise) and torch.equal(decode(encode(noise)), noise)


def test_cached_scenario_is_read_back_without_rebuilding(monkeypatch):
    first = build_scenario("split_digits", n_experiences=2)
    import afmbench.scenarios.cache as cache

    monkeypatch.setattr(cache, "materialize", lambda *a, **k: pytest.fail("cache miss"))
    again = build_scenario("split_digits", n_experiences=2)
    assert again.classes == first.classes
    assert torch.equal(again.train(1)[0], first.train(1)[0])


def test_every_seed_shares_one_cache_folder_where_the_class_order_is_fixed(tmp_path, monkeypatch):
    """With a fixed class order the seed does not reach the tensors (Avalanche materializes the
    same ones for two seeds), so a sweep over seeds materializes them once; a shuffled order
    depends on the seed and keeps a folder per seed."""
    import afmbench.scenarios.cache as cache

    apart = [build_scenario("split_digits", n_experiences=2, seed=s, cache=str(tmp_path / f"own{s}"))
             for s in (0, 1)]  # fmt: skip
    assert all(torch.equal(a, b) for a, b in zip(apart[0].train(1), apart[1].train(1)))
    shared = str(tmp_path / "shared")
    first = build_scenario("split_digits", n_experiences=2, seed=0, cache=shared)
    with monkeypatch.context() as patch:
        patch.setattr(cache, "materialize", lambda *a, **k: pytest.fail("materialized again"))
        second = build_scenario("split_digits", n_experiences=2, seed=1, cache=shared)
    assert torch.equal(second.train(1)[0], first.train(1)[0])
    assert second.params["seed"] == 1  # a validation split still follows the run's seed
    for seed in (0, 1):
        build_scenario(
            "split_digits", n_experiences=2, seed=seed, class_order="shuffled", cache=shared
        )
    assert len([p for p in (tmp_path / "shared" / "scenarios").iterdir() if p.is_dir()]) == 3


def test_missing_mnist_names_the_files_and_where(tmp_path):
    with pytest.raises(DataNotFoundError) as info:
        build_scenario("split_mnist", root=str(tmp_path / "empty"), cache=str(tmp_path / "cache"))
    text = str(info.value)
    assert "MNIST" in text and "train-images-idx3-ubyte.gz" in text and "MNIST/raw" in text
    assert "AFMBENCH_DATA_DIR" in text


def _avalanche_samples(dataset, indices):
    items = [dataset[int(i)] for i in indices]
    return (
        torch.stack([x for x, _, _ in items]),
        torch.tensor([y for _, y, _ in items]),
        torch.tensor([t for _, _, t in items]),
    )


def _assert_equal_to_avalanche(ours, benchmark, n_check=400):
    rng = np.random.default_rng(0)
    for split, stream in (("train", benchmark.train_stream), ("test", benchmark.test_stream)):
        for e, experience in enumerate(stream):
            x, y, t = ours.train(e) if split == "train" else ours.test(e)
            assert len(x) == len(experience.dataset)
            idx = rng.choice(len(x), size=min(n_check, len(x)), replace=False)
            ax, ay, at = _avalanche_samples(experience.dataset, idx)
            assert torch.equal(x[idx], ax), f"{split} experience {e}: inputs differ"
            assert torch.equal(y[idx], ay) and torch.equal(t[idx], at)


@pytest.mark.slow
def test_permuted_mnist_tensors_equal_avalanche(mnist_root, session_cache):
    from avalanche.benchmarks.classic import PermutedMNIST

    ours = build_scenario("permuted_mnist", n_experiences=3, seed=0, root=str(mnist_root))
    theirs = PermutedMNIST(
        3, seed=0, dataset_root=prepare_mnist_like("MNIST", mnist_root, session_cache)
    )
    _assert_equal_to_avalanche(ours, theirs)
    assert ours.task_ids == (0, 0, 0) and ours.head_sizes == (10,)


@pytest.mark.slow
def test_split_mnist_tensors_equal_avalanche(mnist_root, session_cache):
    from avalanche.benchmarks.classic import SplitMNIST

    ours = build_scenario(
        "split_mnist", n_experiences=5, protocol="task", seed=0, root=str(mnist_root)
    )
    theirs = SplitMNIST(
        5, seed=0, return_task_id=True, fixed_class_order=list(range(10)),
        class_ids_from_zero_in_each_exp=True,
        dataset_root=prepare_mnist_like("MNIST", mnist_root, session_cache),
    )  # fmt: skip
    _assert_equal_to_avalanche(ours, theirs)
    assert ours.classes == ((0, 1), (2, 3), (4, 5), (6, 7), (8, 9))


def test_mnist_unnormalized_keeps_pixels_in_zero_one_and_the_default_keys_unchanged(
    mnist_root, monkeypatch
):
    """``normalize=False`` skips Avalanche's Normalize(0.1307, 0.3081): the same pixels, in [0, 1]
    with a zero background. The default adds no parameter, so earlier runs keep their config hash
    and cache folder."""
    import afmbench.scenarios.mnist as mnist

    normalized = build_scenario(
        "split_mnist", n_experiences=5, protocol="task", seed=0, root=str(mnist_root)
    )  # fmt: skip  (cached by the test above)
    built = {}
    with monkeypatch.context() as patch:
        patch.setattr(mnist, "cached_scenario", lambda name, protocol, params, build, *a, **k:
                      built.setdefault(params.get("normalize", True), (params, build)))  # fmt: skip
        for normalize in (True, False):
            mnist.split_mnist(n_experiences=5, seed=0, normalize=normalize, root=str(mnist_root))
    assert "normalize" not in built[True][0] and built[False][0]["normalize"] is False
    raw = built[False][1]()  # Avalanche's benchmark without its Normalize
    x, y, _ = normalized.train(1)
    for i in (0, 1, 500):
        x01, y01 = raw.train_stream[1].dataset[i][:2]
        assert y01 == y[i] and x01.min() == 0 and x01.max() == 1
        torch.testing.assert_close(x01, x[i] * 0.3081 + 0.1307, rtol=0, atol=1e-6)


def test_read_only_data_root_with_archives_only_works(mnist_root, tmp_path):
    """The shared data folder holds only .gz archives; extraction goes to the cache."""
    root = prepare_mnist_like("MNIST", mnist_root, tmp_path)
    extracted = sorted(p.name for p in (root / "MNIST" / "raw").iterdir())
    assert extracted == sorted(
        [
            "train-images-idx3-ubyte",
            "train-labels-idx1-ubyte",
            "t10k-images-idx3-ubyte",
            "t10k-labels-idx1-ubyte",
        ]
    )
    assert (root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte").stat().st_size == 10008


def _idx(shape: tuple[int, ...], seed: int) -> bytes:
    """An idx file (MNIST's format) of unsigned bytes with the given shape."""
    return idx_bytes(np.random.default_rng(seed).integers(0, 256, shape, np.uint8))


@pytest.mark.parametrize("damage", ["truncated archive", "truncated file", "not idx"])
def test_damaged_mnist_files_are_one_line_naming_the_file(tmp_path, damage):
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    shapes = {"train-images-idx3-ubyte": (6, 28, 28), "train-labels-idx1-ubyte": (6,),
              "t10k-images-idx3-ubyte": (4, 28, 28), "t10k-labels-idx1-ubyte": (4,)}  # fmt: skip
    for i, (name, shape) in enumerate(shapes.items()):
        (raw / f"{name}.gz").write_bytes(gzip.compress(_idx(shape, i)))
    whole = prepare_mnist_like("MNIST", tmp_path / "data", tmp_path / "ok")  # the intact set
    for i, (name, shape) in enumerate(shapes.items()):
        assert (whole / "MNIST" / "raw" / name).read_bytes() == _idx(shape, i)

    bad = "t10k-images-idx3-ubyte"
    if damage == "truncated archive":
        data = (raw / f"{bad}.gz").read_bytes()
        (raw / f"{bad}.gz").write_bytes(data[: len(data) // 2])
        culprit, reason = raw / f"{bad}.gz", "Compressed file ended"
    else:  # an already decompressed file takes precedence over the archive
        (raw / bad).write_bytes(
            _idx((4, 28, 28), 2)[:-10] if damage == "truncated file" else b"<html>"
        )
        culprit = raw / bad
        reason = (
            f"{16 + 4 * 784 - 10} bytes where its header says {16 + 4 * 784}"
            if damage == "truncated file"
            else "not an idx"
        )
    with pytest.raises(DataNotFoundError) as caught:
        prepare_mnist_like("MNIST", tmp_path / "data", tmp_path / "cache")
    assert f"MNIST file {culprit} is unreadable or incomplete" in str(caught.value)
    assert reason in str(caught.value) and f"replace it with the original {culprit.name}" in str(
        caught.value
    )
    extracted = extracted_root(tmp_path / "data", tmp_path / "cache") / "MNIST" / "raw"
    assert extracted.is_dir() and not list(extracted.glob(f"{bad}*"))


def test_two_data_roots_never_share_their_extracted_files(tmp_path):
    """One cache, two data folders holding different MNIST files: each scenario is built
    from its own folder's data (the second used to be served the first one's extracted files)."""

    shapes = {"train-images-idx3-ubyte": (20, 28, 28), "train-labels-idx1-ubyte": (20,),
              "t10k-images-idx3-ubyte": (10, 28, 28), "t10k-labels-idx1-ubyte": (10,)}  # fmt: skip
    for seed, folder in enumerate(("a", "b")):
        raw = tmp_path / folder / "MNIST" / "raw"
        raw.mkdir(parents=True)
        for i, (name, shape) in enumerate(shapes.items()):
            data = _idx(shape, 10 * seed + i)
            if name.endswith("labels-idx1-ubyte"):  # labels 0..9, as split_mnist needs
                data = data[:8] + bytes(j % 10 for j in range(shape[0]))
            (raw / f"{name}.gz").write_bytes(gzip.compress(data))
    built = [
        build_scenario(
            "split_mnist", n_experiences=1, root=str(tmp_path / f), cache=str(tmp_path / "cache")
        )
        for f in ("a", "b")
    ]
    assert not torch.equal(built[0].train(0)[0], built[1].train(0)[0])
    roots = [prepare_mnist_like("MNIST", tmp_path / f, tmp_path / "cache") for f in ("a", "b")]
    for root, folder in zip(roots, ("a", "b")):
        extracted = (root / "MNIST" / "raw" / "t10k-images-idx3-ubyte").read_bytes()
        original = tmp_path / folder / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz"
        assert extracted == gzip.decompress(original.read_bytes())


def _unique_rows(x: torch.Tensor) -> torch.Tensor:
    return torch.unique(x.reshape(len(x), -1), dim=0)


def test_padded_permuted_mnist_pads_before_permuting(tmp_path):
    from afmbench.scenarios.common import permutations

    arrays = fake_mnist(tmp_path, n_train=60, n_test=30)
    scenario = build_scenario(
        "permuted_mnist", n_experiences=3, seed=4, pad=2, normalize=False, root=str(tmp_path)
    )
    assert scenario.input_shape == (1, 32, 32) and scenario.params["pad"] == 2
    padded = torch.nn.functional.pad(
        torch.from_numpy(arrays["train-images-idx3-ubyte"]).float().div(255), (2, 2, 2, 2)
    ).reshape(60, -1)
    zero_positions = []
    for e, perm in enumerate(permutations(3, 32 * 32, seed=4)):
        x, y, _ = scenario.train(e)
        unpermuted = torch.empty_like(x.reshape(len(x), -1))
        unpermuted[:, perm] = x.reshape(len(x), -1)  # position perm[i] went to i
        assert torch.equal(_unique_rows(unpermuted), _unique_rows(padded))
        assert torch.equal(torch.bincount(y), torch.bincount(torch.arange(60) % 10))
        zero_positions.append(set(torch.nonzero(x.reshape(len(x), -1).amax(0) == 0).flatten()))
    # the 240 padded positions are scattered differently in every experience
    assert all(len(z) >= 240 for z in zero_positions)
    assert zero_positions[0] != zero_positions[1] != zero_positions[2]


def test_unpadded_tensor_route_equals_avalanches_permuted_mnist(tmp_path, session_cache):
    from avalanche.benchmarks.classic import PermutedMNIST

    from afmbench.scenarios.base import Scenario
    from afmbench.scenarios.mnist import _permuted_padded

    fake_mnist(tmp_path, n_train=60, n_test=30)
    ours = Scenario.from_avalanche(
        _permuted_padded(3, "domain", 7, True, 0, tmp_path), protocol="domain", name="ours"
    )
    theirs = PermutedMNIST(
        3, seed=7, dataset_root=prepare_mnist_like("MNIST", tmp_path, session_cache)
    )
    _assert_equal_to_avalanche(ours, theirs)


@pytest.mark.parametrize("pad", [-1, 1.5, True])
def test_bad_padding_is_one_clear_line(pad):
    with pytest.raises(ConfigError, match=r"scenario.pad\b.* must be a whole number"):
        build_scenario("permuted_mnist", pad=pad)
