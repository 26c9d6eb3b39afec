"""The Kubernetes targets, `minikube`, `kind` and `gke`, of the shared verbs (kvstack.ops.targets).

They wrap kubectl (and minikube, kind, gcloud, docker) and reimplement nothing:
- deploy: check the kubectl context (and gcloud login), build the tree's images if needed,
  ship them (`minikube image load`, `kind load docker-image`; GKE: `docker push` to Artifact
  Registry), write a release kustomization on top of deploy/overlays/TARGET (kind: minikube's)
  that sets images, version label and change cause through Kustomize (`images:`, patches; never
  text substitution) and keeps the current replica
  counts and autoscaler bounds (so deploying the same version twice changes nothing, and a deploy
  does not undo `kvstack scale`), `kubectl apply -k` it, `kubectl rollout status` every workload
  (callees first), then run the smoke Job (created suspended; resumed here) and poll it until
  it is Complete or has Failed. When a rollout or the smoke test fails, every workload whose
  pod template this deploy changed is rolled back with `kubectl rollout undo` (a StatefulSet's
  pods stuck at the bad revision deleted: Kubernetes' "forced rollback"), each rollback's
  rollout is awaited, and the error states what was observed of each.
- scale: move the autoscaler's bounds first (so it does not undo the change), then
  `kubectl scale` and wait.
- status, history: kubectl get / rollout history; rollback: `kubectl rollout undo`, with
  `--to VERSION` mapped to the revision whose pods carry that version label.

Every verb works in one namespace, `--namespace NS` (default NAMESPACE, `kvstack`, the one the
generated manifests name): every kubectl call names it, and a deploy to another namespace sets
Kustomize's `namespace:` in the release kustomization. That moves every namespaced object into NS
and renames the base's Namespace object to NS (its Pod Security labels stay on it), so one
cluster can hold several releases side by side (the pipeline: `kvstack-staging` and `kvstack`).
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvstack.ops import catalog, images, manifests, model
from kvstack.ops.engine import docker
from kvstack.ops.errors import CommandError
from kvstack.ops.shell import Runner, say
from kvstack.ops.targets import DEFAULT_NAMESPACE, DeployRequest

NAMESPACE = manifests.NAMESPACE
if NAMESPACE != DEFAULT_NAMESPACE:
    raise AssertionError("--namespace's default must be the generated manifests' namespace")
OVERLAYS = manifests.ROOT / manifests.DEPLOY / "overlays"
VERSION_LABEL = "app.kubernetes.io/version"
CHANGE_CAUSE = "kubernetes.io/change-cause"
GKE_REGISTRY_ENV = "KVSTACK_GKE_REGISTRY"
REVISION_LABEL = "controller-revision-hash"  # the StatefulSet revision a pod was made from
POLL_S = 2.0  # between two looks at a Job or a StatefulSet's status
UNDO_SEEN_S = 60.0  # how long the StatefulSet controller may take to act on `rollout undo`


def kubectl(*args: str, namespace: str = NAMESPACE) -> list[str]:
    return ["kubectl", "--namespace", namespace, *args]


def resource(svc: catalog.Service) -> str:
    """kind/name as kubectl takes it (deployment/server, statefulset/backend, job/client)."""
    return f"{manifests.workload_kind(svc).lower()}/{svc.name}"


def jobs() -> list[catalog.Service]:
    return [s for s in catalog.services().values() if not s.long_running]


def get_json(runner: Runner, what: str, namespace: str = NAMESPACE) -> dict[str, Any] | None:
    """The live object (kind/name) in `namespace` as JSON, None when it does not exist."""
    argv = kubectl("get", what, "--ignore-not-found", "--output", "json", namespace=namespace)
    result = runner.query(argv)
    if result.returncode != 0:
        if runner.dry_run:
            say(f"(dry run) could not read {what}; assuming it does not exist yet")
            return None
        raise CommandError(
            f"`{shlex.join(argv)}` failed: {result.stderr.strip()}; is the cluster reachable "
            "(`kubectl cluster-info`)?"
        )
    text = result.stdout.strip()
    if not text:
        return None
    parsed: dict[str, Any] = json.loads(text)
    return parsed


@dataclass
class Snapshot:
    """What a workload looks like before a deploy: its pod template and its scale."""

    templates: dict[str, str] = field(default_factory=dict)  # resource -> template JSON
    replicas: dict[str, int] = field(default_factory=dict)  # service -> current replicas
    hpa_bounds: dict[str, tuple[int, int]] = field(default_factory=dict)  # service -> (min, max)


def template_of(obj: dict[str, Any] | None) -> str:
    return json.dumps(obj["spec"]["template"], sort_keys=True) if obj else ""


def rollout_status(
    runner: Runner, svc: catalog.Service, timeout: int, namespace: str = NAMESPACE
) -> bool:
    say(f"waiting for {resource(svc)} (up to {timeout} s)")
    argv = kubectl("rollout", "status", resource(svc), f"--timeout={timeout}s", namespace=namespace)
    return runner.run(argv, check=False).returncode == 0


class KubeTarget:
    """A Kubernetes cluster reached through kubectl's current context, and the namespace there
    the release lives in (default NAMESPACE, the generated manifests' own)."""

    name = "kube"

    def __init__(self, namespace: str = NAMESPACE) -> None:
        self.namespace = namespace

    def kubectl(self, *args: str) -> list[str]:
        return kubectl(*args, namespace=self.namespace)

    @property
    def cli_target(self) -> str:
        """How the kvstack CLI names this target and namespace (`gke --namespace NS`)."""
        if self.namespace == NAMESPACE:
            return self.name
        return f"{self.name} --namespace {self.namespace}"

    @property
    def where(self) -> str:
        """This target and namespace, for messages."""
        if self.namespace == NAMESPACE:
            return self.name
        return f"{self.name} (namespace {self.namespace})"

    @property
    def overlay(self) -> Path:
        return OVERLAYS / self.name

    # -- hooks for the two clusters -------------------------------------------------------------

    def check_access(self, runner: Runner, context: str) -> None:
        """Raise when kubectl's context (or the cloud login) is not this target's."""

    def ship(self, runner: Runner, version: str, request: DeployRequest) -> list[dict[str, str]]:
        """Make the images reachable by the cluster; return the Kustomize `images:` entries."""
        raise NotImplementedError

    # -- shared steps ---------------------------------------------------------------------------

    def preflight(self, runner: Runner) -> None:
        """Stop unless kubectl points at this target (under --dry-run: say so and go on)."""
        try:
            context = self.current_context(runner)
        except CommandError as err:
            if not runner.dry_run:
                raise
            say(f"(dry run) would stop here: {err}")
            return
        say(f"kubectl context: {context}")

    def current_context(self, runner: Runner) -> str:
        result = runner.query(["kubectl", "config", "current-context"])
        context = result.stdout.strip()
        if result.returncode != 0 or not context:
            raise CommandError(
                "kubectl has no current context, so there is no cluster to deploy to; "
                + self.context_hint()
            )
        self.check_access(runner, context)
        return context

    def context_hint(self) -> str:
        return "point kubectl at the cluster and retry"

    def build_or_reuse(self, runner: Runner, request: DeployRequest) -> str:
        """The version to deploy; this tree's images are built unless already current."""
        if request.version:
            return request.version
        version = images.version()
        images.build(runner, list(catalog.services().values()), version, only_if_changed=True)
        return version

    def snapshot(self, runner: Runner) -> Snapshot:
        snap = Snapshot()
        for svc in catalog.rollout_order():
            live = get_json(runner, resource(svc), self.namespace)
            snap.templates[resource(svc)] = template_of(live)
            if model.autoscaled(svc):
                # Its scale is its autoscaler's bounds: the release sets no replicas on a
                # workload an HPA owns (see kvstack.ops.manifests.deployment).
                hpa = get_json(runner, f"horizontalpodautoscaler/{svc.name}", self.namespace)
                if hpa:
                    snap.hpa_bounds[svc.name] = (
                        int(hpa["spec"].get("minReplicas", 1)),
                        int(hpa["spec"]["maxReplicas"]),
                    )
            elif live:
                snap.replicas[svc.name] = int(live["spec"].get("replicas", svc.replicas))
        return snap

    def release_kustomization(
        self, directory: Path, version: str, image_entries: list[dict[str, str]], snap: Snapshot
    ) -> dict[str, Any]:
        """The release on top of the overlay: images, version label, change cause, scale."""
        cause = f"kvstack deploy {self.cli_target} --version {version}"
        patches: list[dict[str, Any]] = [
            {
                "target": {"kind": "(Deployment|StatefulSet|Job)"},
                # Strategic merge patch; Kustomize applies it to every target, whatever the
                # kind and name written here. Labels only the pod template: a label on a
                # StatefulSet's volumeClaimTemplates would be an immutable-field change.
                "patch": json.dumps(
                    {
                        "apiVersion": "apps/v1",
                        "kind": "Deployment",
                        "metadata": {"name": "any", "annotations": {CHANGE_CAUSE: cause}},
                        "spec": {"template": {"metadata": {"labels": {VERSION_LABEL: version}}}},
                    }
                ),
            }
        ]
        for name, (low, high) in snap.hpa_bounds.items():
            patches.append(
                {
                    "target": {"kind": "HorizontalPodAutoscaler", "name": name},
                    "patch": json.dumps(
                        {
                            "apiVersion": "autoscaling/v2",
                            "kind": "HorizontalPodAutoscaler",
                            "metadata": {"name": name},
                            "spec": {"minReplicas": low, "maxReplicas": high},
                        }
                    ),
                }
            )
        body: dict[str, Any] = {
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
        }
        if self.namespace != NAMESPACE:
            # Kustomize moves every namespaced object into it and renames the one Namespace
            # object (labels, Pod Security included, carried over); policies and monitoring
            # select pods by label within their own namespace, so they follow as they are.
            body["namespace"] = self.namespace
        body |= {
            "resources": [os.path.relpath(self.overlay, directory)],
            "images": image_entries,
            "patches": patches,
        }
        if snap.replicas:
            body["replicas"] = [{"name": n, "count": c} for n, c in snap.replicas.items()]
        return body

    def write_release(self, runner: Runner, body_for: Any) -> Path:
        """Write the release kustomization to a fresh directory (printed, so it can be redone)."""
        if runner.dry_run:
            directory = Path(tempfile.gettempdir()) / f"kvstack-release-{self.name}"
        else:
            directory = Path(tempfile.mkdtemp(prefix=f"kvstack-release-{self.name}-"))
        body = body_for(directory)
        text = manifests.dump(body).replace(manifests.GENERATED_HEADER, "")
        path = directory / "kustomization.yaml"
        print(f"+ mkdir -p {directory} && cat > {path} <<'EOF'\n{text}EOF", file=sys.stderr)
        if not runner.dry_run:
            path.write_text(text, encoding="utf-8")
        return directory

    def stuck_pods(self, runner: Runner, svc: catalog.Service, revision: str) -> list[str]:
        """The pods of a StatefulSet made from `revision` that are not Ready."""
        selector = ",".join(
            f"{k}={v}"
            for k, v in {**manifests.selector_labels(svc), REVISION_LABEL: revision}.items()
        )
        result = runner.query(
            self.kubectl("get", "pods", "--selector", selector, "--output", "json")
        )
        if result.returncode != 0 or not result.stdout.strip():
            return []
        stuck = []
        for pod in json.loads(result.stdout).get("items", []):
            conditions = pod.get("status", {}).get("conditions", [])
            ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)
            if not ready:
                stuck.append(str(pod["metadata"]["name"]))
        return sorted(stuck)

    def force_rollback(self, runner: Runner, svc: catalog.Service, bad: str) -> str:
        """Kubernetes' forced rollback of an OrderedReady StatefulSet: `rollout undo` reverts the
        template, but a pod stuck at the bad revision (crash loop, image pull error) is never
        replaced, and the rollout waits for it forever. Once the controller has taken the undo
        (its update revision is no longer `bad`), delete the pods of the bad revision that are
        not Ready; the controller recreates them from the reverted template.
        https://kubernetes.io/docs/concepts/workloads/controllers/statefulset/#forced-rollback
        What was done, as a phrase ("" when nothing was stuck)."""
        if runner.dry_run:
            say(f"(dry run) would delete the pods of {resource(svc)} stuck at revision {bad}")
            return ""
        if not self.stuck_pods(runner, svc, bad):
            return ""  # nothing stuck: the controller rolls every pod back by itself
        deadline = time.monotonic() + UNDO_SEEN_S
        while True:
            live = get_json(runner, resource(svc), self.namespace) or {}
            status = live.get("status", {})
            generation = live.get("metadata", {}).get("generation", 0)
            taken = (
                status.get("updateRevision", bad) != bad
                and status.get("observedGeneration", generation) >= generation
            )
            if taken:
                break
            if time.monotonic() > deadline:
                return (
                    f"the StatefulSet controller had not taken the undo after {UNDO_SEEN_S:.0f} s "
                    f"(update revision still {bad}), so no stuck pod was deleted"
                )
            time.sleep(POLL_S)
        stuck = self.stuck_pods(runner, svc, bad)
        if not stuck:
            return ""
        say(f"{resource(svc)}: deleting {', '.join(stuck)}, stuck at the bad revision {bad}")
        deleted = runner.run(self.kubectl("delete", "pod", *stuck, "--wait=false"), check=False)
        if deleted.returncode != 0:
            return f"could not delete {', '.join(stuck)}, stuck at the bad revision (see above)"
        return f"deleted {', '.join(stuck)}, stuck at the bad revision"

    def roll_back_changed(self, runner: Runner, snap: Snapshot, timeout: int) -> str:
        """Undo every workload whose pod template differs from before the deploy, wait for each
        rollback's rollout, and say what was observed of each (never what was only hoped)."""
        undone: list[tuple[catalog.Service, str]] = []  # and the bad revision (StatefulSets)
        failed: list[str] = []
        for svc in catalog.rollout_order():
            before = snap.templates[resource(svc)]
            if not before:
                continue  # created by this deploy: there is no earlier revision to return to
            live = get_json(runner, resource(svc), self.namespace)
            after = template_of(live)
            if after and after != before:
                say(f"rolling back {resource(svc)}")
                bad = str((live or {}).get("status", {}).get("updateRevision", ""))
                if runner.run(
                    self.kubectl("rollout", "undo", resource(svc)), check=False
                ).returncode:
                    failed.append(
                        f"`kubectl rollout undo {resource(svc)}` failed (see above), so it still "
                        "has the new release's template"
                    )
                    continue
                undone.append((svc, bad))
        finished: list[str] = []
        for svc, bad in undone:
            forced = self.force_rollback(runner, svc, bad) if svc.kind == "stateful" and bad else ""
            done = rollout_status(runner, svc, timeout, self.namespace)
            note = f" ({forced})" if forced else ""
            if done:
                finished.append(resource(svc) + note)
            else:
                failed.append(
                    f"the rollback of {resource(svc)}{note} did NOT finish within {timeout} s: "
                    "some of its pods may still run the new release"
                )
        parts = []
        if finished:
            parts.append(
                f"rolled back {', '.join(finished)} to the previous release (rollout finished)"
            )
        parts += failed
        return "; ".join(parts) or "nothing to roll back (no workload had an earlier release)"

    def wait_job(self, runner: Runner, svc: catalog.Service, timeout: int) -> str | None:
        """Wait until the Job is Complete (None) or has failed (the failure, as the Job says).

        `kubectl wait --for=condition=complete` does not return when a Job fails, and waits
        for one condition only (kubectl 1.27-1.33), so this polls the Job's conditions:
        Complete; Failed, or FailureTarget (Kubernetes 1.31 on sets it first, while the Job's
        last pods terminate)."""
        if runner.dry_run:
            say(f"(dry run) would poll {resource(svc)} until it is Complete or has Failed")
            return None
        deadline = time.monotonic() + timeout
        started = time.monotonic()
        while True:
            try:
                job = get_json(runner, resource(svc), self.namespace)
            except CommandError as err:
                return f"the smoke test {resource(svc)} could not be read ({err})"
            if job is None:
                return f"the smoke test {resource(svc)} is gone (deleted while it ran?)"
            conditions = {
                c.get("type"): c
                for c in job.get("status", {}).get("conditions", [])
                if c.get("status") == "True"
            }
            if "Complete" in conditions:
                say(f"{resource(svc)} complete ({time.monotonic() - started:.0f} s)")
                return None
            failed = conditions.get("Failed") or conditions.get("FailureTarget")
            if failed:
                why = ": ".join(x for x in (failed.get("reason"), failed.get("message")) if x)
                return f"the smoke test {resource(svc)} failed" + (f" ({why})" if why else "")
            if time.monotonic() > deadline:
                return f"the smoke test {resource(svc)} did not finish within {timeout} s"
            time.sleep(POLL_S)

    def smoke_test(self, runner: Runner, timeout: int) -> str | None:
        """Resume each (suspended) Job and wait until it completes or fails; the failure."""
        for svc in jobs():
            say(f"smoke test: running {resource(svc)}")
            runner.run(
                self.kubectl(
                    "patch", resource(svc), "--type=merge", "--patch", '{"spec":{"suspend":false}}'
                )
            )
            failure = self.wait_job(runner, svc, timeout)
            if failure:
                runner.run(self.kubectl("logs", resource(svc), "--tail=50"), check=False)
                return failure
        return None

    # -- verbs ----------------------------------------------------------------------------------

    def deploy(self, runner: Runner, request: DeployRequest) -> None:
        self.preflight(runner)
        version = self.build_or_reuse(runner, request)
        say(f"deploying {version} to {self.where}")
        image_entries = self.ship(runner, version, request)
        snap = self.snapshot(runner)
        directory = self.write_release(
            runner, lambda d: self.release_kustomization(d, version, image_entries, snap)
        )
        # A Job's pod template is immutable: the smoke test is recreated (suspended) each time.
        for svc in jobs():
            runner.run(self.kubectl("delete", resource(svc), "--ignore-not-found", "--wait=true"))
        failure = None
        applied = runner.run(self.kubectl("apply", "--kustomize", str(directory)), check=False)
        if applied.returncode != 0:
            failure = f"kubectl apply of the release in {directory} failed (see above)"
        for svc in catalog.rollout_order() if failure is None else []:
            if not rollout_status(runner, svc, request.timeout, self.namespace):
                failure = (
                    f"the rollout of {resource(svc)} did not finish within {request.timeout} s"
                )
                break
        if failure is None:
            failure = self.smoke_test(runner, request.timeout)
        if failure is not None:
            what = self.roll_back_changed(runner, snap, request.timeout)
            raise CommandError(
                f"{failure}; {what}. See `kubectl --namespace {self.namespace} get pods` and "
                f"`kubectl --namespace {self.namespace} describe` / `logs` of the failing pods, "
                "fix, and deploy again"
            )
        if runner.dry_run:
            say(f"(dry run) nothing was changed; the commands above would deploy {version}")
        else:
            say(f"{version} is live on {self.where}; smoke test passed")

    def scale(self, runner: Runner, service: catalog.Service, replicas: int, timeout: int) -> None:
        self.preflight(runner)
        if service.kind == "stateless":
            bounds = {
                "minReplicas": replicas,
                "maxReplicas": max(replicas, manifests.HPA_MAX_REPLICAS),
            }
            runner.run(
                self.kubectl(
                    "patch",
                    f"horizontalpodautoscaler/{service.name}",
                    "--type=merge",
                    "--patch",
                    json.dumps({"spec": bounds}, separators=(",", ":")),
                )
            )
        runner.run(self.kubectl("scale", resource(service), f"--replicas={replicas}"))
        if not rollout_status(runner, service, timeout, self.namespace):
            raise CommandError(
                f"{resource(service)} did not reach {replicas} ready replicas within {timeout} s; "
                f"see `kubectl --namespace {self.namespace} get pods` (Pending: the cluster needs "
                "room; CrashLoopBackOff: the logs)"
            )

    def status(self, runner: Runner) -> None:
        self.preflight(runner)
        escaped_label = VERSION_LABEL.replace(".", "\\.")
        columns = ",".join(
            [
                "KIND:.kind",
                "NAME:.metadata.name",
                f"VERSION:.spec.template.metadata.labels.{escaped_label}",
                "READY:.status.readyReplicas",
                "DESIRED:.spec.replicas",
                "IMAGE:.spec.template.spec.containers[0].image",
            ]
        )
        selector = f"app.kubernetes.io/part-of={manifests.PART_OF}"
        runner.run(self.kubectl("get", "deployments,statefulsets,jobs", "--selector", selector,
                           f"--output=custom-columns={columns}"))  # fmt: skip
        runner.run(self.kubectl("get", "horizontalpodautoscalers,poddisruptionbudgets",
                           "--selector", selector))  # fmt: skip
        for svc in catalog.rollout_order():
            runner.run(self.kubectl("rollout", "history", resource(svc)))

    def history(self, runner: Runner) -> None:
        self.preflight(runner)
        for svc in catalog.rollout_order():
            runner.run(self.kubectl("rollout", "history", resource(svc)))

    def revision_of(self, runner: Runner, svc: catalog.Service, version: str) -> str:
        """The newest revision of svc whose pods run `version`."""
        selector = f"app.kubernetes.io/name={svc.name},{VERSION_LABEL}={version}"
        if svc.kind == "stateless":
            what = "replicasets"
            revision = ".metadata.annotations.deployment\\.kubernetes\\.io/revision"
            path = f'{{range .items[*]}}{{{revision}}}{{"\\n"}}{{end}}'
        else:
            what = "controllerrevisions"
            path = '{range .items[*]}{.revision}{"\\n"}{end}'
        argv = self.kubectl("get", what, "--selector", selector, f"--output=jsonpath={path}")
        result = runner.query(argv)
        revisions = [int(r) for r in result.stdout.split() if r.isdigit()]
        if result.returncode != 0 or not revisions:
            raise CommandError(
                f"no earlier release of {resource(svc)} runs version {version}; "
                f"`kvstack history {self.cli_target}` lists them (or deploy it: "
                f"`kvstack deploy {self.cli_target} --version {version}`)"
            )
        return str(max(revisions))

    def rollback(
        self, runner: Runner, service: catalog.Service | None, version: str | None, timeout: int
    ) -> None:
        self.preflight(runner)
        chosen = [service] if service else catalog.rollout_order()
        bad: dict[str, str] = {}  # StatefulSet -> its update revision before the undo
        for svc in chosen:
            argv = self.kubectl("rollout", "undo", resource(svc))
            if version:
                argv.append(f"--to-revision={self.revision_of(runner, svc, version)}")
            if svc.kind == "stateful":
                live = get_json(runner, resource(svc), self.namespace) or {}
                bad[resource(svc)] = str(live.get("status", {}).get("updateRevision", ""))
            if runner.run(argv, check=False).returncode != 0:
                raise CommandError(
                    f"`kubectl rollout undo {resource(svc)}` failed (see above); a workload "
                    f"deployed once has no earlier release: `kvstack history {self.cli_target}`"
                )
        for svc in chosen:
            if bad.get(resource(svc)):
                forced = self.force_rollback(runner, svc, bad[resource(svc)])
                if forced:
                    say(f"{resource(svc)}: {forced}")
        failed = [
            resource(s) for s in chosen if not rollout_status(runner, s, timeout, self.namespace)
        ]
        if failed:
            raise CommandError(
                f"rollback of {', '.join(failed)} did not finish within {timeout} s; see "
                f"`kubectl --namespace {self.namespace} get pods` and their logs"
            )
        say("rolled back: " + ", ".join(resource(s) for s in chosen))

    def backup(self, runner: Runner, output: Path) -> None:
        from kvstack.ops import backups

        self.preflight(runner)
        backups.kube_backup(runner, self.kubectl(), self.where, output)

    def restore(self, runner: Runner, path: Path, force: bool) -> None:
        from kvstack.ops import backups

        self.preflight(runner)
        backups.kube_restore(runner, self.kubectl(), self.where, path, force)


