"""The digital twin: every declared agent's health, and the start-up gate.

It knows every agent the config declares (state `declared` until it registers), follows each
through starting -> waiting -> ready, marks it dead after `dead_after_missed` heartbeats,
degraded while a required dependency is not ready, and publishes every change as
`twin.state`. Agents ask it `wait_ready`; it answers with the dependencies still missing.

The twin keeps its registry in memory: after a restart every running agent's next heartbeat
is answered `registered: false`, and the agent registers again with its current state.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from agents.runtime import READY_STATES, Agent, handles
from network.codec import Envelope
from network.messages import (
    Ack, AgentState, AgentStats, AgentStatus, Deregister, ErrorCode, Heartbeat, HeartbeatAck, HostChanged, HostState,
    HostStatus, ReadyStatus, Register, Registered, StateChanged, StatusReply, StatusRequest, WaitReady,
)
from network.rpc import MeshError

LIVE = (AgentState.STARTING, AgentState.WAITING, AgentState.READY, AgentState.DEGRADED, AgentState.DRAINING)
SILENT = (AgentState.DEAD, AgentState.UNREACHABLE)


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


class DigitalTwin(Agent):
    kind = "digital_twin"
    uses_twin = False

    def setup(self) -> None:
        cfg = self.config
        self.records: dict[str, Record] = {
            name: Record(agent=name, kind=spec.kind, host=cfg.host_of(name), group=cfg.group_of(name),
                         required=spec.required, depends_on=list(spec.depends_on))
            for name, spec in cfg.agents.items()
        }
        self.dependents: dict[str, list[str]] = {name: [] for name in cfg.agents}
        for name, spec in cfg.agents.items():
            for dep in spec.depends_on:
                self.dependents[dep].append(name)
        self.host_states: dict[str, HostState] = {
            h: HostState.LOCAL if h == self.host else HostState.UNKNOWN for h in cfg.hosts}
        me = self.records[self.name]
        me.instance, me.pid, me.started_at, me.last_seen = self.instance, os.getpid(), time.time(), time.monotonic()
        me.reported = me.state = AgentState.READY
        self.state = AgentState.READY
        self.metrics.state.state(self.state)
        interval = cfg.mesh.heartbeat_interval_s
        self.dead_after = interval * cfg.mesh.dead_after_missed
        self.reactor.every(interval / 4, self._sweep)
        self.log.info("twin up: %d agents declared, dead after %.1fs without a heartbeat", len(self.records), self.dead_after)

    # --- handlers ------------------------------------------------------------------------------

    @handles(Register)
    def register(self, msg: Register, env: Envelope) -> Registered:
        rec = self._record(msg.agent)
        reason = "registered"
        if rec.instance is not None and rec.instance != msg.instance:
            rec.restarts += 1
            reason = f"restarted (restart {rec.restarts})"
        elif rec.instance == msg.instance:
            reason = "registered again"
        if msg.host != rec.host:
            self.log.warning("agent %s registered from host %s but the config places it on %s", msg.agent, msg.host, rec.host)
        if rec.instance != msg.instance:
            rec.started_at = time.time()
        rec.instance, rec.pid, rec.last_seen = msg.instance, msg.pid, time.monotonic()
        rec.reported = AgentState(msg.state)
        self._heard_from(rec.host)
        rec.waiting_on = self._waiting_on(rec)
        self._refresh(rec, reason)
        return Registered(waiting_on=rec.waiting_on, heartbeat_interval_s=self.config.mesh.heartbeat_interval_s,
                          restarts=rec.restarts)

    @handles(Heartbeat)
    def heartbeat(self, msg: Heartbeat, env: Envelope) -> HeartbeatAck:
        rec = self._record(msg.agent)
        if rec.instance != msg.instance or rec.state == AgentState.STOPPED:
            return HeartbeatAck(registered=False)
        rec.last_seen = time.monotonic()
        rec.reported, rec.stats, rec.detail = AgentState(msg.state), msg.stats, msg.detail
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
        return ReadyStatus(ready=not waiting, waiting_on=waiting)

    @handles(Deregister)
    def deregister(self, msg: Deregister, env: Envelope) -> Ack:
        rec = self._record(msg.agent)
        if rec.instance == msg.instance:
            rec.reported, rec.last_seen = AgentState.STOPPED, None
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
                restarts=rec.restarts, pid=rec.pid, stats=rec.stats, detail=rec.note))
        hosts = []
        for host, state in self.host_states.items():
            mine = [r for r in self.records.values() if r.host == host]
            hosts.append(HostStatus(host=host, address=self.config.hosts[host].address, state=state, agents=len(mine),
                                    ready=sum(r.state in READY_STATES for r in mine)))
        return StatusReply(mesh=self.config.mesh.name, mesh_state=self.mesh_state(),
                           twin_uptime_s=round(time.time() - self.started, 1), agents=agents, hosts=hosts)

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

    def _waiting_on(self, rec: Record) -> list[str]:
        return [d for d in rec.depends_on
                if self.config.agents[d].required and self.records[d].state not in READY_STATES]

    def _effective(self, rec: Record) -> tuple[AgentState, str]:
        state = rec.reported
        if state in READY_STATES:
            down = [d for d in rec.depends_on if self.records[d].state not in READY_STATES]
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

    def _sweep(self) -> None:
        """Silent agents are dead; when every agent of another host is silent at once, the host
        is unreachable (the link, not the agents, is the likely cause) and its agents say so."""
        now = time.monotonic()
        silent_by_host: dict[str, list[Record]] = {}
        heard: set[str] = set()
        for rec in self.records.values():
            if rec.agent == self.name or rec.last_seen is None:
                continue
            if now - rec.last_seen <= self.dead_after:
                heard.add(rec.host)
            elif rec.state in LIVE or rec.state in SILENT:
                silent_by_host.setdefault(rec.host, []).append(rec)
        missed = self.config.mesh.dead_after_missed
        for host, silent in silent_by_host.items():
            cut_off = host != self.host and host not in heard
            if cut_off and self.host_states[host] != HostState.UNREACHABLE:
                self._set_host(host, HostState.UNREACHABLE,
                               f"no agent of {host} ({self.config.hosts[host].address}) heard for {self.dead_after:.1f}s")
            for rec in silent:
                state = AgentState.UNREACHABLE if cut_off else AgentState.DEAD
                if rec.reported != state:
                    rec.reported = state
                    why = f"host {host} unreachable" if cut_off else f"no heartbeat for {now - rec.last_seen:.1f}s ({missed} missed)"
                    self._refresh(rec, why)
