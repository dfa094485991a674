"""Rolling replacement of a pool's replicas: one at a time, each drained before the next, so the pool keeps
taking work throughout and nothing it held is lost.

For each replica: stop it (SIGTERM: the agent drains, its state goes `draining`, the coordinator stops sending it
pages and hands what it held to the other replicas; it deregisters and exits), wait until the twin reports it gone,
start the new one, wait until the twin reports it ready, then the next. Before a replica is stopped another
replica of its pool must be ready, so the pool is never left with none.

The caller says how to stop one replica and how to start it again; the waiting, on the twin's word, is here and
only here. `podman_build.sh deploy HOST` (ops/deploy.py) replaces containers with it (stop: `podman stop`, which
returns once the container has exited; start: `podman run`), tests/test_rolling.py replaces `meshctl up --only
REPLICA` processes under a running crawl with the same function.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

from mesh.config import MeshConfig
from mesh.control import fetch_status
from network.rpc import MeshError

READY = ("ready", "degraded")
GONE = ("stopped", "dead", "declared")   # deregistered, missed its heartbeats, or never registered


class RollError(Exception):
    """A replica did not drain or did not get ready in time; the replicas not reached yet are left as they were."""


@dataclass
class Replaced:
    """One replica replaced: how long the old one took to drain and go, and the new one to get ready."""

    replica: str
    gone_s: float     # stop asked -> the twin reports it gone (the drain, and the process's exit)
    ready_s: float    # start asked -> the twin reports it ready


def _states(cfg: MeshConfig) -> dict[str, str] | str:
    """Agent -> its state as the twin reports it, or why the twin did not answer."""
    try:
        return {a.agent: a.state for a in fetch_status(cfg, timeout=1.0).agents}
    except MeshError as exc:
        return f"the twin ({cfg.twin} at {cfg.endpoint(cfg.twin)}) does not answer: {exc.message}"


def wait_state(cfg: MeshConfig, replica: str, wanted: Sequence[str], timeout: float, what: str) -> float:
    """Until the twin reports `replica` in one of `wanted`; the seconds it took. RollError after `timeout`."""
    started = time.monotonic()
    while True:
        states = _states(cfg)
        now = isinstance(states, dict) and states.get(replica, "declared")
        if now in wanted:
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            seen = f"it is {now}" if now else states
            raise RollError(f"{replica} not {what} after {timeout:.0f}s ({seen})")
        time.sleep(0.2)


def _ready(cfg: MeshConfig, replica: str) -> tuple[bool, list[str]] | str:
    """Whether `replica` is ready, and which other replicas of its pool are; or why the twin did not say."""
    pool = cfg.pool_of(replica)
    states = _states(cfg)
    if not isinstance(states, dict):
        return states
    others = [r for r in cfg.replicas_of(pool) if r != replica and states.get(r) in READY] if pool else []
    return states.get(replica) in READY, others


def roll(cfg: MeshConfig, replicas: Sequence[str], *, stop: Callable[[str], None], start: Callable[[str], None],
         timeout: float = 120.0, report: Callable[[str], None] = print) -> list[Replaced]:
    """Replaces `replicas` one at a time: `stop(replica)` returns once its process has drained and exited (the
    twin must then report it gone within the dead time), `start(replica)` starts the new one, which must be ready
    within `timeout` before the next is stopped. A ready replica is stopped only while another of its pool is
    ready (it waits up to `timeout` for one); a replica that is not ready (crashing, say, which the new image may
    fix) does no work and is replaced at once, and so is the only replica of a pool (its work waits meanwhile,
    and it says so). RollError when a replica does not go or does not get ready, or no other is ready to take its
    work: the ones not reached are left running."""
    done = []
    for replica in replicas:
        pool = cfg.pool_of(replica)
        siblings = [r for r in cfg.replicas_of(pool) if r != replica] if pool else []
        deadline = time.monotonic() + timeout
        while True:
            seen = _ready(cfg, replica)
            if not isinstance(seen, str):
                this_ready, others = seen
                if others or not this_ready or not siblings:
                    break
            if time.monotonic() > deadline:
                if isinstance(seen, str):
                    raise RollError(f"{replica} left running: {seen}")
                raise RollError(f"no other replica of pool {pool} is ready ({', '.join(siblings)}): {replica} is "
                                f"left running rather than stop the pool's work (to replace it all the same, "
                                f"stop it and deploy again)")
            time.sleep(0.2)
        if not this_ready:
            report(f"  {replica}: not ready, so it holds no work: replacing it at once")
        elif others:
            report(f"  {replica}: draining (the pool keeps {', '.join(others)})")
        else:
            report(f"  {replica}: draining ({pool or replica} has no other replica: its work waits until the new "
                   "one is ready)")
        asked = time.monotonic()
        stop(replica)
        mesh = cfg.mesh
        wait_state(cfg, replica, GONE, mesh.heartbeat_interval_s * mesh.dead_after_missed + 5.0, "gone")
        gone = time.monotonic() - asked
        report(f"  {replica}: gone after {gone:.1f}s; starting the new one")
        asked = time.monotonic()
        start(replica)
        ready = wait_state(cfg, replica, READY, timeout, "ready")
        report(f"  {replica}: ready after {ready:.1f}s")
        done.append(Replaced(replica, round(gone, 2), round(time.monotonic() - asked, 2)))
    return done
