"""The digital twin: every declared agent's health, and the start-up gate.

It knows every agent the config declares (state `declared` until it registers), follows each
through starting -> waiting -> ready, marks it dead after `dead_after_missed` heartbeats,
degraded while a required dependency is not ready, and publishes every change as
`twin.state`. Agents ask it `wait_ready`; it answers with the dependencies still missing.

The twin keeps its registry in memory: after a restart every running agent's next heartbeat
is answered `registered: false`, and the agent registers again with its current state.

It also raises alerts (`twin.alert`: an agent died or flaps, a host is unreachable, and each
recovery) and serves the health dashboard (agents/twin/dashboard.py) from what it holds: a snapshot
made on its own thread once a second and on every change, handed to the HTTP threads whole.
"""

from __future__ import annotations

import collections
import ipaddress
import os
import time
from dataclasses import dataclass, field

from pydantic import Field, model_validator

from agents.twin.dashboard import Dashboard
from mesh.config import MeshSettings
from mesh.messages import (
    AgentStats,
    AgentStatus,
    Alert,
    AlertKind,
    Deregister,
    Heartbeat,
    HeartbeatAck,
    HostChanged,
    HostState,
    HostStatus,
    ReadyStatus,
    Register,
    Registered,
    StateChanged,
    StatusReply,
    StatusRequest,
    VersionConflict,
    WaitReady,
)
from mesh.runtime import READY_STATES, Agent, AgentSettings, StartupError, handles
from network.codec import Envelope
from network.messages import Ack, AgentState, ErrorCode, versions
from network.rpc import MeshError

LIVE = (AgentState.STARTING, AgentState.WAITING, AgentState.READY, AgentState.DEGRADED, AgentState.DRAINING)
SILENT = (AgentState.DEAD, AgentState.UNREACHABLE)
# The states an agent may report: a register while it starts, waits or runs (again, after the twin restarted), a
# heartbeat only while it runs. The rest are the twin's to set (declared, dead, unreachable, and stopped on
# twin.deregister), or never shown (draining: a draining agent sends neither), so they are refused as invalid_body.
REGISTER_STATES = (AgentState.STARTING, AgentState.WAITING, *READY_STATES)
HEARTBEAT_STATES = READY_STATES


def _reported(msg: Register | Heartbeat, allowed: tuple[AgentState, ...]) -> AgentState:
    state = AgentState(msg.state)
    if state not in allowed:
        raise MeshError(ErrorCode.INVALID_BODY, f"{msg.type_name} body is invalid: state: {state.value!r} is not a "
                        f"state an agent reports in {msg.type_name} (one of {', '.join(a.value for a in allowed)})")
    return state


@dataclass
class Record:
    agent: str
    kind: str
    host: str
    group: str
    required: bool
    depends_on: list[str]
    state: AgentState = AgentState.DECLARED
    reported: AgentState = AgentState.DECLARED
    instance: str | None = None
    pid: int | None = None
    started_at: float | None = None
    last_seen: float | None = None
    restarts: int = 0
    waiting_on: list[str] = field(default_factory=list)
    stats: AgentStats = field(default_factory=AgentStats)
    detail: str = ""  # as the agent last reported it
    note: str = ""  # what status shows: the agent's detail, or why the twin sees it degraded
    kind_name: str = ""  # the kind the agent registered with (its class's name for a dotted `kind:` path)
    rate: float = 0.0  # messages a second (in + out), smoothed over heartbeats
    error_rate: float = 0.0
    last_count: tuple[float, int, int] | None = None  # (monotonic, messages, errors) at the last heartbeat
    since: float = field(default_factory=time.time)  # wall clock of the last state change
    troubles: collections.deque = field(default_factory=lambda: collections.deque(maxlen=32))  # deaths, restarts
    flap_alerted: float = 0.0
    loading_since: float | None = None  # monotonic: told "ready to start", running its on_ready (loading models)
    beat_at: float | None = None  # monotonic: the last heartbeat of this instance, for the gap between two of them
    max_gap: float = 0.0  # the longest such gap seen since the twin started (seconds): how near the deadline it came
    speaks: dict[str, int] = field(default_factory=dict)  # message type -> version, as its instance registered them
    conflicts: list[VersionConflict] = field(default_factory=list)  # types it cannot exchange with the rest


