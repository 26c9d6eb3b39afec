"""The Google Cloud set-up (infra/gcp, Terraform) parses and says what the pipeline relies on.

Terraform itself and a Google Cloud account are not available here, so the files are parsed with
python-hcl2 and the security-relevant settings are read from the parse tree."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import hcl2
import pytest

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra/gcp"
# Looked up, not imported by name: python-hcl2 and checkov's bc-python-hcl2 both install `hcl2`,
# and only one of them declares `load` to the type checker.
HCL_LOAD: Callable[[TextIO], dict[str, Any]] = hcl2.__dict__["load"]


@pytest.fixture(scope="module")
def tf() -> dict[str, Any]:
    """Every .tf file in infra/gcp, parsed, merged by top-level block type."""
    merged: dict[str, list[Any]] = {}
    for path in sorted(INFRA.glob("*.tf")):
        with path.open() as f:
            for key, blocks in HCL_LOAD(f).items():
                merged.setdefault(key, []).extend(blocks)
    return merged


def v(value: Any) -> Any:
    """A value as written, whichever hcl2 package is installed: bc-python-hcl2 (checkov's, which
    shares the module name) wraps attributes in one-element lists; newer ones may keep quotes."""
    while isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, str) and len(value) > 1 and value[0] == value[-1] == '"':
        value = value[1:-1]
    return value


def resources(tf: dict[str, Any], kind: str) -> dict[str, Any]:
    return {
        name: {key: v(val) for key, val in body.items()}
        for block in tf.get("resource", [])
        for name, body in block.get(kind, {}).items()
    }


def test_state_is_remote_in_gcs(tf: dict[str, Any]) -> None:
    """State lives in a GCS bucket (versioned; made by the commands in docs/automation.md)."""
    backends = [b for t in tf["terraform"] for b in t.get("backend", [])]
    assert any("gcs" in b for b in backends)


def test_every_api_the_pipeline_uses_is_enabled(tf: dict[str, Any]) -> None:
    """Artifact Registry, GKE, IAM credentials and STS (token exchange) are in the API list."""
    apis = [v(a) for a in v(next(loc["apis"] for loc in tf["locals"] if "apis" in loc))]
    for api in ("artifactregistry", "container", "iamcredentials", "sts", "iam"):
        assert f"{api}.googleapis.com" in apis


def test_clusters_are_regional_autopilot(tf: dict[str, Any]) -> None:
    """Each environment's cluster is Autopilot, in a region (not a zone)."""
    cluster = resources(tf, "google_container_cluster")["env"]
    assert cluster["enable_autopilot"] is True
    assert cluster["location"] == "${var.region}"


def test_registry_tags_are_immutable(tf: dict[str, Any]) -> None:
    """A git-SHA tag can never be moved to another digest."""
    repo = resources(tf, "google_artifact_registry_repository")["images"]
    assert v(v(repo["docker_config"])["immutable_tags"]) is True


def test_federation_admits_this_repository_only(tf: dict[str, Any]) -> None:
    """The provider rejects other repositories' tokens, and only this repository's principal
    set may act as the deployer."""
    provider = resources(tf, "google_iam_workload_identity_pool_provider")["github"]
    assert provider["attribute_condition"] == "assertion.repository == '${var.github_repository}'"
    assert v(v(provider["oidc"])["issuer_uri"]) == "https://token.actions.githubusercontent.com"
    binding = resources(tf, "google_service_account_iam_member")["deployer_from_github"]
    assert binding["member"].endswith("/attribute.repository/${var.github_repository}")


def test_deployer_has_only_the_roles_it_needs(tf: dict[str, Any]) -> None:
    """Writer on the one repository, developer on the clusters; no owner/editor, no keys."""
    roles = sorted(
        body["role"]
        for kind in (
            "google_project_iam_member",
            "google_artifact_registry_repository_iam_member",
        )
        for body in resources(tf, kind).values()
    )
    assert roles == ["roles/artifactregistry.writer", "roles/container.developer"]
    assert not resources(tf, "google_service_account_key")
