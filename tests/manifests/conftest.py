"""Fixtures: every overlay x component combination, and each overlay as committed, rendered once."""

from __future__ import annotations

import pytest
import yaml  # type: ignore[import-untyped]  # PyYAML ships no types

from .render import (
    COMBINATIONS,
    COMPONENT_PREFIX,
    DEPLOY,
    OVERLAYS,
    Rendered,
    kustomize,
    render_combination,
)


@pytest.fixture(scope="session")
def renders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Rendered]:
    """Every overlay x component combination, rendered, by combination id."""
    workdir = tmp_path_factory.mktemp("renders")
    out = {}
    for overlay, components in COMBINATIONS:
        rendered = render_combination(workdir, overlay, components)
        out[rendered.id] = rendered
    return out


@pytest.fixture(scope="session")
def shipped() -> dict[str, Rendered]:
    """Each overlay exactly as committed (with the components it lists), by overlay name."""
    out = {}
    for overlay in OVERLAYS:
        path = DEPLOY / "overlays" / overlay
        listed = yaml.safe_load((path / "kustomization.yaml").read_text()).get("components", [])
        names = tuple(
            c.removeprefix(COMPONENT_PREFIX) for c in listed if c.startswith(COMPONENT_PREFIX)
        )
        out[overlay] = Rendered(overlay, names, kustomize(path))
    return out
