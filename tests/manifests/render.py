"""Render every overlay with every combination of components, once per test session.

The overlays and components are found on disk (a new one is tested without editing this file).
A combination is rendered from a copy of deploy/ whose overlay lists exactly those components,
with `kubectl kustomize` (Kustomize v5, offline), the same renderer `kvstack deploy` uses.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]  # PyYAML ships no types

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPONENT_PREFIX = "../../components/"


def _dirs_with_kustomization(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if (p / "kustomization.yaml").is_file())


OVERLAYS = _dirs_with_kustomization(DEPLOY / "overlays")
COMPONENTS = _dirs_with_kustomization(DEPLOY / "components")
COMBINATIONS: list[tuple[str, tuple[str, ...]]] = [
    (overlay, subset)
    for overlay in OVERLAYS
    for size in range(len(COMPONENTS) + 1)
    for subset in combinations(COMPONENTS, size)
]


def combination_id(overlay: str, components: tuple[str, ...]) -> str:
    return "+".join([overlay, *components]) if components else f"{overlay}(no components)"


COMBINATION_IDS = [combination_id(o, c) for o, c in COMBINATIONS]


@dataclass(frozen=True)
class Rendered:
    overlay: str
    components: tuple[str, ...]
    text: str

    @property
    def id(self) -> str:
        return combination_id(self.overlay, self.components)

    @property
    def docs(self) -> list[dict[str, Any]]:
        return [d for d in yaml.safe_load_all(self.text) if d]

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [d for d in self.docs if d["kind"] == kind]


def kustomize(directory: Path) -> str:
    """`kubectl kustomize DIR`; a failure shows Kustomize's own message."""
    if not shutil.which("kubectl"):
        pytest.fail("kubectl is not on PATH; these tests render with `kubectl kustomize`")
    result = subprocess.run(
        ["kubectl", "kustomize", str(directory)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        pytest.fail(f"kubectl kustomize {directory} failed:\n{result.stderr}")
    return result.stdout


def render_combination(
    workdir: Path, overlay: str, components: tuple[str, ...], deploy: Path = DEPLOY
) -> Rendered:
    """Render `overlay` with exactly `components` (its own non-shared components kept)."""
    copy = workdir / combination_id(overlay, components).replace("(", "_").replace(")", "_")
    shutil.copytree(deploy, copy / "deploy")
    path = copy / "deploy/overlays" / overlay / "kustomization.yaml"
    kustomization = yaml.safe_load(path.read_text())
    own = [c for c in kustomization.get("components", []) if not c.startswith(COMPONENT_PREFIX)]
    kustomization["components"] = own + [COMPONENT_PREFIX + c for c in components]
    path.write_text(yaml.safe_dump(kustomization, sort_keys=False))
    return Rendered(overlay, components, kustomize(path.parent))
