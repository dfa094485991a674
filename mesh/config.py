"""Mesh configuration: one pydantic model for every YAML file in config/.

A file describes the whole mesh (hosts, container groups, agents, stores, security) and,
optionally, which host it runs as (`host:`). `extends: other.yaml` merges another file
underneath, so mainpc.yaml and pc2.yaml share one mesh description. Strings may use
`${VAR}` or `${VAR:-default}` to take values (host addresses, say) from the environment; where VAR is
not set and VAR_FILE is, the contents of that file (how `podman_build.sh deploy` passes secrets: the
dashboard token and the database URLs as Podman secret files, never in the container's environment).

Every problem is reported with the file, the field path and what to do about it.

Ports: every port the mesh binds on a host is reserved, per host, before any is assigned: explicit
`endpoints:` and the ports an agent's kind declares besides its endpoints (its settings model's
`extra_ports(mesh)`, see `mesh.runtime.AgentSettings`: the twin's dashboard). Two users of one port on
one host are a problem naming both; endpoints left out get the next port from `base_port` that nobody uses.

Pools: an agent with `replicas:` (a count, or a mapping host -> count) is expanded at load into agents NAME-1 ...
NAME-N, each with its own ports, heartbeat and status line; `depends_on: [NAME]` is met when `min_ready` of them
are ready, and a setting that names the pool (AgentRef) keeps its name (`replicas_of` gives the replicas).
"""

from __future__ import annotations

import copy
import importlib
import ipaddress
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_core import PydanticCustomError

from mesh.kinds import UnknownKind, may_declare_ports, target_of
from network.codec import DEFAULT_MAX_FRAME_BYTES
from network.security import generate_command, public_path, secret_path

NAME = r"^[a-z][a-z0-9_-]{0,62}$"
ENDPOINTS = ("rpc", "pub", "metrics")   # every agent's ports; a kind's settings may declare more (extra_ports)
TWIN_KIND = "digital_twin"
MAX_CONFIG_BYTES = 1 << 20      # a mesh config is a few kB; PyYAML reads about 100 kB/s, so this bounds a load
MAX_CONFIG_VALUES = 200_000     # values after YAML aliases are expanded (an alias bomb grows exponentially)


class ConfigError(Exception):
    """One or more problems in a config file, each with its field path and a fix."""

    def __init__(self, file: str | Path, problems: list[tuple[str, str, str]]):
        self.file = str(file)
        self.problems = problems
        lines = [f"{self.file}: {len(problems)} problem(s)"] if len(problems) > 1 else []
        for path, message, fix in problems:
            lines.append(f"{self.file}: {path or '<top>'}: {message}" + (f"\n    fix: {fix}" if fix else ""))
        super().__init__("\n".join(lines))


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MeshSettings(_Model):
    name: str = Field("mesh", description="Name shown by meshctl status and in start-up lines")
    port_offset: int = Field(0, ge=0, le=50000, description="Added to every port, so two meshes can share a host")
    base_port: int = Field(7100, ge=1024, le=65000, description="First port handed out to agents without explicit endpoints")
    heartbeat_interval_s: float = Field(1.0, gt=0, le=60)
    dead_after_missed: int = Field(3, ge=1, le=100, description="Missed heartbeats before the twin marks an agent dead")
    max_frame_bytes: int = Field(DEFAULT_MAX_FRAME_BYTES, ge=1024, le=256 << 20)
    request_timeout_s: float = Field(2.0, gt=0, le=300)
    request_retries: int = Field(2, ge=0, le=20)
    drain_timeout_s: float = Field(10.0, gt=0, le=600)
    data_dir: Path = Field(Path("data"), description="Logs, stores and checkpoints (relative to the working directory)")


class Host(_Model):
    address: str = Field(..., description="Address peers use to reach this host")
    bind: str | None = Field(None, description="Address to bind on (default: the address); 0.0.0.0 inside containers")
    profile: Literal["auto", "gpu", "cpu", "small"] = Field(
        "auto", description="Hardware profile of the models run here: gpu (torch on CUDA), cpu (int8 OpenVINO), small "
        "(cpu, fewer chunks per document); auto: gpu where CUDA is available, else cpu")

    @property
    def bind_address(self) -> str:
        return self.bind or self.address


class Group(_Model):
    host: str
    agents: list[str]
    gpu: bool = False


class Endpoints(_Model):
    rpc: int | None = Field(None, ge=1, le=65535)
    pub: int | None = Field(None, ge=1, le=65535)
    metrics: int | None = Field(None, ge=1, le=65535)


class AgentSpec(_Model):
    kind: str
    depends_on: list[str] = Field(default_factory=list)
    required: bool = Field(True, description="false: never blocks others' start-up; its failure degrades the mesh")
    endpoints: Endpoints = Field(default_factory=Endpoints)
    settings: dict[str, Any] = Field(default_factory=dict)
    replicas: int | dict[str, int] | None = Field(None, description=(
        "Run as a pool of this many agents NAME-1, NAME-2, ...: a count (all on the host of the group that lists "
        "the pool) or a mapping host -> count (numbered in the mapping's order)"))
    min_ready: int | None = Field(None, description="A pool's replicas that must be ready for depends_on on the pool "
                                  "to be met (default 1)")

    @field_validator("replicas", mode="before")
    @classmethod
    def _no_boolean_count(cls, v: Any) -> Any:
        # `replicas: yes` would otherwise be read as 1
        if isinstance(v, bool):
            raise PydanticCustomError("replicas", "must be a count or a mapping host -> count, not a boolean",
                                      {"fix": "write replicas: 2, or replicas: {mainpc: 1, pc2: 1}"})
        return v


