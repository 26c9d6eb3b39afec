"""Container entry point: run the service named by KVSTACK_SERVICE (set per image).

`python -m kvstack SERVICE [ARGS]` also works, for a developer outside a container.
"""

from __future__ import annotations

import importlib
import os
import sys

from kvstack import registry


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    name = os.environ.get("KVSTACK_SERVICE", "")
    if not name:
        if not args or args[0] not in registry.services():
            known = ", ".join(registry.services())
            print(f"usage: python -m kvstack SERVICE [ARGS]  (SERVICE: {known})", file=sys.stderr)
            return 2
        name, args = args[0], args[1:]
    service = registry.get(name)
    module = importlib.import_module(service.module)
    result: int = module.main(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
