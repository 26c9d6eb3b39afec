"""Container entry point: run the service named by KVSTACK_SERVICE (set per image).

`python -m kvstack SERVICE [ARGS]` also works, for a developer outside a container. A service
is a subpackage of kvstack with a `main(argv)`; an image holds its own one only, so that is all
its entry point can run.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import re
import sys
from types import ModuleType

import kvstack


def _service(name: str) -> ModuleType | None:
    """The package that runs service `name`, None when this installation has no such service."""
    if not re.fullmatch(r"[a-z][a-z0-9]*", name):
        return None
    try:
        module = importlib.import_module(f"kvstack.{name}")
    except ModuleNotFoundError as err:
        if err.name != f"kvstack.{name}":
            raise  # the service is here but a module it imports is not: show that
        return None
    return module if callable(getattr(module, "main", None)) else None


def installed() -> list[str]:
    """The services this installation can run."""
    found = (m.name for m in pkgutil.iter_modules(kvstack.__path__) if m.ispkg)
    return sorted(name for name in found if _service(name) is not None)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    name = os.environ.get("KVSTACK_SERVICE", "")
    if not name and args:
        name, args = args[0], args[1:]
    module = _service(name) if name else None
    if module is None:
        given = f"there is no service {name!r} here; " if name else ""
        print(
            f"usage: python -m kvstack SERVICE [ARGS]  ({given}SERVICE: {', '.join(installed())})",
            file=sys.stderr,
        )
        return 2
    result: int = module.main(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
