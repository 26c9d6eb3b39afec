"""The manifests render, are current, validate against Kubernetes' schemas and pass the scanners.

Schemas: kubernetes-validate's strict schemas (unknown fields are errors) for the Kubernetes
versions GKE's stable channel runs: 1.35 (its default for new clusters) and 1.34 (still offered
there); see KUBERNETES_VERSIONS.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]  # ships no types
import pytest
import yaml  # type: ignore[import-untyped]  # PyYAML ships no types

from kvstack import cli
from kvstack.ops import catalog, local, manifests, scaffold

from .render import COMBINATION_IDS, DEPLOY, OVERLAYS, ROOT, Rendered, kustomize

# GKE stable channel (release notes, "Current versions"): minor versions 1.34 to 1.35, new
# clusters on 1.35. The newest of those that kubernetes-validate ships schemas for comes first.
KUBERNETES_VERSIONS = ("1.35.0", "1.34.0")
# Kinds Kubernetes itself does not define; checked by a schema of our own elsewhere.
CUSTOM_KINDS = {("monitoring.googleapis.com/v1", "PodMonitoring")}
VENV_BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    path = VENV_BIN / name
    if not path.exists():
        pytest.fail(f"{name} is not installed in {VENV_BIN}; run `make venv`")
    return str(path)


# -- Generated files ----------------------------------------------------------------------------


def test_generated_manifests_are_current() -> None:
    """Every generated file under deploy/ is what `kvstack manifests` writes from the service list
    now (no stale file, no missing one, no orphan of a removed service)."""
    assert manifests.stale(ROOT, manifests.render(catalog.services())) == []


def _seconds(value: str) -> int:
    assert value.endswith("s"), value
    return int(value[:-1])


def swarm_facts(name: str, entry: dict[str, Any]) -> dict[str, Any]:
    """What a service's entry in the committed stack file says about the facts both targets
    share (Swarm's own ways of saying the ordinal left out)."""
    env = {k: v for k, v in entry["environment"].items() if "ORDINAL" not in k}
    mounts = [v.split(":", 1)[1] for v in entry["volumes"] if isinstance(v, str)]
    probe = entry["healthcheck"]["test"]
    return {
        "image": entry["image"].split(":", 1)[0],
        "port": int(probe[probe.index("--target") + 1].rsplit(":", 1)[1]),
        "readiness": probe[probe.index("--service") + 1],
        "replicas": entry["deploy"]["replicas"],
        "env": env,
        "grace": _seconds(entry["stop_grace_period"]),
        "startup": _seconds(entry["healthcheck"]["start_period"]),
        "data": mounts,
    }


def kubernetes_facts(workload: dict[str, Any], docs: list[dict[str, Any]]) -> dict[str, Any]:
    """The same facts, as the rendered Kubernetes workload (and its HPA) says them."""
    pod = workload["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    hpa = [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"
           and d["spec"]["scaleTargetRef"]["name"] == workload["metadata"]["name"]]  # fmt: skip
    startup = container["startupProbe"]
    return {
        "image": container["image"].split(":", 1)[0],
        "port": container["readinessProbe"]["grpc"]["port"],
        "readiness": container["readinessProbe"]["grpc"].get("service", ""),
        "replicas": hpa[0]["spec"]["minReplicas"] if hpa else workload["spec"]["replicas"],
        "env": env,
        "grace": pod["terminationGracePeriodSeconds"],
        "startup": startup["periodSeconds"] * startup["failureThreshold"],
        "data": [m["mountPath"] for m in container["volumeMounts"] if m["name"] == "data"],
    }


def test_both_targets_say_the_same_of_each_service(shipped: dict[str, Rendered]) -> None:
    """The committed Swarm stack file and the rendered Kubernetes manifests agree, service by
    service, on what one model defines once (kvstack.ops.model, the service list): the image, the
    port, the readiness name, the replica count, the environment, the grace period before
    SIGKILL, the time a starting process gets, where the data lives."""
    stack = yaml.safe_load((ROOT / local.STACK_FILE).read_text())
    docs = shipped["minikube"].docs
    workloads = {d["metadata"]["name"]: d for d in docs
                 if d["kind"] in ("Deployment", "StatefulSet")}  # fmt: skip
    assert set(workloads) == set(stack["services"])
    for name, entry in stack["services"].items():
        assert swarm_facts(name, entry) == kubernetes_facts(workloads[name], docs), name


@pytest.fixture
def repo_copy(tmp_path: Path) -> Path:
    """A copy of the service list (its two files) and deploy/, to regenerate into without
    touching the work tree."""
    for rel in (catalog.SERVICES_PATH, catalog.DEFAULTS_PATH):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, tmp_path / rel)
    shutil.copytree(DEPLOY, tmp_path / "deploy")
    return tmp_path


