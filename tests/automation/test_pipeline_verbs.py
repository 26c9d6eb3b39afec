"""`kvstack pipeline`: which services a push rebuilds (a real git repository in a temp dir), and
the GKE release plan (fake gcloud/kubectl on PATH record their argv; --dry-run, so the plan is
what gets printed: images by digest, one version label per service)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kvstack import cli
from kvstack.ops import catalog, pipeline

REGISTRY = "europe-west1-docker.pkg.dev/kvstack-demo/kvstack"


def git(root: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(root), *args], capture_output=True, text=True, check=True
    ).stdout.strip()


def commit(root: Path, path: str, text: str) -> str:
    (root / path).parent.mkdir(parents=True, exist_ok=True)
    (root / path).write_text(text)
    git(root, "add", "-A")
    git(root, "-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-qm", path)
    return git(root, "rev-parse", "HEAD")


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A repository with the image inputs' layout: shared code, one package per service."""
    git(tmp_path, "init", "-q")
    for path in ["Dockerfile", "requirements.lock", "src/kvstack/runtime.py",
                 "src/kvstack/ops/kube.py",
                 *(f"src/kvstack/{s}/__init__.py" for s in catalog.services())]:  # fmt: skip
        commit(tmp_path, path, "v1\n")
    return tmp_path


def names(services: list[catalog.Service]) -> list[str]:
    return [s.name for s in services]


def test_a_change_to_one_service_rebuilds_that_service_alone(repo: Path) -> None:
    """Editing src/kvstack/server/ changes the server's version and no other's."""
    base = git(repo, "rev-parse", "HEAD")
    before = {s: pipeline.service_version(svc, repo) for s, svc in catalog.services().items()}
    head = commit(repo, "src/kvstack/server/__init__.py", "v2\n")
    assert names(pipeline.changed_since(base, repo)) == ["server"]
    after = {s: pipeline.service_version(svc, repo) for s, svc in catalog.services().items()}
    assert after["server"] == head
    assert {s: v for s, v in after.items() if s != "server"} == {
        s: v for s, v in before.items() if s != "server"
    }


def test_a_change_to_shared_code_rebuilds_every_service(repo: Path) -> None:
    """Editing shared code (runtime.py, Dockerfile) gives every service a new image."""
    base = git(repo, "rev-parse", "HEAD")
    commit(repo, "src/kvstack/runtime.py", "v2\n")
    assert names(pipeline.changed_since(base, repo)) == list(catalog.services())


def test_a_change_outside_the_images_rebuilds_nothing(repo: Path) -> None:
    """Editing the ops CLI (not in any image) or docs rebuilds nothing."""
    base = git(repo, "rev-parse", "HEAD")
    commit(repo, "src/kvstack/ops/kube.py", "v2\n")
    commit(repo, "docs/x.md", "v2\n")
    assert pipeline.changed_since(base, repo) == []


def test_an_unknown_base_rebuilds_every_service(repo: Path) -> None:
    """A new branch (forty zeros) or a commit missing from a shallow clone: everything."""
    assert names(pipeline.changed_since("0" * 40, repo)) == list(catalog.services())
    assert names(pipeline.changed_since("f" * 40, repo)) == list(catalog.services())


def test_release_tags_add_the_semver() -> None:
    """refs/tags/v1.2.3 tags the image 1.2.3 besides the git SHA; a branch only the SHA."""
    svc = catalog.get("server")
    assert pipeline.tags_for(svc, "abc", REGISTRY, "refs/tags/v1.2.3") == [
        f"{REGISTRY}/kvstack-server:abc",
        f"{REGISTRY}/kvstack-server:1.2.3",
    ]
    assert pipeline.tags_for(svc, "abc", REGISTRY, "refs/heads/main") == [
        f"{REGISTRY}/kvstack-server:abc"
    ]


FAKE = """#!{python}
import json, os, sys
argv = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(json.dumps([os.path.basename(sys.argv[0]), *argv]) + "\\n")
if argv[:2] == ["config", "current-context"]:
    print("gke_kvstack-demo_europe-west1_kvstack-staging")
elif argv[:2] == ["auth", "list"]:
    print("deployer@kvstack-demo.iam.gserviceaccount.com")
elif argv[:4] == ["artifacts", "docker", "images", "describe"]:
    print("sha256:" + format(abs(hash(argv[4].split(":")[0])) % 16**8, "08x") * 8)
"""


@pytest.fixture
def fake_tools(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Fake kubectl and gcloud first on PATH; the file their calls are recorded in."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("kubectl", "gcloud"):
        (bin_dir / tool).write_text(FAKE.format(python=sys.executable))
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_LOG", str(tmp_path / "calls.jsonl"))
    monkeypatch.setenv("PYTHONHASHSEED", "0")
    return tmp_path / "calls.jsonl"


def test_release_refers_to_images_by_digest_with_a_version_per_service(
    fake_tools: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The release kustomization names every image by the registry's digest for its version
    tag, and labels each workload with its own version (an unchanged service keeps its pod
    template); under --dry-run nothing but read-only queries runs."""
    code = cli.main(["pipeline", "release", "gke", "--registry", REGISTRY, "--dry-run"])
    out, err = capsys.readouterr()
    assert code == 0, err
    digests = json.loads(out.strip().splitlines()[-1])
    assert set(digests) == {s.image for s in catalog.services().values()}
    kustomization = err.split("<<'EOF'\n", 1)[1].split("EOF", 1)[0]
    for svc in catalog.services().values():
        assert f"digest: {digests[svc.image]}" in kustomization
        assert pipeline.service_version(svc) in kustomization
    assert "newTag" not in kustomization
    calls = [json.loads(line) for line in fake_tools.read_text().splitlines()]
    described = [c[5] for c in calls if c[1:4] == ["artifacts", "docker", "images"]]
    assert described == [
        f"{REGISTRY}/{s.image}:{pipeline.service_version(s)}" for s in catalog.services().values()
    ]


def test_release_refuses_a_digest_other_than_the_tested_one(
    fake_tools: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Promotion passes the digests staging ran; if the registry says otherwise, stop."""
    wrong = json.dumps({"kvstack-backend": "sha256:" + "0" * 64})
    code = cli.main(
        ["pipeline", "release", "gke", "--registry", REGISTRY, "--digests", wrong, "--dry-run"]
    )
    assert code == 1
    assert "refusing to deploy a different image" in capsys.readouterr().err


def test_sign_refuses_tags() -> None:
    """Signatures go on digests; a tag could be moved after signing."""
    assert cli.main(["pipeline", "sign", f"{REGISTRY}/kvstack-server:abc", "--dry-run"]) == 1


def test_release_into_the_staging_namespace(
    fake_tools: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Fake kubectl/gcloud on PATH, --dry-run: `pipeline release gke --namespace kvstack-staging`
    sets Kustomize's `namespace:` in the release and names that namespace in every kubectl call
    (the production job releases the same digests without it, into kvstack)."""
    argv = ["pipeline", "release", "gke", "--registry", REGISTRY, "--dry-run"]
    assert cli.main([*argv, "--namespace", "kvstack-staging"]) == 0
    kustomization = capsys.readouterr().err.split("<<'EOF'\n", 1)[1].split("EOF", 1)[0]
    assert "\nnamespace: kvstack-staging\n" in kustomization
    calls = [json.loads(line) for line in fake_tools.read_text().splitlines()]
    kubectl = [c for c in calls if c[0] == "kubectl" and c[1:3] != ["config", "current-context"]]
    assert kubectl
    assert all(c[1:3] == ["--namespace", "kvstack-staging"] for c in kubectl)
