"""A bounded memory of training samples for the replay strategies (ER, A-GEM).

:class:`ReplayBuffer` keeps at most ``capacity`` samples ``(x, y, t)`` and fills them one of
two ways: ``reservoir`` after every training batch (each sample seen so far is in the buffer
with the same probability, capacity / seen), or ``balanced`` once an experience ends (every
class seen so far keeps the same number of samples, give or take one). Inputs whose values
per channel fit a table of 256 (8-bit images, normalized or not) are stored as uint8 codes
into it (:mod:`afmbench.codes`), a quarter of float32's memory; other inputs as they come.

Randomness comes from the generator the owner passes, so a plugin that reseeds it per
experience (from the run's seed) replays the same samples in a resumed run.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from afmbench.codes import decode, encode, grown_table

Selection = Literal["reservoir", "balanced"]


class ReplayBuffer:
    """At most ``capacity`` training samples, selected by ``selection``."""

    def __init__(self, capacity: int, selection: Selection = "reservoir") -> None:
        self.capacity, self.selection = capacity, selection
        self.seen = 0  # samples offered so far (reservoir sampling's n)
        self.x: Tensor | None = None  # float inputs, or uint8 codes into self.table
        self.table: Tensor | None = None  # (channels, at most 256) values the codes index
        self.y: Tensor | None = None
        self.t: Tensor | None = None
        self.z: Tensor | None = None  # the logits seen when each sample was stored, if kept

    def __len__(self) -> int:
        return 0 if self.y is None else len(self.y)

    @property
    def nbytes(self) -> int:
        """Memory the stored samples take (inputs, labels, task labels, code table)."""
        parts = (self.x, self.y, self.t, self.z, self.table)
        return sum(p.numel() * p.element_size() for p in parts if p is not None)

    # -- filling -----------------------------------------------------------------------
    def add_reservoir(
        self, x: Tensor, y: Tensor, t: Tensor, generator: torch.Generator, z: Tensor | None = None
    ) -> None:
        """Offer a batch (with its logits ``z``, to keep them too): sample i of the stream
        enters with probability capacity / (i + 1), replacing a uniformly drawn slot once the
        buffer is full."""
        n = len(y)
        positions = torch.arange(self.seen, self.seen + n)
        free = max(0, min(n, self.capacity - len(self)))
        slots = torch.full((n,), -1, dtype=torch.long)
        slots[:free] = torch.arange(len(self), len(self) + free)
        if free < n:
            draws = (torch.rand(n - free, generator=generator) * (positions[free:] + 1)).long()
            slots[free:] = torch.where(draws < self.capacity, draws, -1)
        self.seen += n
        keep = slots >= 0
        if keep.any():  # a later duplicate slot wins, as a sequential reservoir would have it
            rows = keep.to(y.device)
            self._write(slots[keep], x[rows], y[rows], t[rows], None if z is None else z[rows])

    def select_balanced(self, x: Tensor, y: Tensor, t: Tensor, generator: torch.Generator) -> None:
        """Merge an experience's samples into the buffer: every class seen so far keeps
        ``capacity // classes`` samples (the first classes one more, to fill it), drawn at
        random from what the buffer held of it and from the new samples."""
        old = self.samples()  # balanced selection keeps no logits: old is (x, y, t)
        xs = [x] if old is None else [old[0].to(x.device), x]
        ys = [y] if old is None else [old[1].to(y.device), y]
        ts = [t] if old is None else [old[2].to(t.device), t]
        x, y, t = torch.cat(xs), torch.cat(ys), torch.cat(ts)
        keys = t * (int(y.max()) + 1) + y  # a class is a (task, label) pair
        classes = keys.unique()
        share, extra = divmod(self.capacity, len(classes))
        chosen = []
        for i, key in enumerate(classes.tolist()):
            rows = (keys == key).nonzero().flatten().cpu()
            order = torch.randperm(len(rows), generator=generator)
            chosen.append(rows[order[: share + (i < extra)]])
        keep = torch.cat(chosen).to(y.device)
        self.x = self.table = self.y = self.t = self.z = None
        self.seen += len(keys) - (0 if old is None else len(old[1]))
        self._write(torch.arange(len(keep)), x[keep], y[keep], t[keep])

    # -- reading -----------------------------------------------------------------------
    def samples(self) -> tuple[Tensor, ...] | None:
        """Everything stored ``(x, y, t[, z])``, inputs decoded, or None when empty."""
        if self.y is None:
            return None
        return (self._decode(self.x), self.y, self.t, *([] if self.z is None else [self.z]))

    def sample(self, n: int, generator: torch.Generator) -> tuple[Tensor, ...]:
        """``n`` stored samples ``(x, y, t[, z])`` drawn uniformly without replacement (all if
        fewer)."""
        index = torch.randperm(len(self), generator=generator)[:n].to(self.y.device)
        kept = [] if self.z is None else [self.z[index]]
        return (self._decode(self.x[index]), self.y[index], self.t[index], *kept)

    # -- storage -----------------------------------------------------------------------
    def _write(
        self, slots: Tensor, x: Tensor, y: Tensor, t: Tensor, z: Tensor | None = None
    ) -> None:
        size = min(self.capacity, max(len(self), int(slots.max()) + 1))
        if self.y is None:
            self.y = torch.zeros(0, dtype=y.dtype, device=y.device)
            self.t = torch.zeros(0, dtype=t.dtype, device=t.device)
            self.x = self._empty_like(x)
            self.z = None if z is None else z.new_zeros(0, *z.shape[1:])
        # encode before growing: a batch that needs more than 256 values per channel turns the
        # stored codes back into floats, and the rows added below must be of the stored kind
        stored = self._encode(x)
        if size > len(self):
            grow = size - len(self)
            self.y = torch.cat([self.y, y.new_zeros(grow)])
            self.t = torch.cat([self.t, t.new_zeros(grow)])
            self.x = torch.cat([self.x, self.x.new_zeros(grow, *self.x.shape[1:])])
            if self.z is not None:
                self.z = torch.cat([self.z, self.z.new_zeros(grow, *self.z.shape[1:])])
        slots = slots.to(self.y.device)
        self.y[slots], self.t[slots] = y, t
        self.x[slots] = stored
        if self.z is not None:
            self.z[slots] = z

    def _empty_like(self, x: Tensor) -> Tensor:
        if x.is_floating_point() and x.dim() >= 2:
            self.table = torch.zeros(x.shape[1], 0, dtype=x.dtype, device=x.device)
            return torch.zeros(0, *x.shape[1:], dtype=torch.uint8, device=x.device)
        return x.new_zeros(0, *x.shape[1:])

    def _encode(self, x: Tensor) -> Tensor:
        """``x`` as stored: codes into the table (grown to hold x's values, re-coding what is
        stored), or, once a channel needs more than 256 values, floats from then on."""
        if self.table is None:
            return x
        table = grown_table(self.table, x)
        if table is None:
            self.x, self.table = self._decode(self.x), None
            return x
        if self.table.shape[1] and not torch.equal(table, self.table):  # re-code what is stored
            self.x = encode(self._decode(self.x), table)
        self.table = table
        return encode(x, table)

    def _decode(self, x: Tensor) -> Tensor:
        return x if self.table is None else decode(x, self.table)

    # -- checkpoints ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        cpu = {k: getattr(self, k) for k in ("x", "table", "y", "t", "z")}
        return {
            "seen": self.seen,
            **{k: v.cpu() if v is not None else None for k, v in cpu.items()},
        }

    def load_state_dict(self, state: dict[str, Any], device: torch.device | None = None) -> None:
        self.seen = int(state["seen"])
        for key in ("x", "table", "y", "t", "z"):
            value = state[key]
            setattr(self, key, value.to(device) if value is not None and device else value)
