"""The contract between agent kinds: every message that crosses from one kind to another, in one module
that both sides import (docs/PROTOCOL.md lists them with the rest). Messages a kind only speaks with
itself or with the twin live beside it (mesh/messages.py for the twin's).

* The crawl (crawler): crawl.status, crawl.enqueue, crawl.prioritize (the curiosity agent's lever);
  events crawl.fetched and crawl.discovered.
* The hand-off (crawler -> extractor): extract.page; its reply extract.stored comes only once the
  document is in the document store, and carries the page's outlinks back to the frontier. Event
  doc.stored (extractor -> topic model).
* Scoring (topic model): topics.list; event doc.scored (-> curiosity).
* Curiosity: curiosity.status, cache.get.
* Models (model manager): model.generate, model.embed, model.list, model.unload.
* GPU memory leases (any agent that loads a model <-> the VRAM optimizer): vram.*.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from network.messages import Message

# the topic model's documents per scoring pass (its `batch_docs`), which is also how far a crawl paced by it lets
# it fall behind by default (the crawler's `max_unscored`): one full batch always waiting for it
TOPIC_BATCH_DOCS = 64


class Link(BaseModel):
    url: str
    anchor: str = ""


class CrawlStatusRequest(Message):
    """Where the crawl stands (meshctl crawl status, the benchmarks, the dashboard)."""

    type_name: ClassVar[str] = "crawl.status"


class ExtractorLoad(BaseModel):
    """One extractor the coordinator hands pages to (a replica of a pool, or the one extractor), in CrawlStatus."""

    agent: str
    host: str
    usable: bool = True          # gets pages now
    why_not: str = ""            # why it does not: the twin's verdict, its host unreachable, no answer, a backoff
    in_flight: int = 0           # pages in its hands, not yet acknowledged
    credit: int = 0              # handoff_window minus in_flight (0 at least)
    acknowledged: int = 0        # pages it stored for this coordinator since it started
    lost: int = 0                # times it was given up with pages in its hands (they went to another replica)
    lost_at: float | None = None     # unix time it was last given up so
    handon_s: float | None = None    # then, seconds until every page it held was sent to another replica


class CrawlStatus(Message):
    type_name: ClassVar[str] = "crawl.status_reply"
    queued: int = 0
    leased: int = 0
    fetched: int = 0           # fetched, waiting for the extractor's acknowledgement
    done: int = 0
    failed: int = 0
    seen: int = 0
    pages: int = 0             # fetches that got an HTTP response since the coordinator started
    in_flight: int = 0         # fetches under way now
    handoff_in_flight: int = 0
    documents: int = 0         # pages acknowledged as stored by the extractor
    budget_left: int = 0
    idle: bool = False         # nothing left to fetch or hand off (or the page budget is spent)
    hosts: int = 0
    # pacing by the learner (agents/crawler/agent.py): the topic model it follows (None: none), its stored documents
    # not yet scored as last known (None before its first doc.scored), whether new fetches wait for it now, and the
    # seconds they waited in all
    learner: str | None = None
    learner_unscored: int | None = None
    waiting_for_learner: bool = False
    learner_wait_s: float = 0.0
    extractors: list[ExtractorLoad] = Field(default_factory=list)   # where the pages go, one per extractor


class Enqueue(Message):
    """Adds URLs to the frontier (subject to scope, normalisation and the seen-set)."""

    type_name: ClassVar[str] = "crawl.enqueue"
    urls: list[str]
    priority: float = 0.0
    depth: int = Field(0, ge=0)


class EnqueueResult(Message):
    type_name: ClassVar[str] = "crawl.enqueued"
    added: list[str] = Field(default_factory=list)
    rejected: dict[str, str] = Field(default_factory=dict)   # url -> why (seen, out of scope, not http)


class CrawlDiscovered(Message):
    """Event (topic crawl.discovered): outlinks of `parent` newly added to the frontier (the curiosity agent scores
    them and answers with crawl.prioritize)."""

    type_name: ClassVar[str] = "crawl.discovered"
    parent: str
    depth: int = 0          # the links' depth
    links: list[Link] = Field(default_factory=list)


class Prioritize(Message):
    """New priorities for queued URLs (higher is fetched sooner)."""

    type_name: ClassVar[str] = "crawl.prioritize"
    priorities: dict[str, float]


class PrioritizeResult(Message):
    type_name: ClassVar[str] = "crawl.prioritized"
    updated: int = 0
    not_queued: list[str] = Field(default_factory=list)   # unknown, or no longer waiting


class ExtractPage(Message):
    """One fetched page, handed from the coordinator to the extractor (body zstd-compressed)."""

    type_name: ClassVar[str] = "extract.page"
    url: str
    final_url: str
    fetch_id: str
    status: int
    content_type: str
    content_hash: str
    fetched_at: float
    depth: int = 0
    truncated: bool = False
    body_zstd: bytes


class PageStored(Message):
    """The document is in the store: the coordinator may mark the page done."""

    type_name: ClassVar[str] = "extract.stored"
    url: str
    state: str                  # extracted | failed
    outcome: str                # inserted | updated | unchanged
    document_id: int | None = None
    error: str | None = None
    outlinks: list[Link] = Field(default_factory=list)


class PageFetched(Message):
    """Event (topic crawl.fetched): one fetch finished, whatever its outcome."""

    type_name: ClassVar[str] = "crawl.fetched"
    url: str
    status: int | None = None
    outcome: str                # fetched | redirect | skipped | retry | failed | disallowed
    detail: str = ""
    elapsed_ms: float = 0.0
    size: int = 0


class DocStored(Message):
    """Event (topic doc.stored): a document was written to the document store."""

    type_name: ClassVar[str] = "doc.stored"
    url: str
    document_id: int | None = None
    state: str
    outcome: str


class TopicsRequest(Message):
    """The topic model's topics (meshctl topics)."""

    type_name: ClassVar[str] = "topics.list"
    limit: int = Field(50, ge=1, le=10_000)


