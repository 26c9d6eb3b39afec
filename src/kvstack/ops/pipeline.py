"""`kvstack pipeline ...`: the steps of the delivery pipeline (.github/workflows/deploy.yml).

The workflows call these verbs instead of inline shell, so what CI does can be run (and
dry-run) by hand:

- changed: which services must be rebuilt since a commit, as JSON for a workflow matrix. Each
  service's version is the full SHA of the last commit that changed what its image is built
  from: the shared inputs (Dockerfile, requirements.lock, the shared code under src/kvstack) or
  its own package (src/kvstack/NAME). A change to one service's package gives only that service
  a new version; a change to shared code gives every service one.
- credentials: point kubectl at a GKE cluster (gcloud container clusters get-credentials).
- release: deploy every service at its own version to a namespace (--namespace, default
  kvstack) of the GKE cluster kubectl points at,
  referring to each image by the digest Artifact Registry holds for that tag. It is the `gke`
  target of `kvstack deploy` (same apply, rollout wait, smoke test and automatic rollback),
  with two differences: images by digest, and a version label per service, so a service whose
  version did not change keeps its pod template and is not restarted.
- sign: cosign keyless signature of pushed images (by digest), with the workflow's OIDC identity.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

from kvstack.ops import catalog, images, kube, manifests
from kvstack.ops.errors import CommandError
from kvstack.ops.shell import Runner, say
from kvstack.ops.targets import (
    DEFAULT_NAMESPACE,
    DEFAULT_TIMEOUT_S,
    DeployRequest,
    namespace_name,
    positive,
)

ROOT = images.ROOT
PACKAGE = "src/kvstack"
NO_COMMIT = re.compile(r"^0*$")  # GitHub's `before` for a new branch is forty zeros
SEMVER_TAG = re.compile(r"^refs/tags/v(\d+\.\d+\.\d+(?:-[0-9A-Za-z.-]+)?)$")
DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


def git(*args: str, root: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["git", "-C", str(root), *args], capture_output=True, text=True, check=False
    )


def service_version(svc: catalog.Service, root: Path = ROOT) -> str:
    """Each service's version: its image's revision (images.revision), required here."""
    version = images.revision(svc, root)
    if version is None:
        raise CommandError(f"no commit changes {svc.name}'s image inputs; is this a git clone?")
    return version


def changed_since(since: str | None, root: Path = ROOT) -> list[catalog.Service]:
    """Services whose image inputs differ between `since` and HEAD (all when unknown)."""
    services = list(catalog.services().values())
    if not since or NO_COMMIT.match(since):
        return services
    if git("cat-file", "-e", f"{since}^{{commit}}", root=root).returncode != 0:
        say(f"{since} is not in this clone (fetch-depth?); rebuilding every service")
        return services
    return [
        s
        for s in services
        if git("diff", "--quiet", since, "HEAD", "--", *images.pathspec(s), root=root).returncode
        != 0
    ]


def tags_for(svc: catalog.Service, version: str, repository: str, ref: str) -> list[str]:
    """Immutable tags: the git SHA, plus the semver of a release tag (refs/tags/vX.Y.Z)."""
    tags = [f"{repository}/{svc.image}:{version}"]
    if match := SEMVER_TAG.match(ref):
        tags.append(f"{repository}/{svc.image}:{match.group(1)}")
    return tags


def github_output(name: str, value: str) -> None:
    """Append NAME=VALUE to the step outputs file of GitHub Actions (printed otherwise)."""
    path = os.environ.get("GITHUB_OUTPUT")
    if path:
        with open(path, "a", encoding="utf-8") as out:
            out.write(f"{name}={value}\n")
    say(f"output {name}={value}")


def _changed(args: argparse.Namespace) -> int:
    chosen = list(catalog.services().values()) if args.all else changed_since(args.since)
    rows = [
        {
            "service": s.name,
            "image": s.image,
            "version": (version := service_version(s)),
            "tags": "\n".join(tags_for(s, version, args.registry, args.ref)),
        }
        for s in chosen
    ]
    text = json.dumps(rows, separators=(",", ":"))
    print(text)
    if args.github_output:
        github_output(args.github_output, text)
        github_output(f"{args.github_output}_any", "true" if rows else "false")
    return 0


def _credentials(args: argparse.Namespace) -> int:
    Runner(dry_run=args.dry_run).run(
        ["gcloud", "container", "clusters", "get-credentials", args.cluster,
         "--region", args.region, "--project", args.project]
    )  # fmt: skip
    return 0


class PinnedGke(kube.Gke):
    """The gke target, each service at its own version and its image by digest."""

    def __init__(
        self,
        versions: dict[str, str],
        expected: dict[str, str],
        identity: str | None,
        namespace: str = kube.NAMESPACE,
    ):
        super().__init__(namespace)
        self.versions = versions  # service -> version (full git SHA)
        self.expected = expected  # image -> digest the caller built/tested (empty: any)
        self.identity = identity  # cosign certificate identity regexp to verify, if any
        self.digests: dict[str, str] = {}

    def build_or_reuse(self, runner: Runner, request: DeployRequest) -> str:
        return request.version or "pinned"  # images come from the registry, never built here

    def digest_of(self, runner: Runner, remote: str) -> str:
        described = runner.query(
            ["gcloud", "artifacts", "docker", "images", "describe", remote,
             "--format=value(image_summary.digest)"]
        )  # fmt: skip
        digest = described.stdout.strip()
        if described.returncode != 0 or not DIGEST.match(digest):
            raise CommandError(
                f"{remote} is not in Artifact Registry ({described.stderr.strip()}); build and "
                "push it first (.github/workflows/deploy.yml, job build)"
            )
        return digest

    def ship(self, runner: Runner, version: str, request: DeployRequest) -> list[dict[str, str]]:
        path = self.registry_path(request)
        entries = []
        for svc in catalog.services().values():
            remote = f"{path}/{svc.image}:{self.versions[svc.name]}"
            digest = self.digest_of(runner, remote)
            want = self.expected.get(svc.image)
            if want and want != digest:
                raise CommandError(
                    f"{remote} is {digest} in the registry, not the {want} that was tested; "
                    "refusing to deploy a different image"
                )
            if self.identity:
                runner.run(
                    ["cosign", "verify", "--certificate-oidc-issuer",
                     "https://token.actions.githubusercontent.com",
                     "--certificate-identity-regexp", self.identity,
                     f"{path}/{svc.image}@{digest}"],
                    capture=True,
                )  # fmt: skip
            say(f"{svc.name}: {self.versions[svc.name]} = {digest}")
            self.digests[svc.image] = digest
            entries.append(
                {
                    "name": f"{manifests.GKE_REGISTRY_PLACEHOLDER}/{svc.image}",
                    "newName": f"{path}/{svc.image}",
                    "digest": digest,
                }
            )
        return entries

    def release_kustomization(
        self, directory: Path, version: str, image_entries: list[dict[str, str]], snap: Any
    ) -> dict[str, Any]:
        body = super().release_kustomization(directory, version, image_entries, snap)
        # Replace the one all-workloads version patch with one per service, so an unchanged
        # service's pod template stays as it is (no restart).
        per_service = [
            {
                "target": {"kind": manifests.workload_kind(svc), "name": svc.name},
                "patch": json.dumps(
                    {
                        "apiVersion": "apps/v1",
                        "kind": manifests.workload_kind(svc),
                        "metadata": {
                            "name": svc.name,
                            "annotations": {
                                kube.CHANGE_CAUSE: f"kvstack pipeline release gke "
                                f"({svc.name} {self.versions[svc.name]})"
                            },
                        },
                        "spec": {
                            "template": {
                                "metadata": {
                                    "labels": {kube.VERSION_LABEL: self.versions[svc.name]}
                                }
                            }
                        },
                    }
                ),
            }
            for svc in catalog.services().values()
        ]
        body["patches"] = per_service + body["patches"][1:]
        return body


def _release(args: argparse.Namespace) -> int:
    services = catalog.services().values()
    versions = {s.name: service_version(s) for s in services}
    expected: dict[str, str] = json.loads(args.digests) if args.digests else {}
    target = PinnedGke(versions, expected, args.verify_identity, args.namespace)
    request = DeployRequest(version=None, registry=args.registry, timeout=args.timeout)
    target.deploy(Runner(dry_run=args.dry_run), request)
    text = json.dumps(target.digests, separators=(",", ":"), sort_keys=True)
    print(text)
    if args.github_output:
        github_output(args.github_output, text)
    return 0


def _sign(args: argparse.Namespace) -> int:
    runner = Runner(dry_run=args.dry_run)
    for ref in args.refs:
        if "@sha256:" not in ref:
            raise CommandError(f"{ref}: sign images by digest (NAME@sha256:...), never by tag")
        runner.run(["cosign", "sign", "--yes", ref])
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    pipeline = sub.add_parser("pipeline", help="steps of the delivery pipeline (CI calls these)")
    verbs = pipeline.add_subparsers(dest="step", required=True, metavar="STEP")

    p = verbs.add_parser("changed", help="services to rebuild since a commit, as JSON")
    p.add_argument("--since", help="commit to compare HEAD with (missing/zeros: every service)")
    p.add_argument("--all", action="store_true", help="every service, whatever changed")
    p.add_argument("--registry", default=manifests.GKE_REGISTRY_PLACEHOLDER,
                   help="REGION-docker.pkg.dev/PROJECT/REPO, for the tags")  # fmt: skip
    p.add_argument("--ref", default=os.environ.get("GITHUB_REF", ""),
                   help="git ref built (refs/tags/vX.Y.Z adds a semver tag)")  # fmt: skip
    p.add_argument("--github-output", metavar="NAME", help="also write NAME=JSON to $GITHUB_OUTPUT")
    p.set_defaults(func=_changed)

    p = verbs.add_parser("credentials", help="point kubectl at a GKE cluster")
    p.add_argument("--cluster", required=True)
    p.add_argument("--region", required=True)
    p.add_argument("--project", required=True)
    p.add_argument("--dry-run", action="store_true", help="print the command, run none")
    p.set_defaults(func=_credentials)

    p = verbs.add_parser("release", help="deploy to GKE by digest, one version per service")
    p.add_argument("target", choices=["gke"], help="only gke: images come from a registry")
    p.add_argument(
        "--registry", help=f"REGION-docker.pkg.dev/PROJECT/REPO (default ${kube.GKE_REGISTRY_ENV})"
    )
    p.add_argument("--digests", help='JSON {"IMAGE": "sha256:..."} that must match the registry')
    p.add_argument("--verify-identity", metavar="REGEXP",
                   help="cosign verify each image: signed by a workflow matching it")  # fmt: skip
    p.add_argument(
        "--github-output", metavar="NAME", help="also write NAME=digests JSON to $GITHUB_OUTPUT"
    )
    p.add_argument("--namespace", type=namespace_name, default=DEFAULT_NAMESPACE, metavar="NS",
                   help="the namespace to release into (default %(default)s)")  # fmt: skip
    p.add_argument("--timeout", type=positive, default=DEFAULT_TIMEOUT_S)
    p.add_argument("--dry-run", action="store_true", help="print what would change; change none")
    p.set_defaults(func=_release)

    p = verbs.add_parser("sign", help="cosign keyless signature of images, by digest")
    p.add_argument("refs", nargs="+", metavar="IMAGE@sha256:DIGEST")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run none")
    p.set_defaults(func=_sign)
