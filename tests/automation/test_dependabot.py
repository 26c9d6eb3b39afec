""".github/dependabot.yml: valid against its schema, and it covers what the repository uses.

Dependabot only runs on GitHub, so what can be checked here is the file: check-jsonschema's
vendored Dependabot schema, and that every ecosystem found in the tree (workflows, uv.lock,
Dockerfiles, Terraform) has an entry whose directory exists, grouped into one weekly pull request.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path, PurePosixPath
from typing import Any

import yaml  # type: ignore[import-untyped]  # PyYAML ships no types

from tests.automation import zizmor

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / ".github/dependabot.yml"
BIN = Path(sys.executable).parent


def load(path: Path = CONFIG) -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(path.read_text())
    return data


def tracked_files(root: Path = ROOT) -> list[PurePosixPath]:
    """The files git tracks (not .venv, build output or a developer's scratch files)."""
    out = subprocess.run(
        ["git", "-C", str(root), "ls-files", "-z"], capture_output=True, check=True
    ).stdout.decode()
    return [PurePosixPath(p) for p in out.split("\0") if p]


def used_ecosystems(files: list[PurePosixPath]) -> set[tuple[str, str]]:
    """(package-ecosystem, directory) pairs the repository needs, directory as Dependabot
    writes it (`/` is the repository root; for github-actions `/` means .github/workflows)."""

    def directory(p: PurePosixPath) -> str:
        return "/" + str(p.parent) if str(p.parent) != "." else "/"

    needed: set[tuple[str, str]] = set()
    for p in files:
        if p.parent == PurePosixPath(".github/workflows") and p.suffix in {".yml", ".yaml"}:
            needed.add(("github-actions", "/"))
        elif p.name == "uv.lock":
            needed.add(("uv", directory(p)))
        elif p.name == "Dockerfile" or p.name.endswith(".Dockerfile"):
            needed.add(("docker", directory(p)))
        elif p.suffix == ".tf":
            needed.add(("terraform", directory(p)))
    return needed


def configured(config: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    """Each (package-ecosystem, directory) the file configures, with its entry."""
    entries: dict[tuple[str, str], dict[str, Any]] = {}
    for entry in config.get("updates", []):
        dirs = entry.get("directories") or [entry.get("directory")]
        for d in dirs:
            entries[(entry["package-ecosystem"], "/" + str(d).strip("/"))] = entry
    return entries


def coverage_problems(config: dict[str, Any], files: list[PurePosixPath], root: Path) -> list[str]:
    """Why the configuration does not cover the repository (empty: it does)."""
    entries = configured(config)
    problems = [
        f"{eco} in {d} is used but has no Dependabot entry"
        for eco, d in sorted(used_ecosystems(files))
        if (eco, d) not in entries
    ]
    for (eco, d), entry in sorted(entries.items()):
        where = root / ".github/workflows" if eco == "github-actions" else root / d.lstrip("/")
        if not where.is_dir():
            problems.append(f"{eco}: directory {d} does not exist ({where})")
        if entry.get("schedule", {}).get("interval") != "weekly":
            problems.append(f"{eco} {d}: not weekly")
        groups = entry.get("groups", {})
        if not any("*" in g.get("patterns", []) for g in groups.values()):
            problems.append(f"{eco} {d}: no group with pattern '*' (one pull request a week)")
    return problems


def test_dependabot_config_matches_its_schema() -> None:
    """check-jsonschema's vendored Dependabot schema accepts .github/dependabot.yml."""
    result = subprocess.run(
        [BIN / "check-jsonschema", "--builtin-schema", "vendor.dependabot", CONFIG],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_zizmor_finds_nothing_in_the_dependabot_config() -> None:
    """zizmor's Dependabot audits (e.g. dependabot-cooldown) report nothing."""
    zizmor.assert_no_findings(CONFIG)


def test_every_ecosystem_in_the_tree_has_a_weekly_grouped_entry() -> None:
    """The workflows, uv.lock, the Dockerfile and infra/gcp are each covered, in a directory that
    exists, weekly, grouped into one pull request per ecosystem."""
    files = tracked_files()
    needed = used_ecosystems(files)
    # The detection itself: if it found nothing, the coverage check would pass on anything.
    assert {eco for eco, _ in needed} == {"github-actions", "uv", "docker", "terraform"}, needed
    problems = coverage_problems(load(), files, ROOT)
    assert not problems, "\n".join(problems)


def test_coverage_check_fails_on_a_missing_or_misplaced_entry() -> None:
    """The check above goes red when an ecosystem is dropped or points at a missing directory."""
    files = tracked_files()
    config = load()
    without_terraform = {
        **config,
        "updates": [u for u in config["updates"] if u["package-ecosystem"] != "terraform"],
    }
    assert any("terraform" in p for p in coverage_problems(without_terraform, files, ROOT))
    moved = {
        **config,
        "updates": [
            {**u, "directory": "/infra/nowhere"} if u["package-ecosystem"] == "terraform" else u
            for u in config["updates"]
        ],
    }
    assert any("does not exist" in p for p in coverage_problems(moved, files, ROOT))


def test_requirements_lock_is_exported_from_uv_lock(tmp_path: Path) -> None:
    """The image installs requirements.lock, Dependabot updates only uv.lock: a uv pull request
    fails here until `make lock` is run on its branch (else the image would keep old versions)."""
    exported = tmp_path / "requirements.lock"
    subprocess.run(
        [BIN / "uv", "export", "--project", str(ROOT), "--frozen", "--no-dev", "--no-emit-project",
         "--format", "requirements-txt", "--quiet", "-o", str(exported)],
        check=True,
        capture_output=True,
        env={**os.environ, "UV_OFFLINE": "1"},
    )  # fmt: skip

    def body(path: Path) -> list[str]:  # without uv's header (it names the output file)
        return [ln for ln in path.read_text().splitlines() if not ln.startswith("#")]

    assert body(exported) == body(ROOT / "requirements.lock"), "run `make lock` and commit"