class Minikube(KubeTarget):
    name = "minikube"

    def context_hint(self) -> str:
        return "start the cluster with `minikube start --cni=calico` (it sets the context)"

    def check_access(self, runner: Runner, context: str) -> None:
        if context != "minikube":
            raise CommandError(
                f"kubectl's current context is {context!r}, not minikube; run "
                "`kubectl config use-context minikube` (or `minikube start`)"
            )

    def load(self, ref: str) -> list[str]:
        """The command that copies a local image into the cluster's nodes."""
        return ["minikube", "image", "load", ref]

    def ship(self, runner: Runner, version: str, request: DeployRequest) -> list[dict[str, str]]:
        entries = []
        for svc in catalog.services().values():
            ref = images.require_local(runner, svc, version)
            say(f"loading {ref} into {self.name}")
            runner.run(self.load(ref))
            entries.append({"name": svc.image, "newTag": version})
        return entries


class Kind(Minikube):
    """A kind cluster (CI's e2e makes one): minikube's overlay, since kind's default storage
    class is also `standard`; images loaded with `kind load docker-image`. The cluster is the
    one kubectl's context (kind-NAME) names."""

    name = "kind"
    cluster = "kind"  # kind's own default name, until the context says otherwise

    @property
    def overlay(self) -> Path:
        return OVERLAYS / Minikube.name

    def context_hint(self) -> str:
        return "create the cluster with `kind create cluster` (it sets the context kind-NAME)"

    def check_access(self, runner: Runner, context: str) -> None:
        if not context.startswith("kind-"):
            raise CommandError(
                f"kubectl's current context is {context!r}, not a kind cluster; run "
                "`kubectl config use-context kind-NAME` (or `kind create cluster`)"
            )
        self.cluster = context.removeprefix("kind-")

    def load(self, ref: str) -> list[str]:
        return ["kind", "load", "docker-image", "--name", self.cluster, ref]


