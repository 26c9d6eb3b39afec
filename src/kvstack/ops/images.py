"""Build one image per service from the one Dockerfile (`kvstack images [SERVICE...]`).

Tags: `kvstack-NAME:VERSION` (VERSION: `git describe --tags --always` of the last commit that
changed the image's inputs; uncommitted changes to them add a hash of the inputs, so every
distinct build has its own tag and `docker stack deploy` rolls to it) and the stable
`kvstack-NAME:latest`.

The base image: the official debian:bookworm-slim when the engine has it or can pull it (Docker
Desktop on a Mac); otherwise one made from Debian's packages with debootstrap and `docker import`
under a project-owned name, made once and reused.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kvstack.ops import catalog, checkout, engine
from kvstack.ops.engine import docker
from kvstack.ops.errors import CommandError
from kvstack.ops.shell import Runner, say

ROOT = checkout.ROOT
OFFICIAL_BASE = "debian:bookworm-slim"
LOCAL_BASE = "kvstack-base/debian:bookworm-slim"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
STABLE_TAG = "latest"
# The proxy CA that pip needs inside the build, if this machine has one (BuildKit secret).
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
# What the Dockerfile reads (see .dockerignore): the inputs whose hash names a dirty build.
BUILD_INPUTS = ("Dockerfile", ".dockerignore", "requirements.lock", "src/kvstack")
IGNORED_INPUTS = ("src/kvstack/ops", "src/kvstack/dev")
# The label each image carries with context_hash() of its inputs (the Dockerfile's CONTEXT_HASH).
CONTEXT_LABEL = '{{index .Config.Labels "dev.kvstack.context"}}'


def _git(*args: str, root: Path = ROOT) -> str | None:
    try:
        result = subprocess.run(
            ["git", "-C", str(root), *args], capture_output=True, text=True, check=False
        )
    except FileNotFoundError:
        return None
    return result.stdout.strip() if result.returncode == 0 and result.stdout.strip() else None


def pathspec(service: catalog.Service | None = None) -> list[str]:
    """The git pathspec of what an image is built from: every build input except the code no
    image runs (kvstack.ops, kvstack.dev) and, for one service, the other services' packages
    (see the Dockerfile's `own` stage). The one rule for the builds, the dev loop and CI."""
    others = (
        []
        if service is None
        else [f"src/kvstack/{name}" for name in catalog.services() if name != service.name]
    )
    return [*BUILD_INPUTS, *(f":(exclude){p}" for p in (*IGNORED_INPUTS, *others))]


def in_pathspec(path: str, spec: list[str]) -> bool:
    """Whether a repository-relative path is selected by a pathspec of pathspec()'s form
    (literal paths, each naming a file or a directory; `:(exclude)P` removes P), as git reads it."""

    def under(entry: str) -> bool:
        return path == entry or path.startswith(entry.rstrip("/") + "/")

    excluded = [p.removeprefix(":(exclude)") for p in spec if p.startswith(":(exclude)")]
    included = [p for p in spec if not p.startswith(":")]
    return any(under(p) for p in included) and not any(under(p) for p in excluded)


def affected_by(paths: list[str]) -> list[catalog.Service]:
    """The services whose image inputs include one of these repository-relative paths (the
    rule of `kvstack pipeline changed`, for a list of paths instead of a git range)."""
    services = list(catalog.services().values())
    return [s for s in services if any(in_pathspec(p, pathspec(s)) for p in paths)]


def context_hash(root: Path = ROOT, service: catalog.Service | None = None) -> str:
    """A hash of every file an image is built from (names and contents): that of `service`,
    or of every image when None."""
    spec = pathspec(service)
    digest = hashlib.sha256()
    for entry in BUILD_INPUTS:
        path = root / entry
        for f in sorted(path.rglob("*")) if path.is_dir() else [path]:
            rel = f.relative_to(root).as_posix()
            if f.is_file() and "__pycache__" not in f.parts and in_pathspec(rel, spec):
                digest.update(rel.encode() + b"\0" + f.read_bytes() + b"\0")
    return digest.hexdigest()


def version(root: Path = ROOT, service: catalog.Service | None = None) -> str:
    """The tag for a build of this tree (see the module docstring); with `service`, the version
    of that service's own inputs, which its image carries in its labels (so an image whose
    inputs did not change keeps its ID when other services change).

    It names the last commit that changed the image's inputs, so commits elsewhere (docs, tests,
    the ops CLI) neither rebuild the images nor roll the local stack.
    """
    spec = pathspec(service)
    commit = _git("log", "-1", "--format=%H", "--", *spec, root=root)
    described = (commit and _git("describe", "--tags", "--always", commit, root=root)) or (
        "0.0.0-nogit"
    )
    if not commit or _git("status", "--porcelain", "--", *spec, root=root):
        described += "-dirty." + context_hash(root, service)[:8]
    return described


def revision(service: catalog.Service, root: Path = ROOT) -> str | None:
    """The full SHA of the last commit that changed `service`'s image inputs (None outside a
    git clone): its image's revision label, and its version in the delivery pipeline."""
    return _git("log", "-1", "--format=%H", "--", *pathspec(service), root=root)


def image_ref(service: catalog.Service, tag: str) -> str:
    return f"{service.image}:{tag}"


def inspect_image(runner: Runner, ref: str, template: str = "{{.Id}}") -> str | None:
    """`docker image inspect --format TEMPLATE` of a local image (by default its ID), or None
    when the local engine does not have it. The one place the CLI asks about an image."""
    result = runner.query(docker("image", "inspect", "--format", template, ref))
    return result.stdout.strip() if result.returncode == 0 else None


def _make_local_base(runner: Runner) -> None:
    """debootstrap a minimal bookworm (what debian:bookworm-slim holds) and import it."""
    if os.geteuid() != 0:
        raise CommandError(
            f"{OFFICIAL_BASE} cannot be pulled and making it from Debian's packages needs root; "
            f"run `sudo make images` once (it creates {LOCAL_BASE}), or `docker load` the image"
        )
    if not shutil.which("debootstrap"):
        say("installing debootstrap (apt-get) to make the base image")
        runner.run(
            ["apt-get", "install", "-y", "-q", "debootstrap"],
            env={"DEBIAN_FRONTEND": "noninteractive"},
        )
    say(f"no registry reachable: making {LOCAL_BASE} from Debian's packages (about a minute)")
    rootfs = Path(tempfile.mkdtemp(prefix="kvstack-base-", dir="/var/tmp"))
    try:
        started = time.monotonic()
        runner.run(
            ["debootstrap", "--variant=minbase", "bookworm", str(rootfs), DEBIAN_MIRROR],
            capture=True,
        )
        if not runner.dry_run:
            # The same suites the official image points apt at, so both paths get the same
            # Python; then the slim image's trimming.
            (rootfs / "etc/apt/sources.list").write_text(
                f"deb {DEBIAN_MIRROR} bookworm main\n"
                f"deb {DEBIAN_MIRROR} bookworm-updates main\n"
                "deb http://deb.debian.org/debian-security bookworm-security main\n"
            )
            for trimmed in (
                "usr/share/doc",
                "usr/share/man",
                "usr/share/info",
                "usr/share/locale",
                "var/cache/apt",
                "var/lib/apt/lists",
            ):
                shutil.rmtree(rootfs / trimmed, ignore_errors=True)
                (rootfs / trimmed).mkdir(parents=True, exist_ok=True)
        say(f"importing it into the engine as {LOCAL_BASE}")
        print(
            f"+ tar -C {rootfs} --numeric-owner -c . | docker import - {LOCAL_BASE}",
            file=sys.stderr,
            flush=True,
        )
        if not runner.dry_run:
            tar = subprocess.Popen(
                ["tar", "-C", str(rootfs), "--numeric-owner", "-c", "."], stdout=subprocess.PIPE
            )
            imported = subprocess.run(
                docker("import", "--change", 'CMD ["bash"]', "-", LOCAL_BASE),
                stdin=tar.stdout,
                capture_output=True,
                text=True,
                check=False,
            )
            tar.wait()
            if tar.returncode != 0 or imported.returncode != 0:
                raise CommandError(f"docker import of {LOCAL_BASE} failed: {imported.stderr}")
        say(f"{LOCAL_BASE} made in {time.monotonic() - started:.0f} s")
    finally:
        shutil.rmtree(rootfs, ignore_errors=True)


def ensure_base(runner: Runner) -> str:
    """The BASE_IMAGE to build from (see the module docstring); idempotent."""
    if override := os.environ.get("KVSTACK_BASE_IMAGE"):
        return override
    for candidate in (OFFICIAL_BASE, LOCAL_BASE):
        if inspect_image(runner, candidate) is not None:
            return candidate
    say(f"pulling {OFFICIAL_BASE}")
    if runner.query(docker("pull", "-q", OFFICIAL_BASE), timeout=300).returncode == 0:
        return OFFICIAL_BASE
    say(f"{OFFICIAL_BASE} is not in the engine and cannot be pulled")
    _make_local_base(runner)
    return LOCAL_BASE


def pip_ca() -> Path | None:
    """The CA bundle pip must trust inside the build: $PIP_CERT, else the host's, if any."""
    for candidate in (os.environ.get("PIP_CERT"), str(HOST_CA_BUNDLE)):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def source_url(remote: str) -> str:
    """The repository's address for the image's source label: a remote's URL (an scp-style
    git@host:path becomes https://host/path), never a path on this machine (a clone of a local
    repository has one as its origin), and without any credentials in it."""
    if m := re.fullmatch(r"[\w.-]+@([\w.-]+):(.+?)(\.git)?", remote):
        return f"https://{m[1]}/{m[2]}"
    if m := re.fullmatch(r"(https?|ssh|git)://(?:[^@/]+@)?([^/]+)/(.+?)(\.git)?", remote):
        return f"https://{m[2]}/{m[3]}"
    return ""


def built_from(runner: Runner, ref: str, service: catalog.Service, root: Path = ROOT) -> bool:
    """True when image `ref` exists and was built from `service`'s inputs as they are now."""
    return inspect_image(runner, ref, CONTEXT_LABEL) == context_hash(root, service)


def build(
    runner: Runner, services: list[catalog.Service], tag: str, *, only_if_changed: bool = False
) -> None:
    """Build each service's image (BuildKit reuses every shared layer after the first)."""
    todo = [
        s for s in services if not (only_if_changed and built_from(runner, image_ref(s, tag), s))
    ]
    if not todo:
        say(f"images up to date ({tag})")
        return
    base = ensure_base(runner)
    source = source_url(_git("remote", "get-url", "origin") or "")
    ca = pip_ca()
    for service in todo:
        say(f"building {image_ref(service, tag)}")
        started = time.monotonic()
        # The labels describe this service's own inputs, not the tag's: an image none of whose
        # inputs changed is then identical, ID and all, to the one built before.
        build_args = {
            "BASE_IMAGE": base,
            "SERVICE": service.name,
            "VERSION": version(service=service),
            "REVISION": revision(service) or "unknown",
            "SOURCE": source,
            "CONTEXT_HASH": context_hash(service=service),
        }
        argv = docker("build", "--target", "service")
        for key, value in build_args.items():
            argv += ["--build-arg", f"{key}={value}"]
        argv += ["--tag", image_ref(service, tag), "--tag", image_ref(service, STABLE_TAG)]
        if ca:
            argv += ["--secret", f"id=pipca,src={ca}"]
        if verbose():
            runner.run([*argv, str(ROOT)], env={"DOCKER_BUILDKIT": "1"})
        else:
            quiet_build(runner, [*argv, "--progress=plain", str(ROOT)], service)
        if runner.dry_run:
            say(
                f"(dry run) nothing was built; the command above would build "
                f"{image_ref(service, tag)}"
            )
        else:
            say(f"built {image_ref(service, tag)} in {time.monotonic() - started:.1f} s")


def verbose() -> bool:
    """KVSTACK_VERBOSE=1 (or `--verbose`): show the builder's own output as it runs."""
    return os.environ.get("KVSTACK_VERBOSE", "") not in ("", "0")


def quiet_build(runner: Runner, argv: list[str], service: catalog.Service) -> None:
    """Run a build keeping BuildKit's step-by-step output to itself: a line of what it did,
    and on failure its last lines and where the rest is."""
    result = runner.run(argv, env={"DOCKER_BUILDKIT": "1"}, capture=True, check=False)
    lines = (result.stderr + result.stdout).splitlines()
    if result.returncode != 0:
        print("\n".join(lines[-40:]), file=sys.stderr)
        raise CommandError(
            f"building {service.image} failed (exit {result.returncode}): the builder's last "
            "lines are above; `kvstack images --verbose` shows all of its output"
        )
    steps = [
        line
        for line in lines
        if re.match(r"#\d+ \[[\w-]+ \d+/\d+\]", line) and "] FROM " not in line
    ]
    cached = len(
        {s.split()[0] for s in steps}
        & {line.split()[0] for line in lines if line.endswith(" CACHED")}
    )
    total = len({s.split()[0] for s in steps})
    if total and not runner.dry_run:
        say(f"{service.image}: {total - cached} of {total} build steps run, {cached} from cache")


def select(names: list[str]) -> list[catalog.Service]:
    try:
        return [catalog.get(n) for n in names] if names else list(catalog.services().values())
    except KeyError as err:
        raise CommandError(str(err.args[0])) from None


def _cmd_images(args: argparse.Namespace) -> int:
    if args.verbose:
        os.environ["KVSTACK_VERBOSE"] = "1"
    runner = Runner(dry_run=args.dry_run)
    engine.ensure(runner)
    tag = args.tag or version()
    build(runner, select(args.services), tag)
    for service in select(args.services):
        print(image_ref(service, tag))
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("images", help="build the services' images (one Dockerfile)")
    p.add_argument("services", nargs="*", metavar="SERVICE", help="default: every service")
    p.add_argument("--tag", help="the version tag (default: from git describe)")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run none")
    p.add_argument("--verbose", action="store_true", help="show the builder's output")
    p.set_defaults(func=_cmd_images)


def require_local(runner: Runner, svc: catalog.Service, version: str) -> str:
    """kvstack-NAME:VERSION, which the local engine must have (a dry run only says so)."""
    ref = image_ref(svc, version)
    if inspect_image(runner, ref) is None:
        if runner.dry_run:
            say(
                f"(dry run) image {ref} is missing: a real run would fail here; build it with "
                f"`kvstack images --tag {version}`"
            )
            return ref
        raise CommandError(
            f"image {ref} is missing from the local Docker engine; build it with "
            f"`kvstack images --tag {version}` from a checkout of {version} (or deploy "
            "without --version to build this tree's)"
        )
    return ref
