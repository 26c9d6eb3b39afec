"""The Dockerfile copies every package a service imports (it lists the shared ones by name)."""

from __future__ import annotations

import re
from pathlib import Path

from kvstack.ops import catalog, images
from tests.conftest import ROOT, copy_repository


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
        assert folder.name in set(catalog.services()) | ignored | copied, (
            f"src/kvstack/{folder.name} is neither a service, ops/dev, nor in the Dockerfile's "
            "shared COPY: add it there"
        )
    assert "v1" in copied


def test_a_replica_count_is_no_image_input(tmp_path: Path) -> None:
    """The service list is read by the deploy only: editing a replica count in it leaves every
    image's inputs as they were (so nothing is rebuilt nor rolled out), while a port, which the
    services read (kvstack.defaults), changes every image's."""
    copy = copy_repository(tmp_path)
    services = catalog.services().values()
    before = {s.name: images.context_hash(copy, s) for s in services}
    listed = copy / catalog.SERVICES_PATH
    listed.write_text(listed.read_text().replace("replicas = 2", "replicas = 3"))
    assert "replicas = 3" in listed.read_text()
    assert {s.name: images.context_hash(copy, s) for s in services} == before
    assert images.affected_by([catalog.SERVICES_PATH]) == []
    ports = copy / catalog.DEFAULTS_PATH
    ports.write_text(ports.read_text().replace('"server": 50051', '"server": 50052'))
    after = {s.name: images.context_hash(copy, s) for s in services}
    assert all(after[name] != before[name] for name in before)
    assert images.affected_by([catalog.DEFAULTS_PATH]) == list(services)
