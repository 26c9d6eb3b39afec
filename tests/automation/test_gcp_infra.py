"""The Google Cloud set-up (infra/gcp, Terraform) parses and says what the pipeline relies on.

Terraform itself and a Google Cloud account are not available here, so the files are parsed with
python-hcl2 and the security-relevant settings are read from the parse tree."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import hcl2
import pytest
import yaml  # type: ignore[import-untyped]  # PyYAML ships no types

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


def test_one_regional_autopilot_cluster(tf: dict[str, Any]) -> None:
    """One Autopilot cluster, in a region (not a zone); environments are namespaces in it."""
    clusters = resources(tf, "google_container_cluster")
    assert list(clusters) == ["kvstack"]
    cluster = clusters["kvstack"]
    assert "for_each" not in cluster
    assert cluster["enable_autopilot"] is True
    assert cluster["location"] == "${var.region}"
    variables = {k: b for block in tf["variable"] for k, b in block.items()}
    assert v(variables["namespaces"]["default"]) == {
        "staging": "kvstack-staging",
        "production": "kvstack",
    }


def test_registry_tags_are_immutable(tf: dict[str, Any]) -> None:
    """A git-SHA tag can never be moved to another digest."""
    repo = resources(tf, "google_artifact_registry_repository")["images"]
    assert v(v(repo["docker_config"])["immutable_tags"]) is True


def test_federation_admits_this_repository_only(tf: dict[str, Any]) -> None:
    """The provider rejects other repositories' tokens; only this repository may act as the
    builder, and each deployer only for jobs of this repository in its GitHub environment."""
    provider = resources(tf, "google_iam_workload_identity_pool_provider")["github"]
    assert provider["attribute_condition"] == "assertion.repository == '${var.github_repository}'"
    assert v(v(provider["oidc"])["issuer_uri"]) == "https://token.actions.githubusercontent.com"
    bindings = resources(tf, "google_service_account_iam_member")
    assert bindings["builder_from_github"]["member"].endswith(
        "/attribute.repository/${var.github_repository}"
    )
    deployer = bindings["deployer_from_github"]
    assert deployer["for_each"] == "${var.namespaces}"
    assert deployer["member"].endswith(
        "/subject/repo:${var.github_repository}:environment:${each.key}"
    )


def test_accounts_have_only_the_roles_they_need(tf: dict[str, Any]) -> None:
    """Builder: writer on the one repository. Deployers: reader there, and cluster viewer (find
    the cluster) through IAM; no owner/editor/developer (those span every namespace), no keys."""
    roles = sorted(
        (name, body["role"])
        for kind in (
            "google_project_iam_member",
            "google_artifact_registry_repository_iam_member",
        )
        for name, body in resources(tf, kind).items()
    )
    assert roles == [
        ("builder_writer", "roles/artifactregistry.writer"),
        ("deployer_cluster_viewer", "roles/container.clusterViewer"),
        ("deployer_reader", "roles/artifactregistry.reader"),
    ]
    assert not resources(tf, "google_service_account_key")


def test_deployers_change_only_their_own_namespace(tf: dict[str, Any]) -> None:
    """Kubernetes RBAC: each deployer's Role lives in its environment's namespace, and its one
    cluster-wide grant is get/patch of that namespace object, by name; no cluster-admin."""
    role = resources(tf, "kubernetes_role_v1")["deployer"]
    assert role["for_each"] == "${var.namespaces}"
    assert "kubernetes_namespace_v1.env[each.key]" in str(role["metadata"])
    for kind in ("kubernetes_role_binding_v1", "kubernetes_cluster_role_binding_v1"):
        for binding in resources(tf, kind).values():
            assert "cluster-admin" not in str(binding)
            assert "google_service_account.deployer[each.key].email" in str(binding["subject"])
    (cluster_role,) = resources(tf, "kubernetes_cluster_role_v1").values()
    rule = v(cluster_role["rule"])
    assert v(rule["resources"]) == "namespaces"
    assert v(rule["resource_names"]) == "${each.value}"
    assert sorted(v(rule["verbs"])) == ["get", "patch"]


def test_the_backend_disks_are_regional(tf: dict[str, Any]) -> None:
    """The StorageClass the gke overlay gives the backend's claims exists in Terraform and makes
    regional SSD persistent disks (two zones), kept when their claim goes (Retain)."""
    classes = resources(tf, "kubernetes_storage_class_v1")
    (name,) = [v(v(c["metadata"])["name"]) for c in classes.values()]
    (sc,) = classes.values()
    assert v(sc["parameters"]) == {"type": "pd-ssd", "replication-type": "regional-pd"}
    assert sc["storage_provisioner"] == "pd.csi.storage.gke.io"
    assert sc["reclaim_policy"] == "Retain"
    assert sc["volume_binding_mode"] == "WaitForFirstConsumer"
    patch = yaml.safe_load((ROOT / "deploy/overlays/gke/storage.yaml").read_text())
    (named,) = [op["value"] for op in patch if op["path"].endswith("/storageClassName")]
    assert named == name


def test_backups_are_scheduled_with_backup_for_gke(tf: dict[str, Any]) -> None:
    """Backup for GKE takes scheduled backups of every kvstack namespace, volume data included,
    and keeps them; its agent is on in the cluster and its API enabled. (Terraform is parsed,
    not applied: no Google Cloud here.)"""
    (plan,) = resources(tf, "google_gke_backup_backup_plan").values()
    assert plan["cluster"] == "${google_container_cluster.kvstack.id}"
    config = v(plan["backup_config"])
    assert v(config["include_volume_data"]) is True
    assert v(v(config["selected_namespaces"])["namespaces"]) == "${values(var.namespaces)}"
    assert v(v(plan["backup_schedule"])["cron_schedule"]) == "${var.backup_cron}"
    assert v(v(plan["retention_policy"])["backup_retain_days"]) == "${var.backup_retain_days}"
    variables = {k: b for block in tf["variable"] for k, b in block.items()}
    assert int(v(variables["backup_retain_days"]["default"])) >= 7
    cluster = resources(tf, "google_container_cluster")["kvstack"]
    assert v(v(v(cluster["addons_config"])["gke_backup_agent_config"])["enabled"]) is True
    apis = [v(a) for a in v(next(loc["apis"] for loc in tf["locals"] if "apis" in loc))]
    assert "gkebackup.googleapis.com" in apis
