"""The command plans of the minikube and GKE targets, against fake tools.

No Kubernetes cluster, minikube or Google Cloud account can exist on the machines these tests
run on. So every test here puts fake `kubectl`, `minikube`, `gcloud` and `docker` first on PATH
(docker through KVSTACK_DOCKER): each records its argv and answers from rules the test sets
(stdout, exit status, optionally only the first N times). The tests drive the real CLI through
kvstack.cli.main and check what matters in what it runs: which objects it changes (and that it
changes no others), with which arguments, and the order only where order matters (an image in the
cluster before the release that names it, callees' rollouts before their callers', an undo before
waiting on it), including the automatic rollback path. Services are taken from the service list,
so a fourth service or a harmless reordering (images loaded in another order) breaks no test
here; test_a_fourth_service_gets_the_same_plan adds one. The release kustomization the CLI
writes is rendered with the real `kubectl kustomize`.

The fake cluster is healthy by default: the smoke Job reports Complete (a fixture default,
after every rule a test sets). Polling (kvstack.ops.kube.POLL_S) is made instant.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml  # type: ignore[import-untyped]  # PyYAML ships no types

from kvstack import backup, cli
from kvstack.dev.processes import ServiceProcess
from kvstack.ops import catalog, kube, manifests
from kvstack.v1 import kv_pb2, kv_pb2_grpc
from tests.conftest import Spawn

REAL_KUBECTL = shutil.which("kubectl")
REGISTRY = "europe-west1-docker.pkg.dev/kvstack-demo/kvstack"
NS = ["kubectl", "--namespace", "kvstack"]
READ_ONLY = {"get", "config", "inspect", "list", "describe", "version"}

FAKE = r"""
import json, os, sys
from pathlib import Path

tool = Path(sys.argv[0]).name
argv = sys.argv[1:]
state = Path(os.environ["FAKE_STATE"])
with (state / "calls.jsonl").open("a") as log:
    log.write(json.dumps([tool, *argv]) + "\n")
rules = json.loads((state / "rules.json").read_text())
line = " ".join(argv)
for rule in rules:
    if rule["tool"] != tool or not all(part in line for part in rule["contains"]):
        continue
    if rule["times"] is not None and rule["used"] >= rule["times"]:
        continue
    rule["used"] += 1
    (state / "rules.json").write_text(json.dumps(rules))
    sys.stdout.write(rule["stdout"])
    sys.stderr.write(rule["stderr"])
    sys.exit(rule["exit"])
