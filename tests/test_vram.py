"""The VRAM lease policy on a simulated device, the estimates from real model files, and NVML's
"no GPU" on a machine without one. The policy's clock is a plain number the test moves."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agents.contracts import GRANTED, REVOKING, WAITING
from agents.embedding import resolve_model
from agents.gpu import MIB, EstimateError, estimate_safetensors, estimate_sentence_transformer
from agents.vram.gpus import NoGpu, NvmlGpus, SimulatedGPU, SimulatedOutOfMemory, detect_gpus
from agents.vram.policy import EstimateBook, LeasePolicy, PolicyError

GIB = 1 << 30


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def policy(budgets=(10 * GIB,), **kw) -> tuple[LeasePolicy, Clock]:
    clock = Clock()
    kw = {"keep_alive_s": 300.0, "revoke_grace_s": 30.0, "lease_ttl_s": 60.0, **kw}
    return LeasePolicy(list(budgets), clock=clock, **kw), clock


def simulated_policy(total_mb: int = 10 * 1024, headroom_mb: int = 0, **kw) -> tuple[LeasePolicy, Clock, SimulatedGPU]:
    gpu = SimulatedGPU(total_mb * MIB, "SimulatedGPU test card")
    p, clock = policy([r.total - headroom_mb * MIB for r in gpu.readings()], **kw)
    return p, clock, gpu


# --- the invariant: grants never exceed the budget ---------------------------------------------

AGENTS = ["a", "b", "c", "d"]
# sizes in quarters of a GiB, so that exact fits and one-byte misses are common, plus any odd size
size = st.one_of(st.integers(0, 48).map(lambda k: k * GIB // 4), st.integers(0, 48).map(lambda k: k * GIB // 4 + 1),
                 st.integers(0, 12 * GIB))
op = st.one_of(
    st.tuples(st.just("acquire"), st.sampled_from(AGENTS), size, st.integers(0, 3), st.booleans()),
    st.tuples(st.just("fill"), st.sampled_from(AGENTS), st.sampled_from([-1, 0, 1]), st.integers(0, 3)),
    st.tuples(st.just("release"), st.integers(0, 50)),
    st.tuples(st.just("touch"), st.integers(0, 50)),
    st.tuples(st.just("reclaim"), st.sampled_from(AGENTS)),
    st.tuples(st.just("time"), st.floats(0, 120)),
)
growth = st.one_of(op, st.tuples(st.just("resize"), st.integers(0, 50), size),
                   st.tuples(st.just("observe"), st.integers(0, 1), size))


def run_ops(p: LeasePolicy, clock: Clock, ops) -> None:
    """Applies `ops`; after each one checks what every state must satisfy, and yields the grants it made."""
    known: list[str] = []
    for o in ops:
        granted = []
        if o[0] == "acquire":
            d = p.acquire(o[1], "m", o[2], o[3], wait=o[4])
            assert d.status in ("granted", "wait", "denied")
            if d.lease is not None:
                known.append(d.lease.id)
                if d.status == "granted":
                    granted.append(d.lease)
            for r in d.revoke:
                assert r.state == REVOKING and r.priority < o[3]
        elif o[0] == "fill" and p.budgets:     # exactly the room left on a GPU, a byte less or a byte more
            d = p.acquire(o[1], "m", max(0, max(p.free(g) for g in range(len(p.budgets))) + o[2]), o[3])
            if d.lease is not None:
                known.append(d.lease.id)
                if d.status == "granted":
                    granted.append(d.lease)
        elif known and o[0] in ("release", "touch", "resize"):
            lease_id = known[o[1] % len(known)]
            try:
                if o[0] == "release":
                    granted += p.release(lease_id).granted
                elif o[0] == "touch":
                    p.touch(lease_id)
                else:
                    granted += p.resize(lease_id, o[2]).granted
            except PolicyError as exc:
                assert exc.code == "unknown_lease" and lease_id not in p.leases
        elif o[0] == "reclaim":
            granted += p.reclaim(o[1], "test").granted
        elif o[0] == "time":
            clock.advance(o[1])
            granted += p.expire().granted
        elif o[0] == "observe" and o[1] < len(p.budgets):
            granted += p.observe(o[1], o[2], p.budgets[o[1]]).granted
        yield granted
        queue = p.queue()
        for lease in granted:   # strict order: nobody left waiting was ahead of a lease just granted
            assert not [w for w in queue if (w.priority, -w.seq) > (lease.priority, -lease.seq)], (lease, queue)
        if queue:   # waiters are served eagerly: the first one does not fit anywhere
            assert all(p.free(g) < queue[0].bytes for g in range(len(p.budgets)))
        assert all(x.state in (GRANTED, WAITING, REVOKING) for x in p.leases.values())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(op, max_size=40), st.sampled_from([[10 * GIB], [6 * GIB, 8 * GIB]]))
def test_grants_never_exceed_the_budget(ops, budgets):
    p, clock = policy(budgets)
    for _ in run_ops(p, clock, ops):
        for g, budget in enumerate(p.budgets):
            assert p.leased(g) <= budget


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(growth, max_size=40), st.sampled_from([[10 * GIB], [6 * GIB, 8 * GIB]]))
def test_no_grant_while_measured_use_is_over_the_budget(ops, budgets):
    """Measurements (resize) and memory used outside leases (observe) can put a GPU over budget; no
    grant is made on it until it is back within."""
    p, clock = policy(budgets)
    for granted in run_ops(p, clock, ops):
        for lease in granted:
            assert p.leased(lease.gpu) + p.external[lease.gpu] <= p.budgets[lease.gpu]


# --- decisions -----------------------------------------------------------------------------------


def test_grant_then_wait_then_deny_with_reasons():
    p, _ = policy([10 * GIB])
    a = p.acquire("a", "llm", 6 * GIB)
    assert a.status == "granted" and a.lease.gpu == 0 and a.lease.device == "cuda:0"
    b = p.acquire("b", "llm", 6 * GIB)
    assert b.status == "wait" and b.position == 1 and "equal or higher priority" in b.reason and not b.revoke
    too_big = p.acquire("c", "huge", 11 * GIB)
    assert too_big.status == "denied" and too_big.lease is None
    assert "more than the whole budget" in too_big.reason and "10240 MiB" in too_big.reason
    now_or_never = p.acquire("c", "small", 5 * GIB, wait=False)
    assert now_or_never.status == "denied" and "wait" in now_or_never.reason
    assert set(p.leases) == {a.lease.id, b.lease.id}


def test_waits_are_served_in_priority_order_then_first_come():
    p, _ = policy([10 * GIB])
    holder = p.acquire("h", "big", 10 * GIB, priority=9).lease
    asked = [("w1", 1), ("w3a", 3), ("w3b", 3), ("w2", 2)]
    positions = {}
    for agent, prio in asked:
        d = p.acquire(agent, "m", 10 * GIB, priority=prio)
        assert d.status == "wait" and not d.revoke   # the holder's priority is higher: nothing revoked
        positions[agent] = d.position
    assert positions == {"w1": 1, "w3a": 1, "w3b": 2, "w2": 3}
    assert [x.agent for x in p.queue()] == ["w3a", "w3b", "w2", "w1"]
    # a small, low-priority request that would fit still waits its turn behind the queue
    small = p.acquire("s", "tiny", 1, priority=0)
    assert small.status == "wait" and small.position == 5
    served = []
    current = holder
    while p.queue():
        changes = p.release(current.id)
        assert len(changes.granted) >= 1
        served += [x.agent for x in changes.granted]
        current = changes.granted[0]
    assert served == ["w3a", "w3b", "w2", "w1", "s"]


def test_a_higher_priority_request_jumps_the_queue_but_not_an_equal_one():
    p, _ = policy([10 * GIB])
    p.acquire("h", "m", 10 * GIB, priority=9)
    low = p.acquire("low", "m", 4 * GIB, priority=1)
    high = p.acquire("high", "m", 4 * GIB, priority=5)
    same = p.acquire("same", "m", 4 * GIB, priority=5)
    assert (low.position, high.position, same.position) == (1, 1, 2)
    assert p.position(low.lease) == 3


def test_lru_revocation_of_lower_priority_leases():
    p, clock, _ = simulated_policy(10 * 1024)
    l1 = p.acquire("a", "m1", 3 * GIB, priority=0).lease
    clock.advance(1)
    l2 = p.acquire("b", "m2", 3 * GIB, priority=0).lease
    clock.advance(1)
    l3 = p.acquire("c", "m3", 3 * GIB, priority=1).lease
    clock.advance(1)
    p.touch(l1.id)                 # used last: l2 is now the least recently used, then l3
    high = p.acquire("x", "big", 5 * GIB, priority=5)
    assert high.status == "wait" and high.position == 1
    assert [x.id for x in high.revoke] == [l2.id, l3.id]          # 1 GiB free + 3 + 3 >= 5: two, LRU first
    assert all(x.state == REVOKING and x.reason == "priority" for x in high.revoke)
    assert l1.state == GRANTED
    # revoked bytes still count until released: nothing else gets in meanwhile
    assert p.acquire("y", "m", 2 * GIB, priority=0).status == "wait"
    assert p.release(l2.id).granted == []            # 4 GiB free: not yet
    changes = p.release(l3.id)
    assert [x.agent for x in changes.granted] == ["x", "y"] and high.lease.state == GRANTED   # x first, y in what is left
    assert p.leased(0) <= p.budgets[0]


def test_equal_or_higher_priority_leases_are_never_revoked():
    p, _ = policy([10 * GIB])
    p.acquire("a", "m", 6 * GIB, priority=3)
    p.acquire("b", "m", 4 * GIB, priority=2)
    d = p.acquire("c", "m", 6 * GIB, priority=2)
    assert d.status == "wait" and d.revoke == []
    assert "equal or higher priority" in d.reason
    # a priority-3 request may revoke the priority-2 lease, but that is not enough alone: nothing revoked
    d3 = p.acquire("d", "m", 8 * GIB, priority=3)
    assert d3.status == "wait" and d3.revoke == []


def test_revoked_lease_not_released_is_reclaimed_after_the_grace():
    p, clock = policy([10 * GIB], revoke_grace_s=30)
    low = p.acquire("a", "m", 8 * GIB, priority=0).lease
    high = p.acquire("b", "m", 8 * GIB, priority=5)
    assert [x.id for x in high.revoke] == [low.id]
    clock.advance(29)
    assert not p.expire()
    clock.advance(2)
    changes = p.expire()
    assert [x.id for x in changes.reclaimed] == [low.id] and "within 30s" in low.reason
    assert [x.id for x in changes.granted] == [high.lease.id]


def test_a_killed_agents_leases_and_waits_are_reclaimed():
    p, _ = policy([10 * GIB])
    dead = [p.acquire("dead", "m1", 4 * GIB).lease, p.acquire("dead", "m2", 4 * GIB).lease]
    waiter = p.acquire("alive", "m", 6 * GIB).lease
    dead_waits = p.acquire("dead", "m3", 1 * GIB).lease
    assert waiter.state == WAITING and dead_waits.state == WAITING
    changes = p.reclaim("dead", "agent dead is dead")
    assert {x.id for x in changes.reclaimed} == {dead[0].id, dead[1].id, dead_waits.id}
    assert [x.id for x in changes.granted] == [waiter.id]
    assert set(p.leases) == {waiter.id}
    assert all(x.reason == "agent dead is dead" for x in changes.reclaimed)


def test_a_restarted_agent_keeps_only_its_new_instances_leases():
    p, _ = policy([10 * GIB])
    old = p.acquire("a", "m", 4 * GIB, instance="i1").lease
    new = p.acquire("a", "m", 4 * GIB, instance="i2").lease
    changes = p.reclaim("a", "restarted", keep_instance="i2")
    assert [x.id for x in changes.reclaimed] == [old.id] and set(p.leases) == {new.id}


def test_leases_not_renewed_expire_after_the_ttl():
    p, clock = policy([10 * GIB], lease_ttl_s=60, keep_alive_s=None)
    kept = p.acquire("a", "m", 1 * GIB).lease
    lost = p.acquire("b", "m", 1 * GIB).lease
    reclaimed = []
    for _ in range(3):
        clock.advance(40)
        p.touch(kept.id, used=False)     # renewal alone
        reclaimed += p.expire().reclaimed
    assert [x.id for x in reclaimed] == [lost.id] and "not renewed for 60s" in lost.reason
    assert set(p.leases) == {kept.id}


def test_keep_alive_unloads_idle_models():
    p, clock = policy([10 * GIB], keep_alive_s=300, lease_ttl_s=10_000)
    busy = p.acquire("a", "busy", 2 * GIB).lease
    idle = p.acquire("b", "idle", 2 * GIB).lease
    for _ in range(4):
        clock.advance(100)
        p.touch(busy.id)                  # used
        p.touch(idle.id, used=False)      # renewed, never used
        changes = p.expire()
        if changes.revoke:
            break
    assert [x.id for x in changes.revoke] == [idle.id] and idle.state == REVOKING and idle.reason == "idle"
    assert busy.state == GRANTED
    assert not p.expire().revoke          # asked once
    p.release(idle.id)
    never, clock2 = policy([10 * GIB], keep_alive_s=None, lease_ttl_s=10_000)
    kept = never.acquire("a", "m", GIB).lease
    clock2.advance(5000)
    assert not never.expire() and kept.state == GRANTED


def test_no_gpu_grants_every_request_on_the_cpu():
    p, _ = policy([])
    d = p.acquire("a", "m", 80 * GIB, priority=0)
    assert d.status == "granted" and d.lease.gpu is None and d.lease.device == "cpu" and "no GPU" in d.reason
    p.release(d.lease.id)
    assert not p.leases


def test_multi_gpu_picks_the_gpu_with_most_room():
    p, _ = policy([8 * GIB, 10 * GIB])
    assert p.acquire("a", "m", 3 * GIB).lease.gpu == 1      # 10 free > 8 free
    assert p.acquire("b", "m", 3 * GIB).lease.gpu == 0      # 8 free > 7 free
    assert p.acquire("c", "m", 7 * GIB).lease.gpu == 1      # only GPU 1 (7 free) takes it
    assert p.acquire("d", "m", 9 * GIB).status == "wait"    # fits GPU 1's budget, not its room


def test_bad_requests_get_clear_errors_and_change_nothing():
    p, _ = policy([10 * GIB])
    lease = p.acquire("a", "m", GIB).lease
    before = {k: (v.state, v.bytes, v.last_used) for k, v in p.leases.items()}
    cases = [
        (lambda: p.acquire("a", "m", -1), "invalid_request", "bytes must be a whole number >= 0, got -1"),
        (lambda: p.acquire("", "m", 1), "invalid_request", "agent must be a non-empty name"),
        (lambda: p.acquire("a", " ", 1), "invalid_request", "model must be a non-empty name"),
        (lambda: p.acquire("a", "m", 1.5), "invalid_request", "got 1.5"),
        (lambda: p.release("nope"), "unknown_lease", "no lease 'nope'"),
        (lambda: p.release(lease.id, "b"), "not_holder", "held by 'a', not 'b'"),
        (lambda: p.touch(lease.id, "b"), "not_holder", "held by 'a'"),
        (lambda: p.resize(lease.id, -5), "invalid_request", "got -5"),
    ]
    for call, code, text in cases:
        with pytest.raises(PolicyError) as info:
            call()
        assert info.value.code == code and text in info.value.message
    assert {k: (v.state, v.bytes, v.last_used) for k, v in p.leases.items()} == before


def test_memory_used_outside_leases_is_not_granted():
    p, _, gpu = simulated_policy(10 * 1024, headroom_mb=1024)     # budget 9 GiB
    lease = p.acquire("a", "m", 4 * GIB, pid=10).lease
    gpu.allocate(10, 4 * GIB)                   # the holder loads what it said
    gpu.allocate(99, 3 * GIB)                   # a process without a lease takes 3 GiB
    r = gpu.readings()[0]
    p.observe(0, r.used, r.total)
    assert p.external[0] == 3 * GIB - 1 * GIB   # beyond the 1 GiB headroom
    assert p.free(0) == 9 * GIB - 4 * GIB - 2 * GIB
    assert p.acquire("b", "m", 4 * GIB).status == "wait"
    gpu.free(99)
    r = gpu.readings()[0]
    changes = p.observe(0, r.used, r.total)
    assert [x.agent for x in changes.granted] == ["b"] and lease.state == GRANTED


# --- the simulated device and NVML ---------------------------------------------------------------


def test_simulated_gpu_readings_move_with_allocations():
    gpu = SimulatedGPU([4 * GIB, 2 * GIB], "RTX test", reserved_bytes=256 * MIB)
    assert gpu.name == "SimulatedGPU RTX test" and gpu.kind == "simulated"
    gpu.allocate(1234, GIB)
    gpu.allocate(1234, GIB // 2)
    gpu.allocate(55, GIB, gpu=1)
    r0, r1 = gpu.readings()
    assert r0.used == 256 * MIB + GIB + GIB // 2 and r0.free == r0.total - r0.used and r0.processes == {1234: 3 * GIB // 2}
    assert r1.processes == {55: GIB} and r1.index == 1 and r0.temperature_c > 30
    with pytest.raises(SimulatedOutOfMemory):
        gpu.allocate(9, 3 * GIB)
    gpu.free(1234, GIB)
    assert gpu.readings()[0].processes == {1234: GIB // 2}
    gpu.free(1234)
    assert gpu.readings()[0].used == 256 * MIB


def test_detect_gpus_uses_the_simulation_only_when_asked():
    sim, found = detect_gpus({"total_mb": 24564, "name": "SimulatedGPU RTX 4090"})
    assert sim.kind == "simulated" and "simulation" in found
    [r] = sim.readings()
    assert r.total == 24564 * MIB and r.name == "SimulatedGPU RTX 4090"


def test_nvml_reports_no_gpu_cleanly_or_reads_the_real_one():
    backend, found = detect_gpus()
    if backend is None:            # this machine, CI: no NVIDIA driver
        assert found.startswith("no GPU: ")
        with pytest.raises(NoGpu):
            NvmlGpus()
        return
    try:                           # a machine with a GPU: the readings are real and consistent
        readings = backend.readings()
        assert readings and backend.kind == "nvml"
        for r in readings:
            assert r.total > 0 and 0 <= r.used <= r.total and r.name and not r.name.startswith("SimulatedGPU")
    finally:
        backend.close()


# --- estimates -----------------------------------------------------------------------------------


def test_safetensors_estimate_from_the_header_alone(tmp_path):
    from safetensors.numpy import save_file

    tensors = {"emb": np.zeros((1000, 64), np.float32), "w": np.zeros((64, 64), np.float16),
               "ids": np.zeros((7,), np.int64)}
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    est = estimate_safetensors(tmp_path / "model.safetensors")
    assert est.bytes == sum(t.nbytes for t in tensors.values()) and est.tensors == 3
    assert est.params == 64_000 + 4096 + 7 and est.by_dtype == {"F32": 64_000, "F16": 4096, "I64": 7}
    assert est.metadata == {"format": "pt"}
    half = estimate_safetensors(tmp_path / "model.safetensors", load_dtype="F16")
    assert half.bytes == 2 * (64_000 + 4096) + 8 * 7          # integer tensors keep their dtype
    # sharded: a directory sums its files
    save_file({"more": np.zeros((10,), np.float32)}, str(tmp_path / "model-2.safetensors"))
    assert estimate_safetensors(tmp_path).bytes == est.bytes + 40


def test_safetensors_header_written_by_hand_and_broken_files(tmp_path):
    header = {"a": {"dtype": "BF16", "shape": [3, 5], "data_offsets": [0, 30]},
              "b": {"dtype": "F4_NEW", "shape": [4], "data_offsets": [30, 32]}}   # unknown dtype: its byte range
    raw = json.dumps(header).encode()
    (tmp_path / "x.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(32))
    assert estimate_safetensors(tmp_path / "x.safetensors").bytes == 30 + 2
    (tmp_path / "short.safetensors").write_bytes(b"\x01\x02")
    (tmp_path / "long.safetensors").write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    (tmp_path / "junk.safetensors").write_bytes(struct.pack("<Q", 4) + b"nope")
    for name, text in [("short", "shorter than its 8-byte"), ("long", "past the file's end"), ("junk", "not JSON")]:
        with pytest.raises(EstimateError, match=text) as info:
            estimate_safetensors(tmp_path / f"{name}.safetensors")
        assert name in str(info.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(EstimateError, match="no .safetensors file"):
        estimate_safetensors(tmp_path / "empty")


def test_minilm_estimate_from_the_real_model_directory():
    model_dir = resolve_model("all-MiniLM-L6-v2")
    weights = estimate_safetensors(model_dir)
    size = sum(f.stat().st_size for f in Path(model_dir).rglob("*.safetensors"))
    assert 0 < size - weights.bytes < 64 * 1024          # the file is the header plus exactly these bytes
    assert 22_000_000 < weights.params < 23_000_000       # all-MiniLM-L6-v2: 22.7 M parameters
    est = estimate_sentence_transformer(model_dir, batch_size=32)
    b, s, h, i, heads = 32, 256, 384, 1536, 12
    assert est.weights == weights.bytes
    assert est.activations == 4 * (b * s * (7 * h + 2 * i) + 2 * b * heads * s * s)
    assert "batch 32 x 256 tokens" in est.detail
    small = estimate_sentence_transformer(model_dir, batch_size=4, max_seq_length=128)
    assert small.weights == est.weights and small.activations < est.activations / 8
    with pytest.raises(EstimateError, match="not a local model directory"):
        estimate_sentence_transformer("./no/such/model")


def test_estimate_book_corrects_later_estimates_and_persists(tmp_path):
    book = EstimateBook(tmp_path / "estimates.json")
    assert book.correct("m", 1000) == 1000
    assert book.record("m", 1000, 1500) == 1.5
    assert book.correct("m", 2000) == 3000
    assert book.record("m", 1000, 1000) == 1.25          # halfway towards the new measurement
    assert book.record("m", 1000, 0) == 1.25             # nothing measured: nothing learnt
    assert book.record("wild", 1, 10**9) == 10.0         # kept within [0.1, 10]
    again = EstimateBook(tmp_path / "estimates.json")
    assert again.correct("m", 1000) == 1250 and again.ratios["wild"] == 10.0