class TopicSummary(BaseModel):
    id: int
    label: str
    keywords: list[str]
    size: int
    mean_novelty: float
    title: str = ""             # a readable title from a GGUF model (topic agent setting label_model; off by default)


class TopicsReply(Message):
    type_name: ClassVar[str] = "topics.listing"
    topics: list[TopicSummary] = Field(default_factory=list)
    total_topics: int = 0
    documents: int = 0          # documents scored (this state, restarts included)
    duplicates: int = 0         # near-duplicates found
    exact_duplicates: int = 0   # same content hash as an earlier document
    index: str = ""             # faiss index kind and size
    device: str = ""
    profile: str = ""           # the host's hardware profile and what it runs ("profile cpu: int8 OpenVINO, ...")
    # how far behind the store it is (None from a topic model older than these fields):
    backlog: int | None = None              # documents stored (extracted) and not scored yet
    oldest_unscored_s: float | None = None  # seconds since the oldest of them was fetched (None: nothing waits)
    scored_per_min: float | None = None     # scoring speed over its last minute of work (None: nothing scored yet)


class DocScored(Message):
    """Event (topic doc.scored): the topic model scored a document."""

    type_name: ClassVar[str] = "doc.scored"
    url: str
    document_id: int
    topic: int | None = None
    label: str = ""
    novelty: float = 0.0
    novelty_kl: float = 0.0
    duplicate_of: str | None = None
    similarity: float | None = None   # to the document it duplicates
    new_topic: bool = False
    embedding: bytes = b""            # the semantic vector, float16 little-endian, L2-normalised (empty for exact copies)
    # how stale the signal is (None from a topic model older than these fields): when the page was fetched, unix
    # seconds (the crawler's clock), and how many stored documents still waited for scoring after this one's batch
    fetched_at: float | None = None
    backlog: int | None = None

    def vector(self) -> np.ndarray | None:
        """The semantic vector as float32, or None when the event carries none."""
        if not self.embedding or len(self.embedding) % 2:
            return None
        return np.frombuffer(self.embedding, dtype="<f2").astype(np.float32)


class CuriosityStatusRequest(Message):
    """Where the curiosity agent stands (meshctl crawl-report, the dashboard)."""

    type_name: ClassVar[str] = "curiosity.status"


