"""How to install what an optional feature needs: the packages of its extra, read from fastvar's own
metadata (pyproject.toml is the one place that lists them), so the hint works however fastvar was installed."""

from __future__ import annotations

import re
from importlib import metadata


def install_hint(extra: str) -> str:
    """``pip install ...`` for the packages of ``extra`` (from a wheel or a clone alike)."""
    try:
        requirements = metadata.requires("fastvar-torch") or []
    except metadata.PackageNotFoundError:  # run from a source tree that is not installed
        return f"pip install -e '.[{extra}]' in the fastvar source folder"
    marker = re.compile(rf"""extra\s*==\s*["']{re.escape(extra)}["']""")
    packages = [r.split(";")[0].strip() for r in requirements if marker.search(r)]
    return "pip install " + " ".join(f"'{p}'" for p in packages)