def _is_loopback(bind: str) -> bool:
    if bind == "localhost":
        return True
    try:
        return ipaddress.ip_address(bind).is_loopback
    except ValueError:
        return False


class TwinSettings(AgentSettings):
    dashboard: bool = Field(True, description="Serve the health dashboard over HTTP")
    dashboard_bind: str = Field("127.0.0.1", description="Address the dashboard listens on; not loopback: a token is needed")
    dashboard_port: int | None = Field(None, ge=1, le=65535,
                                       description="Default: mesh.base_port + 80 (7180), plus mesh.port_offset")
    dashboard_token: str = Field("", description="Bearer token (or ?token= once, then a cookie); "
                                                 "set it from the environment: ${MESH_DASHBOARD_TOKEN:-}")
    flap_count: int = Field(3, ge=2, description="Deaths or restarts within flap_window_s that make an agent flapping")
    flap_window_s: float = Field(300.0, gt=0)
    history_every_s: float = Field(5.0, gt=0, description="Pipeline figures kept for the dashboard's charts, this often")
    history_len: int = Field(720, ge=10, le=100000)
    alerts_kept: int = Field(100, ge=1, le=10000)
    loading_grace_s: float = Field(120.0, ge=0, description="How long an agent may be silent after it was told its "
                                   "dependencies are ready (its on_ready loads models on its own thread) before it "
                                   "counts as dead; a crash meanwhile is still seen at once by its restart")

    def extra_ports(self, mesh: MeshSettings) -> dict[str, int]:
        """The dashboard's port, reserved by the config on the twin's host (none with dashboard: false)."""
        return {"dashboard": self.dashboard_port or mesh.base_port + 80} if self.dashboard else {}

    @model_validator(mode="after")
    def _token_off_loopback(self) -> "TwinSettings":
        if self.dashboard and not _is_loopback(self.dashboard_bind) and len(self.dashboard_token) < 16:
            raise ValueError(f"the dashboard binds {self.dashboard_bind}, not loopback: set dashboard_token "
                             "(16 characters or more, e.g. dashboard_token: ${MESH_DASHBOARD_TOKEN}), "
                             "or bind 127.0.0.1 and use an SSH tunnel")
        return self


# Pipeline figures on the dashboard: (name, agent kind, gauge), summed over the agents of that kind.
PIPELINE = (
    ("frontier", "crawl_coordinator", "frontier_queued"),
    ("fetched", "crawl_coordinator", "fetched"),
    ("failed", "crawl_coordinator", "failed"),
    ("stored", "extractor", "pages"),
    ("extracted", "extractor", "extracted"),
    ("scored", "topic_model", "documents"),
    ("duplicates", "topic_model", "duplicates"),
    ("exact_duplicates", "topic_model", "exact_duplicates"),
    ("topics", "topic_model", "topics"),
    ("novelty_p10", "topic_model", "novelty_p10"),
    ("novelty_p50", "topic_model", "novelty_p50"),
    ("novelty_p90", "topic_model", "novelty_p90"),
    ("cache_items", "curiosity", "cache_items"),
)