class CacheInfo(BaseModel):
    backend: str = ""
    items: int = 0
    bytes: int = 0
    max_items: int | None = None
    max_bytes: int | None = None
    hits: int = 0
    misses: int = 0
    evictions: dict[str, int] = Field(default_factory=dict)   # reason -> count


class CuriosityStatus(Message):
    type_name: ClassVar[str] = "curiosity.status_reply"
    updates: int = 0               # optimisation steps of the policy (restarts included)
    checkpointed_updates: int = 0  # the update count of the last checkpoint
    observed: int = 0              # fetched links whose outcome the policy learned from (this run)
    pending: int = 0               # links scored whose outcome (a scored document, or a failure) is still to come
    prioritized: int = 0           # priorities sent to the coordinator (this run)
    mean_reward: float = 0.0       # over the last 100 observations
    mean_intrinsic: float = 0.0
    mean_extrinsic: float = 0.0
    device: str = ""
    cache: CacheInfo = Field(default_factory=CacheInfo)
    # how stale what the policy learns from is (None until a doc.scored with fetched_at arrived): the median, over
    # the last scored pages, of the seconds from a page's fetch to the policy learning from its scores
    signal_lag_s: float | None = None
    topic_backlog: int | None = None   # the topic model's backlog as its last doc.scored said (None: not heard yet)


class CacheGet(Message):
    """A document from the hot cache; a miss reads it from the document store and caches it."""

    type_name: ClassVar[str] = "cache.get"
    url: str
    embedding: bool = False        # include the semantic vector


class CachedDocument(Message):
    type_name: ClassVar[str] = "cache.doc"
    url: str
    found: bool = False
    source: str = ""               # cache | store ("" when not found)
    document_id: int | None = None
    title: str = ""
    text: str = ""
    novelty: float = 0.0
    embedding: bytes = b""         # float32 little-endian, when asked for and known


# --- the GGUF model manager (agents/vram/models.py) -------------------------------------------------------


class Generate(Message):
    """Text from a GGUF model; loads it first (under a VRAM lease) when it is not loaded."""

    type_name: ClassVar[str] = "model.generate"
    model: str
    prompt: str = Field(max_length=200_000)
    max_tokens: int = Field(64, ge=1, le=8192)
    temperature: float = Field(0.0, ge=0.0, le=5.0)
    top_p: float = Field(0.95, gt=0.0, le=1.0)
    stop: list[str] = Field(default_factory=list, max_length=16)
    seed: int | None = None
    ignore_eos: bool = False


class Generated(Message):
    type_name: ClassVar[str] = "model.generated"
    model: str
    text: str
    tokens: int
    finish: str                 # stop | length
    elapsed_s: float
    placement: str              # gpu:N, gpu:N (k/n layers), cpu


class Embed(Message):
    """Embeddings from a GGUF model loaded with embedding: true."""

    type_name: ClassVar[str] = "model.embed"
    model: str
    texts: list[str] = Field(min_length=1, max_length=1024)


class Embedded(Message):
    type_name: ClassVar[str] = "model.embedded"
    model: str
    dim: int
    vectors: bytes              # float32 little-endian, len(texts) rows of `dim`


class ModelsRequest(Message):
    """The model manager's models and where they are."""

    type_name: ClassVar[str] = "model.list"


class ModelInfo(BaseModel):
    name: str
    path: str
    state: str                  # unloaded | waiting | loading | loaded | failed
    placement: str = ""
    n_gpu_layers: int = 0
    estimate_bytes: int = 0     # GPU bytes asked for (0: CPU)
    measured_bytes: int | None = None   # NVML delta of the load, where a GPU measured it
    lease: str | None = None
    idle_s: float | None = None
    requests: int = 0
    error: str = ""


class ModelsReply(Message):
    type_name: ClassVar[str] = "model.listing"
    models: list[ModelInfo] = Field(default_factory=list)
    gpu: str = ""               # what the VRAM optimizer said about GPUs ("no GPU", names)


class Unload(Message):
    """Unloads a model now (its lease is released); answered mesh.ack."""

    type_name: ClassVar[str] = "model.unload"
    model: str


