"""The committed stack file (deploy/local/stack.yaml) works by hand, with plain docker commands."""

from __future__ import annotations

import os
import subprocess
import uuid

import pytest

from kvstack.ops import catalog, checkout, engine, local

from .conftest import RUNNER, StackUnderTest, docker

pytestmark = pytest.mark.containers


def test_the_committed_stack_file_deploys_by_hand(tag: str) -> None:
    """`KVSTACK_STACK=NAME docker stack deploy -c deploy/local/stack.yaml NAME`, as the file's
    header and docs/deploying.md give it (KVSTACK_TAG naming this tree's images), runs every
    service healthy, on volumes named after the stack, and the client's smoke test passes."""
    name = f"kvhand-{uuid.uuid4().hex[:6]}"
    env = {**os.environ, local.STACK_VARIABLE: name, local.TAG_VARIABLE: tag}
    stack_file = checkout.ROOT / local.STACK_FILE
    # The file's header: an engine in a swarm (`docker swarm init` where it is not yet).
    engine.ensure_swarm(RUNNER)
    try:
        deployed = subprocess.run(
            engine.docker("stack", "deploy", "-c", str(stack_file), name),
            env=env, capture_output=True, text=True, timeout=180, check=False,
        )  # fmt: skip
        assert deployed.returncode == 0, deployed.stderr
        stack = StackUnderTest(name, tag)
        stack.wait_healthy(timeout=180)
        label = f"label=com.docker.stack.namespace={name}"
        volumes = docker("volume", "ls", "-q", "--filter", label).split()
        per_slot = [f"{name}_{local.volume_name(s)}-{slot}" for s in catalog.rollout_order()
                    if s.kind == "stateful" for slot in range(1, s.replicas + 1)]  # fmt: skip
        assert sorted(volumes) == sorted(per_slot)
        smoke = stack.run_job("client", "smoke")
        assert smoke.returncode == 0, smoke.stdout + smoke.stderr
    finally:
        local.remove(RUNNER, name, volumes=True)
