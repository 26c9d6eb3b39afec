"""kvstack: a gRPC key/value service (client, server, LMDB backend) and its deployment."""

from importlib import metadata


def package_version() -> str:
    """The installed package's version (pyproject.toml's, once installed)."""
    try:
        return metadata.version("kvstack")
    except metadata.PackageNotFoundError:
        return "(not installed: run from a source tree)"
