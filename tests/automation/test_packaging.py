"""The package as `pip install .` gives it, in a fresh virtual environment of its own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

from kvstack import runtime
from kvstack.backend import BackendConfig
from kvstack.ops import catalog, images
from kvstack.server import ServerConfig

ROOT = Path(__file__).resolve().parents[2]
UV = Path(sys.executable).with_name("uv")


def test_pip_install_gives_a_working_cli(tmp_path: Path) -> None:
    """Installed with its declared dependencies only (no dev tools, so no PyYAML), `kvstack
    --help` and `--version` work, `python -m kvstack SERVICE --help` lists every setting, and
    the CLI works on the checkout it is run in (not on the site-packages it is installed in).
    (uv installs from PyPI or its cache, the same resolver `make venv` uses.)"""
    venv = tmp_path / "venv"
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "KVSTACK_SERVICE")}
    subprocess.run([UV, "venv", "--quiet", "--python", sys.executable, venv], check=True, env=env)
    python = venv / "bin" / "python"
    subprocess.run(
        [UV, "pip", "install", "--quiet", "--python", python, ROOT],
        check=True, env=env, timeout=600, capture_output=True,
    )  # fmt: skip

    def run(*argv: str, cwd: Path = tmp_path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            argv, capture_output=True, text=True, env=env, timeout=120, check=False, cwd=cwd
        )

    no_yaml = run(str(python), "-c", "import yaml")
    assert no_yaml.returncode != 0, (
        "PyYAML is installed: the test would not show the CLI needs none"
    )
    helped = run(str(venv / "bin" / "kvstack"), "--help")
    assert helped.returncode == 0, helped.stderr
    assert "deploy" in helped.stdout
    version = run(str(venv / "bin" / "kvstack"), "--version")
    assert version.returncode == 0, version.stderr
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert version.stdout.strip() == f"kvstack {declared}", version.stdout + version.stderr
    for name, config in (("server", ServerConfig), ("backend", BackendConfig)):
        helped = run(str(python), "-m", "kvstack", name, "--help")
        assert helped.returncode == 0, helped.stderr
        names = [env for env, _, _ in runtime.settings_of(runtime.RuntimeConfig)]
        names += [env for env, _, _ in runtime.settings_of(config)]
        missing = [env for env in names if env not in helped.stdout]
        assert len(names) > 5
        assert not missing, f"{name} --help does not list {missing}:\n{helped.stdout}"

    # The installed CLI works on the source tree it is run in, not on where it is installed:
    # from the checkout, each service's version is its last commit there...
    changed = run(str(venv / "bin" / "kvstack"), "pipeline", "changed", "--all", cwd=ROOT)
    assert changed.returncode == 0, changed.stderr
    versions = {row["service"]: row["version"] for row in json.loads(changed.stdout)}
    assert versions == {n: images.revision(s) for n, s in catalog.services().items()}
    # ...and outside any tree it says so, without a traceback.
    outside = run(str(venv / "bin" / "kvstack"), "pipeline", "changed", "--all")
    assert outside.returncode == 1, outside.stdout + outside.stderr
    assert "is this a git clone?" in outside.stderr
    assert "Traceback" not in outside.stderr
    # The one verb that needs a dev tool (PyYAML, to write deploy/) says which, and how to get it.
    manifests = run(str(venv / "bin" / "kvstack"), "manifests", "--check", cwd=ROOT)
    assert manifests.returncode == 1, manifests.stdout + manifests.stderr
    assert "PyYAML" in manifests.stderr
    assert "Traceback" not in manifests.stderr