class Pool(_Model):
    """An agent declared with `replicas:`, as the config expanded it: its replicas are ordinary agents (their own
    ports, heartbeats and status lines); depends_on on the pool is met when `min_ready` of them are ready."""

    kind: str
    replicas: list[str]                 # replica names, numbered in placement order: NAME-1, NAME-2, ...
    placement: dict[str, int]           # host -> how many replicas run there, as declared
    min_ready: int
    required: bool


class Security(_Model):
    curve: Literal["auto", "on", "off"] = Field("auto", description=(
        "on: CURVE always; agents refuse to start without this host's secret key in keys_dir. auto: CURVE when "
        "that key is there, and required (as `on`) wherever the host binds a non-loopback address; plaintext "
        "only on loopback (127.0.0.0/8, ::1, localhost). off: plaintext always, with a loud warning at start "
        "when the host binds a non-loopback address"))
    keys_dir: Path = Path("keys")

    @field_validator("curve", mode="before")
    @classmethod
    def _yaml_booleans(cls, v: Any) -> Any:
        # YAML 1.1 reads a bare `off`/`on` as a boolean
        return {False: "off", True: "on"}.get(v, v) if isinstance(v, bool) else v


class Stores(_Model):
    """Where the pipeline keeps its state. Relative SQLite paths and raw_dir are under mesh.data_dir."""

    documents: str = Field("sqlite:///documents.db", description="document store: sqlite:///PATH or postgresql://...")
    frontier: str = Field("sqlite:///frontier.db", description="crawl frontier: sqlite:///PATH or redis://HOST:PORT/DB")
    frontier_prefix: str = Field("frontier", description="Redis key prefix, so two crawls can share a database")
    raw_dir: Path = Field(Path("raw"), description="content-addressed fetched bodies and their fetch records")
    cache: str | None = Field(None, description="the curiosity agent's hot cache: redis://HOST:PORT/DB; none: in its "
                              "process (its own cache_url setting, when given, wins)")

    @field_validator("documents")
    @classmethod
    def _documents_scheme(cls, v: str) -> str:
        if not v.startswith(("sqlite:///", "postgresql://", "postgres://")):
            raise ValueError("must start with sqlite:/// or postgresql://")
        return v

    @field_validator("frontier")
    @classmethod
    def _frontier_scheme(cls, v: str) -> str:
        if not v.startswith(("sqlite:///", "redis://", "rediss://")):
            raise ValueError("must start with sqlite:/// or redis://")
        return v

    @field_validator("cache")
    @classmethod
    def _cache_scheme(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis:// (or be left out for the in-process cache)")
        return v


class MeshConfig(_Model):
    host: str | None = Field(None, description="The host this file runs as; may be left out when there is one host")
    mesh: MeshSettings = Field(default_factory=MeshSettings)
    hosts: dict[str, Host]
    groups: dict[str, Group]
    agents: dict[str, AgentSpec]
    security: Security = Field(default_factory=Security)
    stores: Stores = Field(default_factory=Stores)

    _source: str = PrivateAttr("<memory>")
    _group_of: dict[str, str] = PrivateAttr(default_factory=dict)
    _targets: dict[str, str | None] = PrivateAttr(default_factory=dict)   # agent -> its kind's module:Class
    _extra_ports: dict[str, dict[str, int]] = PrivateAttr(default_factory=dict)  # agent -> name -> port (no offset)
    _pools: dict[str, Pool] = PrivateAttr(default_factory=dict)   # pool name -> its replicas (agents: declared)
    _pool_of: dict[str, str] = PrivateAttr(default_factory=dict)  # replica -> its pool

    @property
    def source(self) -> str:
        """Where this config was read from."""
        return self._source

    # --- derived views (computed once in finish()) ---

    def finish(self) -> MeshConfig:
        """Expands pools into their replicas, assigns ports to agents that declared none and checks what a schema
        cannot. Imports the modules of the kinds that may declare ports of their own (`extra_ports` of their
        settings: the twin, plug-ins). A pool's problems are reported alone: the rest of the file is checked
        against its replicas, which do not exist until the pool is right."""
        problems = _expand_pools(self)
        if problems:
            raise ConfigError(self.source, problems)
        self._targets = {a: _target_or_none(spec.kind) for a, spec in self.agents.items()}
        self._group_of = {a: g for g, grp in self.groups.items() for a in grp.agents}   # settings may ask host_of
        problems = _check(self)
        if problems:
            raise ConfigError(self.source, problems)
        return self

    @property
    def this_host(self) -> str:
        if self.host:
            return self.host
        if len(self.hosts) == 1:
            return next(iter(self.hosts))
        raise ConfigError(self.source, [("host", "this file declares several hosts but not which one it runs as",
                                         "add `host: NAME` or pass --host NAME")])

    # --- pools ---

    @property
    def pools(self) -> dict[str, Pool]:
        """Pool name -> the pool (its replicas, placement and min_ready), in declaration order."""
        return self._pools

    def pool_of(self, agent: str) -> str | None:
        """The pool `agent` is a replica of, or None for an agent declared on its own."""
        return self._pool_of.get(agent)

    def replicas_of(self, name: str) -> list[str]:
        """The agents behind a name that depends_on or a setting may use: a pool's replicas, or the agent itself."""
        pool = self._pools.get(name)
        return list(pool.replicas) if pool is not None else [name]

    def min_ready_of(self, name: str) -> int:
        """How many of `replicas_of(name)` must be ready for depends_on on `name` to be met: a pool's min_ready, 1
        for an agent."""
        pool = self._pools.get(name)
        return pool.min_ready if pool is not None else 1

    def is_required(self, name: str) -> bool:
        """Whether depends_on on `name` (an agent or a pool) holds its dependents back until it is met."""
        pool = self._pools.get(name)
        return pool.required if pool is not None else self.agents[name].required

    def dependency_agents(self, agent: str) -> list[str]:
        """The agents `agent` depends on, each pool in its depends_on replaced by the pool's replicas."""
        return [a for dep in self.agents[agent].depends_on for a in self.replicas_of(dep)]

    def group_of(self, agent: str) -> str:
        return self._group_of[agent]

    def host_of(self, agent: str) -> str:
        return self.groups[self._group_of[agent]].host

    def agents_on(self, host: str) -> list[str]:
        return [a for a in self.agents if self.host_of(a) == host]

    @property
    def twin(self) -> str:
        return self.agent_of_kind(TWIN_KIND)

    def agents_of_kind(self, kind: str) -> list[str]:
        """The agents of `kind`, however each is named in the file (built-in name, plug-in name or dotted path)."""
        try:
            want = target_of(kind)
        except UnknownKind:
            return []
        return [a for a, target in self._targets.items() if target == want]

    def agent_of_kind(self, kind: str) -> str | None:
        """The agent of `kind` (the first one declared, when there are several), or None."""
        return next(iter(self.agents_of_kind(kind)), None)

    def is_kind(self, agent: str, kind: str) -> bool:
        return agent in self.agents_of_kind(kind)

    def settings_of(self, agent: str, model: type[BaseModel]) -> Any:
        """`agents.<agent>.settings` validated by `model`; settings that name another agent (`AgentRef`) are
        checked against this config. ConfigError with each problem's path."""
        try:
            return model.model_validate(self.agents[agent].settings, context={"config": self, "agent": agent})
        except ValidationError as exc:
            raise ConfigError(self.source, [(f"agents.{agent}.settings.{p}", m, f)
                                            for p, m, f in _pydantic_problems(exc)]) from None

    def port(self, agent: str, which: str) -> int:
        """`which`: rpc, pub, metrics, or a port the agent's kind declares (`extra_ports`: the twin's dashboard);
        mesh.port_offset included."""
        extra = self._extra_ports.get(agent, {})
        port = extra[which] if which in extra else getattr(self.agents[agent].endpoints, which)
        return port + self.mesh.port_offset

    def ports(self, agent: str) -> dict[str, int]:
        """Every port `agent` binds, by name: rpc, pub, metrics, then those its kind declares; offset included."""
        return {which: self.port(agent, which) for which in (*ENDPOINTS, *self._extra_ports.get(agent, {}))}

    def endpoint(self, agent: str, which: Literal["rpc", "pub"] = "rpc") -> str:
        return f"tcp://{self.hosts[self.host_of(agent)].address}:{self.port(agent, which)}"

    def bind_endpoint(self, agent: str, which: Literal["rpc", "pub"] = "rpc") -> str:
        return f"tcp://{self.hosts[self.host_of(agent)].bind_address}:{self.port(agent, which)}"

    def curve_enabled(self, host: str) -> bool:
        """Whether `host` speaks CURVE: with `on`; with `auto` when its secret key is here or it binds a
        non-loopback address (the key is then required: `check_curve`); never with `off`."""
        if self.security.curve == "off":
            return False
        if self.security.curve == "on":
            return True
        return secret_path(self.security.keys_dir, host).exists() or not is_loopback(self.hosts[host].bind_address)

    def check_curve(self, host: str) -> None:
        """ConfigError when `host`'s agents must not start: CURVE is on for it (`on`, or `auto` with a non-loopback
        bind) but its secret key is not in keys_dir. `meshctl up` and `meshctl check` ask before anything binds,
        and so does every agent, so that a mesh never comes up in plaintext by accident."""
        keys_dir = self.security.keys_dir
        sec = secret_path(keys_dir, host)
        if not self.curve_enabled(host) or sec.exists():
            return
        bind = self.hosts[host].bind_address
        why = ("CURVE is on" if self.security.curve == "on" else
               f"host {host} binds {bind}, reachable from the network, so CURVE is required (auto)")
        where = "" if Path(keys_dir).is_absolute() else f" (keys dir {Path(keys_dir).resolve()})"
        others = [h for h in self.hosts if h != host]
        copy = (f", then copy {public_path(keys_dir, host)} to the keys/public/ of {', '.join(others)} and theirs "
                f"to {keys_dir / 'public'}/ here" if others else "")
        raise ConfigError(self.source, [(
            "security.curve", f"{why} but this host's secret key {sec} is missing",
            f"run `{generate_command(keys_dir, host)}` on {host}{where}{copy}; "
            f"or, to run in plaintext where anyone on the network can talk to the agents, set security.curve: off")])

    def plaintext_warning(self, host: str) -> str | None:
        """The line `meshctl up` warns with when `curve: off` leaves `host`'s agents open to the network."""
        bind = self.hosts[host].bind_address
        if self.security.curve != "off" or is_loopback(bind):
            return None
        return (f"CURVE is off (security.curve: off): host {host}'s agents listen on {bind} in plaintext, so anyone "
                f"on the network can talk to the agents")

    def store_url(self, which: Literal["documents", "frontier"]) -> str:
        """The store's URL with a relative SQLite path placed under mesh.data_dir."""
        url = getattr(self.stores, which)
        if url.startswith("sqlite:///"):
            path = Path(url[len("sqlite:///"):])
            if not path.is_absolute():
                return f"sqlite:///{self.mesh.data_dir / path}"
        return url

    @property
    def raw_dir(self) -> Path:
        return self.stores.raw_dir if self.stores.raw_dir.is_absolute() else self.mesh.data_dir / self.stores.raw_dir

    def start_order(self) -> list[list[str]]:
        """Agents in dependency levels: each level depends only on earlier ones. An agent that depends on a pool
        comes after every replica of it (the replicas start together; the twin's gate waits for min_ready)."""
        return _levels(_graph(self))


def is_loopback(address: str) -> bool:
    """Whether an address bound to is reachable from this machine only: 127.0.0.0/8, ::1 or localhost. Anything
    else (0.0.0.0, `*`, a LAN address, a name, an interface) counts as reachable from the network."""
    if address.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(address.strip("[]")).is_loopback
    except ValueError:
        return False


def _target_or_none(kind: str) -> str | None:
    try:
        return target_of(kind)
    except UnknownKind:
        return None


def _agent_ref(kind: str | None, auto: bool):
    def check(value: str | None, info: ValidationInfo) -> str | None:
        config = (info.context or {}).get("config")
        if config is None or value is None or (auto and value == "auto"):
            return value
        if value in config.pools:   # a pool stands for its replicas: of its kind (the agent asks replicas_of)
            first = config.pools[value].replicas[0]
            if kind is not None and not config.is_kind(first, kind):
                raise PydanticCustomError("agent_ref", "'{name}' is a pool of {actual} agents, not of {kind}", {
                    "name": value, "actual": config.pools[value].kind, "kind": kind,
                    "fix": f"name one of {config.agents_of_kind(kind)}"})
            return value
        if value not in config.agents:
            of = config.agents_of_kind(kind) if kind else sorted(config.agents)
            raise PydanticCustomError("agent_ref", "no agent named '{name}'", {
                "name": value, "fix": f"name one of {of}" if of else f"add an agent of kind {kind}"})
        if kind is not None and not config.is_kind(value, kind):
            raise PydanticCustomError("agent_ref", "'{name}' is a {actual} agent, not a {kind}", {
                "name": value, "actual": config.agents[value].kind, "kind": kind,
                "fix": f"name one of {config.agents_of_kind(kind)}"})
        return value
    return AfterValidator(check)


def AgentRef(kind: str | None = None, *, auto: bool = False) -> Any:
    """The type of a setting that names another agent of the mesh (of `kind`, when given), checked against the
    config when the agent's settings are validated (`MeshConfig.settings_of`). `auto`: the word "auto" is
    allowed too (the agent then asks `agent_of_kind`). A pool's name is allowed where its kind is: the setting
    keeps the pool's name, `Agent.subscribe` listens to every replica and `Agent.peer` asks the first one
    (`MeshConfig.replicas_of` gives them all)."""
    return Annotated[str, _agent_ref(kind, auto)]


def _graph(cfg: MeshConfig) -> dict[str, list[str]]:
    """agent -> the agents it depends on (pools expanded), leaving out itself and its own pool (_check reports
    those) and names that are not declared."""
    graph: dict[str, list[str]] = {}
    for agent, spec in cfg.agents.items():
        own = (agent, cfg.pool_of(agent))
        graph[agent] = [d for dep in spec.depends_on if dep not in own
                        for d in cfg.replicas_of(dep) if d in cfg.agents]
    return graph


def _levels(graph: dict[str, list[str]]) -> list[list[str]]:
    remaining = {a: set(deps) for a, deps in graph.items()}
    done: set[str] = set()
    levels: list[list[str]] = []
    while remaining:
        level = [a for a, deps in remaining.items() if deps <= done]
        if not level:
            break  # a cycle; _check reports it
        levels.append(level)
        done.update(level)
        for a in level:
            del remaining[a]
    return levels


def _find_cycle(graph: dict[str, list[str]]) -> list[str] | None:
    color: dict[str, int] = {}
    stack: list[str] = []

    def visit(a: str) -> list[str] | None:
        color[a] = 1
        stack.append(a)
        for d in graph[a]:
            if color.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in color:
                found = visit(d)
                if found:
                    return found
        stack.pop()
        color[a] = 2
        return None

    for a in graph:
        if a not in color:
            found = visit(a)
            if found:
                return found
    return None


def _expand_pools(cfg: MeshConfig) -> list[tuple[str, str, str]]:
    """Replaces every agent declared with `replicas:` (a pool) by its replicas NAME-1..NAME-N, ordinary agents with
    the pool's kind, settings, depends_on and required, and records the pool (`cfg.pools`). Numbering follows the
    placement's order (a mapping's as written), so names are the same at every load and on every host.

    Placement: a count puts every replica on the host of the one group that lists the pool; a mapping host ->
    count puts that many on each host. A group that lists the pool gets the replicas placed on its host (in place
    of the pool's name); a host given replicas where no group lists the pool gets a group of its own,
    `<first group listing the pool>-<host>` (with that group's `gpu`). A pool's endpoints are assigned (each
    replica its own), so `endpoints:` on a pool is an error. Returns the problems; the config is changed only when
    there are none. Idempotent: a config already expanded has no `replicas:` left and keeps its pools."""
    problems: list[tuple[str, str, str]] = []
    for name, spec in cfg.agents.items():
        if spec.replicas is None and spec.min_ready is not None:
            problems.append((f"agents.{name}.min_ready", "min_ready is for a pool, and this agent has no replicas:",
                             "remove min_ready, or add replicas: N to run it as a pool"))
    declared = {name: spec for name, spec in cfg.agents.items() if spec.replicas is not None}
    if not declared:
        return problems
    twin = _target_or_none(TWIN_KIND)
    listed: dict[str, list[str]] = {name: [] for name in declared}   # pool -> the groups that list it
    for gname, group in cfg.groups.items():
        for agent in group.agents:
            if agent in listed:
                if gname in listed[agent]:
                    problems.append((f"groups.{gname}.agents", f"pool {agent!r} is listed twice",
                                     "list it once; its replicas on this group's host all run here"))
                else:
                    listed[agent].append(gname)
    plans: dict[str, tuple[Pool, dict[str, str]]] = {}   # pool -> (pool, host -> group its replicas run in)
    taken = set(cfg.agents)
    for name, spec in declared.items():
        path = f"agents.{name}"
        bad = len(problems)
        groups = listed[name]
        hosts_listing = {cfg.groups[g].host for g in groups}
        if twin is not None and _target_or_none(spec.kind) == twin:
            problems.append((f"{path}.replicas", "the digital twin cannot be a pool", "remove replicas:; one twin "
                             "gates the whole mesh"))
        single = getattr(_settings_model(_target_or_none(spec.kind)), "single_agent", "")
        if single:
            problems.append((f"{path}.replicas", f"a {spec.kind} cannot be a pool: {single}",
                             "remove replicas: (one agent of this kind)"))
        if not groups:
            problems.append((path, f"pool {name!r} is in no group, so it has no host",
                             "list it under the agents: of a group (a mapping replicas: {host: count} places "
                             "replicas on other hosts too)"))
        if isinstance(spec.replicas, int):
            if len(groups) > 1:
                problems.append((f"{path}.replicas", f"with a count, a pool runs in one group; {name!r} is listed in "
                                 f"{', '.join(groups)}", "list it in one group, or give replicas: as a mapping "
                                 "host -> count"))
            placement = {cfg.groups[groups[0]].host: spec.replicas} if groups else {}
            counts = [(f"{path}.replicas", spec.replicas)]
        else:
            placement = dict(spec.replicas)
            counts = [(f"{path}.replicas.{host}", n) for host, n in placement.items()]
            for host in placement:
                if host not in cfg.hosts:
                    problems.append((f"{path}.replicas.{host}", f"host {host!r} is not declared",
                                     f"place replicas on declared hosts: {sorted(cfg.hosts)}"))
        negative = [where for where, n in counts if n < 0]
        for where, n in counts:
            if n < 0:
                problems.append((where, f"{n} replicas", "give a count of 0 or more"))
        total = sum(n for n in placement.values() if n > 0)
        if total == 0 and not negative and (groups or not isinstance(spec.replicas, int)):
            problems.append((f"{path}.replicas", "a pool of 0 replicas", "give it 1 replica or more (to stop "
                             "running it, remove it and what depends on it)"))
        min_ready = 1 if spec.min_ready is None else spec.min_ready
        if total > 0 and not 1 <= min_ready <= total:
            problems.append((f"{path}.min_ready", f"min_ready {min_ready} of a pool of {total} replica(s)",
                             f"give 1 to {total}: how many replicas must be ready for agents that depend on "
                             f"{name!r} to start"))
        given = [which for which in ENDPOINTS if getattr(spec.endpoints, which) is not None]
        if given:
            problems.append((f"{path}.endpoints", f"a pool's ports are assigned, each replica its own; "
                             f"{', '.join(given)} given", "remove endpoints: (`meshctl plan` shows the replicas' "
                             "ports), or declare the agents one by one to choose their ports"))
        replicas = [f"{name}-{i}" for i in range(1, total + 1)]
        if replicas and not re.match(NAME, replicas[-1]):
            problems.append((path, f"replica name {replicas[-1]!r} is too long", "shorten the pool's name: a "
                             "replica's name, NAME-N, has at most 63 characters"))
        clash = [r for r in replicas if r in taken]
        if clash:
            problems.append((path, f"replica name(s) {', '.join(clash)} of pool {name!r} are already agent or "
                             "replica names", "rename the pool or the agent: a pool's replicas are named "
                             f"{name}-1, {name}-2, ..."))
        taken.update(replicas)
        if len(problems) > bad:
            continue
        group_on: dict[str, str] = {}   # host -> the group its replicas run in
        for host in placement:
            here = [g for g in groups if cfg.groups[g].host == host]
            if len(here) > 1:
                problems.append((f"{path}.replicas", f"pool {name!r} is listed in {len(here)} groups on host "
                                 f"{host!r} ({', '.join(here)})", "list it in one group per host"))
            elif here:
                group_on[host] = here[0]
            elif placement[host] > 0:
                auto = f"{groups[0]}-{host}"
                if auto in cfg.groups:
                    problems.append((f"{path}.replicas.{host}", f"no group on host {host!r} lists pool {name!r}, "
                                     f"and group {auto!r}, where its replicas there would run, is already declared",
                                     f"list {name!r} in a group on {host}"))
                group_on[host] = auto
        plans[name] = (Pool(kind=spec.kind, replicas=replicas, placement=placement, min_ready=min_ready,
                            required=spec.required), group_on)
    if problems:
        return problems

    # all good: replace each pool by its replicas, in the agents and in the groups
    agents: dict[str, AgentSpec] = {}
    for name, spec in cfg.agents.items():
        if name not in plans:
            agents[name] = spec
            continue
        for replica in plans[name][0].replicas:
            agents[replica] = AgentSpec(kind=spec.kind, depends_on=list(spec.depends_on), required=spec.required,
                                        settings=copy.deepcopy(spec.settings))
    placed_in: dict[tuple[str, str], list[str]] = {}   # (pool, declared group) -> the replicas it runs
    auto_groups: dict[str, Group] = {}
    for name, (pool, group_on) in plans.items():
        numbered = iter(pool.replicas)
        for host, n in pool.placement.items():
            placed = [next(numbered) for _ in range(max(n, 0))]
            group = group_on.get(host)
            if group is None:
                continue
            if group in cfg.groups:
                placed_in[(name, group)] = placed
            else:
                auto = auto_groups.setdefault(group, Group(host=host, agents=[], gpu=cfg.groups[listed[name][0]].gpu))
                auto.agents.extend(placed)
    for gname, group in cfg.groups.items():
        group.agents = [a for agent in group.agents
                        for a in (placed_in.get((agent, gname), []) if agent in plans else [agent])]
    cfg.groups.update(auto_groups)
    cfg.agents = agents
    cfg._pools = {name: pool for name, (pool, _) in plans.items()}
    cfg._pool_of = {r: name for name, pool in cfg._pools.items() for r in pool.replicas}
    return []


def _check(cfg: MeshConfig) -> list[tuple[str, str, str]]:
    problems: list[tuple[str, str, str]] = []
    name_re = re.compile(NAME)
    for section in ("hosts", "groups", "agents"):
        for name in getattr(cfg, section):
            if not name_re.match(name):
                problems.append((f"{section}.{name}", f"name {name!r} is not allowed",
                                 "use lower-case letters, digits, '-' and '_', starting with a letter"))
    if cfg.host is not None and cfg.host not in cfg.hosts:
        problems.append(("host", f"host {cfg.host!r} is not declared under hosts:",
                         f"use one of {sorted(cfg.hosts)} or declare it"))

    placed: dict[str, str] = {}
    for gname, group in cfg.groups.items():
        if group.host not in cfg.hosts:
            problems.append((f"groups.{gname}.host", f"host {group.host!r} is not declared",
                             f"declare it under hosts: or use one of {sorted(cfg.hosts)}"))
        for i, agent in enumerate(group.agents):
            if agent not in cfg.agents:
                problems.append((f"groups.{gname}.agents[{i}]", f"agent {agent!r} is not declared",
                                 "declare it under agents: or remove it from the group"))
            elif agent in placed:
                problems.append((f"groups.{gname}.agents[{i}]", f"agent {agent!r} is already in group {placed[agent]!r}",
                                 "an agent runs in exactly one group; remove one of the two"))
            else:
                placed[agent] = gname
    for agent in cfg.agents:
        if agent not in placed:
            problems.append((f"agents.{agent}", f"agent {agent!r} is in no group, so it has no host",
                             "list it under the agents: of one group"))

    for agent, spec in cfg.agents.items():
        pool = cfg.pool_of(agent)
        if pool and agent != cfg.pools[pool].replicas[0]:
            continue    # the replicas share the pool's depends_on: said once, at the pool
        where = f"agents.{pool}" if pool else f"agents.{agent}"
        for i, dep in enumerate(spec.depends_on):
            if dep not in cfg.agents and dep not in cfg.pools:
                known = ", ".join(sorted([*cfg.agents, *cfg.pools]))
                problems.append((f"{where}.depends_on[{i}]", f"unknown agent {dep!r}",
                                 f"declare it or remove it from depends_on (declared: {known})"))
            elif dep in (agent, pool):
                problems.append((f"{where}.depends_on[{i}]", "an agent cannot depend on itself" if dep == agent
                                 else "a pool's replicas cannot depend on their own pool", "remove it from depends_on"))
    cycle = _find_cycle(_graph(cfg))
    if cycle and len(cycle) > 2:
        problems.append((f"agents.{cycle[0]}.depends_on", "dependency cycle: " + " -> ".join(cycle),
                         "remove one of these dependencies; start-up order must be a tree"))

    twins = cfg.agents_of_kind(TWIN_KIND)
    if len(twins) != 1:
        problems.append(("agents", f"expected exactly one agent of kind {TWIN_KIND!r}, found {len(twins)}",
                         "declare one digital twin; every other agent registers with it"))
    elif cfg.agents[twins[0]].depends_on:
        problems.append((f"agents.{twins[0]}.depends_on", "the digital twin cannot depend on other agents",
                         "remove its depends_on; it gates everyone else"))

    if not problems:
        _assign_ports(cfg, problems)
    return problems


def _settings_model(target: str | None) -> type[BaseModel] | None:
    """The settings model (`Settings`) of the kind at `target` ('module:Class'), or None when the module cannot be
    imported: `check_kinds` (meshctl check, meshctl up) reports that with its reason."""
    if target is None:
        return None
    module_name, _, attr = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception:   # an import error, or whatever the module raised: check_kinds says which
        return None
    model = getattr(getattr(module, attr, None), "Settings", None)
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _declared_ports(cfg: MeshConfig, agent: str, problems: list[tuple[str, str, str]]) -> dict[str, int]:
    """The ports `agent` binds besides its endpoints, as its kind's settings declare them (`extra_ports(mesh)`),
    before mesh.port_offset. Settings that do not validate declare none here: check_kinds reports them. Only kinds
    that may declare ports are imported (not the built-in ones that declare none: `mesh.kinds.DECLARE_PORTS`)."""
    target = cfg._targets.get(agent)
    model = _settings_model(target) if target is not None and may_declare_ports(target) else None
    declare = getattr(model, "extra_ports", None)
    if not callable(declare):
        return {}
    try:
        declared = cfg.settings_of(agent, model).extra_ports(cfg.mesh)
    except ConfigError:
        return {}
    ports: dict[str, int] = {}
    for name, port in dict(declared or {}).items():
        if not isinstance(name, str) or not re.match(NAME, name) or name in ENDPOINTS:
            problems.append((f"agents.{agent}.settings", f"kind {cfg.agents[agent].kind!r} declares a port named "
                             f"{name!r}", f"its settings' extra_ports must name ports like 'dashboard', not "
                             f"{ENDPOINTS}"))
        elif port is not None:
            if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
                problems.append((f"agents.{agent}.settings", f"the {name} port of {agent} is {port!r}, not a port",
                                 "set a port 1-65535"))
            else:
                ports[name] = port
    return ports


def _assign_ports(cfg: MeshConfig, problems: list[tuple[str, str, str]]) -> None:
    host_of = {a: cfg.groups[g].host for g, grp in cfg.groups.items() for a in grp.agents}
    taken: dict[tuple[str, int], str] = {}
    # reserved first, in declaration order: explicit endpoints, then the ports each agent's kind declares
    cfg._extra_ports = {}
    for agent, spec in cfg.agents.items():
        cfg._extra_ports[agent] = declared = _declared_ports(cfg, agent, problems)
        wanted = [(which, getattr(spec.endpoints, which), f"agents.{agent}.endpoints.{which}") for which in ENDPOINTS]
        wanted += [(name, port, f"agents.{agent}.settings") for name, port in declared.items()]
        for which, port, path in wanted:
            if port is None:
                continue
            key, user = (host_of[agent], port), f"{agent}.{which}"
            if key in taken:
                problems.append((path, f"port {port} on host {key[0]!r} is used by {taken[key]} and {user}",
                                 "give every port on a host one user: change one of the two (an endpoint, or the "
                                 "setting behind a port its kind declares), or leave endpoints out to have them "
                                 "assigned"))
            else:
                taken[key] = user
    # then every endpoint left out: per host, from base_port, the next port nobody uses; the agents declared one
    # by one first, then the pools' replicas, so that scaling a pool never moves another agent's ports
    next_port = {h: cfg.mesh.base_port for h in cfg.hosts}
    for agent in sorted(cfg.agents, key=lambda a: cfg.pool_of(a) is not None):
        spec = cfg.agents[agent]
        host = host_of[agent]
        for which in ENDPOINTS:
            if getattr(spec.endpoints, which) is None:
                while (host, next_port[host]) in taken:
                    next_port[host] += 1
                if next_port[host] > 65535:
                    problems.append((f"agents.{agent}.endpoints", "ran out of ports", "lower mesh.base_port"))
                    return
                taken[(host, next_port[host])] = f"{agent}.{which}"
                setattr(spec.endpoints, which, next_port[host])
    if taken:
        (host, top), user = max(taken.items(), key=lambda item: item[0][1])
        if top + cfg.mesh.port_offset > 65535:
            problems.append(("mesh.port_offset", f"offset {cfg.mesh.port_offset} pushes port {top} ({user} on host "
                             f"{host!r}) past 65535", "use a smaller port_offset, or lower the highest ports"))


# --- loading -----------------------------------------------------------------------------------

_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class _TooManyValues(Exception):
    pass


def _interpolate(value: Any, env: Mapping[str, str], path: str, problems: list, budget: list[int] | None = None) -> Any:
    budget = [MAX_CONFIG_VALUES] if budget is None else budget
    budget[0] -= 1
    if budget[0] < 0:
        raise _TooManyValues
    if isinstance(value, str):
        def sub(m: re.Match) -> str:
            var, default = m.group(1), m.group(2)
            if env.get(var) or (var in env and default is None):
                return env[var]
            if env.get(f"{var}_FILE"):   # a secret given as a file (Podman and Kubernetes secrets)
                try:
                    return Path(env[f"{var}_FILE"]).read_text().removesuffix("\n")
                except (OSError, UnicodeDecodeError) as exc:
                    problems.append((path, f"cannot read {var}_FILE ({env[f'{var}_FILE']}): {exc}",
                                     f"make {env[f'{var}_FILE']} readable by this user, or set {var} instead"))
                    return ""
            if default is not None:
                return default
            problems.append((path, f"environment variable {var} is not set", f"export {var}=... or write ${{{var}:-default}}"))
            return ""
        out = _ENV.sub(sub, value)
        if "${" in _ENV.sub("", value):
            problems.append((path, f"{value!r} has a `${{` that is not a complete ${{VAR}} or ${{VAR:-default}}",
                             "close it with `}`; a variable name is letters, digits and _"))
        return out
    if isinstance(value, dict):
        return {k: _interpolate(v, env, f"{path}.{k}" if path else str(k), problems, budget) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, env, f"{path}[{i}]", problems, budget) for i, v in enumerate(value)]
    return value


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class _Loader(yaml.SafeLoader):
    """safe_load, except that a key given twice in one mapping is an error (PyYAML keeps the last one
    silently: a second `agents:` would drop every agent of the first)."""

    def compose_mapping_node(self, anchor: str | None) -> yaml.MappingNode:
        node = super().compose_mapping_node(anchor)   # checked as written, before `<<` merges are applied
        first: dict[tuple[str, str], int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = (key_node.tag, key_node.value)
            if key in first:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key_node.value!r} (first on line "
                                                        f"{first[key] + 1})", key_node.start_mark)
            first[key] = key_node.start_mark.line
        return node


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    if path in seen:
        raise ConfigError(path, [("extends", "files extend each other in a loop: " + " -> ".join(map(str, seen + (path,))), "break the loop")])
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(path, [("", "file not found", "check the path, or pass --config")]) from None
    except OSError as exc:
        raise ConfigError(path, [("", f"cannot read: {exc.strerror}", "check the file's permissions")]) from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(path, [("", f"file is larger than {MAX_CONFIG_BYTES} bytes: not a mesh config",
                                  "check the path; a mesh config is a few kB")])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ConfigError(path, [(f"line {line}, column {column}",
                                  f"not UTF-8 text: byte 0x{raw[exc.start]:02x} cannot be decoded",
                                  "save the file as UTF-8 (is it a config file at all?)")]) from None
    try:
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        if isinstance(exc, yaml.reader.ReaderError):
            line = text.count("\n", 0, exc.position) + 1
            where = f"line {line}, column {exc.position - (text.rfind(chr(10), 0, exc.position) + 1) + 1}"
            if isinstance(exc.character, int):
                problem = f"character {exc.character:#06x} is not allowed in YAML"
        raise ConfigError(path, [(where, f"not valid YAML: {problem}", "fix the syntax at that position")]) from None
    except RecursionError:
        raise ConfigError(path, [("", "not valid YAML: nested too deeply to read", "a mesh config nests a few levels; "
                                  "check the file")]) from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(path, [("", f"expected a mapping at the top, found {type(data).__name__}", "start with `hosts:`, `groups:`, `agents:`")])
    parent = data.pop("extends", None)
    if parent is not None:
        if not isinstance(parent, str):
            raise ConfigError(path, [("extends", "must be a file name", "write extends: mesh.yaml")])
        data = _merge(_read_yaml((path.parent / parent).resolve(), seen + (path,)), data)
    return data


