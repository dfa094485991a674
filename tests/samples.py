"""One valid instance of every message type, for tests that must cover them all."""

import importlib

from agents.kinds import BUILTIN, module_of

from agents.probe import ProbeCounts, ProbeReport, ProbeWatch
from network.messages import (
    Ack, Alert, HostChanged, LogLines, LogRead, HostStatus, AgentStats, AgentStatus, Deregister, Echo, Error, Heartbeat, HeartbeatAck, Ping, Pong, ReadyStatus, Register,
    Registered, StateChanged, StatusReply, StatusRequest, WaitReady,
)

from pipeline.messages import (
    CrawlDiscovered, CrawlStatus, CrawlStatusRequest, DocStored, Enqueue, EnqueueResult, ExtractPage, Link, PageFetched, PageStored,
    Prioritize, PrioritizeResult, DocScored, TopicsReply, TopicsRequest, TopicSummary, CuriosityStatusRequest,
    CuriosityStatus, CacheInfo, CacheGet, CachedDocument, Generate, Generated, Embed, Embedded, ModelsRequest,
    ModelInfo, ModelsReply, Unload,
)
from pipeline.vram_agent import (
    GpuStatus, LeaseInfo, VramAcquire, VramDecision, VramGranted, VramLeaseState, VramRelease, VramReleased, VramRevoke,
    VramStatus, VramStatusRequest, VramTouch,
)

_lease = LeaseInfo(lease_id="3f2a9c1b7d4e", agent="topics", model="all-MiniLM-L6-v2", state="granted", bytes=480 << 20,
                   requested=460 << 20, priority=1, gpu=0, device="cuda:0", age_s=12.5, idle_s=0.4)

_status = AgentStatus(agent="a", kind="echo", host="h", group="g", required=True, state="ready", depends_on=["twin"],
                      waiting_on=[], last_heartbeat_age_s=0.2, uptime_s=3.0, restarts=1, pid=42,
                      stats=AgentStats(messages_in=1, messages_out=2, errors=0))

