"""Offline checks of .github/workflows: nothing here can reach GitHub, so these check what can be
checked without it (schema, zizmor, what each `run:` calls, pins, permissions)."""

from __future__ import annotations

import argparse
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml  # type: ignore[import-untyped]  # PyYAML ships no types

from kvstack import cli
from kvstack.ops import catalog
from tests.automation import zizmor

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((ROOT / ".github/workflows").glob("*.yml"))
BIN = Path(sys.executable).parent
PINNED = re.compile(r"^\s*(-\s+)?uses:\s+[\w.-]+/[\w./-]+@[0-9a-f]{40} # v\d+\.\d+\.\d+\s*$")
KVSTACK = {"kvstack", ".venv/bin/kvstack"}


def load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(path.read_text())
    return data


def make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([a-z][a-z0-9-]*):", text, flags=re.MULTILINE))


def check_command(line: str, targets: set[str], parser: argparse.ArgumentParser) -> str | None:
    """Why `line` is not a call of a Makefile target or an existing kvstack verb (None: it is)."""
    words = shlex.split(line)
    if not words:
        return None
    if words[0] == "make":
        unknown = [w for w in words[1:] if "=" not in w and w not in targets]
        return (
            f"make target(s) {unknown} not in the Makefile" if unknown or len(words) < 2 else None
        )
    if words[0] not in KVSTACK:
        return f"{words[0]!r} is neither make nor kvstack"
    current, rest = parser, words[1:]
    while True:
        subs = [a for a in current._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or not rest:
            break
        choices: dict[str, argparse.ArgumentParser] = subs[0].choices
        if rest[0] not in choices:
            return f"kvstack has no verb {rest[0]!r} here (has {sorted(choices)})"
        current, rest = choices[rest[0]], rest[1:]
    if any(isinstance(a, argparse._SubParsersAction) for a in current._actions):
        return "kvstack command names no verb"
    options = {o for a in current._actions for o in a.option_strings}
    bad = [w for w in rest if w.startswith("--") and w.split("=")[0] not in options]
    return f"kvstack options {bad} do not exist" if bad else None


def run_lines(script: str) -> list[str]:
    joined = re.sub(r"\\\n\s*", " ", script)
    return [
        ln.strip() for ln in joined.splitlines() if ln.strip() and not ln.strip().startswith("#")
    ]


def all_steps() -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (wf.name, job_name, step)
        for wf in WORKFLOWS
        for job_name, job in load(wf)["jobs"].items()
        for step in job.get("steps", [])
    ]


def test_the_four_workflows_exist() -> None:
    """ci, deploy, operations and e2e are all there (the other checks would pass on none)."""
    assert {w.name for w in WORKFLOWS} >= {"ci.yml", "deploy.yml", "operations.yml", "e2e.yml"}


def test_workflows_match_the_github_actions_schema() -> None:
    """check-jsonschema's vendored GitHub workflow schema accepts every workflow."""
    result = subprocess.run(
        [BIN / "check-jsonschema", "--builtin-schema", "vendor.github-workflows", *WORKFLOWS],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_zizmor_finds_nothing() -> None:
    """zizmor (offline audits) reports no finding in the workflows."""
    zizmor.assert_no_findings(ROOT / ".github/workflows")


def test_every_run_step_calls_a_make_target_or_a_kvstack_verb() -> None:
    """Each line of every `run:` is `make TARGET` (in the Makefile) or `kvstack VERB ...` (in the
    CLI's parser, options included): CI runs what a developer runs, not a copy of it."""
    targets, parser = make_targets(), cli.build_parser()
    problems = [
        f"{wf} / {job} / {step.get('name', '?')}: {why}"
        for wf, job, step in all_steps()
        if "run" in step
        for line in run_lines(step["run"])
        if (why := check_command(line, targets, parser))
    ]
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    "line",
    [
        "echo hi",
        "make no-such-target",
        "kvstack no-such-verb",
        ".venv/bin/kvstack pipeline",
        ".venv/bin/kvstack pipeline changed --no-such-option",
        "gcloud container clusters list",
    ],
)
def test_the_run_step_check_rejects_other_commands(line: str) -> None:
    """The check above fails on shell, unknown targets, unknown verbs and unknown options."""
    assert check_command(line, make_targets(), cli.build_parser()) is not None