# --- GPU memory leases: any agent that loads a model <-> the VRAM optimizer (agents/vram) ---------

GRANTED, WAITING, REVOKING = "granted", "waiting", "revoking"     # a lease's states


class LeaseInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    lease_id: str
    agent: str
    model: str
    state: str                      # granted | waiting | revoking
    bytes: int                      # counted against the budget
    requested: int                  # what the holder asked for
    priority: int
    gpu: int | None = None
    device: str = ""                # cuda:N, or cpu
    position: int | None = None     # while waiting: 1 is served next
    age_s: float = 0.0
    idle_s: float = 0.0             # since it was last used
    reason: str = ""


class GpuStatus(BaseModel):
    model_config = ConfigDict(extra="forbid")
    index: int
    name: str
    total: int
    used: int
    free: int
    budget: int                     # total minus headroom
    leased: int                     # granted and revoking leases
    external: int                   # used beyond the leases and the headroom
    available: int                  # what a request could be granted now
    temperature_c: float | None = None
    utilization_pct: float | None = None
    processes: dict[str, int] = Field(default_factory=dict)   # pid (as text) -> bytes


class VramAcquire(Message):
    """Asks for `bytes` of GPU memory for `model` before loading it."""

    type_name: ClassVar[str] = "vram.acquire"
    agent: str                      # the holder: the agent that will load the model
    model: str
    bytes: int                      # the holder's estimate (agents/gpu.py estimates)
    priority: int = 0               # higher is served first and may revoke lower
    instance: str = ""              # the holder's instance id: leases of its earlier instances are reclaimed
    pid: int | None = None          # the holder's process, for measuring what the load really took
    wait: bool = True               # false: denied instead of queued when it does not fit now


class VramDecision(Message):
    type_name: ClassVar[str] = "vram.decision"
    status: str                     # granted | wait | denied
    model: str
    lease_id: str = ""              # empty when denied
    bytes: int = 0                  # counted against the budget (the request corrected by past measurements)
    gpu: int | None = None
    device: str = ""                # cuda:N, or cpu when there is no GPU; empty when denied
    position: int | None = None
    reason: str = ""
    ttl_s: float = 0.0              # renew (vram.touch) more often than this, or the lease is reclaimed


class VramRelease(Message):
    """The holder unloaded the model (or gives up waiting)."""

    type_name: ClassVar[str] = "vram.release"
    agent: str
    lease_id: str


class VramReleased(Message):
    type_name: ClassVar[str] = "vram.released"
    lease_id: str
    bytes: int = 0


class VramTouch(Message):
    """Renews a lease; `used`: the model was used (LRU, keep-alive); `loaded`: it is now in memory: measure it."""

    type_name: ClassVar[str] = "vram.touch"
    agent: str
    lease_id: str
    used: bool = True
    loaded: bool = False


class VramLeaseState(Message):
    type_name: ClassVar[str] = "vram.lease"
    lease: LeaseInfo


class VramStatusRequest(Message):
    type_name: ClassVar[str] = "vram.status"


class VramStatus(Message):
    type_name: ClassVar[str] = "vram.status_reply"
    backend: str                    # nvml | simulated | none
    detail: str = ""                # what was found, or why there is no GPU
    headroom: int = 0
    gpus: list[GpuStatus] = Field(default_factory=list)
    leases: list[LeaseInfo] = Field(default_factory=list)    # granted and revoking
    queue: list[LeaseInfo] = Field(default_factory=list)     # waiting, in the order they will be served
    estimates: dict[str, float] = Field(default_factory=dict)   # model -> measured / estimated


class VramGranted(Message):
    """Event (topic vram.granted.<agent>): a waiting request was granted."""

    type_name: ClassVar[str] = "vram.granted"
    lease: LeaseInfo


class VramRevoke(Message):
    """Event (topic vram.revoke.<agent>): unload the model and release the lease."""

    type_name: ClassVar[str] = "vram.revoke"
    lease_id: str
    agent: str
    model: str
    reason: str                     # idle | priority | reclaimed (already gone: unload, no release needed)
    detail: str = ""
    grace_s: float = 0.0            # after this the lease is reclaimed whether released or not
