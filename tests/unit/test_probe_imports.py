"""The image's health check imports nothing beyond the standard library on its path: grpcio and
the generated code would cost it about 130 ms of CPU per check (docs/architecture.md, "What a
health check costs"). Its answers are checked against grpcio in tests/integration/test_probe.py.
"""

from __future__ import annotations

import subprocess
import sys

# A check as Swarm runs it (--target given), against a port nobody listens on; then the modules
# it loaded that are not the standard library's.
SCRIPT = """
import sys
from kvstack import probe
code = probe.main(["--target", "127.0.0.1:9", "--timeout", "1", "--service", "x", "--quiet"])
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("grpc", "grpc_health", "google")
               or m.startswith("kvstack.ops")
               or m in ("kvstack.runtime", "tomllib", "importlib.metadata"))
print(code, heavy)
"""


def test_the_probe_loads_no_grpc_and_not_the_service_list() -> None:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True, timeout=60
    ).stdout.strip()
    assert out == "1 []", (
        f"the probe's check path loaded {out}: import those lazily (only where a check needs "
        "them) or not at all, and measure again with `python -m kvstack.dev.probe_cost`"
    )
