"""One valid instance of every message type, for tests that must cover them all."""

import importlib

from agents.kinds import BUILTIN, module_of

from agents.probe import ProbeCounts, ProbeReport, ProbeWatch
from network.messages import (
    Ack, HostChanged, HostStatus, AgentStats, AgentStatus, Deregister, Echo, Error, Heartbeat, HeartbeatAck, Ping, Pong, ReadyStatus, Register,
    Registered, StateChanged, StatusReply, StatusRequest, WaitReady,
)

_status = AgentStatus(agent="a", kind="echo", host="h", group="g", required=True, state="ready", depends_on=["twin"],
                      waiting_on=[], last_heartbeat_age_s=0.2, uptime_s=3.0, restarts=1, pid=42,
                      stats=AgentStats(messages_in=1, messages_out=2, errors=0))

SAMPLES = {m.type_name: m for m in [
    Error(code="unknown_type", message="no", detail={"x": 1}),
    Ack(),
    Ping(),
    Pong(agent="a", kind="echo", state="ready", uptime_s=1.5, pid=3),
    Echo(payload=b"\x00\xff", seq=9),
    Register(agent="a", kind="echo", host="h", instance="i1", pid=3, state="starting"),
    Registered(waiting_on=["b"], heartbeat_interval_s=1.0, restarts=2),
    Heartbeat(agent="a", instance="i1", state="ready", stats=AgentStats(messages_in=5), detail="fine"),
    HeartbeatAck(registered=True),
    WaitReady(agent="a", instance="i1"),
    ReadyStatus(ready=False, waiting_on=["b"], registered=True),
    Deregister(agent="a", instance="i1", reason="stopped"),
    StatusRequest(),
    StatusReply(mesh="m", mesh_state="ready", twin_uptime_s=9.0, agents=[_status],
                hosts=[HostStatus(host="h", address="10.0.0.2", state="unreachable", agents=2, ready=0)]),
    HostChanged(host="h", previous="reachable", state="unreachable", reason="link down"),
    ProbeWatch(agent="a", topic="probe."),
    ProbeReport(agent="a"),
    ProbeCounts(agent="a", received=3, last_seq=7),
    StateChanged(agent="a", host="h", previous="waiting", state="ready", restarts=0, reason="heartbeat"),
]}


def shipped() -> set[str]:
    """Types registered by this repository's modules (a test may have imported a plug-in's too)."""
    from network.messages import REGISTRY

    for kind in BUILTIN:
        importlib.import_module(module_of(kind))
    return {name for name, cls in REGISTRY.items() if cls.__module__.split(".")[0] in ("agents", "network")}
