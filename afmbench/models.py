"""Models: a body of hidden layers and an output head (one head per task when task-incremental).

Every model is ``ContinualModel(body, head)``. The body is an ``nn.Sequential`` whose hidden
layers each end in an activation module (one of :data:`ACTIVATIONS`); that is where the
forgetting layer is inserted (:func:`afmbench.forgetting.layer.sites` finds them), and where
per-layer statistics (sparsity, neuron importance) are read.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Callable, Iterator, Sequence

from torch import Tensor, nn

from afmbench.config import check_params
from afmbench.errors import ConfigError


class MultiHead(nn.Module):
    """One linear output head per task label; a batch may mix tasks.

    Heads can differ in size; logits are padded with ``-inf`` to the largest head so a mixed
    batch still forms one tensor and padded classes are never predicted.
    """

    def __init__(self, in_features: int, head_sizes: Sequence[int]) -> None:
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(in_features, k) for k in head_sizes)
        self.width = max(head_sizes)

    def forward(self, h: Tensor, task: Tensor | int) -> Tensor:
        if isinstance(task, int):
            return self._pad(self.heads[task](h))
        if len(self.heads) == 1:
            return self._pad(self.heads[0](h))
        out = None
        for t in task.unique().tolist():
            rows = task == t
            logits = self.heads[t](h[rows])
            if out is None:  # the heads' dtype: under autocast it need not be h's
                out = logits.new_full((h.shape[0], self.width), float("-inf"))
            out[rows, : logits.shape[1]] = logits
        return out if out is not None else h.new_empty((0, self.width))

    def _pad(self, logits: Tensor) -> Tensor:
        missing = self.width - logits.shape[1]
        return logits if missing == 0 else nn.functional.pad(logits, (0, missing), value=-math.inf)


class BatchRecorder(nn.Module):
    """A module that keeps what the training batch's forward pass made of it (the forgetting
    layer's inputs and gates, which its loss terms read), in :attr:`record`."""

    record_names: tuple[str, ...] = ()

    def record(self) -> tuple:
        return tuple(getattr(self, n) for n in self.record_names)

    def restore(self, record: tuple) -> None:
        for name, value in zip(self.record_names, record):
            setattr(self, name, value)


@contextlib.contextmanager
def side_pass(model: nn.Module) -> Iterator[None]:
    """Forward passes of ``model`` inside leave every :class:`BatchRecorder`'s record of the
    training batch as it was: for passes on other samples (replay, distillation) within a
    training step."""
    records = [(m, m.record()) for m in model.modules() if isinstance(m, BatchRecorder)]
    try:
        yield
    finally:
        for module, record in records:
            module.restore(record)


class ContinualModel(nn.Module):
    """``head(body(x), task)``: the interface every strategy and the forgetting layer rely on."""

    def __init__(self, body: nn.Sequential, head: MultiHead) -> None:
        super().__init__()
        self.body = body
        self.head = head

    def forward(self, x: Tensor, task: Tensor | int = 0) -> Tensor:
        return self.head(self.body(x), task)


ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
}


