"""What every check shares: the config, this host, its CURVE identity, one ZeroMQ context, and how
links, addresses and the usual fixes are worded. Each check is a function taking the Session."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import zmq

from mesh.config import MeshConfig
from mesh.control import client
from network.rpc import RpcClient
from network.security import CurveIdentity, MissingKey, load_identity

SENDER = "connectivity"
PROBE_KIND = "probe"


@dataclass(frozen=True)
class Options:
    """The run's settings (the command-line options that shape the checks)."""

    timeout: float = 2.0  # per check, seconds
    probes: int = 50  # mesh.ping round trips per link
    max_skew: float = 0.5  # largest clock skew allowed, seconds
    require_curve: bool = False  # plaintext is a failure even with an explicit `curve: off` (else a warning)
    config: str | None = None  # --config as given: the other hosts' configs are looked for beside it


class Session:
    """One run's shared state (`s` in every check): `remote` lists the agents on other hosts, the twin
    first; `local_probe` is this host's probe agent, if any; `curve` says whether CURVE is on here."""

    def __init__(self, cfg: MeshConfig, opts: Options, config_arg: str):
        self.cfg = cfg
        self.opts = opts
        self.timeout = opts.timeout
        self.me = cfg.this_host
        self.config_arg = config_arg
        self.ctx = zmq.Context()
        self.identity: CurveIdentity | None = None
        self.identity_error = ""
        self.curve = cfg.curve_enabled(self.me)
        if self.curve:
            try:
                self.identity = load_identity(cfg.security.keys_dir, self.me)
            except MissingKey as exc:
                self.identity_error = str(exc)
        self.remote = [a for a in cfg.agents if cfg.host_of(a) != self.me]
        self.remote.sort(key=lambda a: (a != cfg.twin, cfg.host_of(a)))  # the twin first, then by host
        self.local_probe = next(iter(self.probes_on(self.me)), None)

    def close(self) -> None:
        self.ctx.destroy(linger=0)  # every socket was closed by its check; destroy() also covers one that was not

    def is_probe(self, agent: str) -> bool:
        return self.cfg.is_kind(agent, PROBE_KIND)

    def probes_on(self, host: str) -> list[str]:
        """The probe agents (kind `probe`) placed on `host`."""
        return [a for a in self.cfg.agents_of_kind(PROBE_KIND) if self.cfg.host_of(a) == host]

    def link(self, agent: str) -> str:
        host = self.cfg.host_of(agent)
        return f"{self.me} -> {agent}@{host}" + (" (local)" if host == self.me else "")

    def config_for(self, host: str) -> str:
        """The config file a host runs with, as a path the owner can type."""
        if host == self.me:
            return self.config_arg
        if self.opts.config:
            sibling = Path(self.opts.config).parent / f"{host}.yaml"
            if sibling.exists():
                return str(sibling)
        return f"config/{host}.yaml"

    def up_cmd(self, host: str) -> str:
        return f"meshctl up --config {self.config_for(host)}"

    def addr(self, host: str) -> str:
        return self.cfg.hosts[host].address

    @staticmethod
    def addr_var(host: str) -> str:
        return f"{host.upper().replace('-', '_')}_ADDRESS"

    def rpc_where(self, agent: str) -> str:
        """host:port of the agent's rpc endpoint."""
        return self.cfg.endpoint(agent, "rpc").removeprefix("tcp://")

    def key_fix(self) -> str:
        return (f"`meshctl keys list` on both hosts; make missing keys with `meshctl keys generate HOST` on that host "
                f"and copy keys/public/*.key to both hosts' {self.cfg.security.keys_dir}/public/, then restart "
                f"both meshes")

    def client(self, agent: str, timeout: float | None = None) -> RpcClient:
        return client(self.cfg, agent, timeout=timeout or self.timeout, retries=0, sender=SENDER, host=self.me)

    def curve_keys(self, server_host: str) -> tuple[bytes, bytes, bytes] | None:
        """(public, secret, server key) for a socket to `server_host`; None without an identity here.
        MissingKey when this host has no public key of `server_host`."""
        if self.identity is None:
            return None
        return self.identity.public, self.identity.secret, self.identity.server_key(server_host)
