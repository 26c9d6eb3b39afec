"""zizmor, GitHub Actions' security linter, run offline on a file or a folder of .github/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ZIZMOR = Path(sys.executable).with_name("zizmor")


def assert_no_findings(path: Path) -> None:
    """zizmor's offline audits report nothing in `path` (a workflow folder, dependabot.yml)."""
    result = subprocess.run(
        [ZIZMOR, "--offline", "--no-progress", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "No findings to report" in result.stdout + result.stderr