def named_parameters(model: nn.Module) -> dict[str, Tensor]:
    """The model's trainable parameters by name (the keys of every per-parameter table)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ConfigError(
            f"unknown activation '{name}'",
            f"set model.activation to one of {', '.join(ACTIVATIONS)}",
        )
    return ACTIVATIONS[name]()


def mlp(
    input_shape: Sequence[int],
    head_sizes: Sequence[int],
    hidden: Sequence[int] = (256, 256),
    activation: str = "relu",
    dropout: float = 0.0,
) -> ContinualModel:
    """Fully connected network: flatten, then ``Linear -> activation [-> dropout]`` per width.

    ``hidden=(512, 256)`` on MNIST is the AFM paper's 784-512-256-10 network.
    """
    if not hidden or any(int(w) < 1 for w in hidden):
        raise ConfigError(
            f"model.hidden={list(hidden)} needs positive widths", "e.g. model.hidden=[256,256]"
        )
    _check_dropout(dropout)
    return _dense_top([], math.prod(input_shape), hidden, activation, dropout, head_sizes)


def lenet(
    input_shape: Sequence[int],
    head_sizes: Sequence[int],
    channels: Sequence[int] = (6, 16),
    hidden: Sequence[int] = (120, 84),
    activation: str = "relu",
) -> ContinualModel:
    """LeNet-5 style: two 5x5 conv + 2x2 max-pool stages, then two dense layers."""
    layers: list[nn.Module] = []
    c_in, size = input_shape[0], list(input_shape[1:])
    for c in channels:
        layers += [nn.Conv2d(c_in, c, 5, padding=2), _activation(activation), nn.MaxPool2d(2)]
        c_in, size = c, [s // 2 for s in size]
    return _dense_top(layers, c_in * math.prod(size), hidden, activation, 0.0, head_sizes)


def si_cnn(
    input_shape: Sequence[int],
    head_sizes: Sequence[int],
    activation: str = "relu",
    dropout: float = 0.5,
    conv_dropout: float = 0.25,
) -> ContinualModel:
    """The SI paper's CIFAR network: 4 conv (32, 32, 64, 64; 3x3) in two pooled stages with
    dropout, then a 512-unit dense layer with dropout."""
    _check_dropout(dropout)
    _check_dropout(conv_dropout)
    layers: list[nn.Module] = []
    c_in, size = input_shape[0], list(input_shape[1:])
    for c in (32, 64):
        layers += [
            nn.Conv2d(c_in, c, 3, padding=1),
            _activation(activation),
            nn.Conv2d(c, c, 3, padding=1),
            _activation(activation),
            nn.MaxPool2d(2),
            nn.Dropout(conv_dropout),
        ]
        c_in, size = c, [s // 2 for s in size]
    return _dense_top(layers, c_in * math.prod(size), (512,), activation, dropout, head_sizes)


def vgg_small(
    input_shape: Sequence[int],
    head_sizes: Sequence[int],
    channels: Sequence[int] = (64, 128, 256),
    convs_per_stage: int = 2,
    hidden: Sequence[int] = (512,),
    activation: str = "relu",
    dropout: float = 0.5,
    batch_norm: bool = False,
) -> ContinualModel:
    """A small VGG: stages of ``convs_per_stage`` 3x3 convs and a 2x2 max-pool, then dense layers.

    The defaults give 6 conv + 2 dense + the head, close to the AFM paper's 9-layer VGG.
    Batch norm is off by default: its running statistics drift between tasks.
    """
    _check_dropout(dropout)
    layers: list[nn.Module] = []
    c_in, size = input_shape[0], list(input_shape[1:])
    for c in channels:
        for _ in range(convs_per_stage):
            layers.append(nn.Conv2d(c_in, c, 3, padding=1))
            if batch_norm:
                layers.append(nn.BatchNorm2d(c))
            layers.append(_activation(activation))
            c_in = c
        layers.append(nn.MaxPool2d(2))
        size = [s // 2 for s in size]
    return _dense_top(layers, c_in * math.prod(size), hidden, activation, dropout, head_sizes)


class BasicBlock(nn.Module):
    """ResNet's basic block without its output activation: ``norm(conv(act(norm(conv(x))))) +
    shortcut(x)``. The activation follows the block as a child of the body of its own, so the
    forgetting layer and per-layer statistics find it like any other hidden activation."""

    def __init__(self, c_in: int, c_out: int, stride: int, norm: str, activation: str) -> None:
        super().__init__()
        self.out_channels = c_out
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, padding=1, bias=False)
        self.norm1 = _norm(norm, c_out)
        self.act = _activation(activation)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, padding=1, bias=False)
        self.norm2 = _norm(norm, c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:  # a 1x1 projection where the shape changes
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), _norm(norm, c_out)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.norm2(self.conv2(self.act(self.norm1(self.conv1(x)))))
        return out + self.shortcut(x)


NORMS = ("batch", "group")


def _norm(kind: str, channels: int) -> nn.Module:
    """BatchNorm, or GroupNorm with gcd(channels / 2, 32) groups: 32 from 64 channels on (the
    standard widths), and at least two channels a group, so a 1x1 feature map still normalizes."""
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    return nn.GroupNorm(math.gcd(max(channels // 2, 1), 32), channels)


def resnet18(
    input_shape: Sequence[int],
    head_sizes: Sequence[int],
    width: int = 20,
    norm: str = "batch",
    activation: str = "relu",
) -> ContinualModel:
    """The reduced ResNet-18 of continual-learning work on 32x32 images: a 3x3 stem without
    max-pool, four stages of two basic blocks (widths ``width`` x 1, 2, 4, 8; strides 1, 2, 2,
    2), global average pooling. ``width=20`` is the slim network of GEM, Mammoth and
    Avalanche's ``SlimResNet18``; ``width=64`` the standard one.

    ``norm=batch`` keeps running statistics that every experience's training moves, for the
    old tasks too (nothing consolidates them); evaluation and importance passes use them in
    eval mode. ``norm=group`` has no running statistics.
    """
    if norm not in NORMS:
        raise ConfigError(f"unknown model.norm '{norm}'", f"use one of {', '.join(NORMS)}")
    if int(width) < 1:
        raise ConfigError(f"model.width={width} must be positive", "e.g. model.width=20")
    if len(input_shape) != 3 or min(input_shape[1:]) < 8:
        raise ConfigError(
            f"model=resnet18 takes images (channels, height, width) of at least 8x8 "
            f"(32x32 as in CIFAR), not inputs of shape {tuple(input_shape)}",
            "use a CIFAR scenario, or model=mlp for flat or small inputs",
        )
    width = int(width)
    layers: list[nn.Module] = [
        nn.Conv2d(input_shape[0], width, 3, 1, padding=1, bias=False),
        _norm(norm, width),
        _activation(activation),
    ]
    c_in = width
    for stage, stride in enumerate((1, 2, 2, 2)):
        c_out = width * 2**stage
        for block in range(2):
            layers += [
                BasicBlock(c_in, c_out, stride if block == 0 else 1, norm, activation),
                _activation(activation),
            ]
            c_in = c_out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return ContinualModel(nn.Sequential(*layers), MultiHead(c_in, head_sizes))


def _dense_top(layers, width, hidden, activation, dropout, head_sizes) -> ContinualModel:
    """``layers`` (``width`` features out), then dense hidden layers and the multi-head output."""
    if width < 1:
        raise ConfigError(
            "the input is too small for this network's pooling stages",
            "use model=mlp or model=lenet",
        )
    layers = [*layers, nn.Flatten()]
    for w in hidden:
        layers += [nn.Linear(width, int(w)), _activation(activation)]
        if dropout:
            layers.append(nn.Dropout(dropout))
        width = int(w)
    return ContinualModel(nn.Sequential(*layers), MultiHead(width, head_sizes))


def _check_dropout(p: float) -> None:
    if not 0.0 <= p < 1.0:
        raise ConfigError(f"dropout {p} is outside [0, 1)", "e.g. model.dropout=0.5")


MODELS: dict[str, Callable[..., ContinualModel]] = {
    "mlp": mlp,
    "lenet": lenet,
    "si_cnn": si_cnn,
    "vgg_small": vgg_small,
    "resnet18": resnet18,
}


def build_model(
    name: str, input_shape: Sequence[int], head_sizes: Sequence[int], **params
) -> ContinualModel:
    """Build model ``name`` for a scenario's input shape and output heads."""
    if name not in MODELS:
        raise ConfigError(f"unknown model '{name}'", f"use one of {', '.join(MODELS)}")
    builder = MODELS[name]
    kwargs = check_params(params, builder, "model", skip=())
    model = builder(tuple(input_shape), tuple(head_sizes), **kwargs)
    chosen = inspect.signature(builder).bind(tuple(input_shape), tuple(head_sizes), **kwargs)
    chosen.apply_defaults()
    shape = ("input_shape", "head_sizes")  # the scenario's, part of its own identity
    model.spec = {"name": name, **{k: v for k, v in chosen.arguments.items() if k not in shape}}
    return model
