"""Which modules may import which: the operations code depends downward only (cli -> ops ->
the product), the installed package never needs the tests, and the local dev loop never
loads the CI/GKE code."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "kvstack"


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any depth (a function's lazy import counts too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def sources() -> list[Path]:
    return [p for p in sorted(PACKAGE.rglob("*.py")) if "v1" not in p.relative_to(PACKAGE).parts]


def test_nothing_below_the_cli_imports_it() -> None:
    """kvstack.cli sits on top: the ops modules take CommandError from kvstack.ops.errors."""
    upward = [
        str(p.relative_to(PACKAGE))
        for p in sources()
        if p.name != "cli.py" and "kvstack.cli" in imported_modules(p)
    ]
    assert len(sources()) > 20  # the walk found the package
    assert upward == []


def test_the_product_never_imports_the_operations_code() -> None:
    """The services and their runtime run without kvstack.ops (no image ships it: see the
    Dockerfile and images.IGNORED_INPUTS). The dev tools sit beside the CLI, above ops: the
    benchmark's rollout table and the probe-cost measurement drive the local stack with it."""
    upward = [
        str(p.relative_to(PACKAGE))
        for p in sources()
        if p.name != "cli.py"
        and p.relative_to(PACKAGE).parts[0] not in ("ops", "dev")
        and any(m == "kvstack.ops" or m.startswith("kvstack.ops.") for m in imported_modules(p))
    ]
    assert upward == []


def test_the_package_never_imports_the_tests() -> None:
    """`pip install .` ships src/kvstack alone: nothing in it may need tests/ (the benchmark's
    service processes live in kvstack.dev.processes)."""
    needing = [
        str(p.relative_to(PACKAGE))
        for p in sources()
        if any(m == "tests" or m.startswith("tests.") for m in imported_modules(p))
    ]
    assert needing == []


def test_the_dev_loop_loads_no_ci_code() -> None:
    """`kvstack dev` (local Swarm) must not pull in the GKE pipeline or the Kubernetes driver."""
    code = (
        "import sys, kvstack.ops.dev\n"
        "print(' '.join(m for m in sys.modules if m.startswith('kvstack.')))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert "kvstack.ops.dev" in loaded
    assert "kvstack.ops.images" in loaded
    assert not {"kvstack.ops.pipeline", "kvstack.ops.kube"} & set(loaded)
