"""Models: output shapes, multi-head routing, and where hidden activations sit."""

import pytest
import torch
from torch import nn

from afmbench.errors import ConfigError
from afmbench.forgetting.layer import sites
from afmbench.models import MODELS, MultiHead, build_model


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_maps_images_to_the_widest_head(name):
    shape = (3, 32, 32) if name != "mlp" else (1, 28, 28)
    model = build_model(name, shape, head_sizes=(2, 5))
    x = torch.randn(4, *shape)
    assert model(x, 1).shape == (4, 5)
    assert model(x, torch.tensor([0, 1, 0, 1])).shape == (4, 5)


def test_mlp_matches_the_afm_paper_shape():
    model = build_model("mlp", (1, 28, 28), (10,), hidden=[512, 256])
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(784, 512), (512, 256), (256, 10)]


def test_mixed_task_batch_equals_one_head_per_sample():
    torch.manual_seed(0)
    head = MultiHead(6, (2, 3, 2))
    h = torch.randn(5, 6)
    tasks = torch.tensor([2, 0, 1, 1, 0])
    mixed = head(h, tasks)
    for i, t in enumerate(tasks.tolist()):
        k = (2, 3, 2)[t]
        assert torch.allclose(mixed[i, :k], head(h[i : i + 1], t)[0, :k])
        assert torch.isinf(mixed[i, k:]).all()  # padding of a smaller head is never predicted


@pytest.mark.parametrize("name", sorted(MODELS))
def test_mixed_task_batch_under_autocast_with_the_forgetting_layer(name):
    """bf16 autocast: the gates hand the heads float32 while the heads answer in bfloat16; the
    mixed-task logits take the heads' dtype (writing them into a float32 tensor used to fail)."""
    from afmbench.forgetting.layer import attach

    torch.manual_seed(0)
    shape = (3, 32, 32) if name != "mlp" else (1, 28, 28)
    model = build_model(name, shape, head_sizes=(2, 5)).eval()
    attach(model)
    x, tasks = torch.randn(4, *shape), torch.tensor([0, 1, 1, 0])
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        mixed = model(x, tasks)
        alone = [model(x[i : i + 1], t)[0] for i, t in enumerate(tasks.tolist())]
    assert mixed.dtype == torch.bfloat16 and mixed.shape == (4, 5)
    for row, single, k in zip(mixed, alone, (2, 5, 5, 2)):
        assert torch.equal(row[:k], single[:k]) and torch.isinf(row[k:]).all()


def test_hidden_layers_report_their_widths():
    mlp = build_model("mlp", (1, 8, 8), (2,), hidden=[30, 20])
    assert [site.units for site in sites(mlp)] == [30, 20]
    cnn = build_model("lenet", (1, 28, 28), (10,))
    assert [site.units for site in sites(cnn)] == [6, 16, 120, 84]


def test_si_cnn_has_four_convolutions_and_a_512_dense_layer():
    model = build_model("si_cnn", (3, 32, 32), (10,))
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 32, 64, 64]
    assert [m.out_features for m in model.body if isinstance(m, nn.Linear)] == [512]


@pytest.mark.parametrize(
    "name, params, message",
    [
        ("resnet", {}, "unknown model"),
        ("mlp", {"activation": "swish"}, "unknown activation"),
        ("mlp", {"dropout": 1.5}, "outside"),
        ("mlp", {"hidden": [0]}, "positive widths"),
    ],
)
def test_bad_model_options_are_config_errors(name, params, message):
    with pytest.raises(ConfigError, match=message):
        build_model(name, (1, 8, 8), (2,), **params)
