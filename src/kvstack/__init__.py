"""kvstack: a gRPC key/value service (client, server, LMDB backend) and its deployment."""


def package_version() -> str:
    """The installed package's version (pyproject.toml's, once installed)."""
    # Imported here, not at the top: every module of the package imports this one, the image's
    # health probe too, and importlib.metadata costs it about 60 ms of CPU per check.
    from importlib import metadata

    try:
        return metadata.version("kvstack")
    except metadata.PackageNotFoundError:
        return "(not installed: run from a source tree)"
