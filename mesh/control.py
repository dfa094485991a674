"""Talking to a running mesh from outside it: the CLI, the health probe, tests and benchmarks."""

from __future__ import annotations

from mesh.config import MeshConfig
from mesh.messages import StatusReply, StatusRequest
from network.rpc import RpcClient
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
        return c.request(StatusRequest())
