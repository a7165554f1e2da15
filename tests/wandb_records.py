"""Read the records of an offline W&B run file (``run-<id>.wandb``) for the tests.

The file is W&B's LevelDB-style log: a 7-byte header (``:W&B``, magic, version), then 32 KiB
blocks of chunks, each with a 7-byte header (CRC32C, little-endian length, type: 1 full,
2 first, 3 middle, 4 last) around serialized ``wandb_internal_pb2.Record`` messages.
"""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BLOCK = 32 * 1024
HEADER = 7


def records(path: Path) -> Iterator[Any]:
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a W&B run file"
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        room = BLOCK - pos % BLOCK
        if room < HEADER:  # block trailer padding
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        chunk = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == 0 and length == 0:
            continue
        pending += chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def complete(path: Path, timeout: float = 60.0) -> list[Any]:
    """All records, once the file ends with the run's ``exit`` record.

    ``run.finish()`` can return before W&B's service has flushed the last records of an
    offline run to disk, so a reader waits for the file to be whole.
    """
    deadline = time.time() + timeout
    while True:
        try:
            found = list(records(path))
            if found and found[-1].WhichOneof("record_type") == "exit":
                return found
        except Exception:  # a record cut off mid-write
            if time.time() > deadline:
                raise
        if time.time() > deadline:
            raise TimeoutError(f"{path} never got its exit record")
        time.sleep(0.2)


def history(path: Path) -> list[dict[str, Any]]:
    """Every logged step as ``{key: decoded value}``."""
    rows = []
    for record in complete(path):
        if record.WhichOneof("record_type") == "history":
            rows.append(
                {
                    item.key or "/".join(item.nested_key): json.loads(item.value_json)
                    for item in record.history.item
                }
            )
    return rows


def summary(path: Path) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for record in complete(path):
        if record.WhichOneof("record_type") == "summary":
            for item in record.summary.update:
                found[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
    return found