def _pydantic_problems(exc: ValidationError) -> list[tuple[str, str, str]]:
    problems = []
    for err in exc.errors():
        path = ""
        for part in err["loc"]:
            path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
        kind = err["type"]
        if "fix" in err.get("ctx", {}):
            fix = err["ctx"]["fix"]
        elif kind == "extra_forbidden":
            fix = "remove it, or check its spelling against docs/OPERATIONS.md"
        elif kind == "missing":
            fix = "add this field"
        else:
            given = err.get("input")
            if isinstance(given, (dict, list)):
                fix = f"got a {'mapping' if isinstance(given, dict) else 'list'}"
            else:
                fix = f"got {given!r}"
        problems.append((path, err["msg"], fix))
    return problems


def parse_config(data: dict, source: str = "<memory>", *, host: str | None = None,
                 environ: Mapping[str, str] | None = None) -> MeshConfig:
    """`environ` (default: this process's environment) fills the `${VAR}`s."""
    problems: list = []
    try:
        data = _interpolate(data, os.environ if environ is None else environ, "", problems)
    except _TooManyValues:
        raise ConfigError(source, [("", f"the file expands to more than {MAX_CONFIG_VALUES} values (YAML aliases "
                                    "repeating large nodes?)", "write the config out; a mesh config has a few hundred "
                                    "values")]) from None
    except RecursionError:
        raise ConfigError(source, [("", "nested too deeply", "a mesh config nests a few levels")]) from None
    if problems:
        raise ConfigError(source, problems)
    if host is not None:
        data["host"] = host
    try:
        cfg = MeshConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(source, _pydantic_problems(exc)) from None
    cfg._source = source
    return cfg.finish()


def load_config(path: str | Path, *, host: str | None = None, environ: Mapping[str, str] | None = None) -> MeshConfig:
    path = Path(path)
    return parse_config(_read_yaml(path.resolve()), str(path), host=host, environ=environ)