SAMPLES = {m.type_name: m for m in [
    Error(code="unknown_type", message="no", detail={"x": 1}),
    Ack(),
    Ping(),
    Pong(agent="a", kind="echo", state="ready", uptime_s=1.5, pid=3),
    Echo(payload=b"\x00\xff", seq=9),
    LogRead(offset=120, file_id="2049:1234", tail=0, max_bytes=65536),
    LogLines(agent="a", host="h", file_id="2049:1234", offset=300, lines=['{"level": "INFO", "message": "ready"}']),
    Register(agent="a", kind="echo", host="h", instance="i1", pid=3, state="starting"),
    Registered(waiting_on=["b"], heartbeat_interval_s=1.0, restarts=2),
    Heartbeat(agent="a", instance="i1", state="ready", stats=AgentStats(messages_in=5), detail="fine"),
    HeartbeatAck(registered=True),
    WaitReady(agent="a", instance="i1"),
    ReadyStatus(ready=False, waiting_on=["b"], registered=True),
    Deregister(agent="a", instance="i1", reason="stopped"),
    StatusRequest(),
    StatusReply(mesh="m", mesh_state="ready", twin_uptime_s=9.0, agents=[_status],
                hosts=[HostStatus(host="h", address="10.0.0.2", state="unreachable", agents=2, ready=0)]),
    HostChanged(host="h", previous="reachable", state="unreachable", reason="link down"),
    ProbeWatch(agent="a", topic="probe."),
    ProbeReport(agent="a"),
    ProbeCounts(agent="a", received=3, last_seq=7),
    StateChanged(agent="a", host="h", previous="waiting", state="ready", restarts=0, reason="heartbeat"),
    Alert(kind="agent_dead", agent="a", host="h", message="a: no heartbeat for 3.1s", at=1764441600.0),
    CrawlStatusRequest(),
    CrawlStatus(queued=3, leased=1, fetched=2, done=10, failed=1, seen=17, pages=12, in_flight=1, handoff_in_flight=2,
                documents=9, budget_left=100, idle=False, hosts=1),
    Enqueue(urls=["http://example.org/"], priority=2.0, depth=0),
    EnqueueResult(added=["http://example.org/"], rejected={"ftp://x/": "not an http(s) URL"}),
    Prioritize(priorities={"http://example.org/a": 5.0}),
    PrioritizeResult(updated=1, not_queued=["http://example.org/b"]),
    ExtractPage(url="http://example.org/", final_url="http://example.org/", fetch_id="f1", status=200,
                content_type="text/html", content_hash="ab" * 32, fetched_at=1.7e9, depth=0, truncated=False,
                body_zstd=b"\x28\xb5\x2f\xfd"),
    PageStored(url="http://example.org/", state="extracted", outcome="inserted", document_id=1,
               outlinks=[Link(url="http://example.org/a", anchor="A")]),
    PageFetched(url="http://example.org/", status=200, outcome="fetched", elapsed_ms=3.5, size=1200),
    CrawlDiscovered(parent="http://example.org/", depth=1, links=[Link(url="http://example.org/a", anchor="A")]),
    DocStored(url="http://example.org/", document_id=1, state="extracted", outcome="inserted"),
    TopicsRequest(limit=10),
    TopicsReply(topics=[TopicSummary(id=0, label="python asyncio task", keywords=["python", "asyncio", "task"], size=12,
                                     mean_novelty=0.21)], total_topics=1, documents=13, duplicates=1, exact_duplicates=0,
                index="flat, 12 vector(s)", device="cpu"),
    DocScored(url="http://example.org/", document_id=1, topic=0, label="python asyncio task", novelty=0.3,
              novelty_kl=1.2, new_topic=False, embedding=b"\x00\x3c" * 4),
    CuriosityStatusRequest(),
    CuriosityStatus(updates=120, checkpointed_updates=100, observed=118, pending=40, prioritized=300, mean_reward=0.4,
                    mean_intrinsic=0.1, mean_extrinsic=0.3, device="cpu",
                    cache=CacheInfo(backend="memory", items=10, bytes=40_000, max_items=5000, max_bytes=256_000_000,
                                    hits=3, misses=1, evictions={"items": 2})),
    CacheGet(url="http://example.org/", embedding=True),
    CachedDocument(url="http://example.org/", found=True, source="cache", document_id=1, title="Example",
                   text="Some text.", novelty=0.3, embedding=b"\x00\x00\x80\x3f"),
    Generate(model="tiny", prompt="Keywords: asyncio, task, loop. Title:", max_tokens=16, temperature=0.0,
             stop=["\n"], seed=1),
    Generated(model="tiny", text="Async tasks", tokens=3, finish="stop", elapsed_s=0.05, placement="cpu"),
    Embed(model="tiny-embed", texts=["hello"]),
    Embedded(model="tiny-embed", dim=1, vectors=b"\x00\x00\x80\x3f"),
    ModelsRequest(),
    ModelsReply(models=[ModelInfo(name="tiny", path="/data/models/tiny.gguf", state="loaded", placement="cuda:0",
                                  n_gpu_layers=-1, estimate_bytes=40 << 20, lease="3f2a9c1b7d4e", idle_s=1.5,
                                  requests=4)], gpu="vram"),
    Unload(model="tiny"),

    VramAcquire(agent="topics", model="all-MiniLM-L6-v2", bytes=460 << 20, priority=1, instance="i1", pid=4242),
    VramDecision(status="wait", model="all-MiniLM-L6-v2", lease_id="3f2a9c1b7d4e", bytes=480 << 20, position=1,
                 reason="waits for 1 lease(s) of lower priority to unload", ttl_s=60.0),
    VramRelease(agent="topics", lease_id="3f2a9c1b7d4e"),
    VramReleased(lease_id="3f2a9c1b7d4e", bytes=480 << 20),
    VramTouch(agent="topics", lease_id="3f2a9c1b7d4e", used=True, loaded=True),
    VramLeaseState(lease=_lease),
    VramStatusRequest(),
    VramStatus(backend="simulated", detail="simulated: 1 x SimulatedGPU RTX 4090, 24564 MiB", headroom=1 << 30,
               gpus=[GpuStatus(index=0, name="SimulatedGPU RTX 4090", total=24564 << 20, used=900 << 20,
                               free=23664 << 20, budget=23540 << 20, leased=480 << 20, external=0,
                               available=23060 << 20, temperature_c=31.8, utilization_pct=0.0,
                               processes={"4242": 900 << 20})],
               leases=[_lease], queue=[], estimates={"all-MiniLM-L6-v2": 1.04}),
    VramGranted(lease=_lease),
    VramRevoke(lease_id="3f2a9c1b7d4e", agent="topics", model="all-MiniLM-L6-v2", reason="priority", grace_s=30.0),
]}


def shipped() -> set[str]:
    """Types registered by this repository's modules (a test may have imported a plug-in's too)."""
    from network.messages import REGISTRY

    for kind in BUILTIN:
        importlib.import_module(module_of(kind))
    return {name for name, cls in REGISTRY.items() if cls.__module__.split(".")[0] in ("agents", "network", "pipeline")}
