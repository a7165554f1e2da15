"""Keep a benchmark's generated table inside a hand-written results page.

The scripts rewrite only what stands between ``<!-- NAME:start -->`` and ``<!-- NAME:end -->``,
so the notes written around the figures survive a rerun.
"""

from __future__ import annotations

from pathlib import Path


def write_block(path: Path, name: str, text: str) -> None:
    """Put ``text`` between the ``name`` markers of ``path`` (appended if it has none yet)."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{text}{end}"
    old = path.read_text() if path.exists() else ""
    if start in old and end in old:
        new = old[: old.index(start)] + block + old[old.index(end) + len(end) :]
    else:
        new = f"{old}\n{block}\n" if old else f"{block}\n"
    path.write_text(new)
