"""The images themselves: size, user, shared layers, and no CA bundle or secret in any layer."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import tarfile
import uuid
from pathlib import Path
from typing import IO

import pytest

from kvstack.ops import catalog, images
from tests.conftest import copy_repository

from .conftest import docker

pytestmark = pytest.mark.containers

MAX_IMAGE_BYTES = 100 * 1000 * 1000
# A real PEM block has a base64 body (ssl.py only names the markers).
PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----\r?\n[A-Za-z0-9+/=\r\n]{64,}-----END CERT")
PEM_KEY = re.compile(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----\r?\n[A-Za-z0-9+/=\r\n]{64,}")
# Public roots that grpcio ships for its TLS channels: a library file, not the build's secret.
ALLOWED_CERT_FILES = ("opt/venv/lib/python3.11/site-packages/grpc/_cython/_credentials/roots.pem",)
SECRET_PATHS = re.compile(
    r"(^|/)(run/secrets|etc/ssl|usr/share/ca-certificates|usr/local/share/ca-certificates)(/|$)"
    r"|(^|/)(\.netrc|pip\.conf|id_rsa\w*|[^/]*\.key)$"
)


def refs(tag: str) -> list[str]:
    return [images.image_ref(s, tag) for s in catalog.services().values()]


def layers(ref: str) -> list[str]:
    return list(json.loads(docker("image", "inspect", "--format", "{{json .RootFS.Layers}}", ref)))


@pytest.mark.parametrize("service", list(catalog.services()))
def test_each_image_is_at_most_100_mb(tag: str, service: str) -> None:
    """Each service image stays within 100 MB (`docker image inspect` Size)."""
    ref = images.image_ref(catalog.get(service), tag)
    size = int(docker("image", "inspect", "--format", "{{.Size}}", ref))
    assert size <= MAX_IMAGE_BYTES, f"{ref} is {size / 1e6:.1f} MB"


@pytest.mark.parametrize("service", list(catalog.services()))
def test_image_runs_as_the_nonroot_user(tag: str, service: str) -> None:
    """The Dockerfile sets USER 65532 and a container really runs as that uid and gid."""
    ref = images.image_ref(catalog.get(service), tag)
    assert docker("image", "inspect", "--format", "{{.Config.User}}", ref).strip() == (
        f"{catalog.RUNTIME_UID}:{catalog.RUNTIME_UID}"
    )
    out = docker(
        "run",
        "--rm",
        "--network",
        "none",
        "--entrypoint",
        "/opt/venv/bin/python",
        ref,
        "-c",
        "import os; print(os.getuid(), os.getgid())",
    )
    assert out.split() == [str(catalog.RUNTIME_UID)] * 2


def test_images_share_every_lower_layer(tag: str) -> None:
    """All service images are the same layers (at most the last one differs)."""
    stacks = [layers(ref) for ref in refs(tag)]
    first = stacks[0]
    for other in stacks[1:]:
        assert other[:-1] == first[:-1]
        assert len(other) == len(first)


def _wheel_file(image_path: str) -> bytes:
    """The same file as installed from the same locked wheel in this checkout's environment."""
    import grpc  # the locked grpcio: the image installs the very same wheel

    site_packages = Path(grpc.__file__).parents[1]
    return (site_packages / image_path.split("site-packages/", 1)[1]).read_bytes()


def test_no_ca_bundle_or_secret_in_any_layer(tag: str, tmp_path: Path) -> None:
    """No layer of any image holds the build's CA bundle, a certificate store, a key or a secret.

    The bundle reaches the build as a BuildKit secret only; this reads every file of every layer
    (`docker save`): the one file with certificates is grpcio's own public roots, byte for byte
    as the wheel ships it.
    """
    archive = tmp_path / "images.tar"
    docker("save", "--output", str(archive), *refs(tag), timeout=300)
    with tarfile.open(archive) as saved:
        manifest = json.load(_member(saved, "manifest.json"))
        for image in manifest:
            config = _member(saved, image["Config"]).read()
            assert b"BEGIN CERTIFICATE" not in config
            assert b"PRIVATE KEY" not in config
        for layer_name in sorted({name for image in manifest for name in image["Layers"]}):
            with tarfile.open(fileobj=io.BytesIO(_member(saved, layer_name).read())) as layer:
                for member in layer:
                    assert not SECRET_PATHS.search(member.name), f"{member.name} in {layer_name}"
                    if not member.isfile():
                        continue
                    data = _member(layer, member.name).read()
                    assert b"PRIVATE KEY-----" not in data, f"a private key in {member.name}"
                    if PEM_CERT.search(data):
                        assert member.name in ALLOWED_CERT_FILES, f"certificates in {member.name}"
                        assert data == _wheel_file(member.name), f"{member.name} was changed"


def _member(archive: tarfile.TarFile, name: str) -> IO[bytes]:
    extracted = archive.extractfile(name)
    assert extracted is not None, name
    return extracted


def test_a_change_to_one_service_keeps_every_other_image_id(tmp_path: Path) -> None:
    """In a copy of the tree, build every image, change the server's code, build again: the
    server's image is new and the backend's and client's are the very same images (same ID),
    so a deploy restarts the server alone. (The copy has no git history: its images are
    labelled by the content hash of their own inputs, as a dirty tree's are.)"""
    copy = copy_repository(tmp_path / "repo")
    tags = [f"kvtest-ids-{uuid.uuid4().hex[:6]}-{n}" for n in (1, 2)]
    names = list(catalog.services())
    latest = {n: docker("image", "inspect", "-f", "{{.Id}}", f"kvstack-{n}:latest", check=False)
              for n in names}  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(copy / "src")}
    env.pop("KVSTACK_SERVICE", None)
    code = "import sys; from kvstack.cli import main; sys.exit(main(sys.argv[1:]))"

    def build(tag: str) -> dict[str, str]:
        subprocess.run([sys.executable, "-c", code, "images", "--tag", tag], cwd=copy, env=env,
                       check=True, capture_output=True, timeout=900)  # fmt: skip
        return {n: docker("image", "inspect", "-f", "{{.Id}}", f"kvstack-{n}:{tag}") for n in names}

    try:
        first = build(tags[0])
        server = copy / "src/kvstack/server/__init__.py"
        server.write_text(server.read_text() + "\n# a server-only change\n")
        second = build(tags[1])
        assert second["server"] != first["server"]
        assert {n: second[n] for n in names if n != "server"} == {
            n: first[n] for n in names if n != "server"
        }
    finally:
        for name in names:
            for tag in tags:
                docker("image", "rm", f"kvstack-{name}:{tag}", check=False)
            if latest[name].strip():
                docker("tag", latest[name].strip(), f"kvstack-{name}:latest", check=False)
