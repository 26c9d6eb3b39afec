"""The package as `pip install .` gives it, in a fresh virtual environment of its own."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
UV = Path(sys.executable).with_name("uv")


def test_pip_install_gives_a_working_cli(tmp_path: Path) -> None:
    """Installed with its declared dependencies only (no dev tools, so no PyYAML), `kvstack
    --help` and `--version` work and `python -m kvstack server --help` lists its settings.
    (uv installs from PyPI or its cache, the same resolver `make venv` uses.)"""
    venv = tmp_path / "venv"
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "KVSTACK_SERVICE")}
    subprocess.run([UV, "venv", "--quiet", "--python", sys.executable, venv], check=True, env=env)
    python = venv / "bin" / "python"
    subprocess.run(
        [UV, "pip", "install", "--quiet", "--python", python, ROOT],
        check=True, env=env, timeout=600, capture_output=True,
    )  # fmt: skip

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            argv, capture_output=True, text=True, env=env, timeout=120, check=False, cwd=tmp_path
        )

    no_yaml = run(str(python), "-c", "import yaml")
    assert no_yaml.returncode != 0, (
        "PyYAML is installed: the test would not show the CLI needs none"
    )
    helped = run(str(venv / "bin" / "kvstack"), "--help")
    assert helped.returncode == 0, helped.stderr
    assert "deploy" in helped.stdout
    version = run(str(venv / "bin" / "kvstack"), "--version")
    assert version.stdout.startswith("kvstack "), version.stdout + version.stderr
    server = run(str(python), "-m", "kvstack", "server", "--help")
    assert server.returncode == 0, server.stderr
    assert "KVSTACK_BACKEND_TARGET" in server.stdout