def test_the_kind_e2e_deploys_and_scales_through_the_cli() -> None:
    """tests/e2e-kind.sh (e2e.yml, through `make e2e-kind`) runs `kvstack deploy kind` and
    `kvstack scale kind server 5`, each a command the CLI's parser accepts as written, and does
    not re-do the deploy itself (no image loading, no apply of its own)."""
    script = ROOT / "tests/e2e-kind.sh"
    assert "tests/e2e-kind.sh" in (ROOT / "Makefile").read_text()
    calls = [
        shlex.split(line)[1:]
        for line in run_lines(script.read_text())
        if line.startswith('"$KVSTACK" ')
    ]
    assert [c[:2] for c in calls] == [["deploy", "kind"], ["scale", "kind"]]
    parser = cli.build_parser()
    for argv in calls:
        parser.parse_args(argv)  # exits (fails the test) on a verb, target or option it lacks
    for reimplemented in ("kind load", "apply --kustomize", "patch job/client"):
        assert reimplemented not in script.read_text(), reimplemented


def test_every_action_is_pinned_by_commit_sha_with_its_version() -> None:
    """Every `uses:` names a full 40-hex commit and says which release it is (# vX.Y.Z)."""
    unpinned = [
        f"{wf.name}:{n}: {line.strip()}"
        for wf in WORKFLOWS
        for n, line in enumerate(wf.read_text().splitlines(), 1)
        if re.match(r"^\s*(-\s+)?uses:", line) and not PINNED.match(line)
    ]
    assert not unpinned, "\n".join(unpinned)


def test_permissions_are_read_only_at_the_top_and_explained_per_job() -> None:
    """Top level: contents: read only. A job that asks for more says why on every line."""
    for wf in WORKFLOWS:
        assert load(wf)["permissions"] == {"contents": "read"}, wf.name
        lines = wf.read_text().splitlines()
        for n, line in enumerate(lines):
            if re.match(r"^ {4}permissions:", line):
                for entry in lines[n + 1 :]:
                    if not entry.startswith(" " * 6):
                        break
                    assert "#" in entry, f"{wf.name}: permission without a reason: {entry}"


def test_google_cloud_auth_is_workload_identity_federation_only() -> None:
    """No JSON key anywhere; every google auth step uses a WIF provider, in a job with id-token."""
    for wf in WORKFLOWS:
        assert "credentials_json" not in wf.read_text(), wf.name
        for name, job in load(wf)["jobs"].items():
            auth = [
                s
                for s in job.get("steps", [])
                if "google-github-actions/auth@" in s.get("uses", "")
            ]
            for step in auth:
                assert "workload_identity_provider" in step["with"], f"{wf.name}/{name}"
                assert job["permissions"].get("id-token") == "write", f"{wf.name}/{name}"


def test_no_workflow_spells_out_the_services() -> None:
    """The build matrix comes from `kvstack pipeline changed` (services.toml), so no workflow
    names a service: adding one to services.toml is enough."""
    deploy = load(ROOT / ".github/workflows/deploy.yml")
    include = deploy["jobs"]["build"]["strategy"]["matrix"]["include"]
    assert include == "${{ fromJSON(needs.changes.outputs.matrix) }}"
    for wf in WORKFLOWS:
        values = " ".join(strings(load(wf)))
        for name in catalog.services():
            assert not re.search(rf"\b{name}\b", values), f"{wf.name} names the service {name}"


def strings(node: Any) -> list[str]:
    """Every string value in a workflow, except step/job names and input descriptions (prose)."""
    if isinstance(node, dict):
        return [s for k, v in node.items() if k not in ("name", "description") for s in strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in strings(v)]
    return [node] if isinstance(node, str) else []


