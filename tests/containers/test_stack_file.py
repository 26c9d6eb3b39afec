"""The generated stack file (no engine needed): all it says of a service is the service list's."""

from __future__ import annotations

import pytest

from kvstack import defaults
from kvstack.ops import catalog, images, local

FOUR_SERVICES = """
[services.backend]
kind = "stateful"
replicas = 2

[services.server]
kind = "stateless"
replicas = 2
calls = ["backend", "cache"]
publish = true

[services.cache]
kind = "stateless"
replicas = 2

[services.client]
kind = "job"
calls = ["server"]
"""


@pytest.fixture
def four_services(monkeypatch: pytest.MonkeyPatch) -> dict[str, catalog.Service]:
    """services.toml with a fourth service (cache) added, its port beside the others', and
    nothing else edited."""
    services = catalog.parse(FOUR_SERVICES, ports={**defaults.PORTS, "cache": 50071})
    monkeypatch.setattr(catalog, "services", lambda: services)
    return services


def test_a_new_service_gets_an_image_and_a_place_in_the_stack(
    four_services: dict[str, catalog.Service],
) -> None:
    """A service added to services.toml is built and deployed with no other edit."""
    assert [s.name for s in images.select([])] == list(four_services)
    spec = local.stack_spec("t1")
    cache = spec["services"]["cache"]
    assert cache["image"] == "kvstack-cache:t1"
    assert cache["deploy"]["replicas"] == 2
    assert cache["deploy"]["update_config"]["order"] == "start-first"
    assert cache["healthcheck"]["test"] == [
        *local.PROBE, "--target", "127.0.0.1:50071", "--timeout", "8", "--service", ""
    ]  # fmt: skip
    assert spec["services"]["server"]["environment"] == {
        "KVSTACK_PORT": "50051",
        "KVSTACK_METRICS_PORT": "9464",
        "KVSTACK_SHUTDOWN_GRACE": "10",
        "KVSTACK_BACKEND_TARGET": "dns:///backend:50061",
        "KVSTACK_CACHE_TARGET": "dns:///cache:50071",
    }


def test_stack_publishes_at_most_the_server_and_keeps_jobs_out(
    four_services: dict[str, catalog.Service],
) -> None:
    """No Swarm service publishes a port (Swarm would bind it on every interface: the gateway
    container publishes on loopback instead); jobs are not services of the stack; the stateful
    one has its own volume."""
    spec = local.stack_spec("t1")
    assert "client" not in spec["services"]
    assert [name for name, s in spec["services"].items() if "ports" in s] == []
    assert local.published() == four_services["server"]
    tmp = {"type": "tmpfs", "target": "/tmp", "tmpfs": {"size": catalog.TMP_BYTES}}
    assert spec["services"]["backend"]["volumes"] == [tmp, "backend-data:/data"]
    assert spec["services"]["server"]["volumes"] == [tmp]
    assert spec["services"]["backend"]["deploy"]["update_config"]["order"] == "stop-first"
    # One volume per task slot (Swarm expands the template), named after the stack.
    assert spec["volumes"] == {"backend-data": {"name": "kvstack_backend-data-{{.Task.Slot}}"}}
    assert spec["services"]["backend"]["environment"]["KVSTACK_ORDINAL"] == "{{.Task.Slot}}"


def test_stack_networks_are_the_flow_graph(four_services: dict[str, catalog.Service]) -> None:
    """One network per flow between two services, joined by its two ends only: the client
    shares none with the backend or the cache, and the backend none with the cache."""
    spec = local.stack_spec("t1")
    assert set(spec["networks"]) == {"client-server", "server-backend", "server-cache"}
    assert all(n == {"driver": "overlay", "attachable": True} for n in spec["networks"].values())
    joined = {name: set(s["networks"]) for name, s in spec["services"].items()}
    assert joined == {
        "backend": {"server-backend"},
        "server": {"client-server", "server-backend", "server-cache"},
        "cache": {"server-cache"},
    }
    assert local.job_network("st", four_services["client"]) == "st_client-server"


