"""The Dockerfile copies every package a service imports (it lists the shared ones by name)."""

from __future__ import annotations

import re

from kvstack import registry
from kvstack.ops import images
from tests.conftest import ROOT


def test_every_subpackage_is_a_service_or_copied_as_shared_code() -> None:
    """Each folder under src/kvstack is a service's own package (the `own` stage), code no image
    runs (ops, dev), or listed in the `shared` stage's COPY: a new shared subpackage left out
    would build and then fail to import inside every container."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    shared = dockerfile.split("FROM build AS shared", 1)[1].split("FROM ", 1)[0]
    copied = set(re.findall(r"COPY src/kvstack/([\w-]+) ", shared))
    ignored = {p.rsplit("/", 1)[-1] for p in images.IGNORED_INPUTS}
    for folder in sorted(p for p in (ROOT / "src/kvstack").iterdir() if p.is_dir()):
        if folder.name == "__pycache__":
            continue
        assert folder.name in set(registry.services()) | ignored | copied, (
            f"src/kvstack/{folder.name} is neither a service, ops/dev, nor in the Dockerfile's "
            "shared COPY: add it there"
        )
    assert "v1" in copied
