"""Message models: every frame on the mesh carries exactly one of these.

A message type is a pydantic model with a `type_name` (dotted, unique) and a schema
`version`. Subclassing `Message` with a `type_name` registers the type; the codec looks
types up here by name. Agents add their own types the same way, in their own modules.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

REGISTRY: dict[str, type[Message]] = {}


class Message(BaseModel):
    """Base of every message type; subclasses set `type_name` (and `version` when it changes)."""

    model_config = ConfigDict(extra="forbid", frozen=False, use_enum_values=True)

    type_name: ClassVar[str] = ""
    version: ClassVar[int] = 1

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        name = cls.__dict__.get("type_name")
        if not name:
            return
        existing = REGISTRY.get(name)
        if existing is not None and existing.__qualname__ != cls.__qualname__:
            raise TypeError(f"message type {name!r} is already registered by {existing.__module__}.{existing.__qualname__}")
        REGISTRY[name] = cls


def lookup(type_name: str) -> type[Message] | None:
    return REGISTRY.get(type_name)


# --- generic replies ---------------------------------------------------------------------------


class ErrorCode(StrEnum):
    UNDECODABLE = "undecodable"
    TOO_LARGE = "too_large"
    UNKNOWN_TYPE = "unknown_type"
    BAD_VERSION = "bad_version"
    INVALID_BODY = "invalid_body"
    NO_HANDLER = "no_handler"
    HANDLER_ERROR = "handler_error"
    UNKNOWN_AGENT = "unknown_agent"
    DRAINING = "draining"


class Error(Message):
    """Typed error reply: the request was not handled, and why."""

    type_name: ClassVar[str] = "mesh.error"
    code: str
    message: str
    detail: dict[str, Any] = Field(default_factory=dict)


class Ack(Message):
    """Plain acknowledgement for requests that have nothing to return."""

    type_name: ClassVar[str] = "mesh.ack"
    ok: bool = True


# --- every agent -------------------------------------------------------------------------------


class AgentState(StrEnum):
    DECLARED = "declared"
    STARTING = "starting"
    WAITING = "waiting"
    READY = "ready"
    DEGRADED = "degraded"
    DRAINING = "draining"
    STOPPED = "stopped"
    DEAD = "dead"
    UNREACHABLE = "unreachable"  # silent, together with every other agent of its host: the link is down


class Ping(Message):
    """Liveness and readiness probe; every agent answers it (the health probe uses it)."""

    type_name: ClassVar[str] = "mesh.ping"


class Pong(Message):
    type_name: ClassVar[str] = "mesh.pong"
    agent: str
    kind: str
    state: AgentState
    uptime_s: float
    pid: int


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


class Echo(Message):
    """Payload returned unchanged by the `echo` example agent; also the benchmark's request."""

    type_name: ClassVar[str] = "mesh.echo"
    payload: bytes = b""
    seq: int = 0


# --- digital twin: registry, heartbeats, start-up gate -----------------------------------------


class AgentStats(BaseModel):
    model_config = ConfigDict(extra="forbid")
    messages_in: int = 0
    messages_out: int = 0
    errors: int = 0
    # The agent's own figures (frontier size, pages extracted, GPU MiB ...), for the dashboard:
    # at most 64 of them.
    gauges: dict[str, float] = Field(default_factory=dict, max_length=64)


class Register(Message):
    """An agent (re-)announces itself. A new `instance` for a known agent counts as a restart."""

    type_name: ClassVar[str] = "twin.register"
    agent: str
    kind: str
    host: str
    instance: str
    pid: int
    state: AgentState = AgentState.STARTING


class Registered(Message):
    type_name: ClassVar[str] = "twin.registered"
    waiting_on: list[str] = Field(default_factory=list)
    heartbeat_interval_s: float
    restarts: int = 0


class Heartbeat(Message):
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