def test_a_flow_to_itself_gets_a_network_only_when_it_has_no_other() -> None:
    """Replicas of one service share its networks; alone, its own flow gets one."""
    alone = catalog.parse(
        '[services.db]\nkind = "stateful"\nreplicas = 2\ncalls = ["db"]\n', ports={"db": 1}
    )
    with pytest.MonkeyPatch.context() as m:
        m.setattr(catalog, "services", lambda: alone)
        assert local.networks_of(alone["db"]) == ["db-db"]
    shipped = catalog.services()
    assert local.networks_of(shipped["backend"]) == ["server-backend"]


def test_the_readiness_name_is_what_the_swarm_health_check_asks() -> None:
    """The backend's health check asks kvstack.v1.KeyValue (NOT_SERVING on a replica that is
    not following), as its Kubernetes readiness probe does; others ask the process."""
    spec = local.stack_spec("t1")
    assert spec["services"]["backend"]["healthcheck"]["test"][-2:] == [
        "--service",
        "kvstack.v1.KeyValue",
    ]
    assert spec["services"]["server"]["healthcheck"]["test"][-1] == ""


def test_swarm_tasks_are_locked_down_like_the_pods() -> None:
    """Every service runs with a read-only root, no capabilities and an in-memory /tmp of the
    pods' emptyDir size (what docker inspect shows on a task is checked in test_stack.py)."""
    for name, entry in local.stack_spec("t1")["services"].items():
        assert entry["read_only"] is True, name
        assert entry["cap_drop"] == ["ALL"], name
        assert {"type": "tmpfs", "target": "/tmp", "tmpfs": {"size": 64 * 2**20}} in entry[
            "volumes"
        ], name


@pytest.mark.parametrize(
    ("remote", "label"),
    [
        ("git@github.com:acme/kvstack.git", "https://github.com/acme/kvstack"),
        ("https://github.com/acme/kvstack.git", "https://github.com/acme/kvstack"),
        ("https://user:token@github.com/acme/kvstack", "https://github.com/acme/kvstack"),
        ("/work/main", ""),
        ("../kvstack", ""),
        ("file:///srv/git/kvstack.git", ""),
    ],
)
def test_the_source_label_is_a_remote_or_nothing(remote: str, label: str) -> None:
    """The image's org.opencontainers.image.source is the remote's web address, never a path on
    the building machine nor a credential."""
    assert images.source_url(remote) == label


@pytest.mark.parametrize(
    ("progress", "says"),
    [
        (
            local.Progress(ready=0, desired=2, starting=1, old_serving=2, state="updating"),
            "0 of 2 ready on the new image, 1 new starting, 2 old still serving, "
            "update in progress",
        ),
        (local.Progress(ready=2, desired=2), "2 of 2 ready on the new image"),
        (
            local.Progress(ready=1, desired=2, old_other=1, state="rollback_started"),
            "1 of 2 ready on the new image, 1 old not serving, Swarm rolling back",
        ),
    ],
)
def test_progress_says_what_is_happening(progress: local.Progress, says: str) -> None:
    """A rolling update's progress line names old tasks that still serve and new ones that
    start, in words, instead of "0/2 ready, 2 other"."""
    assert str(progress) == says


def test_a_release_from_another_work_tree_is_noticed() -> None:
    """Each recorded release names the work tree it came from; a deploy from this tree over
    a stack whose services run another tree's release names that tree (it warns)."""
    mine = local.record_release([], "v1", "kvstack-server:v1", "deploy")
    assert mine[-1]["tree"] == str(images.ROOT)
    theirs = [{**mine[-1], "tree": "/home/someone/other-clone"}]

    def live(releases: list[dict[str, str]]) -> local.Live:
        return local.Live("s", "i", 2, releases, "", "", "", "", None, 0)

    assert local.other_trees({"server": live(mine), "backend": None}) == []
    assert local.other_trees({"server": live(theirs)}) == ["/home/someone/other-clone"]
