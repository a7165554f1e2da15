"""The versions that decide a result, recorded with every run and printed by ``--version``."""

from __future__ import annotations

import platform
import sys
from importlib.metadata import PackageNotFoundError, version

VERSIONED_PACKAGES = ("afmbench", "torch", "lightning", "torchmetrics", "avalanche-lib", "numpy")


def versions() -> dict[str, str]:
    """Versions of Python, the platform and the packages that decide a result."""
    found = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in VERSIONED_PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


def version_line() -> str:
    """afmbench's version and those of the libraries that decide its numbers."""
    found = versions()
    others = ", ".join(f"{k} {v}" for k, v in found.items() if k not in ("afmbench", "platform"))
    return f"afmbench {found.get('afmbench', '?')} ({others})"