"""


@dataclass
class FakeTools:
    state: Path

    def rule(
        self,
        tool: str,
        *contains: str,
        stdout: str = "",
        stderr: str = "",
        exit: int = 0,
        times: int | None = None,
    ) -> None:
        """Answer calls of `tool` whose argument line contains every string (first match wins;
        the fixture's defaults come after every rule a test sets)."""
        self._add(tool, contains, stdout, stderr, exit, times, default=False)

    def default(self, tool: str, *contains: str, stdout: str = "") -> None:
        """A rule that applies only when no rule a test sets matches."""
        self._add(tool, contains, stdout, "", 0, None, default=True)

    def _add(
        self,
        tool: str,
        contains: tuple[str, ...],
        stdout: str,
        stderr: str,
        exit: int,
        times: int | None,
        default: bool,
    ) -> None:
        path = self.state / "rules.json"
        rules = json.loads(path.read_text())
        rule = {"tool": tool, "contains": list(contains), "stdout": stdout, "stderr": stderr,
                "exit": exit, "times": times, "default": default, "used": 0}  # fmt: skip
        first_default = next((i for i, r in enumerate(rules) if r["default"]), len(rules))
        rules.insert(len(rules) if default else first_default, rule)
        path.write_text(json.dumps(rules))

    def calls(self, *tools: str) -> list[list[str]]:
        """Every recorded call ([tool, *args]), optionally only of the given tools."""
        log = self.state / "calls.jsonl"
        lines = log.read_text().splitlines() if log.exists() else []
        calls = [json.loads(line) for line in lines]
        return [c for c in calls if not tools or c[0] in tools]

    def mutating(self) -> list[list[str]]:
        """Calls that would change something (not get/config/inspect/list/describe)."""
        return [c for c in self.calls() if not READ_ONLY & set(c[1:4])]

    def steps(self) -> list[list[str]]:
        """The plan as it matters: every call that changes something, and every wait for a
        rollout (`rollout status`, which orders the changes after it), in the order run."""
        return [c for c in self.mutating() if c[3:5] != ["rollout", "history"]
                and c[3:4] != ["logs"]]  # fmt: skip


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeTools:
    """Fake kubectl/minikube/kind/gcloud/docker first on PATH, a healthy cluster by default."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    state = tmp_path / "state"
    state.mkdir()
    (state / "rules.json").write_text("[]")
    for tool in ("kubectl", "minikube", "kind", "gcloud", "docker"):
        script = bin_dir / tool
        script.write_text(f"#!{sys.executable}\n{FAKE}")
        script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("KVSTACK_DOCKER", str(bin_dir / "docker"))
    monkeypatch.setenv("FAKE_STATE", str(state))
    monkeypatch.delenv("KVSTACK_GKE_REGISTRY", raising=False)
    monkeypatch.setattr(kube, "POLL_S", 0.0)
    tools = FakeTools(state)
    tools.default("kubectl", "get job/client", stdout=job_status("Complete"))
    return tools


def job_status(*conditions: str, reason: str = "", message: str = "") -> str:
    """What `kubectl get job/client -o json` prints: the Job with these conditions True."""
    return json.dumps(
        {
            "kind": "Job",
            "metadata": {"name": "client"},
            "status": {
                "conditions": [
                    {"type": c, "status": "True", "reason": reason, "message": message}
                    for c in conditions
                ]
            },
        }
    )


def minikube_context(fake: FakeTools) -> None:
    fake.rule("kubectl", "config current-context", stdout="minikube\n")


def gke_context(fake: FakeTools) -> None:
    fake.rule("kubectl", "config current-context", stdout="gke_demo_europe-west1_kvstack\n")
    fake.rule("gcloud", "auth list", stdout="ops@example.com\n")


def live(kind: str, name: str, image: str, replicas: int = 2) -> str:
    """What `kubectl get KIND/NAME -o json` prints for a running workload."""
    return json.dumps(
        {
            "kind": kind,
            "metadata": {"name": name},
            "spec": {
                "replicas": replicas,
                "template": {"spec": {"containers": [{"name": name, "image": image}]}},
            },
        }
    )


def namespaced(fake: FakeTools) -> list[list[str]]:
    """The arguments of every `kubectl --namespace kvstack ...` call, after the namespace."""
    return [c[3:] for c in fake.calls("kubectl") if c[:3] == NS]


def assert_in_order(calls: list[list[str]], *wanted: list[str]) -> None:
    """Each of `wanted` was run, in this order (other calls may come between them)."""
    missing = [w for w in wanted if w not in calls]
    assert not missing, f"never run: {missing}"
    at = [calls.index(w) for w in wanted]
    assert at == sorted(at), f"run out of order: {[calls[i] for i in sorted(at)]}"


def wait(svc: catalog.Service, timeout: int = 300) -> list[str]:
    return [*NS, "rollout", "status", kube.resource(svc), f"--timeout={timeout}s"]


def undo(svc: catalog.Service) -> list[str]:
    return [*NS, "rollout", "undo", kube.resource(svc)]


RESUME_SMOKE = [*NS, "patch", "job/client", "--type=merge", "--patch", '{"spec":{"suspend":false}}']
DELETE_SMOKE = [*NS, "delete", "job/client", "--ignore-not-found", "--wait=true"]


def release_from(calls: list[list[str]]) -> Path:
    (apply,) = [c for c in calls if c[:4] == [*NS, "apply"]]
    return Path(apply[-1])


def render(directory: Path) -> list[dict[str, Any]]:
    assert REAL_KUBECTL, "these tests render the release with the real kubectl"
    out = subprocess.run(
        [REAL_KUBECTL, "kustomize", str(directory)], capture_output=True, text=True, check=True
    ).stdout
    return [d for d in yaml.safe_load_all(out) if d]


# -- deploy -------------------------------------------------------------------------------------


def test_minikube_deploy_plan(fake: FakeTools) -> None:
    """Fake tools: `kvstack deploy minikube --version v1` checks each image before loading it
    into minikube, recreates the suspended smoke Job before applying the release (a Job's pod
    template is immutable), applies the release once every image is in the cluster, waits for
    the rollouts callees first, then resumes the smoke Job and reads its conditions until it is
    Complete (here at once). It changes nothing else. It checks the context first, and reads
    every workload (and the autoscaler) before it changes them."""
    minikube_context(fake)
    assert cli.main(["deploy", "minikube", "--version", "v1"]) == 0
    services = list(catalog.services().values())
    release = release_from(fake.calls())
    apply = [*NS, "apply", "--kustomize", str(release)]
    loads = [["minikube", "image", "load", f"{s.image}:v1"] for s in services]
    waits = [wait(s) for s in catalog.rollout_order()]
    plan = fake.steps()
    assert sorted(plan) == sorted([*loads, DELETE_SMOKE, apply, *waits, RESUME_SMOKE])
    for s, load in zip(services, loads, strict=True):
        check = ["docker", "image", "inspect", "--format", "{{.Id}}", f"{s.image}:v1"]
        assert_in_order(fake.calls(), check, load)
        assert_in_order(plan, load, apply)
    assert_in_order(plan, DELETE_SMOKE, apply, *waits, RESUME_SMOKE)
    # The context is checked before anything, and what each workload looks like is read before
    # the apply: the rollback compares against it.
    assert fake.calls()[0] == ["kubectl", "config", "current-context"]
    for what in [*map(kube.resource, catalog.rollout_order()), "horizontalpodautoscaler/server"]:
        look = [*NS, "get", what, "--ignore-not-found", "--output", "json"]
        assert_in_order(fake.calls(), look, apply)
    assert fake.calls()[-1] == [*NS, "get", "job/client", "--ignore-not-found", "--output", "json"]
    docs = render(release)
    images = {c["image"] for d in docs if "template" in d.get("spec", {})
              for c in d["spec"]["template"]["spec"]["containers"]}  # fmt: skip
    assert images == {f"{s.image}:v1" for s in catalog.services().values()}
    for d in docs:
        if d["kind"] in ("Deployment", "StatefulSet", "Job"):
            assert d["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/version"] == "v1"
            assert "kubernetes.io/change-cause" in d["metadata"]["annotations"]
        if d["kind"] == "StatefulSet":
            for claim in d["spec"]["volumeClaimTemplates"]:
                assert "app.kubernetes.io/version" not in claim["metadata"]["labels"]


def test_kind_deploy_loads_into_the_contexts_cluster(fake: FakeTools) -> None:
    """Fake tools: `kvstack deploy kind` (what tests/e2e-kind.sh runs) loads every image into
    the cluster kubectl's context names (kind-NAME), never through minikube, and applies the
    minikube overlay (storage class `standard`, which kind has too), then runs the smoke Job."""
    fake.rule("kubectl", "config current-context", stdout="kind-kvstack-e2e\n")
    assert cli.main(["deploy", "kind", "--version", "v1"]) == 0
    loads = [["kind", "load", "docker-image", "--name", "kvstack-e2e", f"{s.image}:v1"]
             for s in catalog.services().values()]  # fmt: skip
    assert sorted(fake.calls("kind")) == sorted(loads)
    assert not fake.calls("minikube")
    apply = [*NS, "apply", "--kustomize", str(release_from(fake.calls()))]
    for load in loads:
        assert_in_order(fake.calls(), load, apply, RESUME_SMOKE)
    docs = render(release_from(fake.calls()))
    (statefulset,) = [d for d in docs if d["kind"] == "StatefulSet"]
    claims = statefulset["spec"]["volumeClaimTemplates"]
    assert [c["spec"]["storageClassName"] for c in claims] == ["standard"]
    images = {c["image"] for d in docs if "template" in d.get("spec", {})
              for c in d["spec"]["template"]["spec"]["containers"]}  # fmt: skip
    assert images == {f"{s.image}:v1" for s in catalog.services().values()}


def test_gke_deploy_pushes_to_artifact_registry(fake: FakeTools) -> None:
    """Fake tools: `kvstack deploy gke` checks the gcloud login, configures docker for the
    registry host, tags and pushes every image, and the release names the Artifact Registry
    images through Kustomize `images:` (rendered with the real kubectl)."""
    gke_context(fake)
    assert cli.main(["deploy", "gke", "--version", "v2", "--registry", REGISTRY]) == 0
    calls = fake.calls("gcloud", "docker")
    host = REGISTRY.split("/")[0]
    login = ["gcloud", "auth", "list", "--filter=status:ACTIVE", "--format=value(account)"]
    configure = ["gcloud", "auth", "configure-docker", host, "--quiet"]
    apply = [*NS, "apply", "--kustomize", str(release_from(fake.calls()))]
    for s in catalog.services().values():
        remote = f"{REGISTRY}/{s.image}:v2"
        tag, push = ["docker", "tag", f"{s.image}:v2", remote], ["docker", "push", remote]
        assert_in_order(calls, login, configure, tag, push)
        assert_in_order(fake.calls(), push, apply)
    docs = render(release_from(fake.calls()))
    images = {c["image"] for d in docs if "template" in d.get("spec", {})
              for c in d["spec"]["template"]["spec"]["containers"]}  # fmt: skip
    assert images == {f"{REGISTRY}/{s.image}:v2" for s in catalog.services().values()}
    assert not fake.calls("minikube")


def test_redeploy_keeps_scale(fake: FakeTools) -> None:
    """Fake tools: a deploy over a running release carries the live replica count of a
    workload no autoscaler owns (the backend) and the autoscaler's bounds (the server's, whose
    Deployment then sets no replicas) into the release, so it neither undoes `kvstack scale`
    nor changes anything when the version is the same."""
    minikube_context(fake)
    fake.rule("kubectl", "get deployment/server", stdout=live("Deployment", "server", "x", 5))
    fake.rule("kubectl", "get statefulset/backend", stdout=live("StatefulSet", "backend", "y", 3))
    fake.rule("kubectl", "get horizontalpodautoscaler/server",
              stdout=json.dumps({"spec": {"minReplicas": 5, "maxReplicas": 5}}))  # fmt: skip
    assert cli.main(["deploy", "minikube", "--version", "v1"]) == 0
    docs = render(release_from(fake.calls()))
    by_name = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    assert "replicas" not in by_name[("Deployment", "server")]["spec"]
    assert by_name[("StatefulSet", "backend")]["spec"]["replicas"] == 3
    hpa = by_name[("HorizontalPodAutoscaler", "server")]["spec"]
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (5, 5)


def test_failed_rollout_is_rolled_back(fake: FakeTools, capsys: pytest.CaptureFixture[str]) -> None:
    """Fake tools: when `kubectl rollout status deployment/server` fails, deploy stops waiting,
    runs no smoke test, undoes only the workload whose pod template it changed (the server; the
    backend was unchanged), waits for the undo, and exits 1 saying it timed out and rolled back."""
    minikube_context(fake)
    fake.rule("kubectl", "get statefulset/backend", stdout=live("StatefulSet", "backend", "b:v1"))
    fake.rule("kubectl", "get deployment/server", stdout=live("Deployment", "server", "s:v1"),
              times=1)  # fmt: skip
    fake.rule("kubectl", "get deployment/server", stdout=live("Deployment", "server", "s:v2"))
    fake.rule("kubectl", "rollout status deployment/server", exit=1, times=1)
    assert cli.main(["deploy", "minikube", "--version", "v2", "--timeout", "60"]) == 1
    backend, server = catalog.services()["backend"], catalog.services()["server"]
    plan = fake.steps()
    apply = [*NS, "apply", "--kustomize", str(release_from(fake.calls()))]
    after = plan[plan.index(apply) + 1 :]
    assert sorted(after) == sorted([wait(backend, 60), wait(server, 60), undo(server),
                                    wait(server, 60)])  # fmt: skip
    assert_in_order(after, wait(backend, 60), wait(server, 60), undo(server))
    assert after[-1] == wait(server, 60), "the undo's rollout is awaited after it"
    err = capsys.readouterr().err
    assert "rollout of deployment/server did not finish within 60 s" in err
    assert "rolled back deployment/server" in err


@pytest.mark.parametrize("condition", ["Failed", "FailureTarget"])
def test_failed_smoke_test_is_noticed_at_once_and_rolled_back(
    fake: FakeTools, capsys: pytest.CaptureFixture[str], condition: str
) -> None:
    """Fake tools: the smoke Job runs twice more looks, then reports Failed (or, from Kubernetes
    1.31, FailureTarget first): deploy stops polling at that look (no 300 s `kubectl wait` for a
    Complete that never comes), prints the Job's logs, rolls back the changed workloads (both
    here) after it, and exits 1 with the Job's own reason and each rollback as observed."""
    minikube_context(fake)
    for kind, name in (("StatefulSet", "backend"), ("Deployment", "server")):
        fake.rule("kubectl", f"get {kind.lower()}/{name}", stdout=live(kind, name, "old"),
                  times=1)  # fmt: skip
        fake.rule("kubectl", f"get {kind.lower()}/{name}", stdout=live(kind, name, "new"))
    fake.rule("kubectl", "get job/client", stdout=job_status(), times=2)
    failed = job_status(
        condition, reason="BackoffLimitExceeded", message="Job has reached the backoff limit"
    )
    fake.rule("kubectl", "get job/client", stdout=failed)
    assert cli.main(["deploy", "minikube", "--version", "v3", "--timeout", "5"]) == 1
    calls = namespaced(fake)
    assert not [c for c in calls if c[0] == "wait"]
    looks = [i for i, c in enumerate(calls) if c[:2] == ["get", "job/client"]]
    assert len(looks) == 3, "it must stop at the first look that shows the failure"
    after = [c for c in calls[looks[-1] + 1 :] if c[0] != "get"]
    assert after[0] == ["logs", "job/client", "--tail=50"]
    undone = sorted(c for c in after if c[:2] == ["rollout", "undo"])
    assert undone == [["rollout", "undo", "deployment/server"],
                      ["rollout", "undo", "statefulset/backend"]]  # fmt: skip
    # Each rollback is awaited after its undo.
    for name in ("statefulset/backend", "deployment/server"):
        assert after.index(["rollout", "undo", name]) < after.index(
            ["rollout", "status", name, "--timeout=5s"]
        )
    err = capsys.readouterr().err
    assert (
        "the smoke test job/client failed (BackoffLimitExceeded: Job has reached the backoff "
        "limit)" in err
    )
    assert "did not finish" not in err
    assert (
        "rolled back statefulset/backend, deployment/server to the previous release (rollout "
        "finished)" in err
    )


