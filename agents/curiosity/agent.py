"""The eviction and curiosity agent: steers the crawl towards new knowledge and keeps the hot cache.

Curiosity. The crawl coordinator publishes `crawl.discovered` for the outlinks a stored page adds to the frontier;
this agent scores each link with the curiosity policy (agents/curiosity/policy.py: an Intrinsic Curiosity Module and a
reward head, in torch) and sends the scores to the coordinator as frontier priorities (`crawl.prioritize`). When the
topic model publishes `doc.scored` for a page that was one of those links, the policy learns from it: the parent
page, the link and the page it led to make one transition, rewarded by the page's novelty and by the forward model's
surprise. Links are scored at once (without their parent's state when the topic model has not scored the parent
yet) and scored again when the parent's state arrives and every `rescore_every` learned pages, so the frontier's
order follows what the policy has learnt.

The policy's weights are checkpointed (every `checkpoint_every` updates, every `checkpoint_s` seconds, and when the
agent stops); a restart loads the last checkpoint, so a crash loses at most the updates since. While the agent is
down the coordinator keeps the priorities it was last given; links discovered meanwhile get its own order
(breadth-first) until the agent is back and scores the ones it hears of.

Hot cache. Every scored document (text, title, semantic vector, novelty) goes into the hot cache
(agents/curiosity/hotcache.py: in-process by default, Redis when `cache_url` is set) under an item and byte budget; over
budget, the lowest-value documents are evicted (novelty, recency, use). `cache.get` answers from the cache, or reads
the document store on a miss and caches it. Eviction only ever drops cache entries: the document store is the
durable copy and is never written here.

How stale the signal is. The topic model scores pages some time after they were fetched, and on a CPU host it can
fall behind the crawl (issue 19). Every doc.scored carries the page's fetch time and the topic model's backlog; the
agent keeps the delay from fetch to the moment the policy learns from the page (the topic model's queue and scoring
plus this agent's own queue), reports the median of the last LAG_SAMPLES as `signal_lag_s` (gauges, status,
Prometheus) with the topic model's backlog, and logs a warning once when the median goes over `lag_warn_s` (again
only after it came back under): steering on a signal minutes old mostly follows link texts, see OPERATIONS.md.

All the work (anchor embeddings, torch, the store, the cache) runs on one worker thread fed by a queue; the reactor
thread only receives events and requests and sends priorities.
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from typing import ClassVar

import numpy as np
import torch
from prometheus_client import Gauge
from pydantic import Field

from agents.contracts import (
    CachedDocument,
    CacheGet,
    CacheInfo,
    CrawlDiscovered,
    CuriosityStatus,
    CuriosityStatusRequest,
    DocScored,
    PageFetched,
    Prioritize,
    PrioritizeResult,
)
from agents.curiosity.hotcache import CachedDoc, HotCacheUnavailable, open_hotcache
from agents.curiosity.policy import Candidate, CuriosityParams, CuriosityPolicy, PageState
from agents.embedding import Embedder
from agents.gpu import resolve_device
from mesh.config import AgentRef
from mesh.runtime import Agent, AgentSettings, handles
from network.codec import Envelope
from network.rpc import Deferred, MeshError
from store.docstore import DocStore, StoreUnavailable, open_docstore

GONE_OUTCOMES = ("failed", "disallowed", "skipped")
PRIORITIZE_BATCH = 5000
LAG_SAMPLES = 50       # the signal lag is the median over this many of the latest scored pages
LAG_MIN_SAMPLES = 5    # and is warned about only from this many: one page re-extracted from an old fetch is no trend


class CuriositySettings(AgentSettings):
    single_agent: ClassVar[str] = (
        "its policy learns from every scored page and sets the priorities of its coordinator's frontier: replicas "
        "would each learn from part of the pages and send the frontier conflicting priorities")
    coordinator: AgentRef("crawl_coordinator") = Field("crawler", description="the crawl coordinator whose frontier this agent steers")
    topic_model: AgentRef("topic_model") = Field("topics", description="the topic model whose doc.scored events teach the policy")
    model: str = Field("all-MiniLM-L6-v2", description="sentence-transformers model for anchor texts (the topic "
                       "model's, so anchors and pages share one space)")
    device: str = Field("auto", description="auto (a GPU when torch sees one), cpu, cuda, cuda:N")
    policy: CuriosityParams = Field(default_factory=CuriosityParams)
    max_pending: int = Field(200_000, ge=100, description="links tracked at most (the oldest are forgotten: they keep "
                             "their last priority in the frontier)")
    max_pages: int = Field(100_000, ge=100, description="page states kept for scoring their outlinks")
    torch_threads: int = Field(1, ge=1, le=256, description="CPU threads for torch in this agent: its networks are "
                               "small, and on a busy machine more threads make each step slower, not faster")
    checkpoint_every: int = Field(200, ge=1, description="policy updates between checkpoints")
    checkpoint_s: float = Field(60.0, gt=0, description="seconds between checkpoints")
    cache_url: str | None = Field(None, description="redis://... for a hot cache in Redis; none: stores.cache, and "
                                  "without that in this process")
    cache_max_items: int | None = Field(5000, ge=1, description="documents the hot cache holds at most")
    cache_max_mb: float | None = Field(256.0, gt=0, description="megabytes the hot cache holds at most")
    lag_warn_s: float = Field(60.0, gt=0, description="warn (once, until it comes back under) when the signal lag, "
                              "the median seconds from a page's fetch to the policy learning from its scores, is over "
                              "this")


class CuriosityAgent(Agent):
    kind = "curiosity"
    image = "model"   # needs the `model` extra (podman_build.sh: the model image)
    Settings = CuriositySettings

    def __init__(self, name, config) -> None:
        super().__init__(name, config)
        self.dir = config.mesh.data_dir / "curiosity"
        self.path = self.dir / f"{name}.pt"
        self.policy: CuriosityPolicy | None = None
        self.cache = None
        self.store: DocStore | None = None
        self.jobs: queue.Queue = queue.Queue()
        self.worker: threading.Thread | None = None
        self.lock = threading.Lock()                  # the counters read by status requests
        # links scored and waiting for their outcome (doc.scored, or a failed fetch) to learn from
        self.pending: collections.OrderedDict[str, Candidate] = collections.OrderedDict()
        self.left: set[str] = set()                   # of those, the ones no longer queued: not scored again
        self.children: dict[str, list[str]] = {}      # parent url -> pending links found on it
        self.pages: collections.OrderedDict[str, PageState] = collections.OrderedDict()
        self.rewards: collections.deque = collections.deque(maxlen=100)
        self.counts = {"observed": 0, "prioritized": 0, "checkpointed_updates": 0}
        self.since_rescore = 0
        self.last_checkpoint = time.monotonic()
        self.device = ""
        self.lags: collections.deque[float] = collections.deque(maxlen=LAG_SAMPLES)   # the worker's, under lock
        self.signal_lag_s: float | None = None    # median of self.lags, set by the worker
        self.topic_backlog: int | None = None     # from the latest doc.scored that carried it
        self.lag_warned = False
        r = self.metrics.registry
        Gauge("curiosity_signal_lag_seconds", "Median seconds from a page's fetch to the policy learning from its "
              "scores, over the last 50 scored pages", registry=r).set_function(lambda: self.signal_lag_s or 0.0)
        Gauge("curiosity_topic_backlog_documents", "The topic model's backlog (documents stored, not scored yet) as "
              "its latest doc.scored said", registry=r).set_function(lambda: self.topic_backlog or 0)

    # --- start, stop ------------------------------------------------------------------------------

    def setup(self) -> None:
        s = self.settings
        self.subscribe(s.coordinator, CrawlDiscovered.type_name, lambda m, e: self.jobs.put(("discovered", m)))
        self.subscribe(s.coordinator, PageFetched.type_name, self._on_fetched)
        self.subscribe(s.topic_model, DocScored.type_name, lambda m, e: self.jobs.put(("scored", m)))

    def on_ready(self) -> None:
        s = self.settings
        started = time.monotonic()
        torch.set_num_threads(s.torch_threads)   # measured: 4 learning steps took 3.5 s with 2 threads on a loaded
        #                                          2-core machine, 12 ms with 1
        embedder = Embedder(s.model, device=s.device, lexical_dim=0)
        model = embedder.model

        def encode(texts: list[str]) -> np.ndarray:
            return model.encode(texts, batch_size=128, normalize_embeddings=True, convert_to_numpy=True,
                                show_progress_bar=False).astype(np.float32)

        self.device = resolve_device(s.device)
        params = s.policy.model_copy(update={"device": self.device})
        self.dir.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            self.policy = CuriosityPolicy.load(self.path, params, encode)
            self.counts["checkpointed_updates"] = self.policy.updates
        else:
            self.policy = CuriosityPolicy(params, encode)
        self.cache = open_hotcache(s.cache_url or self.config.stores.cache, max_items=s.cache_max_items,
                                   max_bytes=int(s.cache_max_mb * 1e6) if s.cache_max_mb else None)
        self.log.info("curiosity policy ready in %.1fs on %s: %d update(s) from %s; hot cache %s",
                      time.monotonic() - started, self.device, self.policy.updates,
                      self.path if self.path.exists() else "a fresh start", self.cache.stats().backend)
        self.worker = threading.Thread(target=self._work, name="curiosity", daemon=True)
        self.worker.start()

    def on_drain(self) -> None:
        if self.worker is not None:
            self.jobs.put(("stop", None))
            self.worker.join(self.config.mesh.drain_timeout_s)

    def close(self) -> None:
        super().close()
        if self.worker is None or not self.worker.is_alive():
            if self.cache is not None:
                self.cache.close()
                self.cache = None

    # --- events and requests (reactor thread) -----------------------------------------------------

    def _on_fetched(self, event: PageFetched, env: Envelope) -> None:
        if event.outcome in GONE_OUTCOMES:
            self.jobs.put(("failed", event.url))
        elif event.outcome != "retry":
            self.jobs.put(("left", event.url))    # out of the queue; its outcome comes with doc.scored

    def gauges(self) -> dict[str, float]:
        out: dict[str, float] = dict(self.counts)
        if self.policy is not None:
            out["updates"] = self.policy.updates
        if self.signal_lag_s is not None:
            out["signal_lag_s"] = round(self.signal_lag_s, 1)
        if self.topic_backlog is not None:
            out["topic_backlog"] = self.topic_backlog
        try:
            st = self.cache.stats() if self.cache is not None else None
        except HotCacheUnavailable:
            st = None
        if st is not None:
            out.update(cache_items=st.items, cache_bytes=st.bytes, cache_evictions=sum(st.evictions.values()))
        return out

    @handles(CuriosityStatusRequest)
    def on_status(self, msg: CuriosityStatusRequest, env: Envelope) -> CuriosityStatus:
        if self.policy is None:
            raise MeshError("unavailable", f"curiosity agent {self.name!r} is not ready yet")
        with self.lock:
            rewards = list(self.rewards)
            counts = dict(self.counts)
            pending = len(self.pending)
        try:
            cache = self._cache_info()
        except HotCacheUnavailable as exc:
            self.log.warning("hot cache unavailable: %s", exc)
            cache = CacheInfo(backend=f"unavailable: {exc}"[:200])

        def mean(i: int) -> float:
            return round(float(np.mean([r[i] for r in rewards])), 6) if rewards else 0.0

        return CuriosityStatus(updates=self.policy.updates, checkpointed_updates=counts["checkpointed_updates"],
                               observed=counts["observed"], pending=pending, prioritized=counts["prioritized"],
                               mean_reward=mean(0), mean_intrinsic=mean(1), mean_extrinsic=mean(2), device=self.device,
                               cache=cache, topic_backlog=self.topic_backlog,
                               signal_lag_s=None if self.signal_lag_s is None else round(self.signal_lag_s, 1))

    @handles(CacheGet)
    def on_cache_get(self, msg: CacheGet, env: Envelope) -> Deferred:
        if self.policy is None:
            raise MeshError("unavailable", f"curiosity agent {self.name!r} is not ready yet")
        reply = Deferred()
        self.jobs.put(("cache_get", (msg, reply)))
        return reply

    def _cache_info(self) -> CacheInfo:
        st = self.cache.stats()
        return CacheInfo(backend=st.backend, items=st.items, bytes=st.bytes, max_items=st.max_items,
                         max_bytes=st.max_bytes, hits=st.hits, misses=st.misses, evictions=dict(st.evictions))

    def _send(self, priorities: dict[str, float]) -> None:
        """Reactor thread: the priorities to the coordinator, in frames of at most PRIORITIZE_BATCH URLs."""
        items = list(priorities.items())
        peer = self.peer(self.settings.coordinator)
        for i in range(0, len(items), PRIORITIZE_BATCH):
            batch = dict(items[i:i + PRIORITIZE_BATCH])
            peer.request(Prioritize(priorities=batch), self._prioritized, self._prioritize_failed)

    def _prioritized(self, reply: PrioritizeResult) -> None:
        with self.lock:
            self.counts["prioritized"] += reply.updated
        for url in reply.not_queued:   # fetched meanwhile: no more scores for it, its outcome still teaches
            self.jobs.put(("left", url))

    def _prioritize_failed(self, exc: MeshError) -> None:
        # the coordinator keeps its own order meanwhile; the next rescore sends everything pending again
        self.log.warning("coordinator %s did not take priorities: %s", self.settings.coordinator, exc.message)

    # --- the worker -------------------------------------------------------------------------------

    def _work(self) -> None:
        try:
            while True:
                job, arg = self.jobs.get()
                if job == "stop":
                    break
                getattr(self, f"_job_{job}")(arg)
                self._maybe_checkpoint()
        except Exception as exc:   # reported, and the supervisor restarts the agent from its checkpoint
            self.log.exception("curiosity worker failed")
            self.failure = f"curiosity worker failed: {type(exc).__name__}: {exc}"
            self.request_stop()
            return
        finally:
            if self.store is not None:
                self.store.close()
                self.store = None
        self._checkpoint()

    def _job_discovered(self, event: CrawlDiscovered) -> None:
        parent = self.pages.get(event.parent)
        fresh = []
        for link in event.links:
            cand = Candidate(url=link.url, anchor=link.anchor, depth=event.depth, parent=parent)
            with self.lock:
                self.pending[link.url] = cand
            self.children.setdefault(event.parent, []).append(link.url)
            fresh.append(cand)
        self._forget_oldest()
        self._score(fresh)

    def _job_scored(self, event: DocScored) -> None:
        self._note_lag(event)
        vector = event.vector()
        if vector is None:     # an exact copy carries no vector: it is its original's state
            original = self.pages.get(event.duplicate_of or "")
            vector = original.embedding if original is not None else None
        if vector is None:
            return
        state = PageState(url=event.url, embedding=vector, topic=event.topic, novelty=float(event.novelty),
                          duplicate=event.duplicate_of is not None)
        self.pages[event.url] = state
        while len(self.pages) > self.settings.max_pages:
            self.pages.popitem(last=False)
        with self.lock:
            cand = self.pending.pop(event.url, None)
        self.left.discard(event.url)
        if cand is not None:
            r = self.policy.observe(cand, state)
            if self.policy.params.learn_steps:
                self.policy.learn(self.policy.params.learn_steps)
            with self.lock:
                self.counts["observed"] += 1
                self.rewards.append((r.total, r.intrinsic, r.extrinsic))
            self.since_rescore += 1
        self._cache_put(event, state)
        children = [self.pending[u] for u in self.children.pop(event.url, []) if u in self.pending]
        for c in children:
            c.parent = state
        if self.since_rescore >= self.policy.params.rescore_every:
            self.since_rescore = 0
            self._score([c for u, c in self.pending.items() if u not in self.left])
        elif children:
            self._score([c for c in children if c.url not in self.left])

    def _note_lag(self, event: DocScored) -> None:
        """How stale what the policy is about to learn is: now (it learns next) less the page's fetch time. An event
        of an older topic model carries neither figure and changes nothing."""
        if event.backlog is not None:
            self.topic_backlog = event.backlog
        if event.fetched_at is None:
            return
        with self.lock:
            self.lags.append(max(0.0, time.time() - event.fetched_at))
            n, lag = len(self.lags), float(np.median(self.lags))
        self.signal_lag_s = lag
        limit = self.settings.lag_warn_s
        if lag > limit and n >= LAG_MIN_SAMPLES and not self.lag_warned:
            self.lag_warned = True
            self.log.warning("signal lag %.1fs is over lag_warn_s (%gs): the policy learns from pages fetched that "
                             "long ago (topic model backlog %s), so the crawl is steered by link texts more than by "
                             "what the pages held; slow the crawl or speed up the topic model", lag, limit,
                             "unknown" if self.topic_backlog is None else self.topic_backlog)
        elif lag <= limit and self.lag_warned:
            self.lag_warned = False
            self.log.info("signal lag back to %.1fs (lag_warn_s %gs)", lag, limit)

    def _job_left(self, url: str) -> None:
        self.left.add(url)
        if len(self.left) > 2 * self.settings.max_pending:
            self.left = {u for u in self.left if u in self.pending}

    def _job_failed(self, url: str) -> None:
        """A link that gave no document (failed for good, disallowed, not a page): a small negative reward."""
        with self.lock:
            cand = self.pending.pop(url, None)
        self.left.discard(url)
        if cand is not None:
            r = self.policy.observe(cand, None)
            with self.lock:
                self.counts["observed"] += 1
                self.rewards.append((r.total, r.intrinsic, r.extrinsic))

    def _job_cache_get(self, arg: tuple[CacheGet, Deferred]) -> None:
        msg, reply = arg
        outcome: tuple
        try:
            outcome = ("ok", self._cache_get(msg))
        except (StoreUnavailable, HotCacheUnavailable) as exc:
            outcome = ("error", "unavailable", str(exc))
        self.reactor.call_soon_threadsafe(
            lambda: reply.resolve(outcome[1]) if outcome[0] == "ok" else reply.fail(outcome[1], outcome[2]))

    def _cache_get(self, msg: CacheGet) -> CachedDocument:
        source = "cache"
        try:
            doc = self.cache.get(msg.url)
        except HotCacheUnavailable as exc:
            self.log.warning("hot cache unavailable (%s): reading %s from the store", exc, msg.url)
            doc = None
        if doc is None:
            stored = self._db().get(msg.url)
            if stored is None or stored.state != "extracted":
                return CachedDocument(url=msg.url)
            page = self.pages.get(msg.url)
            doc = CachedDoc(url=msg.url, document_id=stored.id, title=stored.title or "", text=stored.text or "",
                            embedding=page.embedding if page is not None else None,
                            novelty=float(stored.novelty or 0.0))
            self._put(doc)
            source = "store"
        emb = doc.embedding.astype("<f4").tobytes() if msg.embedding and doc.embedding is not None else b""
        return CachedDocument(url=msg.url, found=True, source=source, document_id=doc.document_id, title=doc.title,
                              text=doc.text, novelty=doc.novelty, embedding=emb)

    def _db(self) -> DocStore:
        """The worker thread's own connection to the document store, opened when first needed (and again after an
        outage: StoreUnavailable goes to the caller, which carries on without it)."""
        if self.store is None:
            self.store = open_docstore(self.config.store_url("documents"))
        return self.store

    def _cache_put(self, event: DocScored, state: PageState) -> None:
        if state.duplicate:
            return     # the original is (or was) cached; a copy adds nothing worth memory
        try:
            stored = self._db().get(event.url)
        except StoreUnavailable as exc:
            self.log.warning("document store unavailable (%s): %s not cached", exc, event.url)
            return
        if stored is None or stored.state != "extracted":
            return
        self._put(CachedDoc(url=event.url, document_id=stored.id, title=stored.title or "", text=stored.text or "",
                            embedding=state.embedding, novelty=state.novelty))

    def _put(self, doc: CachedDoc) -> None:
        try:
            for ev in self.cache.put(doc):
                self.log.debug("evicted %s from the hot cache (%s, value %.3f)", ev.url, ev.reason, ev.value)
        except HotCacheUnavailable as exc:
            self.log.warning("hot cache unavailable (%s): %s not cached", exc, doc.url)

    def _score(self, candidates: list[Candidate]) -> None:
        if not candidates:
            return
        scores = self.policy.score(candidates)
        priorities = {c.url: float(p) for c, p in zip(candidates, scores)}
        self.reactor.call_soon_threadsafe(lambda: self._send(priorities))

    def _forget_oldest(self) -> None:
        with self.lock:
            while len(self.pending) > self.settings.max_pending:
                self.pending.popitem(last=False)
        if len(self.children) > 2 * self.settings.max_pending // 10:
            self.children = {p: [u for u in urls if u in self.pending] for p, urls in self.children.items()}
            self.children = {p: urls for p, urls in self.children.items() if urls}

    # --- checkpoints ------------------------------------------------------------------------------

    def _maybe_checkpoint(self) -> None:
        s = self.settings
        done = self.policy.updates - self.counts["checkpointed_updates"]
        if done >= s.checkpoint_every or (done and time.monotonic() - self.last_checkpoint >= s.checkpoint_s):
            self._checkpoint()

    def _checkpoint(self) -> None:
        if self.policy is None or self.policy.updates == self.counts["checkpointed_updates"]:
            return
        started = time.monotonic()
        self.policy.save(self.path)
        with self.lock:
            self.counts["checkpointed_updates"] = self.policy.updates
        self.last_checkpoint = time.monotonic()
        self.log.info("checkpoint: %d update(s) -> %s (%.2fs)", self.policy.updates, self.path,
                      self.last_checkpoint - started)
