"""Talking to a running mesh from outside it: the CLI, the health probe, tests and benchmarks.

What goes wrong arrives as a `MeshError` (no reply, an error reply, a garbled reply, a reply of the
wrong type), never as a codec error or an AttributeError on a reply that is not what was asked."""

from __future__ import annotations

from mesh.config import MeshConfig
from mesh.messages import StatusReply, StatusRequest
from network.messages import ErrorCode
from network.rpc import MeshError, RpcClient
from network.security import load_identity


def client(config: MeshConfig, agent: str, *, timeout: float | None = None, retries: int = 0,
           sender: str = "meshctl", host: str | None = None) -> RpcClient:
    """A blocking client to `agent`, with this host's CURVE keys when CURVE is on."""
    me = host or config.host or config.host_of(agent)
    identity = load_identity(config.security.keys_dir, me) if config.curve_enabled(me) else None
    return RpcClient(config.endpoint(agent, "rpc"), sender=sender, identity=identity, server_host=config.host_of(agent),
                     timeout=timeout or config.mesh.request_timeout_s, retries=retries,
                     max_frame_bytes=config.mesh.max_frame_bytes)


def fetch_status(config: MeshConfig, *, timeout: float = 2.0) -> StatusReply:
    with client(config, config.twin, timeout=timeout) as c:
        return request_status(c)


def request_status(c: RpcClient) -> StatusReply:
    """The twin's status over `c`; MeshError when it does not come (a reply of another type is `invalid_body`)."""
    reply = c.request(StatusRequest())
    if not isinstance(reply, StatusReply):
        raise MeshError(ErrorCode.INVALID_BODY, f"the twin answered {StatusRequest.type_name} with {reply.type_name}, "
                                                f"not {StatusReply.type_name}")
    return reply
