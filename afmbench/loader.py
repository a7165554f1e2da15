"""Mini-batches sliced straight from in-memory tensors.

A ``DataLoader`` over a ``TensorDataset`` indexes and collates one sample at a time, which on a
small model costs as much as the training step. :class:`TensorLoader` gathers a whole batch
with one index tensor instead. Lightning accepts it like any iterable loader.

On a GPU the loader can hold its tensors there (:meth:`TensorLoader.resident`): they move
once, batches are gathered on the device, and no host-to-device copy happens per step.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from afmbench.codes import decode, encode, grown_table


def _rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class TensorLoader:
    """Batches of ``tensors`` (same first dimension), optionally shuffled per epoch.

    Shuffling uses a generator seeded with ``(seed, epoch)``, so a run is reproducible and the
    order does not depend on global RNG state. Under DDP every rank takes every
    ``world_size``-th index of the same order; ``pad`` repeats indices so that all ranks see
    the same number of batches (needed in training, where steps are collective) and evaluation
    leaves it off so no sample is counted twice. ``shard=False`` gives every rank all of it.
    """

    def __init__(
        self,
        tensors: Sequence[Tensor],
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        pad: bool | None = None,
        shard: bool = True,
    ) -> None:
        if len({len(t) for t in tensors}) != 1:
            raise ValueError("all tensors need the same number of rows")
        self.tensors = tuple(tensors)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.pad = shuffle if pad is None else pad
        self.shard = shard
        self.epoch = 0
        # resident on a device: the inputs as uint8 codes and their table (afmbench.codes)
        self._codes: tuple[Tensor, Tensor] | None = None

    def resident(self, device: torch.device | str) -> TensorLoader:
        """Move the tensors to ``device`` once (in place; returns the loader). Inputs with at
        most 256 distinct values per channel (8-bit images, normalized per channel or not) are
        kept as uint8 codes into a table of each channel's values, a quarter of float32's
        memory, and decoded per batch exactly."""
        device = torch.device(device)
        x, *rest = (t.to(device) for t in self.tensors)
        table = grown_table(None, x) if x.is_floating_point() and x.dim() >= 2 and len(x) else None
        if table is not None:
            self._codes = (encode(x, table), table)
            x = x[:0]  # the float copy is not kept; shape and dtype stay known
        self.tensors = (x, *rest)
        return self

    def _rank_and_world(self) -> tuple[int, int]:
        return _rank_and_world() if self.shard else (0, 1)

    def _rows(self) -> int:
        return len(self._codes[0]) if self._codes is not None else len(self.tensors[0])

    def _indices(self) -> Tensor:
        n = self._rows()
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(n, generator=generator)
        else:
            order = torch.arange(n)
        rank, world = self._rank_and_world()
        if world > 1:
            if self.pad and n % world:  # repeat the order (fewer samples than ranks included)
                order = order.repeat(-(-world // n) + 1)[: -(-n // world) * world]
            order = order[rank::world]
        return order

    def __len__(self) -> int:
        n = self._rows()
        rank, world = self._rank_and_world()
        local = -(-n // world) if self.pad else len(range(rank, n, world))
        return -(-local // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        order = self._indices().to(self.tensors[-1].device)  # one copy an epoch, if any
        self.epoch += 1
        for start in range(0, len(order), self.batch_size):
            index = order[start : start + self.batch_size]
            if self._codes is None:
                yield tuple(t[index] for t in self.tensors)
            else:
                codes, table = self._codes
                yield (decode(codes[index], table), *(t[index] for t in self.tensors[1:]))