class DigitalTwin(Agent):
    kind = "digital_twin"
    Settings = TwinSettings
    uses_twin = False
    dashboard: Dashboard | None = None   # also when start() failed before setup(): close() must still work

    def setup(self) -> None:
        cfg = self.config
        s = self.settings
        self.levels = {a: i for i, level in enumerate(cfg.start_order()) for a in level}
        self.alerts: collections.deque[Alert] = collections.deque(maxlen=s.alerts_kept)
        self.history: collections.deque[dict] = collections.deque(maxlen=s.history_len)
        self.dashboard = None
        self.host_back: dict[str, float] = {}   # monotonic time each host became reachable again
        self.records: dict[str, Record] = {
            name: Record(agent=name, kind=spec.kind, host=cfg.host_of(name), group=cfg.group_of(name),
                         required=spec.required, depends_on=list(spec.depends_on))
            for name, spec in cfg.agents.items()
        }
        self.dependents: dict[str, list[str]] = {name: [] for name in cfg.agents}
        for name in cfg.agents:
            for dep in cfg.dependency_agents(name):   # a pool's replicas: each of them moves its dependents
                self.dependents[dep].append(name)
        self.host_states: dict[str, HostState] = {
            h: HostState.LOCAL if h == self.host else HostState.UNKNOWN for h in cfg.hosts}
        me = self.records[self.name]
        me.instance, me.pid, me.started_at, me.last_seen = self.instance, os.getpid(), time.time(), time.monotonic()
        me.reported = me.state = AgentState.READY
        me.speaks = versions()
        self.state = AgentState.READY
        self.metrics.state.state(self.state)
        interval = cfg.mesh.heartbeat_interval_s
        self.dead_after = interval * cfg.mesh.dead_after_missed
        self.reactor.every(interval / 4, self._sweep)
        if s.dashboard:
            port = s.extra_ports(cfg.mesh)["dashboard"] + cfg.mesh.port_offset   # as the config reserved it
            try:
                self.dashboard = Dashboard(s.dashboard_bind, port, token=s.dashboard_token, log=self.log,
                                           history_len=s.history_len)
            except OSError as exc:
                raise StartupError(f"twin {self.name}: cannot serve the dashboard on {s.dashboard_bind}:{port}: {exc} "
                                   "(another mesh on this host? set mesh.port_offset, or agents.twin.settings."
                                   "dashboard_port, or dashboard: false)") from None
            self._snapshot_due = False
            self.reactor.every(1.0, self._snapshot)
            self.reactor.every(s.history_every_s, self._history_point)
            self._snapshot()
            self.log.info("dashboard on http://%s:%d/%s", s.dashboard_bind, port,
                          " (token needed)" if s.dashboard_token else "")
        self.log.info("twin up: %d agents declared, dead after %.1fs without a heartbeat", len(self.records), self.dead_after)

    def close(self) -> None:
        if self.dashboard is not None:
            self.dashboard.close()
            self.dashboard = None
        super().close()

    # --- handlers ------------------------------------------------------------------------------

    @handles(Register)
    def register(self, msg: Register, env: Envelope) -> Registered:
        rec = self._record(msg.agent)
        reported = _reported(msg, REGISTER_STATES)
        reason = "registered"
        if rec.instance is not None and rec.instance != msg.instance:
            rec.restarts += 1
            reason = f"restarted (restart {rec.restarts})"
            if rec.state not in SILENT:   # a death already counted it
                self._trouble(rec, reason)
        elif rec.instance == msg.instance:
            reason = "registered again"
        if msg.host != rec.host:
            self.log.warning("agent %s registered from host %s but the config places it on %s", msg.agent, msg.host, rec.host)
        if rec.instance != msg.instance:
            rec.started_at = time.time()
            rec.last_count, rec.rate, rec.error_rate = None, 0.0, 0.0
            rec.loading_since = rec.beat_at = None
        rec.instance, rec.pid, rec.last_seen = msg.instance, msg.pid, time.monotonic()
        rec.kind_name = msg.kind
        rec.reported = reported
        rec.speaks = dict(msg.speaks)
        self._compare_versions(rec)
        self._heard_from(rec.host)
        rec.waiting_on = self._waiting_on(rec)
        self._refresh(rec, reason)
        return Registered(waiting_on=rec.waiting_on, heartbeat_interval_s=self.config.mesh.heartbeat_interval_s,
                          restarts=rec.restarts, conflicts=rec.conflicts)

    @handles(Heartbeat)
    def heartbeat(self, msg: Heartbeat, env: Envelope) -> HeartbeatAck:
        rec = self._record(msg.agent)
        reported = _reported(msg, HEARTBEAT_STATES)
        if rec.instance != msg.instance or rec.state == AgentState.STOPPED:
            return HeartbeatAck(registered=False)
        rec.last_seen = now = time.monotonic()
        self._gap(rec, now)
        rec.reported, rec.stats, rec.detail = reported, msg.stats, msg.detail
        rec.loading_since = None
        self._rates(rec, msg.stats)
        self._heard_from(rec.host)
        if rec.reported in READY_STATES:
            rec.waiting_on = []
        self._refresh(rec, "heartbeat after silence" if rec.state in SILENT else "heartbeat")
        return HeartbeatAck(registered=True)

    @handles(WaitReady)
    def wait_ready(self, msg: WaitReady, env: Envelope) -> ReadyStatus:
        rec = self._record(msg.agent)
        if msg.instance and msg.instance != rec.instance:
            return ReadyStatus(ready=False, waiting_on=self._waiting_on(rec), registered=False)
        if rec.instance is not None and rec.state not in (AgentState.STOPPED,):
            rec.last_seen = time.monotonic()
            self._heard_from(rec.host)
        waiting = self._waiting_on(rec)
        changed = waiting != rec.waiting_on
        rec.waiting_on = waiting
        if rec.reported in (AgentState.STARTING, AgentState.WAITING, *SILENT) and rec.instance is not None:
            rec.reported = AgentState.WAITING
            reason = "waiting on " + ", ".join(waiting) if waiting else "dependencies ready"
            if rec.state != AgentState.WAITING:
                self._refresh(rec, reason)
            elif changed:
                self._publish(rec, rec.state, reason)
        if not waiting and rec.instance is not None and rec.reported == AgentState.WAITING:
            rec.loading_since = time.monotonic()
        return ReadyStatus(ready=not waiting, waiting_on=waiting)

    @handles(Deregister)
    def deregister(self, msg: Deregister, env: Envelope) -> Ack:
        rec = self._record(msg.agent)
        if rec.instance == msg.instance:
            rec.reported, rec.last_seen = AgentState.STOPPED, None
            self._compare_versions(rec)   # what it spoke no longer conflicts with anyone
            self._refresh(rec, msg.reason or "deregistered")
        return Ack()

    @handles(StatusRequest)
    def status(self, msg: StatusRequest, env: Envelope) -> StatusReply:
        now = time.monotonic()
        agents = []
        for rec in self.records.values():
            if rec.agent == self.name:
                rec.last_seen = now
                rec.stats = AgentStats(messages_in=self.metrics.messages_in, messages_out=self.metrics.messages_out,
                                       errors=self.metrics.errors)
            live = rec.state in LIVE
            agents.append(AgentStatus(
                agent=rec.agent, kind=rec.kind, host=rec.host, group=rec.group, required=rec.required, state=rec.state,
                depends_on=rec.depends_on, waiting_on=rec.waiting_on if rec.state == AgentState.WAITING else [],
                last_heartbeat_age_s=None if rec.last_seen is None else round(now - rec.last_seen, 3),
                uptime_s=round(time.time() - rec.started_at, 1) if live and rec.started_at else None,
                restarts=rec.restarts, pid=rec.pid, stats=rec.stats, detail=self._detail(rec)))
        hosts = []
        for host, state in self.host_states.items():
            mine = [r for r in self.records.values() if r.host == host]
            hosts.append(HostStatus(host=host, address=self.config.hosts[host].address, state=state, agents=len(mine),
                                    ready=sum(r.state in READY_STATES for r in mine)))
        return StatusReply(mesh=self.config.mesh.name, mesh_state=self.mesh_state(),
                           twin_uptime_s=round(time.time() - self.started, 1), agents=agents, hosts=hosts)

    # --- schema versions -------------------------------------------------------------------------

    def _compare_versions(self, rec: Record) -> None:
        """What `rec` speaks against every other agent that registered what it speaks (the twin included, and the
        dead: they may come back; not the stopped): a type both know at different versions is a conflict, kept
        on both sides (each one's status shows it) and logged once for the registering agent."""
        before = {r.agent: r.conflicts for r in self.records.values()}
        for other in self.records.values():
            other.conflicts = self._conflicts_of(other)
        if rec.conflicts:
            self.log.warning("%s cannot exchange these message types with the rest of the mesh (versions differ): %s",
                             rec.agent, "; ".join(c.describe() for c in rec.conflicts))
        if any(r.conflicts != before[r.agent] for r in self.records.values()):
            self._snapshot_soon()

    def _conflicts_of(self, rec: Record) -> list[VersionConflict]:
        if not rec.speaks or rec.reported == AgentState.STOPPED:
            return []
        others = [r for r in self.records.values() if r is not rec and r.speaks and r.instance is not None
                  and r.reported != AgentState.STOPPED]
        out = []
        for type_name, version in sorted(rec.speaks.items()):
            peers = {r.agent: r.speaks[type_name] for r in others if r.speaks.get(type_name, version) != version}
            if peers:
                out.append(VersionConflict(message_type=type_name, version=version, peers=peers))
        return out

    def _detail(self, rec: Record) -> str:
        """What status shows of an agent: its version conflicts first, then its note."""
        if not rec.conflicts:
            return rec.note
        said = "version conflict: " + "; ".join(c.describe() for c in rec.conflicts)
        return f"{said}; {rec.note}" if rec.note else said

    # --- state -----------------------------------------------------------------------------------

    def mesh_state(self) -> str:
        required = [r for r in self.records.values() if r.required]
        if any(r.state in SILENT for r in required):
            return "failing"
        if not all(r.state in READY_STATES for r in required):
            return "starting"
        if all(r.state == AgentState.READY for r in self.records.values()):
            return "ready"
        return "degraded"

    def _record(self, agent: str) -> Record:
        rec = self.records.get(agent)
        if rec is None:
            raise MeshError(ErrorCode.UNKNOWN_AGENT, f"agent {agent!r} is not declared in {self.config.source}",
                            {"declared": sorted(self.records)})
        return rec

    def _met(self, dep: str) -> bool:
        """Whether depends_on on `dep` is met: the agent is ready, or min_ready of the pool's replicas are."""
        ready = sum(self.records[a].state in READY_STATES for a in self.config.replicas_of(dep))
        return ready >= self.config.min_ready_of(dep)

    def _waiting_on(self, rec: Record) -> list[str]:
        return [d for d in rec.depends_on if self.config.is_required(d) and not self._met(d)]

    def _effective(self, rec: Record) -> tuple[AgentState, str]:
        state = rec.reported
        if state in READY_STATES:
            down = [d for d in rec.depends_on if not self._met(d)]
            if down:
                return AgentState.DEGRADED, "dependency not ready: " + ", ".join(down)
        return state, rec.detail

    def _refresh(self, rec: Record, reason: str) -> None:
        state, detail = self._effective(rec)
        rec.note = detail
        if state == rec.state:
            return
        previous = rec.state
        rec.state = state
        if state == AgentState.DEGRADED and detail:
            reason = detail
        self._publish(rec, previous, reason)
        for dependent in self.dependents[rec.agent]:
            self._refresh(self.records[dependent], f"dependency {rec.agent} is {state}")

    def _publish(self, rec: Record, previous: AgentState, reason: str) -> None:
        if previous != rec.state:
            self.log.info("%s: %s -> %s (%s)", rec.agent, previous, rec.state, reason)
            rec.since = time.time()
            if rec.state == AgentState.DEAD:
                self._alert(AlertKind.AGENT_DEAD, "critical" if rec.required else "warning",
                            f"{rec.agent} is dead: {reason}", agent=rec.agent, host=rec.host)
                self._trouble(rec, "died")
            elif previous in SILENT and rec.state in LIVE:
                self._alert(AlertKind.AGENT_RECOVERED, "info", f"{rec.agent} is {rec.state} again ({reason})",
                            agent=rec.agent, host=rec.host)
            self._snapshot_soon()
        self.publish(StateChanged(agent=rec.agent, host=rec.host, previous=previous, state=rec.state,
                                  waiting_on=rec.waiting_on, restarts=rec.restarts, reason=reason))

    def _heard_from(self, host: str) -> None:
        if self.host_states[host] in (HostState.UNKNOWN, HostState.UNREACHABLE):
            self._set_host(host, HostState.REACHABLE, "an agent of it is heard again"
                           if self.host_states[host] == HostState.UNREACHABLE else "first agent registered")

    def _set_host(self, host: str, state: HostState, reason: str) -> None:
        previous = self.host_states[host]
        self.host_states[host] = state
        log = self.log.warning if state == HostState.UNREACHABLE else self.log.info
        log("host %s: %s -> %s (%s)", host, previous, state, reason)
        self.publish(HostChanged(host=host, previous=previous, state=state, reason=reason))
        if previous == HostState.UNREACHABLE:
            self.host_back[host] = time.monotonic()
        if state == HostState.UNREACHABLE:
            self._alert(AlertKind.HOST_UNREACHABLE, "critical", f"host {host} is unreachable: {reason}", host=host)
        elif previous == HostState.UNREACHABLE:
            self._alert(AlertKind.HOST_RECOVERED, "info", f"host {host} is reachable again ({reason})", host=host)
        self._snapshot_soon()

    def _gap(self, rec: Record, now: float) -> None:
        """Keeps the longest gap between two heartbeats of one instance, and says when one came late (past two
        thirds of the deadline): a near miss names the agent whose loop was blocked before a false alarm would."""
        if rec.beat_at is not None and rec.state not in SILENT:
            gap = now - rec.beat_at
            rec.max_gap = max(rec.max_gap, gap)
            if gap > 2 * self.dead_after / 3:
                self.log.warning("late heartbeat from %s: %.1fs after the one before (dead after %.1fs); its log names "
                                 "the step that blocked its loop, if one did", rec.agent, gap, self.dead_after)
        rec.beat_at = now

    def _sweep(self) -> None:
        """Silent agents are dead; when every agent of another host is silent at once, the host
        is unreachable (the link, not the agents, is the likely cause) and its agents say so.

        Whatever already waits on the twin's socket is handled first: heartbeats that arrived while the twin itself
        was busy or not scheduled (2 cores, a crawl, a test run) are not silence. A heartbeat counts from when the
        twin handled it, never before it arrived, so the twin's own delays cannot make an agent look dead; they can
        only postpone a verdict, by as long as they last."""
        if self.server is not None:
            self.server.on_readable()
        now = time.monotonic()
        silent_by_host: dict[str, list[Record]] = {}
        heard: set[str] = set()
        newest: dict[str, float] = {}    # per host: the last time any of its agents was heard
        for rec in self.records.values():
            if rec.agent == self.name or rec.last_seen is None:
                continue
            if rec.loading_since is not None and now - rec.loading_since <= self.settings.loading_grace_s:
                continue    # busy in on_ready (loading a model on its reactor thread): not heard, not dead yet
            newest[rec.host] = max(newest.get(rec.host, 0.0), rec.last_seen)
            if now - rec.last_seen <= self.dead_after:
                heard.add(rec.host)
            elif rec.state in LIVE or rec.state in SILENT:
                silent_by_host.setdefault(rec.host, []).append(rec)
        missed = self.config.mesh.dead_after_missed
        interval = self.config.mesh.heartbeat_interval_s
        for host, silent in silent_by_host.items():
            remote = host != self.host
            cut_off = remote and host not in heard
            if remote and not cut_off and now - newest[host] > 1.5 * interval:
                # its other agents are going quiet too: a link going down, not this agent dying; the next
                # sweeps say which (the host unreachable once all are silent, or this one dead)
                continue
            if cut_off and self.host_states[host] != HostState.UNREACHABLE:
                self._set_host(host, HostState.UNREACHABLE,
                               f"no agent of {host} ({self.config.hosts[host].address}) heard for {self.dead_after:.1f}s")
            for rec in silent:
                if (not cut_off and rec.reported == AgentState.UNREACHABLE
                        and now - self.host_back.get(host, -1e9) <= self.dead_after):
                    continue    # its host is back: give its heartbeat the time to arrive before calling it dead
                state = AgentState.UNREACHABLE if cut_off else AgentState.DEAD
                if rec.reported != state:
                    rec.reported = state
                    why = f"host {host} unreachable" if cut_off else f"no heartbeat for {now - rec.last_seen:.1f}s ({missed} missed)"
                    self._refresh(rec, why)

    # --- alerts, rates -------------------------------------------------------------------------

    def _alert(self, kind: AlertKind, severity: str, message: str, *, agent: str = "", host: str = "") -> None:
        alert = Alert(kind=kind, severity=severity, agent=agent, host=host, message=message, at=round(time.time(), 3))
        self.alerts.append(alert)
        (self.log.info if severity == "info" else self.log.warning)("alert %s: %s", kind, message)
        self.publish(alert)
        self._snapshot_soon()

    def _trouble(self, rec: Record, what: str) -> None:
        """A death or a restart: `flap_count` of them within `flap_window_s` make the agent flapping
        (one alert a window)."""
        now = time.monotonic()
        s = self.settings
        rec.troubles.append(now)
        recent = [t for t in rec.troubles if now - t <= s.flap_window_s]
        if len(recent) >= s.flap_count and now - rec.flap_alerted > s.flap_window_s:
            rec.flap_alerted = now
            self._alert(AlertKind.AGENT_FLAPPING, "warning",
                        f"{rec.agent} is flapping: {len(recent)} deaths or restarts in the last "
                        f"{s.flap_window_s:.0f}s (last: {what})", agent=rec.agent, host=rec.host)

    @staticmethod
    def _rates(rec: Record, stats: AgentStats) -> None:
        now = time.monotonic()
        total = stats.messages_in + stats.messages_out
        if rec.last_count is not None:
            t0, total0, errors0 = rec.last_count
            dt = now - t0
            if dt >= 0.2 and total >= total0 and stats.errors >= errors0:
                a = min(1.0, dt / 5.0)   # about a 5 s average
                rec.rate += a * ((total - total0) / dt - rec.rate)
                rec.error_rate += a * ((stats.errors - errors0) / dt - rec.error_rate)
            elif dt < 0.2:
                return
        rec.last_count = (now, total, stats.errors)

    # --- dashboard -----------------------------------------------------------------------------

    def _snapshot_soon(self) -> None:
        if self.dashboard is not None and not self._snapshot_due:
            self._snapshot_due = True
            self.reactor.call_later(0.05, self._snapshot)

    def _snapshot(self) -> None:
        self._snapshot_due = False
        if self.dashboard is not None:
            self.dashboard.update(self.snapshot())

    def _pipeline(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, kind, gauge in PIPELINE:
            values = [r.stats.gauges[gauge] for r in self.records.values()
                      if kind in (r.kind, r.kind_name) and gauge in r.stats.gauges and r.state in LIVE]
            if values:
                out[name] = max(values) if name.startswith("novelty") else sum(values)
        return out

    def _history_point(self) -> None:
        if self.dashboard is not None:
            point = {"t": round(time.time(), 1), **self._pipeline(),
                     "msgs_per_s": round(sum(r.rate for r in self.records.values() if r.state in LIVE), 2)}
            self.dashboard.add_history(point)

    def snapshot(self) -> dict:
        """Everything the dashboard shows, as plain JSON-able data."""
        now, wall = time.monotonic(), time.time()
        me = self.records[self.name]
        me.last_seen = now
        me.stats = AgentStats(messages_in=self.metrics.messages_in, messages_out=self.metrics.messages_out,
                              errors=self.metrics.errors,
                              gauges={"alerts": len(self.alerts), "dashboard_clients": self.dashboard.clients
                                      if self.dashboard is not None else 0})
        self._rates(me, me.stats)
        agents = []
        for rec in self.records.values():
            live = rec.state in LIVE
            agents.append({
                "agent": rec.agent, "kind": rec.kind, "host": rec.host, "group": rec.group, "required": rec.required,
                "pool": self.config.pool_of(rec.agent), "state": str(rec.state), "since": round(rec.since, 1),
                "level": self.levels.get(rec.agent, 0) + 1,
                "depends_on": rec.depends_on, "needs": self.config.dependency_agents(rec.agent),   # pools expanded
                "waiting_on": rec.waiting_on if rec.state == AgentState.WAITING else [],
                "heartbeat_age_s": None if rec.last_seen is None else round(now - rec.last_seen, 1),
                "heartbeat_max_gap_s": round(rec.max_gap, 3),
                "uptime_s": round(wall - rec.started_at) if live and rec.started_at else None,
                "restarts": rec.restarts, "pid": rec.pid,
                "msgs_per_s": round(rec.rate, 2) if live else 0.0,
                "errors": rec.stats.errors, "errors_per_s": round(rec.error_rate, 3) if live else 0.0,
                "detail": (f"starting up (on_ready) for {now - rec.loading_since:.0f}s" if rec.loading_since is not None
                           else self._detail(rec)), "gauges": rec.stats.gauges if live else {},
            })
        hosts = []
        for host, state in self.host_states.items():
            mine = [r for r in self.records.values() if r.host == host]
            hosts.append({"host": host, "address": self.config.hosts[host].address, "state": str(state),
                          "agents": len(mine), "ready": sum(r.state in READY_STATES for r in mine)})
        groups = [{"group": g, "host": grp.host, "gpu": grp.gpu, "agents": list(grp.agents)}
                  for g, grp in self.config.groups.items()]
        gpu: dict = {"gpus": [], "leases": {}, "waiting": 0, "agent": None}
        for rec in self.records.values():
            if "vram_optimizer" in (rec.kind, rec.kind_name) and rec.state in LIVE and rec.stats.gauges:
                g = rec.stats.gauges
                gpu["agent"] = rec.agent
                for i in range(8):
                    if f"gpu{i}_total_mb" in g:
                        gpu["gpus"].append({"index": i, "total_mb": g[f"gpu{i}_total_mb"],
                                            "used_mb": g.get(f"gpu{i}_used_mb", 0),
                                            "leased_mb": g.get(f"gpu{i}_leased_mb", 0)})
                gpu["leases"] = {k.split(":", 1)[1]: v for k, v in g.items() if k.startswith("lease_mb:")}
                gpu["waiting"] = g.get("waiting", 0)
        return {
            "mesh": self.config.mesh.name, "mesh_state": self.mesh_state(), "twin": self.name,
            "twin_uptime_s": round(wall - self.started), "at": round(wall, 3),
            "heartbeat_interval_s": self.config.mesh.heartbeat_interval_s, "dead_after_s": self.dead_after,
            "hosts": hosts, "groups": groups, "agents": agents, "order": self.config.start_order(),
            "alerts": [a.model_dump(mode="json") for a in reversed(self.alerts)][:30],
            "gpu": gpu, "pipeline": self._pipeline(),
        }