def test_smoke_job_that_never_finishes_times_out(
    fake: FakeTools, capsys: pytest.CaptureFixture[str]
) -> None:
    """Fake tools: a smoke Job that neither completes nor fails is given up after --timeout,
    and the message says it did not finish (not that it failed)."""
    minikube_context(fake)
    fake.rule("kubectl", "get job/client", stdout=job_status())
    assert cli.main(["deploy", "minikube", "--version", "v1", "--timeout", "1"]) == 1
    err = capsys.readouterr().err
    assert "the smoke test job/client did not finish within 1 s" in err
    assert "nothing to roll back" in err


def pods(*pods: tuple[str, bool]) -> str:
    """What `kubectl get pods -o json` prints: (name, ready) for each."""
    return json.dumps({"items": [
        {"metadata": {"name": name},
         "status": {"conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}}
        for name, ready in pods
    ]})  # fmt: skip


def statefulset(image: str, update_revision: str, generation: int = 2) -> str:
    """A live StatefulSet as `kubectl get -o json` prints it, with its rollout status."""
    obj = json.loads(live("StatefulSet", "backend", image))
    obj["metadata"]["generation"] = generation
    obj["status"] = {"updateRevision": update_revision, "observedGeneration": generation}
    return json.dumps(obj)


def test_stuck_statefulset_pod_is_deleted_after_the_undo(
    fake: FakeTools, capsys: pytest.CaptureFixture[str]
) -> None:
    """Fake tools: the new backend crash-loops, so its rollout fails. After `rollout undo` the
    CLI waits until the StatefulSet controller has taken the undo (its update revision is no
    longer the bad one), deletes only the pod of the bad revision that is not Ready (the forced
    rollback step: OrderedReady never replaces it), then waits for the rollout, and says so."""
    minikube_context(fake)
    get_sts = "get statefulset/backend"
    fake.rule("kubectl", get_sts, stdout=statefulset("b:v1", "backend-good", 1), times=1)
    fake.rule("kubectl", get_sts, stdout=statefulset("b:v2", "backend-bad", 2), times=1)
    fake.rule("kubectl", get_sts, stdout=statefulset("b:v1", "backend-bad", 3), times=1)
    fake.rule("kubectl", get_sts, stdout=statefulset("b:v1", "backend-good", 3))
    fake.rule("kubectl", "get pods", "controller-revision-hash=backend-bad",
              stdout=pods(("backend-1", False)))  # fmt: skip
    fake.rule("kubectl", "rollout status statefulset/backend", exit=1, times=1)
    assert cli.main(["deploy", "minikube", "--version", "v2", "--timeout", "60"]) == 1
    calls = [c for c in namespaced(fake) if c[0] != "get" or c[1] == "pods"]
    undo = calls.index(["rollout", "undo", "statefulset/backend"])
    queries = [c for c in calls if c[:2] == ["get", "pods"]]
    assert queries, "the pods of the bad revision were never looked at"
    assert "app.kubernetes.io/name=backend" in queries[0][3]
    assert [c for c in calls[undo + 1 :] if c[:2] != ["get", "pods"]] == [
        ["delete", "pod", "backend-1", "--wait=false"],
        ["rollout", "status", "statefulset/backend", "--timeout=60s"],
    ]
    # The delete came only once the controller had taken the undo (the third look at it).
    looks = [i for i, c in enumerate(namespaced(fake)) if c[:2] == ["get", "statefulset/backend"]]
    deleted = next(i for i, c in enumerate(namespaced(fake)) if c[:2] == ["delete", "pod"])
    assert len([i for i in looks if i < deleted]) == 4
    err = capsys.readouterr().err
    assert (
        "rolled back statefulset/backend (deleted backend-1, stuck at the bad revision) to the "
        "previous release (rollout finished)" in err
    )


def test_rollback_that_does_not_finish_is_reported_as_such(
    fake: FakeTools, capsys: pytest.CaptureFixture[str]
) -> None:
    """Fake tools: when the rollout of the rollback itself does not finish, the message says
    so, and does not claim the workload was rolled back; the Ready pod of the bad revision is
    left to the controller (not deleted)."""
    minikube_context(fake)
    get_sts = "get statefulset/backend"
    fake.rule("kubectl", get_sts, stdout=statefulset("b:v1", "backend-good", 1), times=1)
    fake.rule("kubectl", get_sts, stdout=statefulset("b:v2", "backend-bad", 2), times=1)
    fake.rule("kubectl", get_sts, stdout=statefulset("b:v1", "backend-good", 3))
    fake.rule("kubectl", "get pods", stdout=pods(("backend-1", True)))
    fake.rule("kubectl", "rollout status statefulset/backend", exit=1)
    assert cli.main(["deploy", "minikube", "--version", "v2", "--timeout", "60"]) == 1
    assert not [c for c in namespaced(fake) if c[0] == "delete" and c[1] == "pod"]
    err = capsys.readouterr().err
    assert (
        "the rollback of statefulset/backend did NOT finish within 60 s: some of its pods may "
        "still run the new release" in err
    )
    assert "rolled back statefulset/backend" not in err


def test_failed_undo_is_reported_as_such(
    fake: FakeTools, capsys: pytest.CaptureFixture[str]
) -> None:
    """Fake tools: a `kubectl rollout undo` that fails is reported as failed, and its rollout is
    not awaited as if it had been undone."""
    minikube_context(fake)
    fake.rule("kubectl", "get deployment/server", stdout=live("Deployment", "server", "s:v1"),
              times=1)  # fmt: skip
    fake.rule("kubectl", "get deployment/server", stdout=live("Deployment", "server", "s:v2"))
    fake.rule("kubectl", "rollout status deployment/server", exit=1, times=1)
    fake.rule("kubectl", "rollout undo deployment/server", exit=1)
    assert cli.main(["deploy", "minikube", "--version", "v2"]) == 1
    statuses = [c for c in namespaced(fake) if c[:3] == ["rollout", "status", "deployment/server"]]
    assert len(statuses) == 1, "only the deploy's own rollout is awaited"
    err = capsys.readouterr().err
    assert "`kubectl rollout undo deployment/server` failed (see above), so it still has" in err
    assert "rolled back deployment/server" not in err


def test_first_deploy_failure_says_nothing_to_roll_back(
    fake: FakeTools, capsys: pytest.CaptureFixture[str]
) -> None:
    """Fake tools: a failed first deploy (no workload existed) undoes nothing and says so."""
    minikube_context(fake)
    fake.rule("kubectl", "rollout status statefulset/backend", exit=1)
    assert cli.main(["deploy", "minikube", "--version", "v1"]) == 1
    assert not [c for c in fake.calls("kubectl") if "undo" in c]
    assert "nothing to roll back" in capsys.readouterr().err


def test_deploy_builds_the_trees_images_when_no_version(
    fake: FakeTools, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fake tools: without --version, deploy builds this tree's images (kvstack.ops.images,
    one `docker build` per service) and deploys exactly that tag."""
    monkeypatch.setenv("KVSTACK_BASE_IMAGE", "kvstack-test-base:1")
    minikube_context(fake)
    assert cli.main(["deploy", "minikube"]) == 0
    builds = [c for c in fake.calls("docker") if c[1] == "build"]
    assert len(builds) == len(catalog.services())
    tag = builds[0][builds[0].index("--tag") + 1].split(":", 1)[1]
    loads = sorted(c[-1] for c in fake.calls("minikube"))
    assert loads == sorted(f"{s.image}:{tag}" for s in catalog.services().values())


@pytest.fixture
def four_services(monkeypatch: pytest.MonkeyPatch) -> dict[str, catalog.Service]:
    """The service list with a fourth service, `cache` (stateless, calling the backend, called
    by the server), listed last, after the server that calls it: a plan must follow the calls,
    not the list's order. No manifests exist for it, so the release is not rendered here (the
    scaffold tests render a new service's)."""
    services = dict(catalog.services())
    services["server"] = dataclasses.replace(services["server"], calls=("cache", "backend"))
    services["cache"] = catalog.Service(
        "cache", "stateless", port=50071, replicas=2, calls=("backend",)
    )
    monkeypatch.setattr(catalog, "services", lambda: services)
    return services


def test_a_fourth_service_gets_the_same_plan(
    fake: FakeTools, four_services: dict[str, catalog.Service]
) -> None:
    """Fake tools: with a fourth service in the list, deploy loads its image too and awaits its
    rollout after the backend it calls and before the server that calls it; a failed rollout of
    it stops the deploy before the server's is awaited and undoes what changed; rollback,
    scale and history reach it too."""
    minikube_context(fake)
    backend, server, cache = (four_services[n] for n in ("backend", "server", "cache"))
    assert cli.main(["deploy", "minikube", "--version", "v1"]) == 0
    plan = fake.steps()
    assert ["minikube", "image", "load", "kvstack-cache:v1"] in plan
    assert_in_order(plan, wait(backend), wait(cache), wait(server), RESUME_SMOKE)

    fake.rule("kubectl", "get deployment/cache", stdout=live("Deployment", "cache", "c:v1"),
              times=1)  # fmt: skip
    fake.rule("kubectl", "get deployment/cache", stdout=live("Deployment", "cache", "c:v2"))
    fake.rule("kubectl", "rollout status deployment/cache", exit=1, times=1)
    before = len(fake.steps())
    assert cli.main(["deploy", "minikube", "--version", "v2"]) == 1
    plan = fake.steps()[before:]
    assert wait(server) not in plan, "the server's rollout is not awaited after its callee's failed"
    assert RESUME_SMOKE not in plan
    assert [c for c in plan if c[3:5] == ["rollout", "undo"]] == [undo(cache)]
    assert_in_order(plan, wait(cache), undo(cache))

    before = len(fake.steps())
    assert cli.main(["rollback", "minikube"]) == 0
    assert sorted(c for c in fake.steps()[before:] if c[3:5] == ["rollout", "undo"]) == sorted(
        undo(s) for s in (backend, server, cache)
    )
    before = len(fake.steps())
    assert cli.main(["scale", "minikube", "cache", "5"]) == 0
    assert_in_order(fake.steps()[before:], [*NS, "scale", "deployment/cache", "--replicas=5"],
                    wait(cache))  # fmt: skip
    before = len(fake.calls())
    assert cli.main(["history", "minikube"]) == 0
    assert [*NS, "rollout", "history", "deployment/cache"] in fake.calls()[before:]


# -- errors that say what to do -----------------------------------------------------------------


def _no_context(f: FakeTools) -> None:
    f.rule("kubectl", "config current-context", exit=1)


def _wrong_context(f: FakeTools) -> None:
    f.rule("kubectl", "config current-context", stdout="gke_x\n")


def _gcloud_logged_out(f: FakeTools) -> None:
    f.rule("kubectl", "config current-context", stdout="gke_a_b_c\n")
    f.rule("gcloud", "auth list", stdout="")


def _gke_wrong_context(f: FakeTools) -> None:
    f.rule("kubectl", "config current-context", stdout="minikube\n")


def _image_missing(f: FakeTools) -> None:
    minikube_context(f)
    f.rule("docker", "image inspect", exit=1)


def _gke_image_missing(f: FakeTools) -> None:
    gke_context(f)
    f.rule("docker", "image inspect", exit=1)
    f.rule("gcloud", "artifacts docker images describe", exit=1)


@pytest.mark.parametrize(
    ("target", "setup", "message"),
    [
        ("minikube", _no_context, "kubectl has no current context"),
        ("minikube", _wrong_context, "kubectl config use-context minikube"),
        ("kind", _gke_wrong_context, "kubectl config use-context kind-NAME"),
        ("gke", _gcloud_logged_out, "gcloud auth login"),
        ("gke", _gke_wrong_context, "gcloud container clusters get-credentials"),
        ("minikube", _image_missing, "kvstack images --tag v1"),
        ("gke", _gke_image_missing, "is not in Artifact Registry"),
    ],
    ids=lambda v: v.__name__.strip("_") if callable(v) else None,
)
def test_errors_say_what_to_do(
    fake: FakeTools,
    capsys: pytest.CaptureFixture[str],
    target: str,
    setup: Callable[[FakeTools], None],
    message: str,
) -> None:
    """Fake tools: each precondition failure stops the deploy before anything changes on the
    cluster, with a message naming the fix."""
    setup(fake)
    assert cli.main(["deploy", target, "--version", "v1", "--registry", REGISTRY]) == 1
    assert message in capsys.readouterr().err
    assert not [c for c in fake.calls("kubectl") if "apply" in c]


def test_gke_needs_a_registry(fake: FakeTools, capsys: pytest.CaptureFixture[str]) -> None:
    """Fake tools: GKE without --registry or KVSTACK_GKE_REGISTRY says how to give one."""
    gke_context(fake)
    assert cli.main(["deploy", "gke", "--version", "v1"]) == 1
    assert "KVSTACK_GKE_REGISTRY" in capsys.readouterr().err


def test_dry_run_changes_nothing(fake: FakeTools, capsys: pytest.CaptureFixture[str]) -> None:
    """Fake tools: --dry-run runs only read-only queries, yet prints every command a real
    deploy would run (the release file as a heredoc, apply, rollout status, smoke test)."""
    gke_context(fake)
    assert cli.main(["deploy", "gke", "--dry-run", "--version", "v1", "--registry", REGISTRY]) == 0
    assert fake.mutating() == []
    err = capsys.readouterr().err
    for line in (
        f"+ gcloud auth configure-docker {REGISTRY.split('/')[0]} --quiet",
        f"docker push {REGISTRY}/kvstack-server:v1",
        "<<'EOF'",
        "+ kubectl --namespace kvstack apply --kustomize",
        "+ kubectl --namespace kvstack rollout status deployment/server --timeout=300s",
        "+ kubectl --namespace kvstack patch job/client",
        "(dry run) would poll job/client until it is Complete or has Failed",
    ):
        assert line in err


# -- scale, rollback, status, history -----------------------------------------------------------


def test_scale_moves_the_autoscaler_first(fake: FakeTools) -> None:
    """Fake tools: `kvstack scale gke server 5` sets the HPA to 5..5 before `kubectl scale`, so
    the autoscaler does not undo it, then waits for the rollout; back to 2 restores 2..5."""
    gke_context(fake)
    assert cli.main(["scale", "gke", "server", "5"]) == 0
    assert cli.main(["scale", "gke", "server", "2"]) == 0
    server = catalog.services()["server"]

    def bounds(low: int, high: int) -> list[str]:
        patch = f'{{"spec":{{"minReplicas":{low},"maxReplicas":{high}}}}}'
        return [*NS, "patch", "horizontalpodautoscaler/server", "--type=merge", "--patch", patch]

    def scale(n: int) -> list[str]:
        return [*NS, "scale", "deployment/server", f"--replicas={n}"]

    to_five = [bounds(5, 5), scale(5), wait(server)]
    back = [bounds(2, manifests.HPA_MAX_REPLICAS), scale(2), wait(server)]
    assert fake.steps() == [*to_five, *back]


def test_scale_stateful_and_job(fake: FakeTools, capsys: pytest.CaptureFixture[str]) -> None:
    """Fake tools: a stateful service has no autoscaler to move; a job cannot be scaled."""
    minikube_context(fake)
    assert cli.main(["scale", "minikube", "backend", "3"]) == 0
    assert [c for c in namespaced(fake) if c[0] == "scale"] == [
        ["scale", "statefulset/backend", "--replicas=3"]
    ]
    assert not [c for c in fake.calls("kubectl") if "patch" in c]
    assert cli.main(["scale", "minikube", "client", "3"]) == 1
    assert "client is a job" in capsys.readouterr().err


def test_rollback_to_version(fake: FakeTools) -> None:
    """Fake tools: `rollback gke server --to v1` finds the newest ReplicaSet revision labelled
    v1 and undoes to it; without --to, every long-running service goes back one release."""
    gke_context(fake)
    fake.rule("kubectl", "get replicasets", stdout="3\n5\n")
    assert cli.main(["rollback", "gke", "server", "--to", "v1"]) == 0
    query = next(c for c in fake.calls("kubectl") if "replicasets" in c)
    assert "app.kubernetes.io/name=server,app.kubernetes.io/version=v1" in query
    server = catalog.services()["server"]
    assert fake.steps() == [[*undo(server), "--to-revision=5"], wait(server)]
    before = len(fake.steps())
    assert cli.main(["rollback", "gke"]) == 0
    plan = fake.steps()[before:]
    long_running = catalog.rollout_order()
    assert sorted(plan) == sorted([*map(undo, long_running), *map(wait, long_running)])
    for svc in long_running:
        assert_in_order(plan, undo(svc), wait(svc))


def test_rollback_to_unknown_version(fake: FakeTools, capsys: pytest.CaptureFixture[str]) -> None:
    """Fake tools: a version no revision carries is refused, pointing at `kvstack history`."""
    minikube_context(fake)
    fake.rule("kubectl", "get controllerrevisions", stdout="")
    assert cli.main(["rollback", "minikube", "backend", "--to", "v0"]) == 1
    assert "kvstack history minikube" in capsys.readouterr().err
    assert not [c for c in fake.calls("kubectl") if "undo" in c]


def test_status_and_history(fake: FakeTools) -> None:
    """Fake tools: status lists workloads (version, ready, desired, image), autoscalers and
    budgets, and each long-running service's rollout history; history lists the latter."""
    minikube_context(fake)
    assert cli.main(["status", "minikube"]) == 0
    gets = [c for c in namespaced(fake) if c[0] in ("get", "rollout")]
    assert gets[0][:4] == ["get", "deployments,statefulsets,jobs", "--selector",
                           "app.kubernetes.io/part-of=kvstack"]  # fmt: skip
    assert "VERSION:.spec.template.metadata.labels.app\\.kubernetes\\.io/version" in gets[0][4]
    assert gets[1][1] == "horizontalpodautoscalers,poddisruptionbudgets"
    histories = sorted(["rollout", "history", kube.resource(s)] for s in catalog.rollout_order())
    assert sorted(gets[2:]) == histories
    before = len(namespaced(fake))
    assert cli.main(["history", "minikube"]) == 0
    assert sorted(namespaced(fake)[before:]) == histories
    assert fake.steps() == [], "status and history change nothing"


# -- --namespace --------------------------------------------------------------------------------

STAGING = "kvstack-staging"
CLUSTER_SCOPED = {"Namespace"}


def outside(fake: FakeTools, namespace: str) -> list[list[str]]:
    """kubectl calls that are not `kubectl --namespace NAMESPACE ...` (bar the context check)."""
    return [
        c
        for c in fake.calls("kubectl")
        if c[1:3] != ["--namespace", namespace] and c[1:3] != ["config", "current-context"]
    ]


def test_deploy_into_another_namespace(fake: FakeTools) -> None:
    """Fake tools: `kvstack deploy gke --namespace kvstack-staging` names that namespace in every
    kubectl call, and the release (rendered with the real kubectl) puts every namespaced object
    in it: Kustomize's `namespace:` renames the base's Namespace object, which keeps its Pod
    Security labels; network policies still let DNS (kube-system) and the collectors
    (gke-gmp-system) in, and select pods by label as before; the PodMonitoring sits in, and
    scrapes, the new one."""
    gke_context(fake)
    argv = ["deploy", "gke", "--namespace", STAGING, "--version", "v1", "--registry", REGISTRY]
    assert cli.main(argv) == 0
    assert outside(fake, STAGING) == []
    (apply,) = [c for c in fake.calls("kubectl") if "apply" in c]
    docs = render(Path(apply[-1]))
    namespaced_docs = [d for d in docs if d["kind"] not in CLUSTER_SCOPED]
    assert namespaced_docs
    assert {d["metadata"].get("namespace") for d in namespaced_docs} == {STAGING}
    (ns,) = [d for d in docs if d["kind"] == "Namespace"]
    assert ns["metadata"]["name"] == STAGING
    labels = ns["metadata"]["labels"]
    for mode in ("enforce", "audit", "warn"):
        assert labels[f"pod-security.kubernetes.io/{mode}"] == "restricted"
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    selected = {
        peer["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"]
        for p in policies
        for rule in p["spec"].get("ingress", []) + p["spec"].get("egress", [])
        for peer in rule.get("from", []) + rule.get("to", [])
        if "namespaceSelector" in peer
    }
    assert selected == {"kube-system", manifests.GMP_NAMESPACE}
    (monitor,) = [d for d in docs if d["kind"] == "PodMonitoring"]
    assert monitor["spec"]["selector"]["matchLabels"] == {
        "app.kubernetes.io/part-of": manifests.PART_OF
    }
    causes = {d["metadata"]["annotations"]["kubernetes.io/change-cause"] for d in docs
              if d["kind"] in ("Deployment", "StatefulSet", "Job")}  # fmt: skip
    assert causes == {f"kvstack deploy gke --namespace {STAGING} --version v1"}


def test_default_namespace_release_is_unchanged(fake: FakeTools) -> None:
    """Fake tools: without --namespace the release kustomization sets no `namespace:` (the
    base's own, kvstack, applies) and every kubectl call names kvstack, as before. The
    components' objects (network policies) carry no namespace there: `kubectl --namespace
    kvstack apply` places them."""
    minikube_context(fake)
    assert cli.main(["deploy", "minikube", "--version", "v1"]) == 0
    assert outside(fake, manifests.NAMESPACE) == []
    text = (release_from(fake.calls()) / "kustomization.yaml").read_text()
    assert "namespace" not in yaml.safe_load(text)
    assert {d["metadata"].get("namespace") for d in render(release_from(fake.calls()))
            if d["kind"] != "Namespace"} <= {manifests.NAMESPACE, None}  # fmt: skip


@pytest.mark.parametrize(
    "argv",
    [
        ["scale", "gke", "server", "3"],
        ["status", "gke"],
        ["history", "minikube"],
        ["rollback", "gke"],
        ["rollback", "minikube", "server", "--to", "v1"],
    ],
    ids=" ".join,
)
def test_every_verb_works_in_the_namespace_given(fake: FakeTools, argv: list[str]) -> None:
    """Fake tools: scale, status, history and rollback with --namespace kvstack-staging name
    that namespace in every kubectl call they make."""
    gke_context(fake) if argv[1] == "gke" else minikube_context(fake)
    fake.rule("kubectl", "get replicasets", stdout="4\n")
    assert cli.main([*argv, "--namespace", STAGING]) == 0
    assert len(fake.calls("kubectl")) > 1
    assert outside(fake, STAGING) == []


def test_namespace_errors(fake: FakeTools, capsys: pytest.CaptureFixture[str]) -> None:
    """Fake tools: hints in errors carry the namespace; `local` (Swarm) has no namespaces; a
    name Kubernetes would refuse is refused before anything runs."""
    minikube_context(fake)
    fake.rule("kubectl", "get controllerrevisions", stdout="")
    assert cli.main(["rollback", "minikube", "backend", "--to", "v0", "--namespace", STAGING]) == 1
    assert f"kvstack history minikube --namespace {STAGING}" in capsys.readouterr().err
    assert cli.main(["status", "local", "--namespace", STAGING]) == 1
    assert "the local target has no namespaces" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["status", "gke", "--namespace", "Not_A_Namespace"])


# -- backup and restore -------------------------------------------------------------------------
#
# The fake `kubectl port-forward` prints the line the real one prints and "forwards" to a real
# backend process on loopback, so the backup and the restore run end to end through the CLI.


@pytest.fixture
def forwarded(fake: FakeTools, spawn: Spawn, tmp_path: Path) -> ServiceProcess:
    """A real primary backend, which the fake port-forward says it forwards to."""
    env = {"KVSTACK_DATA_DIR": str(tmp_path / "data"), "KVSTACK_ORDINAL": "0",
           "KVSTACK_BACKEND_TARGET": "127.0.0.1:1"}  # fmt: skip
    primary = spawn("backend", env).wait_serving()
    fake.rule("kubectl", "port-forward",
              stdout=f"Forwarding from 127.0.0.1:{primary.port} -> 50061\n")  # fmt: skip
    return primary


def put(target: str, key: bytes, value: bytes) -> None:
    with grpc.insecure_channel(target) as channel:
        kv_pb2_grpc.KeyValueStub(channel).Put(kv_pb2.PutRequest(key=key, value=value), timeout=5)


def port_forwards(fake: FakeTools) -> list[list[str]]:
    return [c[1:] for c in fake.calls("kubectl") if "port-forward" in c]


def test_gke_backup_goes_through_a_port_forward_to_backend_0_and_changes_nothing(
    fake: FakeTools, forwarded: ServiceProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Fake tools: `kvstack backup gke` checks the context, port-forwards 127.0.0.1 to
    backend-0's gRPC port in the namespace, and copies the primary through it: no exec (the image
    has no shell), no object created or changed in the cluster. The file is a checked backup."""
    gke_context(fake)
    put(forwarded.target, b"a", b"1")
    out = tmp_path / "b.mdb"
    assert cli.main(["backup", "gke", "--output", str(out)]) == 0
    assert port_forwards(fake) == [
        ["--namespace", "kvstack", "port-forward", "--address=127.0.0.1", "pod/backend-0", ":50061"]
    ]
    assert [c for c in fake.mutating() if "port-forward" not in c] == []
    assert backup.check_file(out).keys == 1
    err = capsys.readouterr().err
    assert "port-forward to pod/backend-0 on 127.0.0.1:" in err
    assert "backup: done" in err


def test_minikube_restore_refuses_live_data_without_force_then_restores_with_it(
    fake: FakeTools, forwarded: ServiceProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Fake tools, real primary: over live data the restore is refused saying how many keys it
    would replace and lose, and the data stays; with --force it is the backup's, and
    --namespace reaches the pod in that namespace."""
    minikube_context(fake)
    put(forwarded.target, b"a", b"1")
    out = tmp_path / "b.mdb"
    assert cli.main(["backup", "minikube", "--output", str(out)]) == 0
    put(forwarded.target, b"b", b"2")
    assert cli.main(["restore", "minikube", str(out), "--namespace", "other"]) == 1
    err = capsys.readouterr().err
    assert "holds 2 keys" in err
    assert "replace 1" in err
    assert "lose 1" in err
    assert "--force" in err
    assert port_forwards(fake)[-1][:2] == ["--namespace", "other"]
    assert cli.main(["restore", "minikube", str(out), "--force"]) == 0
    assert "1 replaced, 1 lost" in capsys.readouterr().err
    with grpc.insecure_channel(forwarded.target) as channel:
        keys = kv_pb2_grpc.KeyValueStub(channel).List(kv_pb2.ListRequest(), timeout=5).entries
    assert [e.key for e in keys] == [b"a"]


def test_a_bad_backup_is_refused_before_any_call_to_the_cluster(
    fake: FakeTools, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gke_context(fake)
    other = tmp_path / "notes.mdb"
    other.write_bytes(b"not lmdb")
    assert cli.main(["restore", "gke", str(other), "--force"]) == 1
    err = capsys.readouterr().err
    assert "not a kvstack backup" in err
    assert "Nothing was sent to the target" in err
    assert port_forwards(fake) == []


def test_a_port_forward_that_fails_says_what_to_check(
    fake: FakeTools, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gke_context(fake)
    fake.rule("kubectl", "port-forward", exit=1,
              stderr="error: unable to forward port because pod is not running. "
              "Current status=Pending\n")  # fmt: skip
    assert cli.main(["backup", "gke", "--output", str(tmp_path / "b.mdb")]) == 1
    err = capsys.readouterr().err
    assert "pod is not running" in err
    assert "Is pod/backend-0 Running" in err
    assert not (tmp_path / "b.mdb").exists()


def test_backup_dry_run_prints_the_port_forward_and_runs_nothing(
    fake: FakeTools, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    gke_context(fake)
    assert cli.main(["backup", "gke", "--dry-run", "--output", str(tmp_path / "b.mdb")]) == 0
    err = capsys.readouterr().err
    assert "port-forward --address=127.0.0.1 pod/backend-0 :50061" in err
    assert port_forwards(fake) == []
