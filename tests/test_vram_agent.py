"""The VRAM optimizer in a real mesh: a twin, the optimizer on a simulated GPU, and holders that ask
it over real sockets: grants, waits, revocations, the client helper, a SIGKILLed holder's lease
reclaimed, and no GPU at all."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import zmq
from pydantic import Field

from agents.contracts import VramAcquire, VramGranted, VramRelease, VramRevoke, VramStatusRequest, VramTouch
from agents.gpu import MIB, VramClient, VramLease
from mesh.control import client
from mesh.runtime import Agent, AgentSettings
from network.messages import Ping
from network.metrics import MeshMetrics
from network.pubsub import Subscriber
from network.rpc import MeshError
from testing.harness import ROOT, mesh_dict, wait_for

OPTIMIZER = "agents.vram.agent:VramOptimizer"


class HolderSettings(AgentSettings):
    model: str = "test-model"
    mb: int = Field(600, ge=0)
    priority: int = 0


class Holder(Agent):
    """A test kind that holds one model's lease through VramClient, the way a model agent would:
    loads on grant (says so), unloads and releases when asked to."""

    kind = "vram_test_holder"
    Settings = HolderSettings

    def on_ready(self) -> None:
        self.events: list[tuple[str, str]] = []
        self.vram = VramClient(self)
        s = self.settings
        self.lease = self.vram.acquire(s.model, s.mb * MIB, s.priority, on_granted=self._granted,
                                       on_revoke=self._revoked, on_denied=lambda lease: self.events.append(
                                           ("denied", lease.reason)))

    def _granted(self, lease: VramLease) -> None:
        self.events.append(("granted", lease.device))
        lease.loaded()

    def _revoked(self, lease: VramLease, reason: str) -> None:
        self.events.append(("revoke", reason))
        lease.release()


def vram_config(*, holders: dict | None = None, **settings) -> dict:
    agents = {"vram": {"kind": OPTIMIZER, "depends_on": ["twin"],
                       "settings": {"simulated": {"total_mb": 1000, "name": "SimulatedGPU test card"}, "headroom_mb": 0,
                                    "poll_s": 0.1, "keep_alive_s": None, "revoke_grace_s": 5.0, "lease_ttl_s": 6.0,
                                    "dead_grace_s": 0.0, **settings}}}
    for name, s in (holders or {}).items():
        agents[name] = {"kind": "tests.test_vram_agent:Holder", "depends_on": ["vram"], "settings": s}
    return mesh_dict(agents)


class Events:
    """Every event the optimizer publishes, read on demand."""

    def __init__(self, cfg):
        self.ctx = zmq.Context()
        self.seen: list[tuple[str, object]] = []
        self.sub = Subscriber(self.ctx, lambda topic, env: self.seen.append((topic, env.message)),
                              metrics=MeshMetrics("t", "t"))
        self.sub.connect(cfg.endpoint("vram", "pub"))
        self.sub.subscribe("vram.")

    def wait(self, predicate, what: str):
        def found():
            self.sub.on_readable()
            return [(t, m) for t, m in self.seen if predicate(t, m)]
        return wait_for(found, timeout=10, what=what)

    def close(self) -> None:
        self.sub.close()
        self.ctx.term()


def ready(c) -> None:
    wait_for(lambda: c.request(Ping()).state == "ready", what="the optimizer ready")


def status(c):
    return c.request(VramStatusRequest())


def test_acquire_wait_grant_revoke_and_bad_requests_over_the_wire(write_config, run_agents):
    _, cfg = write_config(vram_config())
    [_, opt] = run_agents(cfg, "twin", "vram")
    events = Events(cfg)
    try:
        with client(cfg, "vram", timeout=2.0, sender="test") as c:
            ready(c)
            time.sleep(0.2)   # the subscriber joins before the first event
            st = status(c)
            assert st.backend == "simulated" and st.gpus[0].name == "SimulatedGPU test card"
            assert st.gpus[0].budget == 1000 * MIB and st.gpus[0].available == 1000 * MIB

            a = c.request(VramAcquire(agent="a", model="m-a", bytes=600 * MIB))
            assert (a.status, a.device, a.gpu, a.bytes, a.ttl_s) == ("granted", "cuda:0", 0, 600 * MIB, 6.0)
            b = c.request(VramAcquire(agent="b", model="m-b", bytes=600 * MIB))
            assert b.status == "wait" and b.position == 1 and b.lease_id and b.device == ""
            cc = c.request(VramAcquire(agent="c", model="m-c", bytes=300 * MIB))
            assert cc.status == "wait" and cc.position == 2        # it would fit, but b is first
            huge = c.request(VramAcquire(agent="c", model="huge", bytes=2000 * MIB))
            assert huge.status == "denied" and "more than the whole budget" in huge.reason

            before = status(c)
            bad = [(VramAcquire(agent="a", model="m", bytes=-1), "invalid_request", "bytes must be"),
                   (VramAcquire(agent="", model="m", bytes=1), "invalid_request", "agent must be"),
                   (VramRelease(agent="a", lease_id="nope"), "unknown_lease", "no lease 'nope'"),
                   (VramRelease(agent="b", lease_id=a.lease_id), "not_holder", "held by 'a', not 'b'"),
                   (VramTouch(agent="a", lease_id="nope"), "unknown_lease", "no lease")]
            for msg, code, text in bad:
                with pytest.raises(MeshError) as info:
                    c.request(msg)
                assert info.value.code == code and text in info.value.message
            after = status(c)
            assert [(x.lease_id, x.state) for x in after.leases + after.queue] == \
                   [(x.lease_id, x.state) for x in before.leases + before.queue]

            assert c.request(VramRelease(agent="a", lease_id=a.lease_id)).bytes == 600 * MIB
            events.wait(lambda t, m: t == "vram.granted.c", "b and c granted")
            grants = [(t, m.lease.lease_id, m.lease.device) for t, m in events.seen if isinstance(m, VramGranted)]
            assert grants == [
                ("vram.granted.b", b.lease_id, "cuda:0"), ("vram.granted.c", cc.lease_id, "cuda:0")]
            st = status(c)
            assert [(x.agent, x.state) for x in st.leases] == [("b", "granted"), ("c", "granted")]   # 600 + 300

            # priority: d (priority 5) needs 700 MiB: c (used less recently than b) is not enough, both are revoked
            c.request(VramTouch(agent="b", lease_id=b.lease_id))
            d = c.request(VramAcquire(agent="d", model="m-d", bytes=700 * MIB, priority=5))
            assert d.status == "wait" and d.position == 1
            revokes = events.wait(lambda t, m: isinstance(m, VramRevoke), "revocations")
            assert [(t, m.reason) for t, m in revokes] == [("vram.revoke.c", "priority"), ("vram.revoke.b", "priority")]
            assert revokes[0][1].grace_s == 5.0
            c.request(VramRelease(agent="c", lease_id=cc.lease_id))
            assert status(c).queue[0].agent == "d"          # 400 MiB free: not yet
            c.request(VramRelease(agent="b", lease_id=b.lease_id))
            events.wait(lambda t, m: t == "vram.granted.d", "d granted")
            st = status(c)
            assert [(x.agent, x.bytes) for x in st.leases] == [("d", 700 * MIB)] and not st.queue

        m = opt.agent.metrics
        assert m.sample("vram_revocations_total", {"reason": "priority"}) == 2
        assert m.sample("vram_requests_total", {"status": "wait"}) == 3
        assert m.sample("vram_requests_total", {"status": "denied"}) == 1
        assert m.sample("vram_leased_bytes", {"gpu": "0"}) == 700 * MIB
        assert m.sample("vram_lease_bytes", {"model": "m-d"}) == 700 * MIB
        assert m.sample("vram_total_bytes", {"gpu": "0"}) == 1000 * MIB
    finally:
        events.close()


def test_the_measured_load_corrects_the_lease_and_the_next_estimate(write_config, run_agents):
    _, cfg = write_config(vram_config())
    [_, opt] = run_agents(cfg, "twin", "vram")
    with client(cfg, "vram", timeout=2.0, sender="test") as c:
        ready(c)
        gpu = opt.agent.backend
        first = c.request(VramAcquire(agent="a", model="minilm", bytes=200 * MIB, pid=4242))
        gpu.allocate(4242, 300 * MIB)        # the load took half as much again as estimated
        gpu.allocate(777, 50 * MIB)          # something else on the card, not in any lease
        state = c.request(VramTouch(agent="a", lease_id=first.lease_id, loaded=True)).lease
        assert state.bytes == 300 * MIB and state.requested == 200 * MIB
        st = status(c)
        assert st.estimates == {"minilm": 1.5} and st.gpus[0].processes == {"4242": 300 * MIB, "777": 50 * MIB}
        wait_for(lambda: status(c).gpus[0].external == 50 * MIB, what="the poll sees the other process")
        second = c.request(VramAcquire(agent="b", model="minilm", bytes=200 * MIB))
        assert second.bytes == 300 * MIB     # corrected before it is counted
        assert status(c).gpus[0].available == (1000 - 300 - 300 - 50) * MIB
    assert opt.agent.metrics.sample("vram_estimate_ratio", {"model": "minilm"}) == 1.5
    assert (cfg.mesh.data_dir / "vram" / "estimates.json").exists()


def test_client_helper_loads_unloads_when_revoked_and_releases(write_config, run_agents):
    _, cfg = write_config(vram_config(holders={"holder": {"model": "topic-model", "mb": 600, "priority": 1}}))
    [_, _, holder] = run_agents(cfg, "twin", "vram", "holder")
    with client(cfg, "vram", timeout=2.0, sender="test") as c:
        ready(c)
        wait_for(lambda: getattr(holder.agent, "events", None) == [("granted", "cuda:0")], what="the holder's grant")
        st = wait_for(lambda: (s := status(c)).leases and s, what="the lease listed")
        [lease] = st.leases
        assert (lease.agent, lease.model, lease.priority, lease.bytes) == ("holder", "topic-model", 1, 600 * MIB)
        import httpx  # the twin's dashboard shows the GPU and the lease (the optimizer's heartbeat gauges)
        board = f"http://127.0.0.1:{cfg.mesh.base_port + 80}/api/state"
        gpu = wait_for(lambda: (g := httpx.get(board).json()["gpu"])["leases"] and g, what="the lease on the dashboard")
        assert gpu["agent"] == "vram" and gpu["leases"] == {"holder": 600} and gpu["waiting"] == 0
        assert gpu["gpus"] == [{"index": 0, "total_mb": 1000, "used_mb": gpu["gpus"][0]["used_mb"], "leased_mb": 600}]
        urgent = c.request(VramAcquire(agent="x", model="llm", bytes=800 * MIB, priority=9))
        assert urgent.status == "wait"
        # the holder is told, unloads and releases; the urgent request is granted
        wait_for(lambda: status(c).leases and status(c).leases[0].agent == "x", what="x granted after the release")
        assert holder.agent.events == [("granted", "cuda:0"), ("revoke", "priority")]
        assert holder.agent.lease.status == "released"


class HolderProcess:
    """The holder agent as a real process of its own, to be SIGKILLed."""

    def __init__(self, path, log_path):
        self.log = open(log_path, "ab")  # noqa: SIM115 - the child writes to it until kill() closes it
        code = ("import sys; from mesh.config import load_config; from mesh.runtime import run_agent; "
                "run_agent(load_config(sys.argv[1]), 'holder')")
        self.proc = subprocess.Popen([sys.executable, "-c", code, str(path)], cwd=ROOT, stdout=self.log,
                                     stderr=subprocess.STDOUT)

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.log.close()


def held(c, agent: str = "holder"):
    return [x for x in status(c).leases if x.agent == agent]


def test_a_sigkilled_holders_lease_is_reclaimed(write_config, run_agents, tmp_path):
    path, cfg = write_config(vram_config(holders={"holder": {"model": "gguf-7b", "mb": 700}}))
    run_agents(cfg, "twin", "vram")
    events = Events(cfg)
    holder = HolderProcess(path, tmp_path / "holder.out")
    try:
        with client(cfg, "vram", timeout=2.0, sender="test") as c:
            ready(c)
            [lease] = wait_for(lambda: held(c), timeout=30, what="the holder process's lease")
            assert (lease.state, lease.model, lease.bytes) == ("granted", "gguf-7b", 700 * MIB)
            waiter = c.request(VramAcquire(agent="w", model="m", bytes=700 * MIB))
            assert waiter.status == "wait" and "equal or higher priority" in waiter.reason
            holder.kill()
            killed = time.monotonic()
            wait_for(lambda: [x.agent for x in status(c).leases] == ["w"], timeout=10, what="w granted after the kill")
            assert time.monotonic() - killed < 5.0        # the twin's death notice, not the 6 s lease TTL
            assert not status(c).queue
            [(topic, notice)] = events.wait(lambda t, m: isinstance(m, VramRevoke), "the reclaim notice")
            assert (topic, notice.reason, notice.detail) == ("vram.revoke.holder", "reclaimed", "agent holder is dead")
    finally:
        holder.kill()
        events.close()


def test_a_restarted_holders_old_lease_is_reclaimed(write_config, run_agents, tmp_path):
    """SIGKILL and an immediate restart (what `meshctl up` does): the new instance's registration, not
    the (long) dead grace or the lease TTL, frees what the old one held."""
    path, cfg = write_config(vram_config(dead_grace_s=60.0, holders={"holder": {"model": "gguf-7b", "mb": 700}}))
    run_agents(cfg, "twin", "vram")
    first = HolderProcess(path, tmp_path / "holder.out")
    second = None
    try:
        with client(cfg, "vram", timeout=2.0, sender="test") as c:
            ready(c)
            [old] = wait_for(lambda: held(c), timeout=30, what="the first instance's lease")
            first.kill()
            killed = time.monotonic()
            second = HolderProcess(path, tmp_path / "holder.out")
            [new] = wait_for(lambda: [x for x in held(c) if x.lease_id != old.lease_id], timeout=30,
                             what="the second instance's lease")
            assert [x.lease_id for x in held(c)] == [new.lease_id] and new.state == "granted"
            assert time.monotonic() - killed < 6.0
    finally:
        first.kill()
        if second is not None:
            second.kill()


def test_leases_not_renewed_are_reclaimed_and_the_holder_is_told(write_config, run_agents):
    _, cfg = write_config(vram_config(lease_ttl_s=0.5))
    run_agents(cfg, "twin", "vram")
    events = Events(cfg)
    try:
        with client(cfg, "vram", timeout=2.0, sender="test") as c:
            ready(c)
            time.sleep(0.2)
            lost = c.request(VramAcquire(agent="ghost", model="m", bytes=100 * MIB))
            [(topic, revoke)] = events.wait(lambda t, m: isinstance(m, VramRevoke), "the reclaim notice")
            assert topic == "vram.revoke.ghost" and revoke.reason == "reclaimed" and "not renewed" in revoke.detail
            assert revoke.lease_id == lost.lease_id and not status(c).leases
    finally:
        events.close()


def test_idle_models_are_asked_to_unload_after_the_keep_alive(write_config, run_agents):
    _, cfg = write_config(vram_config(keep_alive_s=0.6))
    run_agents(cfg, "twin", "vram")
    events = Events(cfg)
    try:
        with client(cfg, "vram", timeout=2.0, sender="test") as c:
            ready(c)
            time.sleep(0.2)
            busy = c.request(VramAcquire(agent="busy", model="m1", bytes=100 * MIB))
            idle = c.request(VramAcquire(agent="idle", model="m2", bytes=100 * MIB))
            deadline = time.monotonic() + 1.5
            while time.monotonic() < deadline:
                c.request(VramTouch(agent="busy", lease_id=busy.lease_id))
                c.request(VramTouch(agent="idle", lease_id=idle.lease_id, used=False))
                time.sleep(0.1)
            revokes = events.wait(lambda t, m: isinstance(m, VramRevoke), "the idle notice")
            assert [(t, m.reason, m.lease_id) for t, m in revokes] == [("vram.revoke.idle", "idle", idle.lease_id)]
            assert {x.agent: x.state for x in status(c).leases} == {"busy": "granted", "idle": "revoking"}
    finally:
        events.close()


def test_no_gpu_grants_on_the_cpu(write_config, run_agents):
    _, cfg = write_config(vram_config(simulated=None))
    run_agents(cfg, "twin", "vram")
    with client(cfg, "vram", timeout=2.0, sender="test") as c:
        ready(c)
        st = status(c)
        if st.backend == "nvml":
            pytest.skip(f"this machine has a GPU ({st.detail})")
        assert st.backend == "none" and st.detail.startswith("no GPU: ") and st.gpus == []
        d = c.request(VramAcquire(agent="a", model="m", bytes=64 << 30))
        assert (d.status, d.device, d.gpu) == ("granted", "cpu", None) and "no GPU" in d.reason
        assert c.request(VramRelease(agent="a", lease_id=d.lease_id)).lease_id == d.lease_id


def test_client_without_an_optimizer_grants_auto_placement_locally(write_config, run_agents):
    _, cfg = write_config(mesh_dict({"holder": {"kind": "tests.test_vram_agent:Holder", "depends_on": ["twin"]}}))
    [_, holder] = run_agents(cfg, "twin", "holder")
    wait_for(lambda: getattr(holder.agent, "events", None) == [("granted", "auto")], what="the local grant")
    lease = holder.agent.lease
    assert lease.status == "granted" and lease.device == "auto" and "no VRAM optimizer" in lease.reason
    lease.release()     # from another thread: handed to the holder's reactor
    wait_for(lambda: lease.status == "released", what="the release")
