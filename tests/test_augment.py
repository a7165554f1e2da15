"""Crop-and-flip augmentation: torchvision's per-sample result, seeded draws, training only."""

import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF

import afmbench
from afmbench.augment import CropFlip, crop_flip, make_augmentation
from afmbench.errors import ConfigError
from afmbench.module import ContinualModule
from afmbench.scenarios.base import Scenario
from afmbench.strategies import ER, EWC, DERpp


def test_the_same_offsets_give_torchvisions_random_crop_and_flip_per_sample():
    g = torch.Generator().manual_seed(0)
    images = torch.randn(6, 3, 32, 32, generator=g)
    crop, flip = T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(p=1.0)
    tops, lefts, expected = [], [], []
    for i, image in enumerate(images):
        torch.manual_seed(100 + i)
        cropped = crop(image)
        torch.manual_seed(100 + i)  # the offsets torchvision drew for that crop
        top, left, _, _ = T.RandomCrop.get_params(TF.pad(image, 4), (32, 32))
        tops.append(top), lefts.append(left)
        expected.append(flip(cropped) if i % 2 else cropped)
    flips = torch.tensor([i % 2 == 1 for i in range(6)])
    got = crop_flip(images, torch.tensor(tops), torch.tensor(lefts), flips, padding=4)
    assert torch.equal(got, torch.stack(expected))
    assert len(set(zip(tops, lefts))) > 1  # the check saw more than one crop


def test_extreme_offsets_pad_with_zeros_and_the_centre_is_the_identity():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4) + 1
    centre = crop_flip(x, torch.tensor([2, 2]), torch.tensor([2, 2]), torch.tensor([0, 1]) > 0, 2)
    assert torch.equal(centre[0], x[0]) and torch.equal(centre[1], x[1].flip(-1))
    corner = crop_flip(x, torch.tensor([0, 0]), torch.tensor([0, 0]), torch.zeros(2) > 0, 2)
    assert (corner[:, :, :2, :] == 0).all() and torch.equal(corner[0, 0, 2:, 2:], x[0, 0, :2, :2])


def test_draws_are_fixed_by_seed_experience_and_epoch():
    x = torch.randn(64, 3, 32, 32)

    def batches(seed, experience, epoch):
        augment = CropFlip()
        augment.start_epoch(seed, experience, epoch, x.device)
        return [augment(x[i : i + 16]) for i in range(0, 64, 16)]

    first = batches(0, 1, 2)
    assert all(torch.equal(a, b) for a, b in zip(first, batches(0, 1, 2)))
    for other in (batches(1, 1, 2), batches(0, 2, 2), batches(0, 1, 3)):
        assert not torch.equal(torch.cat(first), torch.cat(other))


def _images(shape=(3, 8, 8)):
    g = torch.Generator().manual_seed(0)
    n = 32
    labels = torch.arange(n) % 2
    x = torch.randn(n, *shape, generator=g) + 2.0 * labels.view(-1, *([1] * len(shape)))
    splits = [(x, labels, torch.full((n,), t)) for t in range(2)]
    return Scenario.from_tensors("images", "task", splits, splits, (2, 2))


def _run(scenario, plugins=(), **kwargs):
    afmbench.seed_everything(0)
    model = afmbench.build_model("mlp", scenario.input_shape, scenario.head_sizes, hidden=[32])
    return afmbench.run(
        scenario, model, plugins, max_epochs=2, batch_size=8, verbose=False,
        optimizer=afmbench.OptimizerConfig(lr=0.05), **kwargs,
    )  # fmt: skip


def test_training_batches_are_augmented_and_evaluation_and_importance_passes_are_not(
    monkeypatch,
):
    seen = {"train": [], "eval": [], "pass": []}
    train_step, eval_step = ContinualModule.training_step, ContinualModule.validation_step
    batches = ContinualModule.batches

    def watch_train(self, batch, batch_idx):
        seen["train"].append(batch[0].clone())
        return train_step(self, batch, batch_idx)

    def watch_eval(self, batch, *args, **kwargs):
        seen["eval"].append(batch[0].clone())
        return eval_step(self, batch, *args, **kwargs)

    def watch_pass(self, *args, **kwargs):
        for batch in batches(self, *args, **kwargs):
            seen["pass"].append(batch[0].clone())
            yield batch

    monkeypatch.setattr(ContinualModule, "training_step", watch_train)
    monkeypatch.setattr(ContinualModule, "validation_step", watch_eval)
    monkeypatch.setattr(ContinualModule, "batches", watch_pass)
    scenario = _images()
    data = scenario.train(0)[0]

    def rows_of_data(images):
        return [any(torch.equal(image, row) for row in data) for image in images]

    _run(scenario, plugins=[EWC()])
    assert all(all(rows_of_data(b)) for b in seen["train"])  # without augmentation: the data
    for kind in seen:
        seen[kind].clear()
    _run(scenario, plugins=[EWC()], augment="crop_flip")
    trained = torch.cat(seen["train"])
    assert sum(rows_of_data(trained)) < len(trained) / 4  # nearly all cropped or flipped
    assert torch.equal(torch.cat(seen["eval"][:2]), torch.cat([data, data]))  # tasks 0 and 1
    assert seen["pass"] and all(all(rows_of_data(b)) for b in seen["pass"])


@pytest.mark.parametrize("make", [lambda: ER(buffer_size=16, replay_batch_size=8),
                                  lambda: DERpp(buffer_size=16, replay_batch_size=8)])  # fmt: skip
def test_replay_keeps_inputs_as_loaded_and_augments_each_draw_afresh(make):
    """Replay stores the training inputs before augmentation and augments every replayed batch
    anew (as the DER paper's code does), never replaying one frozen crop."""
    drawn = []
    plugin = make()
    replay_batch = plugin.replay_batch

    def watch(module):
        batch = replay_batch(module)
        if batch is not None:
            drawn.append(batch[0].clone())
        return batch

    plugin.replay_batch = watch
    scenario = _images()
    data = torch.cat([scenario.train(0)[0], scenario.train(1)[0]])

    def rows_of_data(images):
        return [any(torch.equal(image, row) for row in data) for image in images]

    _run(scenario, plugins=[plugin], augment="crop_flip")
    stored = plugin.buffer.samples()[0]
    assert len(stored) == 16 and all(rows_of_data(stored))  # as loaded
    replayed = torch.cat(drawn)
    assert sum(rows_of_data(replayed)) < len(replayed) / 4  # nearly all cropped or flipped


def test_an_augmented_run_differs_from_a_plain_one_and_repeats_exactly():
    scenario = _images()
    plain = _run(scenario)
    first, again = _run(scenario, augment="crop_flip"), _run(scenario, augment="crop_flip")
    weights = [dict(r.module.model.state_dict()) for r in (plain, first, again)]
    assert all(torch.equal(weights[1][k], weights[2][k]) for k in weights[1])
    assert not all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert first.metrics["config_hash"] != plain.metrics["config_hash"]


def test_augmenting_non_image_data_is_refused_in_one_line():
    with pytest.raises(ConfigError, match=r"data.augment=crop_flip .* shape \(20,\)") as info:
        make_augmentation("crop_flip", (20,))
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="unknown data.augment 'cutout'"):
        make_augmentation("cutout", (3, 32, 32))
    with pytest.raises(ConfigError, match="data.augment"):
        _run(_images(shape=(20,)), augment="crop_flip")
