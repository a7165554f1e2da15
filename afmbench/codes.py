"""8-bit inputs held as uint8 codes into a table of each channel's values.

Images read from 8-bit files take at most 256 values per channel, normalized or not; as codes
into a per-channel table they take a quarter of float32's memory and decode exactly. The
device-resident loader (:mod:`afmbench.loader`) and the replay buffer (:mod:`afmbench.replay`)
store inputs this way. (The tensor cache on disk packs whole tensors instead:
:func:`afmbench.scenarios.cache.encode`.)
"""

from __future__ import annotations

import torch
from torch import Tensor


def grown_table(table: Tensor | None, x: Tensor) -> Tensor | None:
    """The per-channel table ``(channels, width)`` of sorted values that holds ``table``'s and
    every value of ``x`` (samples, channels, ...); rows shorter than the widest repeat their
    last value. None where a channel would need more than 256 values."""
    rows = []
    for c in range(x.shape[1]):
        values = x[:, c].flatten()
        rows.append(torch.unique(values if table is None else torch.cat([table[c], values])))
    width = max(len(r) for r in rows)
    if width > 256:
        return None
    return torch.stack([torch.cat([r, r[-1:].expand(width - len(r))]) for r in rows])


def encode(x: Tensor, table: Tensor) -> Tensor:
    """Each value of ``x`` as uint8, its index in its channel's row of ``table``."""
    codes = torch.empty(x.shape, dtype=torch.uint8, device=x.device)
    for c, row in enumerate(table):
        codes[:, c] = torch.searchsorted(row.contiguous(), x[:, c].contiguous())
    return codes


def decode(codes: Tensor, table: Tensor) -> Tensor:
    """Invert :func:`encode` exactly: one gather from the flattened table."""
    offsets = torch.arange(len(table), device=codes.device) * table.shape[1]
    offsets = offsets.view(1, -1, *[1] * (codes.dim() - 2))
    return table.flatten()[codes.int() + offsets]
