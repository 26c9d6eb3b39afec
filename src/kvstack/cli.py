"""`kvstack`: one command for the operations (images, local stack, deploy, scale, rollback...).

Each group of verbs lives in its own module under kvstack.ops and adds itself to the parser
through `register(subparsers)`. The CLI wraps the real tools (docker, kubectl, gcloud) and
prints every command it runs, so a person can see and repeat it.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from kvstack import package_version
from kvstack.ops import catalog
from kvstack.ops.errors import CommandError

# Modules under kvstack.ops that add verbs; each has register(subparsers).
COMMAND_MODULES: tuple[str, ...] = (
    "kvstack.ops.engine",
    "kvstack.ops.images",
    "kvstack.ops.local",
    "kvstack.ops.manifests",
    "kvstack.ops.pipeline",
    "kvstack.ops.targets",
    "kvstack.ops.scaffold",
    "kvstack.ops.dev",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvstack", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"kvstack {package_version()}")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)  # some verbs list the services in their help
        result: int = args.func(args)
    except (CommandError, catalog.ServiceListError) as err:
        print(f"kvstack: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("kvstack: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`kvstack history | head`): no traceback, and Python must not
        # flush into the closed pipe again at exit. 141 (128 + SIGPIPE), as a shell tool
        # killed by the closed pipe would exit: the verb did not finish, so it is no success.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.dup2(devnull, sys.stderr.fileno())
        return 141
    return result


if __name__ == "__main__":
    sys.exit(main())
