"""The messages every agent speaks with the digital twin and the mesh tools: registration, heartbeats,
the start-up gate, status, state events and alerts, and reading an agent's log across hosts.
(network/messages.py has the transport's own: errors, acks, ping, echo.)"""

from __future__ import annotations

from enum import StrEnum
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field

from network.messages import AgentState, Message


class LogRead(Message):
    """Asks any agent for lines of its own log file (`meshctl logs` across hosts): from byte `offset`
    of the file named by `file_id`, or, with offset -1 (or a file_id that is not the current file:
    it was rotated), the last `tail` lines. At most `max_bytes` come back, cut at a line end."""

    type_name: ClassVar[str] = "log.read"
    offset: int = Field(-1, ge=-1)
    file_id: str = ""
    tail: int = Field(20, ge=0, le=10000)
    max_bytes: int = Field(256 * 1024, ge=1024, le=4 * 1024 * 1024)


class LogLines(Message):
    """The answer to `log.read`: `lines` (without their newlines), the `file_id` and `offset` to ask
    from next time, and a `note` when the agent has no log file (it runs inside another process)."""

    type_name: ClassVar[str] = "log.lines"
    agent: str
    host: str = ""
    file_id: str = ""
    offset: int = 0
    lines: list[str] = Field(default_factory=list)
    note: str = ""


# --- digital twin: registry, heartbeats, start-up gate -----------------------------------------


class AgentStats(BaseModel):
    model_config = ConfigDict(extra="forbid")
    messages_in: int = 0
    messages_out: int = 0
    errors: int = 0
    # The agent's own figures (frontier size, pages extracted, GPU MiB ...), for the dashboard:
    # at most 64 of them.
    gauges: dict[str, float] = Field(default_factory=dict, max_length=64)


MAX_SPOKEN_TYPES = 4096   # a process registers about 60 types; plug-ins add some


class Register(Message):
    """An agent (re-)announces itself. A new `instance` for a known agent counts as a restart. `state`: starting,
    waiting, ready or degraded (the twin refuses the others: invalid_body). `speaks`: every message type its
    process knows, with its version (network.messages.versions()); the twin compares it with the rest of the mesh.
    Empty: nothing is compared. Version 2: `speaks` added (a twin of version 1 refuses it, so it answers
    bad_version and the agent says it cannot talk to the twin)."""

    type_name: ClassVar[str] = "twin.register"
    version: ClassVar[int] = 2
    agent: str
    kind: str
    host: str
    instance: str
    pid: int
    state: AgentState = AgentState.STARTING
    speaks: dict[str, int] = Field(default_factory=dict, max_length=MAX_SPOKEN_TYPES)


class VersionConflict(BaseModel):
    """A message type the registering agent and others of the mesh both know, at versions that cannot be
    exchanged: `version` is the registering agent's, `peers` each other agent's (the twin's included)."""

    model_config = ConfigDict(extra="forbid")
    message_type: str
    version: int
    peers: dict[str, int]

    def describe(self) -> str:
        return f"{self.message_type} v{self.version} (" + ", ".join(f"{a}: v{v}" for a, v in self.peers.items()) + ")"


class Registered(Message):
    """`conflicts`: the types this agent cannot exchange with the rest of the mesh (its `speaks` against theirs);
    empty when every type both sides know is at the same version. Version 2: `conflicts` added."""

    type_name: ClassVar[str] = "twin.registered"
    version: ClassVar[int] = 2
    waiting_on: list[str] = Field(default_factory=list)
    heartbeat_interval_s: float
    restarts: int = 0
    conflicts: list[VersionConflict] = Field(default_factory=list)


class Heartbeat(Message):
    """Sent while the agent is ready or degraded; the twin refuses any other `state` (invalid_body)."""

    type_name: ClassVar[str] = "twin.heartbeat"
    agent: str
    instance: str
    state: AgentState
    stats: AgentStats = Field(default_factory=AgentStats)
    detail: str = ""


class HeartbeatAck(Message):
    """`registered` is false when the twin does not know this instance (it restarted): register again."""

    type_name: ClassVar[str] = "twin.heartbeat_ack"
    registered: bool


class WaitReady(Message):
    """Asks whether every required dependency of `agent` is ready."""

    type_name: ClassVar[str] = "twin.wait_ready"
    agent: str
    instance: str = ""


class ReadyStatus(Message):
    type_name: ClassVar[str] = "twin.ready_status"
    ready: bool
    waiting_on: list[str] = Field(default_factory=list)
    registered: bool = True  # false: the twin does not know this instance (it restarted); register again


class Deregister(Message):
    type_name: ClassVar[str] = "twin.deregister"
    agent: str
    instance: str
    reason: str = ""


class StatusRequest(Message):
    type_name: ClassVar[str] = "twin.status"


class AgentStatus(BaseModel):
    model_config = ConfigDict(extra="forbid", use_enum_values=True)
    agent: str
    kind: str
    host: str
    group: str
    required: bool
    state: AgentState
    depends_on: list[str]
    waiting_on: list[str]
    last_heartbeat_age_s: float | None
    uptime_s: float | None
    restarts: int
    pid: int | None
    stats: AgentStats
    detail: str = ""


class HostState(StrEnum):
    LOCAL = "local"  # the twin's own host
    UNKNOWN = "unknown"  # no agent of it has registered yet
    REACHABLE = "reachable"
    UNREACHABLE = "unreachable"


class HostStatus(BaseModel):
    model_config = ConfigDict(extra="forbid", use_enum_values=True)
    host: str
    address: str
    state: HostState
    agents: int
    ready: int


class StatusReply(Message):
    type_name: ClassVar[str] = "twin.status_reply"
    mesh: str
    mesh_state: str
    twin_uptime_s: float
    agents: list[AgentStatus]
    hosts: list[HostStatus] = Field(default_factory=list)


class HostChanged(Message):
    """Published by the twin on topic `twin.host` when a host becomes reachable or unreachable."""

    type_name: ClassVar[str] = "twin.host"
    host: str
    previous: HostState
    state: HostState
    reason: str = ""


class AlertKind(StrEnum):
    AGENT_DEAD = "agent_dead"
    AGENT_FLAPPING = "agent_flapping"
    AGENT_RECOVERED = "agent_recovered"
    HOST_UNREACHABLE = "host_unreachable"
    HOST_RECOVERED = "host_recovered"


class Alert(Message):
    """Published by the twin on topic `twin.alert` when an agent dies, flaps (restarts or dies
    `flap_count` times within `flap_window_s`), or a host becomes unreachable, and when each recovers.
    `at` is the twin's wall-clock time (seconds since the epoch)."""

    type_name: ClassVar[str] = "twin.alert"
    kind: AlertKind
    severity: str = "critical"   # critical | warning | info
    agent: str = ""
    host: str = ""
    message: str = ""
    at: float = 0.0


class StateChanged(Message):
    """Published by the twin on topic `twin.state` whenever an agent's state changes."""

    type_name: ClassVar[str] = "twin.state"
    agent: str
    host: str
    previous: AgentState
    state: AgentState
    waiting_on: list[str] = Field(default_factory=list)
    restarts: int = 0
    reason: str = ""