def test_production_is_gated_and_gets_the_staged_digests() -> None:
    """Production runs after staging, in the `production` environment (reviewers), with the
    digests staging deployed; images are built for both architectures with SBOM and provenance."""
    jobs = load(ROOT / ".github/workflows/deploy.yml")["jobs"]
    assert jobs["production"]["needs"] == "staging"
    assert jobs["production"]["environment"] == "production"
    assert jobs["staging"]["environment"] == "staging"
    assert "needs.staging.outputs.digests" in jobs["production"]["env"]["DIGESTS"]
    build = next(s for s in jobs["build"]["steps"] if "build-push-action" in s.get("uses", ""))
    assert build["with"]["platforms"] == "linux/amd64,linux/arm64"
    assert build["with"]["sbom"] is True
    assert build["with"]["provenance"] == "mode=max"
    scan = next(s for s in jobs["build"]["steps"] if "scan-action" in s.get("uses", ""))
    assert scan["with"]["severity-cutoff"] == "critical"
    assert scan["with"]["only-fixed"] is True


def test_staging_and_production_are_namespaces_of_one_cluster() -> None:
    """Both deploy jobs reach the same cluster (the repository's GKE_CLUSTER) and release into
    their own namespace, kvstack-staging then kvstack, with their environment's deployer; the
    build job pushes with the builder account, which no deploy job uses."""
    jobs = load(ROOT / ".github/workflows/deploy.yml")["jobs"]
    for job, namespace in (("staging", "kvstack-staging"), ("production", "kvstack")):
        env = jobs[job]["env"]
        assert env["GKE_CLUSTER"] == "${{ vars.GKE_CLUSTER }}"
        assert env["NAMESPACE"] == namespace
        (release,) = [s for s in jobs[job]["steps"] if "pipeline release" in s.get("run", "")]
        assert '--namespace "$NAMESPACE"' in release["run"]
        (auth,) = [s for s in jobs[job]["steps"] if "auth@" in s.get("uses", "")]
        assert auth["with"]["service_account"] == "${{ vars.DEPLOYER_SA }}"
    (push,) = [s for s in jobs["build"]["steps"] if "auth@" in s.get("uses", "")]
    assert push["with"]["service_account"] == "${{ vars.BUILDER_SA }}"
    operate = load(ROOT / ".github/workflows/operations.yml")["jobs"]["operate"]
    assert operate["env"]["NAMESPACE"] == "${{ vars.KVSTACK_NAMESPACE }}"
    gke = [s["run"] for s in operate["steps"] if " gke" in s.get("run", "")]
    assert gke
    assert all('--namespace "$NAMESPACE"' in run for run in gke)


def doc_commands() -> list[tuple[str, str]]:
    """Every `make ...` and `kvstack ...` line in the shell blocks of the README and docs/."""
    found = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for block in re.findall(r"```(?:sh|bash|console)\n(.*?)```", doc.read_text(), re.S):
            for line in run_lines(block):
                command = re.sub(r"^(?:[A-Z_]+=\S+ )+", "", line.split(" #")[0]).strip()
                command = command.split(" | ")[0].split(" && ")[0]
                if command.split(" ")[0] in {"make", *KVSTACK}:
                    found.append((doc.name, command))
    return found


def test_every_command_in_the_docs_exists() -> None:
    """Each `make TARGET` and `kvstack VERB --option` shown in the README and docs/ is a real
    Makefile target or CLI verb and option, so a renamed one cannot leave the docs behind."""
    commands = doc_commands()
    assert len(commands) > 20, commands  # the extraction found the docs' commands
    targets, parser = make_targets(), cli.build_parser()
    problems = [
        f"{doc}: {line}: {why}"
        for doc, line in commands
        if (why := check_command(line, targets, parser))
    ]
    assert not problems, "\n".join(problems)
