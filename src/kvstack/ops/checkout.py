"""Which kvstack source tree the operations CLI works on (the Dockerfile, deploy/, git history).

The package's own tree when it runs from one (`make venv` installs it editable); otherwise, as
after `pip install .`, the nearest folder at or above the current one that is a kvstack tree.
"""

from __future__ import annotations

from pathlib import Path

# What makes a folder a kvstack source tree: the build's inputs and the service list.
MARKERS = ("Dockerfile", "pyproject.toml", "src/kvstack/ops/services.toml")


def is_tree(path: Path) -> bool:
    return all((path / marker).is_file() for marker in MARKERS)


def find_root(start: Path | None = None) -> Path:
    """The source tree: this package's own, else the nearest at or above `start` (default: the
    current folder), else `start` itself (a verb that needs the tree then says what is missing)."""
    own = Path(__file__).resolve().parents[3]
    if is_tree(own):
        return own
    here = (start or Path.cwd()).resolve()
    return next((p for p in (here, *here.parents) if is_tree(p)), here)


ROOT = find_root()
