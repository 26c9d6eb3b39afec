"""One model of how a service runs, from which both targets are rendered.

kvstack.ops.manifests writes it as Kubernetes objects, kvstack.ops.local as the Swarm stack file.
What differs from one service to another comes from the service list (kvstack.ops.catalog: port,
kind, replica count, calls, readiness name); what is the same for every service is defined here,
once. A renderer only spells these facts the way its platform wants them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from kvstack import defaults
from kvstack.ops import catalog

# -- Stopping -----------------------------------------------------------------------------------
# On SIGTERM a service turns NOT_SERVING, lets its calls in flight finish within its drain
# (KVSTACK_SHUTDOWN_GRACE, default defaults.DRAIN_SECONDS) and releases what it holds (the
# backend commits every queued write). On Kubernetes a preStop pause comes first, while
# endpoints and callers' resolvers drop the pod (Swarm removes a stopping task from DNS itself).
# The platform kills the process STOP_GRACE_SECONDS after the stop began
# (terminationGracePeriodSeconds, stop_grace_period): 20 s, the pause and the drain with 5 s to
# release and exit. More only lengthens how long a hung process holds up a rollout (a stateful
# service stops first, so a hung primary delays every write); 20 s is also what every Swarm
# fault test and benchmark ran with.
PRESTOP_SECONDS = 5
DRAIN_SECONDS = defaults.DRAIN_SECONDS
STOP_GRACE_SECONDS = 20
if STOP_GRACE_SECONDS < PRESTOP_SECONDS + DRAIN_SECONDS + 5:
    raise AssertionError("the stop grace period must outlast preStop + drain, with time to exit")


# -- Health checks ------------------------------------------------------------------------------
# Every check asks the service's gRPC health service, which says NOT_SERVING until the service
# can serve and again while it drains. The two platforms check differently, so their timings
# differ on purpose:
# - Kubernetes splits the job in three probes, made by the kubelet from the node: nothing starts
#   in the container, the service answers one Check (a few ms typical, at most 0.31 s on a
#   saturated host: docs/architecture.md, "What a health check costs"). Every timeout is at
#   least 6x that worst answer: a false timeout takes a healthy pod out of its Service
#   (readiness) or restarts it (liveness, 3 in a row). Startup and liveness ask the process
#   (""): a replica that only waits for its primary, or copies a large snapshot, is alive and
#   must not be restarted. Readiness asks the service's readiness name (the service list), so such a
#   pod leaves its Service and an OrderedReady rollout waits for it. A pod joins its Service
#   (and the headless DNS callers resolve) at its first passing readiness check, so the
#   readiness period bounds how long a restarted primary is SERVING unseen while writes wait
#   for it: 2 s, and 5 failures (10 s) to leave.
# - Swarm has one check for all three: it gates updates (a task counts once SERVING for its
#   readiness name) and replaces a task that stays unhealthy. It runs `python -m kvstack.probe`
#   in the container, about 60 ms of CPU each time: every 5 s (about 1% of a core per task). It
#   took at most 6.8 s on a saturated host (tests/containers/test_cpu_saturation.py), so its
#   timeout is 10 s (the probe's own deadline 8 s, so that it says why), and it fails only after
#   a minute (12 x 5 s): a replica cut off from its primary for less is waited for, not killed.
# Both give a starting process the same STARTUP_SECONDS before a failure counts.


@dataclass(frozen=True)
class Check:
    """How often a health check runs, how long one may take, how many failures in a row act."""

    period: int
    timeout: int
    failures: int


STARTUP = Check(period=2, timeout=2, failures=60)
READINESS = Check(period=2, timeout=2, failures=5)
LIVENESS = Check(period=10, timeout=3, failures=3)
SWARM_HEALTH = Check(period=5, timeout=10, failures=12)
STARTUP_SECONDS = STARTUP.period * STARTUP.failures
PROBE_DEADLINE_SECONDS = 8
if SWARM_HEALTH.timeout <= PROBE_DEADLINE_SECONDS:
    raise AssertionError("the probe's deadline must end inside the Swarm check's timeout")


# -- Scale --------------------------------------------------------------------------------------


def autoscaled(svc: catalog.Service) -> bool:
    """Whether a HorizontalPodAutoscaler owns the service's replica count on Kubernetes (its
    floor the service list's count): then the workload itself sets none (kvstack.ops.manifests)."""
    return svc.kind == "stateless"


# -- Environment --------------------------------------------------------------------------------


def target_variable(callee: str) -> str:
    """The variable that tells a caller where `callee` is, e.g. KVSTACK_BACKEND_TARGET."""
    return f"KVSTACK_{callee.upper().replace('-', '_')}_TARGET"


def environment(svc: catalog.Service, services: Mapping[str, catalog.Service]) -> dict[str, str]:
    """The variables a service's container gets on every target (each platform adds how a
    stateful task learns its ordinal): its ports, its drain, its data directory, and each
    callee's one DNS name, which resolves to every replica for client-side round robin."""
    env: dict[str, str] = {}
    if svc.long_running:
        env["KVSTACK_PORT"] = str(svc.port)
        env["KVSTACK_METRICS_PORT"] = str(defaults.METRICS_PORT)
        env["KVSTACK_SHUTDOWN_GRACE"] = str(DRAIN_SECONDS)
    if svc.kind == "stateful":
        env["KVSTACK_DATA_DIR"] = defaults.DATA_DIR
    for callee in svc.calls:
        env[target_variable(callee)] = services[callee].target
    return env
