"""The VRAM optimizer agent (kind vram_optimizer): GPU memory leases for the agents that load models.

An agent asks before it loads a model onto a GPU and says when it is done:

    holder                                   optimizer
      vram.acquire(model, bytes, priority) ->  granted (lease, cuda:N) | wait (lease, position) | denied (reason)
      ... loads the model ...
      vram.touch(lease, loaded=true)       ->  measures the NVML delta, corrects the lease and the model's estimates
      vram.touch(lease) while in use       ->  renews it (TTL) and marks it used (LRU, keep-alive)
      vram.release(lease)                  ->  frees it; waiters may now be granted

A request that has to wait is answered `wait` at once, with its position, and granted later by the
event `vram.granted` on topic `vram.granted.<agent>`: a reply held open for minutes would outlive
every client's timeout and retry. A holder also learns of its grant from the `vram.touch` replies
it sends to renew the lease, so a missed event costs a renewal interval, not the grant. Holders
are asked to unload by the event `vram.revoke` on topic `vram.revoke.<agent>` (reason `idle`: not
used for keep_alive_s; `priority`: a higher-priority request needs the memory; `reclaimed`: the
lease is already gone). Leases of an agent the twin reports stopped or restarted are reclaimed at
once, of one it reports dead after dead_grace_s (a holder loading a model on its reactor thread
misses heartbeats without being gone), and of any holder that has not renewed for lease_ttl_s.
Leases live in the optimizer's memory: after it restarts, a holder's next renewal is answered
`unknown_lease`, which VramClient reports as reclaimed (unload, and acquire again).

GPUs are read through NVML every poll_s (agents/vram/gpus.py); without one every lease is granted on
the CPU. The decisions are agents/vram/policy.py's LeasePolicy. The holder's side, `VramClient`, and the
messages are in agents/gpu.py and agents/contracts.py: every kind that loads a model uses them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar

from prometheus_client import Counter, Gauge, Histogram
from pydantic import BaseModel, ConfigDict, Field

from agents.contracts import (
    GRANTED,
    WAITING,
    GpuStatus,
    LeaseInfo,
    VramAcquire,
    VramDecision,
    VramGranted,
    VramLeaseState,
    VramRelease,
    VramReleased,
    VramRevoke,
    VramStatus,
    VramStatusRequest,
    VramTouch,
)
from agents.gpu import MIB, mib
from agents.vram.gpus import GpuReadError, GpuReading, detect_gpus
from agents.vram.policy import Changes, EstimateBook, Lease, LeasePolicy, PolicyError
from mesh.messages import StateChanged
from mesh.runtime import Agent, AgentSettings, StartupError, handles
from network.codec import Envelope
from network.messages import AgentState
from network.rpc import MeshError

log = logging.getLogger(__name__)

# --- messages ----------------------------------------------------------------------------------


# --- the agent ---------------------------------------------------------------------------------


class SimulatedSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    total_mb: int = Field(..., gt=0, description="memory of each simulated GPU")
    name: str = Field("SimulatedGPU", description="shown in readings; always starts with SimulatedGPU")
    count: int = Field(1, ge=1, le=16)
    reserved_mb: int = Field(0, ge=0, description="used by the simulated driver on an idle card")


class VramSettings(AgentSettings):
    single_agent: ClassVar[str] = (
        "it leases one host's GPU memory: two on a host would lease the same memory twice; declare one per GPU host")
    headroom_mb: int = Field(1024, ge=0, description="kept free on every GPU: the budget is its memory minus this")
    poll_s: float = Field(2.0, gt=0, le=3600, description="read the GPUs (NVML) this often")
    keep_alive_s: float | None = Field(300.0, gt=0, description="ask holders to unload a model unused this long; "
                                       "null: never for idleness")
    revoke_grace_s: float = Field(30.0, gt=0, description="a revoked lease not released within this is reclaimed")
    lease_ttl_s: float = Field(60.0, gt=0, description="a lease not renewed within this is reclaimed")
    dead_grace_s: float = Field(10.0, ge=0, description="reclaim the leases of an agent the twin reports dead "
                                "for this long (stopped or restarted: at once)")
    simulated: SimulatedSettings | None = Field(None, description="a simulated GPU instead of NVML (tests, trials)")


@dataclass
class Baseline:
    """What the GPU held when a lease was granted, to measure the load against."""

    gpu: int
    used: int
    pid_bytes: int
    epoch: int
    pid_epoch: int


class VramOptimizer(Agent):
    kind = "vram_optimizer"
    image = "model"   # needs the `model` extra (podman_build.sh: the model image)
    Settings = VramSettings

    def setup(self) -> None:
        s = self.settings
        self._read_failed = False
        self.backend, self.found = detect_gpus(s.simulated.model_dump() if s.simulated else None)
        self.readings: list[GpuReading] = []
        if self.backend is not None:
            try:
                self.readings = self.backend.readings()
            except GpuReadError as exc:
                raise StartupError(f"agent {self.name}: {exc}") from None
        self.headroom = s.headroom_mb * MIB
        for r in self.readings:
            if r.total <= self.headroom:
                raise StartupError(f"agent {self.name}: headroom_mb {s.headroom_mb} leaves nothing of GPU {r.index} "
                                   f"({r.name}, {r.total // MIB} MiB): set agents.{self.name}.settings.headroom_mb lower")
        self.policy = LeasePolicy([r.total - self.headroom for r in self.readings], keep_alive_s=s.keep_alive_s,
                                  revoke_grace_s=s.revoke_grace_s, lease_ttl_s=s.lease_ttl_s)
        self.book = EstimateBook(self.config.mesh.data_dir / "vram" / "estimates.json")
        self.baselines: dict[str, Baseline] = {}
        self.epochs: dict[tuple, int] = {}        # (gpu,) and (gpu, pid) -> grants and releases seen there
        self.restarts: dict[str, int] = {}        # agent -> restarts the twin last reported
        self.dead_since: dict[str, float] = {}
        self._metrics()
        if self.backend is not None:
            self.reactor.every(s.poll_s, self._poll)
        self.reactor.every(min(s.poll_s, 0.5), self._expire)
        self.subscribe(self.config.twin, StateChanged.type_name, self._on_agent_state)
        if self.backend is None:
            self.log.info("vram: %s; every lease is placed on the CPU", self.found)
        else:
            self.log.info("vram: %s; budget %s", self.found,
                          ", ".join(f"GPU {r.index} {mib(b)}" for r, b in zip(self.readings, self.policy.budgets)))
        self._update_gauges()

    def close(self) -> None:
        super().close()
        if getattr(self, "backend", None) is not None:
            self.backend.close()
            self.backend = None

    # --- requests ----------------------------------------------------------------------------

    @handles(VramAcquire)
    def acquire(self, msg: VramAcquire, env: Envelope) -> VramDecision:
        with _policy_errors():
            LeasePolicy.check_request(msg.agent, msg.model, msg.bytes, msg.priority)
        self.dead_since.pop(msg.agent, None)
        if msg.instance:
            self._apply(self.policy.reclaim(msg.agent, "a new instance of its agent asked", keep_instance=msg.instance))
        counted = self.book.correct(msg.model, msg.bytes) if self.policy.has_gpu else msg.bytes
        decision = self.policy.acquire(msg.agent, msg.model, counted, msg.priority, instance=msg.instance, pid=msg.pid,
                                       wait=msg.wait)
        lease = decision.lease
        self.m_requests.labels(decision.status).inc()
        if lease is not None:
            lease.requested = msg.bytes
            if lease.state == GRANTED:
                self._granted(lease)
        outcome = {"granted": f"granted on {lease.device}" if lease else "", "wait": f"waits at {decision.position}",
                   "denied": "denied"}[decision.status]
        (self.log.warning if decision.status == "denied" else self.log.info)(
            "%s asks %s for %s (priority %d): %s%s", msg.agent, mib(counted), msg.model, msg.priority, outcome,
            f" ({decision.reason})" if decision.reason else "")
        self._apply(Changes(revoke=decision.revoke))
        reply = VramDecision(status=decision.status, model=msg.model, reason=decision.reason,
                             position=decision.position, ttl_s=self.settings.lease_ttl_s)
        if lease is not None:
            reply.lease_id, reply.bytes, reply.gpu = lease.id, lease.bytes, lease.gpu
            reply.device = lease.device
        return reply

    @handles(VramRelease)
    def release(self, msg: VramRelease, env: Envelope) -> VramReleased:
        with _policy_errors():
            lease = self.policy.get(msg.lease_id, msg.agent)
            changes = self.policy.release(msg.lease_id, msg.agent)
        self._ended(lease)
        self.log.info("%s released %s (%s)", msg.agent, lease.model, mib(lease.bytes))
        self._apply(changes)
        return VramReleased(lease_id=lease.id, bytes=lease.bytes)

    @handles(VramTouch)
    def touch(self, msg: VramTouch, env: Envelope) -> VramLeaseState:
        with _policy_errors():
            lease = self.policy.touch(msg.lease_id, msg.agent, used=msg.used)
        self.dead_since.pop(msg.agent, None)
        if msg.loaded:
            self._measure(lease)
        return VramLeaseState(lease=self._info(lease))

    def gauges(self) -> dict[str, float]:
        """Per GPU: total, used, leased MiB; per holder: leased MiB (`lease_mb:<agent>`); waiting requests."""
        out: dict[str, float] = {}
        p = getattr(self, "policy", None)
        if p is None:
            return out
        for r in self.readings[:8]:
            out[f"gpu{r.index}_total_mb"] = r.total >> 20
            out[f"gpu{r.index}_used_mb"] = r.used >> 20
            out[f"gpu{r.index}_leased_mb"] = p.leased(r.index) >> 20
        held: dict[str, int] = {}
        for lease in p.leases.values():
            if lease.state != WAITING:
                held[lease.agent] = held.get(lease.agent, 0) + lease.bytes
        for agent, n in sorted(held.items())[:32]:
            out[f"lease_mb:{agent}"] = n >> 20
        out["waiting"] = len(p.queue())
        return out

    @handles(VramStatusRequest)
    def status(self, msg: VramStatusRequest, env: Envelope) -> VramStatus:
        p = self.policy
        gpus = [GpuStatus(index=r.index, name=r.name, total=r.total, used=r.used, free=r.free,
                          budget=p.budgets[r.index], leased=p.leased(r.index), external=p.external[r.index],
                          available=max(0, p.free(r.index)), temperature_c=r.temperature_c,
                          utilization_pct=r.utilization_pct, processes={str(k): v for k, v in r.processes.items()})
                for r in self.readings]
        held = sorted((x for x in p.leases.values() if x.state != WAITING), key=lambda x: x.seq)
        return VramStatus(backend=self.backend.kind if self.backend is not None else "none", detail=self.found,
                          headroom=self.headroom, gpus=gpus, leases=[self._info(x) for x in held],
                          queue=[self._info(x) for x in p.queue()], estimates=dict(self.book.ratios))

    # --- devices, measurements ---------------------------------------------------------------

    def _read(self) -> list[GpuReading]:
        try:
            readings = self.backend.readings()
        except GpuReadError as exc:
            if not self._read_failed:
                self.log.error("cannot read the GPUs: %s (leases are still decided on the last reading)", exc)
                self.set_state(AgentState.DEGRADED, str(exc))
                self._read_failed = True
            return self.readings
        if self._read_failed:
            self.log.info("the GPUs answer again")
            if self.state == AgentState.DEGRADED:
                self.set_state(AgentState.READY)
            self._read_failed = False
        return readings

    def _poll(self) -> None:
        self.readings = self._read()
        changes = Changes()
        for r in self.readings:
            changes += self.policy.observe(r.index, r.used, r.total)
        self._apply(changes)
        self._update_gauges()

    def _bump(self, lease: Lease) -> None:
        if lease.gpu is None:
            return
        for key in ((lease.gpu,), (lease.gpu, lease.pid)):
            self.epochs[key] = self.epochs.get(key, 0) + 1

    def _granted(self, lease: Lease) -> None:
        """Remembers what the GPU held at the grant, so the load can be measured when the holder says it is done."""
        self._bump(lease)
        if lease.gpu is None or self.backend is None:
            return
        self.readings = self._read()
        r = self.readings[lease.gpu]
        self.baselines[lease.id] = Baseline(gpu=lease.gpu, used=r.used, pid_bytes=r.processes.get(lease.pid, 0),
                                            epoch=self.epochs[(lease.gpu,)], pid_epoch=self.epochs[(lease.gpu, lease.pid)])

    def _ended(self, lease: Lease) -> None:
        self._bump(lease)
        self.baselines.pop(lease.id, None)

    def _measure(self, lease: Lease) -> None:
        """The load's real size: the holder process's growth on its GPU when nothing else of that process
        changed meanwhile, else the device's growth when no other lease changed there; else unknown."""
        base = self.baselines.pop(lease.id, None)
        if base is None or self.backend is None:
            return
        self.readings = self._read()
        r = self.readings[base.gpu]
        if lease.pid is not None and lease.pid in r.processes and self.epochs[(base.gpu, lease.pid)] == base.pid_epoch:
            measured, how = r.processes[lease.pid] - base.pid_bytes, f"process {lease.pid}"
        elif self.epochs[(base.gpu,)] == base.epoch:
            measured, how = r.used - base.used, f"GPU {base.gpu}"
        else:
            self.log.info("%s: %s loaded; not measured (other loads on GPU %d meanwhile)", lease.agent, lease.model,
                          base.gpu)
            return
        if measured <= 0:
            self.log.info("%s: %s loaded; %s did not grow, not measured", lease.agent, lease.model, how)
            return
        ratio = self.book.record(lease.model, lease.requested, measured)
        error = (measured - lease.requested) / lease.requested if lease.requested else 0.0
        self.m_estimate_error.observe(abs(error))
        self.m_estimate_ratio.labels(lease.model).set(ratio)
        self.log.info("%s: %s loaded, measured %s on %s against %s estimated (%+.0f%%); lease now %s",
                      lease.agent, lease.model, mib(measured), how, mib(lease.requested), 100 * error, mib(measured))
        self._apply(self.policy.resize(lease.id, measured))

    # --- time, deaths ------------------------------------------------------------------------

    def _expire(self) -> None:
        changes = self.policy.expire()
        now = time.monotonic()
        for agent, since in list(self.dead_since.items()):
            if now - since >= self.settings.dead_grace_s:
                del self.dead_since[agent]
                changes += self.policy.reclaim(agent, f"agent {agent} is dead")
        self._apply(changes)

    def _on_agent_state(self, event: StateChanged, env: Envelope) -> None:
        agent = event.agent
        known = self.restarts.get(agent)
        self.restarts[agent] = event.restarts
        if known is not None and event.restarts > known:
            self.dead_since.pop(agent, None)
            self._apply(self.policy.reclaim(agent, f"agent {agent} restarted"))
        elif event.state == AgentState.STOPPED:
            self.dead_since.pop(agent, None)
            self._apply(self.policy.reclaim(agent, f"agent {agent} stopped"))
        elif event.state == AgentState.DEAD:
            self.dead_since.setdefault(agent, time.monotonic())
        elif event.state != AgentState.UNREACHABLE:
            self.dead_since.pop(agent, None)

    # --- effects -----------------------------------------------------------------------------

    def _apply(self, changes: Changes) -> None:
        """Tells holders what a policy call did to their leases, and counts it."""
        if not changes:
            return
        for lease in changes.reclaimed:    # first, so that grants below measure from after them
            self._ended(lease)
            self.m_reclaimed.inc()
            self.log.warning("%s: lease of %s (%s) reclaimed: %s", lease.agent, lease.model, mib(lease.bytes),
                             lease.reason)
            self.publish(VramRevoke(lease_id=lease.id, agent=lease.agent, model=lease.model, reason="reclaimed",
                                    detail=lease.reason), f"vram.revoke.{lease.agent}")
        for lease in changes.revoke:
            self.m_revocations.labels(lease.reason).inc()
            self.log.info("%s: asked to unload %s (%s): %s", lease.agent, lease.model, mib(lease.bytes), lease.reason)
            self.publish(VramRevoke(lease_id=lease.id, agent=lease.agent, model=lease.model, reason=lease.reason,
                                    grace_s=self.settings.revoke_grace_s), f"vram.revoke.{lease.agent}")
        for lease in changes.granted:
            self._granted(lease)
            self.log.info("%s: granted %s (%s) on %s after waiting %.1fs", lease.agent, lease.model, mib(lease.bytes),
                          lease.device, lease.granted_at - lease.created)
            self.publish(VramGranted(lease=self._info(lease)), f"vram.granted.{lease.agent}")
        self._update_gauges()

    def _info(self, lease: Lease) -> LeaseInfo:
        now = time.monotonic()
        return LeaseInfo(lease_id=lease.id, agent=lease.agent, model=lease.model, state=lease.state, bytes=lease.bytes,
                         requested=lease.requested, priority=lease.priority, gpu=lease.gpu,
                         device=lease.device, position=self.policy.position(lease),
                         age_s=round(now - lease.created, 3), idle_s=round(now - lease.last_used, 3),
                         reason=lease.reason)

    def _metrics(self) -> None:
        r = self.metrics.registry
        self.m_total = Gauge("vram_total_bytes", "GPU memory, by GPU", ["gpu"], registry=r)
        self.m_used = Gauge("vram_used_bytes", "GPU memory in use (NVML), by GPU", ["gpu"], registry=r)
        self.m_free = Gauge("vram_free_bytes", "GPU memory free (NVML), by GPU", ["gpu"], registry=r)
        self.m_budget = Gauge("vram_budget_bytes", "GPU memory leases may take (total minus headroom)", ["gpu"],
                              registry=r)
        self.m_leased = Gauge("vram_leased_bytes", "GPU memory held by leases (granted and revoking), by GPU", ["gpu"],
                              registry=r)
        self.m_temperature = Gauge("gpu_temperature_celsius", "GPU temperature", ["gpu"], registry=r)
        self.m_utilization = Gauge("gpu_utilization_percent", "GPU utilisation", ["gpu"], registry=r)
        self.m_leases = Gauge("vram_leases", "Leases by model and state (granted, revoking, waiting)",
                              ["model", "state"], registry=r)
        self.m_lease_bytes = Gauge("vram_lease_bytes", "Bytes held by leases, by model", ["model"], registry=r)
        self.m_waiting = Gauge("vram_waiting", "Requests waiting for GPU memory", registry=r)
        self.m_requests = Counter("vram_requests", "vram.acquire answers, by status (granted, wait, denied)",
                                  ["status"], registry=r)
        self.m_revocations = Counter("vram_revocations", "Holders asked to unload, by reason (idle, priority)",
                                     ["reason"], registry=r)
        self.m_reclaimed = Counter("vram_reclaimed", "Leases dropped without a release (holder dead, stopped, "
                                   "restarted, not renewed, not released after revocation)", registry=r)
        self.m_estimate_ratio = Gauge("vram_estimate_ratio", "Measured over estimated bytes of a model's load, as "
                                      "remembered for correcting its next estimate", ["model"], registry=r)
        self.m_estimate_error = Histogram("vram_estimate_error", "|measured - estimated| / estimated of each load "
                                          "measured", buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0), registry=r)

    def _update_gauges(self) -> None:
        p = self.policy
        for reading in self.readings:
            g = str(reading.index)
            self.m_total.labels(g).set(reading.total)
            self.m_used.labels(g).set(reading.used)
            self.m_free.labels(g).set(reading.free)
            self.m_budget.labels(g).set(p.budgets[reading.index])
            self.m_leased.labels(g).set(p.leased(reading.index))
            if reading.temperature_c is not None:
                self.m_temperature.labels(g).set(reading.temperature_c)
            if reading.utilization_pct is not None:
                self.m_utilization.labels(g).set(reading.utilization_pct)
        counts: dict[tuple[str, str], int] = {}
        held: dict[str, int] = {}
        for lease in p.leases.values():
            counts[(lease.model, lease.state)] = counts.get((lease.model, lease.state), 0) + 1
            if lease.state != WAITING:
                held[lease.model] = held.get(lease.model, 0) + lease.bytes
        self.m_leases.clear()
        self.m_lease_bytes.clear()
        for (model, state), n in counts.items():
            self.m_leases.labels(model, state).set(n)
        for model, n in held.items():
            self.m_lease_bytes.labels(model).set(n)
        self.m_waiting.set(sum(1 for x in p.leases.values() if x.state == WAITING))


@contextmanager
def _policy_errors() -> Iterator[None]:
    """Turns a PolicyError into the typed error reply (its code and message); the policy changed nothing."""
    try:
        yield
    except PolicyError as exc:
        raise MeshError(exc.code, exc.message) from None


