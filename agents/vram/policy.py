"""Who may load what onto which GPU: `LeasePolicy`, and `EstimateBook`, which corrects estimates by measurements.

Plain logic without sockets (the agent in agents/vram/agent.py puts it on the mesh). `EstimateBook`
remembers, per model, how far the measured use (the NVML delta after loading) was from the estimate,
and corrects the next estimate of that model by it. `LeasePolicy`: who holds how many bytes of which
GPU. Pure: the clock is injected and nothing runs by itself; the agent calls `expire()` on a timer.
Its invariant is that no grant ever takes a GPU past its budget (total minus headroom, minus memory
used outside any lease).
"""

from __future__ import annotations

import itertools
import json
import math
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from agents.contracts import GRANTED, REVOKING, WAITING
from agents.gpu import mib


class EstimateBook:
    """Per model, measured over estimated bytes, so the next estimate of that model is corrected.

    A new measurement moves the ratio halfway (one odd load does not decide it alone); ratios are
    kept within [0.1, 10]. With a path the book is a small JSON file that survives restarts."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path else None
        self.ratios: dict[str, float] = {}
        if self.path is not None and self.path.is_file():
            try:
                self.ratios = {str(k): float(v) for k, v in json.loads(self.path.read_text()).items()}
            except (ValueError, AttributeError):
                self.ratios = {}   # a damaged book only costs the corrections

    def record(self, model: str, estimated: int, measured: int) -> float:
        if estimated <= 0 or measured <= 0:
            return self.ratios.get(model, 1.0)
        ratio = min(10.0, max(0.1, measured / estimated))
        old = self.ratios.get(model)
        self.ratios[model] = ratio if old is None else (old + ratio) / 2
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text(json.dumps(self.ratios, indent=1, sort_keys=True))
            tmp.replace(self.path)
        return self.ratios[model]

    def correct(self, model: str, estimated: int) -> int:
        return math.ceil(estimated * self.ratios.get(model, 1.0))


# --- the lease policy --------------------------------------------------------------------------



class PolicyError(Exception):
    """A request the policy refuses as malformed or not allowed; nothing was changed."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass
class Lease:
    id: str
    agent: str
    model: str
    bytes: int                 # counted against the budget: the request, corrected, then measured
    requested: int             # what the holder asked for
    priority: int
    state: str                 # granted | waiting | revoking
    gpu: int | None = None     # None: CPU (there is no GPU)
    instance: str = ""         # the holder's process instance, when it said
    pid: int | None = None
    seq: int = 0               # arrival order: first come, first served among equal priorities
    created: float = 0.0
    granted_at: float | None = None
    last_used: float = 0.0     # LRU and keep-alive
    last_seen: float = 0.0     # renewal: a holder that stops renewing is reclaimed after the TTL
    revoked_at: float | None = None
    reason: str = ""           # why it waits, was revoked, or ended

    @property
    def device(self) -> str:
        """Where to load: cuda:N, or cpu; empty while waiting."""
        if self.state == WAITING:
            return ""
        return "cpu" if self.gpu is None else f"cuda:{self.gpu}"


@dataclass
class Decision:
    status: str                                  # granted | wait | denied
    lease: Lease | None = None                   # None when denied
    reason: str = ""
    position: int | None = None                  # 1 = next to be served
    revoke: list[Lease] = field(default_factory=list)   # leases now asked to unload to make room


@dataclass
class Changes:
    """What one call did to other leases: waiters granted, holders asked to unload, leases dropped."""

    granted: list[Lease] = field(default_factory=list)
    revoke: list[Lease] = field(default_factory=list)
    reclaimed: list[Lease] = field(default_factory=list)

    def __iadd__(self, other: Changes) -> Self:
        self.granted += other.granted
        self.revoke += other.revoke
        self.reclaimed += other.reclaimed
        return self

    def __bool__(self) -> bool:
        return bool(self.granted or self.revoke or self.reclaimed)


