"""Message models: every frame on the mesh carries exactly one of these.

A message type is a pydantic model with a `type_name` (dotted, unique) and a schema
`version`. Subclassing `Message` with a `type_name` registers the type; the codec looks
types up here by name. Agents add their own types the same way, in their own modules.

Versions are per type: two processes can exchange a type only at the same version, since a receiver refuses
a body with a field it does not know (a new optional field too), and a frame of another version is answered
`bad_version`. So any change to a type's fields raises its `version`, and an agent tells the twin at
registration what it speaks (`versions()`), so that an old and a new replica side by side learn there, not
from failed requests, which types they cannot exchange (docs/PROTOCOL.md, "Schema versions").
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
    version: ClassVar[int] = 1      # raised on any change to the fields: receivers take their own version only

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


def versions() -> dict[str, int]:
    """Every type this process knows, with the version it sends and accepts: what an agent speaks."""
    return {name: cls.version for name, cls in sorted(REGISTRY.items())}


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


class Echo(Message):
    """Payload returned unchanged by the `echo` example agent; also the benchmark's request."""

    type_name: ClassVar[str] = "mesh.echo"
    payload: bytes = b""
    seq: int = 0