class Gke(KubeTarget):
    name = "gke"

    def context_hint(self) -> str:
        return (
            "fetch it with `gcloud container clusters get-credentials CLUSTER --region REGION "
            "--project PROJECT`"
        )

    def check_access(self, runner: Runner, context: str) -> None:
        if not context.startswith("gke_"):
            raise CommandError(
                f"kubectl's current context is {context!r}, not a GKE cluster; "
                + self.context_hint()
            )
        account = runner.query(
            ["gcloud", "auth", "list", "--filter=status:ACTIVE", "--format=value(account)"]
        )
        if account.returncode != 0 or not account.stdout.strip():
            raise CommandError(
                "gcloud is not logged in, so images cannot be pushed to Artifact Registry; run "
                "`gcloud auth login` (CI: Workload Identity Federation) and retry"
            )

    def registry_path(self, request: DeployRequest) -> str:
        path = (request.registry or os.environ.get(GKE_REGISTRY_ENV, "")).rstrip("/")
        host = path.split("/", 1)[0]
        if not host.endswith("-docker.pkg.dev") or path.count("/") != 2:
            raise CommandError(
                f"GKE needs its Artifact Registry repository as REGION-docker.pkg.dev/PROJECT/REPO "
                f"(got {path!r}); pass --registry or set {GKE_REGISTRY_ENV}"
            )
        return path

    def ship(self, runner: Runner, version: str, request: DeployRequest) -> list[dict[str, str]]:
        path = self.registry_path(request)
        runner.run(["gcloud", "auth", "configure-docker", path.split("/", 1)[0], "--quiet"])
        entries = []
        for svc in catalog.services().values():
            remote = f"{path}/{svc.image}:{version}"
            local = images.image_ref(svc, version)
            if images.inspect_image(runner, local) is not None:
                runner.run(docker("tag", local, remote))
                say(f"pushing {remote}")
                if runner.run(docker("push", remote), check=False).returncode != 0:
                    raise CommandError(
                        f"docker push {remote} failed (see above); check that the repository "
                        f"exists (`gcloud artifacts repositories list`) and that your account "
                        "may write to it (roles/artifactregistry.writer)"
                    )
            else:
                described = runner.query(
                    ["gcloud", "artifacts", "docker", "images", "describe", remote, "--quiet"]
                )
                if described.returncode != 0 and runner.dry_run:
                    say(f"(dry run) image {remote} is missing; a real deploy stops here")
                elif described.returncode != 0:
                    raise CommandError(
                        f"image {local} is missing locally and {remote} is not in Artifact "
                        f"Registry; build it with `kvstack images --tag {version}`"
                    )
            entries.append(
                {
                    "name": f"{manifests.GKE_REGISTRY_PLACEHOLDER}/{svc.image}",
                    "newName": f"{path}/{svc.image}",
                    "newTag": version,
                }
            )
        return entries


def minikube() -> Minikube:
    return Minikube()


def kind() -> Kind:
    return Kind()


def gke() -> Gke:
    return Gke()