class LeasePolicy:
    """Leases of GPU memory, decided one call at a time.

    * `acquire` grants when the request fits on a GPU (the one with most room) and nobody of equal
      or higher priority waits; a request larger than the largest budget is denied; anything else
      waits. Waiters are served strictly by priority, then arrival.
    * When the first waiter does not fit, the least recently used leases of lower priority on one
      GPU are revoked (asked to unload) until it would; if only leases of equal or higher priority
      stand in the way, it waits without revoking anything. A revoked lease still counts until its
      holder releases it, or until `revoke_grace_s` has passed, when it is reclaimed.
    * `expire` asks holders of leases unused for `keep_alive_s` to unload (reason idle) and drops
      leases not renewed for `lease_ttl_s`.
    * No GPU at all (no budgets): every acquire is granted, placed on the CPU.
    """

    def __init__(self, budgets: Sequence[int], *, keep_alive_s: float | None = 300.0, revoke_grace_s: float = 30.0,
                 lease_ttl_s: float = 60.0, clock: Callable[[], float] = time.monotonic):
        self.budgets = [int(b) for b in budgets]
        self.external = [0 for _ in self.budgets]   # used outside any lease (other processes, over-use)
        self.keep_alive_s = keep_alive_s
        self.revoke_grace_s = revoke_grace_s
        self.lease_ttl_s = lease_ttl_s
        self.clock = clock
        self.leases: dict[str, Lease] = {}
        self._seq = itertools.count(1)

    # --- views ---------------------------------------------------------------------------------

    @property
    def has_gpu(self) -> bool:
        return bool(self.budgets)

    def leased(self, gpu: int) -> int:
        """Bytes counted on `gpu`: granted leases and revoked ones not yet released."""
        return sum(lease.bytes for lease in self.leases.values() if lease.gpu == gpu and lease.state != WAITING)

    def free(self, gpu: int) -> int:
        """What can be granted on `gpu` now (negative when it is over budget)."""
        return self.budgets[gpu] - self.external[gpu] - self.leased(gpu)

    def queue(self) -> list[Lease]:
        return sorted((w for w in self.leases.values() if w.state == WAITING), key=lambda w: (-w.priority, w.seq))

    def position(self, lease: Lease) -> int | None:
        if lease.state != WAITING:
            return None
        return next(i for i, w in enumerate(self.queue(), 1) if w.id == lease.id)

    def get(self, lease_id: str, agent: str | None = None) -> Lease:
        lease = self.leases.get(lease_id)
        if lease is None:
            raise PolicyError("unknown_lease", f"no lease {lease_id!r} (released, reclaimed, or never granted)")
        if agent is not None and lease.agent != agent:
            raise PolicyError("not_holder", f"lease {lease_id} is held by {lease.agent!r}, not {agent!r}")
        return lease

    # --- requests --------------------------------------------------------------------------------

    @staticmethod
    def check_request(agent: str, model: str, nbytes: int, priority: int) -> None:
        """Raises PolicyError (invalid_request) for a request `acquire` would refuse as malformed."""
        for what, value in (("agent", agent), ("model", model)):
            if not isinstance(value, str) or not value.strip():
                raise PolicyError("invalid_request", f"{what} must be a non-empty name")
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
            raise PolicyError("invalid_request", f"bytes must be a whole number >= 0, got {nbytes!r}")
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise PolicyError("invalid_request", f"priority must be a whole number, got {priority!r}")

    def acquire(self, agent: str, model: str, nbytes: int, priority: int = 0, *, instance: str = "",
                pid: int | None = None, wait: bool = True) -> Decision:
        """Granted now, wait (queued, with its position), or denied (with the reason); see the class."""
        self.check_request(agent, model, nbytes, priority)
        now = self.clock()
        lease = Lease(id=uuid.uuid4().hex[:12], agent=agent, model=model, bytes=nbytes, requested=nbytes,
                      priority=priority, state=WAITING, instance=instance, pid=pid, seq=next(self._seq), created=now,
                      last_used=now, last_seen=now)
        if not self.has_gpu:
            lease.state, lease.granted_at, lease.reason = GRANTED, now, "no GPU: placed on the CPU"
            self.leases[lease.id] = lease
            return Decision("granted", lease, reason=lease.reason)
        largest = max(self.budgets)
        if nbytes > largest:
            return Decision("denied", reason=f"{model} needs {mib(nbytes)}, more than the whole budget of the "
                                             f"largest GPU ({mib(largest)}: its memory minus the headroom)")
        ahead = [w for w in self.queue() if w.priority >= priority]
        if not ahead:
            gpu = self._fitting_gpu(nbytes)
            if gpu is not None:
                self._grant(lease, gpu, now)
                self.leases[lease.id] = lease
                return Decision("granted", lease)
        if not wait:
            best = max(range(len(self.budgets)), key=self.free)
            why = (f"{len(ahead)} request(s) of equal or higher priority wait" if ahead
                   else f"only {mib(max(0, self.free(best)))} free on GPU {best}")
            return Decision("denied", reason=f"{model} needs {mib(nbytes)} now and {why}")
        self.leases[lease.id] = lease
        changes = self._serve()
        if lease.state == GRANTED:
            return Decision("granted", lease, revoke=changes.revoke)
        lease.reason = self._wait_reason(lease, changes.revoke)
        return Decision("wait", lease, reason=lease.reason, position=self.position(lease), revoke=changes.revoke)

    def release(self, lease_id: str, agent: str | None = None) -> Changes:
        """The holder unloaded (or no longer waits): its bytes are free, waiters may be served."""
        lease = self.get(lease_id, agent)
        del self.leases[lease_id]
        lease.reason = "released"
        return self._serve()

    def touch(self, lease_id: str, agent: str | None = None, *, used: bool = True) -> Lease:
        """Renews the lease (its holder is alive); `used`: the model was just used (LRU, keep-alive)."""
        lease = self.get(lease_id, agent)
        now = self.clock()
        lease.last_seen = now
        if used and lease.state != WAITING:
            lease.last_used = now
        return lease

    def resize(self, lease_id: str, nbytes: int) -> Changes:
        """The lease's size as measured after loading. It may now be over budget: nothing more is
        granted on that GPU until there is room again."""
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
            raise PolicyError("invalid_request", f"bytes must be a whole number >= 0, got {nbytes!r}")
        self.get(lease_id).bytes = nbytes
        return self._serve()

    def observe(self, gpu: int, used: int, total: int) -> Changes:
        """A device reading: memory used beyond the leases and the headroom is someone else's (a
        process without a lease, a holder using more than it said), and is not granted again."""
        headroom = total - self.budgets[gpu]
        self.external[gpu] = max(0, int(used) - self.leased(gpu) - headroom)
        return self._serve()

    def reclaim(self, agent: str, reason: str, *, keep_instance: str | None = None) -> Changes:
        """Drops every lease `agent` holds or waits for (its process is gone); with `keep_instance`,
        only those taken by another instance of it."""
        changes = Changes()
        for lease in list(self.leases.values()):
            if lease.agent != agent:
                continue
            if keep_instance is not None and lease.instance in ("", keep_instance):
                continue
            self._drop(lease, reason, changes)
        changes += self._serve()
        return changes

    def expire(self) -> Changes:
        """Time-driven changes: idle leases asked to unload, unrenewed and unreleased ones dropped."""
        now = self.clock()
        changes = Changes()
        for lease in list(self.leases.values()):
            if now - lease.last_seen > self.lease_ttl_s:
                self._drop(lease, f"not renewed for {self.lease_ttl_s:g}s", changes)
            elif lease.state == REVOKING and now - lease.revoked_at > self.revoke_grace_s:
                self._drop(lease, f"not released within {self.revoke_grace_s:g}s of its revocation", changes)
            elif (lease.state == GRANTED and lease.gpu is not None and self.keep_alive_s is not None
                  and now - lease.last_used > self.keep_alive_s):
                self._revoke(lease, "idle", now)
                changes.revoke.append(lease)
        changes += self._serve()
        return changes

    # --- internals -------------------------------------------------------------------------------

    def _grant(self, lease: Lease, gpu: int, now: float) -> None:
        lease.state, lease.gpu, lease.granted_at, lease.reason = GRANTED, gpu, now, ""
        lease.last_used = now

    def _revoke(self, lease: Lease, reason: str, now: float) -> None:
        lease.state, lease.revoked_at, lease.reason = REVOKING, now, reason

    def _drop(self, lease: Lease, reason: str, changes: Changes) -> None:
        del self.leases[lease.id]
        lease.reason = reason
        changes.reclaimed.append(lease)

    def _fitting_gpu(self, nbytes: int) -> int | None:
        """The GPU with most room, among those where `nbytes` fits now."""
        room = [(self.free(g), -g) for g in range(len(self.budgets)) if self.free(g) >= nbytes]
        return -max(room)[1] if room else None

    def _serve(self) -> Changes:
        """Grants waiters in order while the first one fits; makes room for the first that does not."""
        changes = Changes()
        now = self.clock()
        for head in self.queue():
            gpu = self._fitting_gpu(head.bytes)
            if gpu is None:
                changes.revoke += self._make_room(head, now)
                break
            self._grant(head, gpu, now)
            changes.granted.append(head)
        return changes

    def _make_room(self, head: Lease, now: float) -> list[Lease]:
        """Revokes the fewest least-recently-used lower-priority leases on one GPU that let `head`
        fit once released; nothing when a revocation already under way will do, or when nothing will."""
        plans = []
        for g, budget in enumerate(self.budgets):
            if budget < head.bytes:
                continue
            pending = sum(lease.bytes for lease in self.leases.values() if lease.gpu == g and lease.state == REVOKING)
            need = head.bytes - self.free(g) - pending
            if need <= 0:
                return []
            chosen, got = [], 0
            for lease in sorted((x for x in self.leases.values()
                                 if x.gpu == g and x.state == GRANTED and x.priority < head.priority),
                                key=lambda x: (x.last_used, x.seq)):
                if got >= need:
                    break
                chosen.append(lease)
                got += lease.bytes
            if got >= need:
                plans.append((len(chosen), got, g, chosen))
        if not plans:
            return []
        _, _, _, chosen = min(plans, key=lambda p: p[:3])
        for lease in chosen:
            self._revoke(lease, "priority", now)
        return chosen

    def _wait_reason(self, lease: Lease, revoked: list[Lease]) -> str:
        ahead = self.position(lease) - 1
        if revoked:
            return f"waits for {len(revoked)} lease(s) of lower priority to unload"
        if ahead:
            return f"waits behind {ahead} request(s) of equal or higher priority"
        if any(x.state == REVOKING for x in self.leases.values()):
            return "waits for a revoked lease to be released"
        return "waits: only leases of equal or higher priority hold the memory it needs"
