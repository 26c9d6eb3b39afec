"""The generated stack file (no engine needed): everything per service comes from the registry."""

from __future__ import annotations

import pytest

from kvstack import registry
from kvstack.ops import images, local

FOUR_SERVICES = """
[services.backend]
kind = "stateful"
port = 50061
replicas = 1

[services.server]
kind = "stateless"
port = 50051
replicas = 2
calls = ["backend", "cache"]
publish = true

[services.cache]
kind = "stateless"
port = 50071
replicas = 2

[services.client]
kind = "job"
calls = ["server"]
"""


@pytest.fixture
def four_services(monkeypatch: pytest.MonkeyPatch) -> dict[str, registry.Service]:
    """services.toml with a fourth service (cache) added, and nothing else edited."""
    services = registry.parse(FOUR_SERVICES)
    monkeypatch.setattr(registry, "services", lambda: services)
    return services


def test_a_new_service_gets_an_image_and_a_place_in_the_stack(
    four_services: dict[str, registry.Service],
) -> None:
    """A service added to services.toml is built and deployed with no other edit."""
    assert [s.name for s in images.select([])] == list(four_services)
    spec = local.stack_spec("t1")
    cache = spec["services"]["cache"]
    assert cache["image"] == "kvstack-cache:t1"
    assert cache["deploy"]["replicas"] == 2
    assert cache["deploy"]["update_config"]["order"] == "start-first"
    assert cache["healthcheck"]["test"] == local.PROBE
    assert spec["services"]["server"]["environment"] == {
        "KVSTACK_BACKEND_TARGET": "dns:///backend:50061",
        "KVSTACK_CACHE_TARGET": "dns:///cache:50071",
    }


def test_stack_publishes_at_most_the_server_and_keeps_jobs_out(
    four_services: dict[str, registry.Service],
) -> None:
    """Only `publish` services get a host-mode port (engine-picked, so replicas fit on one
    node); jobs are not services of the stack; the stateful one has its own volume."""
    spec = local.stack_spec("t1")
    assert "client" not in spec["services"]
    published = {name: s["ports"] for name, s in spec["services"].items() if "ports" in s}
    assert published == {"server": [{"target": 50051, "protocol": "tcp", "mode": "host"}]}
    assert spec["services"]["backend"]["volumes"] == ["backend-data:/data"]
    assert spec["services"]["backend"]["deploy"]["update_config"]["order"] == "stop-first"
    # One volume per task slot (Swarm expands the template), named after the stack.
    assert spec["volumes"] == {"backend-data": {"name": "kvstack_backend-data-{{.Task.Slot}}"}}
    assert spec["services"]["backend"]["environment"]["KVSTACK_ORDINAL"] == "{{.Task.Slot}}"
    assert spec["networks"][local.NETWORK]["attachable"] is True