def test_check_mode_fails_on_stale_files(
    repo_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`kvstack manifests --check` exits 1 naming a hand-edited file and an orphan, and
    `kvstack manifests` then restores the one and deletes the other."""
    edited = repo_copy / "deploy/base/backend/statefulset.yaml"
    edited.write_text(edited.read_text().replace("replicas: 2", "replicas: 3"))
    orphan = repo_copy / "deploy/base/gone/deployment.yaml"
    orphan.parent.mkdir()
    orphan.write_text(manifests.GENERATED_HEADER + "{}\n")
    assert cli.main(["manifests", "--check", "--root", str(repo_copy)]) == 1
    err = capsys.readouterr().err
    assert "deploy/base/backend/statefulset.yaml" in err
    assert "deploy/base/gone/deployment.yaml" in err
    assert cli.main(["manifests", "--root", str(repo_copy)]) == 0
    assert cli.main(["manifests", "--check", "--root", str(repo_copy)]) == 0
    assert not orphan.parent.exists()


def test_new_service_needs_no_manifest_edit(repo_copy: Path, tmp_path: Path) -> None:
    """A fourth service added to the service list alone (stateless, called by the server) gets its
    base, its network policy and its GKE image from `kvstack manifests`; every overlay renders
    and validates with it; removing it again leaves deploy/ byte for byte as it was."""
    before = {p: p.read_bytes() for p in (repo_copy / "deploy").rglob("*") if p.is_file()}
    toml, ports = repo_copy / catalog.SERVICES_PATH, repo_copy / catalog.DEFAULTS_PATH
    original, original_ports = toml.read_text(), ports.read_text()
    toml.write_text(
        original.replace('calls = ["backend"]', 'calls = ["backend", "cache"]')
        + '\n[services.cache]\nkind = "stateless"\nreplicas = 2\ncalls = []\n'
    )
    ports.write_text(scaffold.with_port(original_ports, "cache", 50071))
    assert cli.main(["manifests", "--root", str(repo_copy)]) == 0
    for overlay in OVERLAYS:
        docs = Rendered(overlay, (), kustomize(repo_copy / "deploy/overlays" / overlay)).docs
        names = {(d["kind"], d["metadata"]["name"]) for d in docs}
        assert {("Deployment", "cache"), ("HorizontalPodAutoscaler", "cache")} <= names
        assert ("NetworkPolicy", "cache") in names
        for doc in docs:
            validate(doc, KUBERNETES_VERSIONS[0])
    toml.write_text(original)
    ports.write_text(original_ports)
    assert cli.main(["manifests", "--root", str(repo_copy)]) == 0
    after = {p: p.read_bytes() for p in (repo_copy / "deploy").rglob("*") if p.is_file()}
    assert after == before


# -- Rendering and schemas ----------------------------------------------------------------------


def test_overlays_render_as_committed(shipped: dict[str, Rendered]) -> None:
    """`kubectl kustomize deploy/overlays/NAME` works for every overlay, with the kustomize
    `images:` rewrite (no text substitution) giving every workload its image."""
    assert set(shipped) == set(OVERLAYS) >= {"minikube", "gke"}
    for rendered in shipped.values():
        assert any(d["kind"] == "Namespace" for d in rendered.docs)


def validate(doc: dict[str, Any], version: str) -> None:
    if (doc["apiVersion"], doc["kind"]) in CUSTOM_KINDS:
        return
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as err:
        pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} invalid for {version}: {err}")


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("combination", COMBINATION_IDS)
def test_validates_strictly(renders: dict[str, Rendered], combination: str, version: str) -> None:
    """Every document of every overlay x component combination validates against the strict
    Kubernetes JSON schema of a GKE stable version (unknown fields are errors)."""
    for doc in renders[combination].docs:
        validate(doc, version)


def test_validation_can_fail(shipped: dict[str, Rendered]) -> None:
    """The strict schema rejects a misspelt field, so the validation above is not vacuous."""
    deployment = next(d for d in shipped["gke"].docs if d["kind"] == "Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSIONS[0], strict=True)


# -- Scanners -----------------------------------------------------------------------------------

# A pod breaking what checkov checks, scanned with the renders: checkov must fail it (and only
# it), which shows the config skips no more than its listed checks.
CANARY = """\
apiVersion: v1
kind: Pod
metadata:
  name: canary
  namespace: canary
spec:
  containers:
    - name: canary
      image: canary:latest
      securityContext:
        privileged: true
"""


def test_checkov_passes_every_combination(renders: dict[str, Rendered], tmp_path: Path) -> None:
    """checkov (with deploy/checkov.yaml: two skips, reasons beside them) finds zero failures in
    any overlay x component combination, while still failing a deliberately bad pod."""
    for rendered in renders.values():
        name = rendered.id.replace("+", "_").replace("(", "_").replace(")", "_")
        (tmp_path / f"{name}.yaml").write_text(rendered.text)
    (tmp_path / "zz-canary.yaml").write_text(CANARY)
    result = subprocess.run(
        [
            tool("checkov"),
            "--config-file", str(DEPLOY / "checkov.yaml"),
            "--directory", str(tmp_path),
            "--output", "json",
            "--quiet",
        ],
        capture_output=True, text=True, check=False, timeout=600,
    )  # fmt: skip
    report = json.loads(result.stdout)
    reports = report if isinstance(report, list) else [report]
    failed = [c for r in reports for c in r["results"]["failed_checks"]]
    ours = [f"{c['check_id']} {c['resource']} in {c['file_path']}" for c in failed
            if "canary" not in c["file_path"]]  # fmt: skip
    assert ours == []
    assert any("canary" in c["file_path"] for c in failed), "checkov failed nothing at all"
    assert sum(r["summary"]["passed"] for r in reports) > 0
    assert all(r["summary"]["parsing_errors"] == 0 for r in reports)


def test_yamllint() -> None:
    """Every YAML file under deploy/, generated or written by hand, passes yamllint (strict,
    with deploy/.yamllint.yaml)."""
    result = subprocess.run(
        [tool("yamllint"), "--strict", "-c", str(DEPLOY / ".yamllint.yaml"), str(DEPLOY)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout
