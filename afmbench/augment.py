"""Training-time augmentation done per batch on the tensors, wherever they are (GPU included).

Scenarios hold their images already normalized, so augmentation cannot run in a per-sample
transform pipeline before batching; :class:`CropFlip` transforms a whole batch with one
gather instead. Its randomness comes from a generator seeded by ``(seed, experience, epoch)``,
so a run is reproducible and a resumed run (which restarts at an experience) draws what the
uninterrupted run drew. The module applies it to training batches only: evaluation,
validation and importance passes see the images as they are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from afmbench.errors import ConfigError

AUGMENTATIONS = ("crop_flip",)


class CropFlip:
    """Random crop of the original size from the image zero-padded by :attr:`padding` pixels,
    then a horizontal flip with probability 1/2 (the CIFAR recipe since ResNet).

    Padding is with zeros of the normalized image, as torchvision's ``RandomCrop(size,
    padding=4)`` does when it follows ``Normalize``: the dataset's mean colour.
    """

    def __init__(self, padding: int = 4) -> None:
        self.padding = padding
        self.generator: torch.Generator | None = None

    def start_epoch(self, seed: int, experience: int, epoch: int, device: torch.device) -> None:
        """Seed this epoch's draws from ``(seed, experience, epoch)`` on ``device``."""
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed((seed * 1_000_003 + experience * 10_007 + epoch) % 2**63)

    def draw(self, batch: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        """Per sample: the crop's top and left offsets in ``[0, 2 · padding]`` and a flip flag."""
        if self.generator is None or self.generator.device.type != device.type:
            self.start_epoch(0, 0, 0, device)
        offsets = torch.randint(
            0, 2 * self.padding + 1, (2, batch), generator=self.generator, device=device
        )
        flips = torch.rand(batch, generator=self.generator, device=device) < 0.5
        return offsets[0], offsets[1], flips

    def __call__(self, x: Tensor) -> Tensor:
        return crop_flip(x, *self.draw(len(x), x.device), self.padding)


def crop_flip(x: Tensor, top: Tensor, left: Tensor, flip: Tensor, padding: int) -> Tensor:
    """Each image ``x[i]`` (``(N, C, H, W)``) zero-padded by ``padding``, cropped to ``H x W``
    at ``(top[i], left[i])`` and mirrored left-right where ``flip[i]``: one gather."""
    n, c, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    rows = top[:, None] + torch.arange(h, device=x.device)  # (N, H)
    steps = torch.arange(w, device=x.device)
    cols = left[:, None] + torch.where(flip[:, None], w - 1 - steps, steps)  # (N, W)
    samples = torch.arange(n, device=x.device)[:, None, None, None]
    channels = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[samples, channels, rows[:, None, :, None], cols[:, None, None, :]]


def make_augmentation(name: str | None, input_shape: tuple[int, ...]) -> CropFlip | None:
    """The augmentation ``data.augment`` names (None: none), checked against the inputs."""
    if name is None:
        return None
    if name not in AUGMENTATIONS:
        raise ConfigError(
            f"unknown data.augment '{name}'", f"use one of {', '.join(AUGMENTATIONS)} or null"
        )
    if len(input_shape) != 3 or min(input_shape[1:]) < 2:
        raise ConfigError(
            f"data.augment={name} crops and flips images (channels, height, width), but this "
            f"scenario's inputs have shape {tuple(input_shape)}",
            "leave data.augment=null for non-image data",
        )
    return CropFlip()
